"""Data and model parallelism of the composed train step: ``jax.sharding``, ``shard_map``, ``pmap``.

Three wrappers of a step ``step(state, batch) -> (state, metrics)`` from
:func:`mixjax.train.make_train_step` (jitted or not; the wrappers re-jit its pure function):

* :func:`data_parallel` re-jits it with shardings: the batch split on the mesh's ``"data"``
  axis, the state replicated or split by model-parallel rules (every transform- and
  optimizer-state leaf with the sharding of the parameter it mirrors, see :mod:`mixjax.mesh`).
  XLA partitions the global computation and averages the gradients, so the numbers are those of
  the single-device step on the global batch.
* :func:`shard_map_step` runs the step per data-parallel replica with ``jax.shard_map`` on its
  slice of the batch; the model must be wrapped with :func:`replica_apply`, whose backward pass
  averages the gradients over the replicas (``lax.pmean``), so every replica takes the same
  update.
* :func:`pmap_step` does the same with ``jax.pmap`` over a replicated state
  (:func:`replicate` / :func:`unreplicate`).
* :func:`mixjax.replicas.async_data_parallel` builds the step with ``shard_map`` too, but each
  replica keeps its *local* gradient and acts as an asynchronous worker of its own staleness
  (per-replica FIFOs split over ``"data"``).

Under ``shard_map``/``pmap`` each replica draws its randomness from ``fold_in(rng, replica)``
(replicas must not repeat each other's augmentation or dropout), so with random augmentation or
dropout the numbers differ from a single device; without randomness all three wrappers equal the
single-device step. Metrics are averaged over the replicas.

Multi-process runs (:func:`initialize`, :func:`shard_batch`) live in :mod:`mixjax.distributed`
and :mod:`mixjax.mesh` and are re-exported here.

Example::

    mesh = mixjax.parallel.make_mesh(data=2, model=4)
    rules = [(".*Dense_0/kernel", P(None, "model"))]
    step = mixjax.parallel.data_parallel(train.make_train_step(apply_fn, tx), mesh, rules=rules)
    state = mixjax.parallel.shard_state(state, mesh, rules)
    state, metrics = step(state, batch)      # batch: numpy, this process's part
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixjax.distributed import initialize, process_slice
from mixjax.mesh import (
    DATA,
    MODEL,
    Rules,
    batch_spec,
    check_batch,
    check_rules,
    make_mesh,
    param_specs,
    put,
    shard_batch,
    shard_state,
    state_shardings,
    state_specs,
)
from mixjax.replica_body import (
    Step,
    check_mesh,
    check_steps_per_call,
    mean_floats,
    note_gradient_averaging,
    pure_step,
    replica_body,
    signature,
)

__all__ = [
    "DATA",
    "MODEL",
    "Rules",
    "batch_spec",
    "data_parallel",
    "initialize",
    "make_mesh",
    "param_specs",
    "pmap_step",
    "process_slice",
    "put",
    "replica_apply",
    "replicate",
    "shard_batch",
    "shard_map_step",
    "shard_state",
    "state_shardings",
    "state_specs",
    "unreplicate",
]


def data_parallel(
    step: Step, mesh: Mesh, *, rules: Rules = (), steps_per_call: int = 1, donate: bool = True
) -> Step:
    """The step re-jitted with the batch on ``"data"`` and the state laid out by ``rules``.

    Args:
      step: a train step (from :func:`mixjax.train.make_train_step`, jitted or not).
      mesh: a mesh with a ``"data"`` axis (and ``"model"`` for rules), :func:`make_mesh`.
      rules: model-parallel ``(regex, PartitionSpec)`` rules (:func:`mixjax.mesh.param_specs`);
        none replicates the state.
      steps_per_call: the step's ``K`` (the batch's example axis is 1 when ``K > 1``).
      donate: donate the state's buffers.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``batch`` holds this process's numpy (or
      jax) arrays, split over ``"data"`` by :func:`shard_batch`; ``state`` is placed with
      :func:`state_shardings` (a no-op when it already is, e.g. from :func:`shard_state` or a
      previous call); the new state keeps those shardings, the metrics are replicated.

    Raises:
      TypeError / ValueError (here): a bad mesh, rule or ``steps_per_call``.
      ValueError (each call, before compiling): the global batch not divisible by the data
        axis; a rule spec that does not divide its parameter.
    """
    fn_name = "mixjax.parallel.data_parallel"
    pure = pure_step(fn_name, step)
    mesh = check_mesh(fn_name, mesh)
    check_rules(fn_name, rules, mesh)
    steps_per_call = check_steps_per_call(fn_name, steps_per_call)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _replicated(x: jax.Array, axis_name: str) -> jax.Array:
    return x


def _replicated_fwd(x, axis_name):
    return x, None


def _replicated_bwd(axis_name, residuals, g):
    del residuals
    return (lax.pmean(g, axis_name),)


_replicated.defvjp(_replicated_fwd, _replicated_bwd)


def replica_apply(apply_fn: Callable, axis_name: str = DATA) -> Callable:
    """The model as one replica of :func:`shard_map_step` / :func:`pmap_step` runs it.

    The parameter view's gradient is averaged over ``axis_name`` (``lax.pmean`` in the backward
    pass) and the updated model state (batch statistics) is averaged too, so every replica's
    update equals the single-device update on the global batch. Build the step with it::

        step = train.make_train_step(parallel.replica_apply(apply_fn), tx, transform=t)

    Args:
      apply_fn: a :class:`mixjax.train.ApplyFn`.
      axis_name: the replica axis (``"data"``).

    Raises:
      TypeError: ``apply_fn`` not callable or ``axis_name`` not a str.
    """
    fn_name = "mixjax.parallel.replica_apply"
    if not callable(apply_fn):
        raise TypeError(f"{fn_name}: apply_fn must be callable, got {type(apply_fn).__name__}")
    if not isinstance(axis_name, str):
        raise TypeError(f"{fn_name}: axis_name must be a str, got {axis_name!r}")

    def apply(params, model_state, images, *, train, key):
        note_gradient_averaging(axis_name)
        params = jax.tree.map(lambda p: _replicated(p, axis_name), params)
        logits, model_state = apply_fn(params, model_state, images, train=train, key=key)
        if train and model_state is not None:
            model_state = mean_floats(model_state, axis_name)
        return logits, model_state

    return apply


def shard_map_step(step: Step, mesh: Mesh, *, steps_per_call: int = 1, donate: bool = True) -> Step:
    """The step as explicit per-replica SPMD code: ``jax.shard_map`` over ``"data"``.

    Each replica runs the step on its ``B / data`` examples with the whole (replicated) state;
    the step's model must be :func:`replica_apply`-wrapped so gradients are averaged.

    Args:
      step: a train step built with :func:`replica_apply` (jitted or not).
      mesh: a mesh with a ``"data"`` axis; other axes replicate the work.
      steps_per_call: the step's ``K``.
      donate: donate the state's buffers.

    Returns:
      ``step(state, batch) -> (state, metrics)`` with ``batch`` as in :func:`data_parallel`
      and the state replicated over the mesh.

    Raises:
      TypeError / ValueError: a bad mesh or ``steps_per_call`` (here); a global batch not
        divisible by the data axis (each call, before compiling); a step whose model is not
        :func:`replica_apply`-wrapped (first call, while tracing).
    """
    fn_name = "mixjax.parallel.shard_map_step"
    pure = pure_step(fn_name, step)
    mesh = check_mesh(fn_name, mesh)
    steps_per_call = check_steps_per_call(fn_name, steps_per_call)
    mapped = jax.shard_map(
        replica_body(fn_name, pure),
        mesh=mesh,
        in_specs=(PartitionSpec(), batch_spec(steps_per_call)),
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


def pmap_step(
    step: Step, *, devices: Any = None, steps_per_call: int = 1, donate: bool = True
) -> Step:
    """The step under ``jax.pmap`` over the ``"data"`` axis of ``devices``.

    Args:
      step: a train step built with :func:`replica_apply` (jitted or not).
      devices: the local devices (default all); ``n = len(devices)`` replicas.
      steps_per_call: the step's ``K``.
      donate: donate the state's buffers.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``state`` replicated (:func:`replicate`,
      leading axis ``n``), ``batch`` a dict of global ``(B, ...)`` (``(K, B, ...)``) arrays split
      into ``n`` parts of ``B / n`` examples; returns the replicated state and the averaged
      metrics of the first replica.

    Raises:
      TypeError / ValueError: as :func:`shard_map_step`, with the data axis of size ``n``.
    """
    fn_name = "mixjax.parallel.pmap_step"
    pure = pure_step(fn_name, step)
    steps_per_call = check_steps_per_call(fn_name, steps_per_call)
    devices = jax.local_devices() if devices is None else list(devices)
    n = len(devices)
    mapped = jax.pmap(
        replica_body(fn_name, pure),
        axis_name=DATA,
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
