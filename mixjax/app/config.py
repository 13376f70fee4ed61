"""The configuration of ``mixjax run``: a tree of frozen dataclasses with validated defaults.

Each section is a dataclass whose fields carry their command-line flag and help text in
``metadata``, so the TOML loader, the command-line parser (:mod:`mixjax.app.cli`) and the defaults
come from one place. A TOML file uses the section names as tables::

    [train]
    steps = 2000
    tau = 2

    [compress]
    clusters = 8

:func:`load_toml` reads such a file over the defaults (an unknown table or key is an error that
names it), :func:`override` applies ``{"section.field": value}`` changes (the command-line
options), and :func:`validate` checks every value once, before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixjax import _checks
from mixjax.data.loaders import MAX_CLASSES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

COMPENSATIONS = ("none", "dc", "dc_adaptive")
MAX_SEED = 2**32 - 1
MAX_TAU = 1024
_NAME = "mixjax.app.config"

__all__ = [
    "COMPENSATIONS",
    "MAX_SEED",
    "MAX_TAU",
    "Compress",
    "Config",
    "Data",
    "Run",
    "Train",
    "as_dict",
    "base_type",
    "load_toml",
    "options",
    "override",
    "validate",
]


def _opt(default: Any, flag: str, text: str) -> Any:
    return dataclasses.field(default=default, metadata={"flag": flag, "help": text})


@dataclasses.dataclass(frozen=True)
class Data:
    """Dataset and batching."""

    dataset: str = _opt(
        "digits",
        "--dataset",
        "dataset: 'digits' (embedded, offline), a prepared TFDS name, 'idx:DIR' or 'npz:FILE'",
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

    model: str = _opt("lenet5", "--model", "model: lenet5, lenet300100 or small_cnn")
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


@dataclasses.dataclass(frozen=True)
class Compress:
    """Gradual pruning, then clustering with weight and activation QAT."""

    batch_size: int = _opt(
        128, "--compress-batch-size", "examples per training step of the prune and QAT stages"
    )
    prune_steps: int = _opt(2000, "--prune-steps", "gradual magnitude pruning steps")
    prune_lr: float = _opt(
        1e-3, "--prune-lr", "pruning-stage learning rate (cosine decay to 0 after the ramp)"
    )
    sparsity: float = _opt(0.95, "--sparsity", "final sparsity of the hidden Dense kernels")
    conv_sparsity: float = _opt(0.6, "--conv-sparsity", "final sparsity of the Conv kernels")
    output_sparsity: float = _opt(0.7, "--output-sparsity", "final sparsity of the output layer")
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


def _check_type(key: str, value: Any, typ: str) -> Any:
    if value is None and typ.endswith(" | None"):
        return None
    typ = base_type(typ)
    real = isinstance(value, (int, float, np.integer, np.floating))
    ok = {
        "int": _checks.is_integer(value),
        "float": real and not isinstance(value, (bool, np.bool_)),
        "str": isinstance(value, str),
    }[typ]
    if not ok:
        noun = {"int": "an int", "float": "a float", "str": "a string"}[typ]
        raise ValueError(f"{_NAME}: {key} must be {noun}, got {value!r}")
    # Plain Python values, so the configuration stays JSON- and TOML-able (as_dict).
    return {"int": int, "float": float, "str": str}[typ](value)


def override(config: Config, changes: Mapping[str, Any]) -> Config:
    """``config`` with ``{"section.field": value}`` changes (types checked, not ranges).

    Raises:
      ValueError: an unknown key (the message lists the valid ones) or a value of the wrong type.
    """
    types = {key: f.type for key, f in options()}
    sections = {s.name: getattr(config, s.name) for s in dataclasses.fields(Config)}
    for key, value in changes.items():
        if key not in types:
            raise ValueError(f"{_NAME}: unknown key {key!r}; valid keys: {', '.join(types)}")
        section, name = key.split(".")
        value = _check_type(key, value, types[key])
        sections[section] = dataclasses.replace(sections[section], **{name: value})
    return Config(**sections)


def load_toml(path: str | os.PathLike, config: Config | None = None) -> Config:
    """Reads a TOML file of ``[section]`` tables over ``config`` (default: the defaults).

    Raises:
      FileNotFoundError: no such file.
      ValueError: invalid TOML, or an unknown table or key, or a value of the wrong type (the
        message names the file and the key).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{_NAME}: config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{_NAME}: {path!r} is not valid TOML: {err}") from None
    changes = {}
    for section, values in table.items():
        if not isinstance(values, dict):
            sections = [s.name for s in dataclasses.fields(Config)]
            raise ValueError(
                f"{_NAME}: {path!r}: unknown key {section!r} (top-level keys must be tables: "
                f"{', '.join(sections)})"
            )
        changes.update({f"{section}.{name}": value for name, value in values.items()})
    try:
        return override(Config() if config is None else config, changes)
    except ValueError as err:
        raise ValueError(f"{err} (in {path!r})") from None


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        flag = dict(options())[key].metadata["flag"]
        raise ValueError(f"{_NAME}: {key} ({flag}) must be {rule}, got {value!r}")


