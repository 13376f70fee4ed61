"""Merging of near-duplicate output units, during training and then for real.

An *output unit* of a kernel is a slice along its last axis: a Dense column (kernel ``(in, C)``)
or a Conv filter (kernel ``(h, w, in, C)``). Its vector is the unit's fan-in weights, followed by
its bias when the kernel has a sibling ``bias`` leaf of shape ``(C,)`` (the path with its last
key ``kernel`` replaced by ``bias``), so that tied units are identical *functions*.

:func:`merge_similar` groups units whose vectors have cosine similarity ``>= threshold`` (greedy,
in unit order: the lowest unmerged unit leads, every later unmerged unit close enough to it joins
it) and ties each group to one shared vector, the mean of its members, through
:func:`mixjax.share.tie`: every member receives the group's summed gradient, so an optax loop
trains the shared vector. :func:`remove_merged` then removes the duplicates for real: the
producing layer keeps one unit per group (its kernel loses columns, its bias entries), and the
consuming layer's fan-in rows of a group are summed into one row, so the smaller model computes
the tied model's function with fewer FLOPs. That is exact for any elementwise activation between
the two layers; a per-unit layer in between (e.g. BatchNorm) must be folded first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, select
from mixjax.core import Params, ParamTransform, multiples_of, never, update_when_due
from mixjax.share.tying import tie

__all__ = [
    "COSINE_TOLERANCE",
    "MergeReport",
    "MergeState",
    "leaders_by_cosine",
    "merge_similar",
    "remove_merged",
]

# Cosines are float32 dot products: a unit compared with an identical copy may land a few ulps
# under 1, and threshold=1.0 must still merge exact duplicates.
COSINE_TOLERANCE = 1e-6


class MergeState(NamedTuple):
    """State of :func:`merge_similar`.

    Attributes:
      leaders: mirror tree of params; at each selected kernel ``(..., C)`` and at its sibling
        bias ``(C,)``, an int32 ``(C,)`` array: the unit each unit is tied to (its group's
        lowest index; an unmerged unit is its own leader). ``None`` elsewhere.
    """

    leaders: Params


class MergeReport(NamedTuple):
    """What :func:`remove_merged` did to one producing layer.

    Attributes:
      units_before: output units of the producing layer before removal.
      units_after: output units after removal (one per group).
      kept: ``(units_after,)`` int64 NumPy array, the original index of each kept unit.
      max_deviation: the largest ``|u_j - u_leader| / |u_leader|`` over merged units ``j`` of the
        input vectors (kernel column and bias): 0 where all merged units were identical.
    """

    units_before: int
    units_after: int
    kept: np.ndarray
    max_deviation: float


def _sibling_bias(path: str) -> str | None:
    head, _, last = path.rpartition("/")
    if last != "kernel":
        return None
    return f"{head}/bias" if head else "bias"


def _unit_vectors(kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``(fan_in [+ 1], C)`` float32: each column is one unit's vector."""
    columns = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
    if bias is None:
        return columns
    return jnp.concatenate([columns, bias.reshape(1, -1).astype(jnp.float32)])


@jax.jit
def leaders_by_cosine(units: jax.Array, threshold: float) -> jax.Array:
    """Greedy grouping of the columns of ``units`` ``(d, C)`` by cosine similarity.

    Unit ``i`` (in index order), if not yet in a group, leads one, and every later ungrouped unit
    with cosine ``>= threshold`` to it joins. Two all-zero units count as identical; a zero unit
    is dissimilar to a nonzero one.

    Returns:
      ``(C,)`` int32: each unit's leader index (its own index when unmerged).
    """
    units = jnp.asarray(units, jnp.float32)
    c = units.shape[-1]
    norms = jnp.linalg.norm(units, axis=0)
    normalized = units / jnp.where(norms > 0, norms, 1.0)
    cosine = jnp.matmul(normalized.T, normalized, precision=jax.lax.Precision.HIGHEST)
    zero = norms == 0
    cosine = jnp.where(zero[:, None] | zero[None, :], (zero[:, None] & zero[None, :]) * 1.0, cosine)
    close = cosine >= threshold - COSINE_TOLERANCE
    later = jnp.arange(c)[None, :] > jnp.arange(c)[:, None]

    def body(i, carry):
        leaders, grouped = carry
        take = ~grouped[i] & close[i] & later[i] & ~grouped
        return jnp.where(take, i, leaders), grouped | take

    start = (jnp.arange(c, dtype=jnp.int32), jnp.zeros(c, bool))
    leaders, _ = jax.lax.fori_loop(0, c, body, start)
    return leaders


