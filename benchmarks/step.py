"""Cost of the composed ``mixjax.train`` step over a plain Flax + optax step; K steps per call.

(a) Overhead, on 28x28x1 ``uint8`` images (MNIST's shape, the issue's data set; normalized inside
the step), 10 classes, Adam(1e-3), per model (``--models``; ``mixjax.models.create`` with the
registry's sizes):

* ``lenet300100``: LeNet-300-100, batch 128;
* ``lenet5``: LeNet-5, batch 128;
* ``vit_tiny``: ViT-tiny (4x4 patches: 49 tokens, dim 128, depth 4, 4 heads; no dropout, so the
  plain step draws no RNG), batch 16;
* ``resnet20``: ResNet-20 at width 4 with BatchNorm, batch 32: the plain step updates its
  ``batch_stats`` with ``mutable=["batch_stats"]``, the mixjax step keeps them as model state.

The batches keep a step in the tens of ms on a 2-core CPU. The transforms read each kernel's
axes from the model (``layouts=mixjax.layout.learn(...)``), so per-channel scales and clusters
follow attention and conv kernels. Variants, all jitted with donated state:

* ``plain``: a hand-written Flax + optax step (normalize, forward, cross-entropy, grad, Adam);
* ``mixjax``: :func:`mixjax.train.make_train_step` with the identity transform (the wrapper alone);
* each component alone on top of it: ``prune`` (magnitude 90 %, masks recomputed every 10 steps),
  ``cluster`` (16 clusters, fixed assignments, trained centroids), ``quant`` (8-bit per-channel
  fake-quant, scales refreshed every 10 steps like the masks), ``augment`` (flip + pad-2 crop
  + brightness + mixup), ``delay`` (``delayed(adam, tau=2, compensation="dc")``);
* ``full``: all of them together (``chain(prune, cluster, quant)``, augmentation, delay).

Goals (issue 16): ``full`` <= 1.5x ``plain`` on LeNet-300-100 and <= 1.1x on the others, and
within 1.2x of its floor (below); the table and the JSON state them for every model.

Millisecond accounting (issue 16), per model: each component's milliseconds over the wrapper,
the stack's, and the interaction remainder (the stack less its components), each beside its
*floor*: the same work hand-written into the plain step (:mod:`step_floor`), timed in the same
interleaved rounds; ``full / floor full`` is how close the stack is to its limit.

(b) Steps per call. LeNet-300-100, ``steps_per_call=10`` against 1 for the identity and the full
stack, fed host NumPy batches as :mod:`mixjax.data` yields them (``stacked_batches`` for K = 10).

Each round times a block of 10 steps of every variant (one call for K = 10, so each pruning block
contains exactly one mask update), in alternating order, blocking on the results once per
block; the tables report medians over rounds and ratios.

    python benchmarks/step.py [--rounds 40] [--quick] [--models lenet300100,vit_tiny]
        [--batches 8,32,128]      # --batches '' skips (b)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixjax
from mixjax import augment, data, delay, models, prune, quant, share, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_floor  # noqa: E402

BLOCK = 10  # steps per timed block; pruning masks update once per block
CLASSES = 10
IMAGE = (28, 28, 1)


class Bench(NamedTuple):
    """A model of part (a): its label and batch, the divisor of ``--rounds`` it runs (4 for
    the models that take tens of ms a step on 2 CPU cores) and issue 16's bound on full / plain."""

    label: str
    batch: int
    rounds_divisor: int
    goal: float


BENCHES = {
    "lenet300100": Bench("LeNet-300-100", 128, 1, 1.5),
    "lenet5": Bench("LeNet-5", 128, 4, 1.1),
    "vit_tiny": Bench("ViT-tiny", 16, 4, 1.1),
    "resnet20": Bench("ResNet-20", 32, 4, 1.1),
}


class Model(NamedTuple):
    """A registry model built for the benchmark: variables split as the train step keeps them."""

    module: nn.Module
    train_kwarg: str | None  # the call keyword that switches BatchNorm / dropout, if any
    params: Any
    model_state: dict  # the other collections (``{"batch_stats": ...}``), ``{}`` if none
    layouts: Any  # mixjax.layout.learn of the params, for the transforms' where and axes


