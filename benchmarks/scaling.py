"""Data-parallel scaling: steps/s of ``mixjax.parallel.data_parallel`` on 1, 2, 4, 8 devices.

LeNet-300-100 on 28x28x1 inputs, global batch 512, magnitude pruning + 8-bit fake quantization,
Adam. On CPU the devices are forced host devices (``--xla_force_host_platform_device_count``),
which share the machine's cores, so the table measures the wrapper's overhead and XLA's
partitioning rather than a speed-up; the same script on a GPU/TPU host uses the real devices.
Each round times a block of steps of every device count, in alternating order; the table reports
the median over rounds.

    python benchmarks/scaling.py [--rounds 20] [--block 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import mixjax  # noqa: E402
from mixjax import models, parallel, prune, quant, train  # noqa: E402

BATCH = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, block = (3, 2) if args.quick else (args.rounds, args.block)

    module = models.LeNet300100()
    params = module.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    transform = mixjax.chain(prune.magnitude(0.9), quant.fake_quant(8))
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((BATCH, 28, 28, 1), np.float32),
        "label": rng.integers(0, 10, BATCH).astype(np.int32),
    }
    counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
    runs = {}
    for n in counts:
        mesh = parallel.make_mesh(data=n, devices=jax.devices()[:n])
        step = parallel.data_parallel(
            train.make_train_step(train.linen_apply(module), tx, transform=transform), mesh
        )
        state = train.init_train_state(params, tx, transform=transform, key=jax.random.key(1))
        state, metrics = step(state, batch)  # compile
        jax.block_until_ready(metrics)
        runs[n] = [step, state, []]
    for r in range(rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            step, state, times = runs[n]
            start = time.perf_counter()
            for _ in range(block):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(block / (time.perf_counter() - start))
            runs[n][1] = state
    base = float(np.median(runs[counts[0]][2]))
    rows = []
    for n in counts:
        rate = float(np.median(runs[n][2]))
        rows.append({"devices": n, "steps_per_s": rate, "examples_per_s": rate * BATCH})
        rows[-1]["relative"] = rate / base
    print(f"\nData-parallel LeNet-300-100, global batch {BATCH}, {jax.devices()[0].platform}\n")
    print("| devices | steps/s | examples/s | vs 1 device |")
    print("|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['devices']} | {row['steps_per_s']:.1f} | {row['examples_per_s']:.0f} | "
            f"{row['relative']:.2f}x |"
        )
    result = {
        "benchmark": "scaling",
        "batch": BATCH,
        "rounds": rounds,
        "block": block,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "host": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "rows": rows,
    }
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scaling.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
