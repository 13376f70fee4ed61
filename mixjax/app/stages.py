"""One stage of ``mixjax run``: a train step run to its last step, checkpointed and resumable.

:func:`run_stage` builds a stage's jitted step (data-parallel over ``run.devices`` devices),
its initial state (checking first, where values exist, that the parameters it starts from are
finite), trains it with ``steps_per_call`` steps per dispatch, checkpoints it every
``checkpoint_every`` steps and at its end (:mod:`mixjax.checkpoint`, under
``<output>/checkpoints/<stage>``), resumes from its latest checkpoint when asked, and scores
the result on the held-out split. Step ``t`` of a stage reads the ``t``-th batch of a data order
fixed by ``(seed, stage)`` and draws its randomness from ``fold_in(rng, t)``, so an interrupted
and resumed run ends with the same parameters as an uninterrupted one. The model state (batch
statistics) is part of the train state, so it trains, checkpoints and resumes with it.

What a stage reads and how it is scored is the run's :class:`Task`: :func:`image_task` (images
and labels, normalized; test accuracy and loss) or :func:`text_task` (next-token windows of a
character corpus; the exact validation loss, perplexity and next-token accuracy).
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from mixjax import checkpoint, data, parallel, select, train
from mixjax.app import config as config_lib
from mixjax.app import rundir
from mixjax.core import ParamTransform

__all__ = [
    "STAGES",
    "Result",
    "Run",
    "Stage",
    "Stopped",
    "Task",
    "image_task",
    "init_state",
    "log",
    "read_checkpoint",
    "run_stage",
    "text_task",
    "warn",
]

STAGES = ("float", "prune", "qat")
# Windows per batch of the validation pass of a text task (the pass covers every target once).
_EVAL_WINDOWS = 64
# The per-step metrics a stage records (its history), in the order its checkpoints store them.
_METRICS = ("loss", "accuracy")


class Stopped(Exception):  # noqa: N818 - a normal outcome, not an error
    """Raised when ``stop_after`` steps are done (a checkpoint was written)."""


class Task(NamedTuple):
    """What the stages of a run read and how they are scored.

    Attributes:
      batches: ``(batch_size, steps_per_call, seed) -> iterator`` of endless training batches,
        each stacked ``(steps_per_call, batch_size, ...)`` (:func:`mixjax.data.stacked_batches`
        or :func:`mixjax.data.stacked_lm_batches`), in an order fixed by ``seed``.
      score: ``(eval_step, state) -> {metric: float}``: the held-out metrics of a state, with an
        eval step of :func:`mixjax.train.make_eval_step` (``"loss"``, ``"accuracy"``; a text
        task adds ``"perplexity"``).
      preprocess: the input preprocessing of the train and eval steps, or ``None``.
      held_out: the name of the scored split, for the log (``"test"``, ``"val"``).
    """

    batches: Callable[[int, int, int], Iterator[dict[str, np.ndarray]]]
    score: Callable[[Callable, train.TrainState], dict[str, float]]
    preprocess: Callable | None
    held_out: str


def image_task(train_set: data.Dataset, test_set: data.Dataset) -> Task:
    """Images normalized by :func:`mixjax.data.normalize`, scored on the whole test split."""

    def batches(batch_size, steps, seed):
        return data.stacked_batches(train_set, batch_size, steps, seed=seed, epochs=None)

    def score(evaluate, state):
        batch = {"image": test_set.images, "label": test_set.labels}
        return {name: float(value) for name, value in evaluate(state, batch).items()}

    return Task(batches, score, data.normalize, "test")


def text_task(train_set: data.TextDataset, val_set: data.TextDataset, context: int) -> Task:
    """Next-token windows of ``context`` tokens, scored on every target of the validation split
    once (:func:`mixjax.data.lm_eval_batches`; batch means weighted by their targets)."""

    def batches(batch_size, steps, seed):
        return data.stacked_lm_batches(train_set, batch_size, context, steps, seed=seed)

    def score(evaluate, state):
        totals, weight = {"loss": 0.0, "accuracy": 0.0}, 0.0
        for batch in data.lm_eval_batches(val_set, _EVAL_WINDOWS, context):
            n = float(batch["weight"].sum())
            metrics = evaluate(state, batch)
            for name in totals:
                totals[name] += float(metrics[name]) * n
            weight += n
        scores = {name: total / weight for name, total in totals.items()}
        return {**scores, "perplexity": math.exp(scores["loss"])}

    return Task(batches, score, None, "val")


class Run(NamedTuple):
    """What every stage of one run shares.

    Attributes:
      cfg: the validated configuration.
      task: what the stages read and how they are scored.
      rng: the base key of every stage's randomness.
      mesh: the data-parallel mesh, ``None`` on one device.
      resume: continue each stage from its latest checkpoint.
      progress: show progress bars.
      quiet: no log lines.
      stop_after: stop once this many steps of all stages together are done, or ``None``.
    """

    cfg: config_lib.Config
    task: Task
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
      scores: the held-out metrics of the final state (:attr:`Task.score`).
      seconds: the stage's wall time.
    """

    state: train.TrainState
    history: list[dict[str, float]]
    steps_per_second: float | None
    scores: dict[str, float]
    seconds: float


