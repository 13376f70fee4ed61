"""The messages DiLoCo replicas exchange: dense, quantized or top-k pseudo-gradients.

A message is what one replica puts on the replica axis for one leaf at a sync
(:func:`mixjax.delay.diloco`). How a leaf travels is decided once, from its path, shape and dtype
(:func:`plan_leaves`), and kept as a :class:`LeafPlan`:

* dense (no compressor, or a leaf ``where=`` does not select): the pseudo-gradient in the
  parameter's dtype, summed over the replicas with ``lax.psum``;
* :class:`Quantize` ``(bits, group)``: codes on the symmetric narrow-range ``bits``-bit grid of
  :mod:`mixjax.quant.grids` (``[-qmax, qmax]``, ``0.0`` exact), with one float32 abs-max scale
  per output feature (the last axis; per tensor for leaves of rank < 2; rounded to 16
  significant bits, so ``code * scale`` is exact in float32) and per group of
  ``group`` consecutive rows (the entries along the other axes, in C order; ``None``: all rows
  in one group). The codes, offset to ``[0, 2 * qmax]``, are packed ``8 / bits`` per byte in
  :mod:`mixjax.export.bitpack`'s layout (code ``i``'s bit ``j`` is bit ``i * bits + j`` of the
  little-endian stream), so the payload is ``(uint8 (ceil(n * bits / 8),), float32
  (rows / group, C))``;
* :class:`TopK` ``(fraction)``: the ``k = max(1, ceil(fraction * n))`` entries of largest
  magnitude, chosen exactly by :func:`mixjax.prune.selection.smallest` (the complement of the
  ``n - k`` smallest), as ``(float32 values (k,), int32 flat indices (k,))``.

Compressed payloads are gathered over the replica axis (``lax.all_gather``) and every replica
decodes and averages all of them, so the bytes a replica sends are exactly the bytes of its
payload arrays, :attr:`LeafPlan.nbytes` (dense: ``n * itemsize``, the same count as a
synchronous data-parallel step's gradient; :func:`message_bytes`). How many bytes the
collective moves on the wire (a ring all-reduce about twice this, an all-gather ``R - 1`` times
it) is the transport's business and the same factor for every method of one kind.

Error feedback (:func:`send`): a replica adds its residual ``e`` to the pseudo-gradient before
encoding, and keeps what the message lost, ``e' = (delta + e) - decode(message)``. Since the
decoded message and the value it encodes are within a factor 2 of each other entry by entry
(or equal, or zero), the subtraction is exact in floating point: ``decode(message) + e' ==
delta + e`` bit for bit, and over a run ``sum(sent) + e = sum(delta)`` up to the rounding of
the additions ``delta + e``. This needs the decoded value ``code * scale`` to be exact, hence
the short scales: with a full-precision scale XLA may fuse ``value - code * scale`` into an FMA,
which is not ``value - decoded``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mixjax import _checks, select
from mixjax.export.bitpack import packed_size
from mixjax.prune.selection import smallest
from mixjax.quant.grids import dequantize, grid, qparams, quantize

__all__ = [
    "LeafPlan",
    "Quantize",
    "TopK",
    "check_compressor",
    "decode",
    "encode",
    "message_bytes",
    "plan_leaves",
    "send",
    "transmit",
]

_INDEX_LIMIT = 2**31  # top-k indices are int32
_SCALE_BITS = 16  # significant bits of a quantized message's scales


class Quantize(NamedTuple):
    """Pseudo-gradients as ``bits``-bit integer codes with per-feature abs-max scales.

    Attributes:
      bits: 2, 4 or 8 (a divisor of 8, so codes fill whole bytes).
      group: rows per scale along the leaf's non-output axes (``None``: one scale per output
        feature over all rows); must divide each selected leaf's row count.
    """

    bits: int = 4
    group: int | None = None


class TopK(NamedTuple):
    """Pseudo-gradients as their ``ceil(fraction * n)`` largest-magnitude entries and indices.

    Attributes:
      fraction: the share of entries sent, in ``(0, 1]``.
    """

    fraction: float = 0.01


class LeafPlan(NamedTuple):
    """How one leaf travels (static: shapes, dtypes and sizes are Python values).

    Attributes:
      compressor: ``None`` (dense), a :class:`Quantize` or a :class:`TopK`.
      shape: the leaf's shape.
      dtype: the leaf's dtype (a dense message's dtype).
      rows: :class:`Quantize`: the entries along all but the last axis (the size for rank < 2).
      cols: :class:`Quantize`: the last axis's size (1 for rank < 2).
      group: :class:`Quantize`: rows per scale.
      k: :class:`TopK`: entries sent.
      nbytes: the bytes of the payload arrays one message of this leaf puts on the axis.
    """

    compressor: Quantize | TopK | None
    shape: tuple[int, ...]
    dtype: np.dtype
    rows: int = 0
    cols: int = 0
    group: int = 0
    k: int = 0
    nbytes: int = 0


def check_compressor(fn_name: str, compress: Any) -> Quantize | TopK | None:
    """``compress`` validated: ``None``, a :class:`Quantize` or a :class:`TopK`.

    Raises:
      TypeError: another type, or a field of the wrong type.
      ValueError: ``bits`` not 2, 4 or 8; ``group < 1``; ``fraction`` outside ``(0, 1]``.
    """
    if compress is None:
        return None
    if isinstance(compress, Quantize):
        bits = _checks.integer(fn_name, "compress.bits", compress.bits, 2, 8)
        if 8 % bits:
            raise ValueError(
                f"{fn_name}: compress.bits must be 2, 4 or 8 (codes packed whole into bytes), "
                f"got compress.bits={bits}"
            )
        group = _checks.integer(fn_name, "compress.group", compress.group, 1, optional=True)
        return Quantize(bits, group)
    if isinstance(compress, TopK):
        fraction = _checks.real(
            fn_name, "compress.fraction", compress.fraction, 0.0, 1.0, low_open=True
        )
        return TopK(fraction)
    raise TypeError(
        f"{fn_name}: compress must be None, mixjax.delay.Quantize(bits, group) or "
        f"mixjax.delay.TopK(fraction), got {type(compress).__name__}"
    )


def _plan(fn_name: str, path: str, leaf: Any, compressor: Quantize | TopK | None) -> LeafPlan:
    shape, dtype = tuple(np.shape(leaf)), np.dtype(jnp.result_type(leaf))
    size = math.prod(shape)
    if compressor is None or size == 0:
        return LeafPlan(None, shape, dtype, nbytes=size * dtype.itemsize)
    if isinstance(compressor, Quantize):
        rows, cols = (size // shape[-1], shape[-1]) if len(shape) >= 2 else (size, 1)
        group = rows if compressor.group is None else compressor.group
        if rows % group:
            raise ValueError(
                f"{fn_name}: {select.describe(path, leaf)} cannot be encoded by {compressor}: "
                f"one scale per group of {group} rows needs its {rows} rows (the entries along "
                f"all but the last axis) divisible by group={group}"
            )
        nbytes = packed_size(size, compressor.bits) + 4 * (rows // group) * cols
        return LeafPlan(compressor, shape, dtype, rows, cols, group, nbytes=nbytes)
    if size >= _INDEX_LIMIT:
        raise ValueError(
            f"{fn_name}: {select.describe(path, leaf)} cannot be encoded by {compressor}: "
            f"its {size} entries exceed the int32 indices of a top-k message (< 2**31)"
        )
    k = max(1, math.ceil(compressor.fraction * size))
    return LeafPlan(compressor, shape, dtype, k=k, nbytes=8 * k)


def plan_leaves(
    fn_name: str, params: Any, compress: Quantize | TopK | None, where: select.Where = None
) -> list[LeafPlan]:
    """One :class:`LeafPlan` per leaf of ``params`` (``jax.tree.leaves`` order).

    Args:
      fn_name: the public function, for the messages.
      params: the parameter tree (arrays or shape-dtype structs).
      compress: a checked compressor (:func:`check_compressor`), or ``None``: all dense.
      where: the leaves the compressor encodes (a ``where=`` selector, default
        :func:`mixjax.select.kernels`); the others travel dense.

    Raises:
      ValueError: ``where`` selects no leaf, or the compressor cannot encode a selected leaf
        (the message names the leaf, its shape and the rule broken).
    """
    paths = select.leaves_with_paths(params)
    if compress is None:
        return [_plan(fn_name, p, leaf, None) for p, leaf in paths]
    chosen = jax.tree.leaves(select.selection(fn_name, params, where))
    return [
        _plan(fn_name, p, leaf, compress if hit else None)
        for (p, leaf), hit in zip(paths, chosen, strict=True)
    ]


def message_bytes(params: Any, compress: Any = None, where: select.Where = None) -> int:
    """The bytes one replica sends to sync every leaf of ``params`` once.

    With ``compress=None`` this is ``sum(n * itemsize)``, the bytes of the full gradient a
    synchronous data-parallel step all-reduces: the like-for-like count to put next to the
    ``"bytes_sent"`` metric of :func:`mixjax.delay.diloco_data_parallel`.

    Raises:
      TypeError / ValueError: as :func:`check_compressor` and :func:`plan_leaves`.
    """
    fn_name = "mixjax.delay.message_bytes"
    plans = plan_leaves(fn_name, params, check_compressor(fn_name, compress), where)
    return sum(plan.nbytes for plan in plans)


def _pack(codes: jax.Array, bits: int) -> jax.Array:
    """Codes ``(n,)`` in ``[0, 2**bits)`` packed ``8 / bits`` per uint8 (bitpack's layout)."""
    per = 8 // bits
    padded = jnp.pad(codes.astype(jnp.uint32), (0, -codes.size % per)).reshape(-1, per)
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    return jnp.sum(padded << shifts, axis=1).astype(jnp.uint8)  # disjoint bits: sum == or


def _unpack(packed: jax.Array, bits: int, count: int) -> jax.Array:
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint32) * bits
    codes = (packed.astype(jnp.uint32)[:, None] >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:count]


