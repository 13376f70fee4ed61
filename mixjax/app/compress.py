"""``mixjax compress``: one-shot compression of a ``mixjax run``'s float model, no training.

:func:`run` reads the run file of a run directory (:mod:`mixjax.app.rundir`: the run's
configuration) and the float stage's last checkpoint (``checkpoints/float/<train.steps>``, or a
float checkpoint named by its path), rebuilds the model the configuration names
(:func:`mixjax.app.common.build_model`), draws calibration data from the training split of the
run's dataset (or ``dataset``) and compresses the float parameters layer by layer with
:func:`mixjax.oneshot.compress`, sequentially:

* ``gptq`` / ``awq`` / ``rtn``: :func:`mixjax.quant.gptq` / :func:`mixjax.quant.awq` /
  :func:`mixjax.quant.rtn` to ``bits``;
* ``sparsegpt``: :func:`mixjax.prune.sparsegpt` (with ``bits``: joint pruning and quantization);
* ``wanda`` / ``magnitude``: :func:`mixjax.prune.wanda` / :func:`mixjax.prune.layer_magnitude`;
  with ``bits``, a second pass rounds the pruned weights to nearest (:func:`mixjax.quant.rtn`)
  and the two transforms are chained (the zeros stay zero).

Calibration: ``samples`` random training images (normalized as in training), or ``samples``
random windows of the context length of the training text for a language model, in batches of
the run's ``compress.batch_size``, drawn with the run's seed. The model runs in inference mode
with the float model's state (BatchNorm statistics as they are), which the artifact stores.

The result is exported as the run's artifact is: an image model with the metadata ``mixjax eval``
reads (:func:`mixjax.app.evaluate.metadata`), its activation ranges calibrated post-training
(:func:`mixjax.quant.calibrate`, ``compress.act_bits`` bits) on the same calibration batches for
the integer path; a language model weight-only with :func:`mixjax.app.lm.metadata`. The output
directory gets ``model.mjx``, ``report.json`` (the keys of ``mixjax run``'s, see :func:`run`), the
plots and a run file, under the rules of :func:`mixjax.app.rundir.prepare`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import checkpoint, core, data, export, layout, oneshot, prune, quant, select, train
from mixjax.app import common, evaluate, lm, plots, rundir, stages
from mixjax.app import config as config_lib
from mixjax.app.rundir import ARTIFACT, CHECKPOINTS, REPORT, RUN_FILE
from mixjax.app.stages import log

__all__ = [
    "ARTIFACT",
    "DEFAULT_SAMPLES",
    "METHODS",
    "PRUNERS",
    "QUANTIZERS",
    "REPORT",
    "locate",
    "methods",
    "run",
]

QUANTIZERS = ("gptq", "awq", "rtn")
PRUNERS = ("sparsegpt", "wanda", "magnitude")
METHODS = (*QUANTIZERS, *PRUNERS)
DEFAULT_SAMPLES = 128
# Examples the layouts are traced on (as mixjax.app.pipeline: a batch of one would mislead).
_PROBE = 16
_NAME = "mixjax.app.compress"


def locate(path: str) -> tuple[str, str, int | None]:
    """``(run directory, float checkpoint directory, step or None)`` of a run directory or of a
    float-stage checkpoint path (``RUN/checkpoints/float`` or ``RUN/checkpoints/float/STEP``).

    Raises:
      FileNotFoundError: no such path.
      ValueError: a file, a checkpoint of another stage, or a directory holding no run file.
    """
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{_NAME}: {path!r} does not exist")
    usage = f"a `mixjax run` output directory (holding {RUN_FILE}) or a float-stage checkpoint"
    if not os.path.isdir(path):
        raise ValueError(f"{_NAME}: {path!r} is a file; give {usage} (RUN/checkpoints/float)")
    if os.path.isfile(os.path.join(path, RUN_FILE)):
        return path, os.path.join(path, CHECKPOINTS, "float"), None
    stage_dir, step = path, None
    if os.path.basename(path).isdigit():
        stage_dir, step = os.path.dirname(path), int(os.path.basename(path))
    parent = os.path.dirname(stage_dir)
    if os.path.basename(parent) != CHECKPOINTS:
        raise ValueError(f"{_NAME}: {path!r} holds no {RUN_FILE}; give {usage}")
    stage = os.path.basename(stage_dir)
    if stage != "float":
        raise ValueError(
            f"{_NAME}: {path!r} is a checkpoint of the {stage!r} stage; one-shot compression "
            "starts from the float model (RUN/checkpoints/float)"
        )
    run_dir = os.path.dirname(parent) or "."
    if not os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        raise ValueError(f"{_NAME}: {run_dir!r} holds no {RUN_FILE}, so no run configuration")
    return run_dir, stage_dir, step


def _config(run_dir: str, dataset: str | None, output: str) -> config_lib.Config:
    """The run's configuration, with the calibration dataset and the output directory."""
    saved = rundir.read_run_file(run_dir)
    flat = {f"{s}.{k}": v for s, values in saved["config"].items() for k, v in values.items()}
    if dataset is not None:
        flat["data.dataset"] = dataset
    flat["run.output"] = output
    try:
        return config_lib.validate(config_lib.load(None, flat))
    except ValueError as err:
        raise ValueError(f"{_NAME}: {os.path.join(run_dir, RUN_FILE)!r}: {err}") from None


