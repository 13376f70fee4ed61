"""CIFAR-style ResNet-20 (He et al. 2016, section 4.2) with BatchNorm, in Flax linen and NNX.

A 3x3 conv of ``width`` channels, then 3 stages of 3 basic blocks of ``width``, ``2 * width``
and ``4 * width`` channels, a global average pool and a ``Dense`` head. A basic block is
conv-BN-ReLU-conv-BN plus a shortcut, then ReLU; the first block of stages 2 and 3 strides by
2, and where it changes the shape its shortcut is a projection, a 1x1 conv + BN (the paper's
option B; option A's zero padding has no parameters to compress). The 3x3 convs pad by 1 and
the 1x1 projections by 0, so a side ``s`` becomes ``ceil(s / 2)`` at each stride: 32 -> 16 ->
8, 28 -> 14 -> 7, 8 -> 4 -> 2. Convs have no bias (the BatchNorm after each has one) and He
normal kernels; BatchNorm uses momentum 0.9 and epsilon 1e-5 (PyTorch's defaults, which
CIFAR ResNet recipes train with).

Parameters at ``width=16``, 10 classes: 272,474 (the paper's "0.27M" is option A's 269,722),
plus 1,568 batch statistics. Layer names, the same in both APIs (so
``where=".*proj_conv/kernel"`` selects the same leaves in a linen ``params`` dict and in
``nnx.state(model, nnx.Param)``, and linen variables load into an NNX model with
``nnx.update``)::

    stem_conv, stem_bn
    stage{1,2,3}_block{0,1,2}/ conv1, bn1, conv2, bn2[, proj_conv, proj_bn]
    head

``axis_name`` is passed to every BatchNorm: under ``jax.vmap``/``shard_map``/``pmap`` with that
axis name, training-mode statistics are the means over all replicas' examples (synchronized
BatchNorm), not per replica.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mixjax import _checks
from mixjax.models.spec import check_positive

__all__ = ["BasicBlock", "NNXBasicBlock", "NNXResNet20", "ResNet20"]

_STAGES = 3
_BLOCKS = 3
_KERNEL_INIT = nn.initializers.he_normal()


def _check(owner: str, width: int, momentum: Any, axis_name: Any) -> None:
    check_positive(owner, "width", width)
    _checks.real(f"mixjax.models.{owner}", "momentum", momentum, 0.0, 1.0, high_open=True)
    _checks.instance(
        f"mixjax.models.{owner}", "axis_name", axis_name, (str, type(None)), "None or a str"
    )


def _check_images(owner: str, x: jax.Array) -> None:
    if jnp.ndim(x) != 4:
        raise ValueError(
            f"mixjax.models.{owner}: expected images (N, H, W, C), got shape {jnp.shape(x)}"
        )


_BLOCK_NAMES = tuple(f"stage{s + 1}_block{b}" for s in range(_STAGES) for b in range(_BLOCKS))


def _plan(width: int):
    """``(name, features, stride)`` of every block, stage by stage."""
    for i, name in enumerate(_BLOCK_NAMES):
        stage, block = divmod(i, _BLOCKS)
        yield name, width * 2**stage, 2 if stage > 0 and block == 0 else 1


# ----------------------------------------------------------------------------- linen


class BasicBlock(nn.Module):
    """A linen basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is the identity, or ``proj_bn(proj_conv(x))`` (1x1, ``strides``) where the
    shape changes. Maps ``(N, H, W, C)`` to ``(N, ceil(H / s), ceil(W / s), features)``.

    Attributes:
        features: output channels.
        strides: stride of ``conv1`` and of the projection.
        momentum: BatchNorm momentum of the running averages.
        axis_name: the BatchNorm's cross-replica axis name, or ``None``.
    """

    features: int
    strides: int = 1
    momentum: float = 0.9
    axis_name: str | None = None

    def __post_init__(self):
        check_positive("BasicBlock", "features", self.features)
        check_positive("BasicBlock", "strides", self.strides)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        def bn(name):
            return nn.BatchNorm(
                use_running_average=not train,
                momentum=self.momentum,
                epsilon=1e-5,
                axis_name=self.axis_name,
                name=name,
            )

        def conv(kernel, strides, name):
            pad = (kernel - 1) // 2
            return nn.Conv(
                self.features,
                (kernel, kernel),
                strides=strides,
                padding=pad,
                use_bias=False,
                kernel_init=_KERNEL_INIT,
                name=name,
            )

        y = nn.relu(bn("bn1")(conv(3, self.strides, "conv1")(x)))
        y = bn("bn2")(conv(3, 1, "conv2")(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = bn("proj_bn")(conv(1, self.strides, "proj_conv")(x))
        return nn.relu(x + y)


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 in linen (see the module docstring for the layers).

    Input ``(N, H, W, C)`` float32 images (any side and channel count); output ``(N,
    num_classes)`` float32 logits. ``__call__(x, *, train=False)``: in training the BatchNorms
    normalize with the batch statistics and update the ``batch_stats`` collection (apply with
    ``mutable=["batch_stats"]``, or :func:`mixjax.train.linen_apply` with
    ``train_kwarg="train"``); otherwise they use the running averages.

    Attributes:
        num_classes: output logits.
        width: channels of the first stage (16 in the paper); stages 2 and 3 have 2x and 4x.
        momentum: BatchNorm momentum, in ``[0, 1)``.
        axis_name: passed to every BatchNorm (cross-replica statistics), or ``None``.

    Raises:
        TypeError / ValueError: at construction, ``num_classes`` or ``width`` not an integer
            ``>= 1``, ``momentum`` outside ``[0, 1)`` or ``axis_name`` neither ``None`` nor a
            str; at the call, input that is not 4-D.
    """

    num_classes: int = 10
    width: int = 16
    momentum: float = 0.9
    axis_name: str | None = None

    def __post_init__(self):
        check_positive("ResNet20", "num_classes", self.num_classes)
        _check("ResNet20", self.width, self.momentum, self.axis_name)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_images("ResNet20", x)
        x = nn.Conv(
            self.width,
            (3, 3),
            padding=1,
            use_bias=False,
            kernel_init=_KERNEL_INIT,
            name="stem_conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.momentum,
            epsilon=1e-5,
            axis_name=self.axis_name,
            name="stem_bn",
        )(x)
        x = nn.relu(x)
        for name, features, strides in _plan(self.width):
            block = BasicBlock(features, strides, self.momentum, self.axis_name, name=name)
            x = block(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


# ----------------------------------------------------------------------------- NNX


def _nnx_bn(features: int, momentum: float, axis_name: str | None, rngs: nnx.Rngs):
    return nnx.BatchNorm(features, momentum=momentum, epsilon=1e-5, axis_name=axis_name, rngs=rngs)


def _nnx_conv(cin: int, cout: int, kernel: int, strides: int, rngs: nnx.Rngs):
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=strides,
        padding=(kernel - 1) // 2,
        use_bias=False,
        kernel_init=_KERNEL_INIT,
        rngs=rngs,
    )


