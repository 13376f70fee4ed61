"""Integer grids, scales and the straight-through fake-quantization op every quantizer shares.

Conventions (shared by :mod:`mixjax.quant.weights`, :mod:`mixjax.quant.learned`,
:mod:`mixjax.quant.activations` and :mod:`mixjax.export`):

* A ``bits``-bit grid holds the integers ``[qmin, qmax]`` with ``qmax = 2**(bits-1) - 1`` and
  ``qmin = -qmax`` (``narrow_range=True``, TFMOT's weight default) or ``-qmax - 1``.
* A real ``x`` maps to ``q = clip(round(x * (1/scale)) + zero_point, qmin, qmax)`` (TFLite's
  rule, the reciprocal computed once) and back to
  ``(q - zero_point) * scale`` (float32). Symmetric quantization has ``zero_point = 0``;
  asymmetric picks an integer ``zero_point`` in ``[qmin, qmax]``. Either way ``0.0`` maps to the
  integer ``zero_point`` and back to exactly ``0.0``: pruned zeros stay zero.
* Rounding is ``jnp.round`` (half to even). Scales are float32, clamped to at least
  ``finfo(float32).tiny``; a range of width zero (an all-zero or empty channel) gets scale 1.
* Scales are *block broadcasts* of the tensor they scale: each scale axis has size 1 (one
  scale along the whole axis), the tensor's size (one per entry), or a proper divisor ``d`` of
  the tensor's size ``n`` (one per group of ``n / d`` consecutive entries: group-wise scales,
  e.g. ``(n_in / 32, C)`` for int4 groups of 32 along the input axis of an ``(n_in, C)`` kernel).
  They are stored in that compact shape and expanded by :func:`expand_scale` where they meet
  the tensor.
* Non-finite inputs: scale statistics ignore NaN/Inf entries, and :func:`fake_quantize` returns
  such entries unchanged (NaN stays NaN, so it shows in the loss instead of being clipped into a
  plausible number).

Gradients (straight-through estimator), with ``u = x * (1/scale) + zero_point`` the unrounded
code and ``round(u)`` standing for ``round(x * (1/scale)) + zero_point``:

* ``ste="clipped"`` (default): ``dy/dx = 1`` where the clip leaves the code alone,
  ``qmin <= round(u) <= qmax`` (inside the range, at its bounds, and up to half a step beyond),
  and ``0`` where it saturates: PyTorch ``FakeQuantize``'s rule, TF's and LSQ's up to that half
  step. Deciding on the rounded code keeps an ulp of division error from cutting the gradient of
  the largest weight: with abs-max/min-max weight scales every weight gets gradient.
* ``ste="identity"``: ``dy/dx = 1`` everywhere, even for saturated entries.
* LSQ (Esser et al. 2020) scale gradient, the derivative of ``(clip(round(u)) - z) * scale``
  with rounding as the identity: ``round(u) - u`` inside, ``qmin - z`` / ``qmax - z`` where the
  clip saturates below / above, times the gradient scale ``1 / sqrt(N * qmax)``, ``N`` being the
  number of entries sharing the scale. Scales that are not learned get no gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks

__all__ = [
    "SCALE_RULES",
    "STE_RULES",
    "TINY",
    "Grid",
    "dequantize",
    "expand_scale",
    "fake_quantize",
    "grid",
    "qparams",
    "quantize",
    "quantize_dequantize",
]

TINY = float(np.finfo(np.float32).tiny)
STE_RULES = ("clipped", "identity")
SCALE_RULES = ("absmax", "minmax")


class Grid(NamedTuple):
    """An integer quantization grid ``[qmin, qmax]`` of ``bits`` bits: Python ints, or int32
    scalars traced together when ``bits`` is traced (a bit-width sweep under ``jax.vmap``)."""

    bits: int | jax.Array
    qmin: int | jax.Array
    qmax: int | jax.Array


def grid(
    bits: int | jax.Array, *, narrow_range: bool = False, fn_name: str = "mixjax.quant.grid"
) -> Grid:
    """The ``bits``-bit signed grid (see the module docstring).

    ``bits`` may be a *traced* integer scalar, so ``jax.vmap`` over bit widths trains several
    quantized models in one program (fake quantization only: exporting needs concrete bits);
    it cannot be range-checked then, and values outside ``[2, 16]`` are clipped into it.

    Raises:
      TypeError: ``bits`` is not an integer (nor a traced integer scalar).
      ValueError: ``bits`` outside ``[2, 16]``.
    """
    if isinstance(bits, jax.core.Tracer):
        if bits.shape != () or not jnp.issubdtype(bits.dtype, jnp.integer):
            raise TypeError(
                f"{fn_name}: a traced bits must be an integer scalar, got {bits.dtype}{bits.shape}"
            )
        width = jnp.clip(bits.astype(jnp.int32), 2, 16)
        qmax = jnp.left_shift(jnp.int32(1), width - 1) - 1
        return Grid(width, -qmax if narrow_range else -qmax - 1, qmax)
    bits = _checks.integer(fn_name, "bits", bits, 2, 16)
    qmax = 2 ** (bits - 1) - 1
    return Grid(bits, -qmax if narrow_range else -qmax - 1, qmax)


def _reciprocal(n: int | jax.Array) -> Any:
    """``1 / n`` in float32: rounded once from float64 for a Python int, divided in float32 for
    a traced one (the same value: ``1 / n`` never lies on a float32 rounding tie)."""
    if isinstance(n, jax.Array):
        return jnp.float32(1) / n.astype(jnp.float32)
    return np.float32(1 / n)


def expand_scale(scale: Any, shape: tuple[int, ...]) -> Any:
    """A block-broadcast scale (module docstring) expanded to broadcast against ``shape``.

    Each axis of ``scale`` whose size is a proper divisor ``d`` of the tensor's ``n`` is
    repeated ``n / d`` times entry by entry (by reshape and broadcast, so it jits and
    differentiates: the gradient of an expanded scale sums back over its group); axes of size 1
    stay 1 (broadcast), full axes stay. A scale of fewer axes is aligned to the trailing axes of
    ``shape`` as in NumPy broadcasting; ``()`` is returned as it is.

    Args:
      scale: NumPy or JAX array (or a Python number): a scale, a zero point or any other
        per-block quantity.
      shape: the tensor's shape.

    Returns:
      An array of the same library (NumPy for NumPy or Python input, JAX for JAX arrays and
      tracers) that broadcasts against ``shape``: ``()`` or ``len(shape)`` axes.

    Raises:
      ValueError: ``scale`` has more axes than ``shape``, or an axis that is neither 1, the
        tensor's size nor a proper divisor of it; the message names both shapes and the axis.
    """
    xp = jnp if isinstance(scale, jax.Array) else np
    scale = scale if xp is jnp else np.asarray(scale)
    shape = tuple(int(n) for n in shape)
    if scale.ndim == 0:
        return scale
    if scale.ndim > len(shape):
        raise ValueError(
            f"mixjax.quant.expand_scale: a scale of shape {scale.shape} has more axes than the "
            f"tensor {shape} it scales"
        )
    padded = (1,) * (len(shape) - scale.ndim) + tuple(scale.shape)
    out = scale.reshape(padded)
    for axis, (d, n) in enumerate(zip(padded, shape, strict=True)):
        if d in (1, n):
            continue
        if not 1 < d < n or n % d:
            raise ValueError(
                f"mixjax.quant.expand_scale: a scale of shape {tuple(scale.shape)} does not "
                f"block-broadcast against {shape}: axis {axis} has {d} entries, neither 1, {n} "
                f"nor a divisor of {n} (one scale per group of consecutive entries)"
            )
        lead, trail = out.shape[: axis + 1], out.shape[axis + 1 :]
        grouped = xp.broadcast_to(out.reshape(*lead, 1, *trail), (*lead, n // d, *trail))
        out = grouped.reshape(*out.shape[:axis], n, *trail)
    return out


def qparams(
    lo: jax.Array, hi: jax.Array, g: Grid, *, symmetric: bool, scale: str = "absmax"
) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point covering the real range ``[lo, hi]`` (widened to contain 0).

    Symmetric: ``scale = max(|lo|, |hi|) / qmax`` (``"absmax"``) or ``max(hi / qmax, lo / qmin)``
    (``"minmax"``, which uses the extra negative level of a full-range grid); zero point 0.
    Asymmetric: ``scale = (hi - lo) / (qmax - qmin)`` and ``zero_point = qmin - round(lo/scale)``.
    Divisions by the grid size are multiplications by its float32 reciprocal and ``lo / scale`` is
    ``lo * (1 / scale)``, so the result is bit-identical eagerly and under any ``jit`` fusion
    (XLA rewrites divisions, and contracts multiply-adds into FMAs, only in some fusions):
    ranges observed in a training step give the same codes in :mod:`mixjax.export.integer`.

    Args:
      lo: float array of the range's lower ends (e.g. per-channel ``(1, ..., 1, C)`` or a
        scalar).
      hi: float array of the upper ends, of ``lo``'s shape.
      g: the integer grid.
      symmetric: zero point fixed at 0.
      scale: ``"absmax"`` or ``"minmax"`` (symmetric only; asymmetric is always min/max).

    Returns:
      ``(scale, zero_point)``: float32 arrays of the broadcast shape of ``lo`` and ``hi``;
      ``scale >= finfo(float32).tiny``, ``zero_point`` integer-valued in ``[qmin, qmax]``.
    """
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    if symmetric and scale == "absmax":
        s = jnp.maximum(-lo, hi) * _reciprocal(g.qmax)
    elif symmetric:
        s = jnp.maximum(hi * _reciprocal(g.qmax), lo * _reciprocal(g.qmin))
    else:
        # Halves are exact (so an FMA cannot change the difference) and cannot overflow.
        s = (hi * 0.5 - lo * 0.5) * (2 * _reciprocal(g.qmax - g.qmin))
    s = jnp.where(s > 0, jnp.maximum(s, TINY), 1.0)
    if symmetric:
        z = jnp.zeros_like(s)
    else:
        z = jnp.clip(g.qmin - jnp.round(lo * (1.0 / s)), g.qmin, g.qmax)
    return s, z