@jax.jit
def _tie_units(x: jax.Array, leaders: jax.Array) -> jax.Array:
    """Each unit (last-axis slice) of ``x`` becomes the mean of its group, row by row."""
    c = x.shape[-1]
    rows = x.size // c
    ids = (jnp.arange(rows, dtype=jnp.int32)[:, None] * c + leaders[None, :]).reshape(x.shape)
    return tie(x, ids, jnp.ones(x.shape, bool), rows * c)


def merge_similar(
    threshold: float = 0.99, *, update_every: int | None = None, where: select.Where = None
) -> ParamTransform:
    """Ties near-duplicate output units to one shared vector (see the module docstring).

    Args:
      threshold: cosine similarity in ``(0, 1]`` at or above which units merge; ``1.0`` merges
        exact duplicates only (up to :data:`COSINE_TOLERANCE`).
      update_every: regroup (on the current input weights) at the steps ``t`` with
        ``t % update_every == 0``, inside ``jit`` via ``lax.cond``; ``None``: group once, at
        ``init``.
      where: which kernels (ndim >= 2, units on the last axis) to merge (:mod:`mixjax.select`).

    Returns:
      A :class:`~mixjax.core.ParamTransform` whose state is a :class:`MergeState`.

    Raises:
      TypeError / ValueError: ``threshold`` outside ``(0, 1]``, bad ``update_every``; at
        ``init``: a selected leaf with ``ndim < 2``.
      TypeError: at ``init``: a selected leaf is not floating point.
    """
    name = "mixjax.share.merge_similar"
    threshold = _checks.real(name, "threshold", threshold, 0.0, 1.0, low_open=True)
    update_every = _checks.integer(name, "update_every", update_every, 1, optional=True)
    due = never if update_every is None else multiples_of(update_every)

    def group_tree(params):
        chosen = select.selection(name, params, where)
        flat = select.leaves_with_paths(params)
        leaves = dict(flat)
        by_path = {}
        for (path, leaf), hit in zip(flat, jax.tree_util.tree_leaves(chosen), strict=True):
            if not hit:
                continue
            if leaf.ndim < 2:
                raise ValueError(
                    f"{name}: {select.describe(path, leaf)} is selected but has ndim < 2; units "
                    "are the last axis of a kernel"
                )
            bias_path = _sibling_bias(path)
            bias = leaves.get(bias_path)
            if (
                bias is None
                or tuple(bias.shape) != (leaf.shape[-1],)
                or not select.is_floating(bias)
            ):
                bias_path, bias = None, None
            leaders = leaders_by_cosine(_unit_vectors(leaf, bias), threshold)
            by_path[path] = leaders
            if bias_path is not None:
                by_path[bias_path] = leaders
        return MergeState(
            jax.tree_util.tree_map_with_path(
                lambda kp, leaf: by_path.get(select.path_str(kp)), params
            )
        )

    def apply_fn(params, state):
        _checks.instance(name, "state", state, MergeState, "a MergeState")
        select.check_mirror(name, params, state.leaders, "leaders")
        return jax.tree.map(
            lambda x, leaders: x if leaders is None else _tie_units(x, leaders),
            params,
            state.leaders,
        )

    def update_fn(params, state, step, **extra):
        del extra
        return update_when_due(due, step, lambda: group_tree(params), state)

    return ParamTransform(group_tree, apply_fn, update_fn, due=due)


