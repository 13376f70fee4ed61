"""Pruning masks as :class:`~mixjax.core.ParamTransform` factories.

One engine, three scores: :func:`magnitude` (``|w|``), :func:`random` (keyed) and
:func:`saliency` (``|w * g|``, from ``grads=`` passed to ``update``). Each factory takes

* ``sparsity``: the fraction of weights to prune, a float or a schedule ``step -> value`` in
  ``[0, 1)`` (see :mod:`mixjax.schedules`; optax schedules fit). A schedule is checked eagerly
  at sampled steps only (:func:`mixjax.schedules.check_schedule`), and a traced ``update``
  cannot raise, so at the steps it runs ``update`` applies one rule to whatever the schedule
  returns: a value outside ``[0, 1]`` is clamped to it (``1.5`` prunes every selected weight,
  ``-0.5`` none), and a non-finite one (NaN, ±Inf) keeps the current masks unchanged;
* ``structure``: :class:`Unstructured` (default), :class:`NM`, :class:`Block` or :class:`Channel`;
* ``scope``: ``"uniform"`` (every selected leaf at ``sparsity``), ``"erk"`` (Erdős–Rényi-Kernel
  per-layer sparsities whose weighted mean is ``sparsity``) or ``"global"`` (one threshold across
  all selected leaves);
* ``where``: which leaves (see :mod:`mixjax.select`; default: floating kernels, ``ndim >= 2``);
* ``update_every``: masks are recomputed at the steps ``t`` with ``t % update_every == 0``
  (:func:`mixjax.multiples_of`), inside ``jit`` through ``lax.cond``, and kept in between.

Masks are boolean arrays with their parameter's shape (``True`` = kept) in the state's mirror
tree. ``apply`` multiplies weights by their mask, so gradients reach kept stored weights unchanged
and are zero for pruned ones; ``constrain`` does the same to the stored weights, so wrapped
optimizers (:func:`mixjax.wrap_optax`) keep pruned weights at exactly zero.

Thresholds are found without sorting (:func:`mixjax.prune.selection.smallest`, a radix
select), so every leaf (or the whole tree, for ``"global"``) loses exactly
``round(sparsity * units)`` units. :func:`sparsify` prunes a trained tree at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mixjax import _checks, schedules, select
from mixjax import layout as layout_lib
from mixjax.core import ParamTransform, multiples_of, never, update_when_due
from mixjax.prune import selection, structures
from mixjax.prune.structures import NM, UNSTRUCTURED, Block, Structure

__all__ = [
    "SCOPES",
    "PruneState",
    "ScoreFn",
    "fixed",
    "magnitude",
    "random",
    "saliency",
    "sparsify",
]

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
# The engine.


class _Rule(NamedTuple):
    """The static part of a pruner: hashable, so equal rules share compiled mask programs."""

    score_fn: ScoreFn
    structure_type: type  # structures are NamedTuples: Channel() == Unstructured() == ()
    structure: Structure
    scope: str
    update_every: int
    schedule: schedules.Schedule | None  # None: a constant sparsity, passed as an array


def _new_masks(rule: _Rule, layouts, params, masks, step, grads, key, sparsity):
    """The masks at ``step``. The sparsity is clamped to ``[0, 1]``; a non-finite one (a
    schedule's NaN/Inf) keeps ``masks`` unchanged, since inside ``jit`` nothing can raise."""
    step = jnp.asarray(step)
    raw = jnp.asarray(sparsity if rule.schedule is None else rule.schedule(step), jnp.float32)
    finite = jnp.isfinite(raw)
    s = jnp.clip(jnp.where(finite, raw, 0.0), 0.0, 1.0)
    flat_params, treedef = jax.tree.flatten(params)
    flat_masks = treedef.flatten_up_to(masks)
    flat_grads = [None] * len(flat_params) if grads is None else treedef.flatten_up_to(grads)
    step_key = None if key is None else jax.random.fold_in(key, step)
    layouts = (None,) * len(flat_params) if layouts is None else layouts
    fresh = _fresh_masks(rule, layouts, flat_params, flat_masks, flat_grads, step_key, s)
    pairs = zip(flat_masks, fresh, strict=True)
    return treedef.unflatten([m if m is None else jnp.where(finite, f, m) for m, f in pairs])


def _fresh_masks(rule: _Rule, layouts, flat_params, flat_masks, flat_grads, step_key, s):
    """The flat masks that prune a fraction ``s`` in ``[0, 1]`` (see :func:`_new_masks`).

    Structures work on each leaf's matrix view (:func:`mixjax.layout.to_matrix`), so N:M groups
    run along the contraction axes, blocks tile ``(contract, out)`` and channels are output
    features, wherever the model put those axes."""
    structure = rule.structure
    view = lambda i, x: layout_lib.to_matrix(x, layouts[i])  # noqa: E731
    unview = lambda i, x: layout_lib.from_matrix(x, layouts[i], flat_params[i].shape)  # noqa: E731
    chosen = [i for i, m in enumerate(flat_masks) if m is not None]
    scores = {}
    for i in chosen:
        leaf_key = None if step_key is None else jax.random.fold_in(step_key, i)
        raw = rule.score_fn(leaf_key, i, flat_params[i], flat_grads[i])
        # Pruned weights score 0 so masks never regrow (random scores are otherwise blind).
        scores[i] = jnp.where(flat_masks[i], raw.astype(jnp.float32), 0.0)
    out = list(flat_masks)
    if isinstance(structure, NM):
        keep = structures.nm_keep(s, structure)
        for i in chosen:
            out[i] = unview(i, structures.nm_mask(view(i, scores[i]), structure.m, keep))
        return out
    units = {i: structures.unit_scores(structure, view(i, scores[i])) for i in chosen}
    if rule.scope == "global":
        total = sum(u.size for u in units.values())
        pruned = selection.smallest(
            [units[i].ravel() for i in chosen], selection.units_to_prune(s, total)
        )
        pruned = dict(zip(chosen, pruned, strict=True))
    else:
        if rule.scope == "erk":
            per_leaf = selection.erk_sparsities(s, [flat_params[i].shape for i in chosen])
        else:
            per_leaf = [s] * len(chosen)
        pruned = {
            i: selection.smallest([units[i].ravel()], selection.units_to_prune(si, units[i].size))[
                0
            ]
            for i, si in zip(chosen, per_leaf, strict=True)
        }
    for i in chosen:
        unit_mask = ~pruned[i].reshape(units[i].shape)
        shape = layout_lib.matrix_shape(flat_params[i].shape, layouts[i])
        out[i] = unview(i, structures.expand(structure, unit_mask, shape))
    return out


# Module-level, keyed on the static rule: eager calls (init, sparsify, update outside jit)
# compile once per rule and tree shape, not once per transform instance. Inside a jitted train
# step it is inlined.
_new_masks_jit = jax.jit(_new_masks, static_argnums=(0, 1))


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
    layouts: Any,
    skip_incompatible: bool,
) -> ParamTransform:
    _checks.choice(fn_name, "scope", scope, SCOPES)
    skip_incompatible = _checks.boolean(fn_name, "skip_incompatible", skip_incompatible)
    structures.check_structure(fn_name, structure, scope)
    update_every = _checks.integer(fn_name, "update_every", update_every, 1)
    due = multiples_of(update_every)
    if sparsity is None:
        if not isinstance(structure, NM):
            raise ValueError(f"{fn_name}: sparsity=None is only meaningful with structure=NM(n, m)")
        sparsity = 1.0 - structure.n / structure.m
    schedules.check_schedule(fn_name, "sparsity", sparsity, 0.0, 1.0)
    if isinstance(structure, Block):
        structure = Block(tuple(structure.shape))  # hashable
    constant = not callable(sparsity)
    rule = _Rule(
        score_fn, type(structure), structure, scope, update_every, None if constant else sparsity
    )
    level = jnp.float32(sparsity if constant else 0.0)

    def flat(params):
        return None if layouts is None else layout_lib.flat_layouts(fn_name, params, layouts)

    def init_fn(params):
        chosen = structures.select_leaves(
            fn_name, params, where, layouts, structure, skip_incompatible
        )
        ones = select.mirror(lambda path, leaf: jnp.ones(leaf.shape, jnp.bool_), params, chosen)
        if needs_grads:  # no gradient yet: masks start dense and are chosen at the first update
            return PruneState(ones)
        return PruneState(_new_masks_jit(rule, flat(params), params, ones, 0, None, key, level))

    def apply_fn(params, state):
        return _masked(fn_name, params, state)

    def update_fn(params, state, step, *, grads=None, **extra):
        del extra
        _check_state(fn_name, params, state)
        if needs_grads and grads is None:
            raise ValueError(f"{fn_name}: update needs grads= (the loss gradient w.r.t. params)")
        if grads is not None:
            select.check_mirror(fn_name, params, grads, "grads")
        refresh = lambda: PruneState(
            _new_masks_jit(rule, flat(params), params, state.masks, step, grads, key, level)
        )
        return update_when_due(due, step, refresh, state)

    return ParamTransform(init_fn, apply_fn, update_fn, apply_fn, due)