class NNXBasicBlock(nnx.Module):
    """The NNX :class:`BasicBlock`, from ``in_features`` to ``features`` channels.

    Args:
        in_features: input channels.
        features: output channels.
        strides: stride of ``conv1`` and of the projection.
        momentum: BatchNorm momentum.
        axis_name: the BatchNorm's cross-replica axis name, or ``None``.
        rngs: initializer randomness.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        momentum: float = 0.9,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        for name, value in (("in_features", in_features), ("features", features)):
            check_positive("NNXBasicBlock", name, value)
        check_positive("NNXBasicBlock", "strides", strides)
        self.conv1 = _nnx_conv(in_features, features, 3, strides, rngs)
        self.bn1 = _nnx_bn(features, momentum, axis_name, rngs)
        self.conv2 = _nnx_conv(features, features, 3, 1, rngs)
        self.bn2 = _nnx_bn(features, momentum, axis_name, rngs)
        if strides != 1 or in_features != features:
            self.proj_conv = _nnx_conv(in_features, features, 1, strides, rngs)
            self.proj_bn = _nnx_bn(features, momentum, axis_name, rngs)
        else:
            self.proj_conv = self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.proj_conv is not None:
            x = self.proj_bn(self.proj_conv(x))
        return nnx.relu(x + y)


class NNXResNet20(nnx.Module):
    """CIFAR-style ResNet-20 in NNX, layers named as in :class:`ResNet20`.

    Calling it maps ``(N, H, W, in_channels)`` float32 images to ``(N, num_classes)`` float32
    logits. The BatchNorms follow the module's mode: after ``model.train()`` (NNX's default for
    a new model) they normalize with batch statistics and update their running averages, after
    ``model.eval()`` they use the averages (:func:`mixjax.train.nnx_apply` switches the mode).

    Args:
        in_channels: channels of the input images (1 for digits, 3 for CIFAR).
        num_classes: output logits.
        width: channels of the first stage (16 in the paper).
        momentum: BatchNorm momentum, in ``[0, 1)``.
        axis_name: passed to every BatchNorm (cross-replica statistics), or ``None``.
        rngs: initializer randomness (``nnx.Rngs(0)``).

    Raises:
        TypeError / ValueError: ``in_channels``, ``num_classes`` or ``width`` not an integer
            ``>= 1``, ``momentum`` outside ``[0, 1)``, ``axis_name`` neither ``None`` nor a str.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 10,
        *,
        width: int = 16,
        momentum: float = 0.9,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
    ):
        check_positive("NNXResNet20", "in_channels", in_channels)
        check_positive("NNXResNet20", "num_classes", num_classes)
        _check("NNXResNet20", width, momentum, axis_name)
        self.stem_conv = _nnx_conv(in_channels, width, 3, 1, rngs)
        self.stem_bn = _nnx_bn(width, momentum, axis_name, rngs)
        channels = width
        for name, features, strides in _plan(width):
            block = NNXBasicBlock(
                channels, features, strides, momentum=momentum, axis_name=axis_name, rngs=rngs
            )
            setattr(self, name, block)
            channels = features
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_images("NNXResNet20", x)
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        for name in _BLOCK_NAMES:
            x = getattr(self, name)(x)
        return self.head(jnp.mean(x, axis=(1, 2)))
