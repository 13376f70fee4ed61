"""Box and label-mixing augmentation: cutout, mixup, cutmix, label smoothing; label checks.

Labels are integer class ids ``(N,)`` (the label-mixing ops then need ``num_classes``) or a
float distribution ``(N, C)``; the label ops return a float distribution ``(N, C)``.

Mixing pairs each example with its predecessor in the batch: example ``i`` is mixed with example
``i - 1`` (example 0 with the last), i.e. with ``jnp.roll(images, 1, axis=0)``. Batches are
shuffled, so this is a random pairing that never pairs an example with itself (for ``N > 1``)
and costs no gather.

Boxes are int ``(N, 4)`` ``(row0, col0, row1, col1)``, half-open: rows ``row0 <= r < row1``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mixjax import _checks
from mixjax.augment.base import (
    Array,
    ImageOp,
    LabelOp,
    as_distribution,
    check_images,
    check_size,
    expand,
    fill_value,
    materialize,
    per_example,
)

__all__ = [
    "blend_pairs",
    "box_mask",
    "cutmix",
    "cutout",
    "johnk_rounds",
    "label_smoothing",
    "mixup",
    "paste_pairs",
    "random_cutout",
    "smooth_labels",
    "symmetric_beta",
]

_NAME = "mixjax.augment."


def smooth_labels(labels: Any, smoothing: float, *, num_classes: int | None = None) -> Array:
    """``(1 - smoothing) * y + smoothing / C`` for labels ``y`` as a distribution ``(N, C)``.

    Args:
      labels: int ``(N,)`` (needs ``num_classes``) or float ``(N, C)``.
      smoothing: in ``[0, 1)``.
      num_classes: the number of classes of integer labels.

    Returns:
      float ``(N, C)``, rows summing to 1.
    """
    name = _NAME + "smooth_labels"
    smoothing = _checks.real(name, "smoothing", smoothing, 0.0, 1.0, high_open=True)
    y = as_distribution(name, labels, None, _check_classes(name, num_classes))
    return (1.0 - smoothing) * y + smoothing / y.shape[1]


def box_mask(boxes: Array, size: tuple[int, int]) -> Array:
    """Booleans ``(N, H, W, 1)``: whether each pixel lies in its example's box."""
    rows = jnp.arange(size[0])[None, :, None]
    cols = jnp.arange(size[1])[None, None, :]
    b = boxes[:, :, None, None]
    inside = (rows >= b[:, 0]) & (rows < b[:, 2]) & (cols >= b[:, 1]) & (cols < b[:, 3])
    return inside[..., None]


def cutout(images: Array, boxes: Any, *, fill: float = 0.0) -> Array:
    """Sets the pixels in each example's box to ``fill`` (in ``[0, 1]`` units).

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      boxes: int ``(N, 4)`` or ``(4,)``; see the module docstring.
      fill: the value written, e.g. 0 (black).

    Returns:
      ``(N, H, W, C)``, ``images``' dtype.
    """
    name = _NAME + "cutout"
    check_images(name, images)
    fill = _checks.real(name, "fill", fill, 0.0, 1.0)
    boxes = per_example(name, "boxes", boxes, images.shape[0], (4,))
    mask = box_mask(boxes, images.shape[1:3])
    return jnp.where(mask, fill_value(fill, images.dtype), images)


def _centred_boxes(key: Array, n: int, box: Array, size: tuple[int, int]) -> Array:
    """Boxes of ``box`` ``(N, 2)`` sizes centred uniformly in the frame, clipped to it."""
    centres = jax.random.randint(key, (n, 2), 0, jnp.asarray(size))
    low = centres - box // 2
    limit = jnp.asarray(size)
    return jnp.concatenate([jnp.clip(low, 0, limit), jnp.clip(low + box, 0, limit)], axis=1)


def random_cutout(size: int | tuple[int, int], *, fill: float = 0.0) -> ImageOp:
    """Cutout (DeVries & Taylor 2017): a ``size`` box centred uniformly, clipped to the image.

    Raises:
      ValueError: ``size`` not positive or ``fill`` outside ``[0, 1]``.
    """
    name = _NAME + "random_cutout"
    box = check_size(name, "size", size)
    fill = _checks.real(name, "fill", fill, 0.0, 1.0)

    def fn(key, images):
        n = images.shape[0]
        boxes = _centred_boxes(
            key, n, jnp.broadcast_to(jnp.asarray(box), (n, 2)), images.shape[1:3]
        )
        return cutout(images, boxes, fill=fill)

    return ImageOp(name, fn)


