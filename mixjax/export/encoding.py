"""What the host-side encoders of index arrays share: the :class:`Encoding` they return and the
validation every decoder applies to what it reads.

An :class:`Encoding` is ``meta``, a small JSON-able dict (ints, strings, lists; its
``"codec"`` names the encoder), and ``arrays``, named NumPy arrays; so an artifact stores it
without pickle. Every decoder takes ``(meta, arrays)`` (``decode(*encoding)`` works), validates
what it reads and raises ``ValueError`` naming itself on corrupt data (:func:`corrupt`). The
encoders are :mod:`mixjax.export.huffman` and :mod:`mixjax.export.positions`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Encoding",
    "array_field",
    "check_codec",
    "corrupt",
    "meta_int",
    "meta_shape",
    "nbytes",
]


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


def corrupt(fn_name: str, what: str) -> ValueError:
    """The error a decoder raises on corrupt data: ``fn_name: corrupt encoding: what``."""
    return ValueError(f"{fn_name}: corrupt encoding: {what}")


def array_field(fn_name: str, arrays: Any, key: str, dtype: Any) -> np.ndarray:
    """``arrays[key]``, checked to exist, to be 1-D and (unless ``dtype`` is None) of ``dtype``."""
    if not hasattr(arrays, "get") or key not in arrays:
        raise corrupt(fn_name, f"missing array {key!r}")
    array = np.asarray(arrays[key])
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise corrupt(fn_name, f"array {key!r} has dtype {array.dtype}, expected {np.dtype(dtype)}")
    if array.ndim != 1:
        raise corrupt(fn_name, f"array {key!r} has shape {array.shape}, expected 1-D")
    return array


def meta_int(fn_name: str, meta: Any, key: str, low: int = 0) -> int:
    """``meta[key]``, checked to be an integer ``>= low``."""
    value = meta.get(key) if hasattr(meta, "get") else None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise corrupt(fn_name, f"meta[{key!r}]={value!r}, expected an integer >= {low}")
    return value


def meta_shape(fn_name: str, meta: Any) -> tuple[int, ...]:
    """``meta["shape"]``, checked to be a list of integers ``>= 0``."""
    shape = meta.get("shape") if hasattr(meta, "get") else None
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise corrupt(fn_name, f"meta['shape']={shape!r}, expected a list of integers >= 0")
    return tuple(shape)


def check_codec(fn_name: str, meta: Any, codec: str) -> None:
    """Raises unless ``meta["codec"] == codec``."""
    found = meta.get("codec") if hasattr(meta, "get") else None
    if found != codec:
        raise corrupt(fn_name, f"meta['codec']={found!r}, expected {codec!r}")