def quantize(x: jax.Array, scale: jax.Array, zero_point: jax.Array, g: Grid) -> jax.Array:
    """Integer codes ``clip(round(x * (1 / scale)) + zero_point, qmin, qmax)`` as float32.

    ``scale`` and ``zero_point`` broadcast against ``x``; ``scale`` is clamped to ``>= TINY``.
    Non-finite ``x`` give non-finite codes; callers decide what they mean.
    """
    return jnp.clip(jnp.round(_scaled(x, scale)) + zero_point, g.qmin, g.qmax)


def _scaled(x: jax.Array, scale: jax.Array) -> jax.Array:
    # x * (1 / s), rounded before the zero point is added: XLA turns a division by a broadcast
    # scale into this multiply inside some fusions only, and contracts x * a + z into an FMA
    # under jit but not eagerly. Written this way the codes are bit-identical eagerly, under jit
    # and inside any model, which the exact artifact round trip and integer inference rely on.
    inverse = 1.0 / jnp.maximum(jnp.asarray(scale, jnp.float32), TINY)
    return jnp.asarray(x, jnp.float32) * inverse


def dequantize(q: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    """``(q - zero_point) * scale`` in float32: the exact inverse map used everywhere."""
    s = jnp.maximum(jnp.asarray(scale, jnp.float32), TINY)
    return (jnp.asarray(q, jnp.float32) - zero_point) * s


def quantize_dequantize(
    x: jax.Array, scale: jax.Array, zero_point: jax.Array, g: Grid
) -> jax.Array:
    """``dequantize(quantize(x))`` in ``x``'s dtype, non-finite entries of ``x`` kept as they are.

    The forward of :func:`fake_quantize`, with no gradient rule (for inference).
    """
    y = dequantize(quantize(x, scale, zero_point, g), scale, zero_point)
    return jnp.where(jnp.isfinite(x), y, x).astype(jnp.result_type(x))


def _sum_to(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if shape == ():
        return jnp.sum(t)
    axes = tuple(
        i for i, (n, m) in enumerate(zip(shape, t.shape, strict=True)) if n == 1 and m != 1
    )
    return jnp.sum(t, axis=axes, keepdims=True)


# The grid's bounds are operands (not static arguments) so a traced bit width can reach them.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fake_quantize(x, scale, zero_point, bits, qmin, qmax, clipped, grad_scale):
    return quantize_dequantize(x, scale, zero_point, Grid(bits, qmin, qmax))


def _fake_quantize_fwd(x, scale, zero_point, bits, qmin, qmax, clipped, grad_scale):
    out = _fake_quantize(x, scale, zero_point, bits, qmin, qmax, clipped, grad_scale)
    return out, (x, scale, zero_point, qmin, qmax)


def _fake_quantize_bwd(clipped, grad_scale, residuals, dy):
    x, scale, zero_point, qmin, qmax = residuals
    scaled = _scaled(x, scale)
    u, r = scaled + zero_point, jnp.round(scaled) + zero_point
    dx = jnp.where((r >= qmin) & (r <= qmax), dy, jnp.zeros_like(dy)) if clipped else dy
    if grad_scale:
        per_entry = jnp.where(
            r < qmin, qmin - zero_point, jnp.where(r > qmax, qmax - zero_point, r - u)
        )
        per_entry = jnp.where(jnp.isfinite(u), per_entry, 0.0)
        dscale = _sum_to(dy.astype(jnp.float32) * per_entry, jnp.shape(scale)) * grad_scale
        dscale = dscale.astype(jnp.result_type(scale))
    else:
        dscale = jnp.zeros_like(scale)
    return dx.astype(x.dtype), dscale, jnp.zeros_like(zero_point), None, None, None


_fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def fake_quantize(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    g: Grid,
    *,
    ste: str = "clipped",
    grad_scale: float = 0.0,
) -> jax.Array:
    """Quantize-dequantize ``x`` with a straight-through gradient (rules: module docstring).

    Args:
      x: float array.
      scale: float32 array, a block broadcast of ``x`` (``()``, keepdims-shaped, or compact
        group-wise: :func:`expand_scale`); with ``grad_scale`` its gradient has its shape.
      zero_point: integer-valued float32 array of ``scale``'s shape.
      g: the integer grid.
      ste: ``"clipped"`` or ``"identity"``.
      grad_scale: LSQ gradient scale for ``scale``; ``0`` gives ``scale`` no gradient.

    Returns:
      ``dequantize(quantize(x))`` with ``x``'s shape and dtype; non-finite entries unchanged.
    """
    _checks.choice("mixjax.quant.fake_quantize", "ste", ste, STE_RULES)
    shape = jnp.shape(x)
    return _fake_quantize(
        x,
        expand_scale(jnp.asarray(scale, jnp.float32), shape),
        expand_scale(jnp.asarray(zero_point, jnp.float32), shape),
        *g,
        ste == "clipped",
        float(grad_scale),
    )
