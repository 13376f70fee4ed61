"""What the image and language-model pipelines of ``mixjax run`` share.

The delayed-gradient optimizer of every stage, the data-parallel mesh, the model (built by name
with the configured sizes, initialized into parameters and model state), the float32 size of a
model, the output directory's preparation and the report's last entries (timings, resumes,
environment), written as ``report.json``. :mod:`mixjax.app.pipeline` (images) and
:mod:`mixjax.app.lm` (text) put them together.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax

from mixjax import delay, export, models, parallel, train
from mixjax.app import config as config_lib
from mixjax.app import rundir
from mixjax.app.rundir import ARTIFACT, CHECKPOINTS, REPORT, write_json
from mixjax.app.stages import Result, log
from mixjax.export.report import row_dict

__all__ = [
    "Clock",
    "Model",
    "build_model",
    "clock",
    "dense_bytes",
    "environment",
    "finish",
    "float_optimizer",
    "forward",
    "mesh",
    "optimizer",
    "prepare",
    "report",
]

_NAME = "mixjax.app.pipeline"


class Clock(NamedTuple):
    """When a run began: ``time.perf_counter()`` and ``os.getloadavg()`` then."""

    began: float
    loadavg: list[float]


def clock() -> Clock:
    """The :class:`Clock` of a run beginning now."""
    return Clock(time.perf_counter(), list(os.getloadavg()))


class Model(NamedTuple):
    """The run's model, initialized.

    Attributes:
      module: the linen module (:func:`mixjax.models.create`).
      apply_fn: its :class:`mixjax.train.ApplyFn` (training behaviour switched by the model's
        ``train_kwarg``: BatchNorm statistics, dropout).
      sizes: every size of the model (:attr:`mixjax.models.ModelInfo.sizes`), the configured
        ones and the defaults: what rebuilds it from an artifact's metadata.
      params: the initial parameters.
      model_state: the model's other variables (``{"batch_stats": ...}``; ``{}`` for none).
    """

    module: nn.Module
    apply_fn: train.ApplyFn
    sizes: dict[str, int]
    params: Any
    model_state: dict[str, Any]


def build_model(cfg: config_lib.Config, outputs: int, key: jax.Array, sample: Any) -> Model:
    """``cfg.train.model`` with ``outputs`` logits and the sizes of ``cfg.model``, initialized
    with ``key`` on the example input ``sample`` (one compiled program)."""
    info = models.MODELS[cfg.train.model]
    sizes = {**info.sizes, **config_lib.model_sizes(cfg)}
    module = models.create(cfg.train.model, outputs, **sizes)
    variables = dict(jax.jit(module.init)(key, sample))
    params = variables.pop("params")
    apply_fn = train.linen_apply(module, train_kwarg=info.train_kwarg)
    return Model(module, apply_fn, sizes, params, variables)


def forward(module: nn.Module, model_state: Any) -> Callable[[Any, Any], Any]:
    """``(params, x) -> logits`` of ``module`` in evaluation, with ``model_state`` fixed: the
    forward :func:`mixjax.layout.learn` and the output-layer probe trace."""
    return lambda params, x: module.apply({"params": params, **model_state}, x)


def dense_bytes(params: Any, model_state: Any = None) -> int:
    """The bytes of ``params`` and ``model_state`` as float32 (the dense baseline)."""
    leaves = jax.tree.leaves((params, model_state))
    return 4 * sum(int(np.size(leaf)) for leaf in leaves)


def optimizer(
    cfg: config_lib.Config, lr: Any, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """Adam (AdamW with ``weight_decay``) at ``lr``, its gradients ``cfg.train.tau`` steps
    stale with the configured delay compensation (:func:`mixjax.delay.delayed`)."""
    comp = None if cfg.train.compensation == "none" else cfg.train.compensation
    inner = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    return delay.delayed(inner, cfg.train.tau, compensation=comp, lam=cfg.train.lam)


def float_optimizer(cfg: config_lib.Config) -> optax.GradientTransformation:
    """The float stage's optimizer (both tasks): :func:`optimizer` at ``train.lr``
    cosine-decayed to 0 over ``train.steps``, with ``train.weight_decay``; what restores a float
    checkpoint (``mixjax compress``) builds it again."""
    lr = optax.cosine_decay_schedule(cfg.train.lr, cfg.train.steps, alpha=0.0)
    return optimizer(cfg, lr, cfg.train.weight_decay)


def mesh(devices: int) -> Any:
    """The data-parallel mesh of ``devices`` devices, or ``None`` for one device.

    Raises:
      ValueError: fewer devices are visible.
    """
    if devices > jax.device_count():
        raise ValueError(
            f"{_NAME}: run.devices (--devices) is {devices} but only "
            f"{jax.device_count()} {jax.default_backend()} device(s) are visible"
        )
    return None if devices == 1 else parallel.make_mesh(data=devices)


def environment() -> dict[str, Any]:
    """Where the run ran: Python, JAX, backend, platform, CPUs and the load average."""
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }


def prepare(
    cfg: config_lib.Config,
    plots: tuple[str, ...],
    stages: tuple[str, ...],
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    stop_after: int | None,
) -> dict[str, Any]:
    """:func:`mixjax.app.rundir.prepare` of ``cfg.run.output`` for a run writing the artifact,
    the report, ``plots`` and one checkpoint directory per stage of ``stages``; returns the run
    file."""
    return rundir.prepare(
        cfg.run.output,
        cfg,
        [ARTIFACT, REPORT, *plots, *(f"{CHECKPOINTS}/{s}" for s in stages)],
        resume=resume,
        overwrite=overwrite,
        extras={"quiet": quiet, "stop_after": stop_after},
        log=lambda message: log(quiet, message),
    )


def report(
    results: dict[str, Result],
    artifact: export.Artifact,
    bytes_dense: int,
    rows: list[tuple[str, dict[str, float], int]],
    tick: float,
) -> dict[str, Any]:
    """The report entries both pipelines write.

    Args:
      results: each stage's result, the float stage's under ``"float"``.
      artifact: the exported artifact (as loaded back).
      bytes_dense: the dense baseline (:func:`dense_bytes` of the float stage).
      rows: ``(stage, held-out metrics, bytes)`` of each step of the compression.
      tick: ``time.perf_counter()`` when the export began.

    Returns:
      ``bytes_dense``, ``bytes_compressed`` (the artifact file's bytes), ``compression_ratio``,
      ``train_steps_per_second`` (the float stage's), ``stages`` (``{"stage", metric: value,
      "bytes"}`` per row), ``layers`` and ``layers_markdown`` (the artifact's per-leaf table),
      ``history`` (per stage), ``artifact`` (its file name) and ``timings_s`` (per stage, and
      ``export_eval``).
    """
    table = export.table(artifact)
    timings = {name: r.seconds for name, r in results.items()}
    timings["export_eval"] = time.perf_counter() - tick
    return {
        "bytes_dense": bytes_dense,
        "bytes_compressed": artifact.nbytes,
        "compression_ratio": bytes_dense / artifact.nbytes,
        "train_steps_per_second": results["float"].steps_per_second,
        "stages": [{"stage": name, **scores, "bytes": b} for name, scores, b in rows],
        "layers": [row_dict(r) for r in table.rows],
        "layers_markdown": table.markdown,
        "history": {name: r.history for name, r in results.items()},
        "artifact": ARTIFACT,
        "timings_s": timings,
    }


def finish(
    cfg: config_lib.Config, report: dict[str, Any], run_file: dict[str, Any], start: Clock
) -> dict[str, Any]:
    """``report`` with the configuration, the run's resumes, its total time and the
    environment (the load average at the start too), written as ``report.json``; returns it."""
    report["config"] = config_lib.as_dict(cfg)
    report["resumes"] = run_file.get("resumes", [])
    report["timings_s"]["total"] = time.perf_counter() - start.began
    report["environment"] = {**environment(), "loadavg_start": start.loadavg}
    write_json(os.path.join(cfg.run.output, REPORT), report)
    return report
