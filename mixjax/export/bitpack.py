"""Bit packing: ``count`` codes of ``bits`` bits (1 to 8) in ``ceil(count * bits / 8)`` bytes.

Layout (little-endian bit stream): bit ``j`` (least significant first) of code ``i`` is bit
``i * bits + j`` of the stream, and stream bit ``k`` is bit ``k % 8`` (least significant first) of
byte ``k // 8``. For ``bits=4`` this is two codes per byte, code ``2i`` in the low nibble of byte
``i``; for ``bits=8`` the bytes are the codes. The last byte is padded with zero bits.

Signed integers are stored as ``bits``-bit two's complement codes: :func:`to_unsigned` and
:func:`to_signed` convert between the two.

All functions are NumPy (host-side: export and load), vectorized, and validate their inputs.
"""

from __future__ import annotations

import numpy as np

from mixjax import _checks

__all__ = ["MAX_BITS", "pack_bits", "packed_size", "to_signed", "to_unsigned", "unpack_bits"]

MAX_BITS = 8


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ``ceil(count * bits / 8)``."""
    return -(-int(count) * int(bits) // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs codes ``0 <= v < 2**bits`` into a uint8 byte array (layout in the module docstring).

    Args:
      values: integer array of any shape (flattened in C order) with every entry in
        ``[0, 2**bits)``.
      bits: bits per code, 1 to 8.

    Returns:
      uint8 array of shape ``(ceil(values.size * bits / 8),)``.

    Raises:
      TypeError: ``values`` is not an integer array, or ``bits`` not an integer.
      ValueError: ``bits`` outside ``[1, 8]`` or a value outside ``[0, 2**bits)``.
    """
    name = "mixjax.export.bitpack.pack_bits"
    bits = _checks.integer(name, "bits", bits, 1, MAX_BITS)
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name}: values must be an integer array, got dtype {values.dtype}")
    flat = values.reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(
            f"{name}: values must lie in [0, {2**bits}) for bits={bits}, "
            f"got range [{flat.min()}, {flat.max()}]"
        )
    codes = flat.astype(np.uint8)
    if bits == 8:
        return codes.copy()
    bit_matrix = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes of a packed byte array.

    Args:
      packed: 1-D uint8 array of exactly ``ceil(count * bits / 8)`` bytes.
      bits: bits per code, 1 to 8.
      count: number of codes, ``>= 0``.

    Returns:
      uint8 array of shape ``(count,)`` with entries in ``[0, 2**bits)``.

    Raises:
      TypeError: ``packed`` is not a uint8 array.
      ValueError: bad ``bits`` or ``count``, or ``packed`` has the wrong size (truncated or
        padded data).
    """
    name = "mixjax.export.bitpack.unpack_bits"
    bits = _checks.integer(name, "bits", bits, 1, MAX_BITS)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"{name}: packed must be a uint8 array, got dtype {packed.dtype}")
    count = _checks.integer(name, "count", count, 0)
    expected = packed_size(count, bits)
    if packed.ndim != 1 or packed.size != expected:
        raise ValueError(
            f"{name}: {count} codes of {bits} bits need a 1-D array of {expected} bytes, "
            f"got shape {packed.shape}"
        )
    if bits == 8:
        return packed.copy()
    stream = np.unpackbits(packed, count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream.reshape(count, bits) * weights).sum(axis=1, dtype=np.uint8)


def to_unsigned(values: np.ndarray, bits: int) -> np.ndarray:
    """Signed integers in ``[-2**(bits-1), 2**(bits-1))`` to ``bits``-bit two's complement codes.

    Args:
      values: integer array.
      bits: code width, 1 to 16.

    Returns:
      uint8 array (``bits <= 8``) or uint16 array (``bits > 8``) of ``values``' shape.

    Raises:
      ValueError: a value does not fit ``bits`` signed bits.
    """
    name = "mixjax.export.bitpack.to_unsigned"
    bits = _checks.integer(name, "bits", bits, 1, 16)
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"{name}: values must be an integer array, got dtype {values.dtype}")
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    if values.size and (values.min() < low or values.max() >= high):
        raise ValueError(
            f"{name}: values must lie in [{low}, {high}) for bits={bits}, "
            f"got range [{values.min()}, {values.max()}]"
        )
    dtype = np.uint8 if bits <= 8 else np.uint16
    return (values.astype(np.int32) & (2**bits - 1)).astype(dtype)


def to_signed(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`to_unsigned`: sign-extends ``bits``-bit codes.

    Returns:
      int8 array (``bits <= 8``) or int16 array (``bits > 8``) of ``codes``' shape.

    Raises:
      ValueError: a code outside ``[0, 2**bits)``.
    """
    name = "mixjax.export.bitpack.to_signed"
    bits = _checks.integer(name, "bits", bits, 1, 16)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"{name}: codes must be an integer array, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(
            f"{name}: codes must lie in [0, {2**bits}) for bits={bits}, "
            f"got range [{codes.min()}, {codes.max()}]"
        )
    sign = 2 ** (bits - 1)
    dtype = np.int8 if bits <= 8 else np.int16
    return ((codes.astype(np.int32) ^ sign) - sign).astype(dtype)
