"""The per-replica step machinery shared by :mod:`mixjax.parallel` and :mod:`mixjax.replicas`.

The wrappers of a train step ``step(state, batch) -> (state, metrics)`` (:data:`Step`) validate
their arguments with :func:`pure_step`, :func:`check_mesh` and :func:`check_steps_per_call`,
cache one compiled step per state structure under :func:`signature`, and run
:func:`replica_body` once per data-parallel replica (``jax.shard_map`` or ``jax.pmap`` over the
``"data"`` axis). :func:`replica_body` checks, while tracing, that the model averages gradients
over ``"data"`` (synchronous replicas, :func:`mixjax.parallel.replica_apply`, which reports
itself with :func:`note_gradient_averaging`) or does not (asynchronous replicas with local
gradients, :func:`mixjax.replicas.async_data_parallel`).

Internal: the public entry points are those of :mod:`mixjax.parallel` and
:mod:`mixjax.replicas`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from mixjax.mesh import DATA

__all__ = [
    "Step",
    "check_mesh",
    "check_steps_per_call",
    "mean_floats",
    "note_gradient_averaging",
    "pure_step",
    "replica_body",
    "signature",
]

Step = Callable[[Any, Mapping[str, Any]], tuple[Any, dict[str, jax.Array]]]
# Axis names a gradient-averaging model was traced under, so replica_body can tell a step whose
# gradients would silently differ between replicas from one that averages them.
_AVERAGING_TRACES: list[str] = []


def pure_step(fn_name: str, step: Any) -> Callable:
    """The pure function of a train step, unwrapped from its ``jax.jit`` if it has one.

    Args:
      fn_name: the calling function's name, for the error message.
      step: a train step ``step(state, batch) -> (state, metrics)``, jitted or not.

    Returns:
      ``step.__wrapped__`` when ``step`` is jitted, else ``step``, to be re-jitted or mapped by
      the caller.

    Raises:
      TypeError: ``step`` not callable.
    """
    if not callable(step):
        raise TypeError(f"{fn_name}: step must be callable, got {type(step).__name__}")
    return getattr(step, "__wrapped__", step)


def check_mesh(fn_name: str, mesh: Any) -> Mesh:
    """``mesh``, checked to be a :class:`jax.sharding.Mesh` with a ``"data"`` axis.

    Args:
      fn_name: the calling function's name, for the error message.
      mesh: the mesh to check (e.g. from :func:`mixjax.parallel.make_mesh`).

    Returns:
      ``mesh`` unchanged.

    Raises:
      TypeError: ``mesh`` not a ``Mesh`` or without a ``"data"`` axis.
    """
    if not isinstance(mesh, Mesh) or DATA not in mesh.shape:
        raise TypeError(
            f"{fn_name}: mesh must be a jax.sharding.Mesh with a {DATA!r} axis (see "
            f"mixjax.parallel.make_mesh), got {getattr(mesh, 'shape', type(mesh).__name__)}"
        )
    return mesh


def check_steps_per_call(fn_name: str, steps_per_call: Any) -> int:
    """``steps_per_call`` (the step's ``K``), checked to be an int ``>= 1``.

    Args:
      fn_name: the calling function's name, for the error message.
      steps_per_call: a Python or NumPy integer; ``bool`` is rejected.

    Returns:
      ``steps_per_call`` as a Python ``int``.

    Raises:
      ValueError: not an integer, a ``bool``, or ``< 1``.
    """
    if (
        isinstance(steps_per_call, bool)
        or not isinstance(steps_per_call, (int, np.integer))
        or steps_per_call < 1
    ):
        raise ValueError(f"{fn_name}: steps_per_call must be an int >= 1, got {steps_per_call!r}")
    return int(steps_per_call)


def signature(state: Any) -> tuple:
    """The key under which a wrapper caches the step it compiled for ``state``.

    Args:
      state: a pytree of arrays (a train state).

    Returns:
      ``(treedef, ((shape, dtype), ...))``: the tree structure and every leaf's shape and dtype
      (``None`` for leaves without one), in leaf order; hashable, and equal for two states
      exactly when one compiled step serves both.
    """
    leaves, treedef = jax.tree.flatten(state)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", None)) for x in leaves)


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


def note_gradient_averaging(axis_name: str) -> None:
    """Record, while tracing, that the model averages its gradients over ``axis_name``.

    Called by :func:`mixjax.parallel.replica_apply` each time its model is traced;
    :func:`replica_body` reads the records made while it traces the step.

    Args:
      axis_name: the axis the gradients are averaged over (``"data"``).
    """
    _AVERAGING_TRACES.append(axis_name)


def replica_body(fn_name: str, pure: Callable, *, local_grads: bool = False) -> Callable:
    """The per-replica step: own randomness, averaged metrics, checked gradient averaging.

    The returned ``body(state, batch) -> (state, metrics)`` runs ``pure`` on one replica of the
    ``"data"`` axis (inside ``jax.shard_map`` or ``jax.pmap``): ``state.rng`` is replaced by
    ``fold_in(state.rng, replica)`` for the step and restored afterwards, and the metrics
    (scalars) are averaged over the replicas.

    Args:
      fn_name: the wrapper's name, for the error messages.
      pure: the pure train step (:func:`pure_step`); ``batch`` is this replica's ``B / R``
        examples (``(K, B / R, ...)`` when ``steps_per_call > 1``).
      local_grads: ``False``: the model must average gradients over ``"data"``
        (:func:`mixjax.parallel.replica_apply`), so every replica takes the same update.
        ``True``: the model must *not* average them (the optimizer combines the replicas',
        :func:`mixjax.replicas.async_data_parallel`), and the floating model state is averaged
        here (:func:`mean_floats`).

    Returns:
      ``body(state, batch) -> (state, metrics)`` to map over ``"data"``.

    Raises:
      ValueError (while tracing ``body``): the model's gradient averaging does not match
        ``local_grads``.
    """

    def body(state, batch):
        start = len(_AVERAGING_TRACES)
        rng = state.rng
        local = state._replace(rng=jax.random.fold_in(rng, lax.axis_index(DATA)))
        new_state, metrics = pure(local, batch)
        averaged = DATA in _AVERAGING_TRACES[start:]
        del _AVERAGING_TRACES[start:]
        if local_grads and averaged:
            raise ValueError(
                f"{fn_name}: the model averages gradients over the {DATA!r} axis (it is "
                "replica_apply-wrapped), so replicas have no gradient of their own; pass the "
                "plain apply_fn"
            )
        if not local_grads and not averaged:
            raise ValueError(
                f"{fn_name}: the step's model does not average gradients over the {DATA!r} "
                "axis, so replicas would diverge; build the step with "
                "make_train_step(mixjax.parallel.replica_apply(apply_fn), ...)"
            )
        if local_grads and new_state.model_state is not None:
            new_state = new_state._replace(model_state=mean_floats(new_state.model_state, DATA))
        return new_state._replace(rng=rng), lax.pmean(metrics, DATA)

    return body
