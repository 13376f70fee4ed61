"""Summaries of a group of values as ascending weighted points, and initial centroids.

The two parts of 1-D k-means (:mod:`mixjax.share.kmeans`) that come before Lloyd's iterations:
:func:`summarize` turns a group of values into :class:`Points` (the sorted values, or a
histogram for large groups), and :func:`initial_centroids` computes ``K`` ascending starting
centroids from them by one of :data:`INITS`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["INITS", "OPTIMAL_GROUPS", "RANDOM_INITS", "Points", "initial_centroids", "summarize"]

INITS = ("optimal", "density", "linear", "kmeans++", "random")
RANDOM_INITS = ("kmeans++", "random")
# Groups of the summary that the "optimal" init's dynamic program runs on: its cost grows with
# their square, its gap to the true optimum shrinks as they grow.
OPTIMAL_GROUPS = 256


class Points(NamedTuple):
    """Ascending weighted points summarizing one group of values (exact or histogram bins).

    Attributes:
      values: ``(m,)`` float32, ascending: the value of each point, or the mean of each bin.
      counts: ``(m,)`` int32, how many (unmasked) values each point stands for.
      sums: ``(m,)`` float32, the sum of ``value - shift`` over those values.
      squares: ``(m,)`` float32, the sum of ``(value - shift)**2`` over those values.
      shift: ``()`` float32, subtracted before summing so prefix sums keep their precision.
      low: ``()`` float32, the smallest unmasked value (0 when all are masked).
      high: ``()`` float32, the largest unmasked value (0 when all are masked).
    """

    values: jax.Array
    counts: jax.Array
    sums: jax.Array
    squares: jax.Array
    shift: jax.Array
    low: jax.Array
    high: jax.Array


def summarize(x: jax.Array, mask: jax.Array, bins: int) -> Points:
    """Summarizes one group ``x`` ``(n,)`` as ascending weighted points (see the module doc)."""
    x = x.astype(jnp.float32)
    n = x.shape[0]
    count = jnp.sum(mask, dtype=jnp.int32)
    low = jnp.where(count > 0, jnp.min(jnp.where(mask, x, jnp.inf)), 0.0)
    high = jnp.where(count > 0, jnp.max(jnp.where(mask, x, -jnp.inf)), 0.0)
    shift = (low + high) / 2
    if n <= bins:
        # Masked values sort last as +inf, then stand at `high` with no weight.
        ordered = jnp.sort(jnp.where(mask, x, jnp.inf))
        valid = jnp.arange(n) < count
        values = jnp.where(valid, ordered, high)
        offsets = jnp.where(valid, values - shift, 0.0)
        return Points(values, valid.astype(jnp.int32), offsets, offsets**2, shift, low, high)
    width = (high - low) / bins
    scale = jnp.where(high > low, 1.0 / jnp.where(high > low, width, 1.0), 0.0)
    index = jnp.clip(jnp.floor((x - low) * scale).astype(jnp.int32), 0, bins - 1)
    counts = jax.ops.segment_sum(mask.astype(jnp.int32), index, bins)
    offsets = jnp.where(mask, x - shift, 0.0)
    sums = jax.ops.segment_sum(offsets, index, bins)
    squares = jax.ops.segment_sum(offsets**2, index, bins)
    centers = low + (jnp.arange(bins, dtype=jnp.float32) + 0.5) * width
    means = shift + sums / jnp.maximum(counts, 1)
    # Rounding can put a bin mean a hair past its neighbour's; Lloyd needs ascending points.
    values = jax.lax.cummax(jnp.where(counts > 0, means, centers))
    return Points(values, counts, sums, squares, shift, low, high)


def _optimal_init(points: Points, num_clusters: int) -> jax.Array:
    """The optimal k-means of the summary merged into equal-count groups, by dynamic programming.

    1-D k-means is solvable exactly: clusters are runs of sorted values, so the best split of the
    first ``j`` values into ``k`` runs extends a best split of the first ``i`` into ``k - 1``.
    Over ``g`` groups that is ``O(K g**2)`` work. Every cost is exact (from per-group counts,
    sums and sums of squares); only the cluster boundaries are restricted to group edges.
    """
    m = points.values.shape[0]
    g = min(m, OPTIMAL_GROUPS)
    counts = points.counts.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(counts), 1.0)
    middle = jnp.cumsum(counts) - counts / 2
    group = jnp.minimum(jnp.floor(middle * (g / total)), g - 1).astype(jnp.int32)

    def prefix(v):
        return jnp.concatenate(
            [jnp.zeros(1, v.dtype), jnp.cumsum(jax.ops.segment_sum(v, group, g))]
        )

    n, s, q = prefix(counts), prefix(points.sums), prefix(points.squares)
    i, j = jnp.arange(g + 1)[:, None], jnp.arange(g + 1)[None, :]
    run_sum = s[j] - s[i]
    cost = q[j] - q[i] - run_sum**2 / jnp.maximum(n[j] - n[i], 1.0)
    cost = jnp.where(i <= j, jnp.maximum(cost, 0.0), jnp.inf)

    def layer(best, _):
        total = best[:, None] + cost
        return jnp.min(total, axis=0), jnp.argmin(total, axis=0).astype(jnp.int32)

    _, starts = jax.lax.scan(layer, cost[0], None, length=num_clusters - 1)

    def back(end, start_of):
        start = start_of[end]
        return start, start

    _, edges = jax.lax.scan(back, jnp.int32(g), starts, reverse=True)
    edges = jnp.concatenate([jnp.zeros(1, jnp.int32), edges, jnp.full(1, g, jnp.int32)])
    sizes = n[edges[1:]] - n[edges[:-1]]
    means = points.shift + (s[edges[1:]] - s[edges[:-1]]) / jnp.maximum(sizes, 1.0)
    # A run of empty groups (fewer distinct values than clusters) takes its left neighbour's mean.
    means = jax.lax.cummax(jnp.where(sizes > 0, means, -jnp.inf))
    return jnp.where(jnp.isfinite(means), means, points.low)


def initial_centroids(key, points: Points, num_clusters: int, method: str) -> jax.Array:
    """``(num_clusters,)`` float32 ascending initial centroids of one summarized group by
    ``method`` (see :func:`mixjax.share.kmeans.init_centroids`); ``key`` for random methods."""
    low, high = points.low, points.high
    if method == "optimal":
        return _optimal_init(points, num_clusters)
    if method == "linear":
        return jnp.linspace(low, high, num_clusters, dtype=jnp.float32)
    if method == "random":
        return jnp.sort(jax.random.uniform(key, (num_clusters,), jnp.float32, low, high))
    cumulative = jnp.cumsum(points.counts)
    last = points.values.shape[0] - 1
    if method == "density":
        # The mid-quantiles (i + 1/2) / K of the empirical distribution.
        targets = (jnp.arange(num_clusters, dtype=jnp.float32) + 0.5) / num_clusters
        index = jnp.searchsorted(cumulative, targets * cumulative[-1], side="left")
        return points.values[jnp.minimum(index, last)]
    # k-means++ (Arthur & Vassilvitskii 2007): each next centroid is drawn with probability
    # proportional to count * squared distance to the nearest centroid chosen so far.
    weights = points.counts.astype(jnp.float32)
    keys = jax.random.split(key, num_clusters)

    def draw(k, p):
        cumulative_p = jnp.cumsum(p)
        r = jax.random.uniform(k, (), jnp.float32) * cumulative_p[-1]
        return jnp.minimum(jnp.searchsorted(cumulative_p, r, side="right"), last)

    first = points.values[draw(keys[0], weights)]
    centroids = jnp.full((num_clusters,), first, jnp.float32)
    distance = (points.values - first) ** 2

    def body(i, carry):
        centroids, distance = carry
        p = weights * distance
        # When every point already sits on a centroid, draw by count (the result has repeats).
        p = jnp.where(jnp.sum(p) > 0, p, weights)
        chosen = points.values[draw(keys[i], p)]
        return centroids.at[i].set(chosen), jnp.minimum(distance, (points.values - chosen) ** 2)

    centroids, _ = jax.lax.fori_loop(1, num_clusters, body, (centroids, distance))
    return jnp.sort(centroids)
