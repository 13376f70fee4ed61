"""Synchronous data and model parallelism of the train step: ``jax.sharding``, ``shard_map``,
``pmap``.

Three wrappers of a :class:`mixjax.train.TrainStep` (from :func:`mixjax.train.make_train_step`;
the wrappers re-jit or map its pure function, with its ``steps_per_call`` and ``donate``):

* :func:`data_parallel` re-jits it with shardings: the batch split on the mesh's ``"data"``
  axis, the state replicated or split by model-parallel rules (every transform- and
  optimizer-state leaf with the sharding of the parameter it mirrors, see
  :mod:`mixjax.parallel.mesh`).
  XLA partitions the global computation and averages the gradients, so the numbers are those of
  the single-device step on the global batch.
* :func:`shard_map_step` runs the step per data-parallel replica with ``jax.shard_map`` on its
  slice of the batch; the model must be wrapped with :func:`replica_apply`, whose backward pass
  averages the gradients over the replicas (``lax.pmean``), so every replica takes the same
  update.
* :func:`pmap_step` does the same with ``jax.pmap`` over a replicated state
  (:func:`replicate` / :func:`unreplicate`).
* :func:`mixjax.delay.async_data_parallel` builds the step with ``shard_map`` too, but each
  replica keeps its *local* gradient and acts as an asynchronous worker of its own staleness
  (per-replica FIFOs split over ``"data"``).

Under ``shard_map``/``pmap`` each replica draws its randomness from ``fold_in(rng, replica)``
(replicas must not repeat each other's augmentation or dropout), so with random augmentation or
dropout the numbers differ from a single device; without randomness all three wrappers equal the
single-device step. Metrics are averaged over the replicas.

Every wrapper takes ``axis_name=``, the name the model's own collectives use (a BatchNorm's
``axis_name``; default ``"data"``, the mesh's data axis), and binds it: under ``shard_map`` and
``pmap`` it names the replica axis (the mesh's ``"data"`` axis, renamed for the step), so a
cross-replica BatchNorm normalizes with the statistics of the global batch; under
:func:`data_parallel` XLA computes on the global batch already, and the name is bound to an axis
of size 1 (``jax.vmap``), over which the model's ``pmean`` is the identity. Either way the step
equals the single-device step on the global batch with the BatchNorm's statistics over all of
it (the same model without ``axis_name``).

Meshes and shardings live in :mod:`mixjax.parallel.mesh`, multi-process runs in
:mod:`mixjax.parallel.distributed`.

Example::

    mesh = mixjax.parallel.make_mesh(data=2, model=4)
    rules = [(".*Dense_0/kernel", P(None, "model"))]
    step = mixjax.parallel.data_parallel(train.make_train_step(apply_fn, tx), mesh, rules=rules)
    state = mixjax.parallel.shard_state(state, mesh, rules)
    state, metrics = step(state, batch)      # batch: numpy, this process's part
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixjax import _checks
from mixjax.parallel.mesh import (
    DATA,
    Rules,
    batch_spec,
    check_batch,
    check_rules,
    put,
    shard_batch,
    state_shardings,
)
from mixjax.parallel.per_replica import (
    check_axis_name,
    check_mesh,
    check_train_step,
    renamed_mesh,
    replica_batch_spec,
    replica_body,
    signature,
)
from mixjax.train.step import Step, TrainStep

__all__ = ["data_parallel", "pmap_step", "replicate", "shard_map_step", "unreplicate"]


def _bound(pure: Callable, axis_name: str) -> Callable:
    """``pure`` with ``axis_name`` bound to an axis of size 1: the model's collectives over it
    (a BatchNorm's ``pmean``) are the identity, as the computation already sees every example."""
    mapped = jax.vmap(pure, in_axes=None, out_axes=0, axis_size=1, axis_name=axis_name)
    return lambda state, batch: jax.tree.map(lambda x: x[0], mapped(state, batch))


def data_parallel(step: TrainStep, mesh: Mesh, *, rules: Rules = (), axis_name: str = DATA) -> Step:
    """The step re-jitted with the batch on ``"data"`` and the state laid out by ``rules``.

    Args:
      step: a :class:`mixjax.train.TrainStep` (any model); its ``steps_per_call`` sets the
        batch's example axis (1 when ``K > 1``) and its ``donate`` the donation of the state.
      mesh: a mesh with a ``"data"`` axis (and ``"model"`` for rules),
        :func:`mixjax.parallel.make_mesh`.
      rules: model-parallel ``(regex, PartitionSpec)`` rules
        (:func:`mixjax.parallel.param_specs`); none replicates the state.
      axis_name: the axis name the model's collectives use (a BatchNorm's ``axis_name``),
        bound to an axis of size 1 (``jax.vmap``): XLA partitions the global computation, so a
        BatchNorm's statistics are the global batch's and its ``pmean`` is the identity.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``batch`` holds this process's numpy (or
      jax) arrays, split over ``"data"`` by :func:`shard_batch`; ``state`` is placed with
      :func:`state_shardings` (a no-op when it already is, e.g. from :func:`shard_state` or a
      previous call); the new state keeps those shardings, the metrics are replicated.

    Raises:
      TypeError / ValueError (here): not a ``TrainStep``, a bad mesh, rule or ``axis_name``.
      ValueError (each call, before compiling): the global batch not divisible by the data
        axis; a rule spec that does not divide its parameter.
    """
    fn_name = "mixjax.parallel.data_parallel"
    _checks.instance(
        fn_name, "step", step, TrainStep, "a mixjax.train.TrainStep (from make_train_step)"
    )
    steps_per_call, donate = step.steps_per_call, step.donate
    mesh = check_mesh(fn_name, mesh)
    check_rules(fn_name, rules, mesh)
    pure = _bound(step.pure, check_axis_name(fn_name, axis_name))
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled: dict[tuple, tuple[Any, Callable]] = {}

    def wrapped(state, batch):
        key = signature(state)
        if key not in compiled:
            shardings = state_shardings(state, mesh, rules)
            jitted = jax.jit(
                pure,
                in_shardings=(shardings, NamedSharding(mesh, batch_spec(steps_per_call))),
                out_shardings=(shardings, replicated),
                donate_argnums=(0,) if donate else (),
            )
            compiled[key] = (shardings, jitted)
        shardings, jitted = compiled[key]
        batch = shard_batch(batch, mesh, steps_per_call=steps_per_call)
        return jitted(put(state, shardings), batch)

    return wrapped


def shard_map_step(step: TrainStep, mesh: Mesh, *, axis_name: str = DATA) -> Step:
    """The step as explicit per-replica SPMD code: ``jax.shard_map`` over ``"data"``.

    Each replica runs the step on its ``B / data`` examples with the whole (replicated) state;
    the step's model must be :func:`mixjax.parallel.replica_apply`-wrapped (over
    ``axis_name``) so gradients are averaged.

    Args:
      step: a :class:`mixjax.train.TrainStep` built with a
        :func:`mixjax.parallel.replica_apply` model (its ``steps_per_call`` and ``donate``
        apply).
      mesh: a mesh with a ``"data"`` axis; other axes replicate the work.
      axis_name: the name the replica axis (the mesh's ``"data"`` axis) has inside the step,
        the one the model's collectives use (a BatchNorm's ``axis_name``, so its statistics
        are the global batch's); ``replica_apply`` must average over it.

    Returns:
      ``step(state, batch) -> (state, metrics)`` with ``batch`` as in :func:`data_parallel`
      and the state replicated over the mesh.

    Raises:
      TypeError / ValueError (here): not a ``TrainStep``, a bad mesh, a model that is not
        ``replica_apply``-wrapped over ``axis_name``, an ``axis_name`` that is not a str or
        that names another mesh axis.
      ValueError (each call, before compiling): a global batch not divisible by the data axis.
    """
    fn_name = "mixjax.parallel.shard_map_step"
    mesh = check_mesh(fn_name, mesh)
    axis_name = check_axis_name(fn_name, axis_name, mesh)
    step = check_train_step(fn_name, step, local_grads=False, axis_name=axis_name)
    steps_per_call, donate = step.steps_per_call, step.donate
    mapped = jax.shard_map(
        replica_body(step.pure, axis_name=axis_name),
        mesh=renamed_mesh(mesh, axis_name),
        in_specs=(PartitionSpec(), replica_batch_spec(steps_per_call, axis_name)),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False,
    )
    jitted = jax.jit(mapped, donate_argnums=(0,) if donate else ())
    replicated = NamedSharding(mesh, PartitionSpec())

    def wrapped(state, batch):
        batch = shard_batch(batch, mesh, steps_per_call=steps_per_call)
        state = put(state, jax.tree.map(lambda _: replicated, state))
        return jitted(state, batch)

    return wrapped


def replicate(tree: Any, devices: Any = None) -> Any:
    """``tree`` with a leading device axis, one copy per device (the state of :func:`pmap_step`)."""
    devices = jax.local_devices() if devices is None else list(devices)
    sharding = NamedSharding(Mesh(np.array(devices), (DATA,)), PartitionSpec(DATA))
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(devices), *jnp.shape(x))), tree)
    return jax.device_put(stacked, sharding)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of a :func:`replicate`-d tree."""
    return jax.tree.map(lambda x: x[0], tree)


def pmap_step(step: TrainStep, *, devices: Any = None, axis_name: str = DATA) -> Step:
    """The step under ``jax.pmap`` over the ``axis_name`` axis of ``devices``.

    Args:
      step: a :class:`mixjax.train.TrainStep` built with a
        :func:`mixjax.parallel.replica_apply` model over ``axis_name`` (its ``steps_per_call``
        and ``donate`` apply).
      devices: the local devices (default all); ``n = len(devices)`` replicas.
      axis_name: the pmapped axis's name, the one the model's collectives use (a BatchNorm's
        ``axis_name``); default ``"data"``.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``state`` replicated (:func:`replicate`,
      leading axis ``n``), ``batch`` a dict of global ``(B, ...)`` (``(K, B, ...)``) arrays split
      into ``n`` parts of ``B / n`` examples; returns the replicated state and the averaged
      metrics of the first replica.

    Raises:
      TypeError / ValueError: as :func:`shard_map_step`, with the data axis of size ``n``.
    """
    fn_name = "mixjax.parallel.pmap_step"
    axis_name = check_axis_name(fn_name, axis_name)
    step = check_train_step(fn_name, step, local_grads=False, axis_name=axis_name)
    steps_per_call, donate = step.steps_per_call, step.donate
    devices = jax.local_devices() if devices is None else list(devices)
    n = len(devices)
    mapped = jax.pmap(
        replica_body(step.pure, axis_name=axis_name),
        axis_name=axis_name,
        devices=devices,
        donate_argnums=(0,) if donate else (),
    )
    axis = 0 if steps_per_call == 1 else 1

    def split(x):
        x = np.asarray(x)
        x = x.reshape(*x.shape[:axis], n, x.shape[axis] // n, *x.shape[axis + 1 :])
        return np.moveaxis(x, axis, 0)

    def wrapped(state, batch):
        check_batch(fn_name, batch, n, steps_per_call)
        state, metrics = mapped(state, {k: split(v) for k, v in batch.items()})
        return state, unreplicate(metrics)

    return wrapped