def validate(config: Config) -> Config:
    """Checks every value's range; returns ``config`` unchanged.

    Raises:
      ValueError: the first bad value, named as ``section.field``.
    """
    d, t, c, r = config.data, config.train, config.compress, config.run
    for key, field in options():
        value = getattr(getattr(config, key.split(".")[0]), field.name)
        if base_type(field.type) == "float" and value is not None:
            _check(math.isfinite(value), key, "finite", value)
    k = t.steps_per_call
    batches = [("data.batch_size", d.batch_size), ("compress.batch_size", c.batch_size)]
    for key, value in [*batches, ("train.steps_per_call", k)]:
        _check(value >= 1, key, ">= 1", value)
    _check(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(0 <= d.degrees <= 180, "data.degrees", "in [0, 180]", d.degrees)
    _check(0 <= d.translate < 1, "data.translate", "in [0, 1)", d.translate)
    for key, value in [
        ("train.steps", t.steps),
        ("compress.prune_steps", c.prune_steps),
        ("compress.qat_steps", c.qat_steps),
        ("run.checkpoint_every", r.checkpoint_every),
    ]:
        _check(
            value >= k and value % k == 0, key, f"a positive multiple of steps_per_call={k}", value
        )
    # Every stage keeps tau gradients in flight (tau copies of the parameters), and a stage no
    # longer than tau would apply none of its updates.
    shortest = min(t.steps, c.prune_steps, c.qat_steps)
    _check(
        0 <= t.tau <= min(MAX_TAU, shortest - 1),
        "train.tau",
        f"in 0..{MAX_TAU} and shorter than every stage ({shortest} steps)",
        t.tau,
    )
    for key, value in [("train.lr", t.lr), ("compress.prune_lr", c.prune_lr)]:
        _check(value > 0, key, "> 0", value)
    _check(c.qat_lr > 0, "compress.qat_lr", "> 0", c.qat_lr)
    _check(t.lam is None or t.lam >= 0, "train.lam", ">= 0", t.lam)
    _check(
        t.compensation in COMPENSATIONS,
        "train.compensation",
        f"one of {COMPENSATIONS}",
        t.compensation,
    )
    for name in ("sparsity", "conv_sparsity", "output_sparsity"):
        value = getattr(c, name)
        _check(0 <= value < 1, f"compress.{name}", "in [0, 1)", value)
    for name in ("clusters", "bias_clusters"):
        value = getattr(c, name)
        _check(2 <= value <= 256, f"compress.{name}", "in 2..256", value)
    for name in ("bits", "act_bits"):
        value = getattr(c, name)
        _check(2 <= value <= 8, f"compress.{name}", "in 2..8 (integer inference)", value)
    _check(bool(r.output), "run.output", "a non-empty path", r.output)
    # jax.random.key keeps 32 bits of the seed (without x64): larger seeds would alias.
    _check(0 <= r.seed <= MAX_SEED, "run.seed", f"in 0..{MAX_SEED}", r.seed)
    _check(r.devices >= 1, "run.devices", ">= 1", r.devices)
    _check(
        d.num_classes is None or 2 <= d.num_classes <= MAX_CLASSES,
        "data.num_classes",
        f"in 2..{MAX_CLASSES}",
        d.num_classes,
    )
    for key, value in batches:
        _check(value % r.devices == 0, key, f"divisible by devices={r.devices}", value)
    return config


def as_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The configuration as nested plain dicts (JSON- and TOML-able)."""
    return dataclasses.asdict(config)
