"""The training state: everything one step reads and writes, and the state at step 0.

:class:`TrainState` is a pytree (donated to the jitted step); :func:`init_train_state` makes it;
:func:`trained` is the tree the optimizer trains: the parameters, with the transform's learned
state beside them where it has one (:func:`mixjax.learned_state`, e.g. LSQ step sizes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mixjax import _checks
from mixjax.core import ParamTransform, identity, learned_state

__all__ = ["TrainState", "init_train_state", "trained"]

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
        ``key`` not a ``jax.random`` key.
    """
    transform = identity() if transform is None else transform
    _checks.optax_transform(_INIT, "tx", tx)
    _checks.instance(_INIT, "transform", transform, ParamTransform, "a ParamTransform")
    _checks.key(_INIT, "key", key)
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
