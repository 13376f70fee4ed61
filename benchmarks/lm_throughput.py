"""GPT-tiny training throughput: tokens per second of ``mixjax.train``, compile time excluded.

Usage::

    python benchmarks/lm_throughput.py [--batches 12,64] [--calls 6] [--out results/...json]

GPT-tiny at :mod:`lm`'s size (4 layers x 4 heads x 128, context 64, 65 characters), AdamW,
``steps_per_call=50``, on random tokens (throughput does not depend on the text, so this runs
where ``tinyshakespeare.txt`` is absent, e.g. on a lent GPU machine). Per batch size one call
compiles and warms up, then ``--calls`` calls of 50 steps are timed; the median call gives
tokens per second (``batch * context`` tokens a step). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm import CONTEXT, PER_CALL, gpt_tiny  # noqa: E402

from mixjax import _files, data, train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = "".join(chr(ord(" ") + i) for i in range(65))


def throughput(batch: int, calls: int) -> dict:
    """Tokens per second of dense GPT-tiny training at ``batch``, median of ``calls`` calls."""
    rng = np.random.default_rng(0)
    corpus = data.TextDataset(
        rng.integers(0, len(VOCAB), 200_000).astype(np.int32), VOCAB, "random", "train"
    )
    module, apply_fn, tokens = gpt_tiny(len(VOCAB))
    params = jax.jit(module.init)(jax.random.key(0), tokens)["params"]
    tx = optax.adamw(1e-3, weight_decay=0.1)
    state = train.init_train_state(params, tx, key=jax.random.key(1))
    step = train.make_train_step(apply_fn, tx, steps_per_call=PER_CALL)
    groups = data.stacked_lm_batches(corpus, batch, CONTEXT, PER_CALL, seed=0)
    state, _ = step(state, next(groups))  # compile and warm up
    jax.block_until_ready(state)
    seconds = []
    for _, group in zip(range(calls), groups, strict=False):
        group = jax.device_put(group)
        jax.block_until_ready(group)
        tick = time.perf_counter()
        state, metrics = step(state, group)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - tick)
    per_call = float(np.median(seconds))
    return {
        "batch": batch,
        "step_ms": 1e3 * per_call / PER_CALL,
        "tokens_per_s": batch * CONTEXT * PER_CALL / per_call,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="12,64")
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "lm_throughput.json"))
    args = parser.parse_args()
    if args.calls < 1:
        parser.error(f"--calls must be >= 1, got {args.calls}")
    rows = [throughput(int(b), args.calls) for b in args.batches.split(",") if b]
    print(f"\nGPT-tiny training on {jax.devices()[0].device_kind} (steps_per_call={PER_CALL})\n")
    print("| batch | ms per step | tokens / s |")
    print("|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} |")
    meta = {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "context": CONTEXT,
        "steps_per_call": PER_CALL,
    }
    result = {"meta": meta, "rows": rows}
    _files.write_atomic(args.out, lambda f: json.dump(result, f, indent=1), text=True)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
