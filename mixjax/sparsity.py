"""Sparsity structures and exact selection: the parts of pruning that do not depend on scores.

A *structure* says which groups of weights are pruned together: :class:`Unstructured` single
weights, :class:`NM` groups along the input axis, :class:`Block` tiles, :class:`Channel` output
channels. Each structure turns a leaf's scores into *unit* scores and a unit mask back into a
weight mask. :func:`smallest` marks exactly the ``k`` smallest scores without a sort.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mixjax import select


class Unstructured(NamedTuple):
    """Prune individual weights."""


class NM(NamedTuple):
    """Keep ``n`` of every ``m`` consecutive weights along the contraction (input) axis.

    The input axis is ``-2``: axis 0 of a Dense kernel ``(in, out)``, the ``in`` axis of a Conv
    kernel ``(h, w, in, out)``. NVIDIA's 2:4 sparsity is ``NM(2, 4)``. With a sparsity schedule,
    each group keeps ``m - floor(sparsity * m)`` weights, never fewer than ``n``: a ramp from 0 to
    ``1 - n/m`` passes through 4:4, 3:4 and 2:4 for ``NM(2, 4)``. Without a schedule
    (``sparsity=None``) the pattern is ``n:m`` from the start.
    """

    n: int
    m: int


class Block(NamedTuple):
    """Prune whole ``(bh, bw)`` blocks of the last two axes (``(in, out)`` of a kernel).

    A block's score is the mean score of its weights. Conv kernels ``(h, w, in, out)`` are blocked
    per spatial position.
    """

    shape: tuple[int, int]


class Channel(NamedTuple):
    """Prune whole output channels (the last axis); a channel's score is its mean score."""


Structure = Unstructured | NM | Block | Channel
UNSTRUCTURED = Unstructured()

# ----------------------------------------------------------------------------------------------
# Exact k-smallest selection without sorting.


# Radix selection: the high 16 and low 15 bits of a non-negative float32's bit pattern.
_LOW_BITS = 15
_HIGH_BINS = 1 << 16
_LOW_BINS = 1 << _LOW_BITS


