"""Cost of the composed ``mixjax.train`` step over a plain Flax + optax step; K steps per call.

(a) Overhead. LeNet-300-100 and LeNet-5 on 28x28x1 ``uint8`` inputs (normalized inside the step),
Adam(1e-3). Variants, all jitted with donated state:

* ``plain``: a hand-written Flax + optax step (normalize, forward, cross-entropy, grad, Adam);
* ``mixjax``: :func:`mixjax.train.make_train_step` with the identity transform (the wrapper alone);
* each component alone on top of it: ``prune`` (magnitude 90 %, masks recomputed every 10 steps),
  ``cluster`` (16 clusters, fixed assignments, trained centroids), ``quant`` (8-bit per-channel
  fake-quant, scales refreshed every 10 steps like the masks), ``augment`` (flip + pad-2 crop
  + brightness + mixup), ``delay`` (``delayed(adam, tau=2, compensation="dc")``);
* ``full``: all of them together (``chain(prune, cluster, quant)``, augmentation, delay).

(b) Steps per call. LeNet-300-100, ``steps_per_call=10`` against 1 for the identity and the full
stack, fed host NumPy batches as :mod:`mixjax.data` yields them (``stacked_batches`` for K = 10).

Each round times a block of 10 steps of every variant (one call for K = 10, so each pruning block
contains exactly one mask update), in alternating order, blocking on the results once per
block; the tables report medians over rounds and ratios.

    python benchmarks/step.py [--rounds 40] [--quick] [--skip-lenet5]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixjax
from mixjax import augment, data, delay, models, prune, quant, share, train

BLOCK = 10  # steps per timed block; pruning masks update once per block
CLASSES = 10


def plain_step(module, tx):
    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, batch):
        params, opt_state = carry
        images, labels = data.normalize(batch["image"]), batch["label"]

        def loss_fn(p):
            logits = module.apply({"params": p}, images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return (optax.apply_updates(params, updates), opt_state), {
            "loss": loss,
            "accuracy": accuracy,
        }

    return step


def components():
    """Factories of each component, fresh per model (transforms hold jitted closures)."""
    return {
        "prune": lambda: dict(transform=prune.magnitude(0.9, update_every=BLOCK)),
        "cluster": lambda: dict(transform=share.cluster(16)),
        "quant": lambda: dict(transform=quant.fake_quant(8, update_every=BLOCK)),
        "augment": lambda: dict(
            augment=augment.chain(
                augment.random_flip(),
                augment.random_crop(padding=2),
                augment.random_brightness(0.2),
                augment.mixup(0.2, num_classes=CLASSES),
            )
        ),
        "delay": lambda: dict(tx=delay.delayed(optax.adam(1e-3), 2, compensation="dc")),
    }


def full_stack():
    parts = {name: make() for name, make in components().items()}
    return dict(
        transform=mixjax.chain(
            parts["prune"]["transform"], parts["cluster"]["transform"], parts["quant"]["transform"]
        ),
        augment=parts["augment"]["augment"],
        tx=parts["delay"]["tx"],
    )


def mixjax_variant(module, params, config, steps_per_call=1):
    config = dict(config)
    tx = config.pop("tx", optax.adam(1e-3))
    transform = config.get("transform")
    step = train.make_train_step(
        train.linen_apply(module),
        tx,
        preprocess=data.normalize,
        steps_per_call=steps_per_call,
        **config,
    )
    state = train.init_train_state(params, tx, transform=transform, key=jax.random.key(0))
    return step, state


def host_batches(batch, steps, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (steps, batch, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, (steps, batch)).astype(np.int32)
    return {"image": images, "label": labels}


def run_block(step, carry, batches):
    """Runs one block; ``batches`` is a list of per-call batches. Blocks once at the end."""
    metrics = []
    for batch in batches:
        carry, m = step(carry, batch)
        metrics.append(m)
    jax.block_until_ready((carry, metrics))
    return carry


def time_variants(variants, rounds):
    """``variants``: name -> (step, carry, per-call batches).

    Returns ``(wall, cpu, carries)``: name -> median wall-clock ms per step, name -> median
    process CPU ms per step (all threads; steadier than wall time on a shared machine).
    """
    carries = {}
    for name, (step, carry, batches) in variants.items():  # compile and warm up
        carries[name] = run_block(step, run_block(step, carry, batches), batches)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    order = list(variants)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            step, _, batches = variants[name]
            start, start_cpu = time.perf_counter(), time.process_time()
            carries[name] = run_block(step, carries[name], batches)
            wall[name].append((time.perf_counter() - start) / BLOCK)
            cpu[name].append((time.process_time() - start_cpu) / BLOCK)

    def median_ms(times):
        return {name: 1e3 * float(np.median(t)) for name, t in times.items()}

    return median_ms(wall), median_ms(cpu), carries


def overhead(name, module, batch, rounds):
    params = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    stacked = host_batches(batch, BLOCK)
    # Device-resident batches, the same for every variant, so (a) times the step alone.
    batches = [jax.device_put({k: v[i] for k, v in stacked.items()}) for i in range(BLOCK)]
    tx = optax.adam(1e-3)
    variants = {"plain": (plain_step(module, tx), (params, tx.init(params)), batches)}
    configs = {"mixjax": {}, **{c: make() for c, make in components().items()}}
    configs["full"] = full_stack()
    for variant, config in configs.items():
        step, state = mixjax_variant(module, params, config)
        variants[variant] = (step, state, batches)
    step_ms, cpu_ms, carries = time_variants(variants, rounds)
    return {
        "model": name,
        "batch": batch,
        "step_ms": step_ms,
        "cpu_ms": cpu_ms,
        "ratio": {v: step_ms[v] / step_ms["plain"] for v in step_ms if v != "plain"},
        "cpu_ratio": {v: cpu_ms[v] / cpu_ms["plain"] for v in cpu_ms if v != "plain"},
        "sparsity_after": prune.summary(carries["full"].params).sparsity,
    }


def steps_per_call(module, batch, rounds):
    params = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    stacked = host_batches(batch, BLOCK)
    singles = [{k: v[i] for k, v in stacked.items()} for i in range(BLOCK)]
    variants = {}
    for config_name, config in (("identity", {}), ("full", full_stack())):
        for k in (1, BLOCK):
            step, state = mixjax_variant(module, params, config, k)
            variants[f"{config_name} K={k}"] = (step, state, singles if k == 1 else [stacked])
    step_ms, cpu_ms, _ = time_variants(variants, rounds)
    configs = ("identity", "full")
    return {
        "model": "LeNet-300-100",
        "batch": batch,
        "step_ms": step_ms,
        "cpu_ms": cpu_ms,
        "speedup": {c: step_ms[f"{c} K=1"] / step_ms[f"{c} K={BLOCK}"] for c in configs},
        "cpu_speedup": {c: cpu_ms[f"{c} K=1"] / cpu_ms[f"{c} K={BLOCK}"] for c in configs},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="4 rounds, LeNet-300-100, batch 32")
    parser.add_argument("--skip-lenet5", action="store_true", help="part (a) on LeNet-300-100 only")
    parser.add_argument("--batches", default="8,32,128", help="batch sizes of part (b)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    rounds = 4 if args.quick else args.rounds
    k_batches = [32] if args.quick else [int(b) for b in args.batches.split(",")]

    rows = [overhead("LeNet-300-100", models.LeNet300100(CLASSES), 128, rounds)]
    if not (args.quick or args.skip_lenet5):
        # About 100 ms per step on 2 CPU cores: fewer rounds.
        rows.append(overhead("LeNet-5", models.LeNet5(CLASSES), 128, max(rounds // 4, 4)))
    print("(a) ms per step, batch 128, and ratio to plain (goal: full <= 1.15x)\n")
    print(
        "| variant | "
        + " | ".join(f"{r['model']} ms | ratio | CPU-time ratio" for r in rows)
        + " |"
    )
    print("|---|" + "---:|---:|---:|" * len(rows))
    for v in rows[0]["step_ms"]:
        cells = [
            f"{r['step_ms'][v]:.3f} | {r['ratio'].get(v, 1.0):.2f}x | "
            f"{r['cpu_ratio'].get(v, 1.0):.2f}x"
            for r in rows
        ]
        print(f"| {v} | " + " | ".join(cells) + " |")

    k_rows = [steps_per_call(models.LeNet300100(CLASSES), b, rounds) for b in k_batches]
    print(f"\n(b) LeNet-300-100 ms per step, steps_per_call={BLOCK} vs 1 (goal: >= 1.3x)\n")
    print("| batch | config | K=1 ms | K=10 ms | speedup | CPU-time speedup |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in k_rows:
        for c in ("identity", "full"):
            one, ten = row["step_ms"][f"{c} K=1"], row["step_ms"][f"{c} K={BLOCK}"]
            print(
                f"| {row['batch']} | {c} | {one:.3f} | {ten:.3f} | {row['speedup'][c]:.2f}x | "
                f"{row['cpu_speedup'][c]:.2f}x |"
            )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "step.json")
    meta = {
        "rounds": rounds,
        "block": BLOCK,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "overhead": rows, "steps_per_call": k_rows}, f, indent=2)
    os.replace(tmp, path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
