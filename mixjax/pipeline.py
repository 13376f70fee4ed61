"""The ``mixjax run`` pipeline as a library function: train, compress, export, evaluate, report.

:func:`run` executes three training stages on one dataset, each a :func:`mixjax.train` step
running ``steps_per_call`` steps per dispatch with delayed-gradient Adam (``tau`` steps stale,
DC-ASGD compensation):

1. ``float``: the dense model (AdamW, learning rate cosine-decayed to 0) with on-device
   augmentation (small random rotations and shifts, no flips), batches of ``data.batch_size``
   (128: on the digits, 64 left the float accuracy at 96.4-98.3 % across seeds, 128 at
   97.5-98.3 %); the compression stages below take batches of ``compress.batch_size``;
2. ``prune``: gradual magnitude pruning (Zhu & Gupta polynomial schedule reaching its final
   sparsity at 40% of the stage, per layer kind: hidden Dense, Conv, output Dense), then
   fine-tuning of the final masks with the learning rate decaying to zero (cosine);
3. ``qat``: masks frozen, weight clustering (fixed assignments, trained centroids, zeros kept),
   large biases clustered too, every leaf fake-quantized per tensor to ``bits`` (so the codebooks
   are integers) and layer inputs fake-quantized to ``act_bits`` (EMA observers) for the
   integer path.

Then it exports the compact artifact (``model.mjx``, Huffman-coded where smaller, with the
metadata ``mixjax eval`` needs), evaluates the float model, the artifact (its reconstructed
parameters, activations fake-quantized) and :mod:`mixjax.intinfer` integer inference, times the
integer path against the float forward, writes ``report.json`` and the PNG plots
(:mod:`mixjax.plots`) into the output directory, and returns the report.

Checkpoints (:mod:`mixjax.checkpoint`) go to ``<output>/checkpoints/<stage>`` every
``checkpoint_every`` steps and at each stage's end; with ``resume=True`` each stage continues
from its latest one. Step ``t`` of a stage reads the ``t``-th batch of a data order fixed by
``(seed, stage)`` and draws its randomness from ``fold_in(rng, t)``, so an interrupted and resumed
run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from mixjax import (
    activations,
    augment,
    checkpoint,
    core,
    data,
    delay,
    deploy,
    export,
    models,
    parallel,
    prune,
    quant,
    schedules,
    select,
    share,
    train,
)
from mixjax import config as config_lib

STAGES = ("float", "prune", "qat")
ARTIFACT = "model.mjx"
REPORT = "report.json"
# The sparsity ramp ends here (fraction of the stage); the final masks are then fine-tuned while
# the learning rate decays to zero (a gentle ramp and a decayed fine-tune lose the least).
_PRUNE_END = 0.4
_MASK_EVERY = 10


class Stopped(Exception):  # noqa: N818 - a normal outcome, not an error
    """Raised by :func:`run` when ``stop_after`` steps are done (a checkpoint was written)."""


class _Stage(NamedTuple):
    name: str
    state: train.TrainState
    step: Callable
    evaluate: Callable
    steps: int
    offset: int


def _log(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"mixjax: {message}", file=sys.stderr, flush=True)


def _tx(cfg: config_lib.Config, lr: Any, weight_decay: float = 0.0) -> optax.GradientTransformation:
    comp = None if cfg.train.compensation == "none" else cfg.train.compensation
    inner = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    return delay.delayed(inner, cfg.train.tau, compensation=comp, lam=cfg.train.lam)


def _pruning(cfg: config_lib.Config, params: Any) -> core.ParamTransform:
    """One magnitude pruner per layer kind (hidden Dense, Conv, output Dense)."""
    c = cfg.compress
    kernels = [(p, leaf) for p, leaf in select.leaves_with_paths(params) if leaf.ndim >= 2]
    dense = [p for p, leaf in kernels if leaf.ndim == 2]
    output = (
        {max(dense, key=lambda p: int(p.split("/")[-2].rsplit("_", 1)[-1]))} if dense else set()
    )
    groups = [
        ({p for p, leaf in kernels if leaf.ndim == 2} - output, c.sparsity),
        ({p for p, leaf in kernels if leaf.ndim > 2}, c.conv_sparsity),
        (output, c.output_sparsity),
    ]
    end = max(_MASK_EVERY + 1, int(c.prune_steps * _PRUNE_END))
    pruners = [
        prune.magnitude(
            schedules.polynomial(0.0, sparsity, 0, end, frequency=_MASK_EVERY),
            where=lambda path, leaf, paths=paths: path in paths,
            update_every=_MASK_EVERY,
        )
        for paths, sparsity in groups
        if paths and sparsity > 0
    ]
    return core.chain(*pruners)


def _frozen(transform: core.ParamTransform, state: Any) -> core.ParamTransform:
    """``transform`` held at ``state``: ``init`` returns it, ``update`` keeps it."""
    return transform._replace(init=lambda params: state, update=lambda p, s, step, **kw: s)


def _compression(cfg: config_lib.Config, pruning, prune_state, params) -> core.ParamTransform:
    c = cfg.compress
    view = pruning.apply(params, prune_state)
    biases = [
        p
        for p, leaf in select.leaves_with_paths(view)
        if p.endswith("bias") and leaf.size > c.bias_clusters
    ]
    parts = [_frozen(pruning, prune_state), share.cluster(c.clusters, preserve_sparsity=True)]
    if biases:
        parts.append(
            share.cluster(
                c.bias_clusters, preserve_sparsity=False, where=lambda p, leaf: p in biases
            )
        )
    parts.append(quant.fake_quant(c.bits, per_channel=False, where=".*"))
    return core.chain(*parts)


def _qat_apply(model, act: activations.ActivationQuant) -> train.ApplyFn:
    base = train.linen_apply(model)

    def apply(params, act_state, images, *, train, key):
        fn = lambda x: base(params, None, x, train=train, key=key)[0]  # noqa: E731
        return act.apply(fn, act_state, images, mode="train" if train else "eval")

    return apply


def _stage(name, apply_fn, tx, transform, state, augmenter, k, steps, offset, mesh) -> _Stage:
    kwargs = dict(transform=transform, preprocess=data.normalize)
    step = train.make_train_step(apply_fn, tx, augment=augmenter, steps_per_call=k, **kwargs)
    if mesh is not None:
        step = parallel.data_parallel(step, mesh, steps_per_call=k)
    return _Stage(name, state, step, train.make_eval_step(apply_fn, **kwargs), steps, offset)


def _mesh(devices: int) -> Any:
    """The data-parallel mesh of ``devices`` devices, or ``None`` for one device."""
    if devices > jax.device_count():
        raise ValueError(
            f"mixjax.pipeline: run.devices (--devices) is {devices} but only "
            f"{jax.device_count()} {jax.default_backend()} device(s) are visible"
        )
    return None if devices == 1 else parallel.make_mesh(data=devices)


def _init_state(params, tx, key, transform, model_state=None) -> train.TrainState:
    """:func:`mixjax.train.init_train_state` as one compiled program (k-means and mask
    initialization would otherwise compile op by op)."""
    init = lambda p, k, m: train.init_train_state(  # noqa: E731
        p, tx, key=k, transform=transform, model_state=m
    )
    return jax.jit(init)(params, key, model_state)


def _restore(directory: str, like: train.TrainState, resume: bool) -> train.TrainState:
    step = checkpoint.latest_step(directory) if resume and os.path.isdir(directory) else None
    return like if step is None else checkpoint.restore(directory, like, step=step)


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def _train(stage: _Stage, cfg, train_set, *, resume, progress, stop_after, out) -> tuple:
    """Runs ``stage`` to its last step; returns (state, history, steps per second)."""
    k, every = cfg.train.steps_per_call, cfg.run.checkpoint_every
    directory = os.path.join(out, "checkpoints", stage.name)
    history_path = directory + ".history.json"
    state = _restore(directory, stage.state, resume)
    start = int(state.step)
    history = []
    if start and os.path.exists(history_path):
        with open(history_path) as f:
            history = [h for h in json.load(f) if h["step"] <= start]
    seed = cfg.run.seed * len(STAGES) + STAGES.index(stage.name)
    batch = cfg.data.batch_size if stage.name == "float" else cfg.compress.batch_size
    groups = data.stacked_batches(train_set, batch, k, seed=seed, epochs=None)
    bar = tqdm(
        total=stage.steps,
        initial=start,
        desc=stage.name,
        unit="step",
        file=sys.stderr,
        disable=not progress,
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
        state, metrics = stage.step(state, batch)
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
            _write_json(history_path, history)
    flush()
    bar.close()
    jax.block_until_ready(state)
    rate = timed_steps / (time.perf_counter() - timed_from) if timed_steps else None
    return state, history, rate


def _accuracy(stage: _Stage, state: train.TrainState, test_set: data.Dataset) -> float:
    batch = {"image": test_set.images, "label": test_set.labels}
    return float(stage.evaluate(state, batch)["accuracy"])


def _artifact(state, transform, model_name, act, num_classes, input_shape) -> export.Artifact:
    artifact = export.compress(state.params, transform, state.transform_state, container="compact")
    metadata = deploy.metadata(model_name, num_classes, input_shape, act, state.model_state)
    return dataclasses.replace(artifact, metadata=metadata)


def _environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }


def run(
    cfg: config_lib.Config,
    *,
    resume: bool = False,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Runs the whole pipeline (module docstring) and returns the report it writes.

    Args:
      cfg: the configuration (validated here).
      resume: continue each stage from its latest checkpoint in ``cfg.run.output``; else
        existing checkpoints there are removed first.
      progress: tqdm progress bars on stderr.
      quiet: no log lines on stderr.
      stop_after: stop (raising :class:`Stopped`, after writing a checkpoint) once this many
        steps of all stages together are done; for interrupting a run on purpose.

    Returns:
      The report (see ``report.json``): accuracies, bytes, ratio, speeds, the per-layer table,
      the per-stage accuracy and bytes, the configuration, timings and the environment.

    Raises:
      ValueError / FileNotFoundError: a bad configuration or dataset.
      Stopped: ``stop_after`` was reached.
    """
    config_lib.validate(cfg)
    began = time.perf_counter()
    load_start = list(os.getloadavg())
    out, rc, c = cfg.run.output, cfg.run, cfg.compress
    train_set, test_set = data.load(cfg.data.dataset, "train"), data.load(cfg.data.dataset, "test")
    num_classes = max(train_set.num_classes, test_set.num_classes)
    os.makedirs(out, exist_ok=True)
    if not resume:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    _log(
        quiet,
        f"{cfg.data.dataset}: {len(train_set.labels)} train / {len(test_set.labels)} test "
        f"images {train_set.images.shape[1:]}, {num_classes} classes; model {cfg.train.model}",
    )
    model = models.create(cfg.train.model, num_classes)
    init_key, rng = jax.random.split(jax.random.key(rc.seed))
    sample = data.normalize(train_set.images[:1])
    params = jax.jit(model.init)(init_key, sample)["params"]
    augmenter = augment.chain(
        augment.random_affine(degrees=cfg.data.degrees, translate=cfg.data.translate)
    )
    apply_fn = train.linen_apply(model)
    steps = (cfg.train.steps, c.prune_steps, c.qat_steps)
    k, mesh = cfg.train.steps_per_call, _mesh(rc.devices)
    offsets = np.cumsum((0,) + steps).tolist()
    go = dict(resume=resume, progress=progress and not quiet, stop_after=stop_after, out=out)
    histories, timings, accuracy = {}, {}, {}

    def finish(stage, state, history):
        histories[stage.name] = history
        accuracy[stage.name] = _accuracy(stage, state, test_set)
        _log(
            quiet,
            f"{stage.name}: {stage.steps} steps, test accuracy {accuracy[stage.name]:.2%} "
            f"({timings[stage.name]:.1f} s)",
        )

    # 1. float
    tick = time.perf_counter()
    lr = optax.cosine_decay_schedule(cfg.train.lr, cfg.train.steps, alpha=0.0)
    tx = _tx(cfg, lr, cfg.train.weight_decay)
    identity = core.identity()
    state = _init_state(params, tx, rng, identity)
    stage = _stage("float", apply_fn, tx, identity, state, augmenter, k, steps[0], offsets[0], mesh)
    state, history, rate = _train(stage, cfg, train_set, **go)
    float_params = jax.device_get(state.params)
    timings["float"] = time.perf_counter() - tick
    finish(stage, state, history)

    # 2. prune
    tick = time.perf_counter()
    ramp = max(1, int(c.prune_steps * _PRUNE_END))
    lr = optax.join_schedules(
        [
            optax.constant_schedule(c.prune_lr),
            optax.cosine_decay_schedule(c.prune_lr, max(1, c.prune_steps - ramp)),
        ],
        [ramp],
    )
    pruning, tx = _pruning(cfg, state.params), _tx(cfg, lr)
    state = _init_state(state.params, tx, rng, pruning)
    # The compression stages fine-tune without augmentation: on the 8x8 digits, augmenting
    # while pruning cost 1-2 points (pruned accuracy 96.1-96.4 % with it, 97.5-98.3 % without).
    stage = _stage("prune", apply_fn, tx, pruning, state, None, k, steps[1], offsets[1], mesh)
    state, history, _ = _train(stage, cfg, train_set, **go)
    timings["prune"] = time.perf_counter() - tick
    finish(stage, state, history)
    pruned = export.compress(state.params, pruning, state.transform_state, container="compact")

    # 3. cluster + QAT (weights and activations)
    tick = time.perf_counter()
    transform = _compression(cfg, pruning, state.transform_state, state.params)
    act = activations.fake_quant(c.act_bits)
    act_state = act.init(lambda x: model.apply({"params": state.params}, x), sample)
    tx, qat_apply = _tx(cfg, c.qat_lr), _qat_apply(model, act)
    _log(quiet, f"qat: k-means clustering of the pruned kernels into {c.clusters} values ...")
    clustering = time.perf_counter()
    state = _init_state(state.params, tx, rng, transform, act_state)
    _log(quiet, f"qat: clustered in {time.perf_counter() - clustering:.1f} s (compile included)")
    stage = _stage("qat", qat_apply, tx, transform, state, None, k, steps[2], offsets[2], mesh)
    state, history, _ = _train(stage, cfg, train_set, **go)
    timings["qat"] = time.perf_counter() - tick
    finish(stage, state, history)

    # 4. export and evaluate
    tick = time.perf_counter()
    artifact = _artifact(state, transform, cfg.train.model, act, num_classes, sample.shape[1:])
    path = artifact.save(os.path.join(out, ARTIFACT))
    loaded = export.load(path)
    fns = deploy.forwards(loaded)
    scores = deploy.evaluate(loaded, test_set, fns=fns)
    speed = deploy.time_integer(fns, test_set.images)
    table = loaded.table()
    timings["export_eval"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - began
    bytes_dense = 4 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(float_params))
    report = {
        "accuracy_float": accuracy["float"],
        "accuracy_pruned": accuracy["prune"],
        "accuracy_compressed": scores["accuracy_compressed"],
        "accuracy_integer": scores["accuracy_integer"],
        "bytes_dense": bytes_dense,
        "bytes_compressed": loaded.nbytes,
        "compression_ratio": bytes_dense / loaded.nbytes,
        "train_steps_per_second": rate,
        "inference_speedup_integer": speed["speedup"],
        "inference_ms": {"float": speed["float_ms"], "integer": speed["integer_ms"]},
        "stages": [
            {"stage": "dense", "accuracy": accuracy["float"], "bytes": bytes_dense},
            {"stage": "pruned", "accuracy": accuracy["prune"], "bytes": pruned.nbytes},
            {
                "stage": "compressed",
                "accuracy": scores["accuracy_compressed"],
                "bytes": loaded.nbytes,
            },
            {"stage": "integer", "accuracy": scores["accuracy_integer"], "bytes": loaded.nbytes},
        ],
        "layers": [deploy.row_dict(r) for r in table.rows],
        "layers_markdown": table.markdown,
        "history": histories,
        "artifact": ARTIFACT,
        "config": config_lib.as_dict(cfg),
        "timings_s": timings,
        "environment": {**_environment(), "loadavg_start": load_start},
    }
    from mixjax import plots  # matplotlib is imported only when plotting

    report["plots"] = plots.write_all(report, float_params, loaded, out)
    _write_json(os.path.join(out, REPORT), report)
    return report
