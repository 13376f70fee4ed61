"""Records: how one parameter leaf is stored in an artifact, and the two plain kinds.

A *record* is a small JSON-able dict describing one leaf, ``{"kind", "shape", "dtype", ...}``,
whose array fields hold *names* of arrays stored beside it (:mod:`mixjax.export.artifact` has
the file format). This module holds what every kind shares (:func:`field`, :func:`shape_dtype`,
:func:`record_nbytes`, :data:`ARRAY_OVERHEAD`) and the two plain kinds; the table of every kind
is :mod:`mixjax.export.kinds`:

* ``"array"``: the leaf stored verbatim (``"data"``; bfloat16 and other dtypes that ``.npy`` files
  cannot name are stored as float32, which holds them exactly);
* ``"int"``: integer codes ``q`` with ``float = (q - zero_point) * scale``: ``"codes"`` packed
  ``bits`` per code with :func:`mixjax.export.bitpack.pack_bits` (two's complement when
  ``"signed"``) for ``bits <= 8``, an int16/uint16 array above; ``"scale"`` float32, a block
  broadcast of ``shape`` (:func:`mixjax.quant.expand_scale`: each axis 1, the leaf's size, or a
  proper divisor of it for one scale per group of consecutive entries, e.g. ``(n / 32, C)`` for
  int4 groups of 32), stored compact; ``"zero_point"`` int32 of that shape, or ``null`` when
  all zero; ``"input_scale"`` (optional, AWQ's per-input-feature factors,
  :attr:`mixjax.quant.FakeQuantState.input_scale`) float32, a broadcast of ``shape`` with 1 on
  the output axes: then ``float = (q - zero_point) * scale * input_scale``. ``bits`` is the
  fewest that hold the leaf's codes (at most the grid's: int8 for 8-bit quantization, two codes
  per byte for 4-bit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from mixjax import select
from mixjax.export import bitpack, encoding
from mixjax.quant.grids import TINY, expand_scale

__all__ = [
    "ARRAY_OVERHEAD",
    "PLAIN_KINDS",
    "IntTensor",
    "LeafEncoder",
    "Record",
    "Store",
    "decode_array",
    "decode_int",
    "decode_int_values",
    "decode_plain",
    "decode_with",
    "encode_array",
    "field",
    "int_encoder",
    "int_values",
    "record_arrays",
    "record_nbytes",
    "shape_dtype",
]

Record = dict[str, Any]
Store = Callable[[np.ndarray], str]
LeafEncoder = Callable[[str, np.ndarray, Store], Record]
# What a record field costs besides its bytes (its manifest entry), when comparing encodings.
ARRAY_OVERHEAD = 16
# Record fields that hold strings which are not array names.
_NOT_ARRAYS = frozenset({"path", "kind", "dtype", "codec"})


class IntTensor(NamedTuple):
    """A decoded ``"int"`` record: ``float = (q - zero_point) * scale``.

    Attributes:
      q: int8 (``bits <= 8``) or int16/uint16 array of the leaf's shape.
      scale: float32, compact: a block broadcast of ``q`` (``()``, ``(1, ..., 1, C)`` or
        group-wise ``(n / g, C)``), to expand with :func:`mixjax.quant.expand_scale` before it
        meets ``q`` (:func:`decode_int_values` does).
      zero_point: int32 of ``scale``'s shape (compact too).
      input_scale: float32 factors per input feature (the leaf's shape with 1 on the output
        axes; values ``(q - zero_point) * scale * input_scale``), or ``None``.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    input_scale: np.ndarray | None = None


