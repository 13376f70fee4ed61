"""The linen models :func:`create` builds by name, for ``mixjax run`` and artifacts.

One registry, :data:`MODELS`, maps each name to a :class:`ModelInfo`: how to build the model,
its task (``"image"``: ``(N, H, W, C)`` float images to ``(N, outputs)`` logits; ``"lm"``:
``(B, L)`` integer tokens to ``(B, L, outputs)`` next-token logits), the sizes it takes with
their defaults, and the keyword that switches its training behaviour. Sizes have one name for
every model, so one set of command-line options (``--width``, ``--depth``, ...) sizes them all:

* ``width``: channels of the first conv stage (SmallCNN, ResNet-20) or the token width
  (``dim`` of ViT and GPT; the ViT's MLPs are ``2 * width`` wide, GPT's ``4 * width``);
* ``depth``: transformer blocks (ViT ``depth``, GPT ``layers``);
* ``heads``: attention heads (``width`` must divide by it);
* ``patch_size``: the side of the ViT's square patches (it must divide the image sides);
* ``context``: the GPT's longest sequence, also the length of ``mixjax run``'s training windows.

The defaults are sized for the embedded 8x8 digits and a character corpus on a 2-core CPU:
ResNet-20 at ``width=4`` (the paper's CIFAR network is ``width=16``; on the digits a training
step of batch 128 took 22 ms at width 4, 83 ms at width 8, on a shared 2-core CPU), ViT-tiny at
its class defaults (4x4 patches: 4 tokens on 8x8 digits, 49 on 28x28 MNIST; 12 ms a step; at
width 64 and depth 2, 300 steps reached 96 % test accuracy with 4x4 patches, 92 % with 2x2),
GPT-tiny at nanoGPT's CPU "baby GPT" shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import flax.linen as nn

from mixjax.models.gpt import GPTTiny
from mixjax.models.linen import LeNet5, LeNet300100, SmallCNN
from mixjax.models.resnet import ResNet20
from mixjax.models.vit import ViTTiny

__all__ = ["MODELS", "SIZES", "TASKS", "ModelInfo", "create"]

TASKS = ("image", "lm")
SIZES = ("width", "depth", "heads", "patch_size", "context")
_NAME = "mixjax.models.create"


class ModelInfo(NamedTuple):
    """One model of :data:`MODELS`.

    Attributes:
        build: ``(outputs, **sizes) -> linen module``; ``outputs`` is the number of classes of
            an image model, the vocabulary size of a language model.
        task: ``"image"`` or ``"lm"`` (module docstring).
        sizes: the sizes (of :data:`SIZES`) ``build`` takes, with the defaults :func:`create`
            fills in.
        train_kwarg: the ``__call__`` keyword that switches training behaviour (BatchNorm
            statistics, dropout), for :func:`mixjax.train.linen_apply`; ``None`` for models
            without one.
    """

    build: Callable[..., nn.Module]
    task: str
    sizes: Mapping[str, int]
    train_kwarg: str | None


def _vit(num_classes: int, *, width: int, depth: int, heads: int, patch_size: int) -> ViTTiny:
    return ViTTiny(
        num_classes, patch_size=patch_size, dim=width, depth=depth, heads=heads, mlp_dim=2 * width
    )


def _gpt(vocab_size: int, *, width: int, depth: int, heads: int, context: int) -> GPTTiny:
    return GPTTiny(vocab_size, context=context, layers=depth, heads=heads, dim=width)


def _info(build, task, train_kwarg=None, **sizes) -> ModelInfo:
    return ModelInfo(build, task, MappingProxyType(sizes), train_kwarg)


MODELS: Mapping[str, ModelInfo] = MappingProxyType(
    {
        "lenet300100": _info(LeNet300100, "image"),
        "lenet5": _info(LeNet5, "image"),
        "small_cnn": _info(SmallCNN, "image", width=32),
        "resnet20": _info(ResNet20, "image", "train", width=4),
        "vit_tiny": _info(_vit, "image", "train", width=128, depth=4, heads=4, patch_size=4),
        "gpt_tiny": _info(_gpt, "lm", "train", width=128, depth=4, heads=4, context=64),
    }
)


def create(name: str, outputs: int, **sizes: Any) -> nn.Module:
    """The linen model called ``name`` with ``outputs`` classes (or vocabulary entries).

    Example::

        mixjax.models.create("lenet5", 10)
        mixjax.models.create("vit_tiny", 10, width=64, depth=2)  # other sizes: the defaults
        mixjax.models.create("gpt_tiny", 65, context=128)         # a 65-character vocabulary

    Args:
        name: a key of :data:`MODELS`.
        outputs: the classes of an image model, the vocabulary size of a language model.
        **sizes: some of the model's sizes (:attr:`ModelInfo.sizes`); the others take their
            defaults.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), a size the model does
            not take (the message lists those it takes), or a value the model refuses
            (``outputs < 1``, ``width`` not divisible by ``heads``, ...: the model's own error).
    """
    if name not in MODELS:
        raise ValueError(f"{_NAME}: unknown model {name!r}; valid: {sorted(MODELS)}")
    info = MODELS[name]
    unknown = sorted(set(sizes) - set(info.sizes))
    if unknown:
        takes = ", ".join(info.sizes) or "none"
        raise ValueError(
            f"{_NAME}: model {name!r} takes no size {unknown[0]!r} (its sizes: {takes})"
        )
    return info.build(outputs, **{**info.sizes, **sizes})