def _first_reaching(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The first bin at which the running count of ``hist`` reaches ``k``, and the count before it.

    Two levels (256 rows of bins) keep every prefix sum short: XLA's long cumsums are slow on CPU.
    """
    rows = hist.reshape(256, -1)
    row_totals = rows.sum(axis=1)
    before_row = jnp.cumsum(row_totals) - row_totals  # exclusive
    row = jnp.sum(before_row + row_totals < k)  # rows that end before reaching k
    row = jnp.minimum(row, 255)
    in_row = rows[row]
    before_bin = before_row[row] + jnp.cumsum(in_row) - in_row
    col = jnp.minimum(jnp.sum(before_bin + in_row < k), rows.shape[1] - 1)
    return row * rows.shape[1] + col, before_bin[col]


def smallest(scores: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
    """Boolean masks marking exactly the ``k`` smallest entries across ``scores`` (flat arrays).

    Non-negative float32 scores order like their int32 bit patterns, so two histogram passes (a
    radix select on the high 16, then the low 15 bits) find the k-th smallest value exactly
    without a sort. Entries equal to it are taken in order of position until ``k`` are marked;
    that tie-break (a prefix sum) runs only when some but not all ties must go.
    """
    # NaN scores count as +inf (kept last) so that every bit pattern lies in [0, bits(inf)].
    bits = [
        lax.bitcast_convert_type(
            jnp.where(jnp.isnan(s), jnp.inf, jnp.maximum(s.astype(jnp.float32), 0.0)), jnp.int32
        )
        for s in scores
    ]
    k = jnp.asarray(k, jnp.int32)

    def histogram(indices, bins):
        return jnp.zeros(bins, jnp.int32).at[indices].add(1, mode="drop")

    high = sum(histogram(b >> _LOW_BITS, _HIGH_BINS) for b in bits)
    bucket, below_bucket = _first_reaching(high, k)
    low = sum(
        histogram(jnp.where(b >> _LOW_BITS == bucket, b & (_LOW_BINS - 1), _LOW_BINS), _LOW_BINS)
        for b in bits
    )
    low_bits, below_kth = _first_reaching(low, k - below_bucket)
    kth = (bucket << _LOW_BITS) | low_bits
    ties_needed = k - below_bucket - below_kth
    ties_total = low[low_bits]
    marked, offset = [], jnp.int32(0)
    for b in bits:
        ties = b == kth
        rank = lax.cond(
            (ties_needed > 0) & (ties_needed < ties_total),
            lambda t, o: jnp.cumsum(t, dtype=jnp.int32) + o,
            # All ties go (rank 0) or none does (rank 1 > ties_needed <= 0).
            lambda t, o: jnp.full(t.shape, jnp.where(ties_needed > 0, 0, 1), jnp.int32),
            ties,
            offset,
        )
        marked.append((b < kth) | (ties & (rank <= ties_needed)))
        offset = offset + jnp.sum(ties, dtype=jnp.int32)
    return marked


def units_to_prune(sparsity: jax.Array, units: int) -> jax.Array:
    return jnp.clip(jnp.round(sparsity * units), 0, units).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Structures: unit scores of a leaf, and the expansion of a unit mask back to the leaf's shape.


def unit_scores(structure: Structure, scores: jax.Array) -> jax.Array:
    if isinstance(structure, Block):
        bh, bw = structure.shape
        *lead, rows, cols = scores.shape
        blocks = scores.reshape(*lead, rows // bh, bh, cols // bw, bw)
        return blocks.mean(axis=(-3, -1))
    if isinstance(structure, Channel):
        return scores.reshape(-1, scores.shape[-1]).mean(axis=0)
    return scores


def expand(structure: Structure, unit_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if isinstance(structure, Block):
        bh, bw = structure.shape
        *lead, rows, cols = unit_mask.shape
        full = jnp.broadcast_to(unit_mask[..., :, None, :, None], (*lead, rows, bh, cols, bw))
        return full.reshape(shape)
    if isinstance(structure, Channel):
        return jnp.broadcast_to(unit_mask, shape)
    return unit_mask


def nm_mask(scores: jax.Array, m: int, keep: jax.Array) -> jax.Array:
    """Keeps the ``keep`` highest scores in every group of ``m`` along axis -2."""
    *lead, rows, cols = scores.shape
    groups = scores.reshape(*lead, rows // m, m, cols)
    a = groups[..., :, None, :]  # candidate i
    b = groups[..., None, :, :]  # competitor j
    order = jnp.arange(m)
    earlier = (order[None, :] < order[:, None])[:, :, None]  # j before i
    beaten_by = (b > a) | ((b == a) & earlier)
    rank = jnp.sum(beaten_by, axis=-2)  # how many in the group outrank i
    return (rank < keep).reshape(scores.shape)


def nm_keep(sparsity: jax.Array, nm: NM) -> jax.Array:
    pruned = jnp.floor(sparsity * nm.m + 1e-6).astype(jnp.int32)
    return jnp.clip(nm.m - pruned, nm.n, nm.m)


def erk_sparsities(sparsity: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
    """Per-leaf sparsities with densities ``min(1, eps * sum(shape) / prod(shape))``.

    ``eps`` is found by bisection so that the kept fraction over all leaves is ``1 - sparsity``;
    leaves the formula would make denser than dense are kept dense and the rest absorb the
    difference (Evci et al. 2020).
    """
    sizes = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes], dtype=np.float64)
    target = (1.0 - sparsity) * sizes.sum()
    sizes_j, raw_j = jnp.asarray(sizes, jnp.float32), jnp.asarray(raw, jnp.float32)

    def kept(eps):
        return jnp.sum(jnp.minimum(1.0, eps * raw_j) * sizes_j)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        big = kept(mid) >= target
        return jnp.where(big, lo, mid), jnp.where(big, mid, hi)

    _, eps = lax.fori_loop(0, 64, halve, (jnp.float32(0.0), jnp.float32(1.0 / raw.min())))
    density = jnp.minimum(1.0, eps * raw_j)
    return [1.0 - density[i] for i in range(len(shapes))]


# ----------------------------------------------------------------------------------------------
# Validation.


def check_leaf(fn_name: str, structure: Structure, path: str, leaf: Any) -> None:
    where = select.describe(path, leaf)
    if isinstance(structure, NM):
        if leaf.ndim < 2:
            raise ValueError(f"{fn_name}: {where}: N:M sparsity needs a kernel with ndim >= 2")
        if leaf.shape[-2] % structure.m:
            raise ValueError(
                f"{fn_name}: {where}: N:M {structure.n}:{structure.m} needs the input axis "
                f"(axis {leaf.ndim - 2}, size {leaf.shape[-2]}) divisible by {structure.m}"
            )
    elif isinstance(structure, Block):
        bh, bw = structure.shape
        if leaf.ndim < 2 or leaf.shape[-2] % bh or leaf.shape[-1] % bw:
            raise ValueError(
                f"{fn_name}: {where}: block {structure.shape} does not tile the last two axes "
                f"{tuple(leaf.shape[-2:])}"
            )
    elif isinstance(structure, Channel) and leaf.ndim < 2:
        raise ValueError(f"{fn_name}: {where}: channel pruning needs a kernel with ndim >= 2")


def check_structure(fn_name: str, structure: Any, scope: str) -> None:
    if not isinstance(structure, (Unstructured, NM, Block, Channel)):
        raise TypeError(
            f"{fn_name}: structure must be Unstructured(), NM(n, m), Block((bh, bw)) or "
            f"Channel(), got {structure!r}"
        )
    if isinstance(structure, NM):
        n, m = structure
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)):
            raise TypeError(f"{fn_name}: NM(n, m) needs integers, got NM({n!r}, {m!r})")
        if n < 1 or n > m:
            raise ValueError(f"{fn_name}: NM(n, m) needs 1 <= n <= m, got NM({n}, {m})")
        if scope != "uniform":
            raise ValueError(
                f"{fn_name}: N:M sparsity is per group of {m}; it needs scope='uniform', "
                f"got scope={scope!r}"
            )
    if isinstance(structure, Block):
        shape = tuple(structure.shape) if isinstance(structure.shape, Sequence) else None
        if (
            shape is None
            or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
        ):
            raise ValueError(
                f"{fn_name}: Block(shape) needs two positive integers, got {structure.shape!r}"
            )