def field(record: Record, key: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The array that field ``key`` of ``record`` names; ``ValueError`` if there is none."""
    name = record.get(key)
    if not isinstance(name, str) or name not in arrays:
        raise ValueError(
            f"field {key!r} names array {encoding.short_repr(name)}, which the artifact does not "
            "hold"
        )
    return arrays[name]


def shape_dtype(record: Record) -> tuple[tuple[int, ...], np.dtype]:
    """The validated ``"shape"`` (:func:`mixjax.export.encoding.shape_size`: at most 2**40
    elements) and ``"dtype"`` (a numeric or bool dtype name, e.g. ``"bfloat16"``) of a record."""
    shape = record.get("shape")
    try:
        encoding.shape_size(shape)
    except ValueError as err:
        raise ValueError(f"bad shape {encoding.short_repr(shape)} ({err})") from None
    name = record.get("dtype")
    try:
        dtype = jnp.dtype(name) if isinstance(name, str) else None
    except (TypeError, ValueError, SyntaxError):  # NumPy parses "(2,f4" as Python
        dtype = None
    if dtype is None or not _numeric(dtype):
        raise ValueError(f"bad dtype {encoding.short_repr(name)}")
    return tuple(shape), dtype


def _numeric(dtype: np.dtype) -> bool:
    """Bool, integer, float or complex, including the ML dtypes (bfloat16, ...): kind "V" with
    no fields; not object, string, datetime, structured or subarray dtypes."""
    if dtype.kind in "biufc":
        return True
    plain = dtype.kind == "V" and dtype.fields is None and dtype.subdtype is None
    return plain and jnp.issubdtype(dtype, jnp.number)


def decode_int(record: Record, arrays: Mapping[str, np.ndarray]) -> IntTensor:
    """The integer codes, scale and zero point of an ``"int"`` record (validated)."""
    shape, _ = shape_dtype(record)
    width, signed = record.get("bits"), record.get("signed")
    if not isinstance(width, int) or not 1 <= width <= 16 or not isinstance(signed, bool):
        raise ValueError(f"bad bits={width!r} / signed={signed!r}")
    count = encoding.shape_size(shape)
    codes = field(record, "codes", arrays)
    if width <= 8:
        codes = bitpack.unpack_bits(codes, width, count)
    elif codes.dtype != (np.int16 if signed else np.uint16) or codes.size != count:
        raise ValueError(f"codes of {width} bits must be {count} 16-bit integers")
    q = (bitpack.to_signed(codes, width) if signed and width <= 8 else codes).reshape(shape)
    scale = field(record, "scale", arrays)
    zero_point = (
        np.zeros(scale.shape, np.int32)
        if record.get("zero_point") is None
        else field(record, "zero_point", arrays)
    )
    if scale.dtype != np.float32 or zero_point.dtype != np.int32:
        raise ValueError(f"scale/zero_point dtypes {scale.dtype}/{zero_point.dtype}")
    if scale.shape != zero_point.shape:
        raise ValueError(f"scale {scale.shape} and zero_point {zero_point.shape} differ in shape")
    try:
        expand_scale(scale, shape)
    except ValueError:
        raise ValueError(
            f"scale {scale.shape} does not block-broadcast against shape {shape} (each axis "
            "must be 1, the leaf's size or a divisor of it)"
        ) from None
    factors = None
    if record.get("input_scale") is not None:
        factors = field(record, "input_scale", arrays)
        if factors.dtype != np.float32 or factors.ndim != len(shape):
            raise ValueError(f"input_scale must be float32 of rank {len(shape)}")
        if any(d not in (1, n) for d, n in zip(factors.shape, shape, strict=True)):
            raise ValueError(f"input_scale {factors.shape} does not broadcast against {shape}")
        if not np.all(np.isfinite(factors) & (factors > 0)):
            raise ValueError("input_scale holds values that are not finite and positive")
    return IntTensor(q, scale, zero_point, factors)


def int_values(t: IntTensor) -> np.ndarray:
    """``(q - zero_point) * scale`` (``* input_scale`` where there is one) as float32, in the
    order of operations the fake-quant view uses (bit for bit)."""
    scale, zero_point = (expand_scale(a, t.q.shape) for a in (t.scale, t.zero_point))
    values = (t.q.astype(np.int32) - zero_point).astype(np.float32) * scale
    return values if t.input_scale is None else values * t.input_scale


def decode_int_values(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The float leaf of an ``"int"`` record: ``(q - zero_point) * scale`` in its dtype."""
    _, dtype = shape_dtype(record)
    return int_values(decode_int(record, arrays)).astype(dtype)


def decode_array(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The leaf of an ``"array"`` record, checked against its shape, in its dtype."""
    shape, dtype = shape_dtype(record)
    data = field(record, "data", arrays)
    if data.shape != shape:
        raise ValueError(f"data has shape {data.shape}, the record says {shape}")
    return data.astype(dtype)


PLAIN_KINDS: dict[str, Callable[[Record, Mapping[str, np.ndarray]], np.ndarray]] = {
    "array": decode_array,
    "int": decode_int_values,
}


def decode_with(
    decoders: Mapping[str, Callable[[Record, Mapping[str, np.ndarray]], np.ndarray]],
    record: Any,
    arrays: Mapping[str, np.ndarray],
) -> np.ndarray:
    """Decodes ``record`` with the decoder its ``"kind"`` names in ``decoders``.

    Raises:
      ValueError: not a record, a kind ``decoders`` does not know, or a record that does not
        decode.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a dict, got {record!r}")
    kind = record.get("kind")
    if kind not in decoders:
        raise ValueError(f"unknown kind {kind!r} (known here: {sorted(decoders)})")
    return decoders[kind](record, arrays)


def decode_plain(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Decodes a record nested in another (a codebook's values): ``"array"`` or ``"int"``.

    Raises:
      ValueError: a record of another kind, or one that does not decode.
    """
    return decode_with(PLAIN_KINDS, record, arrays)


def encode_array(path: str, leaf: np.ndarray, store: Store) -> Record:
    """The ``"array"`` record of a leaf kept as it is."""
    del path
    data = leaf if np.dtype(leaf.dtype.str) == leaf.dtype else leaf.astype(np.float32)
    return {
        "kind": "array",
        "shape": list(leaf.shape),
        "dtype": str(leaf.dtype),
        "data": store(data),
    }


def _min_bits(lo: int, hi: int) -> tuple[int, bool]:
    if lo >= 0:
        return max(1, int(hi).bit_length()), False
    return max(int(-lo - 1).bit_length(), int(hi).bit_length()) + 1, True


def int_encoder(
    scale: Any, zero_point: Any = None, input_scale: Any = None, *, fn_name: str
) -> LeafEncoder:
    """An encoder for a leaf on the grid ``(q - zero_point) * scale`` (see the module docstring).

    Args:
      scale: the grid's float32 scale, a block broadcast of the leaf (group-wise scales
        included), stored as it is (compact).
      zero_point: its integer zero point (of ``scale``'s shape), ``None`` for 0.
      input_scale: per-input-feature factors (the grid ``(q - zero_point) * scale *
        input_scale``), or ``None``.
      fn_name: the public function the encoder works for (``"mixjax.export.compress"``), which
        its errors name.

    Raises (when called):
      ValueError: the view holds NaN/Inf, is not exactly on that grid, or has a shape the scale
        is no block broadcast of.
    """
    scale = np.maximum(np.asarray(scale, np.float32), np.float32(TINY))
    zp = np.zeros(scale.shape, np.int32) if zero_point is None else np.asarray(zero_point)
    zp = zp.astype(np.int32)
    factors = None if input_scale is None else np.asarray(input_scale, np.float32)

    def encode(path, leaf, store):
        where = select.describe(path, leaf)
        if not np.all(np.isfinite(leaf)):
            raise ValueError(f"{fn_name}: {where} holds NaN/Inf values")
        try:
            s, z = expand_scale(scale, leaf.shape), expand_scale(zp, leaf.shape)
            a = np.float32(1.0) if factors is None else np.broadcast_to(factors, leaf.shape)
        except ValueError as err:
            raise ValueError(f"{fn_name}: {where}: {err}") from None
        q = np.round(leaf.astype(np.float64) / (s.astype(np.float64) * a)).astype(np.int64) + z
        back = int_values(IntTensor(q, scale, zp, factors))
        if not np.array_equal(back.astype(leaf.dtype), leaf):
            raise ValueError(
                f"{fn_name}: {where} is not on the integer grid of its "
                "fake-quant state (is another transform chained after fake_quant?)"
            )
        width, signed = _min_bits(int(q.min(initial=0)), int(q.max(initial=0)))
        if width <= 8:
            codes = bitpack.pack_bits(bitpack.to_unsigned(q, width) if signed else q, width)
        else:
            codes = q.astype(np.int16 if signed else np.uint16)
        return {
            "kind": "int",
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "bits": width,
            "signed": signed,
            "codes": store(codes),
            "scale": store(scale),
            "zero_point": store(zp) if np.any(zp) else None,
            **({} if factors is None else {"input_scale": store(factors)}),
        }

    return encode


def record_arrays(record: Record, arrays: Mapping[str, np.ndarray]) -> set[str]:
    """Names of the arrays (keys of ``arrays``) a record, with its nested records, refers to."""
    names: set[str] = set()

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and key not in _NOT_ARRAYS and node in arrays:
            names.add(node)

    walk(record)
    return names


def record_nbytes(record: Record, arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays a record (with its nested records) refers to."""
    return int(sum(np.asarray(arrays[n]).nbytes for n in record_arrays(record, arrays)))
