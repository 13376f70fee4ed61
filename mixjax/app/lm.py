"""The language-model pipeline of ``mixjax run --task lm``: train, prune 2:4, quantize, export.

On a character corpus ``--dataset text:FILE`` (:func:`mixjax.data.load_text`: the first 90 % of
its characters train, the last 10 % validate, its distinct characters are the vocabulary), with
the language model of ``train.model`` (GPT-tiny; sizes of ``[model]``, windows of ``context``
tokens), :func:`run` executes two training stages through :func:`mixjax.app.stages.run_stage`,
each with delayed-gradient Adam, checkpointed and resumable as the image pipeline's:

1. ``float``: the dense model on random windows, the train step's sequence loss (next-token
   cross-entropy), AdamW cosine-decayed to 0;
2. ``prune``: 2:4 magnitude masks on every matmul kernel along its true contraction axes
   (:func:`mixjax.layout.learn`; the token and position embeddings, tables that are gathered,
   stay dense, and so does the tied output projection they are), fine-tuned while the learning
   rate decays to 0 (cosine).

Then the pruned kernels are quantized weight-only, after training: ``int8`` per output feature,
and ``int4`` per output feature and group of 32 weights along the contraction axis (GPTQ's g32),
the **compressed** model, exported as ``model.mjx`` with its metadata (model, sizes, vocabulary).
Each variant is scored on every target of the validation split once (exact means), and
``report.json`` gives, with the image report's key names (``val_loss_`` and ``perplexity_`` in
place of ``accuracy_``): ``val_loss_float``, ``val_loss_pruned``, ``val_loss_int8``,
``val_loss_compressed``, the same four ``perplexity_*``, ``bytes_dense``, ``bytes_compressed``,
``compression_ratio``, per-stage rows, the per-leaf table, histories and timings; the plots are
the image run's, with ``val_loss_bytes.png`` in place of ``accuracy_bytes.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mixjax import core, data, export, layout, prune, quant, train
from mixjax.app import common, plots, stages
from mixjax.app import config as config_lib
from mixjax.app.rundir import ARTIFACT
from mixjax.app.stages import Run, Stage, log, run_stage

__all__ = ["GROUP_SIZE", "STAGES", "VARIANTS", "metadata", "run"]

STAGES = ("float", "prune")
GROUP_SIZE = 32
# The weight-only quantizations of the pruned model, ``name: (bits, group_size)`` per output
# feature (and group), in report order; "compressed" is exported.
VARIANTS = {"int8": (8, None), "compressed": (4, GROUP_SIZE)}
_NAME = "mixjax.app.lm"


def _quantizers(layouts: Any) -> dict[str, core.ParamTransform]:
    return {
        name: quant.fake_quant(bits, group_size=group, layouts=layouts)
        for name, (bits, group) in VARIANTS.items()
    }


def _check_groups(quantizers: dict[str, core.ParamTransform], params: Any) -> None:
    """Raises before training when a kernel's contraction axis does not divide into groups."""
    try:
        jax.eval_shape(quantizers["compressed"].init, params)
    except ValueError as err:
        raise ValueError(
            f"{_NAME}: --task lm quantizes to int4 in groups of {GROUP_SIZE} along each kernel's "
            f"contraction axis; choose --width and --heads so that {GROUP_SIZE} divides the "
            f"width and the width per head: {err}"
        ) from None


def metadata(
    cfg: config_lib.Config,
    sizes: dict[str, int],
    vocab: str,
    bits: int | None,
    group_size: int | None,
) -> dict:
    """A language model's artifact metadata: task, model, sizes, vocabulary and its weight-only
    quantization (``bits`` ``None``: none, ``"quantization": None``)."""
    quantization = None
    if bits is not None:
        quantization = {"bits": bits, "group_size": group_size, "weights_only": True}
    return {
        "task": "lm",
        "model": cfg.train.model,
        "sizes": dict(sizes),
        "vocab": vocab,
        "quantization": quantization,
    }


