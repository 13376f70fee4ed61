"""Tests of mixjax.packing against a bit-by-bit Python reference."""

import numpy as np
import pytest

from mixjax.export import bitpack


def reference_pack(values, bits):
    """Little-endian bit stream built one bit at a time with Python integers."""
    stream = 0
    for i, v in enumerate(int(v) for v in values):
        stream |= v << (i * bits)
    size = -(-len(values) * bits // 8)
    return (
        np.frombuffer(stream.to_bytes(size, "little"), np.uint8) if size else np.zeros(0, np.uint8)
    )


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 9, 13, 64, 1001])
def test_round_trip_matches_reference(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(0, 2**bits, size=count, dtype=np.uint8)
    packed = bitpack.pack_bits(values, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (bitpack.packed_size(count, bits),)
    np.testing.assert_array_equal(packed, reference_pack(values, bits))
    out = bitpack.unpack_bits(packed, bits, count)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, values)


def test_int4_is_two_per_byte_low_nibble_first():
    packed = bitpack.pack_bits(np.array([1, 2, 3, 15, 0]), 4)
    np.testing.assert_array_equal(packed, [0x21, 0xF3, 0x00])


def test_bits8_is_the_bytes_and_multidim_input_is_flattened():
    values = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(bitpack.pack_bits(values, 8), values.reshape(-1))
    np.testing.assert_array_equal(
        bitpack.unpack_bits(bitpack.pack_bits(values % 8, 3), 3, 12), values.reshape(-1) % 8
    )


@pytest.mark.parametrize("bits", range(1, 17))
def test_twos_complement_round_trip(bits):
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    values = np.arange(low, high, max(1, (high - low) // 500))
    codes = bitpack.to_unsigned(values, bits)
    assert codes.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert codes.max() < 2**bits
    np.testing.assert_array_equal(codes, np.where(values < 0, values + 2**bits, values))
    back = bitpack.to_signed(codes, bits)
    assert back.dtype == (np.int8 if bits <= 8 else np.int16)
    np.testing.assert_array_equal(back, values)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits_value(bits):
    with pytest.raises(
        ValueError, match=rf"pack_bits: bits must be an integer in \[1, 8\], got bits={bits}"
    ):
        bitpack.pack_bits(np.zeros(3, np.uint8), bits)
    with pytest.raises(ValueError, match="unpack_bits: bits must be"):
        bitpack.unpack_bits(np.zeros(3, np.uint8), bits, 3)


@pytest.mark.parametrize("bits", [True, 2.0, "4"])
def test_bad_bits_type(bits):
    with pytest.raises(TypeError, match="pack_bits: bits must be an integer"):
        bitpack.pack_bits(np.zeros(3, np.uint8), bits)


def test_pack_rejects_out_of_range_and_non_integer_values():
    with pytest.raises(
        ValueError, match=r"values must lie in \[0, 16\) for bits=4, got range \[0, 16\]"
    ):
        bitpack.pack_bits(np.array([0, 16]), 4)
    with pytest.raises(ValueError, match=r"got range \[-1, 3\]"):
        bitpack.pack_bits(np.array([-1, 3]), 4)
    with pytest.raises(TypeError, match="values must be an integer array, got dtype float32"):
        bitpack.pack_bits(np.zeros(3, np.float32), 4)


def test_unpack_rejects_truncated_or_padded_input():
    packed = bitpack.pack_bits(np.arange(9) % 8, 3)  # 27 bits -> 4 bytes
    with pytest.raises(
        ValueError, match=r"9 codes of 3 bits need a 1-D array of 4 bytes, got shape \(3,\)"
    ):
        bitpack.unpack_bits(packed[:3], 3, 9)
    with pytest.raises(ValueError, match="got shape \\(5,\\)"):
        bitpack.unpack_bits(np.concatenate([packed, [0]]).astype(np.uint8), 3, 9)
    with pytest.raises(TypeError, match="packed must be a uint8 array, got dtype int8"):
        bitpack.unpack_bits(packed.astype(np.int8), 3, 9)
    with pytest.raises(ValueError, match="count must be an integer >= 0, got count=-1"):
        bitpack.unpack_bits(packed, 3, -1)
    with pytest.raises(TypeError, match="count must be an integer >= 0, got count=2.5"):
        bitpack.unpack_bits(packed, 3, 2.5)


def test_signed_conversions_reject_values_that_do_not_fit():
    with pytest.raises(
        ValueError,
        match=r"to_unsigned: values must lie in \[-8, 8\) for bits=4, got range \[-9, 0\]",
    ):
        bitpack.to_unsigned(np.array([-9, 0]), 4)
    with pytest.raises(ValueError, match=r"to_signed: codes must lie in \[0, 16\) for bits=4"):
        bitpack.to_signed(np.array([16]), 4)
    with pytest.raises(TypeError, match="to_signed: codes must be an integer array"):
        bitpack.to_signed(np.array([1.0]), 4)
    with pytest.raises(TypeError, match="to_unsigned: values must be an integer array"):
        bitpack.to_unsigned(np.array([1.0]), 4)
    with pytest.raises(
        ValueError, match=r"to_unsigned: bits must be an integer in \[1, 16\], got bits=17"
    ):
        bitpack.to_unsigned(np.array([1]), 17)
