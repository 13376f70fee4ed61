"""Pruning masks as :class:`~mixjax.core.ParamTransform` factories.

One engine, three scores: :func:`magnitude` (``|w|``), :func:`random` (keyed) and
:func:`saliency` (``|w * g|``, from ``grads=`` passed to ``update``). Each factory takes

* ``sparsity``: the fraction of weights to prune, a float or a schedule ``step -> value`` in
  ``[0, 1)`` (see :mod:`mixjax.schedules`; optax schedules fit);
* ``structure``: :class:`Unstructured` (default), :class:`NM`, :class:`Block` or :class:`Channel`;
* ``scope``: ``"uniform"`` (every selected leaf at ``sparsity``), ``"erk"`` (Erdős–Rényi-Kernel
  per-layer sparsities whose weighted mean is ``sparsity``) or ``"global"`` (one threshold across
  all selected leaves);
* ``where``: which leaves (see :mod:`mixjax.select`; default: floating kernels, ``ndim >= 2``);
* ``update_every``: masks are recomputed at steps that are multiples of it, inside ``jit``
  (``lax.cond``), and kept in between.

Masks are boolean arrays with their parameter's shape (``True`` = kept) in the state's mirror
tree. ``apply`` multiplies weights by their mask, so gradients reach kept stored weights unchanged
and are zero for pruned ones; ``constrain`` does the same to the stored weights, so wrapped
optimizers (:func:`mixjax.wrap_optax`) keep pruned weights at exactly zero.

Thresholds are found without sorting: a two-pass radix select over the bit patterns of the
(non-negative, float32) scores gives the exact k-th smallest score; ties at the threshold are
broken by position, so every leaf (or the whole tree, for ``"global"``) loses exactly
``round(sparsity * units)`` units.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mixjax import schedules, select
from mixjax.core import ParamTransform


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

SCOPES = ("uniform", "erk", "global")

# A score function maps (key, leaf index, weights, grads or None) to non-negative float32 scores
# with the weights' shape.
ScoreFn = Callable[[Any, int, jax.Array, Any], jax.Array]


class PruneState(NamedTuple):
    """State of a pruning transform.

    Attributes:
      masks: mirror tree of the parameters: a ``bool`` array with the parameter's shape at each
        selected leaf (``True`` = kept), ``None`` elsewhere.
    """

    masks: Any


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


def _smallest(scores: Sequence[jax.Array], k: jax.Array) -> list[jax.Array]:
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


def _units_to_prune(sparsity: jax.Array, units: int) -> jax.Array:
    return jnp.clip(jnp.round(sparsity * units), 0, units).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Structures: unit scores of a leaf, and the expansion of a unit mask back to the leaf's shape.


def _unit_scores(structure: Structure, scores: jax.Array) -> jax.Array:
    if isinstance(structure, Block):
        bh, bw = structure.shape
        *lead, rows, cols = scores.shape
        blocks = scores.reshape(*lead, rows // bh, bh, cols // bw, bw)
        return blocks.mean(axis=(-3, -1))
    if isinstance(structure, Channel):
        return scores.reshape(-1, scores.shape[-1]).mean(axis=0)
    return scores


def _expand(structure: Structure, unit_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if isinstance(structure, Block):
        bh, bw = structure.shape
        *lead, rows, cols = unit_mask.shape
        full = jnp.broadcast_to(unit_mask[..., :, None, :, None], (*lead, rows, bh, cols, bw))
        return full.reshape(shape)
    if isinstance(structure, Channel):
        return jnp.broadcast_to(unit_mask, shape)
    return unit_mask


def _nm_mask(scores: jax.Array, m: int, keep: jax.Array) -> jax.Array:
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


def _nm_keep(sparsity: jax.Array, nm: NM) -> jax.Array:
    pruned = jnp.floor(sparsity * nm.m + 1e-6).astype(jnp.int32)
    return jnp.clip(nm.m - pruned, nm.n, nm.m)


def _erk_sparsities(sparsity: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
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


def _check_leaf(fn_name: str, structure: Structure, path: str, leaf: Any) -> None:
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


def _check_structure(fn_name: str, structure: Any, scope: str) -> None:
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


# ----------------------------------------------------------------------------------------------
# The engine.


def _pruner(
    fn_name: str,
    score_fn: ScoreFn,
    key: Any,
    *,
    needs_grads: bool,
    sparsity: float | schedules.Schedule | None,
    structure: Structure,
    scope: str,
    where: select.Where,
    update_every: int,
) -> ParamTransform:
    if scope not in SCOPES:
        raise ValueError(f"{fn_name}: scope must be one of {SCOPES}, got scope={scope!r}")
    _check_structure(fn_name, structure, scope)
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"{fn_name}: update_every must be an integer >= 1, got {update_every!r}")
    if sparsity is None:
        if not isinstance(structure, NM):
            raise ValueError(f"{fn_name}: sparsity=None is only meaningful with structure=NM(n, m)")
        sparsity = 1.0 - structure.n / structure.m
    sparsity_at = schedules.check_range(fn_name, "sparsity", sparsity, 0.0, 1.0)

    def new_masks(params, masks, step, grads):
        step = jnp.asarray(step)
        s = jnp.clip(jnp.asarray(sparsity_at(step), jnp.float32), 0.0, 1.0)
        flat_params, treedef = jax.tree.flatten(params)
        flat_masks = treedef.flatten_up_to(masks)
        flat_grads = [None] * len(flat_params) if grads is None else treedef.flatten_up_to(grads)
        step_key = None if key is None else jax.random.fold_in(key, step)
        chosen = [i for i, m in enumerate(flat_masks) if m is not None]
        scores = {}
        for i in chosen:
            leaf_key = None if step_key is None else jax.random.fold_in(step_key, i)
            raw = score_fn(leaf_key, i, flat_params[i], flat_grads[i])
            # Pruned weights score 0 so masks never regrow (random scores are otherwise blind).
            scores[i] = jnp.where(flat_masks[i], raw.astype(jnp.float32), 0.0)
        out = list(flat_masks)
        if isinstance(structure, NM):
            keep = _nm_keep(s, structure)
            for i in chosen:
                out[i] = _nm_mask(scores[i], structure.m, keep)
            return treedef.unflatten(out)
        units = {i: _unit_scores(structure, scores[i]) for i in chosen}
        if scope == "global":
            total = sum(u.size for u in units.values())
            pruned = _smallest([units[i].ravel() for i in chosen], _units_to_prune(s, total))
            pruned = dict(zip(chosen, pruned, strict=True))
        else:
            if scope == "erk":
                per_leaf = _erk_sparsities(s, [flat_params[i].shape for i in chosen])
            else:
                per_leaf = [s] * len(chosen)
            pruned = {
                i: _smallest([units[i].ravel()], _units_to_prune(si, units[i].size))[0]
                for i, si in zip(chosen, per_leaf, strict=True)
            }
        for i in chosen:
            unit_mask = ~pruned[i].reshape(units[i].shape)
            out[i] = _expand(structure, unit_mask, flat_params[i].shape)
        return treedef.unflatten(out)

    # Jitted once per transform, so eager calls (init, one_shot) compile once, not per call.
    new_masks_jit = jax.jit(new_masks)

    def refresh(params, masks, step, grads):
        due = jnp.asarray(step) % update_every == 0
        return lax.cond(due, new_masks, lambda p, m, s, g: m, params, masks, step, grads)

    refresh_jit = jax.jit(refresh)

    def init_fn(params):
        chosen = select.selection(fn_name, params, where)
        ones = select.mirror(
            lambda path, leaf: (
                _check_leaf(fn_name, structure, path, leaf) or jnp.ones(leaf.shape, jnp.bool_)
            ),
            params,
            chosen,
        )
        if needs_grads:  # no gradient yet: masks start dense and are chosen at the first update
            return PruneState(ones)
        return PruneState(new_masks_jit(params, ones, 0, None))

    def check(params, state):
        if not isinstance(state, PruneState):
            raise ValueError(f"{fn_name}: expected a PruneState, got {type(state).__name__}")
        select.check_mirror_shapes(fn_name, params, state.masks, "mask")

    def apply_fn(params, state):
        check(params, state)
        return jax.tree.map(
            lambda w, m: w if m is None else w * m.astype(w.dtype), params, state.masks
        )

    def update_fn(params, state, step, *, grads=None, **extra):
        del extra
        check(params, state)
        if needs_grads and grads is None:
            raise ValueError(f"{fn_name}: update needs grads= (the loss gradient w.r.t. params)")
        if grads is not None:
            select.check_mirror(fn_name, params, grads, "grads")
        return PruneState(refresh_jit(params, state.masks, step, grads))

    return ParamTransform(init_fn, apply_fn, update_fn, apply_fn)


def _magnitude_score(key, index, w, g):
    del key, index, g
    return jnp.abs(w)


def _saliency_score(key, index, w, g):
    del key, index
    return jnp.abs(w * g)


def _random_score(key, index, w, g):
    del index, g
    # In (0, 1] so that no kept weight ties with the pruned ones' score of exactly 0.
    return 1.0 - jax.random.uniform(key, w.shape, jnp.float32)


def magnitude(
    sparsity: float | schedules.Schedule | None = 0.5,
    *,
    structure: Structure = UNSTRUCTURED,
    scope: str = "uniform",
    where: select.Where = None,
    update_every: int = 1,
) -> ParamTransform:
    """Magnitude pruning: keeps the weights (or units) with the largest ``|w|``.

    Args:
      sparsity: fraction pruned, a float or a schedule ``step -> value`` in ``[0, 1)``; ``None``
        with ``structure=NM(n, m)`` means ``1 - n/m`` from the start.
      structure: :class:`Unstructured`, :class:`NM`, :class:`Block` or :class:`Channel`.
      scope: ``"uniform"``, ``"erk"`` or ``"global"`` (see the module docstring).
      where: leaf selector (default: floating kernels with ``ndim >= 2``).
      update_every: recompute masks at steps that are multiples of this.

    Returns:
      A :class:`~mixjax.core.ParamTransform` with :class:`PruneState`.

    Raises:
      ValueError: sparsity (or a schedule value) outside ``[0, 1)``; bad ``NM``/``Block``;
        ``scope`` unknown or not ``"uniform"`` with ``NM``; ``update_every < 1``. At ``init``: a
        selector that matches no leaf, an input axis not divisible by ``m``, a block that does
        not tile a kernel. ``apply``/``update``: a state that does not match the params.
      TypeError: a selected leaf is not floating point; a bad ``structure``.

    Example:
      >>> import jax, jax.numpy as jnp, mixjax
      >>> params = {"Dense_0": {"kernel": jnp.arange(1.0, 9.0).reshape(4, 2), "bias": jnp.ones(2)}}
      >>> t = mixjax.prune.magnitude(0.5)
      >>> pruned = t.apply(params, t.init(params))
      >>> pruned["Dense_0"]["kernel"].tolist()
      [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]
    """
    return _pruner(
        "mixjax.prune.magnitude",
        _magnitude_score,
        None,
        needs_grads=False,
        sparsity=sparsity,
        structure=structure,
        scope=scope,
        where=where,
        update_every=update_every,
    )


def random(
    key: jax.Array,
    sparsity: float | schedules.Schedule | None = 0.5,
    *,
    structure: Structure = UNSTRUCTURED,
    scope: str = "uniform",
    where: select.Where = None,
    update_every: int = 1,
) -> ParamTransform:
    """Random pruning: uniform random scores drawn from ``key`` (folded with the step).

    Already pruned weights stay pruned as sparsity grows. Arguments as :func:`magnitude`.
    """
    return _pruner(
        "mixjax.prune.random",
        _random_score,
        key,
        needs_grads=False,
        sparsity=sparsity,
        structure=structure,
        scope=scope,
        where=where,
        update_every=update_every,
    )


def saliency(
    sparsity: float | schedules.Schedule | None = 0.5,
    *,
    structure: Structure = UNSTRUCTURED,
    scope: str = "uniform",
    where: select.Where = None,
    update_every: int = 1,
) -> ParamTransform:
    """Saliency pruning: keeps the weights with the largest ``|w * g|`` (first-order Taylor).

    ``update`` needs ``grads=`` (the loss gradient w.r.t. the params); masks start dense at
    ``init`` and are first chosen at the first update step. Arguments as :func:`magnitude`.
    """
    return _pruner(
        "mixjax.prune.saliency",
        _saliency_score,
        None,
        needs_grads=True,
        sparsity=sparsity,
        structure=structure,
        scope=scope,
        where=where,
        update_every=update_every,
    )


def one_shot(
    transform: ParamTransform, params: Any, *, grads: Any = None, step: int = 0
) -> tuple[Any, Any]:
    """Prunes a (pretrained) tree now: returns ``(pruned_params, masks)``.

    Runs ``init`` and, when ``grads`` are given (saliency), one ``update`` at ``step``; the masks
    follow the transform's sparsity at ``step``.
    """
    state = transform.init(params)
    if grads is not None:
        state = transform.update(params, state, step, grads=grads)
    return transform.apply(params, state), state.masks


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
        lines = ["| leaf | shape | size | zeros | sparsity |", "|---|---|---:|---:|---:|"]
        for r in self.leaves:
            shape = "x".join(map(str, r.shape))
            lines.append(f"| {r.path} | {shape} | {r.size} | {r.zeros} | {r.sparsity:.2%} |")
        lines.append(f"| **total** | | {self.size} | {self.zeros} | {self.sparsity:.2%} |")
        return "\n".join(lines)

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