def _check_state(fn_name: str, params: Any, state: Any) -> None:
    _checks.instance(fn_name, "state", state, PruneState, "a PruneState")
    select.check_mirror_shapes(fn_name, params, state.masks, "mask")


def _masked(fn_name: str, params: Any, state: PruneState) -> Any:
    """``params`` with the entries the masks drop set to zero (every pruner's ``apply``)."""
    _check_state(fn_name, params, state)
    return jax.tree.map(
        lambda w, m: w if m is None else jnp.where(m, w, jnp.zeros((), w.dtype)),
        params,
        state.masks,
    )


def fixed(masks: Any) -> ParamTransform:
    """Pruning with given masks that never change, e.g. those a one-shot method chose
    (:func:`mixjax.oneshot.compress`), so fine-tuning keeps its sparsity pattern exactly.

    Args:
      masks: a mirror tree of the parameters (``None`` at unpruned leaves), a ``bool`` array of
        the leaf's shape at each pruned leaf (``True`` = kept).

    Returns:
      A :class:`mixjax.ParamTransform` whose ``init`` returns ``PruneState(masks)`` (checked
      against the params' structure and shapes), ``update`` the state as it is (``due`` is
      :func:`mixjax.never`), ``apply`` and ``constrain`` as the other pruners'.

    Raises:
      ValueError (in ``init``): masks that do not mirror the params or have other shapes.
    """
    name = "mixjax.prune.fixed"
    masks = jax.tree.map(lambda m: jnp.asarray(m, jnp.bool_), masks)

    def init_fn(params):
        state = PruneState(masks)
        _check_state(name, params, state)
        return state

    def apply_fn(params, state):
        return _masked(name, params, state)

    def update_fn(params, state, step, **extra):
        del step, extra
        _check_state(name, params, state)
        return state

    return ParamTransform(init_fn, apply_fn, update_fn, apply_fn, never)


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
    layouts: Any = None,
    skip_incompatible: bool = False,
) -> ParamTransform:
    """Magnitude pruning: keeps the weights (or units) with the largest ``|w|``.

    Args:
      sparsity: fraction pruned, a float or a schedule ``step -> value`` in ``[0, 1)``; ``None``
        with ``structure=NM(n, m)`` means ``1 - n/m`` from the start. A schedule is probed
        eagerly at sampled steps; where ``update`` meets a value the probe missed, it clamps it
        to ``[0, 1]`` and keeps the current masks for a NaN/Inf (see the module docstring). A
        traced scalar is taken as a constant under the same rule: ``jax.vmap`` over sparsity
        levels trains a sweep of pruned models in one compiled program.
      structure: :class:`Unstructured`, :class:`NM`, :class:`Block` or :class:`Channel`.
      scope: ``"uniform"``, ``"erk"`` or ``"global"`` (see the module docstring).
      where: leaf selector (default: floating kernels with ``ndim >= 2``; with ``layouts``, the
        kernels a matmul or convolution consumes, embedding tables excluded).
      update_every: recompute masks at steps that are multiples of this.
      layouts: the tree of :class:`mixjax.layout.Layout` of the params
        (:func:`mixjax.layout.learn`): N:M groups run along each kernel's contraction axes,
        blocks tile its ``(contract, out)`` matrix, channels are its output features. Without
        it, the convention of :mod:`mixjax.prune.structures` holds (the last two axes are ``(in,
        out)``).
      skip_incompatible: leave selected leaves that the structure does not fit (a contraction
        not divisible by ``m``, a matrix the block does not tile) dense, with one warning that
        lists them, instead of raising.

    Returns:
      A :class:`~mixjax.core.ParamTransform` with :class:`PruneState`.

    Raises:
      ValueError: sparsity (or a schedule value) outside ``[0, 1)``; bad ``NM``/``Block``;
        ``scope`` unknown or not ``"uniform"`` with ``NM``; ``update_every < 1``. At ``init``: a
        selector that matches no leaf, a contraction not divisible by ``m``, a block that does
        not tile a kernel (unless ``skip_incompatible``); with ``layouts``: layouts that do not
        mirror the params or fit their leaves, a selected leaf no matmul consumes.
        ``apply``/``update``: a state that does not match the params.
      TypeError: a selected leaf is not floating point; a bad ``structure``.

    Examples:
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
        layouts=layouts,
        skip_incompatible=skip_incompatible,
    )


def random(
    key: jax.Array,
    sparsity: float | schedules.Schedule | None = 0.5,
    *,
    structure: Structure = UNSTRUCTURED,
    scope: str = "uniform",
    where: select.Where = None,
    update_every: int = 1,
    layouts: Any = None,
    skip_incompatible: bool = False,
) -> ParamTransform:
    """Random pruning: uniform random scores drawn from ``key`` (folded with the step).

    Already pruned weights stay pruned as sparsity grows. Arguments (and the rule for schedule
    values outside [0, 1]) as :func:`magnitude`.

    Raises:
      TypeError: ``key`` is not a ``jax.random`` key; the errors of :func:`magnitude`.
    """
    _checks.key("mixjax.prune.random", "key", key)
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
        layouts=layouts,
        skip_incompatible=skip_incompatible,
    )


def saliency(
    sparsity: float | schedules.Schedule | None = 0.5,
    *,
    structure: Structure = UNSTRUCTURED,
    scope: str = "uniform",
    where: select.Where = None,
    update_every: int = 1,
    layouts: Any = None,
    skip_incompatible: bool = False,
) -> ParamTransform:
    """Saliency pruning: keeps the weights with the largest ``|w * g|`` (first-order Taylor).

    ``update`` needs ``grads=`` (the loss gradient w.r.t. the params); masks start dense at
    ``init`` and are first chosen at the first update step. Arguments (and the rule for schedule
    values outside [0, 1]) as :func:`magnitude`.
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
        layouts=layouts,
        skip_incompatible=skip_incompatible,
    )


def sparsify(
    transform: ParamTransform, params: Any, *, grads: Any = None, step: int = 0
) -> tuple[Any, Any]:
    """Prunes a (trained) tree at once: returns ``(pruned_params, masks)``.

    Runs ``init`` and, when ``grads`` are given (saliency), one ``update`` at ``step``; the masks
    follow the transform's sparsity at ``step``.

    Args:
      transform: a pruning transform (:func:`magnitude`, :func:`random`, :func:`saliency`).
      params: the parameter tree.
      grads: the loss gradient w.r.t. ``params``, for :func:`saliency`.
      step: the step whose sparsity the masks take.

    Returns:
      ``(transform.apply(params, state), state.masks)``.
    """
    _checks.instance(
        "mixjax.prune.sparsify", "transform", transform, ParamTransform, "a ParamTransform"
    )
    state = transform.init(params)
    if grads is not None:
        state = transform.update(params, state, step, grads=grads)
    return transform.apply(params, state), state.masks
