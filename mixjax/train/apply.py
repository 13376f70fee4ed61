"""Model adapters: the :class:`ApplyFn` interface of the training step, for linen and NNX models.

The step calls the model as ``apply_fn(params, model_state, images, *, train, key) -> (logits,
model_state)`` (:class:`ApplyFn`); :func:`linen_apply` and :func:`nnx_apply` adapt a Flax linen
module and an NNX graphdef::

    # linen
    variables = module.init(key, images)
    params = variables.pop("params")               # variables: the rest, e.g. batch_stats
    apply_fn = mixjax.train.linen_apply(module)
    # NNX
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    apply_fn = mixjax.train.nnx_apply(graphdef)
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
from flax import nnx

from mixjax import _checks

__all__ = ["ApplyFn", "linen_apply", "nnx_apply"]

_LINEN = "mixjax.train.linen_apply"
_NNX = "mixjax.train.nnx_apply"


class ApplyFn(Protocol):
    """The model interface: ``(params, model_state, images, *, train, key) -> (logits, state)``.

    ``params`` is the (compressed) parameter view, ``images`` a ``(B, ...)`` batch, ``train``
    a static bool (dropout on, batch statistics updated), ``key`` a ``jax.random`` key for the
    model's randomness. Returns ``(B, num_classes)`` logits and the new ``model_state`` (of the
    same structure; returned unchanged when ``train=False``).

    Activation quantization fits as model state, the observers' statistics::

        act = mixjax.quant.activation_quant(8)
        base = mixjax.train.linen_apply(module)

        def apply_fn(params, act_state, images, *, train, key):
            fn = lambda x: base(params, None, x, train=train, key=key)[0]
            return act.apply(fn, act_state, images, mode="train" if train else "eval")

        model_state = act.init(lambda x: module.apply({"params": params}, x), images)
    """

    def __call__(
        self, params: Any, model_state: Any, images: jax.Array, *, train: bool, key: jax.Array
    ) -> tuple[jax.Array, Any]: ...


def linen_apply(
    module: nn.Module, *, train_kwarg: str | None = None, rng_stream: str = "dropout"
) -> ApplyFn:
    """The :class:`ApplyFn` of a linen module: ``module.apply({"params": params, **state}, x)``.

    ``model_state`` is the dict of the module's other variable collections (``{}`` if none); in
    training every one of them is mutable and returned updated (batch statistics).

    Args:
      module: the linen module.
      train_kwarg: the module's ``__call__`` keyword that switches training behaviour (e.g.
        ``"train"``), passed ``train``; ``None`` when the module takes none.
      rng_stream: the RNG collection that gets ``key`` in training (dropout's ``"dropout"``).

    Raises:
      TypeError: ``module`` is not a linen module.
    """
    _checks.instance(_LINEN, "module", module, nn.Module, "a flax.linen Module")

    def apply(params, model_state, images, *, train, key):
        variables = {"params": params, **(model_state or {})}
        kwargs = {} if train_kwarg is None else {train_kwarg: train}
        if not train:
            return module.apply(variables, images, **kwargs), model_state
        rngs = {rng_stream: key}
        if not model_state:
            return module.apply(variables, images, rngs=rngs, **kwargs), model_state
        logits, updated = module.apply(
            variables, images, rngs=rngs, mutable=list(model_state), **kwargs
        )
        return logits, {**model_state, **updated}

    return apply


def nnx_apply(graphdef: nnx.GraphDef, *, rng_stream: str = "dropout") -> ApplyFn:
    """The :class:`ApplyFn` of an NNX model split as ``nnx.split(model, nnx.Param, ...)``.

    Each call merges ``graphdef`` with the parameter view and ``model_state`` (the non-``Param``
    state; ``None`` or an empty state if the model has none), switches the copy to
    ``train()``/``eval()`` mode, reseeds its ``rng_stream`` streams with ``key`` in training and
    returns the new non-``Param`` state.

    Raises:
      TypeError: ``graphdef`` is not an NNX ``GraphDef``.
    """
    expected = "an nnx.GraphDef (from nnx.split(model, nnx.Param, ...))"
    _checks.instance(_NNX, "graphdef", graphdef, nnx.GraphDef, expected)

    def apply(params, model_state, images, *, train, key):
        # copy=True: fresh Variables at this trace level, which reseed and BatchNorm may mutate
        # (merging the caller's Variables inside jax.grad would mutate them across traces).
        states = () if model_state is None else (model_state,)
        model = nnx.merge(graphdef, params, *states, copy=True)
        if train:
            model.train()
            nnx.reseed(model, **{rng_stream: key})
        else:
            model.eval()
        logits = model(images)
        if model_state is None or not train:
            return logits, model_state
        return logits, nnx.state(model, nnx.Not(nnx.Param))

    return apply
