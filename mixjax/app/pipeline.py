"""The ``mixjax run`` pipeline as a library function: train, compress, export, evaluate, report.

:func:`run` executes three training stages on one dataset, each a :mod:`mixjax.train` step
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
parameters, activations fake-quantized) and integer inference (:mod:`mixjax.export.integer`),
times the integer path against the float forward, writes ``report.json`` and the PNG plots
(:mod:`mixjax.app.plots`) into the output directory, and returns the report.

Each stage runs through :func:`mixjax.app.stages.run_stage`: checkpoints go to
``<output>/checkpoints/<stage>`` every ``checkpoint_every`` steps and at each stage's end; with
``resume=True`` each stage continues from its latest intact one, and an interrupted and resumed
run ends with the same parameters and history as an uninterrupted one. The output directory is
guarded by a run file (:mod:`mixjax.app.rundir`): a non-empty one is used only to resume the
same configuration or, with ``overwrite=True``, to replace what an earlier run wrote there.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from typing import Any

import jax
import numpy as np
import optax

from mixjax import (
    augment,
    core,
    data,
    delay,
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
from mixjax.app import config as config_lib
from mixjax.app import evaluate, plots, rundir
from mixjax.app.rundir import ARTIFACT, CHECKPOINTS, REPORT, write_json
from mixjax.app.stages import STAGES, Run, Stage, Stopped, log, run_stage
from mixjax.export.report import row_dict

__all__ = ["ARTIFACT", "REPORT", "Stopped", "run"]

# The sparsity ramp ends here (fraction of the stage); the final masks are then fine-tuned while
# the learning rate decays to zero (a gentle ramp and a decayed fine-tune lose the least).
_PRUNE_END = 0.4
_MASK_EVERY = 10


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


def _qat_apply(model, act: quant.ActivationQuant) -> train.ApplyFn:
    base = train.linen_apply(model)

    def apply(params, act_state, images, *, train, key):
        fn = lambda x: base(params, None, x, train=train, key=key)[0]  # noqa: E731
        return act.apply(fn, act_state, images, mode="train" if train else "eval")

    return apply


def _mesh(devices: int) -> Any:
    """The data-parallel mesh of ``devices`` devices, or ``None`` for one device."""
    if devices > jax.device_count():
        raise ValueError(
            f"mixjax.app.pipeline: run.devices (--devices) is {devices} but only "
            f"{jax.device_count()} {jax.default_backend()} device(s) are visible"
        )
    return None if devices == 1 else parallel.make_mesh(data=devices)


def _artifact(state, transform, model_name, act, num_classes, input_shape) -> export.Artifact:
    artifact = export.compress(state.params, transform, state.transform_state, container="compact")
    metadata = evaluate.metadata(model_name, num_classes, input_shape, act, state.model_state)
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


def _prune_lr(c: config_lib.Compress) -> optax.Schedule:
    """The pruning stage's learning rate: constant through the ramp, then cosine-decayed to 0."""
    ramp = max(1, int(c.prune_steps * _PRUNE_END))
    return optax.join_schedules(
        [
            optax.constant_schedule(c.prune_lr),
            optax.cosine_decay_schedule(c.prune_lr, max(1, c.prune_steps - ramp)),
        ],
        [ramp],
    )


def _report(cfg, results, pruned_bytes, loaded, test_set, tick) -> dict[str, Any]:
    """The report of a finished run (see :func:`run`), without its plots."""
    dense, pruned = results["float"], results["prune"]
    fns = evaluate.forwards(loaded)
    scores = evaluate.evaluate(loaded, test_set, fns=fns)
    speed = evaluate.time_integer(fns, test_set.images)
    table = export.table(loaded)
    timings = {name: r.seconds for name, r in results.items()}
    timings["export_eval"] = time.perf_counter() - tick
    bytes_dense = 4 * sum(int(np.size(leaf)) for leaf in jax.tree.leaves(dense.state.params))
    stages = [
        ("dense", dense.accuracy, bytes_dense),
        ("pruned", pruned.accuracy, pruned_bytes),
        ("compressed", scores["accuracy_compressed"], loaded.nbytes),
        ("integer", scores["accuracy_integer"], loaded.nbytes),
    ]
    return {
        "accuracy_float": dense.accuracy,
        "accuracy_pruned": pruned.accuracy,
        "accuracy_compressed": scores["accuracy_compressed"],
        "accuracy_integer": scores["accuracy_integer"],
        "bytes_dense": bytes_dense,
        "bytes_compressed": loaded.nbytes,
        "compression_ratio": bytes_dense / loaded.nbytes,
        "train_steps_per_second": dense.steps_per_second,
        "inference_speedup_integer": speed["speedup"],
        "inference_ms": {"float": speed["float_ms"], "integer": speed["integer_ms"]},
        "stages": [{"stage": n, "accuracy": a, "bytes": b} for n, a, b in stages],
        "layers": [row_dict(r) for r in table.rows],
        "layers_markdown": table.markdown,
        "history": {name: r.history for name, r in results.items()},
        "artifact": ARTIFACT,
        "config": config_lib.as_dict(cfg),
        "timings_s": timings,
        "environment": _environment(),
    }


