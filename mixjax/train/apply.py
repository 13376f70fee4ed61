"""Model adapters: the :class:`ApplyFn` interface of the training step, for linen and NNX models.

The step calls the model as ``apply_fn(params, model_state, x, *, train, key) -> (logits,
model_state)`` (:class:`ApplyFn`); :func:`linen_apply` and :func:`nnx_apply` adapt a Flax linen
module and an NNX graphdef::

    # linen
    variables = module.init(key, x)
    params = variables.pop("params")               # variables: the rest, e.g. batch_stats
    apply_fn = mixjax.train.linen_apply(module, train_kwarg="train")
    # NNX
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    apply_fn = mixjax.train.nnx_apply(graphdef)

Randomness: the step passes one key per step; each named RNG stream gets its own key from it,
``stream_keys(key, streams)[name] = fold_in(key, crc32(name))``, so a stream's draws depend on
the step's key and its name only (adding a stream changes no other stream's draws).
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from mixjax import _checks

__all__ = ["ApplyFn", "linen_apply", "nnx_apply", "stream_keys"]

_LINEN = "mixjax.train.linen_apply"
_NNX = "mixjax.train.nnx_apply"
_DEFAULT = "default"


class ApplyFn(Protocol):
    """The model interface: ``(params, model_state, x, *, train, key) -> (logits, state)``.

    ``params`` is the (compressed) parameter view, ``x`` the batch's input (``(B, ...)``
    images or ``(B, L)`` tokens), ``train`` a static bool (dropout on, batch statistics
    updated), ``key`` a ``jax.random`` key for the model's randomness. Returns ``(..., V)``
    logits (``(B, C)`` or ``(B, L, V)``) and the new ``model_state`` (of the same structure;
    returned unchanged when ``train=False``).

    Activation quantization fits as model state, the observers' statistics:
    :func:`mixjax.quant.quantized_apply` wraps an ``ApplyFn`` so that the observers and the
    model's own state (batch statistics) both live in the model state and survive the step::

        act = mixjax.quant.activation_quant(8)
        base = mixjax.train.linen_apply(module, train_kwarg="train")
        qat = mixjax.quant.quantized_apply(base, act)

        variables = module.init(key, x)
        params = variables.pop("params")               # variables: {"batch_stats": ...}
        model_state = qat.init(params, variables, x)   # {"act": observers, "model": variables}
        apply_fn = qat.apply
    """

    def __call__(
        self, params: Any, model_state: Any, x: jax.Array, *, train: bool, key: jax.Array
    ) -> tuple[jax.Array, Any]: ...


def stream_keys(key: jax.Array, streams: Sequence[str]) -> dict[str, jax.Array]:
    """One key per RNG stream: ``{name: fold_in(key, crc32(name))}``.

    The adapters draw every stream's key this way (:func:`linen_apply`, :func:`nnx_apply`), so
    a stream's draws depend only on the step's key and the stream's name.

    Args:
      key: a ``jax.random`` key (typed or raw).
      streams: stream names.

    Returns:
      A dict from each name to its key.
    """
    return {s: jax.random.fold_in(key, np.uint32(zlib.crc32(s.encode()))) for s in streams}


def _check_streams(fn_name: str, rng_streams: Any) -> tuple[str, ...]:
    if isinstance(rng_streams, str) or not isinstance(rng_streams, (tuple, list)):
        raise TypeError(
            f"{fn_name}: rng_streams must be a tuple of stream names (str), got "
            f"rng_streams={rng_streams!r}"
        )
    for name in rng_streams:
        if not isinstance(name, str) or not name:
            raise TypeError(
                f"{fn_name}: rng_streams must be a tuple of non-empty str, got "
                f"rng_streams={tuple(rng_streams)!r}"
            )
    if len(set(rng_streams)) != len(rng_streams):
        raise ValueError(
            f"{fn_name}: rng_streams must not repeat a name, got rng_streams={tuple(rng_streams)!r}"
        )
    return tuple(rng_streams)


def _check_kwarg(fn_name: str, name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.isidentifier()):
        raise TypeError(f"{fn_name}: {name} must be None or a keyword name, got {name}={value!r}")


def linen_apply(
    module: nn.Module,
    *,
    train_kwarg: str | None = None,
    rng_streams: Sequence[str] = ("dropout",),
    eval_module: nn.Module | None = None,
) -> ApplyFn:
    """The :class:`ApplyFn` of a linen module: ``module.apply({"params": params, **state}, x)``.

    ``model_state`` is the dict of the module's other variable collections (``{}`` or ``None``
    if none); in training every one of them is mutable and returned updated (batch
    statistics). A BatchNorm with ``axis_name`` needs that axis bound: run the step under a
    :mod:`mixjax.parallel` wrapper with the same ``axis_name``.

    Args:
      module: the linen module, applied in training.
      train_kwarg: the module's ``__call__`` keyword that switches training behaviour (e.g.
        ``"train"``), passed ``train``; ``None`` when the module takes none.
      rng_streams: the RNG collections the module draws from in training (dropout's
        ``"dropout"``; e.g. ``("dropout", "noise")``), each given its own key
        (:func:`stream_keys`). In evaluation the module gets no RNGs.
      eval_module: the module applied when ``train=False`` (default ``module``), for a module
        whose training behaviour is a config field rather than a call keyword:
        ``linen_apply(module, eval_module=module.clone(deterministic=True))``. It must use
        the same variables as ``module``.

    Raises:
      TypeError: ``module`` or ``eval_module`` is not a linen module, ``train_kwarg`` not a
        keyword name, ``rng_streams`` not a tuple of non-empty str.
      ValueError: ``rng_streams`` repeats a name.
    """
    _checks.instance(_LINEN, "module", module, nn.Module, "a flax.linen Module")
    if eval_module is not None:
        _checks.instance(_LINEN, "eval_module", eval_module, nn.Module, "None or a linen Module")
    _check_kwarg(_LINEN, "train_kwarg", train_kwarg)
    streams = _check_streams(_LINEN, rng_streams)
    evaluated = module if eval_module is None else eval_module

    def apply(params, model_state, x, *, train, key):
        variables = {"params": params, **(model_state or {})}
        kwargs = {} if train_kwarg is None else {train_kwarg: train}
        if not train:
            return evaluated.apply(variables, x, **kwargs), model_state
        rngs = stream_keys(key, streams)
        if not model_state:
            return module.apply(variables, x, rngs=rngs, **kwargs), model_state
        logits, updated = module.apply(variables, x, rngs=rngs, mutable=list(model_state), **kwargs)
        return logits, {**model_state, **updated}

    return apply


def _model_class(graphdef: nnx.GraphDef) -> type | None:
    nodes = getattr(graphdef, "nodes", None)
    cls = getattr(nodes[0], "type", None) if nodes else None
    return cls if isinstance(cls, type) else None


def _requires(cls: type | None, name: str) -> bool:
    """Whether ``cls.__call__`` has a parameter ``name`` without a default."""
    try:
        parameter = inspect.signature(cls.__call__).parameters.get(name)
    except (TypeError, ValueError, AttributeError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


def nnx_apply(
    graphdef: nnx.GraphDef,
    *,
    rng_streams: Sequence[str] = ("dropout",),
    rngs_kwarg: str | None = None,
) -> ApplyFn:
    """The :class:`ApplyFn` of an NNX model split as ``nnx.split(model, nnx.Param, ...)``.

    Each call merges ``graphdef`` with the parameter view and ``model_state`` (the non-``Param``
    state; ``None`` or an empty state if the model has none) into a fresh copy and switches it
    to ``train()`` or ``eval()`` mode (dropout off, running statistics used). In training it
    reseeds the model's RNG streams tagged with a name of ``rng_streams`` and those tagged
    ``"default"`` (what ``nnx.Dropout(rate, rngs=nnx.Rngs(0))`` draws from: a model built with
    one seed has its dropout stream tagged ``"default"``), each with its own key
    (:func:`stream_keys`), and returns the new non-``Param`` state.

    Args:
      graphdef: the model's graph definition.
      rng_streams: the stream names to reseed each training step (besides ``"default"``).
      rngs_kwarg: the model's ``__call__`` keyword that takes an ``nnx.Rngs`` (usually
        ``"rngs"``), for models called as ``model(x, rngs=rngs)``; the adapter passes
        ``nnx.Rngs`` of the ``rng_streams`` and ``"default"`` (the fallback of any other name),
        keyed from the step's key, in training and evaluation (in ``eval()`` mode dropout
        ignores it). ``None``: the model is called as ``model(x)``.

    Raises:
      TypeError: ``graphdef`` is not an NNX ``GraphDef``; bad ``rng_streams`` or
        ``rngs_kwarg``; ``rngs_kwarg=None`` for a model whose ``__call__`` requires ``rngs``.
      ValueError: ``rng_streams`` repeats a name.
    """
    expected = "an nnx.GraphDef (from nnx.split(model, nnx.Param, ...))"
    _checks.instance(_NNX, "graphdef", graphdef, nnx.GraphDef, expected)
    streams = _check_streams(_NNX, rng_streams)
    _check_kwarg(_NNX, "rngs_kwarg", rngs_kwarg)
    cls = _model_class(graphdef)
    if rngs_kwarg is None and _requires(cls, "rngs"):
        raise TypeError(
            f"{_NNX}: {cls.__name__}.__call__ requires an 'rngs' argument; pass "
            "rngs_kwarg='rngs' so the adapter calls model(x, rngs=nnx.Rngs(...))"
        )
    named = streams if _DEFAULT in streams else (*streams, _DEFAULT)

    def apply(params, model_state, x, *, train, key):
        # copy=True: fresh Variables at this trace level, which reseed and BatchNorm may mutate
        # (merging the caller's Variables inside jax.grad would mutate them across traces).
        states = () if model_state is None else (model_state,)
        model = nnx.merge(graphdef, params, *states, copy=True)
        keys = stream_keys(key, named)
        if train:
            model.train()
            nnx.reseed(model, **keys)
        else:
            model.eval()
        kwargs = {} if rngs_kwarg is None else {rngs_kwarg: nnx.Rngs(**keys)}
        logits = model(x, **kwargs)
        if model_state is None or not train:
            return logits, model_state
        return logits, nnx.state(model, nnx.Not(nnx.Param))

    return apply
