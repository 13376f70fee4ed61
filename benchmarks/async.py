"""Delayed-gradient SGD vs DC-ASGD on digits: test accuracy after a fixed step budget.

For each staleness tau in {0, 4, 16}, LeNet-300-100 is trained on the 8x8 digits (1,438 train,
359 test images) for a fixed number of steps with ``mixjax.delay.delayed``: plain delayed SGD,
DC-ASGD with a constant lambda and DC-ASGD-a with an adaptive one (lambda_0 swept over
{0.04, 0.5, 2, 8}; the defaults of ``mixjax.delay.DEFAULT_LAM`` are marked), three seeds each
(the seed sets the initialization and the batch order; seeds are shared across methods, so the
methods see the same batches). At tau = 0 the compensated variants are bit-identical to plain SGD
(tested in tests/test_delay.py), so tau = 0 is trained once.

The inner optimizer is plain SGD (no momentum: momentum adds its own implicit staleness and
would blur what is being compensated) with learning rate 0.05, the largest of {0.05, 0.1, 0.2,
0.5} at which tau = 16 does not diverge in 300 steps on this task (0.1 already collapses it to
~20% accuracy), so staleness costs accuracy without wrecking the run. The first tau steps apply
no update (the FIFO fills), which is part of the staleness cost.

Writes benchmarks/results/async.json and benchmarks/results/async.png; prints a markdown table.

    python benchmarks/async.py [--quick]
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

from mixjax import data, delay, models

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TAUS = (0, 4, 16)
# (label, compensation, lam); lam None is the mode's default, mixjax.delay.DEFAULT_LAM: 0.04 for
# DC-ASGD's constant and lam_0 = 2 for the adaptive variant, whose lam_0 / sqrt(MS)
# normalization makes the term ~ lam_0 * |g| * g * dw. The lam_0 sweep justifies that default.
METHODS = (
    ("SGD", None, 0.0),
    ("DC-ASGD (lam=0.04, default)", "dc", None),
    ("DC-ASGD-a (lam0=0.04)", "dc_adaptive", 0.04),
    ("DC-ASGD-a (lam0=0.5)", "dc_adaptive", 0.5),
    ("DC-ASGD-a (lam0=2, default)", "dc_adaptive", None),
    ("DC-ASGD-a (lam0=8)", "dc_adaptive", 8.0),
)


def make_train(tx, model, test_x, test_y):
    """``(key, xs, ys) -> (test accuracy, per-step train loss)``: a whole run in one jit."""

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, data.normalize(images))
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train(key, xs, ys):
        params = model.init(key, data.normalize(xs[0]))["params"]
        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), (xs, ys))
        logits = model.apply({"params": params}, data.normalize(test_x))
        return jnp.mean(jnp.argmax(logits, -1) == test_y), losses

    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 steps, for a smoke test")
    parser.add_argument("--steps", type=int, default=None, help="step budget (default 300)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    steps = args.steps or (150 if args.quick else 300)
    seeds = list(range(args.seeds))

    train_ds, test_ds = data.load("digits", "train"), data.load("digits", "test")
    model = models.LeNet300100(num_classes=train_ds.num_classes)
    test_x, test_y = jnp.asarray(test_ds.images), jnp.asarray(test_ds.labels)
    batches = {}
    for seed in seeds:
        stack = next(data.stacked_batches(train_ds, args.batch_size, steps, seed=seed, epochs=None))
        batches[seed] = (jnp.asarray(stack["image"]), jnp.asarray(stack["label"]))

    start = time.perf_counter()
    runs = []
    for tau in TAUS:
        for label, compensation, lam in METHODS[:1] if tau == 0 else METHODS:
            tx = delay.delayed(optax.sgd(args.lr), tau, compensation=compensation, lam=lam)
            train = make_train(tx, model, test_x, test_y)
            accs, losses = [], []
            for seed in seeds:
                acc, loss = train(jax.random.key(seed), *batches[seed])
                accs.append(float(acc))
                losses.append(np.round(np.asarray(loss, np.float64), 5).tolist())
            runs.append(
                {
                    "tau": tau,
                    "method": label,
                    "compensation": compensation,
                    "lam": delay.DEFAULT_LAM[compensation] if lam is None else lam,
                    "test_accuracy": accs,
                    "mean": float(np.mean(accs)),
                    "std": float(np.std(accs)),
                    "final_train_loss": float(np.mean([np.mean(x[-20:]) for x in losses])),
                    "train_loss": losses,
                }
            )
            print(f"tau={tau:2d} {label:20s} acc={np.round(accs, 3)}", flush=True)
    elapsed = time.perf_counter() - start

    def find(tau, label):
        # At tau = 0 every method is SGD (trained once).
        return next(r for r in runs if r["tau"] == tau and r["method"] == (label if tau else "SGD"))

    def cell(tau, label):
        r = find(tau, label)
        per_seed = ", ".join(f"{a:.3f}" for a in r["test_accuracy"])
        return f"{r['mean']:.3f} ± {r['std']:.3f} ({per_seed})"

    labels = [m[0] for m in METHODS]
    print()
    print(
        f"Digits test accuracy, LeNet-300-100, SGD lr={args.lr}, batch {args.batch_size}, "
        f"{steps} steps, seeds {seeds} (mean ± std over seeds; per seed):"
    )
    print()
    print("| tau | " + " | ".join(labels) + " |")
    print("|---:|" + "---|" * len(labels))
    for tau in TAUS:
        print(f"| {tau} | " + " | ".join(cell(tau, label) for label in labels) + " |")
    print("\nTrain loss, mean of the last 20 steps and of the seeds:\n")
    print("| tau | " + " | ".join(labels) + " |")
    print("|---:|" + "---|" * len(labels))
    for tau in TAUS:
        losses = (f"{find(tau, label)['final_train_loss']:.3f}" for label in labels)
        print(f"| {tau} | " + " | ".join(losses) + " |")
    print(f"\n(tau = 0: the compensated variants equal SGD bit for bit.) {elapsed:.0f} s total.")

    os.makedirs(RESULTS, exist_ok=True)
    config = {
        "dataset": "digits",
        "train_examples": len(train_ds.labels),
        "test_examples": len(test_ds.labels),
        "model": "LeNet300100",
        "optimizer": f"optax.sgd({args.lr})",
        "batch_size": args.batch_size,
        "steps": steps,
        "seeds": seeds,
        "taus": list(TAUS),
        "ms_decay": 0.95,
        "quick": args.quick,
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "seconds": elapsed,
    }
    with open(os.path.join(RESULTS, "async.json"), "w") as f:
        json.dump({"config": config, "runs": runs}, f, indent=1)
    plot(runs, steps, os.path.join(RESULTS, "async.png"))


def plot(runs, steps, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sgd_at_zero = next(r for r in runs if r["tau"] == 0)
    for i, (label, _, _) in enumerate(METHODS):
        rows = [sgd_at_zero] + [r for r in runs if r["method"] == label and r["tau"] > 0]
        taus = np.array([r["tau"] for r in rows]) + (i - 1) * 0.25
        left.errorbar(
            taus, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], marker="o", label=label
        )
    left.set_xlabel("staleness tau (steps)")
    left.set_ylabel(f"test accuracy after {steps} steps")
    left.set_xticks(TAUS)
    left.legend()
    left.grid(alpha=0.3)
    tau = max(TAUS)
    curves = [
        (f"{label}, tau={tau}", "-", r)
        for label, _, _ in METHODS
        for r in runs
        if r["method"] == label and r["tau"] == tau
    ]
    for name, style, run in curves + [("SGD, tau=0", "k--", sgd_at_zero)]:
        loss = np.mean(np.asarray(run["train_loss"]), axis=0)
        smooth = np.convolve(loss, np.ones(10) / 10, mode="valid")
        right.plot(np.arange(smooth.size) + 9, smooth, style, label=name)
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("train loss (seed mean, 10-step average)")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
