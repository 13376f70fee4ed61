"""Activation fake-quantization of Dense/Conv inputs, without rewriting the model.

:func:`activation_quant` returns an :class:`ActivationQuant` whose ``apply`` runs any model
function and quantizes the input of every Dense/Conv layer it calls (and, with ``output=True``,
the function's result), with ranges from an observer (:mod:`mixjax.quant.observers`) whose
statistics are a plain dict pytree ``{layer path: ObserverState}``:

* linen: ``nn.Dense`` and ``nn.Conv`` are intercepted with ``flax.linen.intercept_methods``
  while ``apply`` runs; paths are the module paths (``"Conv_0"``, ``"block/Dense_1"``);
* NNX: call :func:`instrument` once on the model; it gives every ``nnx.Linear`` and ``nnx.Conv``
  a ``dot_general`` / ``conv_general_dilated`` hook that quantizes the input while an ``apply``
  is running and is the plain op otherwise (paths like ``"layers/0"``).

Modes of ``apply(fn, state, *args, mode=..., **kwargs) -> (fn's output, new state)``:

* ``"train"`` (QAT): each observer folds in the batch, then the input is fake-quantized with the
  updated range;
* ``"eval"``: fake-quantize with the stored ranges; the state is returned unchanged;
* ``"calibrate"`` (PTQ): observers fold in the batch, nothing is quantized (float forward).

A layer whose observer has seen nothing yet (``count == 0``) is passed through unquantized.
Fake-quantization keeps NaN/Inf entries as they are (see :mod:`mixjax.quant.grids`). Everything is
pure: ``apply`` traces ``fn`` once and returns the new statistics, so it runs inside ``jax.jit``
and ``jax.grad`` (use ``has_aux`` for the state). ``fn`` must call the layers at the trace level
of ``apply`` (no lifted ``nn.scan``/``nn.vmap`` around quantized layers).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx

from mixjax import _checks, select
from mixjax.quant import observers
from mixjax.quant.grids import STE_RULES, Grid, fake_quantize, grid, qparams

__all__ = ["MODES", "OUTPUT", "ActivationQuant", "activation_quant", "instrument"]

OUTPUT = "__output__"
MODES = ("train", "eval", "calibrate")

_ACTIVE: contextvars.ContextVar[_Session | None] = contextvars.ContextVar(
    "mixjax_activations", default=None
)


class ActivationQuant(NamedTuple):
    """Activation quantizer from :func:`fake_quant`.

    Attributes:
      init: ``(fn, *args, **kwargs) -> {path: ObserverState}``: traces ``fn`` abstractly to find
        the quantized layers; every observer starts empty.
      apply: ``(fn, state, *args, mode="eval", **kwargs) -> (out, state)`` (module docstring).
      qparams: ``ObserverState -> (scale, zero_point)``: float32 scalars of a layer's grid.
      grid: the integer grid (:class:`mixjax.quant.Grid`).
    """

    init: Callable[..., dict[str, observers.ObserverState]]
    apply: Callable[..., tuple[Any, dict[str, observers.ObserverState]]]
    qparams: Callable[[observers.ObserverState], tuple[jax.Array, jax.Array]]
    grid: Grid


class _Session:
    """What the hooks see while one ``apply`` (or ``init``) traces the model."""

    def __init__(self, mode, state, quantize, observer, selector):
        self.mode, self.state, self.quantize = mode, state, quantize
        self.observer, self.selector = observer, selector
        self.found: list[str] = []

    def __call__(self, path: str, x: jax.Array) -> jax.Array:
        if self.mode == "discover":
            if self.selector(path, x) and path not in self.found:
                self.found.append(path)
            return x
        if path not in self.state:
            if not self.selector(path, x):
                return x
            raise ValueError(
                f"mixjax.quant.activation_quant: layer {path!r} has no observer state (the state "
                f"has {sorted(self.state)}); was it made by init on this model?"
            )
        obs = self.state[path]
        if self.mode in ("train", "calibrate"):
            obs = self.observer.update(obs, x)
            self.state[path] = obs
        return x if self.mode == "calibrate" else self.quantize(x, obs)


def _interceptor(next_fun, args, kwargs, context):
    session = _ACTIVE.get()
    module = context.module
    if (
        session is None
        or context.method_name != "__call__"
        or not isinstance(module, (nn.Dense, nn.Conv))
        or not args
    ):
        return next_fun(*args, **kwargs)
    return next_fun(session("/".join(module.path), args[0]), *args[1:], **kwargs)


@dataclasses.dataclass(frozen=True)
class _Hook:
    """An NNX layer's ``dot_general`` / ``conv_general_dilated`` that quantizes its input."""

    path: str
    inner: Callable[..., Any]

    def __call__(self, lhs, rhs, *args, **kwargs):
        session = _ACTIVE.get()
        if session is not None:
            lhs = session(self.path, lhs)
        return self.inner(lhs, rhs, *args, **kwargs)


