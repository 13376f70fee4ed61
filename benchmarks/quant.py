"""Quantization benchmark: integer inference speed, QAT step overhead (vs qwix), accuracy.

Usage::

    python benchmarks/quant.py [--quick]

Prints markdown tables and writes ``benchmarks/results/quant.json``. Three parts:

1. Inference, batch 256, CPU: float32 ``model.apply`` vs :mod:`mixjax.export.integer` (int8 x int8
   -> int32 Dense layers, PTQ-calibrated activations) for LeNet-300-100 (28x28x1 inputs) and a
   1024-wide 3-layer MLP (three 1024x1024 Dense layers); plus raw XLA f32 vs int8 dot as the
   ceiling. Goal: >= 1.4x on the wide MLP.
2. Train-step time on LeNet-5, batch 128, 28x28x1, SGD with momentum: plain, mixjax
   weights-only int8 QAT (goal <= 1.05x), mixjax w8a8 QAT (EMA observers), and qwix's QAT
   (``QtProvider`` int8 weights, int8 weights + activations), all in this process.
3. Accuracy on the embedded digits (8x8), LeNet-5: float, PTQ int8, QAT int8, QAT int4 and LSQ
   int4 (int8 activations), each through the fake-quant forward and the integer path, with the
   artifact size.

Timings interleave the contenders (alternating order each round) and report medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mixjax
from mixjax import core, data, export, models, quant


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, runs interleaved."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


class WideMLP(nn.Module):
    """Three 1024x1024 Dense layers with ReLU between them."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(1024)(x))
        x = nn.relu(nn.Dense(1024)(x))
        return nn.Dense(1024)(x)


def calibrated(model, view, act, calib):
    """PTQ: activation ranges of the model with parameters ``view`` on ``calib`` batches."""
    fn = lambda p, x: model.apply({"params": p}, x)
    return quant.calibrate(act, fn, view, act.init(fn, view, calib[0]), calib)


def deploy(model, params, weights, wstate, act, astate, x):
    """Artifact (saved and loaded back), integer model (prepared on inputs like ``x``), jitted
    integer and fake-quant forwards."""
    view = weights.apply(params, wstate)
    fn = lambda p, x: model.apply({"params": p}, x)
    with tempfile.TemporaryDirectory() as tmp:
        path = export.save(export.compress(params, weights, wstate), os.path.join(tmp, "model.mjx"))
        artifact = export.load(path)
    restored = artifact.params()
    int_fn = jax.jit(lambda m, x: export.integer_apply(m, fn, restored, x))
    fake_fn = jax.jit(lambda s, x: act.apply(fn, s, view, x)[0])
    int_model = export.integer_model(fn, artifact, x[:1], act=act, act_state=astate)
    return artifact, int_model, int_fn, lambda x: fake_fn(astate, x)


