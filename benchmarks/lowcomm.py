"""Low-communication training: synchronous data parallel vs DiLoCo, Streaming DiLoCo, int4.

Usage::

    python benchmarks/lowcomm.py [--quick] [--models gpt_tiny,lenet5] [--replicas 4,8]
        [--steps 1000] [--image-steps 1000] [--data ../shared/data/tinyshakespeare.txt]
        [--methods "DiLoCo H=100,..."] [--outer 0.7:0.9,1.0:0]

``--methods`` runs only the rows of those labels (and sync); ``--outer`` runs every DiLoCo row
once per outer optimizer ``lr:momentum`` (Nesterov; ``0``: plain SGD), labelled ``outer lr/m``
unless it is the paper's ``0.7:0.9``: the sweep the figures quote.

Runs on ``max(--replicas)`` forced CPU devices (``--xla_force_host_platform_device_count``, set
before JAX starts), one replica per device. Every run of a model sees the same tokens: the same
number of steps of the same global batch (each of ``R`` replicas trains on its ``B / R``
examples of it), the same inner optimizer (AdamW, cosine-decayed over the run) and the same
initialization and data order:

* **GPT-tiny** (4 layers x 4 heads x 128, context 64) on tiny-shakespeare, global batch 32
  windows, scored by the exact mean next-token loss over the whole validation split
  (``benchmarks/lm.py``'s ``val_loss``). Skipped, with a message, when the corpus is missing.
* **LeNet-5** on the embedded 8x8 digits, global batch 64, scored by loss and accuracy over
  the whole test split (359 images).

Rows: ``sync`` is synchronous data parallelism (:func:`mixjax.parallel.data_parallel`: every
replica sends its full float32 gradient every step; it does not depend on ``R``, so it is
trained once); ``DiLoCo H`` is :func:`mixjax.delay.diloco` with ``sync_every=H`` and the
paper's outer optimizer (SGD, lr 0.7, Nesterov 0.9); ``stream F=4 tau`` is Streaming DiLoCo at
``H = 100``: four fragments at staggered offsets, each averaged pseudo-gradient applied
``tau`` steps after it was sent, ``+DC`` with DC-ASGD compensation of that late update;
``+int4`` sends the kernels' pseudo-gradients as 4-bit codes with per-feature scales
(:class:`mixjax.delay.Quantize`) and error feedback. Bytes are per replica over the whole run,
the sum of the step metrics' ``"bytes_sent"`` (the arrays each replica put on the replica
axis; for ``sync`` the gradient, :func:`mixjax.delay.message_bytes`, every step); "fewer" is
sync's bytes over the row's. The evaluated model of a DiLoCo run is
:func:`mixjax.delay.synced_state`'s outer parameters.

Goal (the issue): within 3 % of sync's validation loss at >= 100x fewer bytes, and >= 400x
with int4. The goals table says which rows meet it.

``--quick``: 200 steps, GPT-tiny only if ``--models`` says so, a smoke run.
Prints the tables and writes ``results/lowcomm.json`` and the plot ``results/lowcomm.png``
(validation loss against bytes per replica).
"""

from __future__ import annotations

import argparse
import os
import sys

REPLICAS = (4, 8)
if __name__ == "__main__" and "jax" not in sys.modules:  # JAX fixes its device count at start
    count = max(REPLICAS)
    for i, arg in enumerate(sys.argv):
        if arg.startswith("--replicas"):
            value = arg.split("=", 1)[1] if "=" in arg else sys.argv[i + 1]
            count = max(int(r) for r in value.split(","))
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm  # noqa: E402

from mixjax import _files, data, delay, models, parallel, train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
PER_CALL = 50
LOSS_GOAL, BYTES_GOAL, INT4_BYTES_GOAL = 0.03, 100.0, 400.0


class Method(NamedTuple):
    """One row's training: ``sync_every=None`` is synchronous data parallelism."""

    label: str
    sync_every: int | None = None
    fragments: int = 1
    outer_delay: int = 0
    compensation: str | None = None
    bits: int | None = None


class Outer(NamedTuple):
    """A DiLoCo outer optimizer: SGD at ``lr``, Nesterov ``momentum`` (0: plain SGD)."""

    lr: float = 0.7
    momentum: float = 0.9

    def tx(self) -> optax.GradientTransformation:
        if self.momentum == 0:
            return optax.sgd(self.lr)
        return optax.sgd(self.lr, momentum=self.momentum, nesterov=True)

    def suffix(self) -> str:
        """The label's suffix: empty for the paper's (the default) optimizer."""
        return "" if self == Outer() else f" outer {self.lr:g}/{self.momentum:g}"


