"""Composition of augmentation ops into one function, with geometric ops fused into one resample."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mixjax.augment.base import Array, ImageOp, LabelOp, check_images, check_labels
from mixjax.augment.warp import GeometricOp, Warp, compatible, compose, resample

__all__ = [
    "Chain",
    "Op",
    "chain",
]

_NAME = "mixjax.augment.chain"
Op = ImageOp | GeometricOp | LabelOp


@dataclasses.dataclass(frozen=True)
class Chain:
    """Ops applied in order: ``chain(key, images, labels) -> (images, labels)``; see :func:`chain`.

    Attributes:
      ops: the ops, in application order.
    """

    ops: tuple[Any, ...]

    def __call__(
        self, key: Array, images: Array, labels: Array | None = None
    ) -> tuple[Array, Array | None]:
        check_images(_NAME, images)
        n = images.shape[0]
        if labels is not None:
            check_labels(_NAME, labels, n)
        else:
            needs = [op.name for op in self.ops if isinstance(op, LabelOp)]
            if needs:
                raise ValueError(f"{_NAME}: labels are needed by {needs[0]}, got labels=None")
        keys = jax.random.split(key, len(self.ops)) if self.ops else []
        pending: Warp | None = None
        for op, op_key in zip(self.ops, keys, strict=True):
            if isinstance(op, GeometricOp):
                frame = pending.size if pending is not None else tuple(images.shape[1:3])
                warp = op.sample(op_key, n, frame)
                if pending is not None and compatible(pending, warp):
                    pending = compose(pending, warp)
                    continue
                images = images if pending is None else resample(images, pending)
                pending = warp
                continue
            if pending is not None:
                images, pending = resample(images, pending), None
            if isinstance(op, ImageOp):
                images = op(op_key, images)
            else:
                images, labels = op(op_key, images, labels)
        if pending is not None:
            images = resample(images, pending)
        return images, labels


def chain(*ops: Op | Chain) -> Chain:
    """Composes augmentation ops into one jit-able ``(key, images, labels) -> (images, labels)``.

    ``key`` is split into one key per op, so ``chain(a, b)(key, x, y)`` draws what ``a`` and
    ``b`` draw when called with ``jax.random.split(key, 2)``. Image ops leave labels as they are
    (``labels=None`` is allowed when no op needs labels); label ops return them as a float
    distribution ``(N, C)``.

    Neighbouring geometric ops (flips, crops, resized crops, rotations) are **fused**: their
    per-example coordinate maps are composed and the source is resampled once, which is cheaper
    than one resample per op (``benchmarks/augment.py`` measures it) and interpolates at most
    once. Flips and crops alone stay an exact copy of pixels, equal to applying the ops in
    turn. The fused resample samples the source where the composed map points, so where two
    ops both move content out of their frames, content the first pushed out is still seen by
    the second instead of its fill; ops whose out-of-frame ``mode``/``fill`` differ are not
    fused. Put geometric ops next to each other to fuse them (colour ops between them split
    the run).

    Example::

        augment = mixjax.augment.chain(
            mixjax.augment.random_flip(),
            mixjax.augment.random_crop(padding=4),
            mixjax.augment.random_brightness(0.2),
            mixjax.augment.mixup(0.2, num_classes=10),
        )
        images, soft_labels = jax.jit(augment)(key, images, labels)

    Raises:
      TypeError: an argument is not an augmentation op.
    """
    for i, op in enumerate(ops):
        if not isinstance(op, (ImageOp, GeometricOp, LabelOp, Chain)):
            raise TypeError(
                f"{_NAME}: argument {i} must be an augmentation op (made by a "
                f"mixjax.augment factory), got {type(op).__name__}"
            )
    return Chain(tuple(ops))
