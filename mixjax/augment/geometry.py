"""Geometric augmentation: flips, crops, resized crops, rotation/translation.

Each ``random_*`` factory validates its options and returns a
:class:`~mixjax.augment_warp.GeometricOp` ``op(key, images) -> images`` that draws independent
parameters for every example of the NHWC batch and applies the public deterministic op with
them (``flip_horizontal``, ``crop``, ``resized_crop``, ``rotate``). Deterministic ops take one
parameter per example (leading axis ``N``) or one for the whole batch.

Coordinates are ``(row, col)`` with pixel centres at integers; see :mod:`mixjax.augment_warp`
for the out-of-frame ``mode`` values and the ``fill`` convention.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mixjax import _checks
from mixjax.augment.base import (
    Array,
    check_images,
    check_interval,
    check_mode,
    check_size,
    per_example,
)
from mixjax.augment.warp import GeometricOp, Warp, diagonal_matrices, resample

__all__ = [
    "crop",
    "flip_horizontal",
    "flip_vertical",
    "random_affine",
    "random_crop",
    "random_flip",
    "random_resized_crop",
    "resized_crop",
    "rotate",
]

_NAME = "mixjax.augment."


def _flip_warp(horizontal: Array, vertical: Array, size: tuple[int, int], mirrors: bool) -> Warp:
    h, w = size
    flips = jnp.stack([vertical, horizontal], axis=1)
    scale = jnp.where(flips, -1, 1)
    offset = jnp.where(flips, jnp.asarray([h - 1, w - 1]), 0)
    return Warp(diagonal_matrices(scale, offset), size, exact=True, mirrors=mirrors)


def flip_horizontal(images: Array, flip: Any) -> Array:
    """Mirrors the examples where ``flip`` is true left to right (reverses the W axis).

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      flip: bool, ``()`` or ``(N,)``.

    Returns:
      ``(N, H, W, C)``, ``images``' dtype; an exact copy of pixels.
    """
    name = _NAME + "flip_horizontal"
    check_images(name, images)
    n, h, w, _ = images.shape
    flip = per_example(name, "flip", flip, n).astype(bool)
    warp = _flip_warp(flip, jnp.zeros_like(flip), (h, w), mirrors=True)
    return resample(images, warp)


def flip_vertical(images: Array, flip: Any) -> Array:
    """Mirrors the examples where ``flip`` is true top to bottom (reverses the H axis).

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      flip: bool, ``()`` or ``(N,)``.

    Returns:
      ``(N, H, W, C)``, ``images``' dtype; an exact copy of pixels.
    """
    name = _NAME + "flip_vertical"
    check_images(name, images)
    n, h, w, _ = images.shape
    flip = per_example(name, "flip", flip, n).astype(bool)
    return resample(images, _flip_warp(jnp.zeros_like(flip), flip, (h, w), mirrors=False))


def random_flip(*, horizontal: float = 0.5, vertical: float = 0.0) -> GeometricOp:
    """Flips each example left-right with probability ``horizontal`` and up-down with ``vertical``.

    Raises:
      ValueError: a probability outside ``[0, 1]``.
    """
    name = _NAME + "random_flip"
    p_h = _checks.real(name, "horizontal", horizontal, 0.0, 1.0)
    p_v = _checks.real(name, "vertical", vertical, 0.0, 1.0)

    def sample(key, n, size):
        flips = jax.random.uniform(key, (n, 2)) < jnp.asarray([p_h, p_v])
        return _flip_warp(flips[:, 0], flips[:, 1], size, mirrors=p_h > 0)

    return GeometricOp(name, sample)


def _crop_warp(
    name: str,
    offsets: Array,
    frame: tuple[int, int],
    size: tuple[int, int],
    padding: int,
    mode: str,
    fill: float,
) -> Warp:
    padded = (frame[0] + 2 * padding, frame[1] + 2 * padding)
    if size[0] > padded[0] or size[1] > padded[1]:
        raise ValueError(
            f"{name}: crop size {size} is larger than the padded image {padded} "
            f"(image {frame} with padding={padding})"
        )
    high = jnp.asarray([padded[0] - size[0], padded[1] - size[1]])
    offsets = jnp.clip(offsets, 0, high) - padding
    return Warp(
        diagonal_matrices(jnp.ones_like(offsets), offsets),
        size,
        exact=True,
        reach=padding,
        mode=mode,
        fill=fill,
    )


def crop(
    images: Array,
    offsets: Any,
    size: int | tuple[int, int],
    *,
    padding: int = 0,
    mode: str = "constant",
    fill: float = 0.0,
) -> Array:
    """Crops a ``size`` window at ``offsets`` out of each image padded by ``padding`` pixels.

    The padding is never materialized: samples that fall in it are filled by ``mode``.

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      offsets: int ``(N, 2)`` or ``(2,)``: the window's top-left ``(row, col)`` in the padded
        image, clipped to ``[0, H + 2 * padding - size[0]]`` (and likewise for columns).
      size: ``(height, width)`` of the window, or an int for a square.
      padding: pixels added on each side before cropping.
      mode: ``"constant"``, ``"edge"`` or ``"reflect"``: what the padding holds.
      fill: the constant padding value in ``[0, 1]`` units.

    Returns:
      ``(N, *size, C)``, ``images``' dtype; an exact copy of pixels.

    Raises:
      ValueError: the window is larger than the padded image, or a bad option.
    """
    name = _NAME + "crop"
    check_images(name, images)
    size = check_size(name, "size", size)
    padding = _checks.integer(name, "padding", padding, 0)
    mode = check_mode(name, mode)
    fill = _checks.real(name, "fill", fill, 0.0, 1.0)
    n, h, w, _ = images.shape
    offsets = per_example(name, "offsets", offsets, n, (2,)).astype(jnp.int32)
    return resample(images, _crop_warp(name, offsets, (h, w), size, padding, mode, fill))


def random_crop(
    size: int | tuple[int, int] | None = None,
    *,
    padding: int = 4,
    mode: str = "constant",
    fill: float = 0.0,
) -> GeometricOp:
    """Pads each image by ``padding`` and crops a ``size`` window at a uniform random offset.

    The CIFAR recipe is ``random_crop(padding=4)``: a 32x32 crop of the image padded to 40x40.

    Args:
      size: ``(height, width)`` or an int; ``None`` keeps the input's size.
      padding: pixels added on each side.
      mode: ``"constant"``, ``"edge"`` or ``"reflect"``: what the padding holds.
      fill: the constant padding value in ``[0, 1]`` units.

    Raises:
      ValueError: a bad option here; when called, a window larger than the padded image.
    """
    name = _NAME + "random_crop"
    size = None if size is None else check_size(name, "size", size)
    padding = _checks.integer(name, "padding", padding, 0)
    mode = check_mode(name, mode)
    fill = _checks.real(name, "fill", fill, 0.0, 1.0)

    def sample(key, n, frame):
        out = frame if size is None else size
        span = jnp.asarray([frame[0] + 2 * padding - out[0], frame[1] + 2 * padding - out[1]])
        offsets = jax.random.randint(key, (n, 2), 0, span + 1)
        return _crop_warp(name, offsets, frame, out, padding, mode, fill)

    return GeometricOp(name, sample)


def _box_warp(boxes: Array, size: tuple[int, int]) -> Warp:
    scale = boxes[:, 2:] / jnp.asarray(size, jnp.float32)
    offset = boxes[:, :2] + 0.5 * scale - 0.5
    return Warp(diagonal_matrices(scale, offset), size, exact=False, mode="edge")


def resized_crop(images: Array, boxes: Any, size: int | tuple[int, int]) -> Array:
    """Resizes the box ``boxes[n]`` of each image to ``size`` by bilinear interpolation.

    Box ``(row0, col0, height, width)`` covers pixel coordinates ``[row0, row0 + height)`` by
    ``[col0, col0 + width)`` (the whole image is ``(0, 0, H, W)``); output pixel ``i`` samples
    row ``row0 + (i + 0.5) * height / size[0] - 0.5``, and edge pixels are repeated beyond the
    frame. No antialiasing: shrinking a box by more than 2x aliases.

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      boxes: float ``(N, 4)`` or ``(4,)``.
      size: output ``(height, width)`` or an int.

    Returns:
      ``(N, *size, C)``, ``images``' dtype.
    """
    name = _NAME + "resized_crop"
    check_images(name, images)
    size = check_size(name, "size", size)
    boxes = per_example(name, "boxes", boxes, images.shape[0], (4,)).astype(jnp.float32)
    return resample(images, _box_warp(boxes, size))


def random_resized_crop(
    size: int | tuple[int, int],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> GeometricOp:
    """Inception-style crop: a random box of random area and aspect ratio, resized to ``size``.

    Per example (as torchvision's ``RandomResizedCrop``): the area fraction is uniform in
    ``scale``, the width/height ratio log-uniform in ``ratio``; the box is rounded to whole
    pixels and placed uniformly. Of 10 draws the first that fits is used; when none fits, the
    largest centred box with the ratio clipped to ``ratio``.

    Raises:
      ValueError: ``scale`` not within ``(0, 1]``, ``ratio`` not positive, or low > high.
    """
    name = _NAME + "random_resized_crop"
    size = check_size(name, "size", size)
    scale = check_interval(name, "scale", scale, 0.0, 1.0, low_open=True)
    ratio = check_interval(name, "ratio", ratio, 0.0, math.inf, low_open=True)
    tries = 10

    def sample(key, n, frame):
        h, w = frame
        # One draw for everything: columns are area, log-ratio (per try), then position.
        u = jax.random.uniform(key, (n, 2 * tries + 2))
        area = h * w * (scale[0] + (scale[1] - scale[0]) * u[:, :tries])
        log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
        log_r = log_lo + (log_hi - log_lo) * u[:, tries : 2 * tries]
        box_w = jnp.round(jnp.sqrt(area * jnp.exp(log_r)))
        box_h = jnp.round(jnp.sqrt(area / jnp.exp(log_r)))
        fits = (box_w >= 1) & (box_w <= w) & (box_h >= 1) & (box_h <= h)
        first = jnp.argmax(fits, axis=1)
        pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
        fallback_r = min(max(w / h, ratio[0]), ratio[1])
        fallback = (min(h, round(w / fallback_r)), min(w, round(h * fallback_r)))
        found = fits.any(axis=1)
        box_h = jnp.where(found, pick(box_h), fallback[0])
        box_w = jnp.where(found, pick(box_w), fallback[1])
        row0 = jnp.where(found, jnp.floor(u[:, -2] * (h - box_h + 1)), (h - box_h) // 2)
        col0 = jnp.where(found, jnp.floor(u[:, -1] * (w - box_w + 1)), (w - box_w) // 2)
        return _box_warp(jnp.stack([row0, col0, box_h, box_w], axis=1), size)

    return GeometricOp(name, sample)


def _rotation_warp(
    degrees: Array, shifts: Array, size: tuple[int, int], mode: str, fill: float
) -> Warp:
    theta = jnp.deg2rad(degrees.astype(jnp.float32))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    linear = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], axis=1)
    centre = (jnp.asarray(size, jnp.float32) - 1.0) / 2.0
    offset = centre[:, None] - linear @ (centre + shifts.astype(jnp.float32))[:, :, None]
    matrices = jnp.concatenate([linear, offset], axis=2)
    return Warp(matrices, size, exact=False, mode=mode, fill=fill)


def rotate(
    images: Array,
    degrees: Any,
    *,
    shifts: Any = (0.0, 0.0),
    mode: str = "constant",
    fill: float = 0.0,
) -> Array:
    """Rotates each image counter-clockwise by ``degrees`` about its centre, then shifts it.

    Output pixel ``p`` samples the input at ``R(-degrees) (p - c - shift) + c`` (bilinear), where
    ``c = ((H - 1) / 2, (W - 1) / 2)``: ``degrees=90`` on a square image equals ``np.rot90``.

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      degrees: ``()`` or ``(N,)`` angles in degrees.
      shifts: ``(2,)`` or ``(N, 2)`` ``(down, right)`` shifts in pixels, applied after rotating.
      mode: ``"constant"``, ``"edge"`` or ``"reflect"`` for samples outside the frame.
      fill: the constant fill in ``[0, 1]`` units.

    Returns:
      ``(N, H, W, C)``, ``images``' dtype.
    """
    name = _NAME + "rotate"
    check_images(name, images)
    mode = check_mode(name, mode)
    fill = _checks.real(name, "fill", fill, 0.0, 1.0)
    n, h, w, _ = images.shape
    degrees = per_example(name, "degrees", degrees, n)
    shifts = per_example(name, "shifts", shifts, n, (2,))
    return resample(images, _rotation_warp(degrees, shifts, (h, w), mode, fill))


def random_affine(
    *,
    degrees: float = 0.0,
    translate: float | tuple[float, float] = 0.0,
    mode: str = "constant",
    fill: float = 0.0,
) -> GeometricOp:
    """Small rotation and translation: angle uniform in ``[-degrees, degrees]``, shift uniform
    in ``[-translate * H, translate * H]`` rows and likewise ``W`` columns, per example.

    Args:
      degrees: the largest rotation, in ``[0, 180]``.
      translate: the largest shift as a fraction of the image size, in ``[0, 1)``; a pair gives
        ``(rows, cols)`` separately.
      mode: ``"constant"``, ``"edge"`` or ``"reflect"`` for samples outside the frame.
      fill: the constant fill in ``[0, 1]`` units.

    Raises:
      ValueError: an option out of range.
    """
    name = _NAME + "random_affine"
    max_deg = _checks.real(name, "degrees", degrees, 0.0, 180.0)
    pair = translate if isinstance(translate, (tuple, list)) else (translate, translate)
    if len(pair) != 2:
        raise ValueError(f"{name}: translate must be a float or a pair, got {translate!r}")
    fractions = tuple(_checks.real(name, "translate", t, 0.0, 1.0, high_open=True) for t in pair)
    mode = check_mode(name, mode)
    fill = _checks.real(name, "fill", fill, 0.0, 1.0)

    def sample(key, n, frame):
        u = jax.random.uniform(key, (n, 3), minval=-1.0, maxval=1.0)
        limit = jnp.asarray([fractions[0] * frame[0], fractions[1] * frame[1]])
        angle, shifts = max_deg * u[:, 0], limit * u[:, 1:]
        return _rotation_warp(angle, shifts, frame, mode, fill)

    return GeometricOp(name, sample)
