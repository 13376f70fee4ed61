"""Scalar (1-D) k-means in JAX: the engine behind weight clustering.

Weight clustering groups the *values* of a weight tensor, so the k-means here is one-dimensional,
and 1-D k-means is special: clusters are contiguous ranges of the sorted values, separated by the
midpoints between consecutive (ascending) centroids. A Lloyd iteration therefore needs no pass
over the data once the data is summarized as ascending points with prefix sums of counts and
values: the cluster ranges come from ``K - 1`` binary searches and the new centroids from
differences of prefix sums, ``O(K log m)`` work per iteration. Lloyd runs to its fixed point (the
ranges stop changing) or ``max_iterations``, whichever comes first.

The summary is exact or a histogram:

* groups of at most ``bins`` values are sorted: the points are the values themselves and Lloyd is
  exact;
* larger groups are summarized by a ``bins``-bin histogram over ``[min, max]`` (counts and sums
  per bin, one scatter-add pass), each bin standing at the mean of its members. Sorting would cost
  far more than the whole fit on CPU. One final *exact* Lloyd step on the raw values (assign,
  take member means) corrects what the binning blurred.

Returned assignments are always the nearest of the returned centroids.

Every function works on the last axis and batches over the leading ones (vmap), so the output
channels of a kernel, or several same-size tensors stacked, are clustered in one call. ``mask``
(same shape as ``x``, bool) excludes values from the fit, e.g. pruned zeros or padding.

Conventions: centroids are float32 and ascending along their last axis (``K`` of them);
assignments are int32 indices into them; ties at a midpoint go to the upper cluster.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mixjax import _checks
from mixjax.share.kmeans_init import INITS, RANDOM_INITS, Points, initial_centroids, summarize

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_MAX_ITERATIONS",
    "INITS",
    "RANDOM_INITS",
    "KMeansResult",
    "assign",
    "fit",
    "init_centroids",
    "refine",
]

DEFAULT_BINS = 16384
DEFAULT_MAX_ITERATIONS = 1000
# Groups initialized at once by lax.map, bounding the memory of the dynamic programs.
INIT_BATCH = 8


class KMeansResult(NamedTuple):
    """Result of :func:`fit` / :func:`refine` for ``x`` of shape ``(..., n)``.

    Attributes:
      centroids: ``(..., K)`` float32, ascending: the member means of the final exact Lloyd
        step (a centroid with no members keeps its previous value).
      assignments: ``(..., n)`` int32 in ``[0, K)``: the nearest centroid of each value (masked
        values are assigned too, but took no part in the fit). At Lloyd's fixed point (always
        reached by exact fits within ``max_iterations``) each centroid is exactly the mean of
        the values assigned to it.
      inertia: ``(...)`` float32, the sum over unmasked values of the squared distance to their
        centroid.
      iterations: ``(...)`` int32, Lloyd iterations run on the summary.
    """

    centroids: jax.Array
    assignments: jax.Array
    inertia: jax.Array
    iterations: jax.Array


def _midpoints(centroids: jax.Array) -> jax.Array:
    return (centroids[..., 1:] + centroids[..., :-1]) / 2


def _search_method(num_clusters: int) -> str:
    # Comparing against every midpoint vectorizes well and wins for the usual small K.
    return "compare_all" if num_clusters <= 64 else "scan"


def _assign_one(x: jax.Array, centroids: jax.Array) -> jax.Array:
    method = _search_method(centroids.shape[-1])
    return jnp.searchsorted(_midpoints(centroids), x, side="right", method=method).astype(jnp.int32)


def assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """The nearest centroid of each value.

    Args:
      x: ``(..., n)`` values.
      centroids: ``(..., K)`` ascending centroids, with ``x``'s leading axes.

    Returns:
      ``(..., n)`` int32 indices into ``centroids``; a value exactly at a midpoint goes up.
    """
    x = jnp.asarray(x, jnp.float32)
    centroids = jnp.asarray(centroids, jnp.float32)
    fn = _assign_one
    for _ in range(x.ndim - 1):
        fn = jax.vmap(fn)
    return fn(x, centroids)


def _lloyd(points: Points, centroids: jax.Array, max_iterations: int):
    """Lloyd on the summary to its fixed point; returns (centroids, iterations)."""
    m = points.values.shape[0]
    prefix_counts = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(points.counts)])
    prefix_sums = jnp.concatenate([jnp.zeros(1, jnp.float32), jnp.cumsum(points.sums)])

    def body(carry):
        centroids, edges, _, it = carry
        inner = jnp.searchsorted(points.values, _midpoints(centroids), side="left")
        new_edges = jnp.concatenate(
            [jnp.zeros(1, jnp.int32), inner.astype(jnp.int32), jnp.full(1, m, jnp.int32)]
        )
        counts = prefix_counts[new_edges[1:]] - prefix_counts[new_edges[:-1]]
        sums = prefix_sums[new_edges[1:]] - prefix_sums[new_edges[:-1]]
        means = points.shift + sums / jnp.maximum(counts, 1)
        # Means of consecutive runs ascend, and an empty cluster's centroid lies between its
        # neighbours' midpoints, so the centroids stay sorted.
        centroids = jnp.where(counts > 0, means, centroids)
        return centroids, new_edges, jnp.any(new_edges != edges), it + 1

    def cond(carry):
        _, _, changed, it = carry
        return changed & (it < max_iterations)

    edges = jnp.full(centroids.shape[0] + 1, -1, jnp.int32)
    carry = (centroids, edges, jnp.array(max_iterations > 0), jnp.int32(0))
    centroids, _, _, iterations = jax.lax.while_loop(cond, body, carry)
    return centroids, iterations


def _finish(x, mask, centroids, iterations) -> KMeansResult:
    """One exact Lloyd step on the raw values (assign, take means), then the final assignment."""
    x = x.astype(jnp.float32)
    k = centroids.shape[0]
    assignments = _assign_one(x, centroids)
    counts = jax.ops.segment_sum(mask.astype(jnp.int32), assignments, k)
    # Offsets from the member's current centroid are small, so their float32 sum stays precise.
    offsets = jnp.where(mask, x - centroids[assignments], 0.0)
    shifts = jax.ops.segment_sum(offsets, assignments, k) / jnp.maximum(counts, 1)
    centroids = centroids + shifts
    assignments = _assign_one(x, centroids)
    inertia = jnp.sum(jnp.where(mask, (x - centroids[assignments]) ** 2, 0.0))
    return KMeansResult(centroids, assignments, inertia, iterations)


def _flatten_groups(x, mask):
    lead = x.shape[:-1]
    x2 = x.reshape((-1, x.shape[-1]))
    mask2 = jnp.ones(x2.shape, bool) if mask is None else jnp.asarray(mask, bool).reshape(x2.shape)
    return lead, x2, mask2


@functools.partial(jax.jit, static_argnames=("num_clusters", "method", "bins"))
def _init_jit(key, x, mask, num_clusters, method, bins):
    lead, x2, mask2 = _flatten_groups(x, mask)

    def one(k, xi, mi):
        return initial_centroids(k, summarize(xi, mi, bins), num_clusters, method)

    keys = None if key is None else jax.random.split(key, x2.shape[0])
    out = jax.lax.map(lambda args: one(*args), (keys, x2, mask2), batch_size=INIT_BATCH)
    return out.reshape(lead + (num_clusters,))


@functools.partial(jax.jit, static_argnames=("max_iterations", "bins"))
def _refine_jit(x, centroids, mask, max_iterations, bins):
    lead, x2, mask2 = _flatten_groups(x, mask)
    c2 = centroids.reshape((-1, centroids.shape[-1])).astype(jnp.float32)

    def one(xi, mi, ci):
        points = summarize(xi, mi, bins)
        ci, iterations = _lloyd(points, jnp.sort(ci), max_iterations)
        return _finish(xi, mi, ci, iterations)

    result = jax.vmap(one)(x2, mask2, c2)
    k = c2.shape[-1]
    return KMeansResult(
        result.centroids.reshape(lead + (k,)),
        result.assignments.reshape(x.shape),
        result.inertia.reshape(lead),
        result.iterations.reshape(lead),
    )


@functools.partial(jax.jit, static_argnames=("num_clusters", "init", "max_iterations", "bins"))
def _fit_jit(key, x, mask, num_clusters, init, max_iterations, bins):
    centroids = _init_jit(key, x, mask, num_clusters, init, bins)
    return _refine_jit(x, centroids, mask, max_iterations, bins)


def _check(fn_name, x, mask, bins, max_iterations=None):
    """Validates the arguments every public function shares; returns ``x`` as an array."""
    x = x if hasattr(x, "dtype") else jnp.asarray(x)
    if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)):
        raise TypeError(
            f"{fn_name}: x must be a floating-point array, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{fn_name}: x must have a non-empty last axis, got shape {x.shape}")
    if mask is not None and tuple(jnp.shape(mask)) != tuple(x.shape):
        raise ValueError(
            f"{fn_name}: mask must have x's shape {tuple(x.shape)}, got {tuple(jnp.shape(mask))}"
        )
    _checks.integer(fn_name, "bins", bins, 2)
    _checks.integer(fn_name, "max_iterations", max_iterations, 0, optional=True)
    return x


def _check_clusters(fn_name, x, num_clusters):
    _checks.integer(fn_name, "num_clusters", num_clusters, 1)
    if num_clusters > x.shape[-1]:
        raise ValueError(
            f"{fn_name}: num_clusters={num_clusters} exceeds the {x.shape[-1]} values per group "
            f"(x has shape {tuple(x.shape)})"
        )


def _check_method(fn_name, key, method, arg):
    _checks.choice(fn_name, arg, method, INITS)
    if method in RANDOM_INITS and key is None:
        raise ValueError(f"{fn_name}: {arg}={method!r} is random and needs a jax.random key")


def init_centroids(
    key: jax.Array | None,
    x: jax.Array,
    num_clusters: int,
    *,
    method: str = "optimal",
    mask: jax.Array | None = None,
    bins: int = DEFAULT_BINS,
) -> jax.Array:
    """Initial centroids, one set per group (last axis of ``x``).

    Methods (the last four are TFMOT's):

    * ``"optimal"``: the optimal clustering of the values merged into :data:`OPTIMAL_GROUPS`
      equal-count groups, by dynamic programming (exact 1-D k-means with boundaries restricted to
      group edges); Lloyd then moves the boundaries freely. Deterministic, and it avoids the
      local optima the other methods can leave Lloyd in;
    * ``"linear"``: evenly spaced from the smallest to the largest value;
    * ``"density"``: the mid-quantiles ``(i + 1/2) / K`` of the values, so dense regions get more
      centroids;
    * ``"random"``: uniform in ``[min, max]`` (needs ``key``);
    * ``"kmeans++"``: D² sampling among the values (needs ``key``).

    Args:
      key: a ``jax.random`` key for ``"random"`` and ``"kmeans++"``; may be ``None`` otherwise.
        Groups get independent keys split from it.
      x: ``(..., n)`` floating values.
      num_clusters: ``K``, at most ``n``.
      method: one of :data:`INITS`.
      mask: optional ``(..., n)`` bool; ``False`` values are ignored.
      bins: groups larger than this are summarized by a histogram of this many bins.

    Returns:
      ``(..., K)`` float32 ascending centroids.

    Raises:
      ValueError: bad ``num_clusters``, ``method``, ``mask`` shape or ``bins``; a random method
        without a key.
      TypeError: ``x`` is not floating point.
    """
    name = "mixjax.share.kmeans.init_centroids"
    x = _check(name, x, mask, bins)
    _check_clusters(name, x, num_clusters)
    _check_method(name, key, method, "method")
    return _init_jit(key, x, mask, num_clusters, method, bins)


def refine(
    x: jax.Array,
    centroids: jax.Array,
    *,
    mask: jax.Array | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    bins: int = DEFAULT_BINS,
) -> KMeansResult:
    """Lloyd iterations from given centroids (a warm start), then one exact step.

    Args:
      x: ``(..., n)`` floating values.
      centroids: ``(..., K)`` starting centroids (any order; they are sorted first).
      mask: optional ``(..., n)`` bool; ``False`` values are ignored.
      max_iterations: cap on Lloyd iterations over the summary; Lloyd stops earlier at its fixed
        point.
      bins: groups larger than this are summarized by a histogram of this many bins.

    Returns:
      A :class:`KMeansResult`.

    Raises:
      ValueError: ``centroids`` does not match ``x``'s leading axes; bad ``mask``, ``bins`` or
        ``max_iterations``.
      TypeError: ``x`` is not floating point.
    """
    name = "mixjax.share.kmeans.refine"
    x = _check(name, x, mask, bins, max_iterations)
    if tuple(jnp.shape(centroids))[:-1] != tuple(x.shape[:-1]) or jnp.ndim(centroids) < 1:
        raise ValueError(
            f"{name}: centroids must have shape x.shape[:-1] + (K,) = {tuple(x.shape[:-1])} + "
            f"(K,), got {tuple(jnp.shape(centroids))}"
        )
    return _refine_jit(x, jnp.asarray(centroids), mask, max_iterations, bins)


def fit(
    key: jax.Array | None,
    x: jax.Array,
    num_clusters: int,
    *,
    init: str = "optimal",
    mask: jax.Array | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    bins: int = DEFAULT_BINS,
) -> KMeansResult:
    """1-D k-means of each group (last axis of ``x``): :func:`init_centroids`, then :func:`refine`.

    Jit-compiled (``num_clusters``, ``init``, ``max_iterations`` and ``bins`` are static) and
    usable inside ``jax.jit``.

    Example::

        x = jax.random.normal(jax.random.key(0), (1_000_000,))
        result = mixjax.share.kmeans.fit(None, x, 16)  # deterministic "optimal" init
        result.centroids.shape, result.assignments.dtype  # (16,), int32

    Args:
      key: a ``jax.random`` key for ``init="random"`` and ``"kmeans++"``; may be ``None``
        otherwise.
      x: ``(..., n)`` floating values; leading axes are independent groups.
      num_clusters: ``K``, between 1 and ``n``.
      init: one of :data:`INITS` (see :func:`init_centroids`).
      mask: optional ``(..., n)`` bool; ``False`` values take no part in the fit.
      max_iterations: cap on Lloyd iterations (each costs ``O(K log bins)``).
      bins: groups of more than ``bins`` values are fit on a ``bins``-bin histogram, then
        finished with one exact Lloyd step; smaller groups are sorted and fit exactly.

    Returns:
      A :class:`KMeansResult`.

    Raises:
      ValueError: bad ``num_clusters``, ``init``, ``mask``, ``bins`` or ``max_iterations``; a
        random init without a key.
      TypeError: ``x`` is not floating point.
    """
    name = "mixjax.share.kmeans.fit"
    x = _check(name, x, mask, bins, max_iterations)
    _check_clusters(name, x, num_clusters)
    _check_method(name, key, init, "init")
    return _fit_jit(key, x, mask, num_clusters, init, max_iterations, bins)
