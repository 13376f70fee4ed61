"""Sparsity per leaf of a parameter (or mask) tree, counted on the host: :func:`summary`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _markdown, select

__all__ = ["LeafSparsity", "SparsitySummary", "summary"]


class LeafSparsity(NamedTuple):
    """One row of a :class:`SparsitySummary`: a leaf's path, shape, size and zero count."""

    path: str
    shape: tuple[int, ...]
    size: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size if self.size else 0.0


class SparsitySummary(NamedTuple):
    """Sparsity per leaf and overall, from :func:`summary`; ``str()`` gives a table."""

    leaves: tuple[LeafSparsity, ...]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.leaves)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.leaves)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size if self.size else 0.0

    def table(self) -> str:
        """A markdown table: one row per leaf, then the total."""
        columns = [("leaf", "<"), ("shape", "<"), ("size", ">"), ("zeros", ">"), ("sparsity", ">")]
        rows = [
            (r.path, "x".join(map(str, r.shape)), r.size, r.zeros, f"{r.sparsity:.2%}")
            for r in self.leaves
        ]
        rows.append(("**total**", "", self.size, self.zeros, f"{self.sparsity:.2%}"))
        return _markdown.table(columns, rows)

    def __str__(self) -> str:
        return self.table()


def summary(tree: Any, where: select.Where = None) -> SparsitySummary:
    """Counts exact zeros per selected leaf of a parameter (or mask) tree, on the host.

    Args:
      tree: parameters (zeros are pruned weights) or masks (``False`` is pruned).
      where: leaves to report (default: floating kernels; pass ``lambda p, l: True`` for all).
    """
    selector = select.as_selector(where)
    rows = []
    for path, leaf in select.leaves_with_paths(tree):
        is_mask = getattr(leaf, "dtype", None) == jnp.bool_
        if not (is_mask and getattr(leaf, "ndim", 0) >= 2) and not selector(path, leaf):
            continue
        host = np.asarray(jax.device_get(leaf))
        rows.append(LeafSparsity(path, tuple(host.shape), int(host.size), int(np.sum(host == 0))))
    return SparsitySummary(tuple(rows))
