"""What the reference classifiers share: their layer :class:`Spec` and building blocks."""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax

from mixjax import _checks

__all__ = ["LENET5", "LENET300100", "Spec", "check_positive", "pool", "small_cnn_spec"]


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


def pool(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 and SAME padding: a side ``s`` becomes ``ceil(s / 2)``."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


def check_positive(owner: str, name: str, value: Any) -> None:
    """Raises unless ``value`` is an integer ``>= 1``; ``owner`` (the model) names it."""
    _checks.integer(f"mixjax.models.{owner}", name, value, 1)
