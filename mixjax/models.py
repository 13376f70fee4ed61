"""Small reference image classifiers in Flax linen and NNX: LeNet-300-100, LeNet-5, a small CNN.

Every model maps float images ``(N, H, W, C)`` (NHWC, e.g. from :func:`mixjax.data.normalize`)
to logits ``(N, num_classes)``. Each is a stack of conv blocks (``Conv`` with SAME padding, ReLU,
2x2 max pool with stride 2 and SAME padding, so a side ``s`` becomes ``ceil(s / 2)`` and never
drops below 1), a flatten, hidden ``Dense`` layers with ReLU, and a final ``Dense``. So they fit
any image size: 8x8x1 digits, 28x28x1 MNIST, 32x32x3 CIFAR.

Layers carry Flax's default names in order, ``Conv_0, Conv_1, ..., Dense_0, Dense_1, ...``, in
both APIs: the NNX models name their attributes the same way, so a ``where=".*Dense_0/kernel"``
selects the same leaf in a linen ``params`` dict and in ``nnx.state(model, nnx.Param)``, and
linen weights load into an NNX model with ``nnx.update(model, variables["params"])``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
from flax import nnx


class Spec(NamedTuple):
    """The layers of a classifier.

    Attributes:
        convs: output channels of each conv block (conv, ReLU, max pool).
        kernel: the convolutions' window ``(height, width)``.
        hidden: widths of the hidden ``Dense`` layers (each followed by ReLU).
    """

    convs: tuple[int, ...]
    kernel: tuple[int, int]
    hidden: tuple[int, ...]


LENET300100 = Spec(convs=(), kernel=(1, 1), hidden=(300, 100))
LENET5 = Spec(convs=(6, 16), kernel=(5, 5), hidden=(120, 84))


def small_cnn_spec(width: int) -> Spec:
    """Two 3x3 conv blocks of ``width`` and ``2 * width`` channels, then the output layer."""
    return Spec(convs=(width, 2 * width), kernel=(3, 3), hidden=())


def _pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


def _check_positive(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mixjax.models.{owner}: {name} must be a positive int, got {value!r}")


class _Classifier(nn.Module):
    """The linen network of :meth:`spec` (see the module docstring)."""

    num_classes: int = 10
    spec: ClassVar[Spec]

    def __post_init__(self):
        _check_positive(type(self).__name__, "num_classes", self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        for features in spec.convs:
            x = _pool(nn.relu(nn.Conv(features, spec.kernel, padding="SAME")(x)))
        x = x.reshape((x.shape[0], -1))
        for features in spec.hidden:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.num_classes)(x)


class LeNet300100(_Classifier):
    """LeNet-300-100: flatten, ``Dense_0`` 300, ReLU, ``Dense_1`` 100, ReLU, ``Dense_2``.

    Input ``(N, ...)`` floats, flattened per example (``(N, 28, 28, 1)`` gives 266,610
    parameters); output ``(N, num_classes)`` logits.
    """

    spec = LENET300100


class LeNet5(_Classifier):
    """LeNet-5 with SAME padding and max pooling: ``Conv_0`` 6 and ``Conv_1`` 16 (5x5), then
    ``Dense_0`` 120, ``Dense_1`` 84, ``Dense_2`` ``num_classes``.

    Input ``(N, H, W, C)`` floats; output ``(N, num_classes)`` logits.
    """

    spec = LENET5


class SmallCNN(_Classifier):
    """``Conv_0`` ``width`` and ``Conv_1`` ``2 * width`` (3x3) blocks, then ``Dense_0``.

    Input ``(N, H, W, C)`` floats; output ``(N, num_classes)`` logits.
    """

    width: int = 32

    def __post_init__(self):
        _check_positive("SmallCNN", "width", self.width)
        super().__post_init__()

    @property
    def spec(self) -> Spec:
        return small_cnn_spec(self.width)


MODELS = {"lenet300100": LeNet300100, "lenet5": LeNet5, "small_cnn": SmallCNN}


def create(name: str, num_classes: int) -> nn.Module:
    """The linen model called ``name`` (``"lenet300100"``, ``"lenet5"``, ``"small_cnn"``).

    Raises:
        ValueError: an unknown name (the message lists the valid ones) or ``num_classes < 1``.
    """
    if name not in MODELS:
        raise ValueError(f"mixjax.models.create: unknown model {name!r}; valid: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes)


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
        _check_positive(owner, "num_classes", num_classes)
        image_shape = tuple(image_shape)
        if (spec.convs and len(image_shape) != 3) or not image_shape:
            raise ValueError(
                f"mixjax.models.{owner}: image_shape must be (H, W, C) for a conv network, "
                f"got {image_shape}"
            )
        for side in image_shape:
            _check_positive(owner, "image_shape entries", side)
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
            x = _pool(nnx.relu(getattr(self, f"Conv_{i}")(x)))
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
        _check_positive(type(self).__name__, "in_features", in_features)
        super().__init__(LENET300100, (in_features,), num_classes, rngs=rngs)


class NNXLeNet5(NNXClassifier):
    """NNX :class:`LeNet5` for images of ``image_shape`` ``(H, W, C)``.

    Calling it maps ``(N, H, W, C)`` floats to ``(N, num_classes)`` logits.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int = 10, *, rngs: nnx.Rngs):
        super().__init__(LENET5, image_shape, num_classes, rngs=rngs)
