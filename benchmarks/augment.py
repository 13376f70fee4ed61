"""Augmentation throughput: mixjax.augment vs dm_pix and augmax, and fused vs unfused geometry.

Pipelines on a batch of 256 x 32 x 32 x 3 images (uint8 and float32), all under ``jax.jit``:

* ``flip + pad-crop(4) + brightness`` (the CIFAR recipe): ``mixjax.augment.chain`` against
  dm_pix and augmax written the way their docs show, with ``jax.random.split`` + ``jax.vmap``
  over single-image functions; dm_pix has no padding op (``jnp.pad`` per image) and neither
  library takes ``uint8`` (the image is converted to float32 in ``[0, 1]`` first, so their
  output is float32 where ours stays ``uint8``);
* the same pipeline, and ``flip + pad-crop(4) + rotate(15 deg)``, applied op by op (one
  resample per geometric op) against the fused chain (one resample).

Runs are interleaved (each repetition times every pipeline of a group once, in a shuffled
order); throughput is the median over repetitions, and a speedup is the median of the
per-repetition time ratios, which cancels most of the load changes of a shared machine.

Usage: ``python benchmarks/augment.py [--quick] [--reps N]``; writes
``benchmarks/results/augment.json``. dm_pix and augmax are benchmark-only extras
(``pip install dm-pix augmax``); a library that fails to import or run is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import augment

BATCH, SIZE, PAD, MAX_DELTA = 256, 32, 4, 0.2
RESULTS = os.path.join(os.path.dirname(__file__), "results", "augment.json")


def ours_cifar() -> augment.Chain:
    return augment.chain(
        augment.random_flip(), augment.random_crop(padding=PAD), augment.random_brightness(0.2)
    )


def unfused(ops: tuple) -> Callable:
    def run(key, images):
        for op, k in zip(ops, jax.random.split(key, len(ops)), strict=True):
            images = op(k, images)
        return images

    return run


def dm_pix_cifar() -> Callable:
    import dm_pix as pix

    def one(key, image):
        k_flip, k_crop, k_bright = jax.random.split(key, 3)
        image = pix.random_flip_left_right(k_flip, image)
        image = jnp.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)))
        image = pix.random_crop(k_crop, image, (SIZE, SIZE, 3))
        return pix.random_brightness(k_bright, image, MAX_DELTA)

    def run(key, images):
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)

    return run


def augmax_cifar() -> Callable:
    import augmax

    # augmax halves the brightness range it is given: (-0.4, 0.4) draws deltas in [-0.2, 0.2].
    ops = [
        augmax.HorizontalFlip(),
        augmax.RandomCrop(SIZE, SIZE),
        augmax.RandomBrightness((-2 * MAX_DELTA, 2 * MAX_DELTA), p=1.0),
    ]
    float_chain = augmax.Chain(*ops)
    byte_chain = augmax.Chain(augmax.ByteToFloat(), *ops)

    def run(key, images):
        transform = byte_chain if images.dtype == jnp.uint8 else float_chain
        images = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
        return jax.vmap(transform)(jax.random.split(key, images.shape[0]), images)

    return run


def candidates() -> tuple[dict[str, Callable], dict[str, str]]:
    """The pipelines to time, and the libraries that could not be set up (with the reason)."""
    cifar_ops = (
        augment.random_flip(),
        augment.random_crop(padding=PAD),
        augment.random_brightness(0.2),
    )
    rot_ops = (
        augment.random_flip(),
        augment.random_crop(padding=PAD),
        augment.random_affine(degrees=15.0),
    )
    fused_rot = augment.chain(*rot_ops)
    ours = ours_cifar()
    fns = {
        "cifar/mixjax chain": lambda k, x: ours(k, x)[0],
        "cifar/mixjax op by op": unfused(cifar_ops),
        "rotate/mixjax chain": lambda k, x: fused_rot(k, x)[0],
        "rotate/mixjax op by op": unfused(rot_ops),
    }
    failed = {}
    for name, make in [("dm_pix", dm_pix_cifar), ("augmax", augmax_cifar)]:
        try:
            fns[f"cifar/{name}"] = make()
        except Exception as err:  # noqa: BLE001 - report any import/setup failure
            failed[name] = f"{type(err).__name__}: {err}"
    return {k: jax.jit(f) for k, f in fns.items()}, failed


def measure(fns: dict[str, Callable], images: jax.Array, reps: int) -> tuple[dict, dict]:
    """Times each pipeline ``reps`` times, interleaved (every repetition runs each pipeline
    once, in a shuffled order), so load changes on a shared machine hit all of them alike.

    Returns:
      ``(seconds, failed)``: per pipeline, the list of seconds per call; and the pipelines that
      failed to run, with the reason.
    """
    key = jax.random.key(0)
    failed, ready = {}, {}
    for name, fn in fns.items():
        try:
            jax.block_until_ready(fn(key, images))
            ready[name] = fn
        except Exception as err:  # noqa: BLE001 - a library that does not run is reported
            failed[name] = f"{type(err).__name__}: {err}"[:300]
    times = {name: [] for name in ready}
    order = np.random.default_rng(0)
    names = list(ready)
    for rep in range(reps):
        key = jax.random.key(rep + 1)
        # A pipeline timed right after a heavier one runs up to ~20% slower (caches, thread
        # pool), so the order is shuffled every repetition.
        for i in order.permutation(len(names)):
            start = time.perf_counter()
            jax.block_until_ready(ready[names[i]](key, images))
            times[names[i]].append(time.perf_counter() - start)
    return times, failed


def paired_speedup(ours: list[float], other: list[float]) -> float:
    """Median over repetitions of ``other / ours`` timed back to back: > 1 means ours is faster."""
    return float(np.median(np.asarray(other) / np.asarray(ours)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, for a smoke test")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per pipeline")
    args = parser.parse_args()
    reps = args.reps or (10 if args.quick else 200)

    fns, setup_failed = candidates()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
    rows, record = [], {"dtypes": {}}
    for dtype in ("uint8", "float32"):
        images = jnp.asarray(pixels if dtype == "uint8" else pixels.astype(np.float32) / 255.0)
        times, run_failed = {}, {}
        for group in ("cifar", "rotate"):  # each group interleaved on its own
            group_fns = {k: f for k, f in fns.items() if k.startswith(group + "/")}
            group_times, group_failed = measure(group_fns, images, reps)
            times.update(group_times)
            run_failed.update(group_failed)
        rate = {name: BATCH / float(np.median(t)) for name, t in times.items()}
        ratios = {}
        for lib in ("dm_pix", "augmax"):
            if f"cifar/{lib}" in times:
                ratios[f"cifar: mixjax / {lib}"] = paired_speedup(
                    times["cifar/mixjax chain"], times[f"cifar/{lib}"]
                )
        for group in ("cifar", "rotate"):
            ratios[f"{group}: fused / op by op"] = paired_speedup(
                times[f"{group}/mixjax chain"], times[f"{group}/mixjax op by op"]
            )
        record["dtypes"][dtype] = {
            "images_per_s": rate,
            "median_s": {name: float(np.median(t)) for name, t in times.items()},
            "speedups": ratios,
            "failed": run_failed,
        }
        for name in fns:
            value = f"{rate[name]:,.0f}" if name in rate else "failed"
            rows.append(f"| {dtype} | {name} | {value} |")
        rows += [f"| {dtype} | speedup {name} | {value:.2f}x |" for name, value in ratios.items()]

    print(
        f"Augmentation throughput, batch {BATCH}x{SIZE}x{SIZE}x3, median of {reps} interleaved "
        "runs (images/s); speedups are medians of back-to-back time ratios\n"
    )
    print("| dtype | pipeline | images/s |")
    print("| --- | --- | --- |")
    print("\n".join(rows))
    for lib, why in setup_failed.items():
        print(f"\n{lib} could not be set up: {why}")
    for dtype, rec in record["dtypes"].items():
        for name, why in rec["failed"].items():
            print(f"\n{name} ({dtype}) failed to run: {why}")

    versions = {}
    for lib in ("dm_pix", "augmax"):
        try:
            versions[lib] = __import__(lib).__version__
        except Exception:  # noqa: BLE001 - not installed
            versions[lib] = None
    record.update(
        batch=[BATCH, SIZE, SIZE, 3],
        reps=reps,
        quick=args.quick,
        jax=jax.__version__,
        device=str(jax.devices()[0]),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        load_average=os.getloadavg(),
        versions=versions,
        setup_failed=setup_failed,
    )
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(record, f, indent=2)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