def _step(cfg: config_lib.Config, run_dir: str, directory: str, step: int | None) -> int:
    """The float checkpoint's step: ``step``, else the finished stage's (``train.steps``)."""
    found = checkpoint.steps(directory) if os.path.isdir(directory) else []
    if step is not None:
        if step not in found:
            raise ValueError(
                f"{_NAME}: {directory!r} holds no checkpoint of step {step} (steps: {found})"
            )
        return step
    if not found:
        raise ValueError(
            f"{_NAME}: {run_dir!r} holds no float-stage checkpoint (its float stage has not run)"
        )
    if found[-1] != cfg.train.steps:
        raise ValueError(
            f"{_NAME}: the float stage of {run_dir!r} is not finished (its latest checkpoint is "
            f"step {found[-1]} of {cfg.train.steps}); finish it with `mixjax run --output "
            f"{run_dir} --resume`, or name a checkpoint: {directory}/{found[-1]}"
        )
    return found[-1]


def _restore(cfg, directory, step, net, rng, what) -> tuple[train.TrainState, list]:
    """The float stage's state and history at ``step``; the checkpoint must hold the model
    ``net`` (``what`` describes it)."""
    tx = common.float_optimizer(cfg)
    stage = stages.Stage(
        "float", cfg.train.steps, 0, cfg.data.batch_size, net.apply_fn, tx, core.identity(), None
    )
    like = stages.init_state(stage, net.params, rng, net.model_state)
    try:
        return stages.read_checkpoint(directory, like, step)
    except checkpoint.DamagedCheckpointError:
        raise
    except ValueError as err:  # the first differing leaf, in words about the model
        detail = str(err).replace("does not match like at", "differs at")
        detail = detail.replace(", like has ", ", the model has ")
        raise ValueError(
            f"{_NAME}: the float checkpoint is not one of {what} (another model, or data of "
            f"another shape than the run's): {detail}"
        ) from None


def _build(cfg, outputs, key, sample, what) -> common.Model:
    try:
        return common.build_model(cfg, outputs, key, sample)
    except Exception as err:  # noqa: BLE001 - flax/JAX shape errors of many types
        detail = " ".join(str(err).split())[:300]
        raise ValueError(
            f"{_NAME}: {what} rejects the calibration data ({type(err).__name__}: {detail})"
        ) from None


def methods(
    method: str,
    *,
    bits: int | None = None,
    sparsity: float | prune.NM | None = None,
    group_size: int | None = None,
) -> list[Any]:
    """The one-shot passes of a ``--method`` (module docstring), in order.

    Raises:
      ValueError: an unknown method; the factories' own checks (named).
    """
    rtn = [quant.rtn(bits, group_size=group_size)] if bits is not None else []
    if method == "gptq":
        return [quant.gptq(bits, group_size=group_size)]
    if method == "awq":
        return [quant.awq(bits, group_size=group_size)]
    if method == "rtn":
        return rtn
    if method == "sparsegpt":
        return [prune.sparsegpt(sparsity, bits=bits, group_size=group_size)]
    if method == "wanda":
        return [prune.wanda(sparsity), *rtn]
    if method == "magnitude":
        return [prune.layer_magnitude(sparsity), *rtn]
    raise ValueError(f"{_NAME}: method must be one of {METHODS}, got {method!r}")


