"""The training state: everything one step reads and writes, and the state at step 0.

:class:`TrainState` is a pytree (donated to the jitted step); :func:`init_train_state` makes it;
:func:`trained` is the tree the optimizer trains: the parameters, with the transform's learned
state beside them where it has one (:func:`mixjax.learned_state`, e.g. LSQ step sizes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import _checks, select
from mixjax.core import ParamTransform, identity, learned_state

__all__ = ["TrainState", "check_opt_state", "init_train_state", "trained"]

_INIT = "mixjax.train.init_train_state"


class TrainState(NamedTuple):
    """Everything a training step reads and writes; a pytree (donated to the jitted step).

    Attributes:
      step: int32 scalar, the number of steps taken; the next step is step ``t = step``.
      params: the stored (float) parameters, a linen ``params`` dict or an NNX ``nnx.State``;
        they satisfy ``transform.constrain(params, transform_state) == params``.
      opt_state: the state of the user's optax transformation (e.g. a
        :class:`mixjax.delay.DelayState`) over the trained tree, :func:`trained`: ``params``, or
        ``(params, learned)`` where the transform learns part of its state (LSQ step sizes,
        :func:`mixjax.learned_state`).
      transform_state: the compression transform's state (masks, codebooks, scales).
      model_state: non-parameter model variables the forward pass updates: linen collections
        other than ``params`` (a dict, e.g. ``{"batch_stats": ...}``, ``{}`` if none) or the
        NNX non-``Param`` state (batch statistics, RNG streams); ``None`` if the model has none.
      rng: the base ``jax.random`` key (a typed key scalar or a raw ``uint32`` ``(2,)`` key); step
        ``t`` draws from ``jax.random.fold_in(rng, t)``, so the key never changes and a run
        resumed at step ``t`` draws what an uninterrupted one would.
    """

    step: jax.Array
    params: Any
    opt_state: optax.OptState
    transform_state: Any
    model_state: Any
    rng: jax.Array


def trained(params: Any, transform_state: Any) -> Any:
    """The tree the optimizer trains: ``params``, or ``(params, learned)`` when the transform
    state has learned fields (``learned = mixjax.learned_state(transform_state)``)."""
    learned = learned_state(transform_state)
    return (params, learned) if jax.tree.leaves(learned) else params


def _inexact(leaf: Any) -> bool:
    """Whether ``jax.grad`` can differentiate with respect to ``leaf`` (a float or complex)."""
    try:
        return bool(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact))
    except TypeError:  # not an array or a number
        return False


def init_train_state(
    params: Any,
    tx: optax.GradientTransformation,
    *,
    key: jax.Array,
    transform: ParamTransform | None = None,
    model_state: Any = None,
) -> TrainState:
    """The state at step 0: ``transform.init``, constrained params, ``tx.init`` of the trained
    tree (:func:`trained`).

    The returned state owns its buffers (every leaf is a fresh copy), so the train step, which
    donates them, never invalidates the caller's ``params``, ``model_state`` or ``key``.

    Args:
      params: the initial float parameters (linen ``params`` dict or NNX ``nnx.State``).
      tx: the optax transformation the train step will use.
      key: the base ``jax.random`` key of augmentation and model randomness.
      transform: the compression transform (default :func:`mixjax.identity`).
      model_state: non-parameter model variables (see :class:`TrainState`).

    Raises:
      TypeError: ``tx`` not an optax transformation, ``transform`` not a ParamTransform or
        ``key`` not a ``jax.random`` key; a leaf of ``params`` that is not floating point
        (``jax.grad`` trains inexact leaves only: integer or boolean variables that are not
        trained belong in ``model_state``), named with its path, shape and dtype.
    """
    transform = identity() if transform is None else transform
    _checks.optax_transform(_INIT, "tx", tx)
    _checks.instance(_INIT, "transform", transform, ParamTransform, "a ParamTransform")
    _checks.key(_INIT, "key", key)
    for path, leaf in select.leaves_with_paths(params):
        if not _inexact(leaf):
            raise TypeError(
                f"{_INIT}: params {select.describe(path, leaf)} is not floating point; every "
                "params leaf is trained by jax.grad, which needs float leaves (keep integer or "
                "boolean variables in model_state)"
            )
    transform_state = transform.init(params)
    params = transform.constrain(params, transform_state)
    state = TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=tx.init(trained(params, transform_state)),
        transform_state=transform_state,
        model_state=model_state,
        rng=key,
    )
    return jax.tree.map(jnp.copy, state)


def _signature(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(jnp.shape(leaf)), np.dtype(leaf.dtype)


def _param_leaf(opt_path: str, trainable: Any) -> str:
    """`` (params leaf '...' ...)`` for the trained leaf an optimizer-state path mirrors."""
    found = [
        (path, leaf)
        for path, leaf in select.leaves_with_paths(trainable)
        if opt_path == path or opt_path.endswith("/" + path)
    ]
    if not found:
        return ""
    return f" (params {select.describe(*max(found, key=lambda pl: len(pl[0])))})"


def check_opt_state(fn_name: str, tx: optax.GradientTransformation, trainable: Any, opt_state: Any):
    """Raises ``ValueError`` unless ``opt_state`` has the paths, shapes and dtypes of
    ``tx.init(trainable)`` (compared abstractly, with :func:`jax.eval_shape`: free at trace time).

    An optax state mirrors the tree it was made for (Adam's ``mu`` and ``nu`` have the params'
    paths and shapes), so a state whose params were replaced (``state._replace(params=...)``) or
    whose optimizer state was made on other params or by another ``tx`` fails here, naming the
    first leaf that differs, instead of inside ``tx.update`` with an anonymous shape error. A
    ``tx`` whose ``init`` cannot run on abstract values is not checked.
    """
    try:
        expected = jax.eval_shape(tx.init, trainable)
    except Exception:  # noqa: BLE001 - an init that needs concrete values: nothing to compare
        return
    want, got = select.leaves_with_paths(expected), select.leaves_with_paths(opt_state)
    for i in range(max(len(want), len(got))):
        w, g = (leaves[i] if i < len(leaves) else None for leaves in (want, got))
        if w is None or g is None or w[0] != g[0] or _signature(w[1]) != _signature(g[1]):
            shown = lambda pl: "no leaf" if pl is None else select.describe(*pl)
            raise ValueError(
                f"{fn_name}: state.opt_state does not match state.params: tx.init(params) has "
                f"{shown(w)} where state.opt_state has {shown(g)}"
                f"{_param_leaf((w or g)[0], trainable)}; make the state with "
                "init_train_state(params, tx) (state._replace(params=...) keeps the optimizer "
                "state of the old params)"
            )
    if jax.tree.structure(expected) != jax.tree.structure(opt_state):
        raise ValueError(
            f"{fn_name}: state.opt_state does not match tx.init(params): same leaves, but the "
            f"tree is {jax.tree.structure(opt_state)}, expected {jax.tree.structure(expected)}"
        )
