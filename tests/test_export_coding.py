"""Tests of mixjax.coding: Huffman and sparse-position coding, with NumPy/Python references."""

import heapq
import json

import numpy as np
import pytest

from mixjax.export import bitpack, huffman, positions
from mixjax.export.encoding import nbytes

RNG = np.random.default_rng(0)
SYMBOL_CASES = {
    "empty": np.zeros(0, np.uint8),
    "single": np.array([7], np.uint8),
    "one-symbol": np.full(100, 3, np.uint8),
    "two-symbols": np.array([0, 1, 1, 0, 1, 1, 1], np.uint8),
    "uniform": RNG.integers(0, 16, 1000).astype(np.uint8),
    "skewed": np.minimum(RNG.geometric(0.4, 5000) - 1, 255).astype(np.uint8),
    "2d-uint16": RNG.integers(0, 700, (30, 20)).astype(np.uint16),
    "int32": RNG.integers(0, 5, 50).astype(np.int32),
}


def _json_round_trip(encoding):
    """What an artifact does: meta through JSON, arrays as they are."""
    return json.loads(json.dumps(encoding.meta)), dict(encoding.arrays)


def _optimal_bits(counts):
    """Total bits of an optimal prefix code: the sum of all merged weights (Huffman)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


@pytest.mark.parametrize("name", SYMBOL_CASES)
def test_huffman_round_trip_is_exact_and_optimal(name):
    symbols = SYMBOL_CASES[name]
    encoding = huffman.huffman_encode(symbols)
    decoded = huffman.huffman_decode(*_json_round_trip(encoding))
    assert decoded.dtype == symbols.dtype and decoded.shape == symbols.shape
    np.testing.assert_array_equal(decoded, symbols)
    assert (
        encoding.arrays["bits"].dtype == np.uint8 and encoding.arrays["lengths"].dtype == np.uint8
    )
    counts = np.bincount(symbols.reshape(-1).astype(np.int64), minlength=1)
    assert encoding.meta["num_bits"] == _optimal_bits(counts)
    assert encoding.arrays["bits"].size == -(-encoding.meta["num_bits"] // 8)


def test_bitstream_layout_matches_a_python_reference():
    symbols = np.array([0, 1, 0, 2, 0, 1, 3, 0, 1, 0], np.uint8)
    encoding = huffman.huffman_encode(symbols)
    lengths = encoding.arrays["lengths"]
    np.testing.assert_array_equal(lengths, [1, 2, 3, 3])
    # Canonical: shorter codes first, ties by symbol: 0 -> 0, 1 -> 10, 2 -> 110, 3 -> 111.
    table = {0: "0", 1: "10", 2: "110", 3: "111"}
    stream = "".join(table[s] for s in symbols)
    stream += "0" * (-len(stream) % 8)
    # Each byte holds 8 stream bits, the first in its least significant bit.
    expected = [int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8)]
    np.testing.assert_array_equal(encoding.arrays["bits"], expected)


def test_code_lengths_are_limited_and_stay_a_complete_prefix_code():
    fibonacci = [1, 1]
    while len(fibonacci) < 40:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    counts = np.array(fibonacci, np.int64)
    unlimited = huffman.huffman_lengths(counts, max_length=64)
    assert unlimited.max() == 39
    for limit in (32, 12, 6):
        lengths = huffman.huffman_lengths(counts, max_length=limit)
        assert lengths.max() <= limit and np.all(lengths > 0)
        assert np.sum(2.0 ** -lengths.astype(float)) == 1.0
    with pytest.raises(ValueError, match=r"40 used symbols need max_length >= 6, got max_length=5"):
        huffman.huffman_lengths(counts, max_length=5)
    symbols = np.repeat(np.arange(25), np.array(fibonacci[:25]))
    np.testing.assert_array_equal(huffman.huffman_decode(*huffman.huffman_encode(symbols)), symbols)


def test_huffman_decoder_rejects_corrupt_data():
    encoding = huffman.huffman_encode(SYMBOL_CASES["skewed"])
    meta, arrays = encoding
    decode = huffman.huffman_decode
    with pytest.raises(
        ValueError, match=r"mixjax.export.huffman.huffman_decode: corrupt encoding: bitstr"
    ):
        decode(meta, dict(arrays, bits=arrays["bits"][:-3]))
    with pytest.raises(ValueError, match=r"corrupt encoding: .* symbols end at bit"):
        decode(
            dict(meta, num_bits=meta["num_bits"] + 8),
            dict(arrays, bits=np.append(arrays["bits"], np.uint8(0))),
        )
    with pytest.raises(ValueError, match=r"corrupt encoding: the stream ended: symbol \d+ of"):
        decode(dict(meta, shape=[meta["shape"][0] + 50]), arrays)
    with pytest.raises(ValueError, match=r"not a prefix code \(Kraft sum"):
        decode(meta, dict(arrays, lengths=np.ones_like(arrays["lengths"])))
    with pytest.raises(ValueError, match=r"corrupt encoding: missing array 'lengths'"):
        decode(meta, {"bits": arrays["bits"]})
    with pytest.raises(ValueError, match=r"array 'bits' has dtype int8, expected uint8"):
        decode(meta, dict(arrays, bits=arrays["bits"].view(np.int8)))
    with pytest.raises(ValueError, match=r"meta\['codec'\]='bitmask', expected 'huffman'"):
        decode(dict(meta, codec="bitmask"), arrays)
    with pytest.raises(ValueError, match=r"meta\['num_bits'\]=-1, expected an integer >= 0"):
        decode(dict(meta, num_bits=-1), arrays)
    with pytest.raises(ValueError, match=r"meta\['dtype'\]='float32' is not an integer dtype"):
        decode(dict(meta, dtype="float32"), arrays)
    with pytest.raises(ValueError, match=r"meta\['shape'\]=\[-1\]"):
        decode(dict(meta, shape=[-1]), arrays)
    # A code that leaves bit patterns unused: the lone symbol is "0", so a 1 bit is no code.
    lone_meta, lone_arrays = huffman.huffman_encode(np.zeros(8, np.uint8))
    with pytest.raises(ValueError, match=r"no code at bit 0: symbol 0 of 8 \(8 bits\)"):
        decode(lone_meta, dict(lone_arrays, bits=np.array([255], np.uint8)))


def test_huffman_encoder_rejects_bad_input():
    with pytest.raises(
        TypeError, match=r"mixjax.export.huffman.huffman_encode: symbols must be an integer"
    ):
        huffman.huffman_encode(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"symbols must lie in \[0, 4\), got range \[0, 5\]"):
        huffman.huffman_encode(np.array([0, 5]), num_symbols=4)
    with pytest.raises(ValueError, match=r"symbols must lie in \[0, 3\), got range \[-1, 2\]"):
        huffman.huffman_encode(np.array([-1, 2]), num_symbols=3)
    with pytest.raises(ValueError, match=r"num_symbols must be an integer in \[1, 65536\]"):
        huffman.huffman_encode(np.array([0]), num_symbols=70000)


def _sparse(shape, density, zero=0, dtype=np.uint8, seed=1):
    rng = np.random.default_rng(seed)
    values = rng.integers(1, 16, shape).astype(dtype) + np.asarray(zero, dtype)
    values[rng.random(shape) >= density] = zero
    return values


def _reference_relative(values, gap_bits, zero):
    """Deep Compression's relative indices, one entry at a time (Python); the end (position
    ``size``) is bridged by fillers like one more entry, which is not stored."""
    gaps, entries, previous = [], [], -1
    flat = values.reshape(-1)
    for position in [*range(flat.size), flat.size]:
        if position < flat.size and flat[position] == zero:
            continue
        while position - previous > 2**gap_bits:
            previous += 2**gap_bits
            gaps.append(2**gap_bits - 1)
            entries.append(zero)
        if position < flat.size:
            gaps.append(position - previous - 1)
            entries.append(flat[position])
            previous = position
    return gaps, entries


SPARSE_CASES = {
    "dense": _sparse((40, 30), 0.9),
    "moderate": _sparse((40, 30), 0.2),
    "very-sparse": _sparse((100, 50), 0.004),
    "all-zero": np.zeros((5, 7), np.uint8),
    "empty": np.zeros((0,), np.uint8),
    "float": _sparse((300,), 0.1, dtype=np.float32),
    "zero-is-7": _sparse((20, 20), 0.3, zero=7),
}


@pytest.mark.parametrize("name", SPARSE_CASES)
def test_sparse_encodings_round_trip(name):
    values = SPARSE_CASES[name]
    zero = 7 if name == "zero-is-7" else 0
    bitmask = positions.bitmask_encode(values, zero=zero)
    assert bitmask.arrays["values"].size == np.sum(values != zero)
    assert bitmask.arrays["mask"].size == -(-values.size // 8)
    candidates = [bitmask]
    for gap_bits in (2, 4, 8):
        relative = positions.relative_encode(values, gap_bits=gap_bits, zero=zero)
        gaps, entries = _reference_relative(values, gap_bits, zero)
        assert relative.meta["num_entries"] == len(gaps)
        np.testing.assert_array_equal(relative.arrays["values"], np.asarray(entries, values.dtype))
        np.testing.assert_array_equal(
            bitpack.unpack_bits(relative.arrays["gaps"], gap_bits, len(gaps)), gaps
        )
        candidates.append(relative)
    for encoding in candidates + [positions.sparse_encode(values, zero=zero, value_bits=4)]:
        decoded = positions.sparse_decode(*_json_round_trip(encoding))
        assert decoded.dtype == values.dtype and decoded.shape == values.shape
        np.testing.assert_array_equal(decoded, values)


def test_sparse_encode_keeps_the_smallest():
    def size(encoding, value_bits):
        positions = encoding.arrays.get("mask", encoding.arrays.get("gaps"))
        return positions.nbytes + -(-encoding.arrays["values"].size * value_bits // 8)

    chosen = {}
    for name in ("dense", "moderate", "very-sparse"):
        values = SPARSE_CASES[name]
        best = positions.sparse_encode(values, value_bits=4)
        sizes = [
            size(e, 4)
            for e in [positions.bitmask_encode(values)]
            + [positions.relative_encode(values, gap_bits=b) for b in positions.GAP_BITS]
        ]
        assert size(best, 4) == min(sizes)
        chosen[name] = (best.meta["codec"], best.meta.get("gap_bits"))
    assert chosen == {
        "dense": ("bitmask", None),
        "moderate": ("relative", 4),
        "very-sparse": ("relative", 8),
    }
    # Default value size: the dtype's, float32 here.
    values = SPARSE_CASES["float"]
    assert nbytes(positions.sparse_encode(values)) == min(
        nbytes(positions.bitmask_encode(values)),
        *(nbytes(positions.relative_encode(values, gap_bits=b)) for b in positions.GAP_BITS),
    )


def test_sparse_decoder_rejects_corrupt_data():
    values = SPARSE_CASES["moderate"]
    meta, arrays = positions.relative_encode(values, gap_bits=4)
    decode = positions.sparse_decode
    with pytest.raises(
        ValueError, match=r"mixjax.export.positions.sparse_decode: corrupt encoding: entry at"
    ):
        decode(dict(meta, shape=[10]), arrays)
    with pytest.raises(ValueError, match=r"corrupt encoding: gaps: .*need a 1-D array of"):
        decode(meta, dict(arrays, gaps=arrays["gaps"][:-1]))
    with pytest.raises(ValueError, match=r"values for \d+ entries"):
        decode(meta, dict(arrays, values=arrays["values"][:-1]))
    with pytest.raises(ValueError, match=r"expected 'bitmask' or 'relative'"):
        decode(dict(meta, codec="rle"), arrays)
    with pytest.raises(ValueError, match=r"meta\['zero'\]=None is not a number"):
        decode(dict(meta, zero=None), arrays)
    meta, arrays = positions.bitmask_encode(values)
    with pytest.raises(ValueError, match=r"mask marks \d+ entries, \d+ stored"):
        decode(meta, dict(arrays, values=arrays["values"][1:]))
    with pytest.raises(ValueError, match=r"corrupt encoding: mask: "):
        decode(meta, dict(arrays, mask=arrays["mask"][1:]))
    with pytest.raises(ValueError, match=r"missing array 'mask'"):
        decode(meta, {"values": arrays["values"]})


def test_sparse_encoders_reject_bad_input():
    with pytest.raises(
        ValueError,
        match=r"positions.relative_encode: gap_bits must be an integer in \[1, 8\], got gap_bits=9",
    ):
        positions.relative_encode(np.zeros(3), gap_bits=9)
    with pytest.raises(
        TypeError, match=r"mixjax.export.positions.bitmask_encode: values must be a numeric array"
    ):
        positions.bitmask_encode(np.array(["a", "b"]))
    with pytest.raises(
        ValueError,
        match=r"mixjax.export.positions.sparse_encode: value_bits must be an integer >= 1",
    ):
        positions.sparse_encode(np.zeros(3), value_bits=0)


def test_declared_sizes_must_be_backed_by_the_stored_bits():
    meta, arrays = huffman.huffman_encode(SYMBOL_CASES["skewed"])
    decode = huffman.huffman_decode
    # Every code takes >= 1 bit: more symbols than bits is refused before decoding.
    with pytest.raises(ValueError, match=rf"corrupt encoding: {meta['num_bits'] + 1} symbols "):
        decode(dict(meta, shape=[meta["num_bits"] + 1]), arrays)
    with pytest.raises(
        ValueError, match=r"meta\['shape'\]=\[4294967296, 4294967296\], more than 1099511627776"
    ):
        decode(dict(meta, shape=[2**32, 2**32]), arrays)  # 2**64: 0 in int64
    with pytest.raises(ValueError, match=r"meta\['shape'\]=\[True\], expected a list of integers"):
        decode(dict(meta, shape=[True]), arrays)
    # Relative positions: the trailing run is bridged by fillers, so the tail is bounded.
    values = np.zeros(1000, np.uint8)
    values[3] = 5
    meta, arrays = positions.relative_encode(values, gap_bits=4)
    assert meta["num_entries"] == 1 + (1000 - 4) // 16  # 62 fillers after the entry
    assert positions.sparse_decode(meta, arrays)[3] == 5
    # What the encoder wrote before the trailing fillers: 40 entries, then a run of 560 zeros.
    bare = dict(meta, shape=[600], num_entries=40)
    bare_arrays = {"gaps": bitpack.pack_bits(np.zeros(40, np.uint8), 4), "values": np.ones(40)}
    with pytest.raises(
        ValueError,
        match=r"the last entry, at position 39, is 561 from the end \(600\); fillers must "
        r"bridge runs longer than 16",
    ):
        positions.sparse_decode(bare, bare_arrays)
    with pytest.raises(ValueError, match=r"40 entries of 4-bit gaps cannot reach the 657 entries"):
        positions.sparse_decode(dict(bare, shape=[657]), bare_arrays)
    with pytest.raises(ValueError, match=r"meta\['zero'\]=300 is not a number of the values' dt"):
        positions.sparse_decode(dict(meta, zero=300), arrays)
    # Exactly 2**gap_bits to the end needs no filler; one more needs one.
    for size, entries in ((19, 1), (20, 2)):
        values = np.zeros(size, np.uint8)
        values[3] = 1
        assert positions.relative_encode(values, gap_bits=4).meta["num_entries"] == entries