def _where(skip: str | None, params: Any, layouts: Any) -> Any:
    """The ``where=`` of the layers to compress: every matmul / convolution kernel (the default
    of :func:`mixjax.oneshot.compress`) but those whose path ``skip`` (a regex) matches.

    Raises:
      ValueError: ``skip`` matches none of those layers (the message lists them).
    """
    if skip is None:
        return None
    found = layout.by_path(_NAME, params, layouts)
    kernels = [
        p
        for p, leaf in select.leaves_with_paths(params)
        if select.is_floating(leaf) and getattr(found[p], "kind", None) in ("dense", "conv")
    ]
    pattern = re.compile(skip)
    kept = {p for p in kernels if not pattern.search(p)}
    if len(kept) == len(kernels):
        raise ValueError(f"{_NAME}: --skip {skip!r} matches none of the layers {kernels}")
    return lambda path, leaf: path in kept


def _oneshot(passes, fn, params, batches, layouts, where, progress):
    """Runs the passes one after the other, each on the params the one before it left; the
    transforms chained. Returns the result and ``(method name, layer report)`` pairs."""
    results = []
    for method in passes:
        results.append(
            oneshot.compress(
                method,
                fn,
                params,
                batches,
                where=where,
                layouts=layouts,
                sequential=True,
                progress=progress,
            )
        )
        params = results[-1].params
    layers = [(m.name, r) for m, res in zip(passes, results, strict=True) for r in res.layers]
    if len(results) == 1:
        return results[0], layers
    transform = core.chain(*(r.transform for r in results))
    state = tuple(r.state for r in results)
    return oneshot.OneShot(params, transform, state, ()), layers


def _batches(x: np.ndarray, size: int) -> list[jax.Array]:
    return [jnp.asarray(x[i : i + size]) for i in range(0, len(x), size)]


def _calibration_images(cfg, train_set, samples) -> np.ndarray:
    n = len(train_set.labels)
    if samples > n:
        raise ValueError(
            f"{_NAME}: --calibration-samples {samples}: the train split of "
            f"{cfg.data.dataset!r} holds {n} images"
        )
    picks = np.random.default_rng(cfg.run.seed).choice(n, samples, replace=False)
    return np.asarray(data.normalize(train_set.images[np.sort(picks)]))


def _calibration_windows(cfg, train_set, samples, context) -> np.ndarray:
    n = len(train_set.tokens)
    if n <= context:
        raise ValueError(
            f"{_NAME}: the train split of {cfg.data.dataset!r} holds {n} tokens, too few for a "
            f"calibration window of {context}"
        )
    starts = np.random.default_rng(cfg.run.seed).integers(0, n - context, samples)
    return train_set.tokens[starts[:, None] + np.arange(context)].astype(np.int32)


def _layers(layers) -> list[dict[str, Any]]:
    return [
        {"method": name, **r._asdict(), "shape": list(r.shape), "error": _finite(r.error)}
        for name, r in layers
    ]


def _finite(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)  # JSON has no NaN


