"""Argument validation shared by every mixjax factory: one rule, one message per kind of argument.

Each check takes the public function's name (``fn_name``, e.g. ``"mixjax.prune.magnitude"``)
and the argument's name, and raises with a message that names both, what was expected and what
was received: ``mixjax.prune.magnitude: update_every must be an integer >= 1, got
update_every=0``. The conventions, held everywhere:

* integers are Python or NumPy integers, never ``bool``; a wrong type is a ``TypeError``, a
  value out of range a ``ValueError``;
* reals are Python or NumPy numbers (integers included, ``bool`` not) and must be finite;
* keys are ``jax.random.key(...)`` scalars or raw ``uint32`` keys of the default
  implementation's shape (``jax.random.PRNGKey(...)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "boolean",
    "callable_or_none",
    "choice",
    "instance",
    "integer",
    "is_integer",
    "key",
    "optax_transform",
    "real",
]


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (``bool`` excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def _inside(v: float, low, high, low_open: bool, high_open: bool) -> bool:
    ok_low = low is None or (v > low if low_open else v >= low)
    ok_high = high is None or (v < high if high_open else v <= high)
    return ok_low and ok_high


def integer(
    fn_name: str,
    name: str,
    value: Any,
    low: int | None = None,
    high: int | None = None,
    *,
    optional: bool = False,
    shown: str | None = None,
) -> int | None:
    """``value`` as a Python ``int`` in ``[low, high]`` (either end may be ``None``: unbounded).

    Args:
      fn_name: the public function, for the message.
      name: the argument's name.
      value: what was passed.
      low: the smallest value allowed, or ``None``.
      high: the largest value allowed, or ``None``.
      optional: ``None`` is allowed (and returned).
      shown: how the message shows the value (``got shown=value``); default ``name``, for
        names that describe where the value sits (``"tau at leaf 'b'"``, shown as ``tau``).

    Raises:
      TypeError: ``value`` is not an integer (``bool`` and floats included).
      ValueError: ``value`` is outside the range.
    """
    if optional and value is None:
        return None
    rule = (
        "an integer"
        if low is None and high is None
        else (f"an integer {_interval(low, high, False, False)}")
    )
    if optional:
        rule = f"None or {rule}"
    shown = name if shown is None else shown
    if not is_integer(value):
        raise TypeError(
            f"{fn_name}: {name} must be {rule}, got {shown}={value!r} ({type(value).__name__})"
        )
    if not _inside(int(value), low, high, False, False):
        raise ValueError(f"{fn_name}: {name} must be {rule}, got {shown}={value!r}")
    return int(value)


def real(
    fn_name: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite Python ``float`` in the interval from ``low`` to ``high``.

    Raises:
      TypeError: ``value`` is not a real number (``bool`` excluded).
      ValueError: ``value`` is not finite or outside the interval.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{fn_name}: {name} must be a number, got {name}={value!r}")
    v = float(value)
    if not (np.isfinite(v) and _inside(v, low, high, low_open, high_open)):
        rule = (
            "finite" if low is None and high is None else _interval(low, high, low_open, high_open)
        )
        raise ValueError(f"{fn_name}: {name} must be {rule}, got {name}={value!r}")
    return v


def boolean(fn_name: str, name: str, value: Any) -> bool:
    """``value``, checked to be a Python ``bool``.

    Raises:
      TypeError: anything else (``0``/``1`` included).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{fn_name}: {name} must be a bool, got {name}={value!r}")
    return value


def choice(fn_name: str, name: str, value: Any, options: tuple[Any, ...]) -> Any:
    """``value``, checked to be one of ``options``.

    Raises:
      ValueError: it is not.
    """
    if value not in options:
        raise ValueError(f"{fn_name}: {name} must be one of {options}, got {name}={value!r}")
    return value


@functools.cache
def _raw_key_shape() -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def key(fn_name: str, name: str, value: Any) -> Any:
    """``value``, checked to be a ``jax.random`` key: a typed key scalar or a raw ``uint32`` key.

    Raises:
      TypeError: anything else (a key array of several keys included).
    """
    typed = isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key)
    raw = (
        isinstance(value, (jax.Array, np.ndarray))
        and value.dtype == np.uint32
        and tuple(value.shape) == _raw_key_shape()
    )
    if not ((typed and value.ndim == 0) or raw):
        found = (
            f"{value.dtype} {tuple(value.shape)}"
            if hasattr(value, "dtype") and hasattr(value, "shape")
            else f"{name}={value!r}"
        )
        raise TypeError(
            f"{fn_name}: {name} must be a jax.random.key(...) scalar or a raw uint32 "
            f"{_raw_key_shape()} key, got {found}"
        )
    return value


def optax_transform(fn_name: str, name: str, value: Any) -> Any:
    """``value``, checked to be an optax ``GradientTransformation`` (``init`` and ``update``).

    Raises:
      TypeError: it is not.
    """
    if not (hasattr(value, "init") and hasattr(value, "update")):
        raise TypeError(
            f"{fn_name}: {name} must be an optax GradientTransformation, got {type(value).__name__}"
        )
    return value


def instance(
    fn_name: str, name: str, value: Any, cls: type | tuple[type, ...], expected: str
) -> Any:
    """``value``, checked to be an instance of ``cls``; ``expected`` says what in the message.

    Raises:
      TypeError: it is not.
    """
    if not isinstance(value, cls):
        raise TypeError(f"{fn_name}: {name} must be {expected}, got {type(value).__name__}")
    return value


def callable_or_none(fn_name: str, name: str, value: Any, *, optional: bool = True) -> Callable:
    """``value``, checked to be callable (or ``None`` when ``optional``).

    Raises:
      TypeError: it is not.
    """
    if (value is None and optional) or callable(value):
        return value
    expected = "callable or None" if optional else "callable"
    raise TypeError(f"{fn_name}: {name} must be {expected}, got {type(value).__name__}")
