"""One-shot compression from calibration data: magnitude, Wanda, SparseGPT, RTN, GPTQ, vs qwix.

Usage::

    python benchmarks/oneshot.py [--quick] [--steps 2000] [--image-steps 2000]
        [--calibration-samples 128] [--models gpt_tiny,lenet5,vit_tiny] [--no-qwix]
        [--data ../shared/data/tinyshakespeare.txt]

Three trained float models, each compressed with no retraining by
:func:`mixjax.oneshot.compress` (sequential, layer by layer, default selection: every kernel a
matmul or convolution consumes; embeddings, and so GPT-tiny's tied token embedding, stay float):

* **GPT-tiny** (4 layers x 4 heads x 128, context 64) trained on tiny-shakespeare with
  ``benchmarks/lm.py``'s recipe (:func:`lm.train_dense`) for ``--steps`` steps (2000 by default;
  ``lm.py`` trains 5000), scored by ``lm.val_loss``: the exact mean next-token loss over the
  whole validation split, and its perplexity ``exp(loss)``. Calibration: ``--calibration-samples``
  random windows of 64 tokens from the training split. Skipped, with a message, when the corpus
  (``../shared/data/tinyshakespeare.txt``) is missing.
* **LeNet-5** and **ViT-tiny** (the registry's defaults: 128 wide, 4 blocks, 4x4 patches) on the
  embedded 8x8 digits, trained with AdamW for ``--image-steps`` steps, scored by accuracy on the
  whole test split (359 images: one image is 0.28 points). Calibration: as many random training
  images. Their layers are small, so where a rule needs a divisor the selection says what it
  did: LeNet-5's convolutions contract over 25 and 150 rows (5x5 windows of 1 and 6 channels),
  which 4 does not divide, so its 2:4 rows prune the three Dense kernels only; its input channels
  (1 and 6) admit no group of 32, so its quantized rows are per output channel; ViT-tiny's patch
  embedding has one input channel, so its group-wise rows leave that 2,048-weight kernel float.

Rows per model: dense; :func:`mixjax.prune.layer_magnitude`, :func:`mixjax.prune.wanda` and
:func:`mixjax.prune.sparsegpt` at 50 % (per output feature) and 2:4; :func:`mixjax.quant.rtn` and
:func:`mixjax.quant.gptq` and :func:`mixjax.quant.awq` at int4 and int3 in groups of 32 (min/max
grid with zero points, the default; AWQ's per-input-feature factors are stored beside the codes
and fold into the dequantized kernel on the integer path); SparseGPT 2:4 jointly with int4
(``sparsegpt(NM(2, 4), bits=4, group_size=32)``).
Each row gives the bytes of its :func:`mixjax.export.compress` artifact (packed codes, masks and
scales included) and, for the quantized ones, the metric again on the integer path
(:func:`mixjax.export.integer_model` weight-only, the codes dequantized at each site), and the
wall time of the compression (calibration passes, per-layer solves and their compilation).

qwix's GPTQ (``qwix.contrib.gptq``, a benchmark-only peer: ``pip install -e ".[bench]"``) runs
on the same GPT-tiny and calibration windows, at int4 and int3 in groups of 32. As shipped
(0.1.8) it needs two concessions, both recorded in the JSON: its calibration must be limited to
``dot_general`` (``op_names``), because its ``einsum`` hook passes ``_dot_general`` twice to
flax's attention einsum (a ``TypeError``); and it only runs symmetric (``absmax``), because the
asymmetric path evaluates ``zero_point and ...`` on an array (a ``ValueError``). It gathers its
statistics in one pass over the float model, and it skips layers with two contraction axes
(the attention output projection), which it rounds to nearest instead. So the comparison rows
are mixjax GPTQ symmetric, sequential and one-pass (``sequential=False``, qwix's schedule), on
the same selection. qwix has no int3 dtype, so its int3 row says so. Its GPTQ runs eagerly, one
small op per column slice, and those ops compile on the first call in a process (over a minute,
whatever the layers); the int4 row is that first call (mixjax's times include compiling too),
and a warm rerun follows. ``--quick`` skips qwix for that reason.

Goals (from the issue): at 50 %, SparseGPT and Wanda lose <= 1/3 of the perplexity magnitude
loses; at 3 bits GPTQ loses <= 1/2 of what RTN loses; mixjax GPTQ is no worse than qwix's and no
slower. For the image models the same ratios are computed on accuracy points lost.

``--quick`` (a smoke run, about 3 minutes on 2 shared cores): 200 GPT-tiny and 300 image
training steps, 32 calibration samples, the rows the goals read plus the joint one, no qwix.

Trained parameters are cached in ``benchmarks/results/oneshot_cache/`` (``--cache``; one
``.npz`` per model, keyed by its step count and seed, git-ignored), so a re-run skips training;
``--retrain`` ignores the cache.
Prints one table and writes ``results/oneshot.json`` and the plot ``results/oneshot.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixjax
from mixjax import _files, data, export, models, oneshot, prune, quant, train

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
lm = importlib.import_module("lm")  # benchmarks/lm.py: GPT-tiny's training recipe and eval

CACHE = os.path.join(HERE, "results", "oneshot_cache")
IMAGE_BATCH, IMAGE_PER_CALL = 128, 50
IMAGE_LR = {"lenet5": 3e-3, "vit_tiny": 1e-3}
CALIBRATION_BATCH = 16
MODEL_NAMES = ("gpt_tiny", "lenet5", "vit_tiny")
# --quick keeps the rows the goals read and the joint one, and skips qwix: its eager GPTQ
# compiles one small op per column slice on its first call, over a minute whatever the layers.
QUICK_ROWS = (
    "magnitude 50%",
    "Wanda 50%",
    "SparseGPT 50%",
    "RTN int3",
    "GPTQ int3",
    "AWQ int3",
    "SparseGPT 2:4 +",
)
BLOCKS = r"block\d+/"


class Model(NamedTuple):
    """A trained model and how to score it.

    Attributes:
      name: ``"gpt_tiny"``, ``"lenet5"`` or ``"vit_tiny"``.
      module: the linen module.
      fn: ``fn(params, x)``, the inference forward that :func:`mixjax.oneshot.compress` reads.
      params: the trained float params.
      batches: the calibration batches (inputs of ``fn``).
      score: ``params -> float``: validation loss (GPT-tiny) or test accuracy in % (images).
      score_integer: ``(artifact) -> float``: the same metric on the integer path.
      example: one input, for :func:`mixjax.export.integer_model`.
      group: the group size of the quantized rows (``None``: per output channel).
      nm_where: the ``where=`` of the 2:4 rows (``None``: the default selection).
      quant_where: the ``where=`` of the group-wise rows.
      train_s: the training wall time (0 when loaded from the cache).
    """

    name: str
    module: Any
    fn: Callable[..., Any]
    params: Any
    batches: list
    score: Callable[[Any], float]
    score_integer: Callable[[Any], float]
    example: Any
    group: int | None
    nm_where: Any
    quant_where: Any
    train_s: float


# ------------------------------------------------------------------------------ parameter cache


def _keyed(params) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def cached(path: str, template: Any, make: Callable[[], Any], retrain: bool):
    """``(params, seconds)``: the params stored at ``path`` (shaped as ``template``), or
    ``make()``'s, which are then stored there."""
    if os.path.exists(path) and not retrain:
        with np.load(path) as stored:
            flat, treedef = jax.tree_util.tree_flatten_with_path(template)
            leaves = []
            for key, like in flat:
                value = stored[jax.tree_util.keystr(key)]
                if value.shape != like.shape:
                    raise ValueError(
                        f"{path}: {jax.tree_util.keystr(key)} has shape "
                        f"{value.shape}, expected {like.shape}; pass --retrain"
                    )
                leaves.append(jnp.asarray(value, like.dtype))
        print(f"loaded the trained params from {os.path.relpath(path)}")
        return jax.tree.unflatten(treedef, leaves), 0.0
    tick = time.perf_counter()
    params = jax.block_until_ready(make())
    seconds = time.perf_counter() - tick
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _files.write_atomic(path, lambda f: np.savez(f, **_keyed(params)))
    return params, seconds