def inference_case(name: str, model: nn.Module, shape: tuple, rounds: int) -> dict:
    """float32 vs integer forward of ``model`` on a batch of 256 (PTQ int8, minmax ranges)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, *shape)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    calib = [jnp.asarray(rng.normal(size=(256, *shape)), jnp.float32) for _ in range(4)]
    act = quant.activation_quant(8, observer=quant.minmax_observer())
    weights = quant.fake_quant(8)
    wstate = weights.init(params)
    astate = calibrated(model, weights.apply(params, wstate), act, calib)
    _, int_model, int_fn, fake = deploy(model, params, weights, wstate, act, astate, x)
    float_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    out, ref = np.asarray(int_fn(int_model, x)), np.asarray(fake(x))
    t = interleaved(
        {"f32": lambda: float_fn(params, x), "int8": lambda: int_fn(int_model, x)}, rounds
    )
    return {
        "case": f"{name}, batch 256",
        "float32_ms": 1e3 * t["f32"],
        "int8_ms": 1e3 * t["int8"],
        "speedup": t["f32"] / t["int8"],
        "rel_err": float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
        "argmax_agree": float(np.mean(out.argmax(-1) == ref.argmax(-1))),
    }


def inference(rounds: int) -> list[dict]:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(256, 1024)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(1024, 1024)), jnp.float32)
    ai, bi = (jnp.asarray(rng.integers(-127, 128, size=s), jnp.int8) for s in (a.shape, b.shape))
    f32 = jax.jit(lambda a, b: a @ b)
    i8 = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.int32))
    t = interleaved({"f32": lambda: f32(a, b), "int8": lambda: i8(ai, bi)}, rounds)
    raw = {
        "case": "raw XLA dot 256x1024 @ 1024x1024",
        "float32_ms": 1e3 * t["f32"],
        "int8_ms": 1e3 * t["int8"],
        "speedup": t["f32"] / t["int8"],
    }
    return [
        raw,
        inference_case(
            "LeNet-300-100 (28x28x1)", models.LeNet300100(num_classes=10), (28, 28, 1), rounds
        ),
        inference_case("MLP 3x1024", WideMLP(), (1024,), rounds),
    ]


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def step_overhead(rounds: int) -> list[dict]:
    import qwix  # benchmark-only dependency

    rng = np.random.default_rng(1)
    model = models.LeNet5(num_classes=10)
    x = jnp.asarray(rng.normal(size=(128, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=128), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    tx = optax.sgd(0.01, momentum=0.9)
    wq = quant.fake_quant(8)
    act = quant.activation_quant(8)
    apply = lambda p, x: model.apply({"params": p}, x)

    def train_step(loss_fn, refresh=None):
        """A jitted SGD step ``(carry, x, y) -> carry``; ``loss_fn(p, carry, x, y) -> (loss,
        carry updates)``; ``refresh(p, carry)`` refreshes the weight quantizer's state."""

        @jax.jit
        def step(c, x, y):
            (_, extra), g = jax.value_and_grad(lambda p: loss_fn(p, c, x, y), has_aux=True)(c["p"])
            updates, o = tx.update(g, c["o"], c["p"])
            p = optax.apply_updates(c["p"], updates)
            return {**c, **extra, "p": p, "o": o, **({"w": refresh(p, c)} if refresh else {})}

        return step

    def w8a8_loss(p, c, x, y):
        out, a = act.apply(apply, c["a"], wq.apply(p, c["w"]), x, mode="train")
        return cross_entropy(out, y), {"a": a}

    def qwix_step(act_qtype):
        rule = qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype=act_qtype)
        qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
        qparams = jax.jit(qmodel.init)(jax.random.key(0), x)["params"]
        loss = lambda p, c, x, y: (cross_entropy(qmodel.apply({"params": p}, x), y), {})
        return train_step(loss), {"p": qparams, "o": tx.init(qparams)}

    refresh = lambda p, c: wq.update(p, c["w"], 0)
    wstate = wq.init(params)
    astate = act.init(apply, params, x)
    base = {"p": params, "o": tx.init(params)}
    contenders = {
        "plain": (
            train_step(lambda p, c, x, y: (cross_entropy(apply(p, x), y), {})),
            base,
        ),
        "mixjax w8 (weights only)": (
            train_step(
                lambda p, c, x, y: (cross_entropy(apply(wq.apply(p, c["w"]), x), y), {}), refresh
            ),
            {**base, "w": wstate},
        ),
        "mixjax w8a8": (train_step(w8a8_loss, refresh), {**base, "w": wstate, "a": astate}),
        "qwix w8 (weights only)": qwix_step(None),
        "qwix w8a8": qwix_step("int8"),
    }
    carries = {name: carry for name, (_, carry) in contenders.items()}

    def runner(name):
        def run():
            carries[name] = contenders[name][0](carries[name], x, y)
            return carries[name]["p"]

        return run

    t = interleaved({name: runner(name) for name in contenders}, rounds)
    return [
        {"step": name, "ms": 1e3 * t[name], "vs_plain": t[name] / t["plain"]} for name in contenders
    ]