def log(quiet: bool, message: str) -> None:
    """``mixjax: message`` on stderr, unless ``quiet``."""
    if not quiet:
        print(f"mixjax: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """``mixjax: warning: message`` on stderr, even when quiet."""
    print(f"mixjax: warning: {message}", file=sys.stderr, flush=True)


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


def init_state(stage: Stage, params, key, model_state) -> train.TrainState:
    """:func:`mixjax.train.init_train_state` as one compiled program (k-means and mask
    initialization would otherwise compile op by op)."""
    init = lambda p, k, m: train.init_train_state(  # noqa: E731
        p, stage.tx, key=k, transform=stage.transform, model_state=m
    )
    return jax.jit(init)(params, key, model_state)


def _history(saved: np.ndarray) -> list[dict[str, float]]:
    return [
        {"step": i + 1, "loss": float(loss), "accuracy": float(accuracy)}
        for i, (loss, accuracy) in enumerate(saved)
    ]


def _restore(run: Run, directory: str, like: train.TrainState) -> tuple[Any, list]:
    """The state and history of the stage's newest intact checkpoint (``like`` and ``[]``
    without one, or when not resuming); damaged checkpoints are renamed ``<step>.damaged``."""
    if not run.resume or not os.path.isdir(directory):
        return like, []
    for step in reversed(checkpoint.steps(directory)):
        try:
            return read_checkpoint(directory, like, step)
        except checkpoint.DamagedCheckpointError as err:
            aside = os.path.join(directory, f"{step}.damaged")
            os.replace(os.path.join(directory, str(step)), aside)
            warn(f"{err}; moved it to {aside!r} and resuming from the checkpoint before it")
    return like, []


def read_checkpoint(
    directory: str, like: train.TrainState, step: int
) -> tuple[train.TrainState, list[dict[str, float]]]:
    """The state and history of a stage's checkpoint of ``step`` in ``directory``.

    Args:
      directory: the stage's checkpoint directory (``<output>/checkpoints/<stage>``).
      like: a state of the stage's structure (:func:`init_state` of its ``Stage``).
      step: the checkpoint's step.

    Raises:
      ValueError: as :func:`mixjax.checkpoint.restore`: no checkpoint of ``step``, one that does
        not match ``like`` (the first differing leaf named), or a damaged one
        (:class:`mixjax.checkpoint.DamagedCheckpointError`).
    """
    target = {"state": like, "history": np.zeros((step, len(_METRICS)), np.float32)}
    saved = checkpoint.restore(directory, target, step=step)
    return saved["state"], _history(saved["history"])


def _check_losses(stage: str, directory: str, first: int, metrics: Any) -> None:
    """Raises if a loss of the steps ``first + 1, ...`` that ``metrics`` holds is not finite."""
    losses = np.reshape(metrics["loss"], -1)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        last = checkpoint.latest_step(directory) if os.path.isdir(directory) else None
        kept = "none was written" if last is None else f"the last is step {last} in {directory!r}"
        raise ValueError(
            f"mixjax.app.pipeline: the {stage} stage diverged: training loss {losses[bad[0]]} at "
            f"step {first + int(bad[0]) + 1} (stopped there; checkpoints hold only finite steps: "
            f"{kept}); lower its learning rate and start again with --overwrite"
        )


def _extend(history: list, metrics: Any, stage: str, directory: str) -> None:
    """Appends the steps of one call's (host) ``metrics`` to ``history``, checked finite."""
    _check_losses(stage, directory, len(history), metrics)
    values = {n: np.reshape(metrics[n], -1) for n in _METRICS}
    first = len(history)
    for j in range(len(values["loss"])):
        history.append({"step": first + j + 1, **{n: float(values[n][j]) for n in _METRICS}})


