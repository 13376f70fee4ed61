"""Per-leaf encodings of a compressed artifact: tagged records, their registries, built-in kinds.

A *record* is a small JSON-able dict describing one parameter leaf, ``{"kind", "shape", "dtype",
...}``, whose array fields hold *names* of arrays stored beside it (see :mod:`mixjax.export` for
the file format). Kinds decode through a registry (:func:`register_kind`), so new encodings
(codebook + indices, sparse bitmasks or relative indices, Huffman streams) are new kinds whose
decoders may call :func:`decode` on nested records. Built-in kinds:

* ``"array"``: the leaf stored verbatim (``"data"``; bfloat16 and other dtypes that ``.npy`` files
  cannot name are stored as float32, which holds them exactly);
* ``"int"``: integer codes ``q`` with ``float = (q - zero_point) * scale``: ``"codes"`` packed
  ``bits`` per code with :func:`mixjax.packing.pack_bits` (two's complement when ``"signed"``)
  for ``bits <= 8``, an int16/uint16 array above; ``"scale"`` float32 of a keepdims shape
  broadcasting against ``shape``; ``"zero_point"`` int32 of that shape, or ``null`` when all
  zero. ``bits`` is the fewest that hold the leaf's codes (at most the grid's: int8 for 8-bit
  quantization, two codes per byte for 4-bit).

Which leaves get which kind is decided by *encoders* registered per transform-state type
(:func:`register_encoder`): :func:`mixjax.export.compress` finds every registered state inside
the transform state (e.g. the entries of a ``chain`` state) and, for each leaf, uses the last one
covering it (the last transform of the chain, whose grid the view is on). *Candidates*
(:func:`register_candidate`, e.g. the codebook kind of :mod:`mixjax.codebook_codec`) are tried on
every leaf besides; :func:`encode_leaf` keeps the smallest record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import packing, quant, select

Record = dict[str, Any]
Store = Callable[[np.ndarray], str]
LeafEncoder = Callable[[str, np.ndarray, Store], Record]
Decoder = Callable[[Record, Mapping[str, np.ndarray]], np.ndarray]

Candidate = Callable[[str, np.ndarray, "LeafEncoder | None", Store], "Record | None"]

_KINDS: dict[str, Decoder] = {}
_ENCODERS: dict[type, Callable[[Any], Any]] = {}
_CANDIDATES: list[Candidate] = []
# What a record field costs besides its bytes (its manifest entry), when comparing candidates.
ARRAY_OVERHEAD = 16
# Record fields that hold strings which are not array names.
_NOT_ARRAYS = frozenset({"path", "kind", "dtype", "codec"})


def register_kind(kind: str, decoder: Decoder) -> None:
    """Registers how records of ``kind`` decode: ``decoder(record, arrays) -> np.ndarray``.

    ``arrays`` maps array names to loaded arrays. The decoder validates what it reads and raises
    ``ValueError`` on inconsistent records; it returns an array of the record's shape and dtype.
    """
    _KINDS[kind] = decoder


def register_encoder(state_type: type, encoders: Callable[[Any], Any]) -> None:
    """Registers how leaves covered by a state of ``state_type`` are encoded.

    ``encoders(state)`` returns a mirror tree of the parameters (``None`` at leaves it does not
    cover) holding ``encode(path, view_leaf, store) -> record`` callables; ``store(array)``
    saves an array and returns the name a record refers to it by.
    """
    _ENCODERS[state_type] = encoders


def register_candidate(candidate: Candidate) -> None:
    """Registers an encoding tried on every leaf: ``candidate(path, leaf, encoder, store)``.

    ``encoder`` is the leaf's covering encoder (``None`` if none); the candidate returns a
    record, or ``None`` where its encoding does not apply (e.g. too many distinct values).
    """
    if candidate not in _CANDIDATES:
        _CANDIDATES.append(candidate)


class IntTensor(NamedTuple):
    """A decoded ``"int"`` record: ``float = (q - zero_point) * scale``.

    Attributes:
      q: int8 (``bits <= 8``) or int16/uint16 array of the leaf's shape.
      scale: float32, keepdims shape broadcasting against ``q`` (``(1, ..., 1, C)`` or ``()``).
      zero_point: int32 of ``scale``'s shape.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray


