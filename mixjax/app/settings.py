"""The settings of ``mixjax run``: one frozen dataclass per section, each field with its flag.

Each field carries its command-line flag and help text in ``metadata``, so the TOML loader, the
command-line parser (:mod:`mixjax.app.cli`) and the defaults come from one place
(:func:`options`). The dataclass defaults are the image task's; :data:`LM_DEFAULTS` holds what
``--task lm`` changes, :data:`MODEL_DEFAULTS` what a model's own recipe changes,
:data:`IMAGE_ONLY` the settings only the image pipeline reads. Building,
loading and checking a configuration: :mod:`mixjax.app.config`, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "COMPENSATIONS",
    "IMAGE_ONLY",
    "LM_DEFAULTS",
    "MODEL_DEFAULTS",
    "Compress",
    "Config",
    "Data",
    "Model",
    "Run",
    "Train",
    "base_type",
    "options",
]

COMPENSATIONS = ("none", "dc", "dc_adaptive")
# What --task lm changes: benchmarks/lm.py's GPT-tiny recipe (nanoGPT's CPU batch of 12 windows,
# AdamW 1e-3 with weight decay 0.1, 5000 steps; the 2:4 masks fine-tuned for a quarter of that
# at 3e-4), synchronous: on tiny-shakespeare, 500 steps 2 steps stale left the validation loss at
# 3.35 nats (with or without DC compensation), synchronous ones at 2.34.
LM_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "data.task": "lm",
        "data.batch_size": 12,
        "train.model": "gpt_tiny",
        "train.lr": 1e-3,
        "train.weight_decay": 0.1,
        "train.tau": 0,
        "compress.batch_size": 12,
        "compress.prune_steps": 1250,
        "compress.prune_lr": 3e-4,
    }
)
# What each model's recipe changes from its task's defaults, applied when the run names the model
# (before the file and the command line). LeNet-300-100 on mnist-dev (4,000 train images) with
# the image defaults ended at 80.7 % float: an MLP under 12.5 % shifts and 10-degree rotations at
# Adam 3e-3 underfits (70 % train accuracy), and without augmentation it overfits (100 % train,
# 92.3 % test). Milder augmentation at 1e-3 gives 96.2 / 96.4 / 96.5 % (seeds 0, 1, 2).
MODEL_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "lenet300100": MappingProxyType(
            {"train.lr": 1e-3, "data.translate": 0.07, "data.degrees": 5.0}
        ),
    }
)
# The settings only the image pipeline reads; --task lm refuses them changed from the default.
IMAGE_ONLY = (
    "data.num_classes",
    "data.degrees",
    "data.translate",
    "compress.sparsity",
    "compress.conv_sparsity",
    "compress.output_sparsity",
    "compress.qat_steps",
    "compress.qat_lr",
    "compress.clusters",
    "compress.bias_clusters",
    "compress.bits",
    "compress.act_bits",
)


def _opt(default: Any, flag: str, text: str) -> Any:
    return dataclasses.field(default=default, metadata={"flag": flag, "help": text})


@dataclasses.dataclass(frozen=True)
class Data:
    """Task, dataset and batching."""

    task: str = _opt(
        "image",
        "--task",
        "'image' (classification; sets the image defaults) or 'lm' (a character-level language "
        "model on --dataset text:FILE; sets the defaults of mixjax.app.config.LM_DEFAULTS)",
    )
    dataset: str = _opt(
        "digits",
        "--dataset",
        "dataset: 'digits' (embedded, offline), a prepared TFDS name, 'idx:DIR' or 'npz:FILE'; "
        "for --task lm 'text:FILE' (UTF-8: its first 90 percent trains, the rest validates)",
    )
    num_classes: int | None = _opt(
        None,
        "--num-classes",
        "the dataset's classes; none: the TFDS label's count, else max(label) + 1 (refused when "
        "most of those classes have no example)",
    )
    batch_size: int = _opt(128, "--batch-size", "examples per float-stage training step")
    degrees: float = _opt(
        10.0, "--degrees", "float-stage augmentation: largest random rotation (degrees)"
    )
    translate: float = _opt(
        0.125,
        "--translate",
        "float-stage augmentation: largest random shift (fraction of the image size)",
    )


@dataclasses.dataclass(frozen=True)
class Train:
    """The float stage: delayed-gradient (asynchronous) Adam with augmentation."""

    model: str = _opt(
        "lenet5",
        "--model",
        "model (mixjax.models.MODELS): image models lenet5, lenet300100, small_cnn, resnet20, "
        "vit_tiny; language model gpt_tiny",
    )
    steps: int = _opt(5000, "--train-steps", "float training steps")
    lr: float = _opt(3e-3, "--lr", "float-stage peak learning rate (cosine decay to 0)")
    weight_decay: float = _opt(1e-3, "--weight-decay", "float-stage AdamW weight decay")
    tau: int = _opt(2, "--tau", "gradient staleness in steps (delayed updates; 0: synchronous)")
    compensation: str = _opt(
        "dc", "--compensation", f"delay compensation: {', '.join(COMPENSATIONS)}"
    )
    lam: float | None = _opt(
        None,
        "--lam",
        "delay-compensation strength; none: the mode's default, mixjax.delay.DEFAULT_LAM "
        "(dc 0.04, dc_adaptive 2.0)",
    )
    steps_per_call: int = _opt(
        50, "--steps-per-call", "training steps per dispatch (lax.scan); divides every stage"
    )


def _size(flag: str, text: str) -> Any:
    return _opt(None, flag, f"{text}; none: the model's default (mixjax.models.MODELS)")


@dataclasses.dataclass(frozen=True)
class Model:
    """The model's sizes (:data:`mixjax.models.SIZES`), each for the models that take it."""

    width: int | None = _size(
        "--width",
        "channels of the first stage (small_cnn, resnet20) or token width (vit_tiny, gpt_tiny)",
    )
    depth: int | None = _size("--depth", "transformer blocks (vit_tiny, gpt_tiny)")
    heads: int | None = _size("--heads", "attention heads (vit_tiny, gpt_tiny)")
    patch_size: int | None = _size("--patch-size", "side of the square patches (vit_tiny)")
    context: int | None = _size(
        "--context", "longest sequence, also the training window (gpt_tiny)"
    )