def build(name: str) -> Model:
    module = models.create(name, CLASSES)
    variables = dict(jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *IMAGE))))
    params = variables.pop("params")
    forward = lambda p, x: module.apply({"params": p, **variables}, x)
    # Abstract input: learn only traces. (A concrete batch of one, closed over, makes it give
    # the LeNets' Dense biases a layout, which the transforms then reject.)
    example = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
    layouts = mixjax.layout.learn(forward, params, example)
    return Model(module, models.MODELS[name].train_kwarg, params, variables, layouts)


def plain_step(model: Model, tx):
    kwargs = {} if model.train_kwarg is None else {model.train_kwarg: True}

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, batch):
        params, model_state, opt_state = carry
        images, labels = data.normalize(batch["image"]), batch["label"]

        def loss_fn(p):
            variables = {"params": p, **model_state}
            if model_state:  # BatchNorm: training updates the batch statistics
                logits, new_state = model.module.apply(
                    variables, images, mutable=list(model_state), **kwargs
                )
            else:
                logits, new_state = model.module.apply(variables, images, **kwargs), model_state
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, new_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return (optax.apply_updates(params, updates), model_state, opt_state), {
            "loss": loss,
            "accuracy": accuracy,
        }

    return step


def components(layouts):
    """Factories of each component, fresh per model (transforms hold jitted closures)."""
    return {
        "prune": lambda: dict(transform=prune.magnitude(0.9, update_every=BLOCK, layouts=layouts)),
        "cluster": lambda: dict(transform=share.cluster(16, layouts=layouts)),
        "quant": lambda: dict(transform=quant.fake_quant(8, update_every=BLOCK, layouts=layouts)),
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


def full_stack(layouts):
    parts = {name: make() for name, make in components(layouts).items()}
    return dict(
        transform=mixjax.chain(
            parts["prune"]["transform"], parts["cluster"]["transform"], parts["quant"]["transform"]
        ),
        augment=parts["augment"]["augment"],
        tx=parts["delay"]["tx"],
    )


def mixjax_variant(model: Model, config, steps_per_call=1):
    config = dict(config)
    tx = config.pop("tx", optax.adam(1e-3))
    transform = config.get("transform")
    step = train.make_train_step(
        train.linen_apply(model.module, train_kwarg=model.train_kwarg),
        tx,
        preprocess=data.normalize,
        steps_per_call=steps_per_call,
        **config,
    )
    state = train.init_train_state(
        model.params,
        tx,
        transform=transform,
        key=jax.random.key(0),
        model_state=model.model_state,
    )
    return step, state


def host_batches(batch, steps, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (steps, batch, *IMAGE), dtype=np.uint8)
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


def overhead(name, rounds):
    bench, model = BENCHES[name], build(name)
    stacked = host_batches(bench.batch, BLOCK)
    # Device-resident batches, the same for every variant, so (a) times the step alone.
    batches = [jax.device_put({k: v[i] for k, v in stacked.items()}) for i in range(BLOCK)]
    tx = optax.adam(1e-3)
    carry = (model.params, model.model_state, tx.init(model.params))
    variants = {"plain": (plain_step(model, tx), carry, batches)}
    configs = {"mixjax": {}, **{c: make() for c, make in components(model.layouts).items()}}
    configs["full"] = full_stack(model.layouts)
    for variant, config in configs.items():
        step, state = mixjax_variant(model, config)
        variants[variant] = (step, state, batches)
    masks = configs["prune"]["transform"].init(model.params).masks
    for name in ("plain", *step_floor.PARTS, "full"):
        parts = {"plain": (), "full": step_floor.PARTS}.get(name, (name,))
        params = jax.tree.map(jnp.copy, model.params)  # each floor donates its own
        step = step_floor.floor_step(
            model,
            tx,
            masks,
            parts,
            every=BLOCK,
            num_classes=CLASSES,
            augment=configs["augment"]["augment"] if "augment" in parts else None,
        )
        floor_state = step_floor.floor_state(params, masks, parts)
        model_state = jax.tree.map(jnp.copy, model.model_state)
        carry = (params, model_state, tx.init(params), floor_state)
        variants[f"floor {name}"] = (step, carry, batches)
    step_ms, cpu_ms, carries = time_variants(variants, rounds)
    floor_ms = {v.split()[1]: step_ms.pop(v) for v in list(step_ms) if v.startswith("floor ")}
    cpu_ms = {v: ms for v, ms in cpu_ms.items() if not v.startswith("floor ")}
    ratio = {v: step_ms[v] / step_ms["plain"] for v in step_ms if v != "plain"}
    masks = carries["full"].transform_state[0].masks  # the chain's first transform: pruning
    accounting = step_floor.accounting(step_ms, floor_ms)
    return {
        "model": bench.label,
        "batch": bench.batch,
        "rounds": rounds,
        "step_ms": step_ms,
        "cpu_ms": cpu_ms,
        "ratio": ratio,
        "cpu_ratio": {v: cpu_ms[v] / cpu_ms["plain"] for v in cpu_ms if v != "plain"},
        "goal": {
            "full_ratio_at_most": bench.goal,
            "met": ratio["full"] <= bench.goal,
            "full_over_floor_at_most": step_floor.FLOOR_GOAL,
            "floor_met": accounting["full_over_floor"] <= step_floor.FLOOR_GOAL,
        },
        "sparsity_after": prune.summary(masks).sparsity,
        "accounting": accounting,
    }


def steps_per_call(batch, rounds):
    model = build("lenet300100")
    stacked = host_batches(batch, BLOCK)
    singles = [{k: v[i] for k, v in stacked.items()} for i in range(BLOCK)]
    variants = {}
    for config_name, config in (("identity", {}), ("full", full_stack(model.layouts))):
        for k in (1, BLOCK):
            step, state = mixjax_variant(model, config, k)
            variants[f"{config_name} K={k}"] = (step, state, singles if k == 1 else [stacked])
    step_ms, cpu_ms, _ = time_variants(variants, rounds)
    configs = ("identity", "full")
    return {
        "model": BENCHES["lenet300100"].label,
        "batch": batch,
        "step_ms": step_ms,
        "cpu_ms": cpu_ms,
        "speedup": {c: step_ms[f"{c} K=1"] / step_ms[f"{c} K={BLOCK}"] for c in configs},
        "cpu_speedup": {c: cpu_ms[f"{c} K=1"] / cpu_ms[f"{c} K={BLOCK}"] for c in configs},
    }


def print_overhead(rows):
    goal = "goals: full <= " + ", ".join(
        f"{r['goal']['full_ratio_at_most']}x {r['model']}" for r in rows
    )
    print(f"(a) ms per step and ratio to plain ({goal})\n")
    print(
        "| variant | "
        + " | ".join(f"{r['model']} (batch {r['batch']}) ms | ratio | CPU-time ratio" for r in rows)
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
    met = lambda r: "met" if r["goal"]["met"] else "not met"
    print("\ngoal full / plain: " + ", ".join(f"{r['model']} {met(r)}" for r in rows))


def print_steps_per_call(k_rows):
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


def parse_models(parser, text):
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown or not names:
        parser.error(f"--models: choose from {','.join(BENCHES)}, got {text!r}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument(
        "--quick", action="store_true", help="4 rounds; (a) on LeNet-300-100, (b) at batch 32"
    )
    parser.add_argument(
        "--models",
        help=f"part (a)'s models, comma-separated, of {','.join(BENCHES)} (default: all; "
        "lenet300100 with --quick)",
    )
    parser.add_argument(
        "--batches", help="batch sizes of part (b) (default 8,32,128; 32 with --quick; '' skips)"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    rounds = 4 if args.quick else args.rounds
    if rounds < 1:
        parser.error(f"--rounds must be >= 1, got {rounds}")
    names = parse_models(
        parser, args.models or ("lenet300100" if args.quick else ",".join(BENCHES))
    )
    batches = args.batches if args.batches is not None else ("32" if args.quick else "8,32,128")
    k_batches = [int(b) for b in batches.split(",") if b]

    # Slow models get fewer rounds, but never more than asked for.
    rows = [overhead(n, max(rounds // BENCHES[n].rounds_divisor, min(rounds, 4))) for n in names]
    print_overhead(rows)
    step_floor.print_accounting(rows)
    k_rows = [steps_per_call(b, rounds) for b in k_batches]
    if k_rows:
        print_steps_per_call(k_rows)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "step.json")
    meta = {
        "rounds": rounds,
        "block": BLOCK,
        "image": IMAGE,
        "goal": "full / plain <= each model's goal, full / floor <= "
        f"{step_floor.FLOOR_GOAL}x (issue 16)",
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
