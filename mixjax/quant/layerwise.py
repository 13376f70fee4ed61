"""One-shot weight quantization of a layer: :func:`gptq` (second order) and :func:`rtn`.

Both put a layer's weights on mixjax's integer grid (:mod:`mixjax.quant.grids`), the grid of
:func:`mixjax.quant.fake_quant` with the same ``bits``, ``group_size``, ``symmetric`` and
``narrow_range``: the scale of a group is its weights' ``qparams`` (``"absmax"`` when
symmetric, else ``"minmax"``), and the result is exactly ``quantize_dequantize`` of itself.

Matrix view (:mod:`mixjax.calibrate`): ``W`` ``(K, O)``, rows the input features (the
contraction), columns the output features; ``group_size=g`` gives each output feature one scale
per ``g`` consecutive rows, scales ``(K // g, O)``; per channel (``group_size=None``) ``(1, O)``.

* :func:`rtn_solve`: round to nearest, scales from ``W``.
* :func:`gptq_solve`: GPTQ (Frantar et al. 2022) minimizes ``||X W - X W_q||^2`` row by row
  with error feedback through the inverse Hessian ``H = X^T X`` (:mod:`mixjax._hessian`: damping,
  dead inputs, lazy blocks). Group scales are computed at each group's first row from the group's
  *current* rows (the paper's rule: earlier errors included), or with ``act_order`` (rows
  processed by decreasing ``diag(H)``) once from the original ``W`` (static groups: groups stay
  consecutive rows of the original order, so the result is on the group-wise grid).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixjax import _checks, _hessian
from mixjax.calibrate import LayerStats, Method, QuantSpec, Solution
from mixjax.quant.grids import expand_scale, qparams, quantize_dequantize
from mixjax.quant.weights import weight_range

__all__ = [
    "check_layer",
    "check_spec",
    "gptq",
    "gptq_solve",
    "group_qparams",
    "on_grid",
    "rtn",
    "rtn_solve",
]


def check_spec(fn_name: str, spec: QuantSpec, k: int | None = None) -> QuantSpec:
    """``spec`` checked (``bits`` in 2..8, ``group_size >= 1``, booleans), and against a layer of
    ``k`` rows when given (``group_size`` must divide it).

    Raises:
      TypeError: a wrong type.
      ValueError: a value out of range, or a group size not dividing ``k``.
    """
    bits = _checks.integer(fn_name, "bits", spec.bits, 2, 8)
    group = _checks.integer(fn_name, "group_size", spec.group_size, 1, optional=True)
    symmetric = _checks.boolean(fn_name, "symmetric", spec.symmetric)
    narrow = _checks.boolean(fn_name, "narrow_range", spec.narrow_range)
    if k is not None and group is not None and k % group:
        raise ValueError(
            f"{fn_name}: group_size={group} does not divide the layer's {k} input rows "
            f"(weight of shape ({k}, O) in the matrix view); choose a divisor of {k}"
        )
    return QuantSpec(bits, group, symmetric, narrow)


def group_qparams(w: jax.Array, spec: QuantSpec, groups: int) -> tuple[jax.Array, jax.Array]:
    """Scales and zero points ``(groups, O)`` of ``w`` ``(R, O)``: one per output feature and
    per ``R // groups`` consecutive rows, by :func:`mixjax.quant.fake_quant`'s rule."""
    lo, hi = weight_range(w, (groups, w.shape[1]))
    rule = "absmax" if spec.symmetric else "minmax"
    return qparams(lo, hi, spec.grid, symmetric=spec.symmetric, scale=rule)


def on_grid(w: jax.Array, scale: jax.Array, zero_point: jax.Array, spec: QuantSpec) -> jax.Array:
    """``quantize_dequantize`` of ``w`` ``(K, O)`` with compact scales ``(G, O)``."""
    shape = w.shape
    return quantize_dequantize(
        w, expand_scale(scale, shape), expand_scale(zero_point, shape), spec.grid
    )


