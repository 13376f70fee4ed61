"""Running integer inference: :func:`integer_apply` and the kernels of each way.

:func:`mixjax.export.integer_model` (:mod:`mixjax.export.integer`) decides how each site of the
model runs; here the model's jaxpr is evaluated with those sites rewritten
(:mod:`mixjax._intercept`): int8 x int8 -> int32 matmuls and convolutions with the site's own
dimension numbers, integer codes dequantized into the site's float op, or a gather of integer
codes, and every other equation as the model wrote it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mixjax import _intercept
from mixjax.export.integer import (
    INT8,
    LOOKUP,
    InputQuant,
    IntModel,
    IntSite,
    IntWeight,
)
from mixjax.quant import activations, grids
from mixjax.quant.grids import Grid, quantize, quantize_dequantize

__all__ = ["integer_apply"]

_APPLY = "mixjax.export.integer_apply"


def _fake(x: jax.Array, iq: InputQuant | None) -> jax.Array:
    if iq is None:
        return x
    return quantize_dequantize(x, iq.scale, iq.zero_point, Grid(8, iq.qmin, iq.qmax))


def _dequantized(weight: IntWeight, dtype: Any) -> jax.Array:
    scale = grids.expand_scale(weight.scale, weight.codes.shape)
    values = weight.codes.astype(jnp.int32) - grids.expand_scale(
        weight.zero_point, weight.codes.shape
    )
    values = values.astype(jnp.float32) * scale
    if weight.input_scale is not None:
        values = values * weight.input_scale
    return values.astype(dtype)


def _keepdims(x: Any, ndim: int) -> jax.Array:
    x = jnp.asarray(x)
    return x.reshape((1,) * ndim) if x.ndim == 0 else x


def _lookup(site: _intercept.Site, weight: IntWeight, indices: jax.Array) -> list[jax.Array]:
    """A gather of the codes, dequantized by the gathered scales (NaN where the model's gather
    fills out-of-range rows, as its float gather does)."""
    params = site.eqn.params
    shape = weight.codes.shape
    rows = set(params["dimension_numbers"].start_index_map)
    scale = _keepdims(grids.expand_scale(weight.scale, shape), len(shape))
    zero = _keepdims(grids.expand_scale(weight.zero_point, shape), len(shape))
    # Gathered axes in full, the others as the scales have them (1 for per-row scales).
    target = tuple(n if a in rows else scale.shape[a] for a, n in enumerate(shape))
    sizes = tuple(1 if t == 1 else s for t, s in zip(target, params["slice_sizes"], strict=True))

    def gather(x, slice_sizes, fill_value):
        return jax.lax.gather(
            x,
            indices,
            params["dimension_numbers"],
            slice_sizes,
            mode=params["mode"],
            fill_value=fill_value,
        )

    codes = gather(weight.codes, params["slice_sizes"], 0)
    scales = gather(jnp.broadcast_to(scale, target), sizes, params["fill_value"])
    zeros = gather(jnp.broadcast_to(zero, target), sizes, 0)
    out = (codes.astype(jnp.int32) - zeros).astype(jnp.float32) * scales
    return [out.astype(site.eqn.outvars[0].aval.dtype)]


def _non_finite(site: _intercept.Site, x: jax.Array, k: int, out_ndim: int) -> jax.Array:
    """Where the site's output must be NaN: per output position, any non-finite input entry
    that reaches it, broadcasting against the output."""
    bad = ~jnp.isfinite(x)
    params = site.eqn.params
    if site.kind == "conv":
        batch_axis = params["dimension_numbers"].lhs_spec[0]
        out_batch = params["dimension_numbers"].out_spec[0]
        rows = jnp.any(bad, axis=tuple(a for a in range(x.ndim) if a != batch_axis))
        shape = [1] * out_ndim
        shape[out_batch] = x.shape[batch_axis]
        return rows.reshape(shape)
    (contract_l, contract_r), (batch_l, batch_r) = params["dimension_numbers"]
    contract, batch = (contract_l, batch_l) if k == 0 else (contract_r, batch_r)
    free = tuple(a for a in range(x.ndim) if a not in (*contract, *batch))
    moved = jnp.transpose(bad, (*batch, *free, *contract))
    rows = jnp.any(moved, axis=tuple(range(len(batch) + len(free), x.ndim)))
    weight_free = (1,) * (out_ndim - len(batch) - len(free))
    sizes = tuple(x.shape[a] for a in free)
    lead = tuple(x.shape[a] for a in batch)
    return rows.reshape(lead + (sizes + weight_free if k == 0 else weight_free + sizes))


def _int8(site: _intercept.Site, s: IntSite, weight: IntWeight, invals, k: int) -> list[jax.Array]:
    x, iq, params = invals[k], s.inputs, site.eqn.params
    out_aval = site.eqn.outvars[0].aval
    q = quantize(x, iq.scale, iq.zero_point, Grid(8, iq.qmin, iq.qmax)).astype(jnp.int8)
    w = site.chain.replay(weight.codes)
    if site.kind == "conv":
        dims = params["dimension_numbers"]
        pads = [(0, 0, 0)] * x.ndim
        for axis, (lo, hi) in zip(dims.lhs_spec[2:], params["padding"], strict=True):
            pads[axis] = (lo, hi, 0)
        q = jax.lax.pad(q, iq.zero_point.astype(jnp.int8), pads)
        acc = jax.lax.conv_general_dilated(
            q,
            w,
            params["window_strides"],
            [(0, 0)] * len(params["padding"]),
            rhs_dilation=params["rhs_dilation"],
            dimension_numbers=dims,
            feature_group_count=params["feature_group_count"],
            preferred_element_type=jnp.int32,
        )
    else:
        operands = (q, w) if k == 0 else (w, q)
        acc = jax.lax.dot_general(
            *operands, params["dimension_numbers"], preferred_element_type=jnp.int32
        )
    y = (acc - s.correction).astype(jnp.float32) * s.rescale
    # A boolean any() costs ~10 % of a small layer on CPU (a float max or sum costs more).
    y = jnp.where(_non_finite(site, x, k, len(out_aval.shape)), jnp.nan, y)
    return [y.astype(out_aval.dtype)]


def _site_call(
    way: str, site: _intercept.Site, int_site: IntSite, weight: IntWeight | None, invals: list
) -> list[jax.Array]:
    """One site's outputs, run the ``way`` of its :attr:`IntModel.table` row on ``invals`` (the
    equation's inputs, the parameter operand as the float model computes it)."""
    k = activations.quantized_operand(site, invals)
    if way == INT8:
        return _int8(site, int_site, weight, invals, k)
    invals = list(invals)
    if k is not None:
        invals[k] = _fake(invals[k], int_site.inputs)
    if way == "float":
        return _intercept.bind(site.eqn, invals)
    if way.endswith(LOOKUP):
        return _lookup(site, weight, invals[1])
    invals[site.weight] = site.chain.replay(_dequantized(weight, invals[site.weight].dtype))
    return _intercept.bind(site.eqn, invals)


