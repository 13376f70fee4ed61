"""The reference classifiers in Flax NNX, layers named as in linen (:mod:`mixjax.models.linen`).

The NNX models name their attributes ``Conv_0, ..., Dense_0, ...`` like linen's defaults, so a
``where=".*Dense_0/kernel"`` selects the same leaf in a linen ``params`` dict and in
``nnx.state(model, nnx.Param)``, and linen weights load into an NNX model with
``nnx.update(model, variables["params"])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx

from mixjax.models.spec import LENET5, LENET300100, Spec, check_positive, pool

__all__ = ["NNXClassifier", "NNXLeNet5", "NNXLeNet300100"]


def _pooled(side: int, blocks: int) -> int:
    for _ in range(blocks):
        side = -(-side // 2)
    return side


class NNXClassifier(nnx.Module):
    """The NNX network of a :class:`Spec` for images of one shape; layers named as in linen.

    Args:
        spec: the layers.
        image_shape: ``(H, W, C)`` of the input images; with no conv blocks any shape whose
            product is the flattened input size, e.g. ``(784,)``.
        num_classes: output logits.
        rngs: initializer randomness (``nnx.Rngs(0)``).

    Calling it maps ``(N, *image_shape)`` floats to ``(N, num_classes)`` logits.
    """

    def __init__(
        self, spec: Spec, image_shape: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs
    ):
        owner = type(self).__name__
        check_positive(owner, "num_classes", num_classes)
        image_shape = tuple(image_shape)
        if (spec.convs and len(image_shape) != 3) or not image_shape:
            raise ValueError(
                f"mixjax.models.{owner}: image_shape must be (H, W, C) for a conv network, "
                f"got {image_shape}"
            )
        for side in image_shape:
            check_positive(owner, "image_shape entries", side)
        self.spec = spec
        channels = image_shape[-1]
        for i, features in enumerate(spec.convs):
            conv = nnx.Conv(channels, features, spec.kernel, padding="SAME", rngs=rngs)
            setattr(self, f"Conv_{i}", conv)
            channels = features
        if spec.convs:
            height, width = (_pooled(side, len(spec.convs)) for side in image_shape[:2])
            size = height * width * channels
        else:
            size = math.prod(image_shape)
        for i, features in enumerate((*spec.hidden, num_classes)):
            setattr(self, f"Dense_{i}", nnx.Linear(size, features, rngs=rngs))
            size = features

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(len(self.spec.convs)):
            x = pool(nnx.relu(getattr(self, f"Conv_{i}")(x)))
        x = x.reshape((x.shape[0], -1))
        for i in range(len(self.spec.hidden)):
            x = nnx.relu(getattr(self, f"Dense_{i}")(x))
        return getattr(self, f"Dense_{len(self.spec.hidden)}")(x)


class NNXLeNet300100(NNXClassifier):
    """NNX :class:`LeNet300100` for inputs of ``in_features`` values each (784 for MNIST).

    Calling it maps ``(N, ...)`` floats with ``in_features`` values per example to
    ``(N, num_classes)`` logits.
    """

    def __init__(self, in_features: int, num_classes: int = 10, *, rngs: nnx.Rngs):
        check_positive(type(self).__name__, "in_features", in_features)
        super().__init__(LENET300100, (in_features,), num_classes, rngs=rngs)


class NNXLeNet5(NNXClassifier):
    """NNX :class:`LeNet5` for images of ``image_shape`` ``(H, W, C)``.

    Calling it maps ``(N, H, W, C)`` floats to ``(N, num_classes)`` logits.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs):
        super().__init__(LENET5, image_shape, num_classes, rngs=rngs)