def check_layer(fn_name: str, w: jax.Array, gram: jax.Array | None) -> None:
    """Raises ``ValueError`` unless ``w`` is a ``(K, O)`` matrix and ``gram`` (if given)
    ``(K, K)``."""
    if w.ndim != 2:
        raise ValueError(f"{fn_name}: the weight must be a (K, O) matrix, got shape {w.shape}")
    if gram is not None and tuple(gram.shape) != (w.shape[0], w.shape[0]):
        raise ValueError(
            f"{fn_name}: the gram matrix must be (K, K) = {(w.shape[0],) * 2} for a weight of "
            f"shape {tuple(w.shape)}, got {tuple(gram.shape)}"
        )


def rtn_solve(w: jax.Array, spec: QuantSpec) -> Solution:
    """Round to nearest: ``w`` ``(K, O)`` on the grid of its own scales (module docstring).

    Returns:
      A :class:`mixjax.calibrate.Solution` with ``mask=None`` and scales ``(K // g, O)`` or
      ``(1, O)``.

    Raises:
      ValueError: ``spec.group_size`` does not divide ``K``; a bad ``spec``.
    """
    name = "mixjax.quant.rtn_solve"
    check_layer(name, w, None)
    spec = check_spec(name, spec, w.shape[0])
    w = jnp.asarray(w, jnp.float32)
    groups = 1 if spec.group_size is None else w.shape[0] // spec.group_size
    scale, zero = group_qparams(w, spec, groups)
    return Solution(on_grid(w, scale, zero, spec), None, scale, zero)


def gptq_solve(
    w: jax.Array,
    gram: jax.Array,
    spec: QuantSpec,
    *,
    act_order: bool,
    damp: float,
    block_size: int,
) -> Solution:
    """GPTQ on one layer (module docstring), jit-able with the options static.

    Args:
      w: ``(K, O)`` float32 weights (rows: input features).
      gram: ``(K, K)`` float32 ``X^T X`` of the layer's inputs ``X`` ``(N, K)``.
      spec: the grid.
      act_order: process rows by decreasing ``diag(H)`` (ties: in order), with static group
        scales from the original ``W``; the result is returned in the original row order.
      damp: ``H += damp * mean(diag(H)) * I`` (``> 0``).
      block_size: rows per lazy block (rounded down to a multiple of the group size, or up to
        it: :func:`mixjax._hessian.fit_block`; the result does not depend on it but for float
        rounding).

    Returns:
      A :class:`mixjax.calibrate.Solution`: ``weight`` ``(K, O)`` on the grid of ``scale`` /
      ``zero_point`` (``(K // g, O)``, or ``(1, O)`` per channel), ``mask=None``. Dead inputs
      (``diag(H) == 0``) get zero rows.

    Raises:
      ValueError: ``spec.group_size`` does not divide ``K``; shapes that do not match; bad
        options.
    """
    name = "mixjax.quant.gptq_solve"
    check_layer(name, w, gram)
    spec = check_spec(name, spec, w.shape[0])
    act_order = _checks.boolean(name, "act_order", act_order)
    damp = _checks.real(name, "damp", damp, 0.0, low_open=True)
    block_size = _checks.integer(name, "block_size", block_size, 1)
    k, o = w.shape
    g = spec.group_size
    gram = jnp.asarray(gram, jnp.float32)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(gram), stable=True)
        rows, u = _hessian.inverse_factor(w[perm], gram[perm][:, perm], damp)
        w = rows[jnp.argsort(perm)]  # dead rows zeroed, original order
    else:
        perm = None
        rows, u = _hessian.inverse_factor(w, gram, damp)
        w = rows
    dynamic = g is not None and not act_order
    groups = 1 if g is None else k // g
    if dynamic:
        scale = zero = jnp.ones((groups, o), jnp.float32)
        per_row = None
    else:
        scale, zero = group_qparams(w, spec, groups)  # static: from the original rows
        per_row = (expand_scale(scale, (k, o)), expand_scale(zero, (k, o)))
        per_row = jax.tree.map(lambda a: jnp.broadcast_to(a, (k, o)), per_row)
        if perm is not None:
            per_row = jax.tree.map(lambda a: a[perm], per_row)

    def new_group(r, rows, diag, aux):
        scales, zeros, _, _ = aux
        s, z = group_qparams(rows, spec, 1)
        index = r // g
        return scales.at[index].set(s[0]), zeros.at[index].set(z[0]), s, z

    def finish(r, row, aux):
        if per_row is None:
            s, z = aux[2], aux[3]
        else:
            at = jnp.minimum(r, k - 1)  # padding rows are zero: any scale maps them to 0
            s, z = per_row[0][at][None], per_row[1][at][None]
        return quantize_dequantize(row[None], s, z, spec.grid)[0], ()

    events = [(g, new_group)] if dynamic else []
    block = _hessian.fit_block(block_size, [g] if dynamic else [])
    aux = (scale, zero, scale[:1], zero[:1])
    q, _, aux = _hessian.sweep(rows, u, block=block, events=events, finish=finish, aux=aux)
    if perm is not None:
        q = q[jnp.argsort(perm)]
    if dynamic:
        scale, zero = aux[0], aux[1]
    return Solution(on_grid(q, scale, zero, spec), None, scale, zero)


