"""Asynchronous data-parallel replicas: each replica applies its own stale gradient.

:func:`replica_delayed` wraps an optax transformation for a step that runs once per
data-parallel replica (``jax.shard_map`` over the mesh's ``"data"`` axis, see
:func:`async_data_parallel`; inside the step that axis is called ``axis_name``, the name the
model's collectives use, e.g. a BatchNorm's) and receives that replica's *local* gradient. Each
of the ``R`` replicas acts as an asynchronous worker of its own staleness: at step ``t`` replica
``r`` pushes its gradient ``g_r(t)`` (computed at ``w_t`` on its ``B / R`` examples) into its own
FIFO and reads back ``g_r(t - tau_r(t))``; the stale gradients are averaged over the replicas
that have one and the inner optimizer runs once on the average, identically on every replica::

    g(t) = sum_{r : t >= tau_r(t)} c_r(t) / #{r : t >= tau_r(t)}
    c_r(t) = g_r(t - tau_r)                                           (no compensation)
           = g_r(t - tau_r) + lam_r(t) * g_r(t - tau_r)**2 * (w_t - w_{t - tau_r})  (DC-ASGD)

* Fixed staleness: ``tau_r(t) = taus[r]``.
* Random staleness (``random_staleness=True``): ``tau_r(t) = floor(u * (taus[r] + 1))`` with
  ``u ~ Uniform[0, 1)`` drawn from ``fold_in(fold_in(key, t), r)``: uniform on
  ``{0, ..., taus[r]}``, independently per replica and step.
* Warm-up: a replica whose selected gradient predates step 0 contributes nothing; while no
  replica has a gradient the updates are zero and the inner state is untouched (as
  :func:`mixjax.delay.delayed`).
* Compensation (``"dc"``, ``"dc_adaptive"``) is per replica, with the parameters that replica
  stored with its gradient and, for DC-ASGD-a, its own ``MS`` moving average (the per-worker
  statistics of the paper's parameter server); see :mod:`mixjax.delay.compensation`.

With every ``tau_r = 0`` this is the synchronous data-parallel step; with every ``tau_r = tau``
and no compensation it is ``mixjax.delay.delayed(tx, tau)`` on the global batch.

Layout. The FIFO of a parameter of shape ``S`` is one array ``(R, L, *S)``, ``L = max(taus) +
1``, split over replicas on its first axis (``PartitionSpec("data")``), so each replica holds
and writes only its own ``(1, L, *S)`` block (:func:`replica_specs`); the FIFO code is
:mod:`mixjax.delay`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from mixjax import _checks
from mixjax.core import ParamTransform, identity
from mixjax.delay.compensation import check_options, mean_square_init
from mixjax.delay.fifo import (
    Buffers,
    check_params,
    check_tau,
    fifo_init,
    sample_staleness,
    stale_step,
    update_once_started,
)
from mixjax.parallel.mesh import DATA
from mixjax.parallel.per_replica import (
    check_axis_name,
    check_mesh,
    check_train_step,
    per_replica_step,
    replica_body,
)
from mixjax.train.apply import ApplyFn
from mixjax.train.losses import softmax_cross_entropy
from mixjax.train.step import Step, make_train_step

__all__ = [
    "ReplicaDelayState",
    "async_data_parallel",
    "check_taus",
    "find_replica_states",
    "replica_delayed",
    "replica_specs",
]

_NAME = "mixjax.delay.replica_delayed"


class ReplicaDelayState(NamedTuple):
    """State of :func:`replica_delayed` for ``R`` replicas and FIFOs of ``L = max(taus) + 1``.

    Attributes:
      count: int32 scalar, the number of ``update`` calls (the step ``t``, the write slot
        ``t % L``); replicated.
      past_grads: the parameters' tree structure; at each leaf an array ``(R, L, *param.shape)``
        in the parameter's dtype: row ``r`` is replica ``r``'s ring buffer of its last ``L``
        local gradients (zeros before they exist). Split over ``"data"`` on axis 0.
      past_params: like ``past_grads``, the parameters each gradient was computed at; ``None``
        without compensation.
      mean_square: for ``"dc_adaptive"``, at each leaf an array ``(R, *param.shape)`` (at least
        float32), replica ``r``'s moving average ``MS`` of its squared stale gradients; ``None``
        otherwise. Split over ``"data"`` on axis 0.
      inner_state: the wrapped optimizer's state (replicated: every replica runs the same
        update).
    """

    count: jax.Array
    past_grads: Any
    past_params: Any
    mean_square: Any
    inner_state: optax.OptState


def check_taus(taus: Any, fn_name: str = _NAME) -> tuple[int, ...]:
    """``taus`` as a tuple of ints ``>= 0``, one per replica.

    Raises:
      TypeError: not a non-empty sequence of ints.
      ValueError: a negative staleness.
    """
    if isinstance(taus, (str, bytes)) or not isinstance(taus, (Sequence, np.ndarray)):
        raise TypeError(
            f"{fn_name}: taus must be a sequence of ints >= 0, one per data-parallel replica, "
            f"got taus={taus!r}"
        )
    if len(taus) == 0:
        raise ValueError(f"{fn_name}: taus must name one staleness per replica, got taus=()")
    return tuple(check_tau(fn_name, f"taus[{r}] (replica {r})", t) for r, t in enumerate(taus))


def replica_delayed(
    inner: optax.GradientTransformation,
    taus: Sequence[int],
    *,
    compensation: str | None = None,
    lam: float | None = None,
    ms_decay: float = 0.95,
    eps: float = 1e-7,
    random_staleness: bool = False,
    key: jax.Array | None = None,
    axis_name: str = DATA,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that replica ``r`` contributes its gradient of step ``t - tau_r``.

    ``update`` must run inside a ``shard_map`` over ``axis_name`` with the state laid out by
    :func:`replica_specs`: use :func:`async_data_parallel`.

    Args:
      inner: the inner optax transformation, run once per step on the averaged stale gradients.
      taus: one staleness ``>= 0`` per replica, ``len(taus)`` = the size of the data axis (the
        maximum staleness per replica with ``random_staleness``).
      compensation: ``None``, ``"dc"`` or ``"dc_adaptive"`` (DC-ASGD per replica, see
        :func:`mixjax.delay.delayed`); stores each replica's parameters per buffered step.
      lam: the compensation strength, ``None`` for the mode's default
        (:data:`mixjax.delay.compensation.DEFAULT_LAM`).
      ms_decay: the decay of DC-ASGD-a's ``MS``, in ``[0, 1)``.
      eps: added to ``MS`` under the square root, ``> 0``.
      random_staleness: draw each replica's staleness of each step uniformly in
        ``[0, taus[r]]``.
      key: the ``jax.random`` key of those draws (with, and only with, ``random_staleness``).
      axis_name: the replica axis's name inside the step: the ``axis_name`` given to
        :func:`async_data_parallel` (``"data"`` unless the model's collectives use another).

    Returns:
      An ``optax.GradientTransformationExtraArgs``: ``init(params)`` (outside the
      ``shard_map``) returns a :class:`ReplicaDelayState` with ``R = len(taus)`` FIFO rows;
      ``update(grads, state, params=None, **extra)`` forwards ``extra`` to ``inner``.

    Raises:
      TypeError: ``inner`` is not an optax transformation, ``taus`` not a sequence of ints, or an
        option of the wrong type.
      ValueError: an empty ``taus`` or a negative one, and the option errors of
        :func:`mixjax.delay.delayed`; at ``update``, no ``params`` with compensation, or a call
        outside a ``shard_map`` over ``axis_name``.
    """
    _checks.optax_transform(_NAME, "inner", inner)
    taus = check_taus(taus)
    options = check_options(_NAME, compensation, lam, ms_decay, eps, random_staleness, key)
    _checks.instance(_NAME, "axis_name", axis_name, str, "a str")
    inner = optax.with_extra_args_support(inner)
    replicas, length = len(taus), max(taus) + 1

    def per_replica(tree_fn, params):
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (replicas, *x.shape)), tree_fn(params))

    def init_fn(params):
        fifo = lambda p: fifo_init(p, length)
        return ReplicaDelayState(
            count=jnp.zeros([], jnp.int32),
            past_grads=per_replica(fifo, params),
            past_params=None if compensation is None else per_replica(fifo, params),
            mean_square=(
                per_replica(mean_square_init, params) if compensation == "dc_adaptive" else None
            ),
            inner_state=inner.init(params),
        )

    def staleness(count, replica):
        tau_max = jnp.asarray(taus, jnp.int32)[replica]
        if not random_staleness:
            return tau_max
        return sample_staleness(
            jax.random.fold_in(jax.random.fold_in(key, count), replica), tau_max
        )

    def update_fn(updates, state, params=None, **extra):
        check_params(_NAME, options, params)
        try:
            replica = lax.axis_index(axis_name)
        except NameError:
            raise ValueError(
                f"{_NAME}: update must run per replica inside a shard_map over {axis_name!r} "
                f"(use mixjax.delay.async_data_parallel with axis_name={axis_name!r}, the same "
                "as replica_delayed's), got no such axis"
            ) from None
        rows = {jnp.shape(b)[0] for b in jax.tree.leaves(state.past_grads)}
        if rows != {1}:
            raise ValueError(
                f"{_NAME}: each replica must see its own FIFO row, (1, L, ...) leaves split over "
                f"{axis_name!r} by replica_specs (use mixjax.delay.async_data_parallel), got "
                f"leading sizes {sorted(rows)}"
            )
        count = state.count
        tau = staleness(count, replica)
        valid = count >= tau
        # Under shard_map each replica sees its own (1, ...) row of the per-replica leaves.
        own = lambda tree: None if tree is None else jax.tree.map(lambda b: b[0], tree)
        mine = Buffers(own(state.past_grads), own(state.past_params), own(state.mean_square))
        every = lambda value: jax.tree.map(lambda _: value, updates)
        stale, mine = stale_step(mine, updates, params, count, every(tau), every(valid), options)
        rows = lambda tree: None if tree is None else jax.tree.map(lambda b: b[None], tree)
        contributing = lax.psum(valid.astype(jnp.int32), axis_name)
        total = lax.psum(stale, axis_name)
        average = jax.tree.map(lambda g: g / jnp.maximum(contributing, 1).astype(g.dtype), total)
        new_updates, inner_state = update_once_started(
            inner, average, state.inner_state, params, contributing > 0, **extra
        )
        buffers = (rows(mine.past_grads), rows(mine.past_params), rows(mine.mean_square))
        return new_updates, ReplicaDelayState(count + 1, *buffers, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_replica_state(x: Any) -> bool:
    return isinstance(x, ReplicaDelayState)


def find_replica_states(tree: Any) -> list[ReplicaDelayState]:
    """Every :class:`ReplicaDelayState` inside ``tree`` (e.g. a train state's ``opt_state``)."""
    return [x for x in jax.tree.leaves(tree, is_leaf=_is_replica_state) if _is_replica_state(x)]


def replica_specs(tree: Any, axis_name: str = DATA) -> Any:
    """``PartitionSpec`` s of ``tree`` for :func:`replica_delayed`'s ``shard_map``.

    The per-replica leaves of every :class:`ReplicaDelayState` (``past_grads``,
    ``past_params``, ``mean_square``) are split on their first axis, ``P(axis_name)``;
    everything else is replicated, ``P()``.
    """
    split, whole = PartitionSpec(axis_name), PartitionSpec()

    def spec(x):
        if not _is_replica_state(x):
            return whole
        per_replica = lambda t: jax.tree.map(lambda _: split, t)
        return ReplicaDelayState(
            count=whole,
            past_grads=per_replica(x.past_grads),
            past_params=per_replica(x.past_params),
            mean_square=per_replica(x.mean_square),
            inner_state=jax.tree.map(lambda _: whole, x.inner_state),
        )

    return jax.tree.map(spec, tree, is_leaf=_is_replica_state)


def _fresh_mean_grads(transform: ParamTransform, axis_name: str) -> ParamTransform:
    """``transform`` whose ``update`` sees the replicas' mean fresh gradient, as synchronously.

    Under :func:`async_data_parallel` the step's ``grads`` are the replica's own; a transform
    that scores them (saliency pruning) must see the same values on every replica.
    """

    def update(params, state, step, *, grads=None, **extra):
        if grads is not None:
            grads = lax.pmean(grads, axis_name)
        return transform.update(params, state, step, grads=grads, **extra)

    return transform._replace(update=update)


def async_data_parallel(
    apply_fn: ApplyFn,
    tx: Any,
    mesh: Mesh,
    *,
    transform: ParamTransform | None = None,
    augment: Callable | None = None,
    preprocess: Callable | None = None,
    loss: Callable = softmax_cross_entropy,
    steps_per_call: int = 1,
    donate: bool = True,
    axis_name: str = DATA,
) -> Step:
    """A train step whose data-parallel replicas are asynchronous workers of their own staleness.

    The step is :func:`mixjax.train.make_train_step` (the same arguments) run per replica with
    ``jax.shard_map`` over the mesh's ``"data"`` axis, called ``axis_name`` inside the step (as
    in :func:`mixjax.parallel.shard_map_step`): each replica computes the gradient of its ``B / R``
    examples, ``tx`` (a :func:`replica_delayed` transformation, possibly inside
    ``optax.chain``) keeps it in the replica's FIFO row and averages the replicas' stale
    gradients; the transform's ``update`` gets the mean *fresh* gradient (as the synchronous
    step's), the model state (batch statistics) and metrics are averaged over the replicas.
    Each replica draws its randomness from ``fold_in(rng, replica)``. A model whose BatchNorm
    has an ``axis_name`` (``models.ResNet20(..., axis_name="batch")``) normalizes with the
    statistics of all replicas' examples when ``axis_name`` (here and in ``replica_delayed``)
    is that name.

    Example::

        tx = mixjax.delay.replica_delayed(optax.sgd(0.1), taus=(0, 1, 2, 3))
        state = mixjax.train.init_train_state(params, tx, key=key)
        step = mixjax.delay.async_data_parallel(apply_fn, tx, parallel.make_mesh(data=4))
        state, metrics = step(state, batch)
        # A BatchNorm with axis_name="batch": the same name in both places.
        tx = mixjax.delay.replica_delayed(optax.sgd(0.1), (0, 1, 2, 3), axis_name="batch")
        step = mixjax.delay.async_data_parallel(apply_fn, tx, mesh, axis_name="batch")

    Args:
      apply_fn: the model (:class:`mixjax.train.ApplyFn`), *not* wrapped with
        :func:`mixjax.parallel.replica_apply`.
      tx: the optimizer, containing one :func:`replica_delayed` with ``len(taus)`` equal to the
        mesh's ``"data"`` size; the state comes from ``init_train_state(params, tx, ...)``.
      mesh: a mesh with a ``"data"`` axis (other axes replicate the work).
      transform: as in :func:`mixjax.train.make_train_step`.
      augment: as in :func:`mixjax.train.make_train_step`.
      preprocess: as in :func:`mixjax.train.make_train_step`.
      loss: as in :func:`mixjax.train.make_train_step`.
      steps_per_call: as in :func:`mixjax.train.make_train_step`.
      donate: donate the state's buffers.
      axis_name: the name of the replica axis (the mesh's ``"data"`` axis) inside the step,
        the one the model's collectives use and ``replica_delayed``'s ``axis_name``.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``batch`` as in
      :func:`mixjax.parallel.data_parallel`; the state keeps every :class:`ReplicaDelayState`
      FIFO split over the mesh's ``"data"`` axis on its replica axis (:func:`replica_specs`),
      whatever ``axis_name``, and the rest replicated.

    Raises:
      TypeError / ValueError (here): as :func:`mixjax.train.make_train_step`; a bad mesh; an
        ``axis_name`` not a non-empty str or naming another mesh axis; a model wrapped with
        :func:`mixjax.parallel.replica_apply`.
      ValueError (each call, before compiling): a state without a :class:`ReplicaDelayState`
        or whose FIFOs hold a number of replicas (``len(taus)``) other than the data axis
        size; a global batch not divisible by the data axis; (first call) ``replica_delayed``
        built with another ``axis_name``.
    """
    fn_name = "mixjax.delay.async_data_parallel"
    mesh = check_mesh(fn_name, mesh)
    axis_name = check_axis_name(fn_name, axis_name, mesh)
    transform = identity() if transform is None else transform
    if isinstance(transform, ParamTransform):  # anything else: make_train_step's TypeError
        transform = _fresh_mean_grads(transform, axis_name)
    step = make_train_step(
        apply_fn,
        tx,
        transform=transform,
        augment=augment,
        preprocess=preprocess,
        loss=loss,
        steps_per_call=steps_per_call,
        donate=False,
    )
    step = check_train_step(fn_name, step, local_grads=True)
    steps_per_call = step.steps_per_call
    body = replica_body(step.pure, local_grads=True, axis_name=axis_name)
    replicas = mesh.shape[DATA]

    def check_state(state):
        found = find_replica_states(getattr(state, "opt_state", None))
        if len(found) != 1:
            raise ValueError(
                f"{fn_name}: the state's opt_state must hold exactly one "
                f"mixjax.delay.replica_delayed state (build tx with replica_delayed and the "
                f"state with init_train_state(params, tx, ...)), got {len(found)}"
            )
        rows = {np.shape(x)[0] for x in jax.tree.leaves(found[0].past_grads)}
        if rows != {replicas}:
            raise ValueError(
                f"{fn_name}: replica_delayed has one staleness per replica, got "
                f"len(taus)={min(rows)} for a mesh whose {DATA!r} axis has {replicas} replicas"
            )

    return per_replica_step(
        body,
        mesh,
        specs=replica_specs,
        check_state=check_state,
        steps_per_call=steps_per_call,
        donate=donate,
        axis_name=axis_name,
    )