def _field(record: Record, key: str, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    name = record.get(key)
    if name not in arrays:
        raise ValueError(f"field {key!r} names array {name!r}, which the artifact does not hold")
    return arrays[name]


def _shape_dtype(record: Record) -> tuple[tuple[int, ...], np.dtype]:
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise ValueError(f"bad shape {shape!r}")
    try:
        dtype = jnp.dtype(record.get("dtype"))
    except TypeError as err:
        raise ValueError(f"bad dtype {record.get('dtype')!r}") from err
    return tuple(shape), dtype


def decode_int(record: Record, arrays: Mapping[str, np.ndarray]) -> IntTensor:
    """The integer codes, scale and zero point of an ``"int"`` record (validated)."""
    shape, _ = _shape_dtype(record)
    bits, signed = record.get("bits"), record.get("signed")
    if not isinstance(bits, int) or not 1 <= bits <= 16 or not isinstance(signed, bool):
        raise ValueError(f"bad bits={bits!r} / signed={signed!r}")
    count = int(np.prod(shape, dtype=np.int64))
    codes = _field(record, "codes", arrays)
    if bits <= 8:
        codes = packing.unpack_bits(codes, bits, count)
    elif codes.dtype != (np.int16 if signed else np.uint16) or codes.size != count:
        raise ValueError(f"codes of {bits} bits must be {count} 16-bit integers")
    q = (packing.to_signed(codes, bits) if signed and bits <= 8 else codes).reshape(shape)
    scale = _field(record, "scale", arrays)
    zero_point = (
        np.zeros(scale.shape, np.int32)
        if record.get("zero_point") is None
        else _field(record, "zero_point", arrays)
    )
    if scale.dtype != np.float32 or zero_point.dtype != np.int32:
        raise ValueError(f"scale/zero_point dtypes {scale.dtype}/{zero_point.dtype}")
    try:
        fits = scale.shape == zero_point.shape and np.broadcast_shapes(scale.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"scale {scale.shape} does not broadcast against shape {shape}")
    return IntTensor(q, scale, zero_point)


def _decode_int(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    _, dtype = _shape_dtype(record)
    t = decode_int(record, arrays)
    values = (t.q.astype(np.int32) - t.zero_point).astype(np.float32) * t.scale
    return values.astype(dtype)


def _decode_array(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    shape, dtype = _shape_dtype(record)
    data = _field(record, "data", arrays)
    if data.shape != shape:
        raise ValueError(f"data has shape {data.shape}, the record says {shape}")
    return data.astype(dtype)


register_kind("int", _decode_int)
register_kind("array", _decode_array)


def decode(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Decodes one record (of any registered kind) to its array."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a dict, got {record!r}")
    kind = record.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown kind {kind!r} (known: {sorted(_KINDS)})")
    return _KINDS[kind](record, arrays)


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


def int_encoder(scale: Any, zero_point: Any = None) -> LeafEncoder:
    """An encoder for a leaf on the grid ``(q - zero_point) * scale`` (see the module docstring).

    Raises (when called):
      ValueError: the view holds NaN/Inf, or is not exactly on that grid.
    """
    scale = np.maximum(np.asarray(scale, np.float32), np.float32(quant.TINY))
    zp = np.zeros(scale.shape, np.int32) if zero_point is None else np.asarray(zero_point)
    zp = zp.astype(np.int32)

    def encode(path, leaf, store):
        name = "mixjax.export.compress"
        if not np.all(np.isfinite(leaf)):
            raise ValueError(f"{name}: {select.describe(path, leaf)} holds NaN/Inf values")
        q = np.round(leaf.astype(np.float64) / scale).astype(np.int64) + zp
        back = (q - zp).astype(np.float32) * scale
        if not np.array_equal(back.astype(leaf.dtype), leaf):
            raise ValueError(
                f"{name}: {select.describe(path, leaf)} is not on the integer grid of its "
                "fake-quant state (is another transform chained after fake_quant?)"
            )
        bits, signed = _min_bits(int(q.min(initial=0)), int(q.max(initial=0)))
        if bits <= 8:
            codes = packing.pack_bits(packing.to_unsigned(q, bits) if signed else q, bits)
        else:
            codes = q.astype(np.int16 if signed else np.uint16)
        return {
            "kind": "int",
            "shape": list(leaf.shape),
            "dtype": str(leaf.dtype),
            "bits": bits,
            "signed": signed,
            "codes": store(codes),
            "scale": store(scale),
            "zero_point": store(zp) if np.any(zp) else None,
        }

    return encode


def _fake_quant_encoders(state: quant.FakeQuantState) -> Any:
    return jax.tree.map(
        lambda s, z: None if s is None else int_encoder(s, z),
        state.scale,
        state.zero_point,
        is_leaf=lambda x: x is None,
    )


def _lsq_encoders(state: quant.LsqState) -> Any:
    return jax.tree.map(lambda s: int_encoder(s), state.scale)


register_encoder(quant.FakeQuantState, _fake_quant_encoders)
register_encoder(quant.LsqState, _lsq_encoders)


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


def encode_leaf(path: str, leaf: np.ndarray, encoder: LeafEncoder | None, store: Store) -> Record:
    """The smallest record of a leaf among its encoder's (``"array"`` if none) and candidates'.

    Size is the bytes of the record's arrays plus :data:`ARRAY_OVERHEAD` per array; ties keep
    the earlier option (the encoder's). Only the chosen record's arrays reach ``store``.

    Raises:
      ValueError: the encoder rejects the leaf (e.g. a view off its quantization grid).
    """
    options = []
    for i, fn in enumerate([encoder or encode_array, *_CANDIDATES]):
        staged: dict[str, np.ndarray] = {}

        def stage(array, staged=staged):
            name = f"\0{len(staged)}"
            staged[name] = np.asarray(array)
            return name

        record = fn(path, leaf, stage) if i == 0 else fn(path, leaf, encoder, stage)
        if record is not None:
            size = sum(a.nbytes + ARRAY_OVERHEAD for a in staged.values())
            options.append((size, i, record, staged))
    _, _, record, staged = min(options, key=lambda o: o[:2])
    names = {name: store(array) for name, array in staged.items()}

    def rename(node):
        if isinstance(node, dict):
            return {k: rename(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return names.get(node, node) if isinstance(node, str) else node

    return rename(record)


def leaf_encoders(params: Any, state: Any) -> list[LeafEncoder | None]:
    """For each leaf of ``params`` (``jax.tree.leaves`` order), the encoder covering it, if any."""
    treedef = jax.tree.structure(params)
    result: list[LeafEncoder | None] = [None] * treedef.num_leaves
    registered = lambda node: type(node) in _ENCODERS
    for node in jax.tree.leaves(state, is_leaf=registered):
        if not registered(node):
            continue
        for i, encoder in enumerate(treedef.flatten_up_to(_ENCODERS[type(node)](node))):
            if encoder is not None:
                result[i] = encoder
    return result