def _partners(x: Array) -> Array:
    return jnp.roll(x, 1, axis=0)


def blend_pairs(
    images: Array, labels: Any, weights: Any, *, num_classes: int | None = None
) -> tuple[Array, Array]:
    """Mixup: ``w * x[i] + (1 - w) * x[i - 1]`` for images and labels alike.

    Args:
      images: ``(N, H, W, C)`` uint8 (the blend is rounded) or float.
      labels: int ``(N,)`` (needs ``num_classes``) or float ``(N, C)``.
      weights: ``()`` or ``(N,)`` in ``[0, 1]``: each example's own share.
      num_classes: the number of classes of integer labels.

    Returns:
      ``(images, labels)``: images of the input dtype, labels float ``(N, C)``.
    """
    name = _NAME + "blend_pairs"
    check_images(name, images)
    n = images.shape[0]
    y = as_distribution(name, labels, n, _check_classes(name, num_classes))
    w = per_example(name, "weights", weights, n).astype(jnp.float32)
    x = materialize(images).astype(jnp.float32)
    mixed = expand(w) * x + expand(1.0 - w) * _partners(x)
    if images.dtype == jnp.uint8:
        mixed = jnp.clip(jnp.round(mixed), 0, 255)
    w = w.astype(y.dtype)[:, None]
    return mixed.astype(images.dtype), w * y + (1 - w) * _partners(y)


def paste_pairs(
    images: Array, labels: Any, boxes: Any, *, num_classes: int | None = None
) -> tuple[Array, Array]:
    """CutMix: pastes box ``boxes[i]`` of example ``i - 1`` into example ``i``.

    Labels mix by the exact pixel fractions: ``w = 1 - box area / (H * W)`` of the own label.

    Args:
      images: ``(N, H, W, C)`` uint8 or float.
      labels: int ``(N,)`` (needs ``num_classes``) or float ``(N, C)``.
      boxes: int ``(N, 4)`` or ``(4,)``, clipped to the frame; see the module docstring.
      num_classes: the number of classes of integer labels.

    Returns:
      ``(images, labels)``: images of the input dtype, labels float ``(N, C)``.
    """
    name = _NAME + "paste_pairs"
    check_images(name, images)
    n, h, w, _ = images.shape
    y = as_distribution(name, labels, n, _check_classes(name, num_classes))
    boxes = per_example(name, "boxes", boxes, n, (4,))
    boxes = jnp.clip(boxes, 0, jnp.asarray([h, w, h, w]))
    images = materialize(images)
    mixed = jnp.where(box_mask(boxes, (h, w)), _partners(images), images)
    area = jnp.maximum(boxes[:, 2] - boxes[:, 0], 0) * jnp.maximum(boxes[:, 3] - boxes[:, 1], 0)
    own = (1.0 - area / (h * w)).astype(y.dtype)[:, None]
    return mixed, own * y + (1 - own) * _partners(y)


def _check_classes(name: str, num_classes: Any) -> int | None:
    return None if num_classes is None else _checks.integer(name, "num_classes", num_classes, 1)


def _check_alpha(name: str, alpha: Any) -> float:
    return _checks.real(name, "alpha", alpha, 0.0, None, low_open=True)


# Per-example probability that all of Jöhnk's rounds reject, before the exact fallback runs.
_JOHNK_MISS = 1e-6


def johnk_rounds(alpha: float) -> int:
    """Rounds of :func:`symmetric_beta`'s Jöhnk sampler for ``Beta(alpha, alpha)``, ``alpha <= 1``.

    One round accepts with probability ``Gamma(alpha + 1)**2 / Gamma(2 * alpha + 1)`` (0.95 at
    ``alpha = 0.2``, 0.5 at 1); the rounds make a per-example miss at most ``_JOHNK_MISS``.
    """
    accept = math.exp(2 * math.lgamma(alpha + 1) - math.lgamma(2 * alpha + 1))
    if accept >= 1.0:
        return 1
    return max(1, math.ceil(math.log(_JOHNK_MISS) / math.log1p(-accept)))


