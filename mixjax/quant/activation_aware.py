"""Activation-aware one-shot weight quantization: :func:`awq` (Lin et al. 2023).

Matrix view (:mod:`mixjax.calibrate`): ``W`` ``(K, O)``, rows the input features. Inputs ``X``
``(N, K)`` with a few large channels make the rows that meet them matter most; AWQ protects
them by quantizing ``W`` with its rows scaled up and scaling the inputs down to match::

    W_q = Q(W / a) * a          a = 1 / s  per input feature (K,), s = m ** alpha / norm,
    X @ W_q = (X * a) @ Q(W / a)                                 m = mean_n |X[n, k]|

with ``Q`` round to nearest on the grid of :func:`mixjax.quant.fake_quant` (the scales of
``W / a``'s groups, as :func:`mixjax.quant.rtn`), ``norm = sqrt(max(s) * min(s))`` and
``alpha`` the best of ``grid_points`` values ``i / grid_points``, ``i = 0, 1, ...``. Where the
paper runs the layer on the calibration set to score a candidate, this scores it with the
layer's exact output error from the captured Gram matrix, ``||X (W - W_q)||^2 = sum_o e_o^T
(X^T X) e_o`` (``e_o`` the error of output column ``o``); ``alpha = 0`` is round to nearest, so
the result is never worse than it on this objective.

Then (``clip=True``, the paper's second search) each group's range is shrunk by the best of
``clip_points`` factors in ``[max_shrink, 1]``, scored per group and output feature with the
group's block of the (scaled) Gram matrix; an output column keeps its clipped ranges only where
that lowers its exact error, so clipping never makes a column worse.

The result is on mixjax's grid with per-input-feature factors
(:attr:`mixjax.quant.FakeQuantState.input_scale`): ``fake_quant(scales=...)`` reproduces it,
:mod:`mixjax.export` stores the codes with the factors, and integer inference folds the factors
into the dequantized kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixjax import _checks
from mixjax.calibrate import LayerStats, Method, QuantSpec, Solution
from mixjax.quant.grids import qparams
from mixjax.quant.layerwise import check_layer, check_spec, group_qparams, on_grid
from mixjax.quant.weights import weight_range

__all__ = ["awq", "awq_solve"]

# Smallest normalized activation magnitude: keeps dead inputs' factors finite.
_MIN_MAGNITUDE = 1e-4


def _column_errors(e: jax.Array, gram: jax.Array) -> jax.Array:
    """``e_o^T gram e_o`` per column ``o`` of ``e`` ``(K, O)``: ``(O,)``."""
    return jnp.sum((gram @ e) * e, axis=0)


def _input_factors(magnitude: jax.Array, alpha: jax.Array) -> jax.Array:
    """``a = 1 / s`` for ``s = m ** alpha``, normalized so ``max(s) * min(s) = 1``."""
    m = magnitude / jnp.maximum(jnp.max(magnitude), jnp.finfo(jnp.float32).tiny)
    s = jnp.maximum(m, _MIN_MAGNITUDE) ** alpha
    return jnp.sqrt(jnp.max(s) * jnp.min(s)) / s


def _clip_search(
    w: jax.Array, gram: jax.Array, spec: QuantSpec, groups: int, shrinks: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scales and zero points ``(groups, O)`` of ``w`` with each group's range shrunk by the
    factor of ``shrinks`` whose error ``e^T gram_gg e`` (the group's diagonal block) is least."""
    k, o = w.shape
    size = k // groups
    index = jnp.arange(groups)
    blocks = gram.reshape(groups, size, groups, size)[index, :, index, :]  # (G, g, g)
    lo, hi = weight_range(w, (groups, o))
    rule = "absmax" if spec.symmetric else "minmax"

    def candidate(c):
        scale, zero = qparams(lo * c, hi * c, spec.grid, symmetric=spec.symmetric, scale=rule)
        e = (w - on_grid(w, scale, zero, spec)).reshape(groups, size, o)
        return jnp.einsum("gio,gij,gjo->go", e, blocks, e), scale, zero

    errors, scales, zeros = jax.lax.map(candidate, shrinks)  # (C, G, O) each
    best = jnp.argmin(errors, axis=0)[None]
    pick = lambda a: jnp.take_along_axis(a, best, axis=0)[0]  # noqa: E731
    return pick(scales), pick(zeros)


