"""DiLoCo replicas on a mesh: each replica a whole trainer, its train state split over ``"data"``.

Under :func:`diloco_data_parallel` replica ``r`` of the mesh's ``"data"`` axis owns a complete
:class:`mixjax.train.TrainState`: its parameters, its inner (and outer) optimizer state, its
transform state (masks of its own parameters), its model state (batch statistics of its own
examples) and its RNG stream (``fold_in(rng, r)``, :func:`mixjax.parallel.replica_body`).

Layout. :func:`replicate_state` stacks a state made by :func:`mixjax.train.init_train_state`
``R`` times: every leaf ``(*S)`` becomes ``(R, *S)``, split on its first axis over the mesh's
``"data"`` axis (``PartitionSpec("data")``), so each device holds one replica's ``(1, *S)``
block and the replicas may be processes of a multi-process run (:mod:`mixjax.parallel`'s
``jax.distributed`` set-up; the collectives are JAX's). Inside the step each replica sees its
own ``(*S)`` state; the only collectives that cross the replica axis are
:func:`mixjax.delay.diloco`'s sync messages and the averaging of the step's scalar metrics
(reporting; not counted in ``"bytes_sent"``). A model whose own collectives cross the axis (a
BatchNorm with an ``axis_name``) communicates on its own account; use one without.

:func:`synced_state` gives one state to evaluate: the outer parameters, replica 0's transform
state and the replicas' mean floating model state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixjax import _checks
from mixjax.core import ParamTransform, with_learned_state
from mixjax.delay.lowcomm import find_diloco_states
from mixjax.parallel.mesh import DATA, put
from mixjax.parallel.per_replica import (
    check_axis_name,
    check_mesh,
    check_train_step,
    per_replica_step,
    replica_body,
)
from mixjax.train.apply import ApplyFn
from mixjax.train.losses import softmax_cross_entropy
from mixjax.train.state import TrainState
from mixjax.train.step import Step, make_train_step

__all__ = ["diloco_data_parallel", "replicate_state", "synced_state"]

_STATE = "a mixjax.train.TrainState (from init_train_state)"


def _split(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicate_state(state: TrainState, mesh: Mesh) -> TrainState:
    """``state`` stacked once per replica of ``mesh``'s ``"data"`` axis and split over it.

    Args:
      state: a :class:`mixjax.train.TrainState` from ``init_train_state(params, tx, ...)``
        with a :func:`mixjax.delay.diloco` ``tx`` (the same values in every process).
      mesh: the mesh (:func:`mixjax.parallel.make_mesh`), ``R`` = its ``"data"`` size.

    Returns:
      The state with every leaf ``(R, *shape)``, placed with ``PartitionSpec("data")``.

    Raises:
      TypeError: ``state`` not a ``TrainState``, or a bad mesh.
    """
    fn_name = "mixjax.delay.replicate_state"
    _checks.instance(fn_name, "state", state, TrainState, _STATE)
    mesh = check_mesh(fn_name, mesh)
    replicas = mesh.shape[DATA]
    stacked = jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x)[None], (replicas, *jnp.shape(x))), state
    )
    return put(stacked, jax.tree.map(lambda _: _split(mesh), stacked))


def synced_state(state: TrainState) -> TrainState:
    """The state to evaluate: outer parameters, replica 0's transform state, mean model state.

    Args:
      state: a state of :func:`diloco_data_parallel` (every leaf ``(R, ...)``).

    Returns:
      A :class:`mixjax.train.TrainState` without the replica axis, replicated on the state's
      mesh (in every process): ``params`` the :class:`mixjax.delay.DiLoCoState`'s
      ``outer_params`` (each fragment as of its last outer step; a transform's learned fields
      too), ``opt_state``, ``step``, ``rng`` and ``transform_state`` of replica 0,
      ``model_state`` with its floating leaves averaged over the replicas.

    Raises:
      ValueError: no (or several) :class:`mixjax.delay.DiLoCoState` in ``state.opt_state``.
    """
    fn_name = "mixjax.delay.synced_state"
    _checks.instance(fn_name, "state", state, TrainState, _STATE)
    _only_diloco(fn_name, state)
    mesh = jax.tree.leaves(state)[0].sharding.mesh

    def pick(state):
        first = jax.tree.map(lambda x: x[0], state)
        outer = find_diloco_states(first.opt_state)[0].outer_params
        if jax.tree.structure(outer) == jax.tree.structure(first.params):
            params, transform_state = outer, first.transform_state
        else:  # trained (params, learned): mixjax.train.trained
            params, learned = outer
            transform_state = with_learned_state(first.transform_state, learned)
        mean = lambda x: jnp.mean(x, 0) if jnp.issubdtype(x.dtype, jnp.floating) else x[0]
        return first._replace(
            params=params,
            transform_state=transform_state,
            model_state=jax.tree.map(mean, state.model_state),
        )

    return jax.jit(pick, out_shardings=NamedSharding(mesh, PartitionSpec()))(state)


def _only_diloco(fn_name: str, state: TrainState):
    found = find_diloco_states(state.opt_state)
    if len(found) != 1:
        raise ValueError(
            f"{fn_name}: the state's opt_state must hold exactly one mixjax.delay.diloco state "
            f"(build tx with diloco and the state with init_train_state(params, tx, ...)), got "
            f"{len(found)}"
        )
    return found[0]


def diloco_data_parallel(
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
    """A train step whose data-parallel replicas are DiLoCo workers (module docstring).

    The step is :func:`mixjax.train.make_train_step` (the same arguments) run per replica with
    ``jax.shard_map`` over the mesh's ``"data"`` axis, called ``axis_name`` inside: each
    replica trains its own state on its ``B / R`` examples, and ``tx`` (a
    :func:`mixjax.delay.diloco`, possibly inside ``optax.chain``) syncs the replicas.

    Example::

        mesh = mixjax.parallel.make_mesh(data=4)
        tx = mixjax.delay.diloco(optax.adamw(1e-3), sync_every=50)
        state = mixjax.train.init_train_state(params, tx, key=key)
        state = mixjax.delay.replicate_state(state, mesh)
        step = mixjax.delay.diloco_data_parallel(apply_fn, tx, mesh, steps_per_call=10)
        state, metrics = step(state, stacked_batch)      # metrics["bytes_sent"]: (10,) int32
        evaluation = mixjax.delay.synced_state(state)

    Args:
      apply_fn: the model (:class:`mixjax.train.ApplyFn`), *not* wrapped with
        :func:`mixjax.parallel.replica_apply`.
      tx: the optimizer, containing one :func:`mixjax.delay.diloco`.
      mesh: a mesh with a ``"data"`` axis of ``R`` replicas (other axes repeat the work).
      transform: as in :func:`mixjax.train.make_train_step` (its state is per replica).
      augment: as in :func:`mixjax.train.make_train_step`.
      preprocess: as in :func:`mixjax.train.make_train_step`.
      loss: as in :func:`mixjax.train.make_train_step`.
      steps_per_call: ``K >= 1`` steps per call (a ``(K, B, ...)`` batch, ``(K,)`` metrics).
      donate: donate the state's buffers.
      axis_name: the replica axis's name inside the step (``diloco``'s ``axis_name``).

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``state`` from :func:`replicate_state`,
      ``batch`` this process's part as in :func:`mixjax.parallel.data_parallel`; ``metrics``
      the train step's, averaged over the replicas, plus int32 ``"bytes_sent"``: the bytes
      each replica sent at that step (:attr:`mixjax.delay.DiLoCoState.sent`; add them up in
      Python or int64 for a run's total).

    Raises:
      TypeError / ValueError (here): as :func:`mixjax.train.make_train_step`; a bad mesh,
        ``axis_name`` or ``steps_per_call``; a model wrapped with ``replica_apply``.
      ValueError (each call, before compiling): a state whose replica count (the leading
        axis of its leaves) is not the mesh's ``"data"`` size, e.g. one not made by
        :func:`replicate_state`; an ``opt_state`` without exactly one ``diloco`` state; a
        global batch not divisible by the data axis; (first call) ``diloco`` built with
        another ``axis_name``.
    """
    fn_name = "mixjax.delay.diloco_data_parallel"
    mesh = check_mesh(fn_name, mesh)
    axis_name = check_axis_name(fn_name, axis_name, mesh)
    steps_per_call = _checks.integer(fn_name, "steps_per_call", steps_per_call, 1)
    _checks.boolean(fn_name, "donate", donate)
    step = make_train_step(
        apply_fn,
        tx,
        transform=transform,
        augment=augment,
        preprocess=preprocess,
        loss=loss,
        donate=False,
    )
    step = check_train_step(fn_name, step, local_grads=True)
    one = replica_body(step.pure, axis_name=axis_name)  # model state stays the replica's own
    replicas = mesh.shape[DATA]

    def one_step(state, batch):
        state, metrics = one(state, batch)
        sent = find_diloco_states(state.opt_state)[0].sent
        return state, {**metrics, "bytes_sent": sent}

    def body(state, batch):
        own = jax.tree.map(lambda x: x[0], state)
        if steps_per_call == 1:
            own, metrics = one_step(own, batch)
        else:
            own, metrics = lax.scan(one_step, own, batch)
        return jax.tree.map(lambda x: x[None], own), metrics

    def check_state(state):
        _checks.instance(fn_name, "state", state, TrainState, _STATE)
        found = tuple(jnp.shape(state.step))
        if found != (replicas,):
            raise ValueError(
                f"{fn_name}: the state holds {found[0] if found else 'no'} replica(s) "
                f"(state.step {found}) for a mesh whose {DATA!r} axis has {replicas}: make it "
                "with mixjax.delay.replicate_state(state, mesh) on this mesh"
            )
        _only_diloco(fn_name, state)

    return per_replica_step(
        body,
        mesh,
        specs=lambda state, name: jax.tree.map(lambda _: PartitionSpec(name), state),
        check_state=check_state,
        steps_per_call=steps_per_call,
        donate=donate,
        axis_name=axis_name,
    )
