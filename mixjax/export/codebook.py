"""The ``"codebook"`` record kind (shared values + packed / sparse / Huffman-coded indices) and
the ``"sparse"`` kind (pruned float leaves: positions + nonzero entries).

Deep Compression's storage (Han et al. 2016) for any leaf with few distinct values, whatever
made them few (``share.cluster``, ``prune``, ``quant.fake_quant``, chained in any order): the
encoder works from the final view (on a fake-quant grid, it is used only where the leaf has fewer
distinct values than the grid's codes can tell apart, so plain quantized leaves stay ``"int"``
for integer inference, and its values are integers on that grid). Both are *candidates*
(:data:`mixjax.export.kinds.CANDIDATES`): :func:`mixjax.export.compress` tries them on every
floating-point leaf and keeps one where it is smaller than the leaf's other encodings
(``"array"``, ``"int"``).

Record (``K`` distinct values, ``b = max(1, ceil(log2 K))`` index bits)::

    {"kind": "codebook", "shape", "dtype", "clusters": K, "bits": b,
     "values": record of shape (K,),     # "int" (codes + scale) when a per-tensor fake-quant
                                         # grid holds the values, else "array"
     ("axis": a,)                        # per-channel values, see below
     "indices": stream,                  # one index per stored entry
     "sparse": null | {"codec": "bitmask" | "relative", "zero": index of +0.0,
                       "positions": stream, ("gap_bits", "num_entries" for "relative")}}

Per-channel codebooks (a leaf on a per-channel fake-quant grid, e.g. clustered per output
channel and then quantized: :mod:`mixjax.quant.weights`) give each output channel its own values
(``K`` the most any channel has, the others padded with their largest): ``"axis": a`` names the
leaf axis, the first that is not an output axis, that holds ``K`` in the values record, whose
shape is the leaf's with ``K`` on ``a``, the output axes kept and 1 elsewhere (``(K, C)`` for a
Dense kernel ``(in, C)``, ``(K, 1, 1, C)`` for a Conv ``(h, w, in, C)``). An entry's value is
its channel's at its index, ``take_along_axis(values, indices, a)``. The values are an ``"int"``
record on the leaf's own scale, ``(1, C)`` or ``(1, 1, 1, C)``, which broadcasts against the
leaf too, so :mod:`mixjax.export.integer` re-encodes the whole kernel on it exactly. Leaves on
a group-wise grid get no codebook. Integer leaves thus keep integer values in every codebook.

Values are distinct *bit patterns* of the leaf (so ``-0.0`` and ``+0.0`` stay apart and the
round trip is bit-exact), ascending by bit pattern. With ``"sparse"``, only the entries that are
not ``+0.0`` (plus Deep Compression's filler entries) have an index, and ``"positions"`` says
where they are: a 1-bit mask or ``gap_bits``-bit relative distances
(:mod:`mixjax.export.positions`, whichever is smaller). A *stream* of small non-negative integers
is stored as the smaller of ``{"codec": "packed", "bits", "count", "data"}``
(:func:`mixjax.export.bitpack.pack_bits`) and
``{"codec": "huffman", "shape", "dtype", "num_bits", "lengths", "stream"}``
(:func:`mixjax.export.huffman.huffman_encode`, canonical code lengths + bitstream).

Decoding trusts no declared size: a stream's ``count`` is backed by its bytes (packed streams
exactly; Huffman streams by ``count <= num_bits <= 8 * bytes``), a bitmask has exactly one bit
per entry, and relative positions bridge the trailing run of ``+0.0`` with fillers too, so the
last entry lies within ``2**gap_bits`` of the end (:mod:`mixjax.export.positions`). A record
thus decodes to at most a fixed multiple of its stored bits (``2**gap_bits`` entries per
position code), and a hostile ``"shape"`` is refused before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mixjax.export import bitpack, encoding, records
from mixjax.export.huffman import huffman_decode, huffman_encode
from mixjax.export.positions import sparse_decode, sparse_encode
from mixjax.export.records import ARRAY_OVERHEAD, LeafEncoder, Record, Store

__all__ = [
    "MAX_CLUSTERS",
    "decode_codebook",
    "decode_sparse",
    "encode_codebook",
    "encode_sparse",
]

MAX_CLUSTERS = 256
# Only compress makes codebook records: the errors of their nested "int" values name it.
_COMPRESS = "mixjax.export.compress"


def _stream_options(
    symbols: np.ndarray, bits: int, huffman: bool
) -> list[tuple[dict[str, Any], dict]]:
    packed = bitpack.pack_bits(symbols, bits)
    options = [({"codec": "packed", "bits": bits, "count": int(symbols.size)}, {"data": packed})]
    if huffman and symbols.size:
        huff = huffman_encode(symbols)
        arrays = {"lengths": huff.arrays["lengths"], "stream": huff.arrays["bits"]}
        options.append((huff.meta, arrays))
    return options


def _smallest(options):
    return min(options, key=lambda o: sum(a.nbytes + ARRAY_OVERHEAD for a in o[1].values()))


def _stream(symbols: np.ndarray, bits: int, huffman: bool) -> tuple[dict[str, Any], dict]:
    """The smaller of the packed and Huffman encodings of uint8 ``symbols < 2**bits``."""
    return _smallest(_stream_options(symbols.astype(np.uint8), bits, huffman))


def _stored(stream: tuple[dict[str, Any], dict], store: Store) -> dict[str, Any]:
    meta, arrays = stream
    return {**meta, **{key: store(array) for key, array in arrays.items()}}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_stream(stream: Any, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """A stored stream's symbols, 1-D; its count is backed by its bytes (at least 1 bit each:
    packed streams are exact, Huffman streams checked by :func:`huffman_decode`)."""
    if not isinstance(stream, dict):
        raise ValueError(f"bad index stream {encoding.short_repr(stream)}")
    codec = stream.get("codec")
    if codec == "packed":
        bits, count = stream.get("bits"), stream.get("count")
        if (
            not _is_int(bits)
            or not 1 <= bits <= bitpack.MAX_BITS
            or not _is_int(count)
            or count < 0
        ):
            raise ValueError(
                f"bad packed stream bits={encoding.short_repr(bits)} "
                f"count={encoding.short_repr(count)}"
            )
        return bitpack.unpack_bits(records.field(stream, "data", arrays), bits, count)
    if codec == "huffman":
        fields = {k: records.field(stream, k, arrays) for k in ("lengths", "stream")}
        symbols = huffman_decode(stream, {"lengths": fields["lengths"], "bits": fields["stream"]})
        return symbols.reshape(-1)
    raise ValueError(f"unknown stream codec {codec!r}")


def _sparse(
    values: np.ndarray, zero: int, value_bits: int, huffman: bool
) -> tuple[dict[str, Any], np.ndarray]:
    """Positions (a stream in ``meta["positions"]``) and entries of the 1-D ``values != zero``."""
    sparse = sparse_encode(values, zero=zero, value_bits=value_bits)
    meta = {k: v for k, v in sparse.meta.items() if k != "shape"}
    if meta["codec"] == "bitmask":
        gaps, gap_bits = bitpack.unpack_bits(sparse.arrays["mask"], 1, values.size), 1
    else:
        gap_bits = meta["gap_bits"]
        gaps = bitpack.unpack_bits(sparse.arrays["gaps"], gap_bits, meta["num_entries"])
    meta["positions"] = _stream(gaps, gap_bits, huffman)
    return meta, sparse.arrays["values"]


def _expand(
    sparse: Any, entries: np.ndarray, size: int, arrays: Mapping[str, np.ndarray]
) -> np.ndarray:
    """Inverse of :func:`_sparse` (with stored streams): the ``size`` values, 1-D."""
    if not isinstance(sparse, dict):
        raise ValueError(f"bad sparse field {encoding.short_repr(sparse)}")
    positions = _decode_stream(sparse.get("positions"), arrays)
    gap_bits = 1 if sparse.get("codec") == "bitmask" else sparse.get("gap_bits")
    if not _is_int(gap_bits) or not 1 <= gap_bits <= 8:
        raise ValueError(f"bad gap_bits={encoding.short_repr(gap_bits)}")
    key = "mask" if sparse.get("codec") == "bitmask" else "gaps"
    meta = {**sparse, "shape": [size]}
    return sparse_decode(meta, {key: bitpack.pack_bits(positions, gap_bits), "values": entries})


def encode_sparse(
    path: str, leaf: np.ndarray, encoder: LeafEncoder | None, store: Store
) -> Record | None:
    """The ``"sparse"`` record of a floating-point leaf with ``+0.0`` entries: where the other
    entries are (a stream, as in a codebook's ``"sparse"`` field) and those entries verbatim.

    Record: ``{"kind": "sparse", "shape", "dtype", "sparse": {"codec", "zero": 0, "positions",
    ...}, "values": "array" record of the stored entries (fillers hold +0.0)}``.

    Returns:
      The record, or ``None`` for non-float leaves, leaves without ``+0.0``, and leaves that a
      quantization grid covers (their ``"int"`` record is the smaller way to store them).
    """
    if encoder is not None or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return None
    pattern = leaf.reshape(-1).view(np.dtype(f"u{leaf.dtype.itemsize}"))
    if not np.any(pattern == 0):
        return None
    meta, entries = _sparse(pattern, 0, 8 * leaf.dtype.itemsize, True)
    return {
        "kind": "sparse",
        "shape": list(leaf.shape),
        "dtype": str(leaf.dtype),
        "sparse": {**meta, "positions": _stored(meta["positions"], store)},
        "values": records.encode_array(path, entries.view(leaf.dtype), store),
    }


def decode_sparse(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The leaf of a ``"sparse"`` record (validated)."""
    shape, dtype = records.shape_dtype(record)
    entries = records.decode_plain(record.get("values"), arrays)
    if entries.ndim != 1 or entries.dtype != dtype:
        raise ValueError(f"the stored entries must be 1-D {dtype}, got {entries.dtype}")
    pattern = entries.view(np.dtype(f"u{dtype.itemsize}"))
    size = encoding.shape_size(shape)
    return _expand(record.get("sparse"), pattern, size, arrays).view(dtype).reshape(shape)


def _int_record(path: str, leaf: np.ndarray, encoder: Any) -> tuple[Record, Any]:
    """The leaf's ``"int"`` record (with its arrays) and decoded grid."""
    scratch: dict[str, np.ndarray] = {}

    def keep(array):
        scratch[str(len(scratch))] = np.asarray(array)
        return str(len(scratch) - 1)

    record = encoder(path, leaf, keep)
    return record, records.decode_int(record, scratch)


def _values_record(
    values: np.ndarray, grid: Any, per_tensor: bool, path: str, store: Store
) -> Record:
    """``values`` as ints on the leaf's grid (its scale as stored, or its single scale as
    ``()`` for per-tensor values ``(K,)``), else verbatim."""
    # The int grid would turn -0.0 into +0.0; those codebooks stay verbatim (bit-exact).
    if grid is None or np.any(np.signbit(values) & (values == 0)):
        return records.encode_array(path, values, store)
    scale, zero_point = grid.scale, grid.zero_point
    if per_tensor:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return records.int_encoder(scale, zero_point, fn_name=_COMPRESS)(path, values, store)


def _group_axes(shape: tuple[int, ...], grid: Any) -> tuple[int, ...] | None:
    """The output axes whose entries get their own values: ``()`` (one codebook) without a grid
    or on a per-tensor one, the axes a per-channel scale keeps; ``None`` (no codebook) on a
    group-wise grid, whose values no single scale per group could hold (nor on a grid with
    per-input-feature factors)."""
    if grid is not None and grid.input_scale is not None:
        return None
    if grid is None or grid.scale.size == 1:
        return ()
    padded = (1,) * (len(shape) - grid.scale.ndim) + grid.scale.shape
    if any(d not in (1, n) for d, n in zip(padded, shape, strict=True)):
        return None
    out = tuple(a for a, (d, n) in enumerate(zip(padded, shape, strict=True)) if d == n != 1)
    return out if len(out) < len(shape) else None


def _table(pattern: np.ndarray, out: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per group (an index on the ``out`` axes) its distinct bit patterns and each entry's index.

    Returns:
      ``(table, indices)``: ``table`` ``(K, F)`` with ``F`` groups and ``K`` the most distinct
      values of any, each column ascending and padded with its largest; ``indices`` ``(size,)``
      int64 in C order of ``pattern`` (the leaf's shape), each entry's row in its column.
    """
    order = [*(a for a in range(pattern.ndim) if a not in out), *out]
    groups = pattern.transpose(order).reshape(-1, int(np.prod([pattern.shape[a] for a in out])))
    ranked = np.argsort(groups, axis=0, kind="stable")
    sorted_ = np.take_along_axis(groups, ranked, axis=0)
    first = np.ones(groups.shape, bool)
    first[1:] = sorted_[1:] != sorted_[:-1]
    rank = np.cumsum(first, axis=0) - 1
    table = np.broadcast_to(sorted_[-1], (int(rank.max()) + 1, groups.shape[1])).copy()
    table[rank, np.arange(groups.shape[1])] = sorted_
    indices = np.empty(groups.shape, np.int64)
    np.put_along_axis(indices, ranked, rank, axis=0)
    shaped = indices.reshape([pattern.shape[a] for a in order]).transpose(np.argsort(order))
    return table, shaped.reshape(-1)


def _values(table: np.ndarray, shape: tuple[int, ...], out: tuple[int, ...], axis: int):
    """The ``(K, F)`` table as per-channel values: ``K`` on ``axis``, the ``out`` axes of
    ``shape`` kept, 1 elsewhere (module docstring)."""
    others = [a for a in range(len(shape)) if a != axis and a not in out]
    placed = table.reshape(table.shape[0], *(shape[a] for a in out), *[1] * len(others))
    return placed.transpose(np.argsort([axis, *out, *others]))


def encode_codebook(
    path: str,
    leaf: np.ndarray,
    encoder: LeafEncoder | None,
    store: Store,
    *,
    huffman: bool = True,
) -> Record | None:
    """The ``"codebook"`` record of a floating-point leaf with at most 256 distinct values (per
    output channel, on a per-channel grid).

    Args:
      path: the leaf's path.
      leaf: the view leaf (any floating dtype, any shape).
      encoder: the leaf's covering encoder (a fake-quant grid), used for the values; or None.
        With one, leaves whose index bits would not be fewer than the grid's code bits get
        ``None`` (they stay ``"int"``), and so do leaves on group-wise grids; on a per-channel
        grid each output channel has its own values (``"axis"``, module docstring), integers
        on its channel's scale.
      store: saves an array, returns its name.
      huffman: try Huffman coding for the streams (``False``: packed bits only, e.g. to
        measure what Huffman coding saves).

    Returns:
      The record (module docstring), or ``None`` for non-float or empty leaves and leaves with
      more than :data:`MAX_CLUSTERS` distinct values (per group).
    """
    if not jnp.issubdtype(leaf.dtype, jnp.floating) or leaf.size == 0:
        return None
    record, grid = _int_record(path, leaf, encoder) if encoder is not None else (None, None)
    out = _group_axes(leaf.shape, grid)
    if out is None:
        return None
    pattern = leaf.view(np.dtype(f"u{leaf.dtype.itemsize}"))
    table, indices = _table(pattern, out)
    clusters = table.shape[0]
    if clusters > MAX_CLUSTERS:
        return None
    bits = max(1, (clusters - 1).bit_length())
    # On a quantization grid, a codebook only where clustering left fewer values than the
    # grid's codes can tell apart: plain quantized leaves keep their "int" records, which the
    # integer inference path (mixjax.export.integer) runs on.
    if record is not None and bits >= record["bits"]:
        return None
    indices = indices.astype(np.uint8)
    options = [(None, _stream(indices, bits, huffman))]
    # +0.0 (bit pattern 0) sorts first: index 0 where every group holds it.
    if not np.any(table[0]):
        meta, entries = _sparse(indices, 0, bits, huffman)
        options.append((meta, _stream(entries, bits, huffman)))

    def size(option):
        meta, stream = option
        streams = [stream] + ([] if meta is None else [meta["positions"]])
        return sum(a.nbytes + ARRAY_OVERHEAD for _, arrays in streams for a in arrays.values())

    meta, stream = min(options, key=size)
    if meta is not None:
        meta = {**meta, "positions": _stored(meta["positions"], store)}
    if out:
        axis = min(a for a in range(leaf.ndim) if a not in out)
        values, where = _values(table, leaf.shape, out, axis), {"axis": axis}
    else:
        values, where = table[:, 0], {}
    return {
        "kind": "codebook",
        "shape": list(leaf.shape),
        "dtype": str(leaf.dtype),
        "clusters": clusters,
        "bits": bits,
        **where,
        "values": _values_record(values.view(leaf.dtype), grid, not out, path, store),
        "indices": _stored(stream, store),
        "sparse": meta,
    }


def decode_codebook(record: Record, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The leaf of a ``"codebook"`` record (validated)."""
    shape, dtype = records.shape_dtype(record)
    size = encoding.shape_size(shape)
    clusters, bits = record.get("clusters"), record.get("bits")
    if not _is_int(clusters) or not 1 <= clusters <= MAX_CLUSTERS:
        raise ValueError(f"bad clusters={encoding.short_repr(clusters)}")
    values = records.decode_plain(record.get("values"), arrays)
    axis = record.get("axis")
    if axis is None and values.shape != (clusters,):
        raise ValueError(f"the codebook values must have shape ({clusters},)")
    if axis is not None and not _per_channel_values(values.shape, shape, clusters, axis):
        raise ValueError(
            f"per-channel codebook values of shape {values.shape} do not fit axis="
            f"{encoding.short_repr(axis)} of shape {shape} ({clusters} on that axis, 1 or the "
            "leaf's size on the others)"
        )
    index_bits = max(1, (clusters - 1).bit_length())
    if not _is_int(bits) or bits != index_bits:
        raise ValueError(
            f"bad bits={encoding.short_repr(bits)} for {clusters} clusters ({index_bits} expected)"
        )
    indices = _decode_stream(record.get("indices"), arrays)
    if record.get("sparse") is not None:
        indices = _expand(record["sparse"], indices, size, arrays)
    if indices.size != size:
        raise ValueError(f"{indices.size} indices for {size} entries")
    if size and int(indices.max()) >= clusters:
        raise ValueError(f"index {int(indices.max())} past the {clusters} codebook values")
    if axis is None:
        return values.astype(dtype)[indices.astype(np.int64)].reshape(shape)
    # Values broadcast over the axes they have size 1 on: each entry reads its own channel's.
    picked = indices.astype(np.int64).reshape(shape)
    return np.take_along_axis(values.astype(dtype), picked, axis=axis)


def _per_channel_values(
    found: tuple[int, ...], shape: tuple[int, ...], clusters: int, axis: Any
) -> bool:
    """Whether per-channel values of shape ``found`` fit a leaf of ``shape`` (module docstring)."""
    if not _is_int(axis) or not 0 <= axis < len(shape) or len(found) != len(shape):
        return False
    return found[axis] == clusters and all(
        v in (1, n) for a, (v, n) in enumerate(zip(found, shape, strict=True)) if a != axis
    )
