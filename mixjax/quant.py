"""Fake quantization: integer grids, scales, the straight-through op, and the weight transform.

Conventions (shared with :mod:`mixjax.activations` and :mod:`mixjax.export`):

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
  plausible number). :func:`fake_quant`'s ``init`` rejects concrete weights holding NaN/Inf.

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

from mixjax import select
from mixjax.core import ParamTransform, every_step, multiples_of, never

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
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{fn_name}: bits must be an integer in [2, 16], got bits={bits!r}")
    if not 2 <= bits <= 16:
        raise ValueError(f"{fn_name}: bits must be an integer in [2, 16], got bits={bits}")
    qmax = 2 ** (int(bits) - 1) - 1
    return Grid(int(bits), -qmax if narrow_range else -qmax - 1, qmax)


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
    ranges observed in a training step give the same codes in :mod:`mixjax.intinfer`.

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
    if ste not in STE_RULES:
        raise ValueError(f"mixjax.quant.fake_quantize: ste must be one of {STE_RULES}, got {ste!r}")
    return _fake_quantize(
        x,
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(zero_point, jnp.float32),
        g,
        ste == "clipped",
        float(grad_scale),
    )


class FakeQuantState(NamedTuple):
    """State of :func:`fake_quant` with scales from the weights (refreshed by ``update``).

    Attributes:
      scale: mirror tree (``None`` at unselected leaves): float32 ``(1, ..., 1, C)`` per output
        channel (``C`` = the leaf's last axis) or ``()`` per tensor.
      zero_point: mirror tree like ``scale``: float32 integer values (zeros when symmetric).
    """

    scale: Any
    zero_point: Any


class LsqState(NamedTuple):
    """State of :func:`fake_quant` with ``learnable_scale=True`` (LSQ, symmetric).

    Attributes:
      scale: mirror tree (``None`` at unselected leaves): float32 ``(1, ..., 1, C)`` or ``()``,
        the trained step sizes. ``update`` leaves them alone: the user's optimizer trains them
        (see :func:`scales` and :func:`with_scales`).
    """

    scale: Any


def _reduce_axes(leaf: Any, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(leaf.ndim - 1)) if per_channel else tuple(range(leaf.ndim))


def _range(x: jax.Array, per_channel: bool) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    axes = _reduce_axes(x, per_channel)
    lo = jnp.min(jnp.where(finite, x, 0.0), axis=axes, keepdims=per_channel)
    hi = jnp.max(jnp.where(finite, x, 0.0), axis=axes, keepdims=per_channel)
    return lo, hi


def _lsq_init(x: jax.Array, per_channel: bool, g: Grid) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    axes = _reduce_axes(x, per_channel)
    count = jnp.maximum(jnp.sum(finite, axis=axes, keepdims=per_channel), 1)
    mean_abs = jnp.sum(jnp.where(finite, jnp.abs(x), 0.0), axis=axes, keepdims=per_channel) / count
    s = 2.0 * mean_abs / np.sqrt(g.qmax)
    return jnp.where(s > 0, jnp.maximum(s, TINY), 1.0)


def fake_quant(
    bits: int = 8,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    narrow_range: bool = True,
    scale: str | None = None,
    ste: str = "clipped",
    learnable_scale: bool = False,
    update_every: int = 1,
    where: select.Where = None,
) -> ParamTransform:
    """Weight fake-quantization (quantize -> dequantize in ``apply``) as a ParamTransform.

    ``apply`` returns the dequantized view, whose gradient follows ``ste`` (module docstring).
    It quantizes whatever view it receives, so in ``chain(prune, quant)`` zeros stay zero, and
    after clustering it quantizes the codebook values.

    Scales: by default they are statistics of the weights, computed by ``init`` and recomputed by
    ``update`` on the view of the transforms before it, at every step that is a multiple of
    ``update_every`` (inside ``jit`` via ``lax.cond``, like :func:`mixjax.prune.magnitude`'s
    masks). With the default ``update_every=1`` the view always uses the range of the parameters
    it is applied to, as long as ``update`` runs after each optimizer step; with ``k > 1`` the
    scales lag the weights by up to ``k - 1`` steps (a weight that outgrows its channel's range
    saturates until the next refresh), which saves the per-step range reductions in a training
    step (e.g. ``k = 10``, as masks). ``init`` always computes them. With
    ``learnable_scale=True`` (LSQ) they start at ``2 * mean|w| / sqrt(qmax)`` and are trained:
    they live in the state (an :class:`LsqState`), ``jax.grad`` reaches them through ``apply``
    (gradient scale ``1 / sqrt(N * qmax)``), and :func:`scales` / :func:`with_scales` take them
    out of, and put them back into, any (e.g. chained) state for the optimizer.

    Args:
      bits: grid width, 2 to 16 (4 and 8 map to packed int4 / int8 in :mod:`mixjax.export`).
      symmetric: zero point 0 (default); else an integer zero point per scale.
      per_channel: one scale per output channel (a kernel's last axis); else one per tensor.
      narrow_range: use ``[-qmax, qmax]`` instead of ``[-qmax - 1, qmax]``.
      scale: ``"absmax"`` or ``"minmax"`` (see :func:`qparams`); default ``"absmax"`` when
        symmetric, ``"minmax"`` otherwise (the only asymmetric rule).
      ste: ``"clipped"`` or ``"identity"`` straight-through gradient.
      learnable_scale: LSQ step sizes (symmetric only).
      update_every: ``k >= 1``; ``update`` recomputes the scales at steps ``t`` with
        ``t % k == 0`` and returns the state unchanged at other steps (ignored with
        ``learnable_scale``, whose scales are trained).
      where: which leaves to quantize (:mod:`mixjax.select`); default: float kernels, ndim >= 2.

    Returns:
      A :class:`mixjax.core.ParamTransform` whose state is a :class:`FakeQuantState` (or an
      :class:`LsqState`).

    Raises:
      TypeError / ValueError (here): bad ``bits``, ``ste``, ``scale``, ``update_every`` or
        combinations.
      ValueError (in ``init``): per-channel scales asked for a leaf with ``ndim < 2``; a selected
        leaf holds NaN/Inf.
    """
    name = "mixjax.quant.fake_quant"
    g = grid(bits, narrow_range=narrow_range, fn_name=name)
    if ste not in STE_RULES:
        raise ValueError(f"{name}: ste must be one of {STE_RULES}, got ste={ste!r}")
    if learnable_scale and not symmetric:
        raise ValueError(f"{name}: learnable_scale=True (LSQ) needs symmetric=True, got False")
    if learnable_scale and scale is not None:
        raise ValueError(
            f"{name}: scale= does not apply with learnable_scale=True (LSQ starts from "
            f"2*mean|w|/sqrt(qmax)), got scale={scale!r}"
        )
    if scale is None:
        scale = "absmax" if symmetric else "minmax"
    if scale not in SCALE_RULES:
        raise ValueError(f"{name}: scale must be one of {SCALE_RULES}, got scale={scale!r}")
    if scale == "absmax" and not symmetric:
        raise ValueError(f"{name}: asymmetric quantization uses scale='minmax', got 'absmax'")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"{name}: update_every must be an integer >= 1, got {update_every!r}")

    def weight_qparams(x):
        lo, hi = _range(x, per_channel)
        return qparams(lo, hi, g, symmetric=symmetric, scale=scale)

    def check_leaf(path, leaf):
        if per_channel and leaf.ndim < 2:
            raise ValueError(
                f"{name}: {select.describe(path, leaf)}: per_channel=True needs ndim >= 2 "
                "(one scale per output channel, the last axis); use per_channel=False or a "
                "where= that skips it"
            )
        if not isinstance(leaf, jax.core.Tracer):
            bad = int(np.size(leaf) - np.isfinite(np.asarray(leaf, np.float32)).sum())
            if bad:
                raise ValueError(
                    f"{name}: {select.describe(path, leaf)} holds {bad} non-finite values "
                    "(NaN/Inf); quantization scales need finite weights"
                )

    def init_fn(params):
        chosen = select.selection(name, params, where)
        select.mirror(check_leaf, params, chosen)
        if learnable_scale:
            return LsqState(
                select.mirror(lambda p, x: _lsq_init(x, per_channel, g), params, chosen)
            )
        pairs = select.mirror(lambda p, x: weight_qparams(x), params, chosen)
        return _split_pairs(params, pairs)

    def apply_fn(params, state):
        select.check_mirror(name, params, state.scale, "state.scale")
        zero_points = None if learnable_scale else state.zero_point

        def leaf_fn(kp, x, s, *z):
            if s is None:
                return x
            path = select.path_str(kp)
            expected = tuple(1 for _ in x.shape[:-1]) + x.shape[-1:] if per_channel else ()
            if tuple(jnp.shape(s)) != expected:
                raise ValueError(
                    f"{name}: {select.describe(path, x)}: state scale has shape "
                    f"{tuple(jnp.shape(s))}, expected {expected} (was the state made by init "
                    "on these params?)"
                )
            if learnable_scale:
                n = x.size // max(int(np.prod(jnp.shape(s))), 1)
                return fake_quantize(x, s, 0.0, g, ste=ste, grad_scale=1.0 / np.sqrt(n * g.qmax))
            return fake_quantize(
                x, jax.lax.stop_gradient(s), jax.lax.stop_gradient(z[0]), g, ste=ste
            )

        rest = () if zero_points is None else (zero_points,)
        return jax.tree_util.tree_map_with_path(leaf_fn, params, state.scale, *rest)

    def update_fn(params, state, step, **extra):
        del extra
        if learnable_scale:
            return state
        chosen = jax.tree.map(lambda p, s: s is not None, params, state.scale)

        def refresh():
            pairs = select.mirror(lambda p, x: weight_qparams(x), params, chosen)
            return _split_pairs(params, pairs)

        if update_every == 1:
            return refresh()
        return jax.lax.cond(due(jnp.asarray(step)), refresh, lambda: state)

    if learnable_scale:
        due = never
    else:
        due = every_step if update_every == 1 else multiples_of(update_every)
    return ParamTransform(init_fn, apply_fn, update_fn, due=due)


def _split_pairs(params: Any, pairs: Any) -> FakeQuantState:
    first = jax.tree.map(lambda p, t: None if t is None else t[0], params, pairs)
    second = jax.tree.map(lambda p, t: None if t is None else t[1], params, pairs)
    return FakeQuantState(first, second)


def _is_lsq(node: Any) -> bool:
    return isinstance(node, LsqState)


def scales(state: Any) -> Any:
    """The trainable LSQ scales of ``state`` (any nesting, e.g. a ``chain`` tuple) as a pytree.

    Every :class:`LsqState` in ``state`` becomes its ``scale`` mirror tree; every other leaf
    becomes ``None``. Differentiate a loss w.r.t. this tree and update it with any optax
    optimizer, then put it back with :func:`with_scales`::

        def loss(params, s):
            view = transform.apply(params, mixjax.quant.with_scales(state, s))
            ...
        g_params, g_scales = jax.grad(loss, argnums=(0, 1))(params, mixjax.quant.scales(state))
    """
    return jax.tree.map(lambda n: n.scale if _is_lsq(n) else None, state, is_leaf=_is_lsq)


def with_scales(state: Any, new_scales: Any) -> Any:
    """``state`` with each :class:`LsqState`'s scales replaced from a :func:`scales` tree."""
    return jax.tree.map(
        lambda n, s: n._replace(scale=s) if _is_lsq(n) else n, state, new_scales, is_leaf=_is_lsq
    )
