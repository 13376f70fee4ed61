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
from typing import NamedTuple

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
    """An integer quantization grid ``[qmin, qmax]`` of ``bits`` bits (Python ints)."""

    bits: int
    qmin: int
    qmax: int


def grid(bits: int, *, narrow_range: bool = False, fn_name: str = "mixjax.quant.grid") -> Grid:
    """The ``bits``-bit signed grid (see the module docstring).

    Raises:
      TypeError: ``bits`` is not an integer.
      ValueError: ``bits`` outside ``[2, 16]``.
    """
    bits = _checks.integer(fn_name, "bits", bits, 2, 16)
    qmax = 2 ** (bits - 1) - 1
    return Grid(bits, -qmax if narrow_range else -qmax - 1, qmax)


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
        s = jnp.maximum(-lo, hi) * np.float32(1 / g.qmax)
    elif symmetric:
        s = jnp.maximum(hi * np.float32(1 / g.qmax), lo * np.float32(1 / g.qmin))
    else:
        # Halves are exact (so an FMA cannot change the difference) and cannot overflow.
        s = (hi * 0.5 - lo * 0.5) * np.float32(2 / (g.qmax - g.qmin))
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fake_quantize(x, scale, zero_point, g, clipped, grad_scale):
    return quantize_dequantize(x, scale, zero_point, g)


def _fake_quantize_fwd(x, scale, zero_point, g, clipped, grad_scale):
    return _fake_quantize(x, scale, zero_point, g, clipped, grad_scale), (x, scale, zero_point)


def _fake_quantize_bwd(g, clipped, grad_scale, residuals, dy):
    x, scale, zero_point = residuals
    scaled = _scaled(x, scale)
    u, r = scaled + zero_point, jnp.round(scaled) + zero_point
    dx = jnp.where((r >= g.qmin) & (r <= g.qmax), dy, jnp.zeros_like(dy)) if clipped else dy
    if grad_scale:
        per_entry = jnp.where(
            r < g.qmin, g.qmin - zero_point, jnp.where(r > g.qmax, g.qmax - zero_point, r - u)
        )
        per_entry = jnp.where(jnp.isfinite(u), per_entry, 0.0)
        dscale = _sum_to(dy.astype(jnp.float32) * per_entry, jnp.shape(scale)) * grad_scale
        dscale = dscale.astype(jnp.result_type(scale))
    else:
        dscale = jnp.zeros_like(scale)
    return dx.astype(x.dtype), dscale, jnp.zeros_like(zero_point)


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
      scale: float32 array broadcasting against ``x`` (``()`` or keepdims-shaped).
      zero_point: integer-valued float32 array of ``scale``'s shape.
      g: the integer grid.
      ste: ``"clipped"`` or ``"identity"``.
      grad_scale: LSQ gradient scale for ``scale``; ``0`` gives ``scale`` no gradient.

    Returns:
      ``dequantize(quantize(x))`` with ``x``'s shape and dtype; non-finite entries unchanged.
    """
    _checks.choice("mixjax.quant.fake_quantize", "ste", ste, STE_RULES)
    return _fake_quantize(
        x,
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(zero_point, jnp.float32),
        g,
        ste == "clipped",
        float(grad_scale),
    )
