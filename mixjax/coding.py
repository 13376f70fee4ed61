"""Entropy and sparse-position coding of index arrays (host NumPy), for compressed artifacts.

Every encoder returns an :class:`Encoding`: ``meta``, a small JSON-able dict (ints, strings,
lists; its ``"codec"`` names the encoder), and ``arrays``, named NumPy arrays; so an artifact
stores them without pickle. Every decoder takes ``(meta, arrays)`` (``decode(*encoding)`` works),
validates what it reads and raises ``ValueError`` naming itself on corrupt data.

* Huffman (:func:`huffman_encode`): canonical, length-limited to :data:`MAX_CODE_LENGTH` bits,
  stored as the per-symbol code lengths plus the bitstream (stream bit ``k`` is bit ``k % 8``,
  least significant first, of byte ``k // 8``, as :mod:`mixjax.packing` packs 1-bit codes; each
  code is written most significant bit first).
* Sparse positions of the entries of an array that differ from a ``zero`` value:
  :func:`bitmask_encode` (one bit per position) or :func:`relative_encode` (Deep Compression,
  Han et al. 2016: each entry stores its distance to the previous entry in ``gap_bits`` bits;
  a longer jump is bridged by *filler* entries whose value is ``zero``); :func:`sparse_encode`
  keeps whichever is smaller.
"""

from __future__ import annotations

import heapq
from typing import Any, NamedTuple

import numpy as np

from mixjax import packing

MAX_CODE_LENGTH = 32
MAX_SYMBOLS = 1 << 16
GAP_BITS = (4, 8)


class Encoding(NamedTuple):
    """An encoded array.

    Attributes:
      meta: JSON-able dict; ``meta["codec"]`` names the encoding.
      arrays: ``{name: np.ndarray}``, what the encoding stores.
    """

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def nbytes(encoding: Encoding) -> int:
    """Bytes of the encoding's arrays (``meta`` is a few bytes of JSON beside them)."""
    return int(sum(a.nbytes for a in encoding.arrays.values()))


def _corrupt(fn_name: str, what: str) -> ValueError:
    return ValueError(f"{fn_name}: corrupt encoding: {what}")


def _array(fn_name: str, arrays: Any, key: str, dtype: Any) -> np.ndarray:
    if not hasattr(arrays, "get") or key not in arrays:
        raise _corrupt(fn_name, f"missing array {key!r}")
    array = np.asarray(arrays[key])
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise _corrupt(
            fn_name, f"array {key!r} has dtype {array.dtype}, expected {np.dtype(dtype)}"
        )
    if array.ndim != 1:
        raise _corrupt(fn_name, f"array {key!r} has shape {array.shape}, expected 1-D")
    return array


def _meta_int(fn_name: str, meta: Any, key: str, low: int = 0) -> int:
    value = meta.get(key) if hasattr(meta, "get") else None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _corrupt(fn_name, f"meta[{key!r}]={value!r}, expected an integer >= {low}")
    return value


def _meta_shape(fn_name: str, meta: Any) -> tuple[int, ...]:
    shape = meta.get("shape") if hasattr(meta, "get") else None
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise _corrupt(fn_name, f"meta['shape']={shape!r}, expected a list of integers >= 0")
    return tuple(shape)


def _check_codec(fn_name: str, meta: Any, codec: str) -> None:
    found = meta.get("codec") if hasattr(meta, "get") else None
    if found != codec:
        raise _corrupt(fn_name, f"meta['codec']={found!r}, expected {codec!r}")


# ----------------------------------------------------------------------------------------------
# Huffman.


