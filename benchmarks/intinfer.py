"""Integer inference against the float forward: every CLI image model at 8x8, 28x28 and 32x32.

Usage::

    python benchmarks/intinfer.py [--quick] [--rounds 20] [--batch 256] [--models lenet5,...]

For each image model ``mixjax run`` offers (:data:`mixjax.models.MODELS`, default sizes) and
each input (8x8x1 as the embedded digits, 28x28x1 as MNIST, 32x32x3 as CIFAR), random weights
are fake-quantized to int8 (per output feature), the activations PTQ-calibrated to int8
(min-max over 4 random batches), the artifact exported and prepared for integer inference
twice: ``kernels="int8"`` (int8 x int8 -> int32 wherever possible) and ``kernels="measure"``
(per site, the faster of int8 and the dequantized float op, timed at prepare time on the
batch's shapes: what ``mixjax run`` and ``mixjax eval`` use). Each is timed against the float
forward (``model.apply`` on the float weights) on one batch of ``--batch`` images, the three
interleaved (alternating order each round), medians. The per-site choice is in the JSON.

Goal (issue 16): the measured path is never slower than the float forward (>= 1.0x) and
>= 1.5x on Dense-heavy models (LeNet-300-100). ``--quick``: 3 rounds, batch 32.
Prints a table and writes ``results/intinfer.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant import interleaved  # noqa: E402

from mixjax import _files, export, models, quant  # noqa: E402
from mixjax.export import integer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
INPUTS = {"8x8": (8, 8, 1), "28x28": (28, 28, 1), "32x32": (32, 32, 3)}
IMAGE_MODELS = [name for name, info in models.MODELS.items() if info.task == "image"]
DENSE_HEAVY = {"lenet300100"}


def case(name: str, shape: tuple, batch: int, rounds: int) -> dict:
    """One model at one input size: times, ratios and the measured per-site choice."""
    rng = np.random.default_rng(0)
    module = models.create(name, 10)
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    variables = jax.jit(lambda x: module.init(jax.random.key(0), x))(x)
    params, model_state = variables.pop("params"), variables
    fn = lambda p, x: module.apply({"params": p, **model_state}, x)  # noqa: E731
    weights = quant.fake_quant(8)
    wstate = weights.init(params)
    view = weights.apply(params, wstate)
    act = quant.activation_quant(8, observer=quant.minmax_observer())
    calib = [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for _ in range(4)]
    astate = quant.calibrate(act, fn, view, act.init(fn, view, calib[0]), calib)
    artifact = export.compress(params, weights, wstate)
    restored = artifact.params()
    prepared, prepare_s = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sites left in float are listed in the table
        for kernels in ("int8", "measure"):
            tick = time.perf_counter()
            prepared[kernels] = export.integer_model(
                fn, artifact, x, act=act, act_state=astate, kernels=kernels
            )
            prepare_s[kernels] = time.perf_counter() - tick
    # Parameters are arguments of both (not closed-over constants XLA could pre-transform).
    run = jax.jit(lambda m, p, x: export.integer_apply(m, fn, p, x))
    forward = jax.jit(fn)
    t = interleaved(
        {
            "float": lambda: forward(params, x),
            "int8": lambda: run(prepared["int8"], restored, x),
            "measure": lambda: run(prepared["measure"], restored, x),
        },
        rounds,
    )
    table = prepared["measure"].table
    return {
        "model": name,
        "input": "x".join(map(str, shape)),
        "batch": batch,
        "float_ms": 1e3 * t["float"],
        "int8_ms": 1e3 * t["int8"],
        "measured_ms": 1e3 * t["measure"],
        "speedup_int8": t["float"] / t["int8"],
        "speedup_measured": t["float"] / t["measure"],
        "prepare_s": prepare_s,
        "int8_sites": sum(row.way == integer.INT8 for row in table),
        "sites": len(table),
        "choice": [row._asdict() for row in table],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--models", default=",".join(IMAGE_MODELS))
    parser.add_argument("--inputs", default=",".join(INPUTS))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "intinfer.json"))
    args = parser.parse_args()
    rounds, batch = (3, 32) if args.quick else (args.rounds, args.batch)
    rows = []
    for name in args.models.split(","):
        for size in args.inputs.split(","):
            row = case(name, INPUTS[size], batch, rounds)
            rows.append(row)
            print(
                f"  {name} {size}: float {row['float_ms']:.2f} ms, int8 {row['speedup_int8']:.2f}x"
                f", measured {row['speedup_measured']:.2f}x ({row['int8_sites']}/{row['sites']} "
                "int8)",
                flush=True,
            )
    print("\n| model | input | float ms | int8 everywhere | measured | int8 sites | goal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        goal = 1.5 if r["model"] in DENSE_HEAVY else 1.0
        r["goal"], r["met"] = goal, bool(r["speedup_measured"] >= goal)
        print(
            f"| {r['model']} | {r['input']} | {r['float_ms']:.2f} | {r['speedup_int8']:.2f}x | "
            f"{r['speedup_measured']:.2f}x | {r['int8_sites']}/{r['sites']} | "
            f">= {goal:.1f}x {'yes' if r['met'] else 'no'} |"
        )
    result = {
        "meta": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "rounds": rounds,
            "batch": batch,
        },
        "rows": rows,
    }
    _files.write_atomic(args.out, lambda f: json.dump(result, f, indent=1), text=True)


if __name__ == "__main__":
    main()
