"""Calibration: streaming statistics of the inputs of every matmul and convolution of a model.

:func:`capture` runs ``fn(params, *args)`` over calibration batches with the model's
``dot_general`` / ``conv_general_dilated`` sites intercepted (:mod:`mixjax._intercept`, the
machinery of activation quantization and integer inference, so any linen or NNX layer is
seen), and folds each selected layer's inputs into a :class:`LayerStats`, batch by batch: the
activations themselves are never kept, and memory is bounded by the statistics of the layers
asked for. :mod:`mixjax.oneshot` compresses layer by layer from them, with the per-layer
solvers of :mod:`mixjax.quant.layerwise`, :mod:`mixjax.prune.second_order` and
:mod:`mixjax.prune.scored`, written against the types here.

Every solver works on a layer's *matrix view* (:func:`matrix_layout`): the weight ``W`` of shape
``(K, O)``, its rows the input features (the contraction axes flattened, a conv's window axes
first and then its input channels, so group-wise scales along the last contraction axis are
consecutive rows) and its columns the output features; the inputs ``X`` of shape ``(N, K)``
(a convolution's im2col patches), so the layer computes ``X @ W``. The statistics are sums over
all ``N`` rows seen. A leaf consumed by several matmuls (a kernel applied twice) gets the sum of
their statistics, the objective of all its uses.

How a site's input columns meet the leaf's rows is read from the model, not assumed: the
structural steps between the leaf and the matmul's operand (:class:`mixjax._intercept.Chain`:
casts, reshapes, transposes) are replayed on the leaf's index array, which says, for every
contraction position of the operand, which row of the matrix view it multiplies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _intercept, select
from mixjax import layout as layout_lib
from mixjax.layout import Layout

if TYPE_CHECKING:
    from mixjax.quant.grids import Grid

__all__ = [
    "LayerStats",
    "Method",
    "QuantSpec",
    "Solution",
    "as_args",
    "capture",
    "matrix_layout",
    "sites",
]

_NAME = "mixjax.calibrate.capture"
_MATMULS = ("dense", "conv")


class LayerStats(NamedTuple):
    """Streaming statistics of one layer's inputs ``X`` ``(N, K)`` (float32, summed over rows).

    Attributes:
      gram: ``(K, K)``, ``X^T X`` (the layer Hessian of GPTQ / SparseGPT, up to a factor 2).
      abs_sum: ``(K,)``, ``sum_n |X[n, k]|`` (AWQ's activation magnitude, divided by ``count``).
      absmax: ``(K,)``, ``max_n |X[n, k]|``.
      count: ``()``, ``N``, the rows seen (float32).

    The squared norm of input feature ``k`` (Wanda's ``||X_k||_2^2``) is ``gram[k, k]``.
    """

    gram: jax.Array
    abs_sum: jax.Array
    absmax: jax.Array
    count: jax.Array


class Solution(NamedTuple):
    """One layer compressed, in the matrix view.

    Attributes:
      weight: ``(K, O)`` float32, the new weights: zero where ``mask`` is ``False``, and exactly on
        the grid of ``scale`` / ``zero_point`` (``quantize_dequantize`` returns it bit for bit)
        when those are given.
      mask: ``(K, O)`` bool (``True`` = kept), or ``None`` for a method that does not prune.
      scale: ``(K // group_size, O)`` group-wise, ``(1, O)`` per output feature, or ``None`` for a
        method that does not quantize.
      zero_point: the integer-valued float32 zero points, ``scale``'s shape (zeros when
        symmetric), or ``None``.
      input_scale: ``(K,)`` positive float32 factors per input feature (AWQ's): ``weight`` is
        then ``quantize_dequantize(w / a) * a`` with ``a`` broadcast along the columns
        (:attr:`mixjax.quant.FakeQuantState.input_scale`), else ``None``.
    """

    weight: jax.Array
    mask: jax.Array | None
    scale: jax.Array | None
    zero_point: jax.Array | None
    input_scale: jax.Array | None = None


class QuantSpec(NamedTuple):
    """The grid a quantizing method puts weights on (that of :func:`mixjax.quant.fake_quant`
    with the same arguments, so its transform reproduces the result).

    Attributes:
      bits: 2..8.
      group_size: ``g`` consecutive rows of the matrix view share a scale, or ``None`` (one per
        output feature).
      symmetric: zero point 0; else min/max with an integer zero point.
      narrow_range: ``[-qmax, qmax]`` instead of ``[-qmax - 1, qmax]``.
    """

    bits: int
    group_size: int | None
    symmetric: bool
    narrow_range: bool

    @property
    def grid(self) -> Grid:
        """The integer grid (:func:`mixjax.quant.grid`)."""
        # Imported here: the quantization family imports this module's types, so this module
        # must not import that family at load time.
        from mixjax.quant.grids import grid  # noqa: PLC0415

        return grid(self.bits, narrow_range=self.narrow_range)


class Method(NamedTuple):
    """A one-shot compression method, from a factory (:func:`mixjax.quant.gptq`, ...).

    Attributes:
      name: ``"gptq"``, ``"sparsegpt"``, ``"wanda"``, ``"rtn"``, ``"magnitude"``, ...
      solve: ``(weight (K, O) float32, stats: LayerStats) -> Solution``, pure and jit-able (the
        configuration is closed over).
      quant: the grid of a quantizing method, else ``None``.
      prunes: whether solutions carry masks.
      uses_inputs: whether ``solve`` reads ``stats`` (``False`` for round-to-nearest and
        magnitude, which need no calibration data).
    """

    name: str
    solve: Callable[[jax.Array, LayerStats], Solution]
    quant: QuantSpec | None
    prunes: bool
    uses_inputs: bool = True


# ----------------------------------------------------------------------------------------------
# Where a layer's inputs come from.


def matrix_layout(fn_name: str, path: str, leaf: Any, layout: Layout | None) -> Layout:
    """The layout whose :func:`mixjax.layout.to_matrix` is the solvers' ``(K, O)`` view of a leaf:
    the window axes, then the contraction axes, flattened into the rows; the output axes into the
    columns.

    Raises:
      ValueError: no matmul or convolution consumes the leaf (no layout, or an embedding table
        only gathered from), or its layout has batch axes (one matrix per expert, not one layer).
    """
    where = select.describe(path, leaf)
    if layout is None or layout.kind not in _MATMULS:
        kind = "no matmul or convolution" if layout is None else f"only a {layout.kind} lookup"
        raise ValueError(
            f"{fn_name}: {where}: {kind} consumes it, so it has no input statistics to compress "
            "from; choose it out with where="
        )
    if layout.batch:
        raise ValueError(
            f"{fn_name}: {where}: its layout {layout} has batch axes (independent matrices), "
            "which one-shot compression does not solve; choose it out with where="
        )
    return Layout(layout.kind, (*layout.window, *layout.contract), layout.out)


def as_args(batch: Any) -> tuple[Any, ...]:
    """A calibration batch as ``fn``'s inputs after the params: a tuple or list as it is, any
    other value (an array, a dict) as the only input."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def sites(
    fn: Callable[..., Any], params: Any, args: Sequence[Any], *, fn_name: str = _NAME
) -> tuple[list[_intercept.Site], dict[str, str]]:
    """The matmul and convolution sites of ``fn(params, *args)`` in evaluation order (traced, no
    FLOPs run), and ``{leaf path: why}`` for leaves consumed where the interceptor cannot see
    (``scan``, ``cond``, a custom derivative: :attr:`mixjax._intercept.Run.hidden`)."""
    found: list[Any] = []

    def trace(params, args):
        result = _intercept.run(fn, params, args, fn_name=fn_name)
        found.append(result)
        return result.out

    jax.eval_shape(trace, params, list(args))
    run = found[0]
    return [s for s in run.sites if s.kind in _MATMULS], dict(run.hidden)


def _operand_rows(site: _intercept.Site, leaf_shape: tuple[int, ...], view: Layout) -> np.ndarray:
    """For each contraction position of the site's input (in the order :func:`_site_inputs`
    flattens it), the row of the leaf's matrix view it multiplies (module docstring)."""
    with jax.ensure_compile_time_eval():
        flat = jnp.arange(int(np.prod(leaf_shape)), dtype=jnp.int32)
        index = np.asarray(site.chain.replay(flat.reshape(leaf_shape)))
    params = site.eqn.params
    if site.kind == "dense":
        (lhs_c, rhs_c), (lhs_b, rhs_b) = params["dimension_numbers"]
        contract, batch = (rhs_c, rhs_b) if site.weight == 1 else (lhs_c, lhs_b)
        if batch:
            raise _Unsupported("a batched matmul (dot_general batch dimensions on the weight)")
        order = [*contract, *(a for a in range(index.ndim) if a not in contract)]
        inner = len(contract)
    else:
        if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
            raise _Unsupported("a grouped (e.g. depthwise) convolution")
        rhs = params["dimension_numbers"].rhs_spec
        order, inner = [rhs[1], *rhs[2:], rhs[0]], index.ndim - 1
    positions = int(np.prod([index.shape[a] for a in order[:inner]]))
    per_position = np.transpose(index, order).reshape(positions, -1)
    coords = np.unravel_index(per_position, leaf_shape)
    rows = np.ravel_multi_index(
        [coords[a] for a in view.contract], [leaf_shape[a] for a in view.contract]
    )
    if not (rows == rows[:, :1]).all():
        raise _Unsupported("an operand whose contraction mixes the leaf's output axes")
    return rows[:, 0]


class _Unsupported(Exception):
    """A site whose inputs cannot be mapped to its leaf's rows (the message says why)."""


def _site_inputs(site: _intercept.Site, invals: list[Any]) -> jax.Array:
    """The site's input as ``(N, positions)`` float32: a matmul's activation with its
    contraction axes last (in the weight's order), a convolution's im2col patches (input
    channel major, then the window, as ``lax.conv_general_dilated_patches`` orders them)."""
    params = site.eqn.params
    x = invals[1 - site.weight] if site.kind == "dense" else invals[0]
    if site.kind == "dense":
        (lhs_c, rhs_c), _ = params["dimension_numbers"]
        contract = lhs_c if site.weight == 1 else rhs_c
        rest = [a for a in range(x.ndim) if a not in contract]
        x = jnp.transpose(x, (*rest, *contract))
        size = int(np.prod([x.shape[a] for a in range(len(rest), x.ndim)]))
        return x.reshape(-1, size).astype(jnp.float32)
    numbers = params["dimension_numbers"]
    window = [invals[1].shape[a] for a in numbers.rhs_spec[2:]]
    patches = jax.lax.conv_general_dilated_patches(
        x,
        window,
        params["window_strides"],
        params["padding"],
        params["lhs_dilation"],
        params["rhs_dilation"],
        dimension_numbers=numbers,
        precision=jax.lax.Precision.HIGHEST,
    )
    patches = jnp.moveaxis(patches, numbers.out_spec[1], -1)
    return patches.reshape(-1, patches.shape[-1]).astype(jnp.float32)


def _layer_rows(x: jax.Array, rows: np.ndarray, size: int) -> jax.Array:
    """``x`` ``(N, positions)`` as ``(N, size)`` in the matrix view's row order: a permutation
    when the positions are the rows, else summed into the rows they multiply (a broadcast
    weight, a slice of the leaf)."""
    if len(rows) == size and (np.sort(rows) == np.arange(size)).all():
        return x[:, np.argsort(rows)]
    return jnp.zeros((x.shape[0], size), x.dtype).at[:, rows].add(x)


def _stats_of(x: jax.Array) -> LayerStats:
    gram = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)
    magnitude = jnp.abs(x)
    return LayerStats(
        gram, magnitude.sum(0), magnitude.max(0, initial=0.0), jnp.float32(x.shape[0])
    )


def _merge(a: LayerStats, b: LayerStats) -> LayerStats:
    return LayerStats(
        a.gram + b.gram, a.abs_sum + b.abs_sum, jnp.maximum(a.absmax, b.absmax), a.count + b.count
    )


_merge_jit = jax.jit(_merge)


def capture(
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    *,
    layouts: Any,
    paths: Sequence[str],
    fn_name: str = _NAME,
) -> dict[str, LayerStats]:
    """Statistics of the inputs of the leaves at ``paths`` over ``batches`` (module docstring).

    Each batch is the inputs of ``fn(params, *batch)`` (a tuple; a single array is one input)
    and is folded in by one compiled call (one compilation per batch shape); only the
    statistics stay on device.

    Args:
      fn: the model, ``fn(params, *args)``: e.g. ``lambda p, x: module.apply({"params": p,
        "batch_stats": bs}, x, train=False)``, or for NNX ``lambda s, x: nnx.merge(graphdef, s,
        rest)(x)``.
      params: its parameter tree.
      batches: an iterable of calibration batches (streamed: read once).
      layouts: the layouts of ``params`` (:func:`mixjax.layout.learn`).
      paths: the leaves whose statistics to gather, each consumed by a matmul or convolution.
      fn_name: the public function, for error messages.

    Returns:
      ``{path: LayerStats}`` in ``paths``' order, in each leaf's matrix view
      (:func:`matrix_layout`).

    Raises:
      ValueError: no batches; a batch the model rejects; a leaf no matmul or convolution
        reaches (consumed only inside ``scan``/``cond``, or not at all); a site whose input
        cannot be mapped to the leaf's rows (a batched matmul, a grouped convolution).
    """
    flat = dict(select.leaves_with_paths(params))
    found = layout_lib.by_path(fn_name, params, layouts)
    views = {p: matrix_layout(fn_name, p, flat[p], found[p]) for p in paths}
    sizes = {p: layout_lib.matrix_shape(np.shape(flat[p]), views[p])[0] for p in paths}

    def one(params, args):
        stats: dict[str, LayerStats] = {}

        def rewrite(site, invals):
            if site.path in views and site.kind in _MATMULS:
                try:
                    rows = _operand_rows(site, np.shape(flat[site.path]), views[site.path])
                except _Unsupported as why:
                    raise ValueError(
                        f"{fn_name}: {select.describe(site.path, flat[site.path])}: site "
                        f"{site.name!r} is {why}, whose inputs one-shot compression cannot "
                        "map to the leaf's rows; choose it out with where="
                    ) from None
                x = _layer_rows(_site_inputs(site, invals), rows, sizes[site.path])
                new = _stats_of(x)
                stats[site.path] = _merge(stats[site.path], new) if site.path in stats else new
            return None

        _intercept.run(fn, params, args, rewrite, fn_name=fn_name)
        return stats

    step = jax.jit(one)
    total: dict[str, LayerStats] | None = None
    for batch in batches:
        got = step(params, list(as_args(batch)))
        missing = [p for p in paths if p not in got]
        if missing:
            _, hidden = sites(fn, params, as_args(batch), fn_name=fn_name)
            why = {
                p: f"it is consumed inside {hidden[p]}"
                if p in hidden
                else "no matmul or convolution of fn consumes it"
                for p in missing
            }
            raise ValueError(
                f"{fn_name}: no calibration input reaches "
                + "; ".join(f"{select.describe(p, flat[p])} ({why[p]})" for p in missing)
            )
        total = got if total is None else {p: _merge_jit(total[p], got[p]) for p in paths}
    if total is None:
        raise ValueError(f"{fn_name}: no calibration batches (batches= is empty)")
    return {p: total[p] for p in paths}
