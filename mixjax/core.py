"""The one protocol every compression transform implements, and how transforms compose.

A :class:`ParamTransform` is a NamedTuple of pure functions over a parameter tree (a linen
``params`` dict, an ``nnx.State`` from ``nnx.split``, or any pytree):

* ``init(params) -> state``: masks, codebooks, observer statistics, ...;
* ``apply(params, state) -> params``: the view the forward pass uses; differentiable, with
  straight-through estimators where it rounds or looks up, so ``jax.grad`` through it reaches the
  stored float parameters;
* ``update(params, state, step, **extra) -> state``: the schedule-driven refresh, called every
  step inside the jitted train step (``extra`` carries e.g. ``grads=`` for saliency pruning);
  transforms ignore extras they do not use;
* ``constrain(params, state) -> params``: the projection the *stored* parameters must satisfy
  after each optimizer step (pruning zeroes pruned weights; most transforms keep the identity).
  :func:`wrap_optax` and :func:`apply_updates` apply it.

Every function returns a tree with the structure of ``params``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

Params = Any
State = Any
Step = Any  # int or scalar integer array


class InitFn(Protocol):
    def __call__(self, params: Params) -> State: ...


class ApplyFn(Protocol):
    def __call__(self, params: Params, state: State) -> Params: ...


class UpdateFn(Protocol):
    def __call__(self, params: Params, state: State, step: Step, **extra: Any) -> State: ...


class ConstrainFn(Protocol):
    def __call__(self, params: Params, state: State) -> Params: ...


def unconstrained(params: Params, state: State) -> Params:
    """The ``constrain`` of transforms that put no constraint on the stored parameters."""
    del state
    return params


class ParamTransform(NamedTuple):
    """A compression transform: pure functions over a parameter tree (see the module docstring).

    Attributes:
      init: ``params -> state``.
      apply: ``(params, state) -> params``, the view the forward pass uses.
      update: ``(params, state, step, **extra) -> state``, jit-able, called every step.
      constrain: ``(params, state) -> params``, the projection stored parameters keep after an
        optimizer step; the identity by default.
    """

    init: InitFn
    apply: ApplyFn
    update: UpdateFn
    constrain: ConstrainFn = unconstrained


class EmptyState(NamedTuple):
    """State of transforms that keep none."""


def identity() -> ParamTransform:
    """The transform that changes nothing; the neutral element of :func:`chain`."""
    return ParamTransform(
        init=lambda params: EmptyState(),
        apply=lambda params, state: params,
        update=lambda params, state, step, **extra: state,
    )


def chain(*transforms: ParamTransform) -> ParamTransform:
    """Composes transforms left to right; each one sees the view of those before it.

    ``chain(prune, cluster, quantize).apply`` prunes, clusters the pruned view (so clustering can
    keep the zeros) and quantizes the clustered view (so it quantizes the codebook). In
    ``update``, transform ``i`` is refreshed on the view of transforms ``0..i-1`` built from their
    *refreshed* states, so a mask chosen this step is seen by the clustering after it.
    ``constrain`` applies each transform's constraint in the same order.

    The state is a tuple with one entry per transform.

    Raises:
      TypeError: an argument is not a :class:`ParamTransform`.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, ParamTransform):
            raise TypeError(
                f"mixjax.chain: argument {i} must be a ParamTransform, got {type(t).__name__}"
            )

    def init_fn(params):
        states = []
        for t in transforms:
            state = t.init(params)
            states.append(state)
            params = t.apply(params, state)
        return tuple(states)

    def check(states):
        if not isinstance(states, tuple) or len(states) != len(transforms):
            raise ValueError(
                f"mixjax.chain: state must be a tuple of {len(transforms)} states (one per "
                f"transform), got {type(states).__name__} {jax.tree.structure(states)}"
            )

    def apply_fn(params, states):
        check(states)
        for t, state in zip(transforms, states, strict=True):
            params = t.apply(params, state)
        return params

    def update_fn(params, states, step, **extra):
        check(states)
        new_states = []
        for t, state in zip(transforms, states, strict=True):
            state = t.update(params, state, step, **extra)
            new_states.append(state)
            params = t.apply(params, state)
        return tuple(new_states)

    def constrain_fn(params, states):
        check(states)
        for t, state in zip(transforms, states, strict=True):
            params = t.constrain(params, state)
        return params

    return ParamTransform(init_fn, apply_fn, update_fn, constrain_fn)


class ConstrainedState(NamedTuple):
    """State of :func:`wrap_optax`.

    Attributes:
      inner_state: the wrapped optimizer's state.
    """

    inner_state: optax.OptState


def apply_updates(
    params: Params, updates: optax.Updates, transform: ParamTransform, state: State
) -> Params:
    """``optax.apply_updates`` followed by the transform's constraint: for hand-written loops.

    Equivalent to what :func:`wrap_optax` guarantees: with a pruning transform, pruned weights
    are exactly zero in the result whatever the updates (e.g. Adam momentum) say.
    """
    return transform.constrain(optax.apply_updates(params, updates), state)


def wrap_optax(
    inner: optax.GradientTransformation, transform: ParamTransform
) -> optax.GradientTransformationExtraArgs:
    """Wraps any optax optimizer so the stored parameters keep ``transform``'s constraints.

    The returned transformation's ``update`` takes the transform's current state as the extra
    keyword argument ``transform_state=`` and returns updates ``u`` such that
    ``optax.apply_updates(params, u)`` equals ``transform.constrain(params + inner_updates,
    transform_state)``: pruned weights stay exactly zero through Adam's momentum. Other extra
    arguments are passed to ``inner``.

    Example::

        tx = mixjax.wrap_optax(optax.adam(1e-3), pruning)
        opt_state = tx.init(params)
        updates, opt_state = tx.update(grads, opt_state, params, transform_state=prune_state)
        params = optax.apply_updates(params, updates)

    Raises:
      TypeError: ``inner`` is not an optax transformation or ``transform`` not a ParamTransform.
    """
    if not isinstance(transform, ParamTransform):
        raise TypeError(
            f"mixjax.wrap_optax: transform must be a ParamTransform, got {type(transform).__name__}"
        )
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            "mixjax.wrap_optax: inner must be an optax GradientTransformation, "
            f"got {type(inner).__name__}"
        )
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return ConstrainedState(inner.init(params))

    def update_fn(updates, state, params=None, *, transform_state=None, **extra):
        if params is None:
            raise ValueError("mixjax.wrap_optax: update needs params to keep the constraints")
        if transform_state is None:
            raise ValueError(
                "mixjax.wrap_optax: update needs transform_state= (the transform's current state)"
            )
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
        constrained = apply_updates(params, updates, transform, transform_state)
        # x + (c - x) == c exactly when c == 0, so pruned weights land on exact zeros.
        updates = jax.tree.map(
            lambda c, p: (jnp.asarray(c) - p).astype(jnp.asarray(p).dtype), constrained, params
        )
        return updates, ConstrainedState(inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
