"""The ``mixjax run`` pipeline as a library function: train, compress, export, evaluate, report.

:func:`run` runs the pipeline of the configuration's task: a language model's
(:mod:`mixjax.app.lm`, ``--task lm``) or, described here, an image classifier's. It executes
three training stages on one dataset, each a :mod:`mixjax.train` step running
``steps_per_call`` steps per dispatch with delayed-gradient Adam (``tau`` steps stale, DC-ASGD
compensation), the model state (BatchNorm statistics) trained with the parameters:

1. ``float``: the dense model (AdamW, learning rate cosine-decayed to 0) with on-device
   augmentation (small random rotations and shifts, no flips), batches of ``data.batch_size``
   (128: on the digits, 64 left the float accuracy at 96.4-98.3 % across seeds, 128 at
   97.5-98.3 %); the compression stages below take batches of ``compress.batch_size``;
2. ``prune``: gradual magnitude pruning (Zhu & Gupta polynomial schedule reaching its final
   sparsity at 40% of the stage, per group of kernels: output layer, other matmuls, convs,
   found from the model's layouts by :mod:`mixjax.app.pruning`), then fine-tuning of the final
   masks with the learning rate decaying to zero (cosine);
3. ``qat``: masks frozen, weight clustering (fixed assignments, trained centroids, zeros kept),
   large biases clustered too, every leaf fake-quantized per tensor to ``bits`` (so the codebooks
   are integers) and layer inputs fake-quantized to ``act_bits`` (EMA observers) for the
   integer path.

Then it exports the compact artifact (``model.mjx``, Huffman-coded where smaller, with the
model state and the metadata ``mixjax eval`` needs), evaluates the float model, the artifact
(its reconstructed parameters, activations fake-quantized) and integer inference
(:mod:`mixjax.export.integer`), times the integer path against the float forward, writes
``report.json`` and the PNG plots (:mod:`mixjax.app.plots`) into the output directory, and
returns the report.

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
import time
from typing import Any

import jax
import optax

from mixjax import augment, core, data, export, layout, quant, select, share
from mixjax.app import common, evaluate, lm, plots, pruning, stages
from mixjax.app import config as config_lib
from mixjax.app.rundir import ARTIFACT, REPORT
from mixjax.app.stages import STAGES, Run, Stage, Stopped, log, run_stage

__all__ = ["ARTIFACT", "REPORT", "Stopped", "run"]

# Examples the layouts are traced on and the output-layer probe runs on
# (mixjax.app.pruning.output_kernel). More than one: with a batch of one, mixjax.layout.learn
# takes a bias for a matmul operand (a size-1 axis of a reshape is merged into the next axis).
_PROBE = 16


def _frozen(transform: core.ParamTransform, state: Any) -> core.ParamTransform:
    """``transform`` held at ``state``: ``init`` returns it, ``update`` keeps it."""
    return transform._replace(init=lambda params: state, update=lambda p, s, step, **kw: s)


def _compression(cfg, pruning_, prune_state, params, layouts, kernels) -> core.ParamTransform:
    """The qat stage's transform: the masks frozen, the ``kernels`` and the biases longer than
    their cluster counts clustered (a leaf no longer already has no more distinct values), every
    leaf fake-quantized per tensor."""
    c = cfg.compress
    view = pruning_.apply(params, prune_state)
    leaves = select.leaves_with_paths(view)
    clustered = {p for p, leaf in leaves if p in kernels and leaf.size > c.clusters}
    biases = {p for p, leaf in leaves if p.endswith("bias") and leaf.size > c.bias_clusters}
    parts = [_frozen(pruning_, prune_state)]
    if clustered:
        parts.append(
            share.cluster(
                c.clusters,
                preserve_sparsity=True,
                where=lambda p, leaf: p in clustered,
                layouts=layouts,
            )
        )
    if biases:
        parts.append(
            share.cluster(
                c.bias_clusters, preserve_sparsity=False, where=lambda p, leaf: p in biases
            )
        )
    parts.append(quant.fake_quant(c.bits, per_channel=False, where=".*", layouts=layouts))
    return core.chain(*parts)


def _artifact(
    state, transform, model_name, sizes, act, num_classes, input_shape
) -> export.Artifact:
    """The QAT stage's artifact: ``state.model_state`` is :func:`mixjax.quant.quantized_apply`'s
    ``{"act": observers, "model": batch statistics}``."""
    artifact = export.compress(
        state.params,
        transform,
        state.transform_state,
        model_state=state.model_state["model"],
        container="compact",
    )
    metadata = evaluate.metadata(
        model_name, num_classes, input_shape, act, state.model_state["act"], sizes=sizes
    )
    return dataclasses.replace(artifact, metadata=metadata)


def _prune_lr(c: config_lib.Compress) -> optax.Schedule:
    """The pruning stage's learning rate: constant through the ramp, then cosine-decayed to 0."""
    ramp = max(1, int(c.prune_steps * pruning.PRUNE_END))
    return optax.join_schedules(
        [
            optax.constant_schedule(c.prune_lr),
            optax.cosine_decay_schedule(c.prune_lr, max(1, c.prune_steps - ramp)),
        ],
        [ramp],
    )