# ------------------------------------------------------------------------------ the models


def gpt_tiny(args, steps: int, samples: int) -> Model | None:
    if not os.path.exists(args.data):
        print(f"benchmarks/oneshot.py: {args.data} is missing; GPT-tiny skipped")
        return None
    train_set, val = lm.load_corpus(args.data)
    module, apply_fn, tokens = lm.gpt_tiny(len(train_set.vocab))
    template = jax.eval_shape(module.init, jax.random.key(0), tokens)["params"]
    path = os.path.join(args.cache, f"gpt_tiny-steps{steps}-seed{args.seed}.npz")
    params, seconds = cached(
        path,
        template,
        lambda: lm.train_dense(train_set, steps, seed=args.seed)[2].params,
        args.retrain,
    )
    rng = np.random.default_rng([args.seed, 1])
    starts = rng.integers(0, len(train_set.tokens) - lm.CONTEXT, samples)
    windows = train_set.tokens[starts[:, None] + np.arange(lm.CONTEXT)]
    batches = [
        jnp.asarray(b) for b in np.array_split(windows, max(1, samples // CALIBRATION_BATCH))
    ]
    holder = train.init_train_state(params, optax.sgd(0.0), key=jax.random.key(0))
    forward = lambda p, x: module.apply({"params": p}, x)  # noqa: E731

    def score(p):
        return lm.val_loss(apply_fn, holder._replace(params=p), None, val)

    def score_integer(artifact):
        int_model = export.integer_model(forward, artifact, tokens)
        restored = artifact.params()

        def integer_apply_fn(params, model_state, x, *, train, key):
            return export.integer_apply(int_model, forward, restored, x), model_state

        return lm.val_loss(integer_apply_fn, holder, None, val)

    return Model(
        "gpt_tiny",
        module,
        forward,
        params,
        batches,
        score,
        score_integer,
        tokens,
        32,
        None,
        None,
        seconds,
    )


def image_model(name: str, args, steps: int, samples: int) -> Model:
    train_set, test = data.load("digits", "train"), data.load("digits", "test")
    module = models.create(name, train_set.num_classes)
    apply_fn = train.linen_apply(module, train_kwarg=models.MODELS[name].train_kwarg)
    example = data.normalize(train_set.images[:1])
    template = jax.eval_shape(module.init, jax.random.key(0), example)["params"]

    def fit():
        params = jax.jit(module.init)(jax.random.key(args.seed), example)["params"]
        schedule = optax.cosine_decay_schedule(IMAGE_LR[name], steps, alpha=0.0)
        tx = optax.adamw(schedule, weight_decay=1e-3)
        state = train.init_train_state(params, tx, key=jax.random.key(args.seed + 1))
        step = train.make_train_step(
            apply_fn, tx, preprocess=data.normalize, steps_per_call=IMAGE_PER_CALL
        )
        groups = data.stacked_batches(
            train_set, IMAGE_BATCH, IMAGE_PER_CALL, seed=args.seed, epochs=None
        )
        for _, group in zip(range(max(1, steps // IMAGE_PER_CALL)), groups, strict=False):
            state, _ = step(state, group)
        return state.params

    path = os.path.join(args.cache, f"{name}-steps{steps}-seed{args.seed}.npz")
    params, seconds = cached(path, template, fit, args.retrain)
    rng = np.random.default_rng([args.seed, 2])
    chosen = data.normalize(train_set.images[rng.choice(len(train_set.labels), samples, False)])
    batches = [jnp.asarray(b) for b in np.array_split(chosen, max(1, samples // CALIBRATION_BATCH))]
    forward = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    images, labels = jnp.asarray(data.normalize(test.images)), np.asarray(test.labels)
    logits_of = jax.jit(forward)

    def accuracy(logits):
        return 100.0 * float(np.mean(np.asarray(logits).argmax(-1) == labels))

    def score_integer(artifact):
        int_model = export.integer_model(forward, artifact, example)
        restored = artifact.params()
        run = jax.jit(lambda x: export.integer_apply(int_model, forward, restored, x))
        return accuracy(run(images))

    if name == "lenet5":
        group, nm_where, quant_where = None, r"Dense_\d+/kernel", None
    else:
        group, nm_where, quant_where = 32, None, r"(block\d+/.*|head)/kernel"
    return Model(
        name,
        module,
        forward,
        params,
        batches,
        lambda p: accuracy(logits_of(p, images)),
        score_integer,
        example,
        group,
        nm_where,
        quant_where,
        seconds,
    )


# ------------------------------------------------------------------------------ the rows


def variants(m: Model, quick: bool = False) -> list[tuple[str, Any, Any, bool]]:
    """``(label, method, where, sequential)`` of every compressed row of ``m`` (``quick``: those
    of :data:`QUICK_ROWS`)."""
    g = m.group
    grid = "per-channel" if g is None else f"g{g}"
    nm = prune.NM(2, 4)
    rows = []
    for label, pattern, where in (("50%", 0.5, None), ("2:4", nm, m.nm_where)):
        rows.append((f"magnitude {label}", prune.layer_magnitude(pattern), where, True))
        rows.append((f"Wanda {label}", prune.wanda(pattern), where, True))
        rows.append((f"SparseGPT {label}", prune.sparsegpt(pattern), where, True))
    for bits in (4, 3):
        rows.append((f"RTN int{bits} {grid}", quant.rtn(bits, group_size=g), m.quant_where, True))
        gptq = quant.gptq(bits, group_size=g)
        rows.append((f"GPTQ int{bits} {grid}", gptq, m.quant_where, True))
        awq = quant.awq(bits, group_size=g)
        rows.append((f"AWQ int{bits} {grid}", awq, m.quant_where, True))
    joint = prune.sparsegpt(nm, bits=4, group_size=g)
    both = m.quant_where if m.nm_where is None else m.nm_where
    rows.append((f"SparseGPT 2:4 + int4 {grid}", joint, both, True))
    if m.name == "gpt_tiny":  # the rows matched to qwix's GPTQ: symmetric, and one pass
        for bits in (4, 3):
            sym = quant.gptq(bits, group_size=g, symmetric=True)
            rows.append((f"GPTQ int{bits} {grid} sym", sym, None, True))
            rows.append((f"GPTQ int{bits} {grid} sym, one pass", sym, None, False))
    if quick:
        rows = [r for r in rows if r[0].startswith(QUICK_ROWS)]
    return rows


def nbytes(params, transform=None, state=None) -> int:
    if transform is None:
        transform = mixjax.identity()
        state = transform.init(params)
    return export.compress(params, transform, state).nbytes


def run_model(m: Model, quick: bool = False) -> list[dict]:
    dense = m.score(m.params)
    rows = [
        {
            "variant": "dense",
            "metric": dense,
            "metric_integer": None,
            "bytes": nbytes(m.params),
            "compress_s": 0.0,
            "where": None,
        }
    ]
    for label, method, where, sequential in variants(m, quick):
        tick = time.perf_counter()
        result = oneshot.compress(
            method, m.fn, m.params, m.batches, where=where, sequential=sequential
        )
        jax.block_until_ready(result.params)
        seconds = time.perf_counter() - tick
        artifact = export.compress(result.params, result.transform, result.state)
        metric = m.score(result.params)
        integer, in_float = None, []
        if method.quant is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                integer = m.score_integer(artifact)
            in_float = [str(w.message) for w in caught if "run in float" in str(w.message)]
        errors = [r.error for r in result.layers if not np.isnan(r.error)]
        rows.append(
            {
                "variant": label,
                "metric": metric,
                "metric_integer": integer,
                "bytes": artifact.nbytes,
                "compress_s": seconds,
                "where": where,
                "sequential": sequential,
                "layers": len(result.layers),
                "mean_layer_error": float(np.mean(errors)) if errors else None,
                "integer_path_notes": in_float,
                "sparsity": float(np.mean([r.sparsity for r in result.layers])),
            }
        )
        print(f"  {m.name}: {label}: {metric:.4f} in {seconds:.1f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------ qwix


def qwix_rows(m: Model, val_score: Callable[[Any, Any], float]) -> list[dict]:
    """qwix's GPTQ on GPT-tiny at int4 (first call, then a warm rerun: qwix's eager ops are
    compiled on the first) and int3, g32; a row that cannot run says why."""
    try:
        import qwix  # benchmark-only dependency
        from qwix.contrib import gptq as qwix_gptq
    except Exception as err:  # noqa: BLE001  (any import failure is recorded, not raised)
        return [{"variant": "qwix GPTQ", "unavailable": f"qwix does not import: {err!r}"}]
    rows = []
    for bits, rerun in ((4, False), (4, True), (3, False)):
        label = f"qwix GPTQ int{bits} g{m.group} sym" + (", warm rerun" if rerun else "")
        try:  # qwix quantizes to JAX dtypes: int4 and int8 exist, int3 does not
            jnp.dtype(f"int{bits}")
        except TypeError as err:
            rows.append({"variant": label, "unavailable": f"qwix has no int{bits} ({err})"})
            continue
        # Only dot_general: qwix's einsum hook breaks flax's attention einsum (module docstring);
        # symmetric: its asymmetric GPTQ path raises. The tied embedding (token_embed) stays
        # float, as in mixjax's default selection.
        rule = qwix_gptq.GptqRule(
            module_path=f"{BLOCKS}.*",
            weight_qtype=f"int{bits}",
            tile_size=m.group,
            weight_calibration_method="absmax",
            op_names=("dot_general",),
        )
        try:
            tick = time.perf_counter()
            calibrating = qwix.quantize_model(m.module, qwix_gptq.GptqCalibrationProvider([rule]))
            stats = None
            for batch in m.batches:
                variables = {"params": m.params} | ({} if stats is None else {"quant_stats": stats})
                _, new = calibrating.apply(variables, batch, mutable="quant_stats")
                stats = new["quant_stats"]
            ptq = qwix.quantize_model(m.module, qwix.PtqProvider([rule]))
            abstract = jax.eval_shape(ptq.init, jax.random.key(0), m.example)["params"]
            qparams = qwix_gptq.quantize_params(m.params, abstract, stats)
            jax.block_until_ready(qparams)
            seconds = time.perf_counter() - tick
            metric = val_score(ptq, qparams)
        except Exception as err:  # noqa: BLE001  (a failure is what the row reports)
            rows.append({"variant": label, "unavailable": f"{type(err).__name__}: {err}"})
            continue
        rows.append(
            {
                "variant": label,
                "metric": metric,
                "metric_integer": None,
                "bytes": None,
                "compress_s": seconds,
                "where": f"{BLOCKS}.* dot_general kernels",
            }
        )
        print(f"  {m.name}: {label}: {metric:.4f} in {seconds:.1f} s", flush=True)
    return rows


def gpt_qwix_score(args, m: Model):
    """``(ptq_model, qparams) -> validation loss`` for qwix's quantized GPT-tiny."""
    train_set, val = lm.load_corpus(args.data)
    holder = train.init_train_state(m.params, optax.sgd(0.0), key=jax.random.key(0))

    def score(ptq, qparams):
        def apply_fn(params, model_state, x, *, train, key):
            return ptq.apply({"params": params}, x), model_state

        return lm.val_loss(apply_fn, holder._replace(params=qparams), None, val)

    return score


# ------------------------------------------------------------------------------ report


def _find(rows, prefix):
    return next((r for r in rows if r["variant"].startswith(prefix) and "metric" in r), None)


def goals(name: str, rows: list[dict]) -> list[dict]:
    """The issue's goals on this model's rows: ratios of what each method loses."""
    lm_task = name == "gpt_tiny"
    dense = rows[0]["metric"]
    # Lost: perplexity for the LM, accuracy points for images.
    lost = (
        (lambda r: np.exp(r["metric"]) - np.exp(dense))
        if lm_task
        else (lambda r: dense - r["metric"])
    )
    out = []

    def ratio(label, a, b, limit):
        if a is None or b is None:
            return
        la, lb = float(lost(a)), float(lost(b))
        value = la / lb if lb > 0 else (0.0 if la <= 0 else float("inf"))
        out.append(
            {
                "goal": label,
                "lost": la,
                "baseline_lost": lb,
                "ratio": value,
                "limit": limit,
                "met": bool(value <= limit),
            }
        )

    magnitude = _find(rows, "magnitude 50%")
    for method in ("SparseGPT 50%", "Wanda 50%"):
        ratio(f"{method} lost / magnitude 50% lost", _find(rows, method), magnitude, 1 / 3)
    for method in ("SparseGPT 2:4", "Wanda 2:4"):
        ratio(
            f"{method} lost / magnitude 2:4 lost (info)",
            _find(rows, method),
            _find(rows, "magnitude 2:4"),
            1 / 3,
        )
    ratio("GPTQ int3 lost / RTN int3 lost", _find(rows, "GPTQ int3"), _find(rows, "RTN int3"), 0.5)
    for bits in (3, 4):
        ratio(
            f"AWQ int{bits} lost / RTN int{bits} lost (info)",
            _find(rows, f"AWQ int{bits}"),
            _find(rows, f"RTN int{bits}"),
            0.5,
        )
    ratio(
        "GPTQ int4 lost / RTN int4 lost (info)",
        _find(rows, "GPTQ int4"),
        _find(rows, "RTN int4"),
        0.5,
    )
    if lm_task:
        for bits in (4, 3):
            theirs = _find(rows, f"qwix GPTQ int{bits}")
            for schedule in ("", ", one pass"):
                ours = next(
                    (
                        r
                        for r in rows
                        if r["variant"].startswith(f"GPTQ int{bits} g32 sym{schedule}")
                        and (schedule or "one pass" not in r["variant"])
                    ),
                    None,
                )
                if ours is None or theirs is None:
                    continue
                what = f"mixjax GPTQ int{bits} sym{schedule}"
                warm = _find(rows, f"qwix GPTQ int{bits} g32 sym, warm rerun")
                if warm is not None:
                    out.append(
                        {
                            "goal": f"{what} time <= qwix's warm rerun (info)",
                            "value": ours["compress_s"],
                            "qwix": warm["compress_s"],
                            "met": bool(ours["compress_s"] <= warm["compress_s"]),
                        }
                    )
                for key, noun in (("metric", "loss"), ("compress_s", "time")):
                    out.append(
                        {
                            "goal": f"{what} {noun} <= qwix's",
                            "value": ours[key],
                            "qwix": theirs[key],
                            "met": bool(ours[key] <= theirs[key]),
                        }
                    )
    return out


def print_table(results: dict) -> None:
    print(
        "| model | variant | val loss / test acc | increase | perplexity | integer path | "
        "bytes | x float32 | compress s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, block in results.items():
        rows, lm_task = block["rows"], name == "gpt_tiny"
        dense, base_bytes = rows[0]["metric"], rows[0]["bytes"]
        for r in rows:
            if "unavailable" in r:
                print(
                    f"| {name} | {r['variant']} | unavailable: {r['unavailable'][:90]} "
                    "| | | | | | |"
                )
                continue
            if lm_task:
                metric, delta = f"{r['metric']:.4f}", f"{r['metric'] - dense:+.4f}"
                ppl = f"{np.exp(r['metric']):.3f}"
                integer = "" if r["metric_integer"] is None else f"{r['metric_integer']:.4f}"
            else:
                metric, delta, ppl = f"{r['metric']:.2f} %", f"{r['metric'] - dense:+.2f}", ""
                integer = "" if r["metric_integer"] is None else f"{r['metric_integer']:.2f} %"
            size = "" if r["bytes"] is None else str(r["bytes"])
            ratio = "" if r["bytes"] is None else f"{base_bytes / r['bytes']:.1f}x"
            print(
                f"| {name} | {r['variant']} | {metric} | {delta} | {ppl} | {integer} | {size} "
                f"| {ratio} | {r['compress_s']:.1f} |"
            )
    print("\n| model | goal | measured | limit | met |")
    print("|---|---|---:|---:|---|")
    for name, block in results.items():
        for g in block["goals"]:
            if "ratio" in g:
                measured = f"{g['ratio']:.2f} ({g['lost']:+.3f} / {g['baseline_lost']:+.3f})"
                limit = f"{g['limit']:.2f}"
            else:
                form = ".1f" if " time <= " in g["goal"] else ".4f"
                measured = f"{g['value']:{form}} vs qwix {g['qwix']:{form}}"
                limit = ""
            print(
                f"| {name} | {g['goal']} | {measured} | {limit} | {'yes' if g['met'] else 'no'} |"
            )


def plot(results: dict, path: str) -> None:
    """GPT-tiny's perplexity increase per variant (and accuracy lost for the image models)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rows = [r for r in results[name]["rows"][1:] if "metric" in r]
        dense = results[name]["rows"][0]["metric"]
        if name == "gpt_tiny":
            values = [np.exp(r["metric"]) - np.exp(dense) for r in rows]
            ax.set_xlabel(f"perplexity increase (dense {np.exp(dense):.2f})")
        else:
            values = [dense - r["metric"] for r in rows]
            ax.set_xlabel(f"accuracy points lost (dense {dense:.2f} %)")
        ax.barh([r["variant"] for r in rows], values)
        ax.invert_yaxis()
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=lm.DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=2000, help="GPT-tiny training steps")
    parser.add_argument("--image-steps", type=int, default=2000, help="LeNet-5 / ViT-tiny steps")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODEL_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-qwix", action="store_true", help="skip qwix's GPTQ (--quick does)")
    parser.add_argument("--retrain", action="store_true", help="ignore the params cache")
    parser.add_argument("--cache", default=CACHE, help="where trained params are cached")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 200 / 300 training steps, 32 calibration samples",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    chosen = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(MODEL_NAMES))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODEL_NAMES)}")
    steps = 200 if args.quick else args.steps
    image_steps = 300 if args.quick else args.image_steps
    samples = 32 if args.quick else args.calibration_samples
    results, meta_models = {}, {}
    for name in chosen:
        if name == "gpt_tiny":
            m = gpt_tiny(args, steps, samples)
            if m is None:
                continue
        else:
            m = image_model(name, args, image_steps, samples)
        print(f"{name}: trained in {m.train_s:.0f} s; compressing", flush=True)
        rows = run_model(m, args.quick)
        if name == "gpt_tiny" and not (args.no_qwix or args.quick):
            rows += qwix_rows(m, gpt_qwix_score(args, m))
        results[name] = {"rows": rows, "goals": goals(name, rows)}
        meta_models[name] = {
            "train_steps": steps if name == "gpt_tiny" else image_steps,
            "train_s": m.train_s,
            "group_size": m.group,
            "nm_where": m.nm_where,
            "quant_where": m.quant_where,
        }
    if not results:
        print("benchmarks/oneshot.py: nothing measured")
        return
    print(
        f"\nOne-shot compression, {samples} calibration samples, sequential layer by layer; "
        f"GPT-tiny {steps} steps, images {image_steps} steps\n"
    )
    print_table(results)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "oneshot.json")
    meta = {
        "quick": args.quick,
        "calibration_samples": samples,
        "seed": args.seed,
        "models": meta_models,
        "qwix_notes": [
            "calibration limited to op_names=('dot_general',): qwix 0.1.8's einsum hook passes "
            "_dot_general twice to flax's attention einsum (TypeError)",
            "symmetric (absmax) only: the asymmetric (minmax) GPTQ path evaluates "
            "`zero_point and ...` on an array (ValueError)",
            "one pass over the float model; kernels with two contraction axes (attn/out) get "
            "no Hessian and are rounded to nearest (qwix's PTQ fallback)",
        ],
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    payload = {"meta": meta, "results": results}
    _files.write_atomic(path, lambda f: json.dump(payload, f, indent=2), text=True)
    plot(results, os.path.join(args.out, "oneshot.png"))
    print(f"\nwrote {path} and oneshot.png")


if __name__ == "__main__":
    main()
