"""The configuration of ``mixjax run``: built from defaults, a TOML file and options, checked.

The sections and their fields (each with its flag and help text) are the frozen dataclasses of
:mod:`mixjax.app.settings`, re-exported here. A TOML file uses the section names as tables::

    [train]
    steps = 2000
    tau = 2

    [compress]
    clusters = 8

The dataclass defaults are the image task's; :func:`defaults` gives a task's
(``defaults("lm")`` replaces the keys of :data:`LM_DEFAULTS`). :func:`load` builds a run's
configuration: the defaults of its task (``data.task`` of the changes or the file), then the TOML
file, then the changes (the command-line options). :func:`load_toml` reads such a file over a
configuration (an unknown table or key is an error that names it), :func:`override` applies
``{"section.field": value}`` changes, and :func:`validate` checks every value once, before
anything runs, including the combinations a task allows (:data:`IMAGE_ONLY`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixjax import _checks, models
from mixjax.app.settings import (
    COMPENSATIONS,
    IMAGE_ONLY,
    LM_DEFAULTS,
    MODEL_DEFAULTS,
    Compress,
    Config,
    Data,
    Model,
    Run,
    Train,
    base_type,
    options,
)
from mixjax.data.loaders import MAX_CLASSES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MAX_SEED = 2**32 - 1
MAX_TAU = 1024
_NAME = "mixjax.app.config"

__all__ = [
    "COMPENSATIONS",
    "IMAGE_ONLY",
    "LM_DEFAULTS",
    "MAX_SEED",
    "MODEL_DEFAULTS",
    "MAX_TAU",
    "Compress",
    "Config",
    "Data",
    "Model",
    "Run",
    "Train",
    "as_dict",
    "base_type",
    "defaults",
    "load",
    "load_toml",
    "model_sizes",
    "options",
    "override",
    "validate",
]


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


def _read_toml(path: str) -> dict[str, Any]:
    """The ``{"section.field": value}`` changes of a TOML file (values not checked yet)."""
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
    return changes


def _over(config: Config, changes: Mapping[str, Any], path: str) -> Config:
    try:
        return override(config, changes)
    except ValueError as err:
        raise ValueError(f"{err} (in {path!r})") from None


def load_toml(path: str | os.PathLike, config: Config | None = None) -> Config:
    """Reads a TOML file of ``[section]`` tables over ``config`` (default: the defaults).

    Raises:
      FileNotFoundError: no such file.
      ValueError: invalid TOML, or an unknown table or key, or a value of the wrong type (the
        message names the file and the key).
    """
    path = os.fspath(path)
    return _over(Config() if config is None else config, _read_toml(path), path)


def defaults(task: str = "image", model: str | None = None) -> Config:
    """The defaults of a task: the dataclass defaults for ``"image"``, with
    :data:`LM_DEFAULTS` for ``"lm"``; then ``model``'s recipe (:data:`MODEL_DEFAULTS`) with
    ``train.model = model`` (``None``: the task's default model and its recipe).

    Raises:
      ValueError: an unknown task.
    """
    _check(task in models.TASKS, "data.task", f"one of {models.TASKS}", task)
    config = Config() if task == "image" else override(Config(), LM_DEFAULTS)
    model = config.train.model if model is None else model
    return override(config, {"train.model": model, **MODEL_DEFAULTS.get(model, {})})


def load(path: str | os.PathLike | None, changes: Mapping[str, Any]) -> Config:
    """A run's configuration (not validated): the :func:`defaults` of its task and model, then
    the TOML file at ``path`` (if not ``None``), then ``changes`` (``{"section.field": value}``,
    the command-line options). The task (and the model) is ``changes``' ``"data.task"``
    (``"train.model"``), else the file's, else the default.

    Raises:
      FileNotFoundError / ValueError: as :func:`load_toml` and :func:`override`; an unknown
        task.
    """
    path = None if path is None else os.fspath(path)
    table = {} if path is None else _read_toml(path)
    task = changes.get("data.task", table.get("data.task", "image"))
    model = changes.get("train.model", table.get("train.model"))
    model = None if model is None else _check_type("train.model", model, "str")
    config = defaults(_check_type("data.task", task, "str"), model)
    return override(config if path is None else _over(config, table, path), changes)


def model_sizes(config: Config) -> dict[str, int]:
    """The sizes the ``[model]`` section sets (the unset ones are left to the model)."""
    values = dataclasses.asdict(config.model)
    return {name: value for name, value in values.items() if value is not None}


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        flag = dict(options())[key].metadata["flag"]
        raise ValueError(f"{_NAME}: {key} ({flag}) must be {rule}, got {value!r}")


def _names(task: str) -> str:
    return ", ".join(n for n, info in sorted(models.MODELS.items()) if info.task == task)


def _check_task(config: Config) -> None:
    """The model and dataset fit the task; image-only settings are left alone for ``"lm"``."""
    d, t = config.data, config.train
    _check(d.task in models.TASKS, "data.task", f"one of {models.TASKS}", d.task)
    _check(t.model in models.MODELS, "train.model", f"one of {sorted(models.MODELS)}", t.model)
    model_task = models.MODELS[t.model].task
    text = d.dataset.startswith("text:")
    if d.task == "lm":
        _check(model_task == "lm", "train.model", f"a language model ({_names('lm')})", t.model)
        _check(text, "data.dataset", "'text:FILE' for --task lm", d.dataset)
        image = defaults("image")
        for key in IMAGE_ONLY:
            section, name = key.split(".")
            value = getattr(getattr(config, section), name)
            default = getattr(getattr(image, section), name)
            _check(
                value == default,
                key,
                f"left at its default {default!r} with --task lm (only the image pipeline "
                "reads it)",
                value,
            )
        return
    _check(
        model_task == "image",
        "train.model",
        f"an image model ({_names('image')}) for --task image (--task lm trains {_names('lm')})",
        t.model,
    )
    _check(
        not text,
        "data.dataset",
        "an image dataset for --task image (a text corpus trains a language model: --task lm)",
        d.dataset,
    )


def _check_sizes(config: Config) -> None:
    name = config.train.model
    takes = models.MODELS[name].sizes
    for size, value in dataclasses.asdict(config.model).items():
        key = f"model.{size}"
        if value is not None:
            _check(value >= 1, key, ">= 1", value)
            _check(
                size in takes,
                key,
                f"unset for model {name!r} (its sizes: {', '.join(takes) or 'none'})",
                value,
            )
    sizes = model_sizes(config)
    try:
        models.create(name, 2, **sizes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{_NAME}: the sizes {sizes} do not fit model {name!r}: {err}") from None


def validate(config: Config) -> Config:
    """Checks every value's range and the task's combinations; returns ``config`` unchanged.

    Raises:
      ValueError: the first bad value, named as ``section.field``: a model or dataset of
        another task, an image-only setting changed with ``--task lm``, a size the model does
        not take or sizes it refuses.
    """
    d, t, c, r = config.data, config.train, config.compress, config.run
    for key, field in options():
        value = getattr(getattr(config, key.split(".")[0]), field.name)
        if base_type(field.type) == "float" and value is not None:
            _check(math.isfinite(value), key, "finite", value)
    _check_task(config)
    _check_sizes(config)
    k = t.steps_per_call
    batches = [("data.batch_size", d.batch_size), ("compress.batch_size", c.batch_size)]
    for key, value in [*batches, ("train.steps_per_call", k)]:
        _check(value >= 1, key, ">= 1", value)
    _check(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _check(0 <= d.degrees <= 180, "data.degrees", "in [0, 180]", d.degrees)
    _check(0 <= d.translate < 1, "data.translate", "in [0, 1)", d.translate)
    # The language-model pipeline has no qat stage (its weights are quantized after training).
    lengths = [("train.steps", t.steps), ("compress.prune_steps", c.prune_steps)]
    if d.task == "image":
        lengths.append(("compress.qat_steps", c.qat_steps))
    for key, value in [*lengths, ("run.checkpoint_every", r.checkpoint_every)]:
        _check(
            value >= k and value % k == 0, key, f"a positive multiple of steps_per_call={k}", value
        )
    # Every stage keeps tau gradients in flight (tau copies of the parameters), and a stage no
    # longer than tau would apply none of its updates.
    shortest = min(value for _, value in lengths)
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
