"""Weight fake-quantization with scales taken from the weights: :func:`fake_quant`.

``apply`` quantizes and dequantizes each selected leaf on its grid (:mod:`mixjax.quant.grids`)
with a straight-through gradient; the scales (and zero points) are statistics of the weights,
computed by ``init`` and refreshed by ``update``. :func:`mixjax.quant.lsq` is the variant whose
scales are learned instead. The helpers here (where a leaf's scales go, the checks of a selected
leaf and of a state's scales) serve both.

Where the scales go (:func:`scale_shape`, a block broadcast of the leaf:
:func:`mixjax.quant.grids.expand_scale`):

* per channel means per output feature. Without layouts that is the last axis of a kernel (the
  rank convention of linen ``Dense``/``Conv``), so a leaf ``(..., C)`` has scales of shape
  ``(1, ..., 1, C)``; with ``layouts=`` (:func:`mixjax.layout.learn`) it is every output axis of
  the leaf: a linen query kernel ``(embed, heads, head_dim)`` gets scales ``(1, heads,
  head_dim)``, one per output feature of every head. Per tensor, ``()``;
* group-wise (``group_size=g``, GPTQ-style int4 groups): one scale per ``g`` consecutive
  entries along the :func:`group_axis` (the last of the layout's contraction axes, the innermost
  one of the flattened contraction; without layouts axis ``-2``, the ``in`` of ``(..., in,
  out)``), so per output feature and per group of the flattened contraction, stored compactly:
  the leaf's shape with ``n / g`` on that axis. A Dense kernel ``(n, C)`` gets ``(n / g, C)``,
  an attention output kernel ``(heads, head_dim, embed)`` with layouts ``(heads, head_dim / g,
  embed)`` (a group never spans two heads), a Conv kernel ``(h, w, in, C)`` ``(h, w, in / g,
  C)``: every scale covers exactly ``g`` weights, whatever the kernel's rank;
* after clustering (:meth:`ScaleBlocks.shape`): in :func:`mixjax.chain`, a leaf whose input view
  shares values on blocks (:attr:`mixjax.ParamTransform.shares`, e.g. ``share.cluster(16)``:
  one block per tensor, or per output feature with ``per_channel=True``) gets scales on the
  coarsest blocks that contain both its own and the shared ones (per axis, the gcd of the two
  block shapes' sizes): every member of a shared block then has the same scale, so equal values
  stay equal and a 16-cluster kernel keeps at most 16 values (per block), all on the integer
  grid. Clustered per tensor, such a leaf has one scale ``()`` even with ``per_channel=True``;
  clustered per output feature, the per-channel shape (group-wise scales coarsen to it);
* per input feature as well (given scales only: :attr:`FakeQuantState.input_scale`, AWQ's):
  each value is ``(q - zero_point) * scale * a`` with ``a`` per entry of the contraction, so the
  scale of a weight is the product of its group's and its input feature's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, select
from mixjax import layout as layout_lib
from mixjax.core import ParamTransform, multiples_of, never, update_when_due
from mixjax.layout import Layout
from mixjax.quant.grids import SCALE_RULES, STE_RULES, fake_quantize, grid, qparams

__all__ = [
    "FakeQuantState",
    "ScaleBlocks",
    "block_reduce",
    "check_group_size",
    "check_scales",
    "fake_quant",
    "fake_quantize_scaled",
    "group_axis",
    "input_scales",
    "scale_shape",
    "selected_weights",
    "weight_range",
]


class FakeQuantState(NamedTuple):
    """State of :func:`fake_quant`.

    Attributes:
      scale: mirror tree (``None`` at unselected leaves): float32 of the leaf's
        :meth:`ScaleBlocks.shape`: ``(1, ..., 1, C)`` per output feature without layouts, the
        leaf's shape with ``n / g`` on the :func:`group_axis` for ``group_size=g``, ``()`` per
        tensor (and for leaves clustered per tensor before it in a chain).
      zero_point: mirror tree like ``scale``: float32 integer values (zeros when symmetric).
      input_scale: ``None``, or (given scales only, e.g. AWQ's: :func:`mixjax.quant.awq`) a
        mirror tree of float32 factors per input feature: the leaf's shape with 1 on its output
        axes (``(n, 1)`` for an ``(n, C)`` kernel, ``(h, w, in, 1)`` for a conv), ``None`` at
        leaves without. The view is then ``fake_quantize(x / a, scale, zero_point) * a``: the
        integer codes are those of ``x / a`` and each value is ``(q - zero_point) * scale * a``,
        so a layer computes ``(inputs * a) @ ((q - zero_point) * scale)``.
    """

    scale: Any
    zero_point: Any
    input_scale: Any = None


def group_axis(leaf: Any, layout: Layout | None = None) -> int:
    """The axis along which ``group_size`` groups run: the last of the layout's contraction axes
    (the innermost of the flattened contraction), else axis ``-2`` (as a non-negative index)."""
    return layout.contract[-1] if layout is not None else np.ndim(leaf) - 2


def scale_shape(
    leaf: Any, per_channel: bool, layout: Layout | None = None, group_size: int | None = None
) -> tuple[int, ...]:
    """A leaf's scale shape (module docstring): ``()`` per tensor; per channel the leaf's shape
    with 1 on all but the output axes (:func:`mixjax.layout.out_axes`); group-wise (with
    ``per_channel``) the leaf's shape with ``n / group_size`` on the :func:`group_axis`
    (``group_size`` must divide ``n``)."""
    if not per_channel:
        return ()
    shape = list(np.shape(leaf))
    if group_size is not None:
        shape[group_axis(leaf, layout)] //= group_size
        return tuple(shape)
    keep = layout_lib.out_axes(leaf, layout)
    return tuple(n if a in keep else 1 for a, n in enumerate(shape))


def _coarsen(own: tuple[int, ...], shared: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The finest block shape whose blocks are unions of both shapes' blocks (per axis, the gcd
    of the sizes: groups of ``n / a`` and of ``n / b`` entries both fit in groups of
    ``n / gcd(a, b)``); ``()`` when that is one block."""
    ones = (1,) * ndim
    out = tuple(math.gcd(a, b) for a, b in zip(own or ones, shared or ones, strict=True))
    return () if out == ones else out


class ScaleBlocks(NamedTuple):
    """Where a weight quantizer's scales go: :func:`fake_quant`'s and :func:`~mixjax.quant.lsq`'s
    static configuration of them.

    Attributes:
      per_channel: one scale per output feature (else per tensor).
      group_size: ``g`` for group-wise scales along the :func:`group_axis`, or ``None``.
      shared: ``{path: block shape}`` of the leaves whose input view shares values on blocks
        (:attr:`mixjax.ParamTransform.shares` of the transforms before it in a chain);
        ``{}`` outside a chain.
    """

    per_channel: bool
    group_size: int | None = None
    shared: Mapping[str, tuple[int, ...]] = {}

    def shape(self, path: str, leaf: Any, layout: Layout | None) -> tuple[int, ...]:
        """The scale shape of the leaf at ``path``: :func:`scale_shape`, coarsened to the shared
        blocks where its input view shares values (module docstring)."""
        own = scale_shape(leaf, self.per_channel, layout, self.group_size)
        if path not in self.shared:
            return own
        return _coarsen(own, tuple(self.shared[path]), np.ndim(leaf))


def block_reduce(x: jax.Array, shape: tuple[int, ...], reduce: Any) -> jax.Array:
    """``reduce`` (e.g. ``jnp.max``) of ``x`` over each block of the block-broadcast ``shape``.

    Each axis of size ``n`` is split into ``(d, n / d)`` for a ``shape`` entry ``d`` and the
    ``n / d`` parts are reduced, so the result has exactly ``shape`` (``()``: the whole tensor).
    """
    if shape == ():
        return reduce(x)
    split = [part for d, n in zip(shape, x.shape, strict=True) for part in (d, n // d)]
    return reduce(x.reshape(split), axis=tuple(range(1, 2 * x.ndim, 2)))


def weight_range(x: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The smallest and largest finite entries of ``x`` (0 where none) per block of ``shape``."""
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    lo = block_reduce(jnp.where(finite, x, 0.0), shape, jnp.min)
    hi = block_reduce(jnp.where(finite, x, 0.0), shape, jnp.max)
    return lo, hi


def selected_weights(
    fn_name: str,
    params: Any,
    where: select.Where,
    per_channel: bool,
    layouts: dict[str, Layout | None] | None = None,
    group_size: int | None = None,
) -> Any:
    """The selection of ``where`` in ``params`` (:func:`mixjax.select.selection`), checked.

    With ``layouts`` (``{path: layout}``, :func:`mixjax.layout.by_path`) the default selection is
    the kernels a matmul or convolution consumes: embedding tables are quantized only when a
    ``where`` asks for them. Each selected leaf must have ``ndim >= 2`` when ``per_channel``
    without a layout, and a layout when ``per_channel`` with layouts; ``group_size`` must divide
    its :func:`group_axis`; a *concrete* selected leaf must be finite. Under a trace (``init``
    inside ``jax.jit``) the values are unknown and only the shapes are checked: non-finite
    weights then pass through the view unchanged.

    Raises:
      ValueError: a per-channel leaf with ``ndim < 2`` or without a layout; a group axis that
        ``group_size`` does not divide; a concrete leaf holding NaN/Inf.
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
        layout = None if layouts is None else layouts[path]
        axis = None if group_size is None else group_axis(leaf, layout)
        if axis is not None and leaf.shape[axis] % group_size:
            which = "its layout's last contraction axis" if layout else "the input axis (-2)"
            raise ValueError(
                f"{fn_name}: {select.describe(path, leaf)}: group_size={group_size} does not "
                f"divide axis {axis} ({leaf.shape[axis]} entries), {which} that groups run along"
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
    blocks: ScaleBlocks,
    layouts: dict[str, Layout | None] | None = None,
) -> None:
    """Raises ``ValueError`` unless ``scales`` mirrors ``params`` with the shapes ``blocks``
    gives (:meth:`ScaleBlocks.shape`)."""
    select.check_mirror(fn_name, params, scales, "state.scale")

    def check(path, x, s):
        expected = blocks.shape(path, x, None if layouts is None else layouts[path])
        if s is not None and tuple(jnp.shape(s)) != expected:
            raise ValueError(
                f"{fn_name}: {select.describe(path, x)}: state scale has shape "
                f"{tuple(jnp.shape(s))}, expected {expected} (was the state made by init on "
                "these params?)"
            )

    jax.tree_util.tree_map_with_path(
        lambda kp, x, s: check(select.path_str(kp), x, s), params, scales
    )


def input_scales(
    fn_name: str,
    params: Any,
    state: FakeQuantState,
    layouts: dict[str, Layout | None] | None = None,
) -> Any:
    """``state.input_scale`` as a mirror tree of ``params`` (``None`` leaves where there is none),
    checked: each factor has its leaf's shape with 1 on the output axes
    (:func:`mixjax.layout.out_axes`), and (where concrete) is finite and positive.

    Raises:
      ValueError: a factor tree that does not mirror ``params``; a factor at a leaf without a
        scale, of another shape, or not finite and positive (named with the leaf).
    """
    if state.input_scale is None:
        return jax.tree.map(lambda _: None, params)
    select.check_mirror(fn_name, params, state.input_scale, "state.input_scale")

    def check(kp, x, a, s):
        if a is None:
            return
        path = select.path_str(kp)
        where = select.describe(path, x)
        if s is None:
            raise ValueError(f"{fn_name}: {where} has an input scale but no scale")
        out = layout_lib.out_axes(x, None if layouts is None else layouts[path])
        expected = tuple(1 if axis in out else n for axis, n in enumerate(np.shape(x)))
        if tuple(jnp.shape(a)) != expected:
            raise ValueError(
                f"{fn_name}: {where}: input scale of shape {tuple(jnp.shape(a))}, expected "
                f"{expected} (the leaf's shape with 1 on its output axes)"
            )
        if not isinstance(a, jax.core.Tracer) and not np.all(np.isfinite(a) & (np.asarray(a) > 0)):
            raise ValueError(f"{fn_name}: {where}: input scales must be finite and positive")

    jax.tree_util.tree_map_with_path(check, params, state.input_scale, state.scale)
    return state.input_scale


def fake_quantize_scaled(
    x: jax.Array, scale: Any, zero_point: Any, input_scale: Any, g: Any, *, ste: str
) -> jax.Array:
    """``fake_quantize`` of ``x`` with fixed (gradient-stopped) scales; with an ``input_scale``
    ``a`` (:class:`FakeQuantState`), ``fake_quantize(x / a) * a`` (its gradient is the STE's:
    the factors cancel)."""
    scale, zero_point = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(zero_point)
    if input_scale is None:
        return fake_quantize(x, scale, zero_point, g, ste=ste)
    a = jax.lax.stop_gradient(jnp.asarray(input_scale, jnp.float32))
    return (fake_quantize(x / a, scale, zero_point, g, ste=ste) * a).astype(x.dtype)


def check_group_size(fn_name: str, group_size: int | None, per_channel: bool) -> int | None:
    """``group_size``, checked: ``None`` or an integer ``>= 1``, only with ``per_channel``."""
    group_size = _checks.integer(fn_name, "group_size", group_size, 1, optional=True)
    if group_size is not None and not per_channel:
        raise ValueError(
            f"{fn_name}: group_size={group_size} needs per_channel=True (one scale per output "
            "feature and group), got per_channel=False"
        )
    return group_size


def fake_quant(
    bits: int = 8,
    *,
    symmetric: bool = True,
    per_channel: bool = True,
    group_size: int | None = None,
    narrow_range: bool = True,
    scale: str | None = None,
    ste: str = "clipped",
    update_every: int = 1,
    where: select.Where = None,
    layouts: Any = None,
    scales: FakeQuantState | None = None,
) -> ParamTransform:
    """Weight fake-quantization (quantize -> dequantize in ``apply``) as a ParamTransform.

    ``apply`` returns the dequantized view, whose gradient follows ``ste``
    (:mod:`mixjax.quant.grids`). It quantizes whatever view it receives, so in
    ``chain(prune, quant)`` zeros stay zero, and in ``chain(prune, share.cluster(16), quant)``
    it quantizes the shared values on the clustering's blocks (module docstring): each kernel
    keeps at most 16 values (per output feature, for per-channel clustering), all on its integer
    grid, and :func:`mixjax.export.compress` stores it as a codebook of integers.

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
      group_size: ``g``: one scale per ``g`` consecutive entries along the :func:`group_axis`
        (so per output feature and group; needs ``per_channel``; ``g`` must divide that axis):
        scales of the leaf's shape with ``n / g`` on that axis, ``(n / g, C)`` for an ``(n,
        C)`` kernel. ``None``: no groups.
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
      scales: given scales that never change (e.g. those GPTQ chose: :mod:`mixjax.oneshot`):
        ``init`` returns them (checked to have the shapes above; the leaves where
        ``scales.scale`` is ``None`` are not quantized, whatever ``where`` says) and ``update``
        keeps them (``due`` is :func:`mixjax.never`); fine-tuning then keeps the grid. Its
        ``input_scale`` (AWQ's per-input-feature factors, :class:`FakeQuantState`) is kept too.
        ``None`` (default): scales from the weights' range, refreshed as above.

    Returns:
      A :class:`mixjax.ParamTransform` whose state is a :class:`FakeQuantState`; its ``adapt``
      sets it up for shared values (:attr:`mixjax.ParamTransform.adapt`, used by
      :func:`mixjax.chain`).

    Raises:
      TypeError / ValueError (here): bad ``bits``, ``ste``, ``scale``, ``update_every``,
        ``group_size`` or combinations (``group_size`` without ``per_channel``).
      ValueError (in ``init``): per-channel scales asked for a leaf with ``ndim < 2``; a group
        axis that ``group_size`` does not divide; a selected leaf holds NaN/Inf (checked where
        ``init`` sees concrete values, not under ``jax.jit``: see :func:`selected_weights`).
    """
    name = "mixjax.quant.fake_quant"
    g = grid(bits, narrow_range=narrow_range, fn_name=name)
    _checks.choice(name, "ste", ste, STE_RULES)
    symmetric = _checks.boolean(name, "symmetric", symmetric)
    per_channel = _checks.boolean(name, "per_channel", per_channel)
    group_size = check_group_size(name, group_size, per_channel)
    if scale is None:
        scale = "absmax" if symmetric else "minmax"
    _checks.choice(name, "scale", scale, SCALE_RULES)
    if scale == "absmax" and not symmetric:
        raise ValueError(f"{name}: asymmetric quantization uses scale='minmax', got 'absmax'")
    due = multiples_of(_checks.integer(name, "update_every", update_every, 1))

    def build(blocks: ScaleBlocks) -> ParamTransform:
        def state_of(params, chosen):
            found = layout_lib.by_path(name, params, layouts) or {}
            pairs = select.mirror(
                lambda p, x: qparams(
                    *weight_range(x, blocks.shape(p, x, found.get(p))),
                    g,
                    symmetric=symmetric,
                    scale=scale,
                ),
                params,
                chosen,
            )
            first = jax.tree.map(lambda p, t: None if t is None else t[0], params, pairs)
            second = jax.tree.map(lambda p, t: None if t is None else t[1], params, pairs)
            return FakeQuantState(first, second)

        def init_fn(params):
            found = layout_lib.by_path(name, params, layouts)
            if scales is not None:
                check_scales(name, params, scales.scale, blocks, found)
                check_scales(name, params, scales.zero_point, blocks, found)
                input_scales(name, params, scales, found)
                return scales
            chosen = selected_weights(name, params, where, per_channel, found, group_size)
            return state_of(params, chosen)

        def apply_fn(params, state):
            _checks.instance(name, "state", state, FakeQuantState, "a FakeQuantState")
            found = layout_lib.by_path(name, params, layouts)
            check_scales(name, params, state.scale, blocks, found)
            factors = input_scales(name, params, state, found)
            return jax.tree.map(
                lambda x, s, z, a: x if s is None else fake_quantize_scaled(x, s, z, a, g, ste=ste),
                params,
                state.scale,
                state.zero_point,
                factors,
            )

        def update_fn(params, state, step, **extra):
            del extra
            if scales is not None:
                return state
            chosen = jax.tree.map(lambda p, s: s is not None, params, state.scale)
            return update_when_due(due, step, lambda: state_of(params, chosen), state)

        return ParamTransform(
            init_fn,
            apply_fn,
            update_fn,
            due=never if scales is not None else due,
            adapt=lambda shared: build(blocks._replace(shared=dict(shared))),
        )

    return build(ScaleBlocks(per_channel, group_size))