def _train(run: Run, stage: Stage, state: train.TrainState, step: Callable) -> tuple:
    """Runs ``stage`` from ``state`` (or its latest checkpoint, resuming) to its last step;
    returns (state, history, steps per second).

    A checkpoint holds the state and the history up to it (one commit), so a resumed stage's
    history is the uninterrupted one's whenever the run was killed. A non-finite training loss
    stops the stage before any checkpoint holds it."""
    cfg, k = run.cfg, run.cfg.train.steps_per_call
    every, stop_after = cfg.run.checkpoint_every, run.stop_after
    directory = os.path.join(cfg.run.output, rundir.CHECKPOINTS, stage.name)
    state, history = _restore(run, directory, state)
    start = int(state.step)
    seed = cfg.run.seed * len(STAGES) + STAGES.index(stage.name)
    groups = run.task.batches(stage.batch_size, k, seed)
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
    with bar:
        for group in itertools.islice(groups, start // k, stage.steps // k):
            if stop_after is not None and stage.offset + t >= stop_after:
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
            if len(pending) > 1:  # the call before this one is done: check it as this one runs
                previous = jax.device_get(pending[-2])
                _check_losses(
                    stage.name, directory, len(history) + (len(pending) - 2) * k, previous
                )
                bar.set_postfix(loss=f"{float(np.mean(previous['loss'])):.3f}", refresh=False)
            stopping = stop_after is not None and stage.offset + t >= stop_after
            if t % every == 0 or t == stage.steps or stopping:
                for metrics in jax.device_get(pending):
                    _extend(history, metrics, stage.name, directory)
                pending.clear()
                saved = [[h[n] for n in _METRICS] for h in history]
                saved = np.asarray(saved, np.float32).reshape(len(history), len(_METRICS))
                checkpoint.save(directory, {"state": state, "history": saved}, step=t)
    jax.block_until_ready(state)
    rate = timed_steps / (time.perf_counter() - timed_from) if timed_steps else None
    return state, history, rate


def run_stage(run: Run, stage: Stage, params: Any, model_state: Any = None) -> Result:
    """Trains ``stage`` from ``params`` to its last step and scores it (module docstring).

    Args:
      run: what the run's stages share.
      stage: this stage.
      params: the parameters it starts from.
      model_state: the model state it starts from (what ``stage.apply_fn`` takes and returns:
        a linen model's ``{"batch_stats": ...}``, ``{}`` or ``None`` for none); the result's
        ``state.model_state`` is the trained one.

    Raises:
      ValueError: ``params`` hold NaN/Inf (the stage before diverged).
      Stopped: ``run.stop_after`` steps are done.
    """
    tick = time.perf_counter()
    _check_finite(stage.name, params)
    kwargs = dict(transform=stage.transform, preprocess=run.task.preprocess)
    k = run.cfg.train.steps_per_call
    step = train.make_train_step(
        stage.apply_fn, stage.tx, augment=stage.augment, steps_per_call=k, **kwargs
    )
    if run.mesh is not None:
        step = parallel.data_parallel(step, run.mesh)
    state = init_state(stage, params, run.rng, model_state)
    jax.block_until_ready(state)
    log(run.quiet, f"{stage.name}: initial state in {time.perf_counter() - tick:.1f} s")
    state, history, rate = _train(run, stage, state, step)
    scores = run.task.score(train.make_eval_step(stage.apply_fn, **kwargs), state)
    seconds = time.perf_counter() - tick
    shown = ", ".join(
        f"{name} {value:.2%}" if name == "accuracy" else f"{name} {value:.4f}"
        for name, value in scores.items()
    )
    log(
        run.quiet,
        f"{stage.name}: {stage.steps} steps, {run.task.held_out} {shown} ({seconds:.1f} s)",
    )
    return Result(state, history, rate, scores, seconds)