METHODS = (
    Method("sync"),
    Method("DiLoCo H=10", 10),
    Method("DiLoCo H=50", 50),
    Method("DiLoCo H=100", 100),
    Method("stream F=4 tau=1", 100, 4, 1),
    Method("stream F=4 tau=5", 100, 4, 5),
    Method("stream F=4 tau=1 +DC", 100, 4, 1, "dc"),
    Method("stream F=4 tau=5 +DC", 100, 4, 5, "dc"),
    Method("DiLoCo H=100 +int4", 100, bits=4),
    Method("stream F=4 tau=5 +int4", 100, 4, 5, bits=4),
)


class Task(NamedTuple):
    """A model and its data: ``groups(seed)`` yields ``(PER_CALL, B, ...)`` batches."""

    name: str
    apply_fn: Any
    params: Any
    batch: int
    lr: float
    groups: Any
    score: Any  # TrainState -> {"val_loss": ..., maybe "accuracy": ...}
    preprocess: Any = None


def gpt_task(args) -> Task | None:
    if not os.path.exists(args.data):
        print(f"benchmarks/lowcomm.py: {args.data} is missing; GPT-tiny skipped")
        return None
    train_set, val = lm.load_corpus(args.data)
    module, apply_fn, tokens = lm.gpt_tiny(len(train_set.vocab))
    params = jax.jit(module.init)(jax.random.key(args.seed), tokens)["params"]
    return Task(
        "gpt_tiny",
        apply_fn,
        params,
        32,
        1e-3,
        lambda: data.stacked_lm_batches(train_set, 32, lm.CONTEXT, PER_CALL, seed=args.seed),
        lambda state: {"val_loss": lm.val_loss(apply_fn, state, None, val)},
    )


