"""On-device, per-example data augmentation for NHWC image batches, and its composition.

Every ``random_*`` factory (and ``mixup``, ``cutmix``, ``label_smoothing``) validates its
options eagerly and returns an op that works on a whole **batch** with **independent random
parameters per example**, so callers neither split keys nor ``vmap``:

* image ops: ``op(key, images) -> images``;
* label ops: ``op(key, images, labels) -> (images, labels)``, labels given as integer ids
  ``(N,)`` (with ``num_classes=``) or a distribution ``(N, C)`` and returned as float ``(N, C)``.

Each random op samples its parameters, then applies a public deterministic op
(``flip_horizontal``, ``crop``, ``adjust_brightness``, ``blend_pairs``, ...) that takes one
parameter per example. :func:`chain` composes ops into one jit-able
``(key, images, labels) -> (images, labels)`` and fuses neighbouring geometric ops into one
resample.

Conventions: images are ``uint8`` or floating point, NHWC; every op returns its input's dtype.
Colour ops expect float images in ``[0, 1]`` and clip to it; ``uint8`` images are processed as
``x / 255`` and rounded back (half to even), saturating at 0 and 255. Intensities passed by
users (brightness deltas, fill values) are in ``[0, 1]`` units for both dtypes. Coordinates
are ``(row, col)``. Normalize (mean/std) after augmenting.

Example::

    augment = mixjax.augment.chain(
        mixjax.augment.random_flip(),
        mixjax.augment.random_crop(padding=4),
        mixjax.augment.random_brightness(0.2),
    )
    images, labels = jax.jit(augment)(key, images, labels)
"""

from mixjax.augment.base import ImageOp, LabelOp
from mixjax.augment.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    hsv_to_rgb,
    random_brightness,
    random_contrast,
    random_hue,
    random_saturation,
    rgb_to_hsv,
)
from mixjax.augment.compose import Chain, chain
from mixjax.augment.geometry import (
    crop,
    flip_horizontal,
    flip_vertical,
    random_affine,
    random_crop,
    random_flip,
    random_resized_crop,
    resized_crop,
    rotate,
)
from mixjax.augment.mix import (
    blend_pairs,
    cutmix,
    cutout,
    label_smoothing,
    mixup,
    paste_pairs,
    random_cutout,
    smooth_labels,
)
from mixjax.augment.warp import GeometricOp, Warp, resample

__all__ = [
    "Chain",
    "GeometricOp",
    "ImageOp",
    "LabelOp",
    "Warp",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blend_pairs",
    "chain",
    "crop",
    "cutmix",
    "cutout",
    "flip_horizontal",
    "flip_vertical",
    "hsv_to_rgb",
    "label_smoothing",
    "mixup",
    "paste_pairs",
    "random_affine",
    "random_brightness",
    "random_contrast",
    "random_crop",
    "random_cutout",
    "random_flip",
    "random_hue",
    "random_resized_crop",
    "random_saturation",
    "resample",
    "resized_crop",
    "rgb_to_hsv",
    "rotate",
    "smooth_labels",
]