def run(
    cfg: config_lib.Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quiet: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Runs the whole pipeline (module docstring) and returns the report it writes.

    Args:
      cfg: the configuration (validated here).
      resume: continue the run in ``cfg.run.output``, each stage from its latest intact
        checkpoint; the configuration must be the run's (:mod:`mixjax.app.rundir`).
      overwrite: replace the outputs of an earlier run in ``cfg.run.output`` (other files there
        are kept). Without ``resume`` or ``overwrite``, the directory must be empty or absent.
      progress: tqdm progress bars on stderr.
      quiet: no log lines on stderr.
      stop_after: stop (raising :class:`mixjax.app.stages.Stopped`, after writing a
        checkpoint) once this many steps of all stages together are done; for interrupting a
        run on purpose.

    Returns:
      The report (see ``report.json``): accuracies, bytes, ratio, speeds, the per-layer table,
      the per-stage accuracy and bytes, the configuration, timings and the environment.

    Raises:
      ValueError / FileNotFoundError: a bad configuration, dataset or output directory; a
        stage diverged (non-finite loss).
      Stopped: ``stop_after`` was reached.
    """
    config_lib.validate(cfg)
    began = time.perf_counter()
    load_start = list(os.getloadavg())
    out, c = cfg.run.output, cfg.compress
    train_set, test_set = (
        data.load(cfg.data.dataset, split, num_classes=cfg.data.num_classes)
        for split in ("train", "test")
    )
    num_classes = max(train_set.num_classes, test_set.num_classes)
    run_file = rundir.prepare(
        out,
        cfg,
        [ARTIFACT, REPORT, *plots.FILES, *(f"{CHECKPOINTS}/{s}" for s in STAGES)],
        resume=resume,
        overwrite=overwrite,
        extras={"quiet": quiet, "stop_after": stop_after},
        log=lambda message: log(quiet, message),
    )
    log(
        quiet,
        f"{cfg.data.dataset}: {len(train_set.labels)} train / {len(test_set.labels)} test "
        f"images {train_set.images.shape[1:]}, {num_classes} classes; model {cfg.train.model}",
    )
    model = models.create(cfg.train.model, num_classes)
    init_key, rng = jax.random.split(jax.random.key(cfg.run.seed))
    sample = data.normalize(train_set.images[:1])
    params = jax.jit(model.init)(init_key, sample)["params"]
    mesh = _mesh(cfg.run.devices)
    run_ = Run(
        cfg, train_set, test_set, rng, mesh, resume, progress and not quiet, quiet, stop_after
    )
    offsets = np.cumsum((0, cfg.train.steps, c.prune_steps)).tolist()
    apply_fn = train.linen_apply(model)

    # 1. float: augmented, AdamW with the learning rate cosine-decayed to 0.
    lr = optax.cosine_decay_schedule(cfg.train.lr, cfg.train.steps, alpha=0.0)
    augmenter = augment.chain(
        augment.random_affine(degrees=cfg.data.degrees, translate=cfg.data.translate)
    )
    tx = _tx(cfg, lr, cfg.train.weight_decay)
    stage = Stage(
        "float",
        cfg.train.steps,
        offsets[0],
        cfg.data.batch_size,
        apply_fn,
        tx,
        core.identity(),
        augmenter,
    )
    dense = run_stage(run_, stage, params)

    # 2. prune: the ramp, then fine-tuning while the learning rate decays to 0. The compression
    # stages fine-tune without augmentation: on the 8x8 digits, augmenting while pruning cost 1-2
    # points (pruned accuracy 96.1-96.4 % with it, 97.5-98.3 % without).
    pruning = _pruning(cfg, dense.state.params)
    tx = _tx(cfg, _prune_lr(c))
    stage = Stage("prune", c.prune_steps, offsets[1], c.batch_size, apply_fn, tx, pruning, None)
    pruned = run_stage(run_, stage, dense.state.params)

    # 3. cluster + QAT (weights and activations).
    state = pruned.state
    transform = _compression(cfg, pruning, state.transform_state, state.params)
    act = quant.activation_quant(c.act_bits)
    act_state = act.init(lambda x: model.apply({"params": state.params}, x), sample)
    log(quiet, f"qat: k-means clustering of the pruned kernels into {c.clusters} values ...")
    tx = _tx(cfg, c.qat_lr)
    stage = Stage(
        "qat", c.qat_steps, offsets[2], c.batch_size, _qat_apply(model, act), tx, transform, None
    )
    qat = run_stage(run_, stage, state.params, act_state)

    # 4. export, evaluate, report.
    tick = time.perf_counter()
    artifact = _artifact(qat.state, transform, cfg.train.model, act, num_classes, sample.shape[1:])
    loaded = export.load(export.save(artifact, os.path.join(out, ARTIFACT)))
    pruned_bytes = export.compress(
        state.params, pruning, state.transform_state, container="compact"
    ).nbytes
    results = {"float": dense, "prune": pruned, "qat": qat}
    report = _report(cfg, results, pruned_bytes, loaded, test_set, tick)
    report["resumes"] = run_file.get("resumes", [])
    report["timings_s"]["total"] = time.perf_counter() - began
    report["environment"]["loadavg_start"] = load_start
    report["plots"] = plots.write_all(report, jax.device_get(dense.state.params), loaded, out)
    write_json(os.path.join(out, REPORT), report)
    return report