@dataclasses.dataclass(frozen=True)
class Compress:
    """Pruning, then (image task) clustering with weight and activation QAT."""

    batch_size: int = _opt(
        128, "--compress-batch-size", "examples per training step of the prune and QAT stages"
    )
    prune_steps: int = _opt(
        2000,
        "--prune-steps",
        "pruning-stage steps: gradual magnitude pruning, then fine-tuning (--task lm: 2:4 masks "
        "fine-tuned)",
    )
    prune_lr: float = _opt(
        1e-3,
        "--prune-lr",
        "pruning-stage learning rate (cosine decay to 0 after the sparsity ramp; --task lm: from "
        "the start)",
    )
    sparsity: float = _opt(
        0.95,
        "--sparsity",
        "final sparsity of the matmul kernels but the output layer's (hidden Dense, attention, "
        "MLPs)",
    )
    conv_sparsity: float = _opt(0.6, "--conv-sparsity", "final sparsity of the conv kernels")
    output_sparsity: float = _opt(
        0.7, "--output-sparsity", "final sparsity of the output layer's kernel"
    )
    qat_steps: int = _opt(1000, "--qat-steps", "clustering + quantization-aware fine-tuning steps")
    qat_lr: float = _opt(2e-4, "--qat-lr", "QAT-stage learning rate")
    clusters: int = _opt(16, "--clusters", "shared values per kernel (zero included)")
    bias_clusters: int = _opt(8, "--bias-clusters", "shared values per bias longer than this")
    bits: int = _opt(8, "--bits", "weight (codebook) quantization bits, 2..8")
    act_bits: int = _opt(8, "--act-bits", "activation quantization bits, 2..8")


@dataclasses.dataclass(frozen=True)
class Run:
    """Where and how the run executes."""

    output: str = _opt("mixjax-run", "--output", "output directory")
    seed: int = _opt(0, "--seed", "random seed (initialization, augmentation, data order)")
    devices: int = _opt(1, "--devices", "devices for data-parallel training")
    checkpoint_every: int = _opt(
        500, "--checkpoint-every", "checkpoint every N steps (a multiple of --steps-per-call)"
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration (one field per section)."""

    data: Data = dataclasses.field(default_factory=Data)
    train: Train = dataclasses.field(default_factory=Train)
    model: Model = dataclasses.field(default_factory=Model)
    compress: Compress = dataclasses.field(default_factory=Compress)
    run: Run = dataclasses.field(default_factory=Run)


def options() -> list[tuple[str, dataclasses.Field]]:
    """``("section.field", field)`` for every option, in declaration order."""
    return [
        (f"{section.name}.{f.name}", f)
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(section.default_factory())
    ]


def base_type(typ: str) -> str:
    """A field's type name without ``| None`` (optional fields default to ``None``)."""
    return typ.removesuffix(" | None")
