"""What the host-side encoders of index arrays share: the :class:`Encoding` they return and the
validation every decoder applies to what it reads.

An :class:`Encoding` is ``meta``, a small JSON-able dict (ints, strings, lists; its
``"codec"`` names the encoder), and ``arrays``, named NumPy arrays; so an artifact stores it
without pickle. Every decoder takes ``(meta, arrays)`` (``decode(*encoding)`` works), validates
what it reads and raises ``ValueError`` naming itself on corrupt data (:func:`corrupt`). The
encoders are :mod:`mixjax.export.huffman` and :mod:`mixjax.export.positions`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "MAX_ELEMENTS",
    "MAX_RANK",
    "Encoding",
    "array_field",
    "check_codec",
    "corrupt",
    "meta_int",
    "meta_shape",
    "nbytes",
    "shape_size",
    "short_repr",
]

# The most elements a decoded leaf or a stored array may declare (2**40: 4 TiB of float32, far
# beyond any model, so this only stops absurd or overflowing shapes; what a file may really
# decode to is bounded by its bytes, checked by each decoder).
MAX_ELEMENTS = 1 << 40
# The most axes a shape may have (NumPy 1.x's limit).
MAX_RANK = 32


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


def shape_size(shape: Any) -> int:
    """The number of elements of ``shape``, a list or tuple of Python integers ``>= 0``.

    Counted with Python integers (no int64 overflow) and capped: at most :data:`MAX_RANK` axes
    and :data:`MAX_ELEMENTS` elements, so no declared shape can ask for an absurd allocation.

    Raises:
      ValueError: not such a sequence (``bool`` is no integer), or over those limits; the
        message says which (``expected a list of integers >= 0`` / ``... elements, more than``).
    """
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError("expected a list of integers >= 0")
    if len(shape) > MAX_RANK:
        raise ValueError(f"{len(shape)} axes, more than {MAX_RANK}")
    if any(n > MAX_ELEMENTS for n in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"more than {MAX_ELEMENTS} (2**40) elements")
    return math.prod(shape)


def meta_shape(fn_name: str, meta: Any) -> tuple[int, ...]:
    """``meta["shape"]``, checked to be a list of integers ``>= 0`` (:func:`shape_size`)."""
    shape = meta.get("shape") if hasattr(meta, "get") else None
    if not isinstance(shape, list):
        raise corrupt(fn_name, f"meta['shape']={shape!r}, expected a list of integers >= 0")
    try:
        shape_size(shape)
    except ValueError as err:
        raise corrupt(fn_name, f"meta['shape']={short_repr(shape)}, {err}") from None
    return tuple(shape)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters (a hostile field can be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def check_codec(fn_name: str, meta: Any, codec: str) -> None:
    """Raises unless ``meta["codec"] == codec``."""
    found = meta.get("codec") if hasattr(meta, "get") else None
    if found != codec:
        raise corrupt(fn_name, f"meta['codec']={found!r}, expected {codec!r}")
