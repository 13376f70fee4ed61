"""Clustered leaves as codebooks: :func:`codebook` splits a view with few values per group into
shared values and indices, :func:`reconstruct` rebuilds it bit for bit (host NumPy)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from mixjax import _checks

__all__ = ["Codebook", "codebook", "reconstruct"]


class Codebook(NamedTuple):
    """A clustered leaf as a codebook and indices (host NumPy arrays).

    Attributes:
      centroids: ``(K,)`` per leaf or ``(C, K)`` per output channel (``C`` = last axis), the
        leaf's dtype, ascending; entries past a group's distinct values repeat its largest.
      indices: ``uint8`` (``uint16`` when ``K > 256``), the leaf's shape; the value of each weight
        is its group's ``centroids[index]``.
    """

    centroids: np.ndarray
    indices: np.ndarray


def codebook(view: jax.Array, num_clusters: int, *, per_channel: bool = False) -> Codebook:
    """Splits a clustered view (at most ``num_clusters`` values per group) into a codebook.

    Works for both modes of :func:`mixjax.share.cluster` (give it the view that ``apply``
    returned), and :func:`reconstruct` gives the view back bit for bit.

    Raises:
      ValueError: a group has more than ``num_clusters`` distinct values, or ``num_clusters``
        is not in ``[1, 65536]``.
    """
    name = "mixjax.share.codebook"
    num_clusters = _checks.integer(name, "num_clusters", num_clusters, 1, 65536)
    view = np.asarray(view)
    groups = view.reshape(-1, view.shape[-1]).T if per_channel else view.reshape(1, -1)
    index_dtype = np.uint8 if num_clusters <= 256 else np.uint16
    centroids = np.empty((groups.shape[0], num_clusters), view.dtype)
    indices = np.empty(groups.shape, index_dtype)
    for g, values in enumerate(groups):
        unique, inverse = np.unique(values, return_inverse=True)
        if unique.size > num_clusters:
            where = f"output channel {g}" if per_channel else "the leaf"
            raise ValueError(
                f"{name}: {where} of shape {view.shape} has {unique.size} distinct values, "
                f"more than num_clusters={num_clusters}"
            )
        centroids[g, : unique.size] = unique
        centroids[g, unique.size :] = unique[-1]
        indices[g] = inverse.reshape(-1)
    indices = (indices.T if per_channel else indices).reshape(view.shape)
    return Codebook(centroids if per_channel else centroids[0], indices)


def reconstruct(book: Codebook) -> np.ndarray:
    """The leaf a :class:`Codebook` encodes: ``centroids[indices]`` (per channel when 2-D)."""
    centroids, indices = np.asarray(book.centroids), np.asarray(book.indices)
    if centroids.ndim == 1:
        return centroids[indices]
    flat = indices.reshape(-1, indices.shape[-1]).astype(np.int64)
    return np.take_along_axis(centroids.T, flat, axis=0).reshape(indices.shape)
