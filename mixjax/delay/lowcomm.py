"""DiLoCo: replicas that take ``H`` local steps, then average their pseudo-gradients.

:func:`diloco` wraps an inner optax transformation (AdamW in the paper) for a step that runs
once per replica inside ``jax.shard_map`` over the replica axis, each replica with its *own*
parameters and inner state (:func:`mixjax.delay.diloco_data_parallel` keeps the whole train
state per replica, split over the mesh's ``"data"`` axis). Replica ``r`` at step ``t``::

    w_r <- w_r + inner(g_r(w_r))                                 # every step, no communication
    # after the steps at which fragment f syncs (mixjax.delay.streaming: once per H steps):
    delta_r = outer_f - w_r,f                                    # the pseudo-gradient
    m_r = compress(delta_r + e_r);  e_r <- delta_r + e_r - m_r   # error feedback (optional)
    delta = mean_r decode(m_r)                                   # the only communication
    # applied tau = outer_delay steps later (at once when tau = 0):
    delta~ = delta + lam * delta**2 * (w_r,f(now) - w_r,f(sent))  # DC-ASGD, optional
    outer_f <- outer_f + outer_tx(delta~)                          # Nesterov SGD, lr 0.7
    w_r,f <- merge * outer_f + (1 - merge) * w_r,f

(Douillard et al. 2023; the fragments, the overlap ``tau`` and the merge factor are Streaming
DiLoCo's, 2025). The outer optimizer keeps one state per fragment, so a fragment's momentum
moves only at its syncs. The compensation reuses :func:`mixjax.delay.compensation.dc_compensate`
with the replica's own drift since the send, which no other replica knows: with it, the
replicas' copies of the outer parameters differ by their compensation terms (without it they
are equal, bit for bit). The messages and their byte counts are :mod:`mixjax.delay.messages`'s.

Equivalences (tested): with ``H = 1``, outer ``optax.sgd(1.0)`` and no compression, an inner
optimizer that is linear in the gradient (SGD, with or without momentum) gives exactly the
synchronous data-parallel step (the mean of the replicas' updates is the update of the mean
gradient); with one replica, DiLoCo is the inner optimizer with an outer step every ``H``
steps (Lookahead's shape).

The returned updates move the replica's parameters to their new local value, so the train
step's ``params + updates`` (then the transform's ``constrain``) lands there up to the rounding
of that addition. The outer copy is not constrained: a transform's constraint (pruned zeros)
holds for the replicas' parameters, and the outer copy follows their average.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mixjax import _checks, select
from mixjax.delay import messages, streaming
from mixjax.delay.compensation import check_options, dc_compensate, mean_square_init
from mixjax.parallel.mesh import DATA

__all__ = ["DiLoCoState", "default_outer", "diloco", "find_diloco_states"]

_NAME = "mixjax.delay.diloco"


class DiLoCoState(NamedTuple):
    """State of :func:`diloco` on one replica (``F`` fragments, trees like the params).

    Under :func:`mixjax.delay.diloco_data_parallel` every leaf has a leading replica axis
    ``(R, ...)`` outside the step, split over ``"data"``; inside, each replica sees its own.

    Attributes:
      count: int32 scalar, the number of ``update`` calls (the step ``t``).
      inner_state: the inner optimizer's state over the replica's parameters.
      outer_params: the params' structure, each leaf in its parameter's shape and dtype: the
        outer (global) parameters as of each fragment's last applied outer step.
      outer_states: a tuple of ``F`` outer-optimizer states, state ``f`` made by
        ``outer_tx.init`` on the list of fragment ``f``'s leaves.
      residual: error-feedback residuals: float32 arrays of the parameter's shape at leaves
        the compressor encodes, ``(0,)`` float32 at dense leaves; ``None`` without a
        compressor or with ``error_feedback=False``.
      pending: for ``outer_delay > 0``, the float32 averaged pseudo-gradient each fragment's
        last sync sent, waiting to be applied (parameter shapes); ``None`` otherwise.
      sent_params: with compensation, the replica's parameters at each fragment's last sync
        (parameter shapes and dtypes); ``None`` otherwise.
      mean_square: for ``"dc_adaptive"``, DC-ASGD-a's ``MS`` per parameter (at least
        float32); ``None`` otherwise.
      sent: int32 scalar, the bytes this replica put on the replica axis in the last update
        (the payloads of :mod:`mixjax.delay.messages`).
    """

    count: jax.Array
    inner_state: optax.OptState
    outer_params: Any
    outer_states: tuple
    residual: Any
    pending: Any
    sent_params: Any
    mean_square: Any
    sent: jax.Array


class _Fragment(NamedTuple):
    """One fragment's slice of the state during an update (lists in leaf order)."""

    local: list
    outer: list
    outer_state: Any
    residual: list | None
    pending: list | None
    sent_params: list | None
    mean_square: list | None


