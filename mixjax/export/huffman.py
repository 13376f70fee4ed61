"""Canonical Huffman coding of non-negative integer arrays (host NumPy).

Length-limited to :data:`MAX_CODE_LENGTH` bits, stored as the per-symbol code lengths plus the
bitstream (stream bit ``k`` is bit ``k % 8``, least significant first, of byte ``k // 8``, as
:mod:`mixjax.export.bitpack` packs 1-bit codes; each code is written most significant bit
first). Returns and reads an :class:`~mixjax.export.encoding.Encoding`.
"""

from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from mixjax import _checks
from mixjax.export import bitpack, encoding
from mixjax.export.encoding import Encoding

__all__ = ["MAX_CODE_LENGTH", "MAX_SYMBOLS", "huffman_decode", "huffman_encode", "huffman_lengths"]

MAX_CODE_LENGTH = 32
MAX_SYMBOLS = 1 << 16


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
    if not _checks.is_integer(max_length) or max_length < needed:
        raise ValueError(
            f"mixjax.export.huffman.huffman_lengths: {used.size} used symbols need max_length >= "
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
    name = "mixjax.export.huffman.huffman_encode"
    symbols = np.asarray(symbols)
    if not np.issubdtype(symbols.dtype, np.integer):
        raise TypeError(f"{name}: symbols must be an integer array, got dtype {symbols.dtype}")
    flat = symbols.reshape(-1).astype(np.int64)
    if num_symbols is None:
        num_symbols = int(flat.max()) + 1 if flat.size else 1
    num_symbols = _checks.integer(name, "num_symbols", num_symbols, 1, MAX_SYMBOLS)
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
    return Encoding(meta, {"lengths": lengths, "bits": bitpack.pack_bits(stream, 1)})


def huffman_decode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`huffman_encode`.

    Sizes are checked before anything is allocated: the symbols must be at most ``num_bits``
    (each code takes at least one bit) and the bitstream exactly ``ceil(num_bits / 8)`` bytes,
    so what decodes is at most 8 symbols per stored byte.

    Raises:
      ValueError: missing or malformed fields, more symbols than bits, code lengths that are
        not a prefix code, a bitstream of the wrong size, a bit pattern that is no code, or a
        stream that does not end exactly after the last symbol.
    """
    name = "mixjax.export.huffman.huffman_decode"
    encoding.check_codec(name, meta, "huffman")
    shape = encoding.meta_shape(name, meta)
    count = encoding.shape_size(shape)
    num_bits = encoding.meta_int(name, meta, "num_bits")
    # Every code is at least 1 bit: more symbols than bits cannot decode (and must not be
    # allocated); the bitstream's bytes then bound num_bits (unpack_bits checks them).
    if count > num_bits:
        raise encoding.corrupt(name, f"{count} symbols cannot fit in {num_bits} bits")
    try:
        dtype = np.dtype(meta.get("dtype")) if isinstance(meta.get("dtype"), str) else None
    except (TypeError, ValueError, SyntaxError):
        dtype = None
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise encoding.corrupt(
            name, f"meta['dtype']={encoding.short_repr(meta.get('dtype'))} is not an integer dtype"
        )
    lengths = encoding.array_field(name, arrays, "lengths", np.uint8)
    if not 1 <= lengths.size <= MAX_SYMBOLS or lengths.max() > MAX_CODE_LENGTH:
        raise encoding.corrupt(
            name, f"{lengths.size} code lengths up to {lengths.max(initial=0)} bits"
        )
    kraft = np.sum(np.ldexp(1.0, -lengths[lengths > 0].astype(np.int64)))
    if kraft > 1.0:
        raise encoding.corrupt(name, f"code lengths are not a prefix code (Kraft sum {kraft})")
    bits = encoding.array_field(name, arrays, "bits", np.uint8)
    try:
        stream = bitpack.unpack_bits(bits, 1, num_bits)
    except ValueError as err:
        raise encoding.corrupt(name, f"bitstream: {err}") from None
    if count == 0 or num_bits == 0:
        if count or num_bits:
            raise encoding.corrupt(name, f"{num_bits} bits for {count} symbols")
        return np.zeros(shape, dtype)
    codes, order = _canonical(lengths)
    if order.size == 0:
        raise encoding.corrupt(name, "no symbol has a code")
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
        raise encoding.corrupt(name, f"{what}: symbol {bad[0]} of {count} ({num_bits} bits)")
    end = chain[-1] + int(order_lengths[rank[chain[-1]]])
    if end != num_bits:
        raise encoding.corrupt(name, f"{count} symbols end at bit {end}, the stream has {num_bits}")
    return order[rank[chain]].astype(dtype).reshape(shape)