def accuracy(epochs: int, qat_epochs: int) -> list[dict]:
    train, test = data.load("digits", "train"), data.load("digits", "test")
    x_test, y_test = jnp.asarray(data.normalize(test.images)), jnp.asarray(test.labels)
    model = models.LeNet5(num_classes=train.num_classes)
    apply = lambda p, x: model.apply({"params": p}, x)
    params = jax.jit(model.init)(jax.random.key(0), x_test[:1])["params"]

    def fit(params, n_epochs, lr, weights=None, act=None, seed=0):
        """Adam training; with ``weights``/``act``, QAT (LSQ scales trained alongside)."""
        wstate = weights.init(params) if weights else None
        astate = act_state_for(params, weights, wstate, act) if act else None
        scales = mixjax.learned_state(wstate) if weights else None
        tx = optax.adam(lr)
        opt = tx.init((params, scales))

        @jax.jit
        def step(params, scales, opt, wstate, astate, x, y):
            def loss_fn(ps):
                p, s = ps
                view = weights.apply(p, mixjax.with_learned_state(wstate, s)) if weights else p
                if act is None:
                    return cross_entropy(apply(view, x), y), astate
                out, a = act.apply(apply, astate, view, x, mode="train")
                return cross_entropy(out, y), a

            (_, astate), g = jax.value_and_grad(loss_fn, has_aux=True)((params, scales))
            updates, opt = tx.update(g, opt, (params, scales))
            params, scales = optax.apply_updates((params, scales), updates)
            if weights:
                wstate = weights.update(params, mixjax.with_learned_state(wstate, scales), 0)
            return params, scales, opt, wstate, astate

        for batch in data.batches(train, 64, seed=seed, epochs=n_epochs):
            x, y = jnp.asarray(data.normalize(batch["image"])), jnp.asarray(batch["label"])
            params, scales, opt, wstate, astate = step(params, scales, opt, wstate, astate, x, y)
        return params, wstate, astate

    calib = [
        jnp.asarray(data.normalize(b["image"])) for b in data.batches(train, 128, seed=7, epochs=1)
    ][:8]

    def act_state_for(params, weights, wstate, act):
        return calibrated(model, weights.apply(params, wstate), act, calib)

    def evaluate(name, params, weights, wstate, act, astate):
        artifact, int_model, int_fn, fake = deploy(
            model, params, weights, wstate, act, astate, x_test
        )
        fq = np.asarray(fake(x_test)).argmax(-1)
        it = np.asarray(int_fn(int_model, x_test)).argmax(-1)
        return {
            "model": name,
            "fake_quant_acc": float(np.mean(fq == np.asarray(y_test))),
            "int_acc": float(np.mean(it == np.asarray(y_test))),
            "int_agrees": float(np.mean(it == fq)),
            "artifact_bytes": artifact.nbytes,
        }

    float_params, _, _ = fit(params, epochs, 1e-3)
    logits = jax.jit(apply)(float_params, x_test)
    rows = [
        {
            "model": "float32",
            "fake_quant_acc": float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(y_test))),
            "artifact_bytes": export.compress(float_params, core.identity(), ()).nbytes,
        }
    ]
    a8 = quant.activation_quant(8, observer=quant.minmax_observer())
    w8 = quant.fake_quant(8)
    w8s = w8.init(float_params)
    rows.append(
        evaluate(
            "PTQ int8 (w8a8)", float_params, w8, w8s, a8, act_state_for(float_params, w8, w8s, a8)
        )
    )
    ema = quant.activation_quant(8, observer=quant.ema_observer(0.99))
    for name, weights in [
        ("QAT int8 (w8a8)", quant.fake_quant(8)),
        ("QAT int4 (w4a8)", quant.fake_quant(4)),
        ("LSQ int4 (w4a8)", quant.lsq(4)),
    ]:
        p, ws, a = fit(float_params, qat_epochs, 3e-4, weights, ema, seed=1)
        rows.append(evaluate(name, p, weights, ws, ema, a))
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 and v else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def goals(results: dict) -> dict[str, bool | None]:
    """The issue's targets, checked against this run (``None`` where a part did not run)."""
    mlp = next(r for r in results["inference"] if r["case"].startswith("MLP"))
    out = {"integer MLP 3x1024 >= 1.4x float32": mlp["speedup"] >= 1.4}
    steps = results["train_step"]
    if isinstance(steps, str):
        out["weights-only QAT step <= 1.05x plain"] = None
        out["w8a8 QAT step below qwix w8a8"] = None
    else:
        ratio = {r["step"]: r["vs_plain"] for r in steps}
        out["weights-only QAT step <= 1.05x plain"] = ratio["mixjax w8 (weights only)"] <= 1.05
        out["w8a8 QAT step below qwix w8a8"] = ratio["mixjax w8a8"] < ratio["qwix w8a8"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds and epochs (smoke run)")
    args = parser.parse_args()
    rounds, step_rounds = (10, 10) if args.quick else (60, 100)
    epochs, qat_epochs = (3, 1) if args.quick else (40, 10)

    results = {
        "quick": args.quick,
        "env": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "python": sys.version.split()[0],
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
        },
    }
    results["inference"] = inference(rounds)
    print("## Inference (median of interleaved runs)\n")
    print(
        table(
            results["inference"],
            ["case", "float32_ms", "int8_ms", "speedup", "rel_err", "argmax_agree"],
        )
    )
    try:
        results["train_step"] = step_overhead(step_rounds)
    except ImportError as err:
        results["train_step"] = f"qwix not importable: {err}"
    print("\n## Train step, LeNet-5 batch 128 (28x28x1)\n")
    if isinstance(results["train_step"], str):
        print(results["train_step"])
    else:
        print(table(results["train_step"], ["step", "ms", "vs_plain"]))
    results["accuracy"] = accuracy(epochs, qat_epochs)
    print(f"\n## Accuracy, digits test set, LeNet-5 ({epochs} float epochs, {qat_epochs} QAT)\n")
    print(
        table(
            results["accuracy"],
            ["model", "fake_quant_acc", "int_acc", "int_agrees", "artifact_bytes"],
        )
    )
    results["env"]["loadavg_end"] = os.getloadavg()
    results["goals"] = goals(results)
    print("\n## Goals\n")
    for goal, met in results["goals"].items():
        print(f"- {goal}: {met}")
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "quant.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