def default_outer() -> optax.GradientTransformation:
    """DiLoCo's outer optimizer: ``optax.sgd(0.7, momentum=0.9, nesterov=True)``."""
    return optax.sgd(0.7, momentum=0.9, nesterov=True)


def _is_diloco_state(x: Any) -> bool:
    return isinstance(x, DiLoCoState)


def find_diloco_states(tree: Any) -> list[DiLoCoState]:
    """Every :class:`DiLoCoState` inside ``tree`` (e.g. a train state's ``opt_state``)."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_diloco_state)
    return [x for x in leaves if _is_diloco_state(x)]


def diloco(
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation | None = None,
    *,
    sync_every: int,
    fragments: Any = 1,
    outer_delay: int = 0,
    compensation: str | None = None,
    lam: float | None = None,
    ms_decay: float = 0.95,
    eps: float = 1e-7,
    merge: float = 1.0,
    compress: messages.Quantize | messages.TopK | None = None,
    where: select.Where = None,
    error_feedback: bool = True,
    axis_name: str = DATA,
) -> optax.GradientTransformationExtraArgs:
    """DiLoCo / Streaming DiLoCo around ``inner_tx`` (the update rule: module docstring).

    ``update`` must run per replica inside a ``shard_map`` over ``axis_name``: use
    :func:`mixjax.delay.diloco_data_parallel`.

    Example::

        tx = mixjax.delay.diloco(optax.adamw(1e-3), sync_every=50, fragments=4,
                                 outer_delay=5, compress=mixjax.delay.Quantize(4))
        state = mixjax.delay.replicate_state(train.init_train_state(params, tx, key=key), mesh)
        step = mixjax.delay.diloco_data_parallel(apply_fn, tx, mesh)
        state, metrics = step(state, batch)        # metrics["bytes_sent"]: per replica

    Args:
      inner_tx: the inner optimizer, run every step on the replica's own gradient.
      outer_tx: the outer optimizer on the averaged pseudo-gradients (default
        :func:`default_outer`: SGD, lr 0.7, Nesterov momentum 0.9).
      sync_every: ``H >= 1``, the inner steps between two syncs of a leaf.
      fragments: an int ``F`` in ``[1, H]`` or a sequence of ``where=`` selectors that
        partition the leaves (:mod:`mixjax.delay.streaming`).
      outer_delay: ``tau`` in ``[0, H)``: a fragment's averaged pseudo-gradient is applied
        ``tau`` steps after it was sent (communication overlapped with inner steps).
      compensation: ``None``, ``"dc"`` or ``"dc_adaptive"``: DC-ASGD of the delayed outer
        update (needs ``outer_delay >= 1``).
      lam: the compensation strength (``None``: the mode's
        :data:`mixjax.delay.DEFAULT_LAM`).
      ms_decay: DC-ASGD-a's ``MS`` decay, in ``[0, 1)``.
      eps: added to ``MS`` under the square root, ``> 0``.
      merge: in ``(0, 1]``, the weight of the new outer parameters when a fragment's outer
        step lands (``1``: the replica takes them; below 1 it keeps part of its own progress).
      compress: ``None`` (dense messages), :class:`mixjax.delay.Quantize` or
        :class:`mixjax.delay.TopK`.
      where: the leaves ``compress`` encodes (default :func:`mixjax.select.kernels`); the
        others travel dense.
      error_feedback: keep each replica's compression residual and add it to its next
        message (only with ``compress``).
      axis_name: the replica axis inside the step (the wrapper's ``axis_name``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``init(params)`` returns a
      :class:`DiLoCoState` (it validates the fragments and the compressor against the
      params, eagerly); ``update(grads, state, params, **extra)`` (``params``: the replica's
      parameters, required) forwards ``extra`` to ``inner_tx``.

    Raises:
      TypeError / ValueError (here): a bad option, named with its value: ``sync_every < 1``,
        ``outer_delay`` outside ``[0, H)``, compensation without an outer delay, a bad
        ``fragments`` or ``compress``.
      ValueError (``init``): fragments that do not partition the leaves; a compressor that
        cannot encode a selected leaf (named with its path and shape); a fragment whose sync
        sends ``2**31`` bytes or more (the int32 ``bytes_sent`` counter).
      ValueError (``update``): no ``params``; a call outside a ``shard_map`` over
        ``axis_name``.
    """
    _checks.optax_transform(_NAME, "inner_tx", inner_tx)
    outer_tx = default_outer() if outer_tx is None else outer_tx
    _checks.optax_transform(_NAME, "outer_tx", outer_tx)
    sync_every = _checks.integer(_NAME, "sync_every", sync_every, 1)
    spec = streaming.check_fragments(_NAME, fragments, sync_every)
    outer_delay = _checks.integer(_NAME, "outer_delay", outer_delay, 0, sync_every - 1)
    options = check_options(_NAME, compensation, lam, ms_decay, eps, False, None)
    if compensation is not None and outer_delay == 0:
        raise ValueError(
            f"{_NAME}: compensation={compensation!r} corrects outer updates applied late and "
            "needs outer_delay >= 1, got outer_delay=0"
        )
    merge = _checks.real(_NAME, "merge", merge, 0.0, 1.0, low_open=True)
    compress = messages.check_compressor(_NAME, compress)
    select.as_selector(where)  # a bad where= fails here, not at init
    _checks.boolean(_NAME, "error_feedback", error_feedback)
    _checks.instance(_NAME, "axis_name", axis_name, str, "a str")
    inner_tx = optax.with_extra_args_support(inner_tx)
    feedback = compress is not None and error_feedback
    count = len(spec) if isinstance(spec, tuple) else spec
    starts = streaming.offsets(count, sync_every)

    def layout(params):
        members = streaming.partition(_NAME, params, spec)
        plans = messages.plan_leaves(_NAME, params, compress, where)
        for f, run in enumerate(members):
            nbytes = sum(plans[i].nbytes for i in run)
            if nbytes >= 2**31:
                raise ValueError(
                    f"{_NAME}: fragment {f} of {len(members)} sends {nbytes} bytes at its sync, "
                    "more than the int32 bytes_sent counter holds (< 2**31); use more fragments "
                    "or compress= so that each sync sends less"
                )
        return members, plans

    def init_fn(params):
        members, plans = layout(params)
        leaves = jax.tree.leaves(params)
        like = lambda dtype: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
        residual = None
        if feedback:
            flat = [
                jnp.zeros(plan.shape if plan.compressor else (0,), jnp.float32) for plan in plans
            ]
            residual = jax.tree.unflatten(jax.tree.structure(params), flat)
        return DiLoCoState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner_tx.init(params),
            outer_params=jax.tree.map(jnp.array, params),
            outer_states=tuple(outer_tx.init([leaves[i] for i in run]) for run in members),
            residual=residual,
            pending=like(jnp.float32) if outer_delay else None,
            sent_params=jax.tree.map(jnp.array, params) if compensation else None,
            mean_square=mean_square_init(params) if compensation == "dc_adaptive" else None,
            sent=jnp.zeros([], jnp.int32),
        )

    def outer_step(part, average):
        mean_square = part.mean_square
        if compensation is not None:
            average, mean_square = dc_compensate(
                average, part.local, part.sent_params, mean_square, options
            )
        average = [a.astype(o.dtype) for a, o in zip(average, part.outer, strict=True)]
        updates, outer_state = outer_tx.update(average, part.outer_state, part.outer)
        outer = optax.apply_updates(part.outer, updates)
        mixed = lambda o, w: (merge * o + (1 - merge) * w).astype(w.dtype)
        local = outer if merge == 1.0 else list(map(mixed, outer, part.local))
        return part._replace(
            local=local, outer=outer, outer_state=outer_state, mean_square=mean_square
        )

    def sync(part, plans):
        deltas = [
            o.astype(jnp.float32) - w.astype(jnp.float32)
            for o, w in zip(part.outer, part.local, strict=True)
        ]
        residuals = part.residual if feedback else [None] * len(deltas)
        average, residuals = messages.transmit(plans, deltas, residuals, axis_name)
        part = part._replace(residual=residuals if feedback else None)
        if outer_delay == 0:
            return outer_step(part, average)
        sent_params = list(part.local) if compensation else None
        return part._replace(pending=average, sent_params=sent_params)

    def update_fn(updates, state, params=None, **extra):
        if params is None:
            raise ValueError(
                f"{_NAME}: update needs params, the replica's own parameters (the pseudo-"
                "gradient is outer_params - params)"
            )
        try:
            lax.axis_index(axis_name)
        except NameError:
            raise ValueError(
                f"{_NAME}: update must run per replica inside a shard_map over {axis_name!r} "
                f"(use mixjax.delay.diloco_data_parallel with axis_name={axis_name!r}, the same "
                "as diloco's), got no such axis"
            ) from None
        members, plans = layout(params)
        step = state.count
        inner_updates, inner_state = inner_tx.update(updates, state.inner_state, params, **extra)
        local, treedef = jax.tree.flatten(optax.apply_updates(params, inner_updates))
        flat = lambda tree: None if tree is None else treedef.flatten_up_to(tree)
        flats = {
            "local": local,
            "outer": flat(state.outer_params),
            "residual": flat(state.residual),
            "pending": flat(state.pending),
            "sent_params": flat(state.sent_params),
            "mean_square": flat(state.mean_square),
        }
        outer_states, sent = [], jnp.zeros([], jnp.int32)
        for f, run in enumerate(members):
            pick = lambda xs, run=run: None if xs is None else [xs[i] for i in run]
            part = _Fragment(
                outer_state=state.outer_states[f], **{k: pick(v) for k, v in flats.items()}
            )
            keep = lambda p: p
            if outer_delay:
                lands = streaming.due(step, starts[f], sync_every, outer_delay)
                part = lax.cond(lands, lambda p: outer_step(p, p.pending), keep, part)
            sends = streaming.due(step, starts[f], sync_every)
            fragment_plans = [plans[i] for i in run]
            part = lax.cond(sends, lambda p, fp=fragment_plans: sync(p, fp), keep, part)
            nbytes = sum(plan.nbytes for plan in fragment_plans)
            sent = sent + jnp.where(sends, jnp.int32(nbytes), jnp.int32(0))
            outer_states.append(part.outer_state)
            for name, xs in flats.items():
                if xs is not None:
                    for i, x in zip(run, getattr(part, name), strict=True):
                        xs[i] = x
        unflat = lambda xs: None if xs is None else jax.tree.unflatten(treedef, xs)
        new_local = jax.tree.unflatten(treedef, local)
        new_updates = jax.tree.map(lambda w, p: (w - p).astype(p.dtype), new_local, params)
        return new_updates, DiLoCoState(
            count=step + 1,
            inner_state=inner_state,
            outer_params=unflat(flats["outer"]),
            outer_states=tuple(outer_states),
            residual=unflat(flats["residual"]),
            pending=unflat(flats["pending"]),
            sent_params=unflat(flats["sent_params"]),
            mean_square=unflat(flats["mean_square"]),
            sent=sent,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
