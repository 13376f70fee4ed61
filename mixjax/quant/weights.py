"""Weight fake-quantization with scales taken from the weights: :func:`fake_quant`.

``apply`` quantizes and dequantizes each selected leaf on its grid (:mod:`mixjax.quant.grids`)
with a straight-through gradient; the scales (and zero points) are statistics of the weights,
computed by ``init`` and refreshed by ``update``. :func:`mixjax.quant.lsq` is the variant whose
scales are learned instead. The helpers here (per-channel axes, the checks of a selected leaf
and of a state's scales) serve both.

Per channel means per output feature. Without layouts that is the last axis of a kernel (the
rank convention of linen ``Dense``/``Conv``), so a leaf ``(..., C)`` has scales of shape ``(1,
..., 1, C)``; with ``layouts=`` (:func:`mixjax.layout.learn`) it is every output axis of the
leaf: a linen query kernel ``(embed, heads, head_dim)`` gets scales ``(1, heads, head_dim)``, one
per output feature of every head. Per tensor, ``()``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, select
from mixjax import layout as layout_lib
from mixjax.core import ParamTransform, multiples_of, update_when_due
from mixjax.layout import Layout
from mixjax.quant.grids import SCALE_RULES, STE_RULES, fake_quantize, grid, qparams

__all__ = [
    "FakeQuantState",
    "check_scales",
    "fake_quant",
    "reduce_axes",
    "scale_shape",
    "selected_weights",
    "weight_range",
]


class FakeQuantState(NamedTuple):
    """State of :func:`fake_quant`.

    Attributes:
      scale: mirror tree (``None`` at unselected leaves): float32 of :func:`scale_shape` per
        output feature (``(1, ..., 1, C)`` without layouts) or ``()`` per tensor.
      zero_point: mirror tree like ``scale``: float32 integer values (zeros when symmetric).
    """

    scale: Any
    zero_point: Any


def reduce_axes(leaf: Any, per_channel: bool, layout: Layout | None = None) -> tuple[int, ...]:
    """The axes a leaf's scale statistics reduce over: all but the output axes per channel
    (:func:`mixjax.layout.out_axes`), else all."""
    keep = layout_lib.out_axes(leaf, layout) if per_channel else ()
    return tuple(a for a in range(np.ndim(leaf)) if a not in keep)


def scale_shape(leaf: Any, per_channel: bool, layout: Layout | None = None) -> tuple[int, ...]:
    """The leaf's shape with 1 on the :func:`reduce_axes` per channel (``(1, ..., 1, C)`` without
    a layout), ``()`` per tensor."""
    if not per_channel:
        return ()
    axes = reduce_axes(leaf, per_channel, layout)
    return tuple(1 if a in axes else n for a, n in enumerate(np.shape(leaf)))


def weight_range(
    x: jax.Array, per_channel: bool, layout: Layout | None = None
) -> tuple[jax.Array, jax.Array]:
    """The smallest and largest finite entries of ``x`` (0 where none), per channel or tensor."""
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    axes = reduce_axes(x, per_channel, layout)
    lo = jnp.min(jnp.where(finite, x, 0.0), axis=axes, keepdims=per_channel)
    hi = jnp.max(jnp.where(finite, x, 0.0), axis=axes, keepdims=per_channel)
    return lo, hi


def selected_weights(
    fn_name: str,
    params: Any,
    where: select.Where,
    per_channel: bool,
    layouts: dict[str, Layout | None] | None = None,
) -> Any:
    """The selection of ``where`` in ``params`` (:func:`mixjax.select.selection`), checked.

    With ``layouts`` (``{path: layout}``, :func:`mixjax.layout.by_path`) the default selection is
    the kernels a matmul or convolution consumes: embedding tables are quantized only when a
    ``where`` asks for them. Each selected leaf must have ``ndim >= 2`` when ``per_channel``
    without a layout, and a layout when ``per_channel`` with layouts; a *concrete* selected leaf
    must be finite. Under a trace (``init`` inside ``jax.jit``) the values are unknown and only
    the shapes are checked: non-finite weights then pass through the view unchanged.

    Raises:
      ValueError: a per-channel leaf with ``ndim < 2`` or without a layout; a concrete leaf
        holding NaN/Inf.
    """
    if layouts is not None and where is None:
        where = lambda p, leaf: (  # noqa: E731
            select.is_floating(leaf) and getattr(layouts[p], "kind", None) in ("dense", "conv")
        )

    def check(path, leaf):
        if per_channel and layouts is not None and layouts[path] is None:
            raise ValueError(
                f"{fn_name}: {select.describe(path, leaf)} is selected by where= but no matmul, "
                "convolution or table lookup consumes it, so it has no output features for "
                "per_channel=True; use per_channel=False or a where= that skips it"
            )
        if per_channel and layouts is None and leaf.ndim < 2:
            raise ValueError(
                f"{fn_name}: {select.describe(path, leaf)}: per_channel=True needs ndim >= 2 "
                "(one scale per output channel, the last axis); use per_channel=False or a "
                "where= that skips it"
            )
        if not isinstance(leaf, jax.core.Tracer):
            bad = int(np.size(leaf) - np.isfinite(np.asarray(leaf, np.float32)).sum())
            if bad:
                raise ValueError(
                    f"{fn_name}: {select.describe(path, leaf)} holds {bad} non-finite values "
                    "(NaN/Inf); quantization scales need finite weights"
                )

    chosen = select.selection(fn_name, params, where)
    select.mirror(check, params, chosen)
    return chosen


def check_scales(
    fn_name: str,
    params: Any,
    scales: Any,
    per_channel: bool,
    layouts: dict[str, Layout | None] | None = None,
) -> None:
    """Raises ``ValueError`` unless ``scales`` mirrors ``params`` with :func:`scale_shape` s."""
    select.check_mirror(fn_name, params, scales, "state.scale")

    def check(path, x, s):
        expected = scale_shape(x, per_channel, None if layouts is None else layouts[path])
        if s is not None and tuple(jnp.shape(s)) != expected:
            raise ValueError(
                f"{fn_name}: {select.describe(path, x)}: state scale has shape "
                f"{tuple(jnp.shape(s))}, expected {expected} (was the state made by init on "
                "these params?)"
            )

    jax.tree_util.tree_map_with_path(
        lambda kp, x, s: check(select.path_str(kp), x, s), params, scales
    )


def fake_quant(
    bits: int = 8,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    narrow_range: bool = True,
    scale: str | None = None,
    ste: str = "clipped",
    update_every: int = 1,
    where: select.Where = None,
    layouts: Any = None,
) -> ParamTransform:
    """Weight fake-quantization (quantize -> dequantize in ``apply``) as a ParamTransform.

    ``apply`` returns the dequantized view, whose gradient follows ``ste``
    (:mod:`mixjax.quant.grids`). It quantizes whatever view it receives, so in
    ``chain(prune, quant)`` zeros stay zero, and after clustering it quantizes the codebook
    values.

    Scales are statistics of the weights, computed by ``init`` and recomputed by ``update`` on
    the view of the transforms before it, at the steps that are multiples of ``update_every``
    (:func:`mixjax.update_when_due`). With the default ``update_every=1`` the view always uses
    the range of the parameters it is applied to, as long as ``update`` runs after each
    optimizer step; with ``k > 1`` the scales lag the weights by up to ``k - 1`` steps (a
    weight that outgrows its channel's range saturates until the next refresh), which saves the
    per-step range reductions in a training step (e.g. ``k = 10``, as masks). For scales trained
    by gradient descent use :func:`mixjax.quant.lsq`.

    Args:
      bits: grid width, 2 to 16 (4 and 8 map to packed int4 / int8 in :mod:`mixjax.export`).
      symmetric: zero point 0 (default); else an integer zero point per scale.
      per_channel: one scale per output feature (a kernel's last axis, or with ``layouts`` all
        its output axes); else one per tensor.
      narrow_range: use ``[-qmax, qmax]`` instead of ``[-qmax - 1, qmax]``.
      scale: ``"absmax"`` or ``"minmax"`` (see :func:`mixjax.quant.qparams`); default
        ``"absmax"`` when symmetric, ``"minmax"`` otherwise (the only asymmetric rule).
      ste: ``"clipped"`` or ``"identity"`` straight-through gradient.
      update_every: ``k >= 1``; ``update`` recomputes the scales at steps ``t`` with
        ``t % k == 0`` and returns the state unchanged at other steps.
      where: which leaves to quantize (:mod:`mixjax.select`); default: float kernels, ndim >= 2
        (with ``layouts``: the kernels a matmul or convolution consumes, not embedding tables).
      layouts: the tree of :class:`mixjax.layout.Layout` of the params
        (:func:`mixjax.layout.learn`), which says where each kernel's output features are.

    Returns:
      A :class:`mixjax.ParamTransform` whose state is a :class:`FakeQuantState`.

    Raises:
      TypeError / ValueError (here): bad ``bits``, ``ste``, ``scale``, ``update_every`` or
        combinations.
      ValueError (in ``init``): per-channel scales asked for a leaf with ``ndim < 2``; a
        selected leaf holds NaN/Inf (checked where ``init`` sees concrete values, not under
        ``jax.jit``: see :func:`selected_weights`).
    """
    name = "mixjax.quant.fake_quant"
    g = grid(bits, narrow_range=narrow_range, fn_name=name)
    _checks.choice(name, "ste", ste, STE_RULES)
    symmetric = _checks.boolean(name, "symmetric", symmetric)
    per_channel = _checks.boolean(name, "per_channel", per_channel)
    if scale is None:
        scale = "absmax" if symmetric else "minmax"
    _checks.choice(name, "scale", scale, SCALE_RULES)
    if scale == "absmax" and not symmetric:
        raise ValueError(f"{name}: asymmetric quantization uses scale='minmax', got 'absmax'")
    due = multiples_of(_checks.integer(name, "update_every", update_every, 1))

    def state_of(params, chosen):
        found = layout_lib.by_path(name, params, layouts) or {}
        pairs = select.mirror(
            lambda p, x: qparams(
                *weight_range(x, per_channel, found.get(p)), g, symmetric=symmetric, scale=scale
            ),
            params,
            chosen,
        )
        first = jax.tree.map(lambda p, t: None if t is None else t[0], params, pairs)
        second = jax.tree.map(lambda p, t: None if t is None else t[1], params, pairs)
        return FakeQuantState(first, second)

    def init_fn(params):
        found = layout_lib.by_path(name, params, layouts)
        return state_of(params, selected_weights(name, params, where, per_channel, found))

    def apply_fn(params, state):
        _checks.instance(name, "state", state, FakeQuantState, "a FakeQuantState")
        check_scales(
            name, params, state.scale, per_channel, layout_lib.by_path(name, params, layouts)
        )
        return jax.tree.map(
            lambda x, s, z: (
                x
                if s is None
                else fake_quantize(
                    x, jax.lax.stop_gradient(s), jax.lax.stop_gradient(z), g, ste=ste
                )
            ),
            params,
            state.scale,
            state.zero_point,
        )

    def update_fn(params, state, step, **extra):
        del extra
        chosen = jax.tree.map(lambda p, s: s is not None, params, state.scale)
        return update_when_due(due, step, lambda: state_of(params, chosen), state)

    return ParamTransform(init_fn, apply_fn, update_fn, due=due)
