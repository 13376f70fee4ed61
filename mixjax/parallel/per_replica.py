"""The per-replica step machinery of the data-parallel wrappers, synchronous and asynchronous.

A train step (:class:`mixjax.train.TrainStep`) runs once per data-parallel replica under
``jax.shard_map`` or ``jax.pmap`` over the ``"data"`` axis. Whether its replicas stay in step is
decided by the model it was built with, known before anything is traced:

* synchronous replicas (:func:`mixjax.parallel.shard_map_step`, :func:`mixjax.parallel.pmap_step`)
  need a :func:`replica_apply` model, whose backward pass averages the gradients over the
  replicas, so every replica takes the same update;
* asynchronous replicas (:func:`mixjax.delay.async_data_parallel`) need a plain model: each
  replica keeps its own gradient and the optimizer combines them.

:func:`check_train_step` checks that (and that the step is a ``TrainStep``), :func:`replica_body`
gives each replica its own randomness and averages the metrics, and :func:`signature` keys the
compiled steps a wrapper caches per state structure, and :func:`per_replica_step` is the
``shard_map`` + ``jit`` + cache of the wrappers whose replicas keep state of their own. The
replica axis is ``"data"`` unless the
model's collectives use another name (a BatchNorm's ``axis_name``): the synchronous wrappers
take ``axis_name=`` (:func:`check_axis_name`), and ``replica_apply`` must average over it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixjax import _checks
from mixjax.parallel.mesh import DATA, put, shard_batch
from mixjax.train.apply import ApplyFn
from mixjax.train.step import Step, TrainStep

__all__ = [
    "ReplicaApply",
    "check_axis_name",
    "check_mesh",
    "check_train_step",
    "mean_floats",
    "per_replica_step",
    "renamed_mesh",
    "replica_apply",
    "replica_batch_spec",
    "replica_body",
    "signature",
]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _replicated(x: jax.Array, axis_name: str) -> jax.Array:
    return x


def _replicated_fwd(x, axis_name):
    return x, None


def _replicated_bwd(axis_name, residuals, g):
    del residuals
    return (lax.pmean(g, axis_name),)


_replicated.defvjp(_replicated_fwd, _replicated_bwd)


def mean_floats(tree: Any, axis_name: str) -> Any:
    """The floating leaves averaged over the replicas (batch statistics); others as they are.

    Args:
      tree: a pytree of per-replica arrays (any shapes), inside ``shard_map``/``pmap``.
      axis_name: the replica axis to average over (``lax.pmean``).

    Returns:
      ``tree`` with every floating-dtype leaf replaced by its mean over ``axis_name`` (same
      shape and dtype); integer and boolean leaves (counters) unchanged.
    """
    return jax.tree.map(
        lambda x: lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


@dataclasses.dataclass(frozen=True)
class ReplicaApply:
    """A model run as one synchronous replica: see :func:`replica_apply`.

    Attributes:
      apply_fn: the wrapped :class:`mixjax.train.ApplyFn`.
      axis_name: the replica axis its gradients and batch statistics are averaged over.
    """

    apply_fn: ApplyFn
    axis_name: str

    def __call__(self, params, model_state, images, *, train, key):
        params = jax.tree.map(lambda p: _replicated(p, self.axis_name), params)
        logits, model_state = self.apply_fn(params, model_state, images, train=train, key=key)
        if train and model_state is not None:
            model_state = mean_floats(model_state, self.axis_name)
        return logits, model_state


def replica_apply(apply_fn: ApplyFn, axis_name: str = DATA) -> ReplicaApply:
    """The model as one replica of :func:`mixjax.parallel.shard_map_step` / ``pmap_step`` runs it.

    The parameter view's gradient is averaged over ``axis_name`` (``lax.pmean`` in the backward
    pass) and the updated model state (batch statistics) is averaged too, so every replica's
    update equals the single-device update on the global batch, for a model whose forward pass
    is per example. A BatchNorm normalizes with its replica's statistics unless it has an
    ``axis_name``: give it one, and this and the wrapper the same, to normalize with the global
    batch's (synchronized BatchNorm). Build the step with it::

        step = train.make_train_step(parallel.replica_apply(apply_fn), tx, transform=t)

    Args:
      apply_fn: a :class:`mixjax.train.ApplyFn`.
      axis_name: the replica axis: ``"data"``, or the name the model's own collectives use
        (a BatchNorm's ``axis_name``), passed as ``axis_name=`` to the wrapper too.

    Raises:
      TypeError: ``apply_fn`` not callable or ``axis_name`` not a str.
    """
    fn_name = "mixjax.parallel.replica_apply"
    _checks.callable_or_none(fn_name, "apply_fn", apply_fn, optional=False)
    _checks.instance(fn_name, "axis_name", axis_name, str, "a str")
    return ReplicaApply(apply_fn, axis_name)


def check_mesh(fn_name: str, mesh: Any) -> Mesh:
    """``mesh``, checked to be a :class:`jax.sharding.Mesh` with a ``"data"`` axis.

    Raises:
      TypeError: ``mesh`` not a ``Mesh`` or without a ``"data"`` axis.
    """
    if not isinstance(mesh, Mesh) or DATA not in mesh.shape:
        raise TypeError(
            f"{fn_name}: mesh must be a jax.sharding.Mesh with a {DATA!r} axis (see "
            f"mixjax.parallel.make_mesh), got {getattr(mesh, 'shape', type(mesh).__name__)}"
        )
    return mesh


def check_axis_name(fn_name: str, axis_name: Any, mesh: Mesh | None = None) -> str:
    """``axis_name``, checked to be a non-empty str that, on ``mesh``, can name its data axis.

    Raises:
      TypeError: ``axis_name`` not a non-empty str.
      ValueError: ``axis_name`` names another axis of ``mesh`` (e.g. ``"model"``).
    """
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(
            f"{fn_name}: axis_name must be a non-empty str (the axis name the model's "
            f"collectives use, e.g. a BatchNorm's axis_name), got axis_name={axis_name!r}"
        )
    if mesh is not None and axis_name != DATA and axis_name in mesh.shape:
        raise ValueError(
            f"{fn_name}: axis_name={axis_name!r} is another axis of the mesh (axes "
            f"{tuple(mesh.axis_names)}); it names the {DATA!r} axis the batch is split over"
        )
    return axis_name


def check_train_step(
    fn_name: str, step: Any, *, local_grads: bool, axis_name: str = DATA
) -> TrainStep:
    """``step``, checked to be a :class:`mixjax.train.TrainStep` whose model fits the wrapper.

    Args:
      fn_name: the wrapper's name, for the messages.
      step: what the user passed.
      local_grads: ``False`` for synchronous replicas: the model must be a
        :func:`replica_apply` over ``axis_name``; ``True`` for asynchronous ones: it must not
        be.
      axis_name: the replica axis's name (the data axis, ``"data"``, or the model's own name).

    Raises:
      TypeError: ``step`` is not a ``TrainStep``.
      ValueError: its model's gradient averaging does not fit ``local_grads``.
    """
    _checks.instance(
        fn_name, "step", step, TrainStep, "a mixjax.train.TrainStep (from make_train_step)"
    )
    model = step.apply_fn
    averages = isinstance(model, ReplicaApply) and model.axis_name == axis_name
    if local_grads and isinstance(model, ReplicaApply):
        raise ValueError(
            f"{fn_name}: the model averages gradients over the {model.axis_name!r} axis (it is "
            "replica_apply-wrapped), so replicas have no gradient of their own; pass the "
            "plain apply_fn"
        )
    if not local_grads and not averages:
        found = (
            f"a replica_apply over {model.axis_name!r}"
            if isinstance(model, ReplicaApply)
            else f"a plain {type(model).__name__}"
        )
        args = "apply_fn" if axis_name == DATA else f"apply_fn, {axis_name!r}"
        raise ValueError(
            f"{fn_name}: the step's model must average gradients over the {axis_name!r} axis, "
            f"or replicas would diverge; got {found}: build the step with "
            f"make_train_step(mixjax.parallel.replica_apply({args}), ...)"
        )
    return step


def signature(state: Any) -> tuple:
    """The key under which a wrapper caches the step it compiled for ``state``.

    Returns:
      ``(treedef, ((shape, dtype), ...))``: the tree structure and every leaf's shape and dtype
      (``None`` for leaves without one), in leaf order; hashable, and equal for two states
      exactly when one compiled step serves both.
    """
    leaves, treedef = jax.tree.flatten(state)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", None)) for x in leaves)


def replica_body(pure: Callable, *, local_grads: bool = False, axis_name: str = DATA) -> Callable:
    """The per-replica step: own randomness, averaged metrics.

    The returned ``body(state, batch) -> (state, metrics)`` runs ``pure`` on one replica of the
    ``axis_name`` axis (inside ``jax.shard_map`` or ``jax.pmap``): ``state.rng`` is replaced by
    ``fold_in(state.rng, replica)`` for the step and restored afterwards, and the metrics are
    averaged over the replicas.

    Args:
      pure: the pure train step (:attr:`mixjax.train.TrainStep.pure`); ``batch`` is this
        replica's ``B / R`` examples (``(K, B / R, ...)`` when ``steps_per_call > 1``).
      local_grads: the replicas keep their own gradients (asynchronous replicas); the floating
        model state (batch statistics) is then averaged here (:func:`mean_floats`).
      axis_name: the replica axis (``"data"``, or the name the model's collectives use).

    Returns:
      ``body(state, batch) -> (state, metrics)`` to map over ``axis_name``.
    """

    def body(state, batch):
        rng = state.rng
        local = state._replace(rng=jax.random.fold_in(rng, lax.axis_index(axis_name)))
        new_state, metrics = pure(local, batch)
        if local_grads and new_state.model_state is not None:
            new_state = new_state._replace(
                model_state=mean_floats(new_state.model_state, axis_name)
            )
        return new_state._replace(rng=rng), lax.pmean(metrics, axis_name)

    return body


def renamed_mesh(mesh: Mesh, axis_name: str) -> Mesh:
    """``mesh`` with its ``"data"`` axis called ``axis_name`` (same devices, same layout)."""
    if axis_name == DATA:
        return mesh
    names = tuple(axis_name if n == DATA else n for n in mesh.axis_names)
    return Mesh(mesh.devices, names, axis_types=mesh.axis_types)


def replica_batch_spec(steps_per_call: int, axis_name: str) -> PartitionSpec:
    """The batch's spec inside the step: examples (axis 1 when ``steps_per_call > 1``) split
    over ``axis_name``."""
    return PartitionSpec(axis_name) if steps_per_call == 1 else PartitionSpec(None, axis_name)


def per_replica_step(
    body: Callable,
    mesh: Mesh,
    *,
    specs: Callable[[Any, str], Any],
    check_state: Callable[[Any], None],
    steps_per_call: int,
    donate: bool,
    axis_name: str,
) -> Step:
    """``body`` mapped over the replicas with ``jax.shard_map``, jitted once per state structure.

    Args:
      body: ``body(state, batch) -> (state, metrics)`` for one replica (:func:`replica_body`),
        its state blocks as ``specs`` splits them, its metrics replicated.
      mesh: the caller's mesh; inside the step its ``"data"`` axis is called ``axis_name``.
      specs: ``specs(state, name)``: the ``PartitionSpec`` tree of the state with the replica
        axis called ``name`` (the step uses ``axis_name`` inside and ``"data"`` for the state's
        shardings on ``mesh``, so the next call's placement is a no-op).
      check_state: raises for a state the step cannot run, called before compiling for it.
      steps_per_call: the batch's leading step axis (``K > 1``) or none (``K = 1``).
      donate: donate the state's buffers.
      axis_name: the replica axis's name inside the step.

    Returns:
      ``step(state, batch) -> (state, metrics)``: ``batch`` this process's part, split over
      ``"data"`` by :func:`mixjax.parallel.shard_batch`.
    """
    inner_mesh = renamed_mesh(mesh, axis_name)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    compiled: dict[tuple, tuple[Any, Callable]] = {}

    def wrapped(state, batch):
        key = signature(state)
        if key not in compiled:
            check_state(state)
            inner = specs(state, axis_name)
            mapped = jax.shard_map(
                body,
                mesh=inner_mesh,
                in_specs=(inner, replica_batch_spec(steps_per_call, axis_name)),
                out_specs=(inner, PartitionSpec()),
                check_vma=False,
            )
            shardings = jax.tree.map(
                lambda s: NamedSharding(mesh, s), specs(state, DATA), is_leaf=is_spec
            )
            out = (shardings, NamedSharding(mesh, PartitionSpec()))
            jitted = jax.jit(mapped, out_shardings=out, donate_argnums=(0,) if donate else ())
            compiled[key] = (shardings, jitted)
        shardings, jitted = compiled[key]
        batch = shard_batch(batch, mesh, steps_per_call=steps_per_call)
        return jitted(put(state, shardings), batch)

    return wrapped