def run(
    source: str,
    method: str,
    *,
    bits: int | None = None,
    sparsity: float | tuple[int, int] | None = None,
    group_size: int | None = None,
    skip: str | None = None,
    dataset: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    output: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compresses the float model of a run one shot (module docstring); returns the report.

    Args:
      source: a ``mixjax run`` output directory whose float stage finished, or a float-stage
        checkpoint path (:func:`locate`).
      method: one of :data:`METHODS`.
      bits: weight bits (2..8): required by ``gptq``, ``awq`` and ``rtn``, optional for the
        pruners.
      sparsity: a fraction in ``[0, 1)`` or ``(n, m)`` for ``n:m``, for the pruners.
      group_size: rows per quantization scale (with ``bits``), or ``None``: one per output feature.
      skip: a regex on leaf paths: the layers it matches stay float (e.g. a first conv whose
        inputs N:M does not divide); ``None``: every matmul and convolution kernel.
      dataset: the calibration and evaluation dataset (default: the run's).
      samples: calibration images (or text windows), ``>= 1``.
      output: the output directory (default: ``<run dir>-<method>`` beside the run).
      overwrite: replace the outputs of an earlier ``mixjax compress`` there.
      quiet: no log lines; progress: progress bars over the layer groups.

    Returns:
      The report written as ``report.json``: ``task``; for images ``accuracy_float`` (the float
      checkpoint re-evaluated), ``accuracy_compressed`` (the artifact, activations
      fake-quantized with the calibrated ranges, as ``mixjax eval``), ``accuracy_integer``,
      ``accuracy_float_activations`` (the compressed weights alone), ``inference_ms``,
      ``inference_speedup_integer`` and ``integer_sites_markdown`` (how each site ran); for
      language models ``val_loss_float``, ``val_loss_compressed``, ``perplexity_*`` and
      ``vocab_size``; then, as ``mixjax run``,
      ``bytes_dense``, ``bytes_compressed``, ``compression_ratio``, ``stages``, ``layers``,
      ``layers_markdown``, ``history`` (the float stage's), ``plots``, ``config`` (the run's,
      with this dataset and output), ``timings_s`` and ``environment``; and ``oneshot`` (the
      method, its settings, the source checkpoint) with ``oneshot_layers`` (per layer: pass,
      path, ``(K, O)`` shape, relative reconstruction error, sparsity, seconds) and
      ``oneshot_layers_markdown``.

    Raises:
      FileNotFoundError / ValueError: as :func:`locate`; no finished float checkpoint; a
        checkpoint of another model (the first differing leaf named); calibration data the model
        rejects; a group size that does not divide a layer (the leaf named); bad settings; an
        output directory holding files (without ``overwrite``) or the run itself.
    """
    start = common.clock()
    run_dir, directory, step = locate(source)
    out = output or f"{os.path.abspath(run_dir).rstrip(os.sep)}-{method}"
    if os.path.realpath(out) == os.path.realpath(run_dir):
        raise ValueError(f"{_NAME}: --output {out!r} is the run directory itself; choose another")
    cfg = _config(run_dir, dataset, out)
    step = _step(cfg, run_dir, directory, step)
    pattern = prune.NM(*sparsity) if isinstance(sparsity, tuple) else sparsity
    passes = methods(method, bits=bits, sparsity=pattern, group_size=group_size)
    lm_task = cfg.data.task == "lm"
    init_key, rng = jax.random.split(jax.random.key(cfg.run.seed))
    if lm_task:
        train_set, held_out = (data.load_text(cfg.data.dataset, s) for s in data.TEXT_SPLITS)
        outputs, sample = len(train_set.vocab), jnp.zeros((1, 1), jnp.int32)
        what = f"model {cfg.train.model!r} of vocabulary {outputs} ({cfg.data.dataset})"
    else:
        train_set, held_out = (
            data.load(cfg.data.dataset, s, num_classes=cfg.data.num_classes)
            for s in ("train", "test")
        )
        outputs = max(train_set.num_classes, held_out.num_classes)
        sample = data.normalize(train_set.images[:1])
        what = (
            f"model {cfg.train.model!r} with {outputs} classes on {cfg.data.dataset!r} images "
            f"{tuple(train_set.images.shape[1:])}"
        )
    net = _build(cfg, outputs, init_key, sample, what)
    state, history = _restore(cfg, directory, step, net, rng, what)
    loaded_s = time.perf_counter() - start.began
    fn = common.forward(net.module, state.model_state)
    if lm_task:
        context = net.sizes["context"]
        task = stages.text_task(train_set, held_out, context)
        x = _calibration_windows(cfg, train_set, samples, context)
        probe = jnp.zeros((1, context), jnp.int32)
    else:
        task = stages.image_task(train_set, held_out)
        x = _calibration_images(cfg, train_set, samples)
        probe = data.normalize(train_set.images[:_PROBE])
    batches = _batches(x, cfg.compress.batch_size)
    metric = "val_loss" if lm_task else "accuracy"
    owned = [ARTIFACT, REPORT, *plots.files(metric)]
    run_file = rundir.prepare(out, cfg, owned, resume=False, overwrite=overwrite, resumable=False)
    log(
        quiet,
        f"{method}: {cfg.train.model} from {directory}/{step}, {len(x)} calibration "
        f"{'windows' if lm_task else 'images'} of {cfg.data.dataset} in {len(batches)} batches",
    )
    tick = time.perf_counter()
    layouts = layout.learn(fn, state.params, probe)
    where = _where(skip, state.params, layouts)
    result, layers = _oneshot(
        passes, fn, state.params, batches, layouts, where, progress and not quiet
    )
    oneshot_s = time.perf_counter() - tick
    tick = time.perf_counter()
    scores_float = task.score(train.make_eval_step(net.apply_fn, preprocess=task.preprocess), state)
    float_result = stages.Result(state, history, None, scores_float, loaded_s)
    artifact = export.compress(
        result.params,
        result.transform,
        result.state,
        model_state=state.model_state,
        container="compact",
    )
    bytes_dense = common.dense_bytes(state.params, state.model_state)
    spec = passes[-1].quant
    if lm_task:
        meta = lm.metadata(
            cfg, net.sizes, train_set.vocab, spec and spec.bits, spec and spec.group_size
        )
    else:
        act = quant.activation_quant(cfg.compress.act_bits)
        empty = act.init(fn, result.params, x[:1])
        act_state = quant.calibrate(act, fn, result.params, empty, batches)
        meta = evaluate.metadata(
            cfg.train.model, outputs, sample.shape[1:], act, act_state, sizes=net.sizes
        )
    artifact = dataclasses.replace(artifact, metadata=meta)
    loaded = export.load(export.save(artifact, os.path.join(out, ARTIFACT)))
    if lm_task:
        scores = task.score(
            train.make_eval_step(net.apply_fn), state._replace(params=result.params)
        )
        named = {"float": scores_float, "compressed": scores}
        sizes = {"float": bytes_dense, "compressed": loaded.nbytes}
        rows = [
            (stage, {"val_loss": named[n]["loss"], "perplexity": named[n]["perplexity"]}, sizes[n])
            for n, stage in zip(named, ("dense", "compressed"), strict=True)
        ]
        report = {
            "task": "lm",
            **{f"val_loss_{n}": s["loss"] for n, s in named.items()},
            **{f"perplexity_{n}": s["perplexity"] for n, s in named.items()},
            "vocab_size": len(train_set.vocab),
        }
    else:
        int_model = evaluate.integer_model(loaded, batch=min(256, len(held_out.labels)))
        fns = evaluate.forwards(loaded, int_model=int_model)
        scores = evaluate.evaluate(loaded, held_out, fns=fns)
        speed = evaluate.time_integer(fns, held_out.images)
        accuracy = {
            "float": scores_float["accuracy"],
            "compressed": scores["accuracy_compressed"],
            "integer": scores["accuracy_integer"],
        }
        sizes = {"dense": bytes_dense}
        rows = [
            (stage, {"accuracy": accuracy[name]}, sizes.get(stage, loaded.nbytes))
            for name, stage in zip(accuracy, ("dense", "compressed", "integer"), strict=True)
        ]
        report = {
            "task": "image",
            **{f"accuracy_{name}": value for name, value in accuracy.items()},
            "accuracy_float_activations": scores["accuracy_float_activations"],
            "inference_speedup_integer": speed["speedup"],
            "inference_ms": {"float": speed["float_ms"], "integer": speed["integer_ms"]},
            "integer_sites_markdown": export.integer_table(int_model),
        }
    report.update(common.report({"float": float_result}, loaded, bytes_dense, rows, tick))
    report["timings_s"] = {"load": loaded_s, "oneshot": oneshot_s, **report["timings_s"]}
    del report["timings_s"]["float"]
    report["oneshot"] = {
        "method": method,
        "passes": [m.name for m in passes],
        "bits": bits,
        "sparsity": f"{pattern.n}:{pattern.m}" if isinstance(pattern, prune.NM) else pattern,
        "group_size": group_size,
        "skip": skip,
        "dataset": cfg.data.dataset,
        "calibration_samples": len(x),
        "calibration_batch_size": cfg.compress.batch_size,
        "sequential": True,
        "source": os.path.join(directory, str(step)),
    }
    report["oneshot_layers"] = _layers(layers)
    report["oneshot_layers_markdown"] = oneshot.table(r for _, r in layers)
    dense = jax.device_get(state.params)
    report["plots"] = plots.write_all(report, dense, loaded, out, metric)
    return common.finish(cfg, report, run_file, start)
