"""One stage of ``mixjax run``: a train step run to its last step, checkpointed and resumable.

:func:`run_stage` builds a stage's jitted step (data-parallel over ``run.devices`` devices),
its initial state (checking first, where values exist, that the parameters it starts from are
finite), trains it with ``steps_per_call`` steps per dispatch, checkpoints it every
``checkpoint_every`` steps and at its end (:mod:`mixjax.checkpoint`, under
``<output>/checkpoints/<stage>``), resumes from its latest checkpoint when asked, and evaluates
the result on the test set. Step ``t`` of a stage reads the ``t``-th batch of a data order fixed
by ``(seed, stage)`` and draws its randomness from ``fold_in(rng, t)``, so an interrupted and
resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from mixjax import checkpoint, data, parallel, select, train
from mixjax.app import config as config_lib
from mixjax.core import ParamTransform

__all__ = ["STAGES", "Result", "Run", "Stage", "Stopped", "log", "run_stage", "write_json"]

STAGES = ("float", "prune", "qat")


class Stopped(Exception):  # noqa: N818 - a normal outcome, not an error
    """Raised when ``stop_after`` steps are done (a checkpoint was written)."""


class Run(NamedTuple):
    """What every stage of one run shares.

    Attributes:
      cfg: the validated configuration.
      train_set: the training split.
      test_set: the test split.
      rng: the base key of every stage's randomness.
      mesh: the data-parallel mesh, ``None`` on one device.
      resume: continue each stage from its latest checkpoint.
      progress: show progress bars.
      quiet: no log lines.
      stop_after: stop once this many steps of all stages together are done, or ``None``.
    """

    cfg: config_lib.Config
    train_set: data.Dataset
    test_set: data.Dataset
    rng: jax.Array
    mesh: Any
    resume: bool
    progress: bool
    quiet: bool
    stop_after: int | None


class Stage(NamedTuple):
    """One stage: its name, length, batch, model, optimizer and compression.

    Attributes:
      name: one of :data:`STAGES`.
      steps: its number of steps.
      offset: the steps of the stages before it.
      batch_size: examples per step.
      apply_fn: the model (:class:`mixjax.train.ApplyFn`).
      tx: the optimizer.
      transform: the compression transform.
      augment: the augmentation, or ``None``.
    """

    name: str
    steps: int
    offset: int
    batch_size: int
    apply_fn: train.ApplyFn
    tx: optax.GradientTransformation
    transform: ParamTransform
    augment: Callable | None


class Result(NamedTuple):
    """What :func:`run_stage` returns.

    Attributes:
      state: the final train state.
      history: per step, ``{"step", "loss", "accuracy"}`` of the training batches.
      steps_per_second: the training speed after the first (compiling) call, or ``None``.
      accuracy: test accuracy of the final state.
      seconds: the stage's wall time.
    """

    state: train.TrainState
    history: list[dict[str, float]]
    steps_per_second: float | None
    accuracy: float
    seconds: float


def log(quiet: bool, message: str) -> None:
    """``mixjax: message`` on stderr, unless ``quiet``."""
    if not quiet:
        print(f"mixjax: {message}", file=sys.stderr, flush=True)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (a temporary file, then ``os.replace``)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _check_finite(stage: str, params: Any) -> None:
    """Raises ``ValueError`` naming the first leaf of ``params`` that holds NaN/Inf."""
    for path, leaf in select.leaves_with_paths(jax.device_get(params)):
        bad = int(np.size(leaf) - np.isfinite(np.asarray(leaf, np.float32)).sum())
        if bad:
            raise ValueError(
                f"mixjax.app.pipeline: the {stage} stage starts from non-finite parameters: "
                f"{select.describe(path, leaf)} holds {bad} NaN/Inf values (the stage before "
                "it diverged; lower its learning rate)"
            )


def _init_state(stage: Stage, params, key, model_state) -> train.TrainState:
    """:func:`mixjax.train.init_train_state` as one compiled program (k-means and mask
    initialization would otherwise compile op by op)."""
    init = lambda p, k, m: train.init_train_state(  # noqa: E731
        p, stage.tx, key=k, transform=stage.transform, model_state=m
    )
    return jax.jit(init)(params, key, model_state)


def _restore(directory: str, like: train.TrainState, resume: bool) -> train.TrainState:
    step = checkpoint.latest_step(directory) if resume and os.path.isdir(directory) else None
    return like if step is None else checkpoint.restore(directory, like, step=step)


def _train(run: Run, stage: Stage, state: train.TrainState, step: Callable) -> tuple:
    """Runs ``stage`` from ``state`` (or its latest checkpoint, resuming) to its last step;
    returns (state, history, steps per second)."""
    cfg, k = run.cfg, run.cfg.train.steps_per_call
    every, stop_after = cfg.run.checkpoint_every, run.stop_after
    directory = os.path.join(cfg.run.output, "checkpoints", stage.name)
    history_path = directory + ".history.json"
    state = _restore(directory, state, run.resume)
    start = int(state.step)
    history = []
    if start and os.path.exists(history_path):
        with open(history_path) as f:
            history = [h for h in json.load(f) if h["step"] <= start]
    seed = cfg.run.seed * len(STAGES) + STAGES.index(stage.name)
    groups = data.stacked_batches(run.train_set, stage.batch_size, k, seed=seed, epochs=None)
    bar = tqdm(
        total=stage.steps,
        initial=start,
        desc=stage.name,
        unit="step",
        file=sys.stderr,
        disable=not run.progress,
        leave=False,
        dynamic_ncols=True,
    )
    pending, t, timed_from, timed_steps = [], start, None, 0

    def flush():
        for m in jax.device_get(pending):
            first = history[-1]["step"] if history else 0
            for j in range(k):
                history.append(
                    {
                        "step": first + j + 1,
                        "loss": float(np.reshape(m["loss"], -1)[j]),
                        "accuracy": float(np.reshape(m["accuracy"], -1)[j]),
                    }
                )
        pending.clear()

    for group in itertools.islice(groups, start // k, stage.steps // k):
        if stop_after is not None and stage.offset + t >= stop_after:
            bar.close()
            raise Stopped(f"stopped after {stop_after} steps; continue with --resume")
        batch = group if k > 1 else {key: v[0] for key, v in group.items()}
        state, metrics = step(state, batch)
        pending.append(metrics)
        t += k
        if timed_from is None:  # the first call compiles: time from its end
            jax.block_until_ready(metrics)
            timed_from = time.perf_counter()
        else:
            timed_steps += k
        bar.update(k)
        if len(pending) > 1:
            bar.set_postfix(loss=f"{float(np.mean(pending[-2]['loss'])):.3f}", refresh=False)
        stopping = stop_after is not None and stage.offset + t >= stop_after
        if t % every == 0 or t == stage.steps or stopping:
            flush()
            checkpoint.save(directory, state, step=t)
            write_json(history_path, history)
    flush()
    bar.close()
    jax.block_until_ready(state)
    rate = timed_steps / (time.perf_counter() - timed_from) if timed_steps else None
    return state, history, rate


def run_stage(run: Run, stage: Stage, params: Any, model_state: Any = None) -> Result:
    """Trains ``stage`` from ``params`` to its last step and evaluates it (module docstring).

    Raises:
      ValueError: ``params`` hold NaN/Inf (the stage before diverged).
      Stopped: ``run.stop_after`` steps are done.
    """
    tick = time.perf_counter()
    _check_finite(stage.name, params)
    kwargs = dict(transform=stage.transform, preprocess=data.normalize)
    k = run.cfg.train.steps_per_call
    step = train.make_train_step(
        stage.apply_fn, stage.tx, augment=stage.augment, steps_per_call=k, **kwargs
    )
    if run.mesh is not None:
        step = parallel.data_parallel(step, run.mesh)
    state = _init_state(stage, params, run.rng, model_state)
    jax.block_until_ready(state)
    log(run.quiet, f"{stage.name}: initial state in {time.perf_counter() - tick:.1f} s")
    state, history, rate = _train(run, stage, state, step)
    evaluate = train.make_eval_step(stage.apply_fn, **kwargs)
    batch = {"image": run.test_set.images, "label": run.test_set.labels}
    accuracy = float(evaluate(state, batch)["accuracy"])
    seconds = time.perf_counter() - tick
    log(
        run.quiet,
        f"{stage.name}: {stage.steps} steps, test accuracy {accuracy:.2%} ({seconds:.1f} s)",
    )
    return Result(state, history, rate, accuracy, seconds)
