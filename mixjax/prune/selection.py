"""Exact selection of the units to prune: the ``k`` smallest scores, and per-layer sparsities.

:func:`smallest` marks exactly the ``k`` smallest scores across one or more arrays without a
sort (a two-pass radix select on the float bit patterns), so a leaf, or the whole tree for
``scope="global"``, loses exactly ``round(sparsity * units)`` units; :func:`lowest_per_column`
marks the ``k`` lowest of each column (the one-shot pruners' per-output choice);
:func:`erk_sparsities` spreads a target sparsity over layers by the Erdős–Rényi-Kernel rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["erk_sparsities", "lowest_per_column", "smallest", "units_to_prune"]


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


def lowest_per_column(scores: jax.Array, k: int | jax.Array) -> jax.Array:
    """Marks exactly the ``k`` lowest scores of each column of ``scores`` ``(R, C)`` (ties: the
    lower row first; NaN counts as the highest), as a bool ``(R, C)`` array.

    ``k`` may be traced (clipped to ``[0, R]``). A stable sort's ranks, so the count per column
    is exact whatever the ties.
    """
    order = jnp.argsort(scores, axis=0, stable=True)
    rank = jnp.argsort(order, axis=0)  # the inverse permutation: each entry's place
    return rank < jnp.asarray(k, jnp.int32)


def units_to_prune(sparsity: jax.Array, units: int) -> jax.Array:
    """``round(sparsity * units)`` as int32, clipped to ``[0, units]``."""
    return jnp.clip(jnp.round(sparsity * units), 0, units).astype(jnp.int32)


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
