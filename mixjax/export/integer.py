"""Integer inference: a linen model's Dense/Conv layers as int8 x int8 -> int32, then rescaled.

:func:`integer_model` reads an artifact (:mod:`mixjax.export`, symmetric weights of at most 8
bits) and calibrated or QAT activation ranges (:func:`mixjax.quant.activation_quant`, 8 bits at
most) into an :class:`IntModel` pytree; :func:`integer_apply` runs any linen model function
with every ``nn.Dense`` /
``nn.Conv`` call intercepted (``flax.linen.intercept_methods``) and computed as

    q_x = quantize(x)                                    # int8, activation scale s_x, zero z_x
    acc = dot(q_x, q_w) - z_x * sum(q_w)                 # int32 (lax.dot_general /
                                                         #   conv_general_dilated, exact)
    y = acc * (s_x * s_w) + bias                         # float32

which equals the fake-quant forward ``dot(dq(q_x), dq(q_w)) + bias`` up to float32 summation
order (relative error ~1e-7 for one layer). In deeper layers an input that lies within that
float32 error of a rounding boundary can take the neighbouring code, which moves the logits by
one activation step: rare, ~1e-4 relative error on 1024-wide layers, argmax unchanged in the
tests and benchmarks. Convolutions pad ``q_x`` with ``z_x`` (the code of 0.0) before a VALID
integer conv, so the ``z_x * sum(q_w)`` correction is exact at the borders too. The other layers
(pooling, norms, activations) run in float as the model defines them, with the parameters the
model function closes over (``artifact.params()``).

Fallbacks, each announced with a ``UserWarning`` at trace time, never silent: a layer whose
weights are not quantized, a Conv with ``padding`` ``'CIRCULAR'``/``'REFLECT'``/``'CAUSAL'``,
``input_dilation != 1``, a ``mask``, several batch dimensions, or a backend whose XLA cannot
compile the integer dot/conv, runs as the float fake-quant layer (same result, float speed).

Layers are matched by module path (``"Dense_0"`` <-> the artifact's ``"Dense_0/kernel"``), so
compress the linen ``params`` dict. NNX models are not supported here (they run the fake-quant
forward through :func:`mixjax.quant.instrument`).

Non-finite activations: an example (a row for Dense) whose layer input holds NaN/Inf gets NaN
outputs from that layer, since integers cannot carry NaN.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from mixjax.export import kinds, records
from mixjax.export.artifact import Artifact
from mixjax.quant.activations import OUTPUT, ActivationQuant
from mixjax.quant.grids import Grid, quantize, quantize_dequantize
from mixjax.quant.observers import ObserverState

__all__ = ["InputQuant", "IntLayer", "IntModel", "integer_apply", "integer_model"]

_PREPARE = "mixjax.export.integer_model"


class InputQuant(NamedTuple):
    """Activation quantization of one layer input (or the output).

    Attributes:
      scale: float32 ``()``.
      zero_point: float32 ``()``, integer-valued.
      qmin, qmax: int32 ``()``, the activation grid.
    """

    scale: jax.Array
    zero_point: jax.Array
    qmin: jax.Array
    qmax: jax.Array


class IntLayer(NamedTuple):
    """One Dense/Conv layer for :func:`integer_apply`.

    Attributes:
      inputs: the layer input's :class:`InputQuant`.
      kernel: int8, the kernel's shape (``(in, out)`` or ``(*window, in, out)``); ``None`` when
        the kernel is not quantized (the layer runs in float fake-quant).
      rescale: float32 ``(out,)``, ``s_x * s_w``.
      correction: int32 ``(out,)``, ``z_x * sum(kernel over all but the last axis)``.
      bias: float32 ``(out,)`` (zeros without a bias).
    """

    inputs: InputQuant
    kernel: jax.Array | None
    rescale: jax.Array | None
    correction: jax.Array | None
    bias: jax.Array | None


class IntModel(NamedTuple):
    """Everything :func:`integer_apply` needs besides the model function.

    Attributes:
      layers: ``{module path: IntLayer}`` for every activation-quantized Dense/Conv.
      output: the :class:`InputQuant` of the model output, or ``None``.
    """

    layers: dict[str, IntLayer]
    output: InputQuant | None


def _input_quant(act: ActivationQuant, obs: ObserverState) -> InputQuant:
    scale, zero_point = act.qparams(obs)
    return InputQuant(scale, zero_point, np.int32(act.grid.qmin), np.int32(act.grid.qmax))


def _integer_kernel(
    record: records.Record, arrays: dict[str, np.ndarray]
) -> tuple[records.IntTensor, int] | None:
    """The integer codes and bits of a kernel record, or ``None`` where it has no integer grid.

    Clustered-then-quantized kernels are stored as ``"codebook"`` records (indices into shared
    values) whose values are themselves an ``"int"`` record: the kernel is exactly
    ``(q - zero_point) * scale`` on the values' grid, so it is re-encoded on that grid
    (:func:`mixjax.export.records.int_encoder` verifies exactness).
    """
    if record.get("kind") == "int":
        return records.decode_int(record, arrays), record["bits"]
    values = record.get("values")
    if record.get("kind") != "codebook" or not isinstance(values, dict):
        return None
    if values.get("kind") != "int":
        return None
    grid = records.decode_int(values, arrays)
    own: dict[str, np.ndarray] = {}

    def store(array: np.ndarray) -> str:
        name = f"k{len(own)}"
        own[name] = np.asarray(array)
        return name

    kernel = kinds.decode(record, arrays)
    encoded = records.int_encoder(grid.scale, grid.zero_point, fn_name=_PREPARE)(
        record["path"], kernel, store
    )
    return records.decode_int(encoded, own), encoded["bits"]


def _check_layer(path: str, kernel: np.ndarray, scale: np.ndarray) -> None:
    """A kernel the integer path can run: ``(..., in, out)``, not empty, and a scale per
    tensor or per output channel (the last axis)."""
    where = f"{_PREPARE}: kernel {path + '/kernel'!r}"
    if kernel.ndim < 2 or kernel.size == 0:
        raise ValueError(f"{where} has shape {kernel.shape}; a Dense/Conv kernel is (..., in, out)")
    per_channel = scale.ndim and scale.size == scale.shape[-1] == kernel.shape[-1]
    if scale.size != 1 and not per_channel:
        raise ValueError(
            f"{where}: its scale {scale.shape} is neither per tensor nor per output channel "
            f"(the last axis of {kernel.shape})"
        )


def integer_model(
    artifact: Artifact,
    act: ActivationQuant,
    act_state: dict[str, ObserverState],
) -> IntModel:
    """Builds the integer model from an artifact and activation ranges.

    Args:
      artifact: from :func:`mixjax.export.compress` on the linen ``params`` dict (paths like
        ``"Dense_0/kernel"``) or from :func:`mixjax.export.load`.
      act: the activation quantizer (``bits <= 8``).
      act_state: its calibrated (or QAT-trained) observer state.

    Raises:
      ValueError: activation bits above 8; a layer never observed (run calibration first); a
        quantized kernel with a zero point or more than 8 bits, with fewer than 2 axes, with a
        scale that is not per tensor or per output channel, or a bias of another shape than
        ``(out,)``; each names the leaf.
    """
    name = _PREPARE
    if act.grid.bits > 8:
        raise ValueError(
            f"{name}: integer inference needs activations of <= 8 bits, got {act.grid.bits}"
        )
    unobserved = [path for path, obs in act_state.items() if int(obs.count) == 0]
    if unobserved:
        raise ValueError(
            f"{name}: layers {unobserved} have no activation range (count == 0); run "
            "mixjax.quant.calibrate or QAT first"
        )
    records = {leaf["path"]: leaf for leaf in artifact.leaves}
    layers = {}
    for path, obs in act_state.items():
        if path == OUTPUT:
            continue
        inputs = _input_quant(act, obs)
        record = records.get(f"{path}/kernel")
        integer = None if record is None else _integer_kernel(record, artifact.arrays)
        if integer is None:
            warnings.warn(
                f"{name}: layer {path!r} has no quantized kernel in the artifact; it runs in "
                "float (fake-quant inputs)",
                stacklevel=2,
            )
            layers[path] = IntLayer(inputs, None, None, None, None)
            continue
        t, bits = integer
        if np.any(t.zero_point) or bits > 8:
            raise ValueError(
                f"{name}: kernel {path + '/kernel'!r} must be symmetric (zero point 0) with <= 8 "
                f"bits for the integer path, got bits={bits}, "
                f"zero_point={'nonzero' if np.any(t.zero_point) else 0}"
            )
        kernel = t.q.astype(np.int8)
        _check_layer(path, kernel, t.scale)
        colsum = kernel.reshape(-1, kernel.shape[-1]).astype(np.int32).sum(axis=0)
        bias = records.get(f"{path}/bias")
        bias = (
            np.zeros(kernel.shape[-1], np.float32)
            if bias is None
            else kinds.decode(bias, artifact.arrays).astype(np.float32)
        )
        if bias.shape != (kernel.shape[-1],):
            raise ValueError(
                f"{name}: bias {path + '/bias'!r} has shape {bias.shape}, the kernel "
                f"{kernel.shape} needs ({kernel.shape[-1]},)"
            )
        layers[path] = IntLayer(
            inputs,
            jnp.asarray(kernel),
            jnp.asarray(inputs.scale * t.scale.reshape(-1)),
            jnp.asarray(np.int32(inputs.zero_point) * colsum),
            jnp.asarray(bias),
        )
    output = act_state.get(OUTPUT)
    return IntModel(layers, None if output is None else _input_quant(act, output))


@functools.cache
def _integer_ops_compile(backend: str) -> bool:
    lhs = jax.ShapeDtypeStruct((1, 3, 3, 1), jnp.int8)
    rhs = jax.ShapeDtypeStruct((3, 3, 1, 1), jnp.int8)
    dims = ("NHWC", "HWIO", "NHWC")

    def ops(a, b):
        conv = jax.lax.conv_general_dilated(
            a, b, (1, 1), "VALID", dimension_numbers=dims, preferred_element_type=jnp.int32
        )
        dot = jax.lax.dot_general(
            a.reshape(1, 9),
            b.reshape(9, 1),
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32,
        )
        return conv, dot

    try:
        jax.jit(ops).lower(lhs, rhs).compile()  # on the default backend, named by `backend`
    except Exception:  # noqa: BLE001 - any compile failure means: no integer kernels here
        return False
    return True


def _conv_pads(module: nn.Conv, x: jax.Array, kernel: jax.Array) -> tuple[Any, str | None]:
    """Explicit pads and strides for ``module`` on ``x``, or ``(None, why)`` to fall back."""
    window = kernel.shape[:-2]
    n = len(window)
    broadcast = lambda v: (1,) * n if v is None else ((v,) * n if isinstance(v, int) else tuple(v))
    strides, dilation = broadcast(module.strides), broadcast(module.kernel_dilation)
    if x.ndim != n + 2:
        return None, f"input of rank {x.ndim} (needs exactly one batch dimension)"
    if broadcast(module.input_dilation) != (1,) * n:
        return None, f"input_dilation={module.input_dilation}"
    if module.mask is not None:
        return None, "a kernel mask"
    padding = canonicalize_padding(module.padding, n)
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        return None, f"padding={padding!r}"
    if isinstance(padding, str):
        dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation, strict=True))
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
    return (tuple(tuple(p) for p in padding), strides, dilation), None


def _int_layer(module: nn.Module, layer: IntLayer, x: jax.Array) -> tuple[jax.Array | None, str]:
    """The integer layer output, or ``(None, why)`` when it must fall back to float."""
    iq = layer.inputs
    if not _integer_ops_compile(jax.default_backend()):
        return None, f"XLA on backend {jax.default_backend()!r} cannot compile int8 dot/conv"
    q = quantize(x, iq.scale, iq.zero_point, Grid(8, iq.qmin, iq.qmax))
    q = q.astype(jnp.int8)
    if isinstance(module, nn.Conv):
        spec, why = _conv_pads(module, x, layer.kernel)
        if spec is None:
            return None, why
        pads, strides, dilation = spec
        zero = iq.zero_point.astype(jnp.int8)
        q = jax.lax.pad(q, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
        dims = jax.lax.ConvDimensionNumbers(
            (0, x.ndim - 1, *range(1, x.ndim - 1)),
            (x.ndim - 1, x.ndim - 2, *range(0, x.ndim - 2)),
            (0, x.ndim - 1, *range(1, x.ndim - 1)),
        )
        acc = jax.lax.conv_general_dilated(
            q,
            layer.kernel,
            strides,
            "VALID",
            rhs_dilation=dilation,
            dimension_numbers=dims,
            feature_group_count=module.feature_group_count,
            preferred_element_type=jnp.int32,
        )
        bad_axes = tuple(range(1, x.ndim))
    else:
        acc = jax.lax.dot_general(
            q, layer.kernel, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
        bad_axes = (x.ndim - 1,)
    y = (acc - layer.correction).astype(jnp.float32) * layer.rescale + layer.bias
    # A boolean any() costs ~10 % of a small layer on CPU (a float max or sum costs more).
    bad = jnp.any(~jnp.isfinite(x), axis=bad_axes, keepdims=True)
    return jnp.where(bad, jnp.nan, y), ""


def _fake(x: jax.Array, iq: InputQuant) -> jax.Array:
    return quantize_dequantize(x, iq.scale, iq.zero_point, Grid(8, iq.qmin, iq.qmax))


def integer_apply(
    model_fn: Callable[..., Any], int_model: IntModel, *args: Any, **kwargs: Any
) -> Any:
    """Runs ``model_fn(*args, **kwargs)`` with its Dense/Conv layers on the integer path.

    Args:
      model_fn: a linen model function closing over float parameters, e.g.
        ``lambda x: model.apply({"params": artifact.params()}, x)``.
      int_model: from :func:`integer_model`.

    Returns:
      ``model_fn``'s output (float32), quantized as the fake-quant forward when the activation
      quantizer had ``output=True``. Pure and jit-able.
    """

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        path = "/".join(module.path)
        if (
            context.method_name != "__call__"
            or not isinstance(module, (nn.Dense, nn.Conv))
            or path not in int_model.layers
        ):
            return next_fun(*call_args, **call_kwargs)
        layer = int_model.layers[path]
        x, rest = call_args[0], call_args[1:]
        if layer.kernel is None:
            return next_fun(_fake(x, layer.inputs), *rest, **call_kwargs)
        y, why = _int_layer(module, layer, x)
        if y is None:
            warnings.warn(
                f"mixjax.export.integer_apply: layer {path!r} runs in float fake-quant, not "
                f"int8: {why}",
                stacklevel=2,
            )
            return next_fun(_fake(x, layer.inputs), *rest, **call_kwargs)
        return y

    with nn.intercept_methods(interceptor):
        out = model_fn(*args, **kwargs)
    return out if int_model.output is None else _fake(out, int_model.output)
