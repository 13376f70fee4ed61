"""Sparse positions: where the entries of an array that differ from a ``zero`` value are.

:func:`bitmask_encode` stores one bit per position; :func:`relative_encode` is Deep
Compression's (Han et al. 2016): each entry stores its distance to the previous entry in
``gap_bits`` bits, and a longer jump is bridged by *filler* entries whose value is ``zero``;
:func:`sparse_encode` keeps whichever is smaller. Host NumPy; returns and reads an
:class:`~mixjax.export.encoding.Encoding`.

The end of the array counts as one more (unstored) entry: a trailing run of ``zero`` longer
than ``2**gap_bits`` is bridged by fillers too, so the last entry (position ``-1`` when there is
none) lies within ``2**gap_bits`` of the end. :func:`sparse_decode` enforces that rule, so an
array of ``size`` entries needs ``num_entries >= size / 2**gap_bits - 1``: what decodes is a
bounded multiple of the bits stored, and a hostile ``"shape"`` is refused before any allocation
(a bitmask needs exactly one bit per entry).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixjax import _checks
from mixjax.export import bitpack, encoding
from mixjax.export.encoding import Encoding

__all__ = ["GAP_BITS", "bitmask_encode", "relative_encode", "sparse_decode", "sparse_encode"]

GAP_BITS = (4, 8)


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
      1-bit, :mod:`mixjax.export.bitpack` layout, C order), "values": the entries that differ from
      zero, in C order, values' dtype}``.
    """
    flat = _flat_values("mixjax.export.positions.bitmask_encode", values)
    keep = flat != np.asarray(zero, flat.dtype)
    meta = {
        "codec": "bitmask",
        "shape": [int(n) for n in np.shape(values)],
        "zero": _zero_meta(flat, zero),
    }
    return Encoding(
        meta, {"mask": bitpack.pack_bits(keep.astype(np.uint8), 1), "values": flat[keep]}
    )


def relative_encode(values: np.ndarray, *, gap_bits: int = 4, zero: Any = 0) -> Encoding:
    """Deep Compression's relative indices: ``gap_bits``-bit distances between stored entries.

    Entry ``j`` at flat position ``p_j`` stores code ``p_j - p_{j-1} - 1`` (``p_{-1} = -1``),
    so a code covers a distance of 1 to ``2**gap_bits``. A longer distance is bridged by filler
    entries, each ``2**gap_bits`` past the previous entry, holding ``zero``; so is the distance
    from the last entry to the end (position ``size``, not stored), so that
    ``size - p_last <= 2**gap_bits``.

    Returns:
      ``meta = {"codec": "relative", "shape", "zero", "gap_bits", "num_entries"}``; ``arrays =
      {"gaps": uint8 (packed ``gap_bits``-bit codes), "values": entries, values' dtype}``.

    Raises:
      ValueError: ``gap_bits`` not in 1..8.
    """
    name = "mixjax.export.positions.relative_encode"
    gap_bits = _checks.integer(name, "gap_bits", gap_bits, 1, 8)
    flat = _flat_values(name, values)
    zero_value = np.asarray(zero, flat.dtype)
    positions = np.flatnonzero(flat != zero_value)
    # The end, at position `size`, is bridged like one more entry, but only its fillers are kept.
    distance = np.diff(np.append(positions, flat.size), prepend=-1)
    reach = 1 << gap_bits
    fillers = (distance - 1) // reach
    per_entry = fillers + 1
    per_entry[-1] -= 1
    total = int(per_entry.sum())
    last = (np.cumsum(per_entry) - 1)[:-1]
    gaps = np.full(total, reach - 1, np.uint8)
    gaps[last] = distance[:-1] - 1 - fillers[:-1] * reach
    entries = np.full(total, zero_value, flat.dtype)
    entries[last] = flat[positions]
    meta = {
        "codec": "relative",
        "shape": [int(n) for n in np.shape(values)],
        "zero": _zero_meta(flat, zero),
        "gap_bits": gap_bits,
        "num_entries": total,
    }
    return Encoding(meta, {"gaps": bitpack.pack_bits(gaps, gap_bits), "values": entries})


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
    name = "mixjax.export.positions.sparse_encode"
    flat = _flat_values(name, values)
    if value_bits is None:
        value_bits = flat.dtype.itemsize * 8
    value_bits = _checks.integer(name, "value_bits", value_bits, 1)
    candidates = [bitmask_encode(values, zero=zero)]
    candidates += [relative_encode(values, gap_bits=b, zero=zero) for b in gap_bits]

    def size(encoding):
        positions = encoding.arrays.get("mask", encoding.arrays.get("gaps"))
        return positions.nbytes + bitpack.packed_size(encoding.arrays["values"].size, value_bits)

    return min(candidates, key=size)


