"""Colour augmentation: brightness, contrast, saturation, hue, and the HSV conversions.

Deterministic ops take one parameter per example (``(N,)``) or one for the whole batch (``()``);
each ``random_*`` factory returns an :class:`~mixjax.augment_base.ImageOp` that draws them
independently per example. Float images are expected in ``[0, 1]`` and results are clipped to
``[0, 1]``; ``uint8`` images are processed as ``x / 255`` and rounded back (half to even) with
saturation at 0 and 255. Saturation and hue follow ``tf.image`` (HSV space), contrast is
per-channel around each image's mean (``tf.image.adjust_contrast``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mixjax import _checks
from mixjax.augment.base import (
    Array,
    ImageOp,
    check_images,
    expand,
    from_float,
    per_example,
    to_float,
)

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "hsv_to_rgb",
    "random_brightness",
    "random_contrast",
    "random_hue",
    "random_saturation",
    "rgb_to_hsv",
]

_NAME = "mixjax.augment."


def rgb_to_hsv(rgb: Array) -> Array:
    """RGB ``(..., 3)`` float in ``[0, 1]`` to HSV ``(..., 3)``, all in ``[0, 1]`` (``colorsys``).

    Hue is a fraction of the colour circle (red 0, green 1/3, blue 2/3); grey pixels get hue 0
    and saturation 0.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    spread = value - jnp.min(rgb, axis=-1)
    safe = jnp.where(spread > 0, spread, 1.0)
    saturation = jnp.where(value > 0, spread / jnp.where(value > 0, value, 1.0), 0.0)
    hue = jnp.where(
        r == value,
        (g - b) / safe,
        jnp.where(g == value, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = jnp.where(spread > 0, jnp.remainder(hue / 6.0, 1.0), 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: Array) -> Array:
    """Inverse of :func:`rgb_to_hsv`: HSV ``(..., 3)`` in ``[0, 1]`` to RGB ``(..., 3)``."""
    hue, saturation, value = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    # Branch-free form: channel n is v - v*s*clip(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    k = jnp.remainder(jnp.asarray([5.0, 3.0, 1.0], hsv.dtype) + 6.0 * hue, 6.0)
    return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_brightness(images: Array, delta: Any) -> Array:
    """Adds ``delta`` (in ``[0, 1]`` units) to every pixel.

    Float: ``clip(x + delta, 0, 1)``. ``uint8``: ``x + round(255 * delta)`` saturated to 0..255
    (exact integer arithmetic).

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      delta: ``()`` or ``(N,)``.

    Returns:
      ``(N, H, W, C)``, ``images``' dtype.
    """
    name = _NAME + "adjust_brightness"
    check_images(name, images)
    delta = expand(per_example(name, "delta", delta, images.shape[0]))
    if images.dtype == jnp.uint8:
        step = jnp.round(255.0 * delta).astype(jnp.int16)
        return jnp.clip(images.astype(jnp.int16) + step, 0, 255).astype(jnp.uint8)
    return jnp.clip(images + delta.astype(images.dtype), 0, 1)


def adjust_contrast(images: Array, factor: Any) -> Array:
    """Scales each channel's deviation from its mean over the image: ``(x - m) * factor + m``.

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      factor: ``()`` or ``(N,)``; 1 keeps the image, 0 makes it its per-channel mean.

    Returns:
      ``(N, H, W, C)``, ``images``' dtype.
    """
    name = _NAME + "adjust_contrast"
    check_images(name, images)
    factor = expand(per_example(name, "factor", factor, images.shape[0]))
    x = to_float(images)
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    return from_float((x - mean) * factor.astype(x.dtype) + mean, images.dtype)


def adjust_saturation(images: Array, factor: Any) -> Array:
    """Multiplies the HSV saturation by ``factor`` (clipped to ``[0, 1]``).

    Args:
      images: ``(N, H, W, 3)`` RGB, uint8 or float.
      factor: ``()`` or ``(N,)``; 0 gives grey, 1 keeps the image.

    Returns:
      ``(N, H, W, 3)``, ``images``' dtype.
    """
    name = _NAME + "adjust_saturation"
    check_images(name, images, channels=3)
    factor = per_example(name, "factor", factor, images.shape[0])
    hsv = rgb_to_hsv(to_float(images))
    saturation = jnp.clip(hsv[..., 1] * factor[:, None, None], 0.0, 1.0)
    return from_float(hsv_to_rgb(hsv.at[..., 1].set(saturation)), images.dtype)


def adjust_hue(images: Array, delta: Any) -> Array:
    """Rotates the HSV hue by ``delta`` (a fraction of the colour circle, wrapped mod 1).

    Args:
      images: ``(N, H, W, 3)`` RGB, uint8 or float.
      delta: ``()`` or ``(N,)``, e.g. in ``[-0.5, 0.5]``.

    Returns:
      ``(N, H, W, 3)``, ``images``' dtype.
    """
    name = _NAME + "adjust_hue"
    check_images(name, images, channels=3)
    delta = per_example(name, "delta", delta, images.shape[0])
    hsv = rgb_to_hsv(to_float(images))
    hue = jnp.remainder(hsv[..., 0] + delta[:, None, None], 1.0)
    return from_float(hsv_to_rgb(hsv.at[..., 0].set(hue)), images.dtype)


def _uniform(key: Array, n: int, low: float, high: float) -> Array:
    return jax.random.uniform(key, (n,), minval=low, maxval=high)


def _factor_range(name: str, lower: float, upper: float) -> tuple[float, float]:
    lo = _checks.real(name, "lower", lower, 0.0)
    hi = _checks.real(name, "upper", upper, 0.0)
    if lo > hi:
        raise ValueError(f"{name}: lower must be <= upper, got lower={lower!r}, upper={upper!r}")
    return lo, hi


def random_brightness(max_delta: float = 0.2) -> ImageOp:
    """:func:`adjust_brightness` with ``delta`` uniform in ``[-max_delta, max_delta]``.

    Raises:
      ValueError: ``max_delta`` outside ``[0, 1]``.
    """
    name = _NAME + "random_brightness"
    bound = _checks.real(name, "max_delta", max_delta, 0.0, 1.0)
    fn = lambda key, images: adjust_brightness(
        images, _uniform(key, images.shape[0], -bound, bound)
    )
    return ImageOp(name, fn)


def random_contrast(lower: float = 0.8, upper: float = 1.2) -> ImageOp:
    """:func:`adjust_contrast` with ``factor`` uniform in ``[lower, upper]``.

    Raises:
      ValueError: ``lower < 0`` or ``lower > upper``.
    """
    name = _NAME + "random_contrast"
    lo, hi = _factor_range(name, lower, upper)
    fn = lambda key, images: adjust_contrast(images, _uniform(key, images.shape[0], lo, hi))
    return ImageOp(name, fn)


def random_saturation(lower: float = 0.8, upper: float = 1.2) -> ImageOp:
    """:func:`adjust_saturation` with ``factor`` uniform in ``[lower, upper]``; RGB images only.

    Raises:
      ValueError: ``lower < 0`` or ``lower > upper``.
    """
    name = _NAME + "random_saturation"
    lo, hi = _factor_range(name, lower, upper)
    fn = lambda key, images: adjust_saturation(images, _uniform(key, images.shape[0], lo, hi))
    return ImageOp(name, fn, channels=3)


def random_hue(max_delta: float = 0.05) -> ImageOp:
    """:func:`adjust_hue` with ``delta`` uniform in ``[-max_delta, max_delta]``; RGB only.

    Raises:
      ValueError: ``max_delta`` outside ``[0, 0.5]``.
    """
    name = _NAME + "random_hue"
    bound = _checks.real(name, "max_delta", max_delta, 0.0, 0.5)
    fn = lambda key, images: adjust_hue(images, _uniform(key, images.shape[0], -bound, bound))
    return ImageOp(name, fn, channels=3)