def symmetric_beta(key: Array, alpha: float, n: int, *, rounds: int | None = None) -> Array:
    """``n`` independent draws of ``Beta(alpha, alpha)``, float32 ``(n,)``; exact, loop-free.

    ``jax.random.beta`` draws two gammas by rejection in a ``while_loop`` (slow on CPU, where
    each loop iteration is a dispatch). For ``alpha <= 1`` this runs Jöhnk's exact rejection
    sampler (``X = U**(1/alpha)``, ``Y = V**(1/alpha)``, accept when ``X + Y <= 1``, return
    ``X / (X + Y)``, in log space so small ``alpha`` cannot underflow) for a fixed number of
    vectorized rounds and keeps each example's first acceptance; the rare examples that no round
    accepts take an independent ``jax.random.beta`` draw, behind a ``lax.cond`` that runs only
    when there is one. Either way each draw is exactly ``Beta(alpha, alpha)``. For
    ``alpha > 1`` (where Jöhnk rejects often) it is ``jax.random.beta``.

    Args:
      key: a ``jax.random`` key.
      alpha: ``> 0`` (a Python float, static).
      n: the number of draws.
      rounds: Jöhnk rounds; default :func:`johnk_rounds` of ``alpha``.

    Returns:
      float32 ``(n,)`` in ``[0, 1]``.
    """
    if alpha > 1.0:
        return jax.random.beta(key, alpha, alpha, (n,))
    rounds = johnk_rounds(alpha) if rounds is None else rounds
    k_uniform, k_fallback = jax.random.split(key)
    tiny = jnp.finfo(jnp.float32).tiny
    logs = jnp.log(jax.random.uniform(k_uniform, (2, rounds, n), minval=tiny)) / alpha
    total = jnp.logaddexp(logs[0], logs[1])
    accepted = total <= 0.0
    first = jnp.argmax(accepted, axis=0)
    draws = jnp.take_along_axis(jnp.exp(logs[0] - total), first[None], axis=0)[0]
    hit = jnp.any(accepted, axis=0)
    return jax.lax.cond(
        jnp.all(hit),
        lambda: draws,
        lambda: jnp.where(hit, draws, jax.random.beta(k_fallback, alpha, alpha, (n,))),
    )


def mixup(alpha: float = 0.2, *, num_classes: int | None = None) -> LabelOp:
    """Mixup (Zhang et al. 2018) with a weight ``w ~ Beta(alpha, alpha)`` per example.

    See :func:`blend_pairs` for the pairing and formulas.

    Raises:
      ValueError: ``alpha <= 0`` or ``num_classes < 1``.
    """
    name = _NAME + "mixup"
    alpha = _check_alpha(name, alpha)
    num_classes = _check_classes(name, num_classes)

    def fn(key, images, labels):
        weights = symmetric_beta(key, alpha, images.shape[0])
        return blend_pairs(images, labels, weights)

    return LabelOp(name, fn, num_classes)


def cutmix(alpha: float = 1.0, *, num_classes: int | None = None) -> LabelOp:
    """CutMix (Yun et al. 2019) with one box per example.

    Per example, ``lam ~ Beta(alpha, alpha)``; the box has sides ``floor(H * sqrt(1 - lam))``
    by ``floor(W * sqrt(1 - lam))``, a uniform centre, and is clipped to the image; labels use
    the clipped box's exact area (see :func:`paste_pairs`).

    Raises:
      ValueError: ``alpha <= 0`` or ``num_classes < 1``.
    """
    name = _NAME + "cutmix"
    alpha = _check_alpha(name, alpha)
    num_classes = _check_classes(name, num_classes)

    def fn(key, images, labels):
        n, h, w, _ = images.shape
        k_lam, k_pos = jax.random.split(key)
        side = jnp.sqrt(1.0 - symmetric_beta(k_lam, alpha, n))
        box = jnp.floor(side[:, None] * jnp.asarray([h, w], jnp.float32)).astype(jnp.int32)
        boxes = _centred_boxes(k_pos, n, box, (h, w))
        return paste_pairs(images, labels, boxes)

    return LabelOp(name, fn, num_classes)


def label_smoothing(smoothing: float = 0.1, *, num_classes: int | None = None) -> LabelOp:
    """Label smoothing as a label op (images unchanged, no randomness); see :func:`smooth_labels`.

    Raises:
      ValueError: ``smoothing`` outside ``[0, 1)`` or ``num_classes < 1``.
    """
    name = _NAME + "label_smoothing"
    smoothing = _checks.real(name, "smoothing", smoothing, 0.0, 1.0, high_open=True)
    num_classes = _check_classes(name, num_classes)

    fn = lambda key, images, labels: (images, smooth_labels(labels, smoothing))
    return LabelOp(name, fn, num_classes)