def sparse_decode(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Inverse of :func:`bitmask_encode`, :func:`relative_encode` and :func:`sparse_encode`.

    Every size is checked against the stored bytes before the array is allocated: a bitmask of
    exactly ``size`` bits; for relative positions, ``num_entries`` packed codes and
    ``size <= (num_entries + 1) * 2**gap_bits``, then the exact rule of the module docstring
    (the last entry within ``2**gap_bits`` of the end).

    Raises:
      ValueError: unknown codec, missing or malformed fields, sizes that do not match, a
        position past the end of the array, or a trailing run that no filler bridges.
    """
    name = "mixjax.export.positions.sparse_decode"
    codec = meta.get("codec") if hasattr(meta, "get") else None
    if codec not in ("bitmask", "relative"):
        raise encoding.corrupt(name, f"meta['codec']={codec!r}, expected 'bitmask' or 'relative'")
    shape = encoding.meta_shape(name, meta)
    size = encoding.shape_size(shape)
    entries = encoding.array_field(name, arrays, "values", None)
    if not (np.issubdtype(entries.dtype, np.number) or entries.dtype == bool):
        raise encoding.corrupt(name, f"values have dtype {entries.dtype}")
    zero = meta.get("zero")
    try:
        if isinstance(zero, (list, dict, str)) or zero is None:
            raise TypeError
        zero = np.asarray(zero, entries.dtype)
    except (TypeError, ValueError, OverflowError):
        raise encoding.corrupt(
            name, f"meta['zero']={encoding.short_repr(zero)} is not a number of the values' dtype"
        ) from None
    if codec == "bitmask":
        mask = encoding.array_field(name, arrays, "mask", np.uint8)
        try:
            keep = bitpack.unpack_bits(mask, 1, size)
        except ValueError as err:
            raise encoding.corrupt(name, f"mask: {err}") from None
        keep = keep.astype(bool)
        if int(keep.sum()) != entries.size:
            raise encoding.corrupt(
                name, f"mask marks {int(keep.sum())} entries, {entries.size} stored"
            )
        dense = np.full(size, zero, entries.dtype)
        dense[keep] = entries
        return dense.reshape(shape)
    gap_bits = encoding.meta_int(name, meta, "gap_bits", low=1)
    count = encoding.meta_int(name, meta, "num_entries")
    if gap_bits > 8 or entries.size != count:
        raise encoding.corrupt(
            name, f"gap_bits={gap_bits}, {entries.size} values for {count} entries"
        )
    reach = 1 << gap_bits
    if size > (count + 1) * reach:
        raise encoding.corrupt(
            name, f"{count} entries of {gap_bits}-bit gaps cannot reach the {size} entries"
        )
    packed = encoding.array_field(name, arrays, "gaps", np.uint8)
    try:
        gaps = bitpack.unpack_bits(packed, gap_bits, count)
    except ValueError as err:
        raise encoding.corrupt(name, f"gaps: {err}") from None
    positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    last = int(positions[-1]) if count else -1
    if last >= size:
        raise encoding.corrupt(name, f"entry at position {last} past the {size} entries")
    if size - last > reach:
        raise encoding.corrupt(
            name,
            f"the last entry, at position {last}, is {size - last} from the end ({size}); "
            f"fillers must bridge runs longer than {reach}",
        )
    dense = np.full(size, zero, entries.dtype)
    dense[positions] = entries
    return dense.reshape(shape)