def _short(scale: jax.Array) -> jax.Array:
    """``scale`` rounded to ``_SCALE_BITS`` significant bits (half away from zero), so that a
    code (at most 8 bits) times it is exact in float32, fused into an FMA or not."""
    drop = 24 - _SCALE_BITS
    bits = lax.bitcast_convert_type(scale, jnp.int32)
    rounded = (bits + (1 << (drop - 1))) & ~((1 << drop) - 1)
    return lax.bitcast_convert_type(rounded, jnp.float32)


def encode(plan: LeafPlan, x: jax.Array) -> tuple[jax.Array, ...]:
    """The payload of ``x`` (the leaf's shape) under ``plan``: a tuple of arrays (module
    docstring); ``(x in the leaf's dtype,)`` for a dense leaf."""
    if plan.compressor is None:
        return (x.astype(plan.dtype),)
    if isinstance(plan.compressor, Quantize):
        g = grid(plan.compressor.bits, narrow_range=True)
        blocks = x.astype(jnp.float32).reshape(plan.rows // plan.group, plan.group, plan.cols)
        top = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
        scale = _short(qparams(-top, top, g, symmetric=True)[0])
        codes = quantize(blocks, scale, 0.0, g) - g.qmin
        return _pack(codes.reshape(-1), plan.compressor.bits), scale[:, 0, :]
    flat = x.astype(jnp.float32).reshape(-1)
    (keep,) = smallest([jnp.abs(flat)], flat.size - plan.k)
    (indices,) = jnp.nonzero(~keep, size=plan.k)
    indices = indices.astype(jnp.int32)
    return flat[indices], indices


def decode(plan: LeafPlan, payload: tuple[jax.Array, ...]) -> jax.Array:
    """The float32 array of the leaf's shape a payload of :func:`encode` stands for."""
    if plan.compressor is None:
        return payload[0].astype(jnp.float32)
    if isinstance(plan.compressor, Quantize):
        packed, scale = payload
        g = grid(plan.compressor.bits, narrow_range=True)
        size = plan.rows * plan.cols
        codes = _unpack(packed, plan.compressor.bits, size).astype(jnp.float32) + g.qmin
        blocks = codes.reshape(plan.rows // plan.group, plan.group, plan.cols)
        return dequantize(blocks, scale[:, None, :], 0.0).reshape(plan.shape)
    values, indices = payload
    flat = jnp.zeros(math.prod(plan.shape), jnp.float32).at[indices].set(values)
    return flat.reshape(plan.shape)


def send(
    plan: LeafPlan, delta: jax.Array, residual: jax.Array | None
) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array | None]:
    """One replica's message of ``delta`` (float32, the leaf's shape), with error feedback.

    Args:
      plan: the leaf's plan.
      delta: the pseudo-gradient to send.
      residual: the error-feedback residual (float32, the leaf's shape), or ``None`` without
        error feedback or for a dense leaf.

    Returns:
      ``(payload, sent, residual)``: the payload (:func:`encode` of ``delta + residual``),
      the float32 value it decodes to and the new residual ``delta + residual - sent``
      (``None`` when ``residual`` is).
    """
    value = delta if residual is None else delta + residual
    payload = encode(plan, value)
    sent = decode(plan, payload)
    return payload, sent, None if residual is None else value - sent


def transmit(
    plans: list[LeafPlan], deltas: list[jax.Array], residuals: list[Any], axis_name: str
) -> tuple[list[jax.Array], list[Any]]:
    """Every replica's messages of ``deltas``, averaged over the replica axis.

    Runs per replica inside a ``shard_map`` over ``axis_name``: dense leaves are
    ``lax.psum``-ed, compressed payloads ``lax.all_gather``-ed and decoded; each replica sends
    ``sum(plan.nbytes)`` bytes.

    Args:
      plans: the leaves' plans.
      deltas: this replica's float32 pseudo-gradients, one per plan.
      residuals: its error-feedback residuals, one per plan: float32 arrays of the leaf's
        shape for compressed leaves (``None``: no error feedback); a dense leaf's entry is
        passed through as it is.
      axis_name: the replica axis.

    Returns:
      ``(averages, residuals)``: the float32 mean of the replicas' decoded messages per leaf,
      and the residuals after the send.
    """
    replicas = lax.axis_size(axis_name)
    averages, kept = [], []
    for plan, delta, residual in zip(plans, deltas, residuals, strict=True):
        if plan.compressor is None:
            total = lax.psum(encode(plan, delta)[0], axis_name).astype(jnp.float32)
            averages.append(total / replicas)
            kept.append(residual)
            continue
        payload, _, new = send(plan, delta, residual)
        gathered = [lax.all_gather(part, axis_name) for part in payload]
        decoded = jax.vmap(lambda *parts, plan=plan: decode(plan, parts))(*gathered)
        averages.append(jnp.sum(decoded, axis=0) / replicas)
        kept.append(new)
    return averages, kept
