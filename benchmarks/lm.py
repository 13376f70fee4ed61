"""GPT-tiny on tiny-shakespeare (characters): dense, 2:4-pruned, int8 and int4 weights.

Usage::

    python benchmarks/lm.py [--quick] [--steps 5000] [--data ../shared/data/tinyshakespeare.txt]

Reads ``tinyshakespeare.txt`` from ``../shared/data`` (says so and stops when it is missing) with
:func:`mixjax.data.load_text` (65 characters, the last 10 % as validation) and trains
:class:`mixjax.models.GPTTiny` at nanoGPT's CPU size (4 layers x 4 heads x 128, context 64,
batch 12, AdamW 1e-3 cosine-decayed, no dropout) with :func:`mixjax.train.make_train_step`
(``steps_per_call=50``). nanoGPT reports a validation loss of about 1.88 at this size; the goal
is <= 1.88 in <= 10 minutes on 2 CPU cores. Then:

* ``2:4``: kernels pruned 2:4 along their true contraction axes (:func:`mixjax.layout.learn`,
  ``prune.magnitude(None, structure=NM(2, 4), layouts=...)``; the tied embedding is left
  dense, as the layout-based default selection does), fine-tuned for a quarter of the steps;
* ``2:4 + int8``, ``2:4 + int4`` and group-wise ``int4 g32`` and ``int3 g32``: the
  pruned model's kernels fake-quantized per output feature, or per output feature and group of
  ``g`` along the contraction (``quant.fake_quant(bits, group_size=g, layouts=...)``,
  post-training), exported with :func:`mixjax.export.compress` (the bytes are the artifact's,
  embedding and scales included), and run again from the artifact on the integer path
  (:func:`mixjax.export.integer_model` weight-only: the codes dequantized at each site), whose
  validation loss is the "integer path" column.

The fine-tuned rows train ``steps // 4`` more steps than the dense one, so their loss mixes the
cost of the sparsity with the gain of the extra training.

Validation loss is the exact mean over the whole validation split
(:func:`mixjax.data.lm_eval_batches`). Prints one table and writes ``results/lm.json`` and the
plot ``results/lm.png`` (loss against bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixjax
from mixjax import _files, data, export, layout, models, prune, quant, train

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")
CONTEXT, BATCH, PER_CALL = 64, 12, 50
NANOGPT_VAL_LOSS = 1.88


def val_loss(apply_fn, state, transform, val, batch_size=64):
    """The mean next-token loss over the whole validation split (every target once)."""
    evaluate = train.make_eval_step(apply_fn, transform=transform)
    total = weight = 0.0
    for batch in data.lm_eval_batches(val, batch_size, CONTEXT):
        n = float(batch["weight"].sum())
        total += float(evaluate(state, batch)["loss"]) * n
        weight += n
    return total / weight


def fit(apply_fn, state, tx, transform, dataset, steps, seed):
    step = train.make_train_step(apply_fn, tx, transform=transform, steps_per_call=PER_CALL)
    batches = data.stacked_lm_batches(dataset, BATCH, CONTEXT, PER_CALL, seed=seed)
    losses = []
    tick = time.perf_counter()
    for _, group in zip(range(steps // PER_CALL), batches, strict=False):
        state, metrics = step(state, group)
        losses.append(metrics["loss"])
    jax.block_until_ready(state)
    return state, float(np.mean(np.asarray(losses[-1]))), time.perf_counter() - tick


def load_corpus(path):
    """The ``"train"`` and ``"val"`` splits of the character corpus at ``path``."""
    source = f"text:{path}"
    return data.load_text(source, "train"), data.load_text(source, "val")


def gpt_tiny(vocab_size):
    """GPT-tiny at this benchmark's size: ``(module, apply_fn, tokens)``, the linen module, its
    :func:`mixjax.train.linen_apply` and an example ``(1, CONTEXT)`` int32 input."""
    module = models.GPTTiny(vocab_size, context=CONTEXT)
    apply_fn = train.linen_apply(module, train_kwarg="train")
    return module, apply_fn, jnp.zeros((1, CONTEXT), jnp.int32)


def train_dense(train_set, steps, *, seed=0):
    """GPT-tiny trained dense on ``train_set`` for ``steps`` steps (the recipe of the module
    docstring; ``seed`` picks the initialization, ``seed + 1`` the state key, ``seed`` the data
    order).

    Returns:
      ``(module, apply_fn, state, seconds)``: the linen module, its
      :func:`mixjax.train.linen_apply`, the trained :class:`mixjax.train.TrainState` and the
      training wall time.
    """
    module, apply_fn, tokens = gpt_tiny(len(train_set.vocab))
    params = jax.jit(module.init)(jax.random.key(seed), tokens)["params"]
    schedule = optax.cosine_decay_schedule(1e-3, steps, alpha=0.1)
    tx = optax.adamw(schedule, weight_decay=0.1)
    dense = train.init_train_state(params, tx, key=jax.random.key(seed + 1))
    dense, _, seconds = fit(apply_fn, dense, tx, None, train_set, steps, seed=seed)
    return module, apply_fn, dense, seconds


def plot(results, dense_bytes, path):
    """Validation loss against stored bytes (log scale), one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [r["bytes"] for r in results], [r["val_loss"] for r in results]
    ax.plot(xs, ys, "o-")
    for r in results:
        ax.annotate(r["variant"], (r["bytes"], r["val_loss"]), textcoords="offset points",
                    xytext=(4, 6))  # fmt: skip
    ax.axhline(NANOGPT_VAL_LOSS, color="gray", linestyle="--", label="nanoGPT, this size")
    ax.set_xscale("log")
    ax.set_xlabel(f"artifact bytes (float32: {dense_bytes})")
    ax.set_ylabel("validation loss (nats per character)")
    ax.set_title("GPT-tiny on tiny-shakespeare")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="200 steps (a smoke run)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if not os.path.exists(args.data):
        print(f"benchmarks/lm.py: {args.data} is missing; nothing to measure")
        return
    steps = 200 if args.quick else args.steps
    train_set, val = load_corpus(args.data)
    module, apply_fn, dense, dense_s = train_dense(train_set, steps, seed=0)
    tokens = jnp.zeros((1, CONTEXT), jnp.int32)
    layouts = layout.learn(lambda p, x: module.apply({"params": p}, x), dense.params, tokens)
    rows = [("dense", val_loss(apply_fn, dense, None, val), dense.params, None, None, dense_s)]

    sparse = prune.magnitude(None, structure=prune.NM(2, 4), layouts=layouts)
    tune = optax.adamw(optax.cosine_decay_schedule(3e-4, steps // 4), weight_decay=0.1)
    pruned = train.init_train_state(dense.params, tune, key=jax.random.key(2), transform=sparse)
    pruned, _, tune_s = fit(apply_fn, pruned, tune, sparse, train_set, steps // 4, seed=1)
    view = sparse.apply(pruned.params, pruned.transform_state)
    rows.append(("2:4", val_loss(apply_fn, pruned, sparse, val), view, sparse, pruned, tune_s))
    forward = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    integer_losses = {}
    for bits, group in ((8, None), (4, None), (4, 32), (3, 32)):
        q = quant.fake_quant(bits, group_size=group, layouts=layouts)
        chained = mixjax.chain(sparse, q)
        state = pruned._replace(transform_state=(pruned.transform_state, q.init(view)))
        loss = val_loss(apply_fn, state, chained, val)
        name = f"2:4 + int{bits}" + ("" if group is None else f" g{group}")
        rows.append((name, loss, None, chained, state, 0.0))
        # The exported artifact on the integer path (weight-only: codes dequantized per site).
        artifact = export.compress(state.params, chained, state.transform_state)
        int_model = export.integer_model(forward, artifact, tokens)
        restored = artifact.params()

        def integer_apply_fn(params, model_state, x, *, train, key, m=int_model, r=restored):
            return export.integer_apply(m, forward, r, x), model_state

        integer_losses[name] = val_loss(integer_apply_fn, state, None, val)

    dense_bytes = 4 * sum(int(np.size(x)) for x in jax.tree.leaves(dense.params))
    results = []
    for name, loss, _, transform, state, seconds in rows:
        if transform is None:
            plain = mixjax.identity()
            nbytes = export.compress(dense.params, plain, plain.init(dense.params)).nbytes
        else:
            nbytes = export.compress(state.params, transform, state.transform_state).nbytes
        results.append(
            {
                "variant": name,
                "val_loss": loss,
                "val_loss_integer": integer_losses.get(name),
                "perplexity": float(np.exp(loss)),
                "bytes": nbytes,
                "train_s": seconds,
            }  # fmt: skip
        )
    base = results[0]["val_loss"]
    print(f"GPT-tiny 4x4x128, context {CONTEXT}, batch {BATCH}, {steps} steps (+{steps // 4} "
          f"fine-tuning); nanoGPT at this size: val loss {NANOGPT_VAL_LOSS}\n")  # fmt: skip
    print("| variant | val loss | increase | integer path | perplexity | bytes | x float32 | "
          "train s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        on_integers = "" if r["val_loss_integer"] is None else f"{r['val_loss_integer']:.4f}"
        print(
            f"| {r['variant']} | {r['val_loss']:.4f} | {r['val_loss'] - base:+.4f} | "
            f"{on_integers} | {r['perplexity']:.2f} | {r['bytes']} | "
            f"{dense_bytes / r['bytes']:.1f}x | {r['train_s']:.0f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "lm.json")
    meta = {
        "steps": steps,
        "context": CONTEXT,
        "batch": BATCH,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    payload = {"meta": meta, "dense_float32_bytes": dense_bytes, "rows": results}
    _files.write_atomic(path, lambda f: json.dump(payload, f, indent=2), text=True)
    plot(results, dense_bytes, os.path.join(args.out, "lm.png"))
    print(f"\nwrote {path} and lm.png")


if __name__ == "__main__":
    main()