def huffman_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths for symbol frequencies, limited to ``max_length`` bits.

    A symbol with count 0 gets length 0 (no code); a lone used symbol gets length 1. When the
    optimal code is deeper than ``max_length``, counts are halved (rounding up, so used symbols
    stay used) until it fits, which keeps the code complete and close to optimal.

    Args:
      counts: ``(num_symbols,)`` non-negative integer frequencies.
      max_length: longest code allowed, at least ``ceil(log2(used symbols))``.

    Returns:
      ``(num_symbols,)`` uint8 code lengths.

    Raises:
      ValueError: ``max_length`` is too small for the number of used symbols.
    """
    counts = np.asarray(counts, np.int64)
    used = np.flatnonzero(counts)
    needed = max(1, int(np.ceil(np.log2(max(used.size, 1)))))
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < needed:
        raise ValueError(
            f"mixjax.coding.huffman_lengths: {used.size} used symbols need max_length >= "
            f"{needed}, got max_length={max_length!r}"
        )
    lengths = np.zeros(counts.shape, np.uint8)
    if used.size == 1:
        lengths[used] = 1
    if used.size <= 1:
        return lengths
    weights = counts[used]
    while True:
        depth = _huffman_depths(weights)
        if depth.max() <= max_length:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2


def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    # Heap of (weight, tie-break, symbols in the subtree); merging deepens every symbol below.
    depth = np.zeros(weights.size, np.int64)
    heap = [(int(w), i, [i]) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    tie = weights.size
    while len(heap) > 1:
        w1, _, s1 = heapq.heappop(heap)
        w2, _, s2 = heapq.heappop(heap)
        merged = s1 + s2
        depth[merged] += 1
        heapq.heappush(heap, (w1 + w2, tie, merged))
        tie += 1
    return depth


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes: (codes per symbol as uint32, symbols in canonical order)."""
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    codes = np.zeros(lengths.size, np.uint32)
    code, previous = 0, 0
    for symbol in order:
        length = int(lengths[symbol])
        code <<= length - previous
        codes[symbol] = code
        code, previous = code + 1, length
    return codes, order


def huffman_encode(symbols: np.ndarray, *, num_symbols: int | None = None) -> Encoding:
    """Canonical Huffman coding of a non-negative integer array.

    Args:
      symbols: integer array of any shape with entries in ``[0, num_symbols)``.
      num_symbols: alphabet size, at most :data:`MAX_SYMBOLS`; default ``max(symbols) + 1``.

    Returns:
      An :class:`Encoding` with ``meta = {"codec": "huffman", "shape", "dtype", "num_bits"}``
      and ``arrays = {"lengths": uint8 (num_symbols,), "bits": uint8 bitstream}``.

    Raises:
      TypeError: ``symbols`` is not an integer array.
      ValueError: a symbol outside ``[0, num_symbols)`` or too large an alphabet.
    """
    name = "mixjax.coding.huffman_encode"
    symbols = np.asarray(symbols)
    if not np.issubdtype(symbols.dtype, np.integer):
        raise TypeError(f"{name}: symbols must be an integer array, got dtype {symbols.dtype}")
    flat = symbols.reshape(-1).astype(np.int64)
    if num_symbols is None:
        num_symbols = int(flat.max()) + 1 if flat.size else 1
    if (
        isinstance(num_symbols, bool)
        or not isinstance(num_symbols, int)
        or not (1 <= num_symbols <= MAX_SYMBOLS)
    ):
        raise ValueError(
            f"{name}: num_symbols must be an integer in [1, {MAX_SYMBOLS}], got {num_symbols!r}"
        )
    if flat.size and (flat.min() < 0 or flat.max() >= num_symbols):
        raise ValueError(
            f"{name}: symbols must lie in [0, {num_symbols}), got range "
            f"[{flat.min()}, {flat.max()}]"
        )
    lengths = huffman_lengths(np.bincount(flat, minlength=num_symbols))
    codes, _ = _canonical(lengths)
    length_of = lengths[flat].astype(np.int64)
    # Stream bit p is bit k (most significant first) of the code of the symbol that owns it.
    owner = np.repeat(np.arange(flat.size), length_of)
    k = np.arange(owner.size) - (np.cumsum(length_of) - length_of)[owner]
    shift = (length_of[owner] - 1 - k).astype(np.uint32)
    stream = ((codes[flat][owner] >> shift) & np.uint32(1)).astype(np.uint8)
    meta = {
        "codec": "huffman",
        "shape": [int(n) for n in symbols.shape],
        "dtype": str(symbols.dtype),
        "num_bits": int(stream.size),
    }
    return Encoding(meta, {"lengths": lengths, "bits": packing.pack_bits(stream, 1)})