def lenet_task(args) -> Task:
    train_set, test = data.load("digits", "train"), data.load("digits", "test")
    module = models.create("lenet5", train_set.num_classes)
    apply_fn = train.linen_apply(module, train_kwarg=models.MODELS["lenet5"].train_kwarg)
    example = data.normalize(train_set.images[:1])
    params = jax.jit(module.init)(jax.random.key(args.seed), example)["params"]
    images, labels = jnp.asarray(data.normalize(test.images)), jnp.asarray(test.labels)
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))

    def score(state):
        logits = forward(state.params, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        accuracy = 100.0 * jnp.mean(logits.argmax(-1) == labels)
        return {"val_loss": float(loss), "accuracy": float(accuracy)}

    groups = lambda: data.stacked_batches(train_set, 64, PER_CALL, seed=args.seed, epochs=None)
    return Task("lenet5", apply_fn, params, 64, 3e-3, groups, score, data.normalize)


def inner_optimizer(task: Task, steps: int) -> optax.GradientTransformation:
    return optax.adamw(optax.cosine_decay_schedule(task.lr, steps, alpha=0.1), weight_decay=0.1)


def run(task: Task, method: Method, outer: Outer, replicas: int, steps: int, seed: int) -> dict:
    """One training run of ``steps`` steps (``outer``: DiLoCo's outer optimizer); its row."""
    mesh = parallel.make_mesh(replicas, devices=jax.devices()[:replicas])
    inner = inner_optimizer(task, steps)
    key = jax.random.key(seed + 1)
    if method.sync_every is None:
        tx = inner
        step = parallel.data_parallel(
            train.make_train_step(
                task.apply_fn, tx, preprocess=task.preprocess, steps_per_call=PER_CALL
            ),
            mesh,
        )
        state = parallel.shard_state(train.init_train_state(task.params, tx, key=key), mesh)
        per_step = delay.message_bytes(task.params)
    else:
        compress = None if method.bits is None else delay.Quantize(method.bits)
        tx = delay.diloco(
            inner,
            outer.tx(),
            sync_every=method.sync_every,
            fragments=method.fragments,
            outer_delay=method.outer_delay,
            compensation=method.compensation,
            compress=compress,
        )
        step = delay.diloco_data_parallel(
            task.apply_fn, tx, mesh, preprocess=task.preprocess, steps_per_call=PER_CALL
        )
        state = delay.replicate_state(train.init_train_state(task.params, tx, key=key), mesh)
    sent = 0
    tick = time.perf_counter()
    for _, group in zip(range(steps // PER_CALL), task.groups(), strict=False):
        state, metrics = step(state, group)
        if method.sync_every is None:
            sent += per_step * PER_CALL
        else:
            sent += int(np.sum(np.asarray(metrics["bytes_sent"], np.int64)))
    jax.block_until_ready(state)
    seconds = time.perf_counter() - tick
    final = state if method.sync_every is None else delay.synced_state(state)
    diloco = method.sync_every is not None
    return {
        "model": task.name,
        "method": method.label + (outer.suffix() if diloco else ""),
        "replicas": replicas if diloco else None,
        **method._asdict(),
        "outer_lr": outer.lr if diloco else None,
        "outer_momentum": outer.momentum if diloco else None,
        "bytes_per_replica": sent,
        "train_s": seconds,
        **task.score(final),
    }


def goals(rows: list[dict]) -> list[dict]:
    """Per model and replica count: the rows at the byte goals and whether they meet the loss
    goal (within 3 % of sync)."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        sync = next(r for r in rows if r["model"] == model and r["method"] == "sync")
        for r in rows:
            if r["model"] != model or r["method"] == "sync":
                continue
            fewer = sync["bytes_per_replica"] / r["bytes_per_replica"]
            gap = r["val_loss"] / sync["val_loss"] - 1.0
            target = INT4_BYTES_GOAL if r["bits"] == 4 else BYTES_GOAL
            out.append(
                {
                    "model": model,
                    "replicas": r["replicas"],
                    "method": r["method"],
                    "fewer_bytes": fewer,
                    "loss_gap": gap,
                    "bytes_goal": target,
                    "met": bool(fewer >= target and gap <= LOSS_GOAL),
                }
            )
    return out


def print_tables(rows: list[dict], met: list[dict]) -> None:
    print("| model | R | method | val loss | accuracy | bytes / replica | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        accuracy = f"{r['accuracy']:.2f}" if "accuracy" in r else "-"
        print(
            f"| {r['model']} | {r['replicas'] or 'any'} | {r['method']} | {r['val_loss']:.4f} | "
            f"{accuracy} | {r['bytes_per_replica']:,} | {r['train_s']:.0f} |"
        )
    print("\n| model | R | method | fewer bytes | loss vs sync | goal | met |")
    print("|---|---|---|---|---|---|---|")
    for g in met:
        print(
            f"| {g['model']} | {g['replicas']} | {g['method']} | {g['fewer_bytes']:.0f}x | "
            f"{100 * g['loss_gap']:+.2f} % | <= 3 % at >= {g['bytes_goal']:.0f}x | "
            f"{'yes' if g['met'] else 'no'} |"
        )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["model"] for r in rows})
    counts = sorted({r["replicas"] for r in rows if r["replicas"]})
    markers = dict(zip(counts, "os^Dv" * len(counts), strict=False), **{"sync": "*"})
    legend = ", ".join(f"{markers[n]} R={n}" for n in counts)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for r in (r for r in rows if r["model"] == name):
            marker = markers[r["replicas"] or "sync"]
            label = f"{r['method']}" + (f" R={r['replicas']}" if r["replicas"] else "")
            ax.scatter(r["bytes_per_replica"], r["val_loss"], marker=marker, s=40)
            ax.annotate(label, (r["bytes_per_replica"], r["val_loss"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per replica (whole run)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{name}: equal tokens ({legend}, * sync)")
    fig.tight_layout()
    _files.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default="gpt_tiny,lenet5")
    parser.add_argument("--replicas", default=",".join(map(str, REPLICAS)))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--image-steps", type=int, default=1000)
    parser.add_argument("--methods", default="", help="row labels to run (default all)")
    parser.add_argument(
        "--outer",
        default="0.7:0.9",
        help="DiLoCo outer optimizers to try, lr:nesterov_momentum pairs (0: plain SGD)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=lm.DEFAULT_DATA)
    parser.add_argument("--out", default=os.path.join(RESULTS, "lowcomm.json"))
    args = parser.parse_args()
    replica_counts = [int(r) for r in args.replicas.split(",")]
    outers = [Outer(*map(float, pair.split(":"))) for pair in args.outer.split(",")]
    wanted = set(filter(None, args.methods.split(",")))
    unknown = wanted - {m.label for m in METHODS}
    if unknown:
        raise SystemExit(f"unknown --methods {sorted(unknown)}; known {[m.label for m in METHODS]}")
    methods = [m for m in METHODS if not wanted or m.label in wanted or m.sync_every is None]
    if jax.device_count() < max(replica_counts):
        raise SystemExit(f"needs {max(replica_counts)} devices, JAX has {jax.device_count()}")
    makers = {"gpt_tiny": gpt_task, "lenet5": lenet_task}
    rows = []
    for name in args.models.split(","):
        task = makers[name](args)
        if task is None:
            continue
        steps = 200 if args.quick else args.steps if name == "gpt_tiny" else args.image_steps
        for method in methods:
            sync = method.sync_every is None
            if not sync and method.sync_every > steps:
                continue
            for outer, replicas in itertools.product(
                outers[:1] if sync else outers, replica_counts[:1] if sync else replica_counts
            ):
                row = run(task, method, outer, replicas, steps, args.seed)
                rows.append({**row, "steps": steps, "global_batch": task.batch})
                print(
                    f"  {name} R={replicas} {row['method']}: loss {row['val_loss']:.4f}, "
                    f"{row['bytes_per_replica']:,} B, {row['train_s']:.0f} s",
                    flush=True,
                )
    met = goals(rows)
    print_tables(rows, met)
    result = {
        "meta": {
            "jax": jax.__version__,
            "devices": jax.device_count(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "quick": args.quick,
            "per_call": PER_CALL,
        },
        "rows": rows,
        "goals": met,
    }
    _files.write_atomic(args.out, lambda f: json.dump(result, f, indent=1), text=True)
    if rows:
        plot(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
