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
  :func:`wrap_optax` and :func:`apply_updates` apply it;
* ``due(step) -> bool``: whether ``update`` may change the state at ``step`` (a Python bool or
  a traced bool scalar). Where it is false, ``update`` must return the state unchanged, so
  :func:`chain` skips the work of building the view that ``update`` would read: a mask
  refreshed every 10 steps costs its input view once per 10 steps, not every step.
  :func:`every_step` (the default) for transforms that refresh at each step. A refresh every
  ``k`` steps is due at the steps ``t`` with ``t % k == 0``, ``t = 0`` included
  (:func:`multiples_of`): ``init`` made the state for the initial weights, and the ``update``
  of step ``t`` makes the state for the weights after the optimizer step ``t``;
  :func:`update_when_due` is the one place that turns a ``due`` into a ``lax.cond``.

Every function returns a tree with the structure of ``params``.

Shared values: a transform whose view shares few values within blocks of a leaf (clustering:
per tensor or per output feature) gives ``shares(params, state) -> {path: block shape}`` (as
scales are shaped, :func:`mixjax.quant.expand_scale`: ``()`` one block, ``(1, ..., C)`` one per
output channel; from shapes and the state's leaves, never values). A quantizer gives
``adapt(shared) -> ParamTransform``, itself with scales coarsened to those blocks, so equal
values stay equal and a clustered kernel keeps its codebook. :func:`chain` adapts each transform
to what those before it share (transforms without ``shares``, e.g. pruning, pass it on).

Learned state: a transform whose state holds arrays trained by gradient descent (LSQ step
sizes, :func:`mixjax.quant.lsq`) marks those fields in its state type's ``LEARNED`` class
attribute (a tuple of field names). :func:`learned_state` takes them out of any (e.g. chained)
state and :func:`with_learned_state` puts them back, so a training step differentiates the loss
with respect to them and updates them with the optimizer (:func:`mixjax.train.make_train_step`
does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mixjax import _checks

__all__ = [
    "ConstrainedState",
    "EmptyState",
    "ParamTransform",
    "apply_updates",
    "chain",
    "every_step",
    "identity",
    "learned_state",
    "multiples_of",
    "never",
    "unconstrained",
    "update_when_due",
    "with_learned_state",
    "wrap_optax",
]

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


class DueFn(Protocol):
    def __call__(self, step: Step) -> bool | jax.Array: ...


# {leaf path: block shape} of the leaves whose view shares values within blocks.
Shared = Mapping[str, tuple[int, ...]]


def unconstrained(params: Params, state: State) -> Params:
    """The ``constrain`` of transforms that put no constraint on the stored parameters."""
    del state
    return params


def every_step(step: Step) -> bool:
    """The ``due`` of transforms whose ``update`` may change the state at any step."""
    del step
    return True


def never(step: Step) -> bool:
    """The ``due`` of transforms whose ``update`` never changes the state."""
    del step
    return False


def multiples_of(k: int) -> DueFn:
    """The ``due`` of a refresh at the steps ``t`` divisible by ``k`` (``t = 0`` included).

    Returns a Python bool for a Python int step and a bool scalar array for an array step, so
    :func:`chain` and :func:`update_when_due` decide statically where they can;
    ``multiples_of(1)`` is :func:`every_step`.

    Raises:
      TypeError / ValueError: ``k`` not an integer ``>= 1``.
    """
    k = _checks.integer("mixjax.multiples_of", "k", k, 1)
    if k == 1:
        return every_step

    def due(step):
        if isinstance(step, int):
            return step % k == 0
        return jnp.asarray(step) % k == 0

    return due


def update_when_due(due: DueFn, step: Step, refresh: Callable[[], State], state: State) -> State:
    """``refresh()`` where ``due(step)`` holds, else ``state``: the body of a periodic ``update``.

    A static ``due`` (a Python bool, or a concrete array outside a trace) decides in Python, so
    an eager call runs ``refresh`` or not at all; a traced one becomes a ``lax.cond``, so a
    jitted step pays for ``refresh`` only at the steps where it is due. ``refresh`` must return
    a state of ``state``'s structure, shapes and dtypes.
    """
    now = _static_bool(due(step))
    if now is True:
        return refresh()
    if now is False:
        return state
    return lax.cond(now, refresh, lambda: state)


class ParamTransform(NamedTuple):
    """A compression transform: pure functions over a parameter tree (see the module docstring).

    Attributes:
      init: ``params -> state``.
      apply: ``(params, state) -> params``, the view the forward pass uses.
      update: ``(params, state, step, **extra) -> state``, jit-able, called every step.
      constrain: ``(params, state) -> params``, the projection stored parameters keep after an
        optimizer step; the identity by default.
      due: ``step -> bool``, whether ``update`` may change the state at ``step``;
        :func:`every_step` by default. Where it is false, ``update`` returns the state unchanged.
      shares: ``(params, state) -> {path: block shape}``, the leaves whose view shares values
        within blocks (module docstring); ``None``: passes on what its input shares.
      adapt: ``shared -> ParamTransform``, this transform for an input view that shares values
        on ``shared`` (module docstring); ``None``: unaffected by shared values.
    """

    init: InitFn
    apply: ApplyFn
    update: UpdateFn
    constrain: ConstrainFn = unconstrained
    due: DueFn = every_step
    shares: Callable[[Params, State], Shared] | None = None
    adapt: Callable[[Shared], ParamTransform] | None = None


class EmptyState(NamedTuple):
    """State of transforms that keep none."""


def identity() -> ParamTransform:
    """The transform that changes nothing; the neutral element of :func:`chain`."""
    return ParamTransform(
        init=lambda params: EmptyState(),
        apply=lambda params, state: params,
        update=lambda params, state, step, **extra: state,
        due=never,
    )


def _static_bool(value: bool | jax.Array) -> bool | jax.Array:
    """A Python bool for a concrete ``due``, the tracer itself for a traced one."""
    return value if isinstance(value, jax.core.Tracer) else bool(value)


def _is_learned(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(type(node), "LEARNED")


def learned_state(state: State) -> Any:
    """The learned fields of every state in ``state`` (any nesting, e.g. a ``chain`` tuple).

    Returns:
      A tree with ``state``'s structure down to its learned states: each state type with a
      ``LEARNED`` class attribute keeps those fields (its other fields become ``None``), every
      other leaf becomes ``None``. Empty (no leaves) when nothing is learned. Differentiate a
      loss with respect to it and put the result back with :func:`with_learned_state`::

          def loss(params, learned):
              view = transform.apply(params, mixjax.with_learned_state(state, learned))
              ...
          g_params, g_learned = jax.grad(loss, argnums=(0, 1))(params, mixjax.learned_state(state))
    """

    def keep(node):
        if not _is_learned(node):
            return None
        return node._replace(**{f: None for f in node._fields if f not in type(node).LEARNED})

    return jax.tree.map(keep, state, is_leaf=_is_learned)


def with_learned_state(state: State, learned: Any) -> State:
    """``state`` with the learned fields of its learned states replaced from ``learned``.

    ``learned`` has the structure :func:`learned_state` returns for ``state``.

    Raises:
      ValueError: ``learned`` does not have that structure.
    """

    def put(node, new):
        if not _is_learned(node):
            return node
        return node._replace(**{f: getattr(new, f) for f in type(node).LEARNED})

    try:
        return jax.tree.map(put, state, learned, is_leaf=_is_learned)
    except (ValueError, TypeError) as err:
        raise ValueError(
            "mixjax.with_learned_state: learned does not match the learned fields of state "
            f"(was it made by learned_state(state)?): {err}"
        ) from None


def chain(*transforms: ParamTransform) -> ParamTransform:
    """Composes transforms left to right; each one sees the view of those before it.

    ``chain(prune, cluster, quantize).apply`` prunes, clusters the pruned view (so clustering can
    keep the zeros) and quantizes the clustered view on the clustering's blocks (so it keeps the
    codebook: each transform is adapted to the values shared by those before it, see the module
    docstring). In ``update``, transform ``i`` is refreshed on the view of transforms ``0..i-1``
    built from their *refreshed* states, so a mask chosen this step is seen by the clustering
    after it. A transform that is not ``due`` keeps its state without that view being built: the
    view is computed inside a ``lax.cond`` taken only at the steps where it is due (for a traced
    ``due``), or not at all (where ``due`` is ``False``). ``constrain`` applies each transform's
    constraint in the same order; ``due`` is true where any transform's is. Chains nest: a
    chain shares what its transforms share and adapts them to what its input shares.

    The state is a tuple with one entry per transform.

    Raises:
      TypeError: an argument is not a :class:`ParamTransform`.
    """
    for i, t in enumerate(transforms):
        _checks.instance("mixjax.chain", f"argument {i}", t, ParamTransform, "a ParamTransform")
    return _chain(transforms, {})


def _chain(transforms: tuple[ParamTransform, ...], given: Shared) -> ParamTransform:
    """:func:`chain` of ``transforms`` for an input view that shares values on ``given``."""

    def linked(params, states):
        """The first ``len(states) + 1`` transforms, each adapted to the values shared by those
        before it (with ``states``), and what all of those share."""
        shared, out = dict(given), []
        for i, t in enumerate(transforms[: len(states) + 1]):
            out.append(t.adapt(dict(shared)) if shared and t.adapt is not None else t)
            if i < len(states) and t.shares is not None:
                shared.update(t.shares(params, states[i]))
        return out, shared

    def init_fn(params):
        states, view = [], params
        for i in range(len(transforms)):
            t = linked(params, states)[0][i]
            states.append(t.init(view))
            view = t.apply(view, states[-1])
        return tuple(states)

    def check(states):
        if not isinstance(states, tuple) or len(states) != len(transforms):
            raise ValueError(
                f"mixjax.chain: state must be a tuple of {len(transforms)} states (one per "
                f"transform), got {type(states).__name__} {jax.tree.structure(states)}"
            )

    def view_before(params, states):
        """``params`` through the first ``len(states)`` transforms, with those states."""
        for t, state in zip(linked(params, states)[0], states, strict=False):  # one t more
            params = t.apply(params, state)
        return params

    def apply_fn(params, states):
        check(states)
        return view_before(params, states)

    def update_fn(params, states, step, **extra):
        check(states)
        new_states: list = []
        # views[j]: params through transforms[:j] with their new states, built outside any
        # lax.cond only as far as a transform due at every step needs it.
        views = [params]
        for i, state in enumerate(states):
            ts = linked(params, new_states)[0]
            t = ts[i]
            due = _static_bool(t.due(step))
            if due is False:
                new_states.append(state)
                continue
            if due is True:
                for j in range(len(views) - 1, i):
                    views.append(ts[j].apply(views[j], new_states[j]))
                new_states.append(t.update(views[i], state, step, **extra))
                continue
            refresh = lambda t=t, state=state, done=tuple(new_states): t.update(
                view_before(params, done), state, step, **extra
            )
            new_states.append(lax.cond(due, refresh, lambda state=state: state))
        return tuple(new_states)

    def due_fn(step):
        dues = [_static_bool(t.due(step)) for t in transforms]
        if any(d is True for d in dues):
            return True
        traced = [d for d in dues if d is not False]
        if not traced:
            return False
        return jnp.any(jnp.stack([jnp.asarray(d) for d in traced]))

    def constrain_fn(params, states):
        check(states)
        for t, state in zip(linked(params, states)[0], states, strict=False):  # one t more
            params = t.constrain(params, state)
        return params

    def shares_fn(params, states):
        check(states)
        return linked(params, states)[1]

    return ParamTransform(
        init_fn,
        apply_fn,
        update_fn,
        constrain_fn,
        due_fn,
        shares=shares_fn,
        adapt=lambda shared: _chain(transforms, {**given, **shared}),
    )


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
    _checks.optax_transform("mixjax.wrap_optax", "inner", inner)
    _checks.instance(
        "mixjax.wrap_optax", "transform", transform, ParamTransform, "a ParamTransform"
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