def integer_apply(int_model: IntModel, fn: Callable[..., Any], params: Any, *args: Any) -> Any:
    """Runs ``fn(params, *args)`` with its sites as :attr:`IntModel.table` says.

    Args:
      int_model: from :func:`integer_model` on this ``fn``.
      fn: the model, as given to :func:`integer_model`.
      params: the float parameters (``artifact.params()``): biases, norms and anything run in
        float are read from them; the integer sites read ``int_model``.
      *args: the inputs (any batch size).

    Returns:
      ``fn``'s output, quantized as the fake-quant forward when the activation quantizer had
      ``output=True``. Pure and jit-able.

    Raises:
      ValueError: a site ``integer_model`` did not find (prepared on another model).
    """
    ways = {row.site: row.way for row in int_model.table}

    def rewrite(site, invals):
        way = ways.get(site.name)
        if way is None:
            raise ValueError(
                f"{_APPLY}: site {site.name!r} was not found by integer_model (its sites: "
                f"{sorted(int_model.sites)}); prepare the IntModel on this model"
            )
        weight = int_model.weights.get(site.path)
        return _site_call(way, site, int_model.sites[site.name], weight, invals)

    out = _intercept.run(fn, params, args, rewrite, fn_name=_APPLY).out
    if int_model.output is None:
        return out
    result = _fake(activations.output_array(out), int_model.output)
    return (result, *out[1:]) if isinstance(out, tuple) else result