def _report(results, pruned_bytes, loaded, test_set, tick) -> dict[str, Any]:
    """The report of a finished run (see :func:`run`), without its plots and the entries of
    :func:`mixjax.app.common.finish`."""
    dense, pruned = results["float"], results["prune"]
    int_model = evaluate.integer_model(loaded, batch=min(256, len(test_set.labels)))
    fns = evaluate.forwards(loaded, int_model=int_model)
    scores = evaluate.evaluate(loaded, test_set, fns=fns)
    speed = evaluate.time_integer(fns, test_set.images)
    bytes_dense = common.dense_bytes(dense.state.params, dense.state.model_state)
    accuracy = {
        "float": dense.scores["accuracy"],
        "pruned": pruned.scores["accuracy"],
        "compressed": scores["accuracy_compressed"],
        "integer": scores["accuracy_integer"],
    }
    sizes = {"float": bytes_dense, "pruned": pruned_bytes}
    rows = [
        (stage, {"accuracy": value}, sizes.get(name, loaded.nbytes))
        for (name, value), stage in zip(
            accuracy.items(), ("dense", "pruned", "compressed", "integer"), strict=True
        )
    ]
    return {
        "task": "image",
        **{f"accuracy_{name}": value for name, value in accuracy.items()},
        **common.report(results, loaded, bytes_dense, rows, tick),
        "inference_speedup_integer": speed["speedup"],
        "inference_ms": {"float": speed["float_ms"], "integer": speed["integer_ms"]},
        "integer_sites_markdown": export.integer_table(int_model),
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
    """Runs the pipeline of ``cfg.data.task`` (module docstring; :mod:`mixjax.app.lm` for
    ``"lm"``) and returns the report it writes.

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
        stage diverged (non-finite loss); the output layer cannot be told
        (:func:`mixjax.app.pruning.output_kernel`).
      Stopped: ``stop_after`` was reached.
    """
    config_lib.validate(cfg)
    options = dict(resume=resume, overwrite=overwrite, quiet=quiet, stop_after=stop_after)
    if cfg.data.task == "lm":
        return lm.run(cfg, progress=progress, **options)
    start = common.clock()
    out, c = cfg.run.output, cfg.compress
    train_set, test_set = (
        data.load(cfg.data.dataset, split, num_classes=cfg.data.num_classes)
        for split in ("train", "test")
    )
    num_classes = max(train_set.num_classes, test_set.num_classes)
    run_file = common.prepare(cfg, plots.files("accuracy"), STAGES, **options)
    log(
        quiet,
        f"{cfg.data.dataset}: {len(train_set.labels)} train / {len(test_set.labels)} test "
        f"images {train_set.images.shape[1:]}, {num_classes} classes; model {cfg.train.model}",
    )
    init_key, rng = jax.random.split(jax.random.key(cfg.run.seed))
    sample = data.normalize(train_set.images[:1])
    net = common.build_model(cfg, num_classes, init_key, sample)
    model, apply_fn = net.module, net.apply_fn
    task = stages.image_task(train_set, test_set)
    show = progress and not quiet
    run_ = Run(cfg, task, rng, common.mesh(cfg.run.devices), resume, show, quiet, stop_after)
    offsets = [0, cfg.train.steps, cfg.train.steps + c.prune_steps]

    # 1. float: augmented, AdamW with the learning rate cosine-decayed to 0.
    augmenter = augment.chain(
        augment.random_affine(degrees=cfg.data.degrees, translate=cfg.data.translate)
    )
    tx = common.float_optimizer(cfg)
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
    dense = run_stage(run_, stage, net.params, net.model_state)

    # 2. prune: the ramp, then fine-tuning while the learning rate decays to 0. The compression
    # stages fine-tune without augmentation: on the 8x8 digits, augmenting while pruning cost 1-2
    # points (pruned accuracy 96.1-96.4 % with it, 97.5-98.3 % without).
    forward = common.forward(model, dense.state.model_state)
    probe = data.normalize(train_set.images[:_PROBE])
    layouts = layout.learn(forward, dense.state.params, probe)
    head = pruning.output_kernel(forward, dense.state.params, probe, layouts)
    pruner = pruning.pruning(c, layouts, head)
    tx = common.optimizer(cfg, _prune_lr(c))
    stage = Stage("prune", c.prune_steps, offsets[1], c.batch_size, apply_fn, tx, pruner, None)
    pruned = run_stage(run_, stage, dense.state.params, dense.state.model_state)

    # 3. cluster + QAT (weights and activations).
    state = pruned.state
    kernels = {p for paths in pruning.groups(layouts, head).values() for p in paths}
    transform = _compression(cfg, pruner, state.transform_state, state.params, layouts, kernels)
    # Activation observers live in the model state beside the batch statistics, which QAT
    # keeps training.
    act = quant.activation_quant(c.act_bits)
    qat_model = quant.quantized_apply(apply_fn, act)
    qat_state = qat_model.init(state.params, state.model_state, sample)
    log(quiet, f"qat: k-means clustering of the pruned kernels into {c.clusters} values ...")
    tx = common.optimizer(cfg, c.qat_lr)
    stage = Stage(
        "qat", c.qat_steps, offsets[2], c.batch_size, qat_model.apply, tx, transform, None
    )
    qat = run_stage(run_, stage, state.params, qat_state)

    # 4. export, evaluate, report.
    tick = time.perf_counter()
    artifact = _artifact(
        qat.state,
        transform,
        cfg.train.model,
        net.sizes,
        act,
        num_classes,
        sample.shape[1:],
    )
    loaded = export.load(export.save(artifact, os.path.join(out, ARTIFACT)))
    pruned_bytes = export.compress(
        state.params,
        pruner,
        state.transform_state,
        model_state=state.model_state,
        container="compact",
    ).nbytes
    results = {"float": dense, "prune": pruned, "qat": qat}
    report = _report(results, pruned_bytes, loaded, test_set, tick)
    report["plots"] = plots.write_all(report, jax.device_get(dense.state.params), loaded, out)
    return common.finish(cfg, report, run_file, start)
