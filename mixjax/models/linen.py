"""Small reference image classifiers in Flax linen: LeNet-300-100, LeNet-5, a small CNN.

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

from typing import ClassVar

import flax.linen as nn
import jax

from mixjax.models.spec import LENET5, LENET300100, Spec, check_positive, pool, small_cnn_spec

__all__ = ["LeNet5", "LeNet300100", "SmallCNN"]


class _Classifier(nn.Module):
    """The linen network of :meth:`spec` (see the module docstring)."""

    num_classes: int = 10
    spec: ClassVar[Spec]

    def __post_init__(self):
        check_positive(type(self).__name__, "num_classes", self.num_classes)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        for features in spec.convs:
            x = pool(nn.relu(nn.Conv(features, spec.kernel, padding="SAME")(x)))
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
        check_positive("SmallCNN", "width", self.width)
        super().__post_init__()

    @property
    def spec(self) -> Spec:
        return small_cnn_spec(self.width)
