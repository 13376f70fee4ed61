"""What every augmentation op shares: the op types, argument checks and dtype conventions.

Images are batches in NHWC layout, ``uint8`` (0..255) or floating point (expected in ``[0, 1]``
by the colour ops). Intensities that users pass (brightness deltas, fill values) are always in
``[0, 1]`` units; for ``uint8`` images they are scaled by 255 and rounded. Every op returns
images of its input's dtype.

An op is one of three frozen dataclasses, all callable (dataclasses rather than NamedTuples
because ``jax.jit(op)`` needs a weak reference to ``op``, which NamedTuples do not allow):

* :class:`ImageOp`: ``op(key, images) -> images`` (colour ops, cutout);
* :class:`~mixjax.augment_warp.GeometricOp`: ``op(key, images) -> images``, and it also exposes
  the per-example coordinate map it samples so :func:`~mixjax.augment_chain.chain` can fuse
  neighbouring geometric ops into one resample;
* :class:`LabelOp`: ``op(key, images, labels) -> (images, labels)`` (mixup, cutmix, label
  smoothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks

__all__ = [
    "Array",
    "ImageOp",
    "LabelOp",
    "MODES",
    "as_distribution",
    "check_images",
    "check_interval",
    "check_labels",
    "check_mode",
    "check_size",
    "expand",
    "fill_value",
    "from_float",
    "materialize",
    "per_example",
    "to_float",
]

Array = jax.Array
MODES = ("constant", "edge", "reflect")


def check_images(fn_name: str, images: Any, *, channels: int | None = None) -> None:
    """Raises unless ``images`` is a 4-D NHWC batch of ``uint8`` or floating dtype.

    Args:
      fn_name: the public function, for messages.
      images: the argument to check.
      channels: the number of channels the op needs (3 for RGB-only ops), or ``None``.

    Raises:
      TypeError: ``images`` has no shape/dtype, or its dtype is neither ``uint8`` nor floating.
      ValueError: ``images`` is not 4-D, or has the wrong number of channels.
    """
    if not (hasattr(images, "shape") and hasattr(images, "dtype")):
        raise TypeError(
            f"{fn_name}: images must be an array of shape (N, H, W, C), got {type(images).__name__}"
        )
    if len(images.shape) != 4:
        raise ValueError(
            f"{fn_name}: images must be a 4-D NHWC batch (N, H, W, C), "
            f"got shape {tuple(images.shape)}"
        )
    dtype = np.dtype(images.dtype)
    if dtype != np.uint8 and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{fn_name}: images must be uint8 or floating point, got dtype {dtype}")
    if channels is not None and images.shape[-1] != channels:
        raise ValueError(
            f"{fn_name}: images must have {channels} channels (RGB, last axis), "
            f"got shape {tuple(images.shape)}"
        )


def check_interval(
    fn_name: str, arg: str, value: Any, low: float, high: float, *, low_open: bool = False
) -> tuple[float, float]:
    """A pair ``(lo, hi)`` with ``low <= lo <= hi <= high`` (``low < lo`` when ``low_open``)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{fn_name}: {arg} must be a pair (low, high), got {arg}={value!r}")
    lo = _checks.real(fn_name, f"{arg}[0]", value[0], low, high, low_open=low_open)
    hi = _checks.real(fn_name, f"{arg}[1]", value[1], low, high, low_open=low_open)
    if lo > hi:
        raise ValueError(f"{fn_name}: {arg} must satisfy low <= high, got {arg}={value!r}")
    return lo, hi


def check_size(fn_name: str, arg: str, value: Any) -> tuple[int, int]:
    """An int or a pair of ints, all ``>= 1``, as ``(height, width)``."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2 or not all(_checks.is_integer(v) and v >= 1 for v in pair):
        raise ValueError(
            f"{fn_name}: {arg} must be a positive int or a pair (height, width) of positive ints, "
            f"got {arg}={value!r}"
        )
    return int(pair[0]), int(pair[1])


def check_mode(fn_name: str, mode: Any) -> str:
    """One of :data:`MODES`, or ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"{fn_name}: mode must be one of {MODES}, got mode={mode!r}")
    return mode


def per_example(fn_name: str, arg: str, value: Any, n: int, trailing: tuple = ()) -> Array:
    """A deterministic op's parameter as an array of shape ``(n, *trailing)``.

    A value of shape ``trailing`` (one for the whole batch) is broadcast to every example.

    Raises:
      ValueError: the shape is neither ``trailing`` nor ``(n, *trailing)``.
    """
    value = jnp.asarray(value)
    if value.shape == trailing:
        return jnp.broadcast_to(value, (n, *trailing))
    if value.shape != (n, *trailing):
        raise ValueError(
            f"{fn_name}: {arg} must have shape {(n, *trailing)} (one per example) or "
            f"{trailing}, got shape {tuple(value.shape)}"
        )
    return value