def huffman_decode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`huffman_encode`.

    Raises:
      ValueError: missing or malformed fields, code lengths that are not a prefix code, a
        bitstream of the wrong size, a bit pattern that is no code, or a stream that does not
        end exactly after the last symbol.
    """
    name = "mixjax.coding.huffman_decode"
    _check_codec(name, meta, "huffman")
    shape = _meta_shape(name, meta)
    count = int(np.prod(shape, dtype=np.int64))
    num_bits = _meta_int(name, meta, "num_bits")
    try:
        dtype = np.dtype(meta.get("dtype"))
    except TypeError:
        dtype = None
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise _corrupt(name, f"meta['dtype']={meta.get('dtype')!r} is not an integer dtype")
    lengths = _array(name, arrays, "lengths", np.uint8)
    if not 1 <= lengths.size <= MAX_SYMBOLS or lengths.max() > MAX_CODE_LENGTH:
        raise _corrupt(name, f"{lengths.size} code lengths up to {lengths.max(initial=0)} bits")
    kraft = np.sum(np.ldexp(1.0, -lengths[lengths > 0].astype(np.int64)))
    if kraft > 1.0:
        raise _corrupt(name, f"code lengths are not a prefix code (Kraft sum {kraft})")
    bits = _array(name, arrays, "bits", np.uint8)
    try:
        stream = packing.unpack_bits(bits, 1, num_bits)
    except ValueError as err:
        raise _corrupt(name, f"bitstream: {err}") from None
    if count == 0 or num_bits == 0:
        if count or num_bits:
            raise _corrupt(name, f"{num_bits} bits for {count} symbols")
        return np.zeros(shape, dtype)
    codes, order = _canonical(lengths)
    if order.size == 0:
        raise _corrupt(name, "no symbol has a code")
    widest = int(lengths.max())
    # The `widest`-bit window starting at every stream position, zero-padded past the end.
    padded = np.concatenate([stream, np.zeros(widest, np.uint8)]).astype(np.uint64)
    window = np.zeros(num_bits, np.uint64)
    for k in range(widest):
        window = (window << np.uint64(1)) | padded[k : k + num_bits]
    # Canonical codes left-justified to `widest` bits ascend in canonical order; each covers
    # [start, start + 2**(widest - length)).
    order_lengths = lengths[order].astype(np.uint64)
    starts = codes[order].astype(np.uint64) << (np.uint64(widest) - order_lengths)
    rank = np.searchsorted(starts, window, side="right") - 1
    found = rank >= 0
    rank = np.maximum(rank, 0)
    span = np.uint64(1) << (np.uint64(widest) - order_lengths[rank])
    found &= window < starts[rank] + span
    # The code starting at each bit leads to the next code's start; bit `num_bits` is the end
    # and `num_bits + 1` a sink for patterns that are no code. The starts of codes 0..count-1
    # follow by pointer doubling: with `chain` = starts 0..s-1 and `jump` = s steps ahead,
    # jump[chain] = starts s..2s-1.
    jump = np.empty(num_bits + 2, np.int64)
    jump[:num_bits] = np.where(
        found, np.arange(num_bits) + order_lengths[rank].astype(np.int64), num_bits + 1
    )
    jump[num_bits:] = [num_bits, num_bits + 1]
    jump[:num_bits] = np.minimum(jump[:num_bits], num_bits + 1)
    chain = np.zeros(1, np.int64)
    while chain.size < count:
        chain = np.concatenate([chain, jump[chain]])
        if chain.size < count:
            jump = jump[jump]
    chain = chain[:count]
    bad = np.flatnonzero((chain >= num_bits) | ~found[np.minimum(chain, num_bits - 1)])
    if bad.size:
        at = int(chain[bad[0]])
        what = f"no code at bit {at}" if at < num_bits else "the stream ended"
        raise _corrupt(name, f"{what}: symbol {bad[0]} of {count} ({num_bits} bits)")
    end = chain[-1] + int(order_lengths[rank[chain[-1]]])
    if end != num_bits:
        raise _corrupt(name, f"{count} symbols end at bit {end}, the stream has {num_bits}")
    return order[rank[chain]].astype(dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------
# Sparse positions.


def _flat_values(fn_name: str, values: Any) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype == object or not (
        np.issubdtype(values.dtype, np.number) or values.dtype == bool
    ):
        raise TypeError(f"{fn_name}: values must be a numeric array, got dtype {values.dtype}")
    return values.reshape(-1)


def _zero_meta(values: np.ndarray, zero: Any) -> Any:
    return np.asarray(zero, values.dtype).item()


def bitmask_encode(values: np.ndarray, *, zero: Any = 0) -> Encoding:
    """Stores which entries differ from ``zero`` as one bit per entry, plus those entries.

    Returns:
      ``meta = {"codec": "bitmask", "shape", "zero"}``; ``arrays = {"mask": uint8 (packed
      1-bit, :mod:`mixjax.packing` layout, C order), "values": the entries that differ from
      zero, in C order, values' dtype}``.
    """
    flat = _flat_values("mixjax.coding.bitmask_encode", values)
    keep = flat != np.asarray(zero, flat.dtype)
    meta = {
        "codec": "bitmask",
        "shape": [int(n) for n in np.shape(values)],
        "zero": _zero_meta(flat, zero),
    }
    return Encoding(
        meta, {"mask": packing.pack_bits(keep.astype(np.uint8), 1), "values": flat[keep]}
    )


def relative_encode(values: np.ndarray, *, gap_bits: int = 4, zero: Any = 0) -> Encoding:
    """Deep Compression's relative indices: ``gap_bits``-bit distances between stored entries.

    Entry ``j`` at flat position ``p_j`` stores code ``p_j - p_{j-1} - 1`` (``p_{-1} = -1``),
    so a code covers a distance of 1 to ``2**gap_bits``. A longer distance is bridged by filler
    entries, each ``2**gap_bits`` past the previous entry, holding ``zero``.

    Returns:
      ``meta = {"codec": "relative", "shape", "zero", "gap_bits", "num_entries"}``; ``arrays =
      {"gaps": uint8 (packed ``gap_bits``-bit codes), "values": entries, values' dtype}``.

    Raises:
      ValueError: ``gap_bits`` not in 1..8.
    """
    name = "mixjax.coding.relative_encode"
    if isinstance(gap_bits, bool) or not isinstance(gap_bits, int) or not 1 <= gap_bits <= 8:
        raise ValueError(f"{name}: gap_bits must be an integer in [1, 8], got {gap_bits!r}")
    flat = _flat_values(name, values)
    zero_value = np.asarray(zero, flat.dtype)
    positions = np.flatnonzero(flat != zero_value)
    distance = np.diff(positions, prepend=-1)
    reach = 1 << gap_bits
    fillers = (distance - 1) // reach
    per_entry = fillers + 1
    total = int(per_entry.sum())
    last = np.cumsum(per_entry) - 1
    gaps = np.full(total, reach - 1, np.uint8)
    gaps[last] = distance - 1 - fillers * reach
    entries = np.full(total, zero_value, flat.dtype)
    entries[last] = flat[positions]
    meta = {
        "codec": "relative",
        "shape": [int(n) for n in np.shape(values)],
        "zero": _zero_meta(flat, zero),
        "gap_bits": gap_bits,
        "num_entries": total,
    }
    return Encoding(meta, {"gaps": packing.pack_bits(gaps, gap_bits), "values": entries})


def sparse_encode(
    values: np.ndarray,
    *,
    zero: Any = 0,
    value_bits: int | None = None,
    gap_bits: tuple[int, ...] = GAP_BITS,
) -> Encoding:
    """The smallest of :func:`bitmask_encode` and :func:`relative_encode` (each ``gap_bits``).

    Size counts the position bytes plus ``value_bits`` per stored entry (fillers included), as
    the values will be stored (e.g. ``log2 K`` bits for cluster indices); ties go to the bitmask.

    Args:
      values: numeric array of any shape.
      zero: the value not stored.
      value_bits: bits each stored value will take; default: the dtype's size.
      gap_bits: the relative-index widths to try.

    Raises:
      ValueError: ``value_bits < 1`` or a bad ``gap_bits``.
    """
    name = "mixjax.coding.sparse_encode"
    flat = _flat_values(name, values)
    if value_bits is None:
        value_bits = flat.dtype.itemsize * 8
    if isinstance(value_bits, bool) or not isinstance(value_bits, int) or value_bits < 1:
        raise ValueError(f"{name}: value_bits must be an integer >= 1, got {value_bits!r}")
    candidates = [bitmask_encode(values, zero=zero)]
    candidates += [relative_encode(values, gap_bits=b, zero=zero) for b in gap_bits]

    def size(encoding):
        positions = encoding.arrays.get("mask", encoding.arrays.get("gaps"))
        return positions.nbytes + packing.packed_size(encoding.arrays["values"].size, value_bits)

    return min(candidates, key=size)


def sparse_decode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`bitmask_encode`, :func:`relative_encode` and :func:`sparse_encode`.

    Raises:
      ValueError: unknown codec, missing or malformed fields, sizes that do not match, or a
        position past the end of the array.
    """
    name = "mixjax.coding.sparse_decode"
    codec = meta.get("codec") if hasattr(meta, "get") else None
    if codec not in ("bitmask", "relative"):
        raise _corrupt(name, f"meta['codec']={codec!r}, expected 'bitmask' or 'relative'")
    shape = _meta_shape(name, meta)
    size = int(np.prod(shape, dtype=np.int64))
    entries = _array(name, arrays, "values", None)
    if not (np.issubdtype(entries.dtype, np.number) or entries.dtype == bool):
        raise _corrupt(name, f"values have dtype {entries.dtype}")
    zero = meta.get("zero")
    if isinstance(zero, (list, dict, str)) or zero is None:
        raise _corrupt(name, f"meta['zero']={zero!r} is not a number")
    dense = np.full(size, zero, entries.dtype)
    if codec == "bitmask":
        mask = _array(name, arrays, "mask", np.uint8)
        try:
            keep = packing.unpack_bits(mask, 1, size)
        except ValueError as err:
            raise _corrupt(name, f"mask: {err}") from None
        keep = keep.astype(bool)
        if int(keep.sum()) != entries.size:
            raise _corrupt(name, f"mask marks {int(keep.sum())} entries, {entries.size} stored")
        dense[keep] = entries
        return dense.reshape(shape)
    gap_bits = _meta_int(name, meta, "gap_bits", low=1)
    count = _meta_int(name, meta, "num_entries")
    if gap_bits > 8 or entries.size != count:
        raise _corrupt(name, f"gap_bits={gap_bits}, {entries.size} values for {count} entries")
    packed = _array(name, arrays, "gaps", np.uint8)
    try:
        gaps = packing.unpack_bits(packed, gap_bits, count)
    except ValueError as err:
        raise _corrupt(name, f"gaps: {err}") from None
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    if count and positions[-1] >= size:
        raise _corrupt(name, f"entry at position {positions[-1]} past the {size} entries")
    dense[positions] = entries
    return dense.reshape(shape)