def awq_solve(
    w: jax.Array,
    stats: LayerStats,
    spec: QuantSpec,
    *,
    grid_points: int,
    clip: bool,
    max_shrink: float,
    clip_points: int,
) -> Solution:
    """AWQ on one layer (module docstring), jit-able with the options static.

    Args:
      w: ``(K, O)`` float32 weights.
      stats: the layer's input statistics: ``abs_sum / count`` is ``m``, ``gram`` scores.
      spec: the grid.
      grid_points: candidate exponents ``alpha = i / grid_points``, ``i < grid_points``.
      clip: search a range shrink per group and output feature after the scales.
      max_shrink: the smallest shrink factor, in ``(0, 1]``.
      clip_points: shrink factors, evenly spaced from 1 down to ``max_shrink``.

    Returns:
      A :class:`mixjax.calibrate.Solution`: ``weight = on_grid(w / a) * a`` (``a`` along the
      rows), ``scale`` / ``zero_point`` ``(K // g, O)`` (or ``(1, O)``) of ``w / a``, and
      ``input_scale = a`` ``(K,)``; ``mask=None``.

    Raises:
      ValueError: ``spec.group_size`` does not divide ``K``; shapes that do not match; bad
        options.
    """
    name = "mixjax.quant.awq_solve"
    check_layer(name, w, stats.gram)
    spec = check_spec(name, spec, w.shape[0])
    grid_points = _checks.integer(name, "grid_points", grid_points, 1)
    clip = _checks.boolean(name, "clip", clip)
    max_shrink = _checks.real(name, "max_shrink", max_shrink, 0.0, 1.0, low_open=True)
    clip_points = _checks.integer(name, "clip_points", clip_points, 1)
    w = jnp.asarray(w, jnp.float32)
    gram = jnp.asarray(stats.gram, jnp.float32)
    k = w.shape[0]
    groups = 1 if spec.group_size is None else k // spec.group_size
    magnitude = jnp.asarray(stats.abs_sum, jnp.float32) / jnp.maximum(stats.count, 1.0)

    def rounded(a):
        scaled = w / a[:, None]
        scale, zero = group_qparams(scaled, spec, groups)
        return on_grid(scaled, scale, zero, spec) * a[:, None]

    def total_error(alpha):
        return jnp.sum(_column_errors(w - rounded(_input_factors(magnitude, alpha)), gram))

    alphas = jnp.arange(grid_points, dtype=jnp.float32) / grid_points
    a = _input_factors(magnitude, alphas[jnp.argmin(jax.lax.map(total_error, alphas))])
    scaled = w / a[:, None]
    scale, zero = group_qparams(scaled, spec, groups)
    if clip:
        scaled_gram = gram * a[:, None] * a[None, :]  # the inputs X * a meet w / a
        shrinks = jnp.linspace(1.0, max_shrink, clip_points, dtype=jnp.float32)
        clip_scale, clip_zero = _clip_search(scaled, scaled_gram, spec, groups, shrinks)
        plain = _column_errors(scaled - on_grid(scaled, scale, zero, spec), scaled_gram)
        clipped = _column_errors(scaled - on_grid(scaled, clip_scale, clip_zero, spec), scaled_gram)
        better = (clipped < plain)[None]
        scale = jnp.where(better, clip_scale, scale)
        zero = jnp.where(better, clip_zero, zero)
    weight = on_grid(scaled, scale, zero, spec) * a[:, None]
    return Solution(weight, None, scale, zero, a)


def _awq_from_stats(w: jax.Array, stats: LayerStats, spec: QuantSpec, **options) -> Solution:
    return awq_solve(w, stats, spec, **options)


def awq(
    bits: int = 4,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    narrow_range: bool = False,
    grid_points: int = 20,
    clip: bool = True,
    max_shrink: float = 0.5,
    clip_points: int = 20,
) -> Method:
    """AWQ one-shot quantization, for :func:`mixjax.oneshot.compress` (module docstring).

    Args:
      bits: integer width of the grid, as :func:`mixjax.quant.gptq`'s.
      group_size: input features per scale along the contraction axis (``None``: one per
        output feature).
      symmetric: a zero-centred grid (no zero point).
      narrow_range: drop the most negative code of a symmetric grid.
      grid_points: candidate exponents of the activation magnitudes, ``>= 1`` (1: round to
        nearest, with the clip search).
      clip: also search a range shrink per group and output feature.
      max_shrink: the smallest shrink factor, in ``(0, 1]``.
      clip_points: shrink factors tried, ``>= 1``.

    Returns:
      A :class:`mixjax.calibrate.Method` named ``"awq"``; its solutions carry per-input-feature
      factors (:attr:`mixjax.calibrate.Solution.input_scale`).

    Raises:
      TypeError / ValueError: an argument of the wrong type or out of range (named).

    Example:
      >>> import mixjax
      >>> method = mixjax.quant.awq(4, group_size=32)
      >>> method.name, method.quant.group_size, method.uses_inputs
      ('awq', 32, True)
    """
    name = "mixjax.quant.awq"
    spec = check_spec(name, QuantSpec(bits, group_size, symmetric, narrow_range))
    options = {
        "grid_points": _checks.integer(name, "grid_points", grid_points, 1),
        "clip": _checks.boolean(name, "clip", clip),
        "max_shrink": _checks.real(name, "max_shrink", max_shrink, 0.0, 1.0, low_open=True),
        "clip_points": _checks.integer(name, "clip_points", clip_points, 1),
    }
    solve = functools.partial(_awq_from_stats, spec=spec, **options)
    return Method("awq", solve, spec, prunes=False, uses_inputs=True)