def to_float(images: Array) -> Array:
    """``images`` as float32 in ``[0, 1]`` units (``uint8`` is divided by 255)."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images


def from_float(values: Array, dtype: Any) -> Array:
    """Inverse of :func:`to_float`: clips to ``[0, 1]``; ``uint8`` is rounded half to even."""
    values = jnp.clip(values, 0.0, 1.0)
    if dtype == jnp.uint8:
        return jnp.round(values * 255.0).astype(jnp.uint8)
    return values.astype(dtype)


def fill_value(fill: float, dtype: Any) -> Array:
    """``fill`` (``[0, 1]`` units) as a scalar of ``dtype`` (``uint8``: ``round(255 * fill)``)."""
    if dtype == jnp.uint8:
        return jnp.asarray(round(255 * fill), jnp.uint8)
    return jnp.asarray(fill, dtype)


def materialize(images: Array) -> Array:
    """``images``, computed into a buffer of their own before the ops that read them run.

    Mixup and cutmix read every example twice (as itself and as its neighbour's partner).
    Without this, XLA fuses the ops that produced the batch (a crop's gather, colour arithmetic,
    the per-example random draws) into the blend and evaluates them twice per pixel: on XLA:CPU
    flip + pad-crop + brightness + mixup cost 1.36x a plain LeNet-300-100 step, and 1.06x with
    this (``benchmarks/step.py``). ``lax.optimization_barrier`` does not stop fusion there (XLA
    expands barriers before fusing), but the operand of a conditional is always materialized.
    So this is a ``lax.cond`` whose branches both return ``images`` (one as a copy, or XLA
    removes a conditional of two identical branches), on a predicate the compiler cannot fold:
    the result never depends on which branch runs.
    """
    first = images.reshape(-1)[:1].astype(jnp.float32)
    return jax.lax.cond(jnp.all(first == first), lambda x: x, jnp.copy, images)


def expand(values: Array) -> Array:
    """Per-example values ``(N,)`` shaped ``(N, 1, 1, 1)`` to broadcast against NHWC images."""
    return values[:, None, None, None]


def check_labels(fn_name: str, labels: Any, n: int | None) -> None:
    """Raises unless ``labels`` are integer ids ``(n,)`` or a float distribution ``(n, C)``.

    ``n=None`` accepts any batch size.

    Values are checked too (ids ``>= 0``; distributions non-negative, rows summing to 1 within
    ``1e-3``) when the labels are concrete, i.e. outside ``jit``.

    Raises:
      TypeError: integer labels that are not 1-D, or float labels that are not 2-D.
      ValueError: wrong rank, a batch size other than ``n``, or bad values.
    """
    shape = tuple(getattr(labels, "shape", ()))
    dtype = np.dtype(getattr(labels, "dtype", np.float64))
    form = "integer class ids (N,) or a float distribution (N, C)"
    if len(shape) not in (1, 2):
        raise ValueError(f"{fn_name}: labels must be {form}, got shape {shape}")
    is_int = jnp.issubdtype(dtype, jnp.integer)
    if len(shape) == 1 and not is_int:
        raise TypeError(
            f"{fn_name}: labels of shape {shape} must be integer class ids, got {dtype}"
        )
    if len(shape) == 2 and not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fn_name}: labels of shape {shape} must be a float distribution, got {dtype}"
        )
    if n is not None and shape[0] != n:
        raise ValueError(f"{fn_name}: labels must have the batch size {n}, got shape {shape}")
    if isinstance(labels, jax.core.Tracer):
        return
    values = np.asarray(labels)
    if values.size and values.min() < 0:
        raise ValueError(f"{fn_name}: labels must be non-negative, got min={values.min()}")
    if not is_int and values.size:
        sums = values.sum(axis=1)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > 1e-3:
            raise ValueError(
                f"{fn_name}: distribution labels must sum to 1 per example, got "
                f"sum={sums[worst]:.6g} at example {worst}"
            )


def as_distribution(fn_name: str, labels: Any, n: int | None, num_classes: int | None) -> Array:
    """Checked ``labels`` as a float distribution ``(n, C)`` (integer ids are one-hot encoded).

    Raises:
      ValueError: as :func:`check_labels`; integer labels without ``num_classes``, ids
        ``>= num_classes`` (when concrete), or a distribution with another number of classes.
    """
    check_labels(fn_name, labels, n)
    labels = jnp.asarray(labels)
    if labels.ndim == 2:
        if num_classes is not None and labels.shape[1] != num_classes:
            raise ValueError(
                f"{fn_name}: labels must have num_classes={num_classes} columns, "
                f"got shape {tuple(labels.shape)}"
            )
        return labels
    if num_classes is None:
        raise ValueError(
            f"{fn_name}: integer labels {tuple(labels.shape)} need num_classes=, "
            "got num_classes=None"
        )
    if not isinstance(labels, jax.core.Tracer) and labels.size and int(labels.max()) >= num_classes:
        raise ValueError(
            f"{fn_name}: class ids must be < num_classes={num_classes}, got max={int(labels.max())}"
        )
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class ImageOp:
    """A random op on images: ``op(key, images) -> images``.

    Attributes:
      name: the public factory's name, for messages.
      fn: ``(key, images) -> images`` on a checked NHWC batch.
      channels: the number of channels the op needs, or ``None`` for any.
    """

    name: str
    fn: Callable[[Array, Array], Array]
    channels: int | None = None

    def __call__(self, key: Array, images: Array) -> Array:
        check_images(self.name, images, channels=self.channels)
        return self.fn(key, images)


@dataclasses.dataclass(frozen=True)
class LabelOp:
    """A random op on images and labels: ``op(key, images, labels) -> (images, labels)``.

    Attributes:
      name: the public factory's name, for messages.
      fn: ``(key, images, labels) -> (images, labels)`` on a checked NHWC batch and labels
        already made a float distribution ``(N, C)``.
      num_classes: the number of classes integer labels are one-hot encoded to, or ``None``
        (then labels must be a distribution ``(N, C)``).
    """

    name: str
    fn: Callable[[Array, Array, Array], tuple[Array, Array]]
    num_classes: int | None = None

    def __call__(self, key: Array, images: Array, labels: Array) -> tuple[Array, Array]:
        check_images(self.name, images)
        labels = as_distribution(self.name, labels, images.shape[0], self.num_classes)
        return self.fn(key, images, labels)