def remove_merged(
    params: Params, state: MergeState, layers: Sequence[tuple[str, str]]
) -> tuple[Params, dict[str, MergeReport]]:
    """Removes merged units for real, folding the consumer's fan-in.

    For each ``(producer, consumer)`` pair of layer paths (e.g. ``("Dense_0", "Dense_1")``): the
    producer's ``kernel`` (and ``bias``) keep one unit per group, holding the group's tied value
    (what :func:`merge_similar`'s ``apply`` computes), and the consumer's kernel, whose fan-in
    axis is ``-2`` (Dense ``(C, out)``, Conv ``(h, w, C, out)``), gets the sum of each group's
    fan-in rows in the kept unit's row. Pairs are processed in order, so a layer may be the
    consumer of one pair and the producer of the next. The new model must be built with the
    reduced widths (``MergeReport.units_after``); the old state no longer fits it.

    Args:
      params: the merge transform's input (stored params, or the view of transforms chained
        before it), with the structure the state was made on.
      state: the :class:`MergeState` of :func:`merge_similar`.
      layers: ``(producer, consumer)`` path prefixes of consecutive layers.

    Returns:
      ``(smaller_params, reports)``, reports keyed by producer path.

    Raises:
      ValueError: a path has no ``kernel`` leaf; the producer's units were not merged (not
        selected); the consumer's fan-in (axis -2) differs from the producer's unit count.
    """
    name = "mixjax.share.remove_merged"
    _checks.instance(name, "state", state, MergeState, "a MergeState")
    select.check_mirror(name, params, state.leaders, "leaders")
    leaves = dict(select.leaves_with_paths(params))
    leaders_at = {
        path: leaders
        for path, leaders in select.leaves_with_paths(state.leaders)
        if leaders is not None
    }
    reports = {}
    for producer, consumer in layers:
        kernel_path, consumer_path = f"{producer}/kernel", f"{consumer}/kernel"
        for path in (kernel_path, consumer_path):
            if path not in leaves:
                raise ValueError(
                    f"{name}: no leaf {path!r}; kernels in the tree: "
                    f"{sorted(p for p in leaves if p.endswith('kernel'))}"
                )
        if kernel_path not in leaders_at:
            raise ValueError(
                f"{name}: {select.describe(kernel_path, leaves[kernel_path])} was not merged "
                "(not selected by merge_similar's where=)"
            )
        kernel, nxt = leaves[kernel_path], leaves[consumer_path]
        units = kernel.shape[-1]
        if nxt.ndim < 2 or nxt.shape[-2] != units:
            raise ValueError(
                f"{name}: cannot fold {select.describe(consumer_path, nxt)} into "
                f"{select.describe(kernel_path, kernel)}: the consumer's fan-in axis -2 must have "
                f"the producer's {units} units"
            )
        leaders = np.asarray(leaders_at[kernel_path])
        kept = np.flatnonzero(leaders == np.arange(units))
        bias_path = f"{producer}/bias"
        bias = leaves[bias_path] if bias_path in leaders_at else None
        vectors = np.asarray(_unit_vectors(kernel, bias), np.float64)
        lead_vectors = vectors[:, leaders]
        lead_norms = np.maximum(np.linalg.norm(lead_vectors, axis=0), 1e-30)
        deviation = np.linalg.norm(vectors - lead_vectors, axis=0) / lead_norms
        leaves[kernel_path] = _tie_units(kernel, leaders)[..., kept]
        if bias is not None:
            leaves[bias_path] = _tie_units(bias, leaders)[kept]
        # Row j of the consumer's fan-in is added to the row of its kept leader.
        rows = np.moveaxis(np.asarray(nxt, np.float64), -2, 0)
        folded = np.zeros((kept.size,) + rows.shape[1:])
        np.add.at(folded, np.searchsorted(kept, leaders), rows)
        leaves[consumer_path] = jnp.asarray(np.moveaxis(folded, 0, -2), nxt.dtype)
        reports[producer] = MergeReport(units, int(kept.size), kept, float(deviation.max()))
    smaller = jax.tree_util.tree_map_with_path(lambda kp, leaf: leaves[select.path_str(kp)], params)
    return smaller, reports