def _gptq_from_stats(w: jax.Array, stats: LayerStats, spec: QuantSpec, **options) -> Solution:
    return gptq_solve(w, stats.gram, spec, **options)


def _rtn_from_stats(w: jax.Array, stats: LayerStats | None, spec: QuantSpec) -> Solution:
    del stats  # round to nearest reads no inputs
    return rtn_solve(w, spec)


def _spec(fn_name, bits, group_size, symmetric, narrow_range) -> QuantSpec:
    return check_spec(fn_name, QuantSpec(bits, group_size, symmetric, narrow_range))


def gptq(
    bits: int = 4,
    *,
    group_size: int | None = None,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    symmetric: bool = False,
    narrow_range: bool = False,
) -> Method:
    """GPTQ one-shot quantization, for :func:`mixjax.oneshot.compress` (module docstring).

    Args:
      bits: 2..8.
      group_size: one scale per ``group_size`` consecutive input rows and output feature, or
        ``None`` (per output feature). Must divide each layer's input size (checked per layer).
      act_order: process input rows by decreasing ``diag(X^T X)``, with static groups.
      damp: relative Hessian damping, ``> 0``.
      block_size: rows per lazy block update, ``>= 1``.
      symmetric: zero point 0 (abs-max scales); else min/max with an integer zero point.
      narrow_range: the grid ``[-qmax, qmax]``.

    Returns:
      A :class:`mixjax.calibrate.Method` named ``"gptq"``.

    Raises:
      TypeError / ValueError: an argument of the wrong type or out of range (named).

    Example:
      >>> import mixjax
      >>> method = mixjax.quant.gptq(4, group_size=32)
      >>> method.name, method.quant.bits, method.uses_inputs
      ('gptq', 4, True)
    """
    name = "mixjax.quant.gptq"
    spec = _spec(name, bits, group_size, symmetric, narrow_range)
    options = {
        "act_order": _checks.boolean(name, "act_order", act_order),
        "damp": _checks.real(name, "damp", damp, 0.0, low_open=True),
        "block_size": _checks.integer(name, "block_size", block_size, 1),
    }
    solve = functools.partial(_gptq_from_stats, spec=spec, **options)
    return Method("gptq", solve, spec, prunes=False, uses_inputs=True)


def rtn(
    bits: int = 4,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    narrow_range: bool = False,
) -> Method:
    """Round-to-nearest quantization as a one-shot method (no calibration data needed).

    Args: as :func:`gptq`'s.

    Returns:
      A :class:`mixjax.calibrate.Method` named ``"rtn"`` with ``uses_inputs=False``.
    """
    spec = _spec("mixjax.quant.rtn", bits, group_size, symmetric, narrow_range)
    solve = functools.partial(_rtn_from_stats, spec=spec)
    return Method("rtn", solve, spec, prunes=False, uses_inputs=False)