def instrument(model: nnx.Module) -> nnx.Module:
    """Gives every ``nnx.Linear`` / ``nnx.Conv`` in ``model`` an input-quantization hook.

    Mutates ``model`` in place (idempotent) and returns it. Outside :class:`ActivationQuant`'s
    ``apply`` the hooks call the layer's own op unchanged, so the model computes what it did.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``, or a Linear uses ``dot_general_cls``.
    """
    name = "mixjax.quant.instrument"
    if not isinstance(model, nnx.Module):
        raise TypeError(f"{name}: model must be an nnx.Module, got {type(model).__name__}")
    for keys, node in nnx.iter_graph(model):
        path = "/".join(str(k) for k in keys)
        if isinstance(node, nnx.Linear):
            if getattr(node, "dot_general_cls", None) is not None:
                raise TypeError(f"{name}: Linear {path!r} uses dot_general_cls; cannot hook it")
            if not isinstance(node.dot_general, _Hook):
                node.dot_general = _Hook(path, node.dot_general or jax.lax.dot_general)
        elif isinstance(node, nnx.Conv) and not isinstance(node.conv_general_dilated, _Hook):
            node.conv_general_dilated = _Hook(path, node.conv_general_dilated)
    return model


def _run(session: _Session, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    token = _ACTIVE.set(session)
    try:
        with nn.intercept_methods(_interceptor):
            out = fn(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
    return out


def activation_quant(
    bits: int = 8,
    *,
    observer: observers.Observer | None = None,
    symmetric: bool = False,
    narrow_range: bool = False,
    ste: str = "clipped",
    where: select.Where = None,
    output: bool = False,
) -> ActivationQuant:
    """Fake-quantizes the inputs of a model's Dense/Conv layers (see the module docstring).

    Args:
      bits: grid width, 2 to 16 (8 at most for integer inference, :mod:`mixjax.export`).
      observer: range observer; default ``mixjax.quant.ema_observer(0.99)``.
      symmetric: zero point 0; default asymmetric (an integer zero point, TFMOT's default).
      narrow_range: ``[-qmax, qmax]`` grid instead of ``[-qmax - 1, qmax]``.
      ste: ``"clipped"`` (no gradient beyond the range) or ``"identity"``.
      where: which layers: ``None`` (all), a regex on the layer path, or a predicate
        ``(path, x) -> bool`` given the layer's input (as in :mod:`mixjax.select`).
      output: also quantize ``fn``'s result (an array), under the key ``"__output__"``.

    Example::

        act = mixjax.quant.activation_quant(8)
        act_state = act.init(lambda x: model.apply(variables, x), x)
        logits, act_state = act.apply(lambda x: model.apply(variables, x), act_state, x,
                                      mode="train")

    Raises:
      TypeError / ValueError: bad ``bits``, ``ste``, ``observer`` or ``where``.
    """
    name = "mixjax.quant.activation_quant"
    g = grid(bits, narrow_range=narrow_range, fn_name=name)
    _checks.choice(name, "ste", ste, STE_RULES)
    symmetric = _checks.boolean(name, "symmetric", symmetric)
    output = _checks.boolean(name, "output", output)
    if observer is None:
        observer = observers.ema_observer(0.99)
    _checks.instance(name, "observer", observer, observers.Observer, "a mixjax.quant.Observer")
    selector = (lambda path, x: True) if where is None else select.as_selector(where)

    def layer_qparams(obs):
        return qparams(obs.min, obs.max, g, symmetric=symmetric)

    def quantize(x, obs):
        scale, zero_point = layer_qparams(obs)
        y = fake_quantize(x, scale, zero_point, g, ste=ste)
        return jax.numpy.where(obs.count > 0, y, x)

    def init_fn(fn, *args, **kwargs):
        session = _Session("discover", None, quantize, observer, selector)
        jax.eval_shape(lambda a, k: _run(session, fn, a, k), args, kwargs)
        paths = session.found + ([OUTPUT] if output else [])
        if not session.found:
            raise ValueError(
                f"{name}: init found no Dense/Conv layer to quantize (where={where!r}); for an "
                "NNX model call mixjax.quant.instrument(model) first"
            )
        return {path: observer.init() for path in paths}

    def apply_fn(fn, state, *args, mode="eval", **kwargs):
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES}, got mode={mode!r}")
        if not isinstance(state, dict):
            raise TypeError(
                f"{name}: state must be the dict made by init, got {type(state).__name__}"
            )
        session = _Session(mode, dict(state), quantize, observer, selector)
        out = _run(session, fn, args, kwargs)
        if output:
            if OUTPUT not in state:
                raise ValueError(f"{name}: output=True but the state has no {OUTPUT!r} entry")
            if not select.is_floating(out):
                raise TypeError(
                    f"{name}: output=True needs fn to return a float array, got "
                    f"{type(out).__name__}"
                )
            out = session(OUTPUT, out)
        return out, session.state

    return ActivationQuant(init_fn, apply_fn, layer_qparams, g)
