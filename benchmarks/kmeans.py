"""Benchmark: 1-D k-means of 1,000,000 normal weights into 16 clusters, mixjax vs scikit-learn.

Goal (issue 4): at least 5x faster than ``sklearn.cluster.KMeans(n_clusters=16)`` with its
defaults (greedy k-means++ init, Lloyd) at equal or lower inertia.

Both run in this process on the same data, interleaved (one sklearn fit, then one fit per mixjax
init, repeated), and the medians are compared. For mixjax the first call (trace + compile + run)
is reported apart from the steady state. sklearn gets a different ``random_state`` per repeat;
its median inertia is the bar.

Usage: ``python benchmarks/kmeans.py [--quick]``; writes ``benchmarks/results/kmeans.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import jax
import numpy as np
import sklearn
from sklearn.cluster import KMeans

from mixjax.share import kmeans

INITS = ("optimal", "density", "linear", "kmeans++")
GOAL_SPEEDUP = 5.0


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 9")
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=16)
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    k = args.clusters

    x = np.random.default_rng(0).standard_normal(args.size).astype(np.float32)
    x_device = jax.device_put(x)
    key = jax.random.key(0)

    def ours(init):
        return lambda: kmeans.fit(key, x_device, k, init=init)

    first = {init: _timed(ours(init))[0] for init in INITS}
    times = {name: [] for name in ("sklearn",) + INITS}
    inertia = {name: [] for name in times}
    iterations = {init: 0 for init in INITS}
    for r in range(repeats):
        seconds, model = _timed(lambda r=r: KMeans(n_clusters=k, random_state=r).fit(x[:, None]))
        times["sklearn"].append(seconds)
        inertia["sklearn"].append(float(model.inertia_))
        for init in INITS:
            seconds, result = _timed(ours(init))
            times[init].append(seconds)
            inertia[init].append(float(result.inertia))
            iterations[init] = int(result.iterations)

    median = {name: float(np.median(t)) for name, t in times.items()}
    bar = float(np.median(inertia["sklearn"]))
    rows = []
    for name in times:
        row = {
            "method": "scikit-learn KMeans (k-means++)" if name == "sklearn" else f"mixjax {name}",
            "first_call_s": None if name == "sklearn" else first[name],
            "median_s": median[name],
            "min_s": float(np.min(times[name])),
            "inertia": float(np.median(inertia[name])),
            "speedup_vs_sklearn": median["sklearn"] / median[name],
            "inertia_vs_sklearn": float(np.median(inertia[name])) / bar,
            "lloyd_iterations": iterations.get(name),
        }
        row["meets_goal"] = name != "sklearn" and (
            row["speedup_vs_sklearn"] >= GOAL_SPEEDUP and row["inertia"] <= bar
        )
        rows.append(row)

    print(f"k-means of {args.size:,} N(0,1) float32 values into {k} clusters; {repeats} repeats,")
    versions = f"jax {jax.__version__}, sklearn {sklearn.__version__}"
    print(f"device {jax.devices()[0].device_kind}, {versions}")
    print()
    print("| method | first call (s) | median (s) | inertia | speedup | inertia / sklearn | goal |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        first_call = "-" if row["first_call_s"] is None else f"{row['first_call_s']:.2f}"
        goal = "-" if row["method"].startswith("scikit") else ("yes" if row["meets_goal"] else "no")
        print(
            f"| {row['method']} | {first_call} | {row['median_s']:.4f} | {row['inertia']:,.1f} | "
            f"{row['speedup_vs_sklearn']:.1f}x | {row['inertia_vs_sklearn']:.4f} | {goal} |"
        )

    out = pathlib.Path(__file__).parent / "results" / "kmeans.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "kmeans",
        "size": args.size,
        "clusters": k,
        "repeats": repeats,
        "goal": f">= {GOAL_SPEEDUP}x faster than sklearn KMeans defaults at <= its inertia",
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "sklearn": sklearn.__version__,
        "machine": platform.machine(),
        "rows": rows,
        "times_s": times,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