def run(
    cfg: config_lib.Config,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    quiet: bool,
    stop_after: int | None,
) -> dict[str, Any]:
    """Runs the language-model pipeline (module docstring) and returns the report it writes.

    Arguments and errors as :func:`mixjax.app.pipeline.run`, which calls this for a
    configuration of ``data.task = "lm"`` (validated there).
    """
    start = common.clock()
    out, c = cfg.run.output, cfg.compress
    train_set, val_set = (data.load_text(cfg.data.dataset, s) for s in data.TEXT_SPLITS)
    init_key, rng = jax.random.split(jax.random.key(cfg.run.seed))
    vocab = train_set.vocab
    # One token initializes the model: its position table is (context, width) whatever the input.
    net = common.build_model(cfg, len(vocab), init_key, jnp.zeros((1, 1), jnp.int32))
    context = net.sizes["context"]
    task = stages.text_task(train_set, val_set, context)
    sample = jnp.zeros((1, context), jnp.int32)
    layouts = layout.learn(common.forward(net.module, net.model_state), net.params, sample)
    quantizers = _quantizers(layouts)
    _check_groups(quantizers, net.params)
    options = dict(resume=resume, overwrite=overwrite, quiet=quiet, stop_after=stop_after)
    run_file = common.prepare(cfg, plots.files("val_loss"), STAGES, **options)
    log(
        quiet,
        f"{cfg.data.dataset}: {len(train_set.tokens)} train / {len(val_set.tokens)} val "
        f"characters, vocabulary {len(vocab)}; model {cfg.train.model} {net.sizes}",
    )
    show = progress and not quiet
    run_ = Run(cfg, task, rng, common.mesh(cfg.run.devices), resume, show, quiet, stop_after)

    # 1. float: AdamW with the learning rate cosine-decayed to 0.
    tx = common.float_optimizer(cfg)
    stage = Stage(
        "float", cfg.train.steps, 0, cfg.data.batch_size, net.apply_fn, tx, core.identity(), None
    )
    dense = run_stage(run_, stage, net.params, net.model_state)

    # 2. prune: 2:4 along the contraction axes (embeddings left dense), fine-tuned.
    pruner = prune.magnitude(None, structure=prune.NM(2, 4), layouts=layouts)
    lr = optax.cosine_decay_schedule(c.prune_lr, c.prune_steps, alpha=0.0)
    tx = common.optimizer(cfg, lr, cfg.train.weight_decay)
    stage = Stage(
        "prune", c.prune_steps, cfg.train.steps, c.batch_size, net.apply_fn, tx, pruner, None
    )
    pruned = run_stage(run_, stage, dense.state.params, dense.state.model_state)

    # 3. weight-only quantization of the pruned kernels, scored and exported.
    tick = time.perf_counter()
    state = pruned.state
    view = pruner.apply(state.params, state.transform_state)
    scores = {"float": dense.scores, "pruned": pruned.scores}
    compact = dict(model_state=state.model_state, container="compact")
    sizes = {
        "float": common.dense_bytes(dense.state.params, dense.state.model_state),
        "pruned": export.compress(state.params, pruner, state.transform_state, **compact).nbytes,
    }
    artifacts = {}
    for name, quantizer in quantizers.items():
        transform = core.chain(pruner, quantizer)
        quantized = state._replace(transform_state=(state.transform_state, quantizer.init(view)))
        evaluate = train.make_eval_step(net.apply_fn, transform=transform)
        scores[name] = task.score(evaluate, quantized)
        artifact = export.compress(state.params, transform, quantized.transform_state, **compact)
        meta = metadata(cfg, net.sizes, vocab, *VARIANTS[name])
        artifacts[name] = dataclasses.replace(artifact, metadata=meta)
        sizes[name] = artifacts[name].nbytes
        log(quiet, f"{name}: val loss {scores[name]['loss']:.4f}, {sizes[name]} bytes")
    loaded = export.load(export.save(artifacts["compressed"], os.path.join(out, ARTIFACT)))
    report = _report({"float": dense, "prune": pruned}, scores, sizes, loaded, tick)
    report["vocab_size"] = len(vocab)
    dense_params = jax.device_get(dense.state.params)
    report["plots"] = plots.write_all(report, dense_params, loaded, out, "val_loss")
    return common.finish(cfg, report, run_file, start)


def _report(results, scores, sizes, loaded, tick) -> dict[str, Any]:
    """The report of a finished run (module docstring), without its plots and the entries of
    :func:`mixjax.app.common.finish`."""
    rows = [
        (stage, {"val_loss": scores[n]["loss"], "perplexity": scores[n]["perplexity"]}, sizes[n])
        for n, stage in zip(scores, ("dense", "pruned", "int8", "compressed"), strict=True)
    ]
    return {
        "task": "lm",
        **{f"val_loss_{name}": s["loss"] for name, s in scores.items()},
        **{f"perplexity_{name}": s["perplexity"] for name, s in scores.items()},
        **common.report(results, loaded, sizes["float"], rows, tick),
    }
