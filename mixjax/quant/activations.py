"""Activation fake-quantization at every matmul and convolution of a model's parameters.

:func:`activation_quant` returns an :class:`ActivationQuant` whose ``apply`` runs a model
function ``fn(params, *args)`` and fake-quantizes the activation operand of every
``dot_general`` / ``conv_general_dilated`` that consumes a parameter (and, with ``output=True``,
the function's result). The layers are found in the model's jaxpr, not by module type
(:mod:`mixjax._intercept`): linen ``Dense``, ``DenseGeneral`` (attention projections),
``Conv``, ``Embed.attend`` (a tied decode), NNX ``Linear``, ``Einsum``, ``Conv``, or a
hand-written ``x @ w``, alike. Each such *site* is named by the parameter's path
(``"Dense_0/kernel"``, ``"layers/0/kernel"``; ``"embed/embedding@1"`` for a leaf's second use)
and has one per-tensor range, an observer's statistics (:mod:`mixjax.quant.observers`); the
state is the plain dict ``{site: ObserverState}``. Matmuls between two activations (attention
scores) and table lookups are not quantized.

Modes of ``apply(fn, state, params, *args, mode=...) -> (fn's output, new state)``:

* ``"train"`` (QAT): each observer folds in the batch, then the input is fake-quantized with the
  updated range;
* ``"eval"``: fake-quantize with the stored ranges; the state is returned unchanged;
* ``"calibrate"`` (PTQ): observers fold in the batch, nothing is quantized (float forward).

A site whose observer has seen nothing yet (``count == 0``) is passed through unquantized.
Fake-quantization keeps NaN/Inf entries as they are (see :mod:`mixjax.quant.grids`). Everything is
pure: ``apply`` evaluates ``fn``'s jaxpr at the caller's trace level and returns the new
statistics, so it runs inside ``jax.jit`` and ``jax.grad`` (use ``has_aux`` for the state).
Parameters consumed inside ``scan``/``while``/``cond`` or a custom derivative rule cannot be
reached; ``init`` warns naming them.

:func:`quantized_apply` wraps a training-step model (:class:`mixjax.train.ApplyFn`) so the
observers live in the model state beside the model's own (batch statistics).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from mixjax import _checks, _intercept, select
from mixjax.quant import observers
from mixjax.quant.grids import STE_RULES, Grid, fake_quantize, grid, qparams

__all__ = [
    "MODES",
    "OUTPUT",
    "ActivationQuant",
    "QuantizedApply",
    "activation_quant",
    "quantized_apply",
    "output_array",
    "quantized_operand",
]

OUTPUT = "__output__"
MODES = ("train", "eval", "calibrate")
_NAME = "mixjax.quant.activation_quant"


class ActivationQuant(NamedTuple):
    """Activation quantizer from :func:`activation_quant`.

    Attributes:
      init: ``(fn, params, *args) -> {site: ObserverState}``: traces ``fn(params, *args)``
        abstractly to find the quantized sites; every observer starts empty.
      apply: ``(fn, state, params, *args, mode="eval") -> (out, state)`` (module docstring).
      qparams: ``ObserverState -> (scale, zero_point)``: float32 scalars of a site's grid.
      grid: the integer grid (:class:`mixjax.quant.Grid`).
    """

    init: Callable[..., dict[str, observers.ObserverState]]
    apply: Callable[..., tuple[Any, dict[str, observers.ObserverState]]]
    qparams: Callable[[observers.ObserverState], tuple[jax.Array, jax.Array]]
    grid: Grid


def quantized_operand(site: _intercept.Site, invals: list[Any]) -> int | None:
    """The index of the activation operand of a matmul/conv site when it is a float array
    (the one activation quantization quantizes), else ``None`` (lookups, integer inputs)."""
    if site.kind == "embedding":
        return None
    k = 1 - site.weight
    return k if select.is_floating(invals[k]) else None


class _Session:
    """The rewrite of one ``init`` (``mode == "discover"``) or ``apply``."""

    def __init__(self, mode, state, quantize, observer, selector):
        self.mode, self.state, self.quantize = mode, state, quantize
        self.observer, self.selector = observer, selector
        self.found: list[str] = []

    def __call__(self, site: _intercept.Site, invals: list[Any]) -> list[Any] | None:
        k = quantized_operand(site, invals)
        if k is None:
            return None
        x = self.observe(site.name, invals[k])
        if x is invals[k]:
            return None
        return _intercept.bind(site.eqn, [*invals[:k], x, *invals[k + 1 :]])

    def observe(self, name: str, x: jax.Array) -> jax.Array:
        if self.mode == "discover":
            if self.selector(name, x) and name not in self.found:
                self.found.append(name)
            return x
        if name not in self.state:
            if not self.selector(name, x):
                return x
            raise ValueError(
                f"{_NAME}: site {name!r} has no observer state (the state has "
                f"{sorted(self.state)}); was it made by init on this model?"
            )
        obs = self.state[name]
        if self.mode in ("train", "calibrate"):
            obs = self.observer.update(obs, x)
            self.state[name] = obs
        return x if self.mode == "calibrate" else self.quantize(x, obs)


def output_array(out: Any) -> jax.Array:
    """The array ``output=True`` quantizes: ``out`` itself, or its first element when ``fn``
    returns ``(logits, model_state)`` as a training-step model does."""
    return out[0] if isinstance(out, tuple) and out else out


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
    """Fake-quantizes the inputs of a model's matmuls and convolutions (module docstring).

    Args:
      bits: grid width, 2 to 16 (8 at most for integer inference, :mod:`mixjax.export`).
      observer: range observer; default ``mixjax.quant.ema_observer(0.99)``.
      symmetric: zero point 0; default asymmetric (an integer zero point, TFMOT's default).
      narrow_range: ``[-qmax, qmax]`` grid instead of ``[-qmax - 1, qmax]``.
      ste: ``"clipped"`` (no gradient beyond the range) or ``"identity"``.
      where: which sites: ``None`` (all), a regex on the site name, or a predicate
        ``(name, x) -> bool`` given the site's input (as in :mod:`mixjax.select`).
      output: also quantize ``fn``'s result (an array, or the first element of a tuple), under
        the key ``"__output__"``.

    Example::

        act = mixjax.quant.activation_quant(8)
        fn = lambda p, x: model.apply({"params": p}, x)
        act_state = act.init(fn, params, x)
        logits, act_state = act.apply(fn, act_state, params, x, mode="train")

    Raises:
      TypeError / ValueError: bad ``bits``, ``ste``, ``observer`` or ``where``.
    """
    g = grid(bits, narrow_range=narrow_range, fn_name=_NAME)
    _checks.choice(_NAME, "ste", ste, STE_RULES)
    symmetric = _checks.boolean(_NAME, "symmetric", symmetric)
    output = _checks.boolean(_NAME, "output", output)
    if observer is None:
        observer = observers.ema_observer(0.99)
    _checks.instance(_NAME, "observer", observer, observers.Observer, "a mixjax.quant.Observer")
    selector = (lambda name, x: True) if where is None else select.as_selector(where)

    def site_qparams(obs):
        return qparams(obs.min, obs.max, g, symmetric=symmetric)

    def quantize(x, obs):
        scale, zero_point = site_qparams(obs)
        y = fake_quantize(x, scale, zero_point, g, ste=ste)
        return jax.numpy.where(obs.count > 0, y, x)

    def init_fn(fn, params, *args):
        session = _Session("discover", None, quantize, observer, selector)
        hidden = {}

        def trace():
            hidden.update(_intercept.run(fn, params, args, session, fn_name=_NAME).hidden)

        jax.eval_shape(trace)
        if hidden:
            warnings.warn(
                f"{_NAME}: the inputs of these parameters' matmuls are not quantized: {hidden}",
                stacklevel=2,
            )
        if not session.found:
            raise ValueError(
                f"{_NAME}: init found no matmul or convolution of a parameter to quantize "
                f"(where={where!r})"
            )
        return {name: observer.init() for name in session.found + ([OUTPUT] if output else [])}

    def apply_fn(fn, state, params, *args, mode="eval"):
        if mode not in MODES:
            raise ValueError(f"{_NAME}: mode must be one of {MODES}, got mode={mode!r}")
        if not isinstance(state, dict):
            raise TypeError(
                f"{_NAME}: state must be the dict made by init, got {type(state).__name__}"
            )
        session = _Session(mode, dict(state), quantize, observer, selector)
        out = _intercept.run(fn, params, args, session, fn_name=_NAME).out
        if output:
            if OUTPUT not in state:
                raise ValueError(f"{_NAME}: output=True but the state has no {OUTPUT!r} entry")
            result = output_array(out)
            if not select.is_floating(result):
                raise TypeError(
                    f"{_NAME}: output=True needs fn to return a float array, got "
                    f"{type(result).__name__}"
                )
            quantized = session.observe(OUTPUT, result)
            out = (quantized, *out[1:]) if result is not out else quantized
        return out, session.state

    return ActivationQuant(init_fn, apply_fn, site_qparams, g)


class QuantizedApply(NamedTuple):
    """A training-step model with activation quantization, from :func:`quantized_apply`.

    Attributes:
      init: ``(params, model_state, x, *, key=None) -> model_state'``, where ``model_state' =
        {"act": observer state, "model": model_state}``.
      apply: the :class:`mixjax.train.ApplyFn` taking and returning ``model_state'``; observers
        update in training (``mode="train"``) and are read in evaluation (``"eval"``).
    """

    init: Callable[..., dict[str, Any]]
    apply: Callable[..., tuple[jax.Array, dict[str, Any]]]


def quantized_apply(apply_fn: Callable[..., Any], act: ActivationQuant) -> QuantizedApply:
    """Activation quantization around a training-step model, its state kept beside the model's.

    ``apply_fn(params, model_state, x, *, train, key) -> (logits, model_state)`` is the model
    (:func:`mixjax.train.linen_apply`, :func:`mixjax.train.nnx_apply`); the result's model state
    is ``{"act": {site: ObserverState}, "model": model_state}``, so batch statistics and
    observers both survive the step. Example::

        act = mixjax.quant.activation_quant(8)
        qat = mixjax.quant.quantized_apply(mixjax.train.linen_apply(module), act)
        model_state = qat.init(params, {"batch_stats": stats}, x)
        step = mixjax.train.make_train_step(qat.apply, tx)
    """
    _checks.instance(_NAME, "act", act, ActivationQuant, "a mixjax.quant.ActivationQuant")

    def init(params, model_state, x, *, key=None):
        key = jax.random.key(0) if key is None else key
        fn = lambda p, x: apply_fn(p, model_state, x, train=False, key=key)  # noqa: E731
        return {"act": act.init(fn, params, x), "model": model_state}

    def apply(params, model_state, x, *, train, key):
        fn = lambda p, x: apply_fn(p, model_state["model"], x, train=train, key=key)  # noqa: E731
        mode = "train" if train else "eval"
        (logits, inner), act_state = act.apply(fn, model_state["act"], params, x, mode=mode)
        return logits, {"act": act_state, "model": inner}

    return QuantizedApply(init, apply)
