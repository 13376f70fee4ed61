"""Deep Compression pipeline (Han et al. 2016) on the embedded digits: accuracy and bytes.

Usage::

    python benchmarks/deep_compression.py [--quick] [--seeds N]

For LeNet-300-100 and LeNet-5 (8x8x1 digits inputs, so LeNet-300-100 has 64*300 + 300*100 +
100*10 weights plus 410 biases): train dense (Adam), prune gradually by magnitude with
per-layer final sparsities (Zhu & Gupta polynomial schedule, fine-tuning throughout; pruned
weights held at zero by ``wrap_optax``), cluster (``share.cluster``, fixed assignments, trained
centroids, zero pinned) and fine-tune the centroids, quantize the codebooks to 8 bits
(``quant.fake_quant`` per tensor, chained after the clustering), and export with Huffman coding.

Bytes of every stage are real :mod:`mixjax.export` artifacts in the compact container: ``file``
is ``Artifact.nbytes``, the whole file (arrays + deflated JSON manifest + header + sha256);
``weights`` is the arrays alone (the per-leaf "bytes" column of ``Artifact.table()``, summed).
Ratios are float32 parameter bytes (4 per parameter) over each. Stages before "+Huffman" are
encoded with Huffman coding turned off, so each row adds one step. Biases are stored as float32
until the quantization stage, where the two large bias vectors are clustered too and every leaf
is on an 8-bit grid.

Prints markdown tables and writes ``benchmarks/results/compression.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixjax import (
    codebook_codec,
    codecs,
    core,
    data,
    export,
    models,
    prune,
    quant,
    schedules,
    select,
    share,
    wrap_optax,
)

BATCH = 64
# Final sparsity: per kernel (regex on the leaf path), or one float for global magnitude pruning
# across all kernels (the layers then settle their own sparsities; 0.94 global did worse here
# than these per-layer values). Deep Compression prunes LeNet-300-100's layers to 92/91/74%.
SPARSITY = {
    "lenet300100": {"Dense_0/kernel": 0.93, "Dense_1/kernel": 0.95, "Dense_2/kernel": 0.8},
    "lenet5": {
        "Conv_0/kernel": 0.3,
        "Conv_1/kernel": 0.7,
        "Dense_0/kernel": 0.85,
        "Dense_1/kernel": 0.85,
        "Dense_2/kernel": 0.6,
    },
}
MODELS = {"lenet300100": models.LeNet300100, "lenet5": models.LeNet5}
KERNEL_CLUSTERS = 16
BIAS_CLUSTERS = 8
BIG_BIASES = r"^(Dense_0|Dense_1|Conv_1)/bias$"


def loss_fn(model, transform):
    def loss(params, tstate, batch):
        x = data.normalize(batch["image"])
        logits = model.apply({"params": transform.apply(params, tstate)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    return loss


def train(model, params, transform, tstate, train_set, *, epochs, lr, seed, refresh):
    """Adam on ``transform``'s view; ``refresh``: call ``transform.update`` after each step."""
    tx = wrap_optax(optax.adam(lr), transform)
    opt_state = tx.init(params)
    grad = jax.grad(loss_fn(model, transform))

    @jax.jit
    def step(params, opt_state, tstate, batch, i):
        updates, opt_state = tx.update(
            grad(params, tstate, batch), opt_state, params, transform_state=tstate
        )
        params = optax.apply_updates(params, updates)
        if refresh:
            tstate = transform.update(params, tstate, i + 1)
        return params, opt_state, tstate

    stream = data.batches(train_set, BATCH, seed=seed, epochs=epochs)
    for i, batch in enumerate(stream):
        params, opt_state, tstate = step(params, opt_state, tstate, batch, i)
    return params, tstate


def accuracy(model, params, transform, tstate, test_set):
    view = transform.apply(params, tstate)
    logits = model.apply({"params": view}, data.normalize(test_set.images))
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == test_set.labels))


def compress(params, transform, tstate, *, huffman):
    """The compact artifact; ``huffman=False`` re-encodes its codebook leaves without Huffman."""
    artifact = export.compress(params, transform, tstate, container="compact")
    if huffman:
        return artifact
    view = jax.device_get(jax.jit(transform.apply)(params, tstate))
    arrays = dict(artifact.arrays)

    def store(array):
        name = f"p{len(arrays)}"
        arrays[name] = np.asarray(array)
        return name

    leaves = []
    encoders = codecs.leaf_encoders(view, tstate)
    for record, (path, leaf), encoder in zip(
        artifact.leaves, select.leaves_with_paths(view), encoders, strict=True
    ):
        if record["kind"] == "codebook":
            new = codebook_codec.encode_codebook(
                path, np.asarray(leaf), encoder, store, huffman=False
            )
            record = {"path": path, **new}
        leaves.append(record)
    used = set().union(*(codecs.record_arrays(r, arrays) for r in leaves))
    kept = {name: arrays[name] for name in used}
    return export.Artifact(tuple(leaves), kept, artifact.treedef, "compact")


def stage_row(name, model, params, transform, tstate, test_set, *, huffman):
    artifact = compress(params, transform, tstate, huffman=huffman)
    restored = artifact.params()
    exact = all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(restored),
            jax.tree.leaves(jax.jit(transform.apply)(params, tstate)),
            strict=True,
        )
    )
    table = artifact.table()
    weights = sum(r.bytes_after for r in table.rows)
    floats = sum(r.bytes_before for r in table.rows)
    return {
        "stage": name,
        "accuracy": accuracy(model, params, transform, tstate, test_set),
        "float32_bytes": floats,
        "weights_bytes": weights,
        "file_bytes": artifact.nbytes,
        "weights_ratio": floats / weights,
        "file_ratio": floats / artifact.nbytes,
        "exact_round_trip": exact,
        "table": table.markdown,
    }


def pipeline(name, seed, quick, train_set, test_set):
    model = MODELS[name](10)
    key = jax.random.key(seed)
    params = model.init(key, data.normalize(train_set.images[:1]))["params"]
    scale = 0.25 if quick else 1.0
    epochs = lambda n: max(1, int(n * scale))
    steps_per_epoch = len(train_set.labels) // BATCH
    rows = []

    identity = core.identity()
    params, _ = train(
        model,
        params,
        identity,
        (),
        train_set,
        epochs=epochs(60),
        lr=1e-3,
        seed=seed,
        refresh=False,
    )
    rows.append(stage_row("dense", model, params, identity, (), test_set, huffman=False))

    prune_epochs = epochs(60)
    end = int(prune_epochs * steps_per_epoch * 0.5)
    sparsity = SPARSITY[name]
    if isinstance(sparsity, float):  # one magnitude threshold across all kernels
        pruning = prune.magnitude(
            schedules.polynomial(0.0, sparsity, 0, end, frequency=10),
            scope="global",
            update_every=10,
        )
    else:
        pruning = core.chain(
            *(
                prune.magnitude(
                    schedules.polynomial(0.0, s, 0, end, frequency=10),
                    where=f"^{path}$",
                    update_every=10,
                )
                for path, s in sparsity.items()
            )
        )
    pstate = pruning.init(params)
    params, pstate = train(
        model,
        params,
        pruning,
        pstate,
        train_set,
        epochs=prune_epochs,
        lr=5e-4,
        seed=seed + 1,
        refresh=True,
    )
    rows.append(stage_row("pruned", model, params, pruning, pstate, test_set, huffman=False))

    # Pruning is frozen from here on (its state is no longer refreshed).
    clustering = share.cluster(KERNEL_CLUSTERS, mode="fixed", preserve_sparsity=True)
    shared = core.chain(pruning, clustering)
    cstate = (pstate, clustering.init(pruning.apply(params, pstate)))
    params, cstate = train(
        model,
        params,
        shared,
        cstate,
        train_set,
        epochs=epochs(30),
        lr=1e-4,
        seed=seed + 2,
        refresh=False,
    )
    rows.append(
        stage_row("pruned+clustered", model, params, shared, cstate, test_set, huffman=False)
    )

    biases = share.cluster(BIAS_CLUSTERS, preserve_sparsity=False, where=BIG_BIASES)
    quantizer = quant.fake_quant(8, per_channel=False, where=".*")
    final = core.chain(pruning, clustering, biases, quantizer)
    view = shared.apply(params, cstate)
    bstate = biases.init(view)
    fstate = (*cstate, bstate, quantizer.init(biases.apply(view, bstate)))
    rows.append(stage_row("+quantized", model, params, final, fstate, test_set, huffman=False))
    rows.append(stage_row("+Huffman", model, params, final, fstate, test_set, huffman=True))
    return rows


def markdown(name, rows):
    lines = [
        f"### {name}",
        "",
        "| stage | accuracy | weights bytes | x (weights) | file bytes | x (file) | exact |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {100 * r['accuracy']:.2f}% | {r['weights_bytes']} | "
            f"{r['weights_ratio']:.1f}x | {r['file_bytes']} | {r['file_ratio']:.1f}x | "
            f"{r['exact_round_trip']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short training, one seed")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per model (default 1)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    train_set, test_set = data.load("digits", "train"), data.load("digits", "test")
    results = {
        "platform": platform.platform(),
        "jax": jax.__version__,
        "quick": args.quick,
        "float32_bytes": "4 bytes per parameter",
        "file_bytes": "Artifact.nbytes: the whole compact file (arrays, manifest, header, sha256)",
        "weights_bytes": "the arrays alone, without container overhead",
        "models": {},
    }
    start = time.perf_counter()
    for name in args.models:
        runs = [pipeline(name, seed, args.quick, train_set, test_set) for seed in range(args.seeds)]
        results["models"][name] = runs
        for seed, rows in enumerate(runs):
            print(markdown(f"{name}, seed {seed}", rows))
            print()
            print(rows[-1]["table"])
            print()
            dense, final = rows[0], rows[-1]
            print(
                f"{name} seed {seed}: {final['file_ratio']:.1f}x smaller file "
                f"({final['weights_ratio']:.1f}x weights alone), accuracy "
                f"{100 * dense['accuracy']:.2f}% -> {100 * final['accuracy']:.2f}% "
                f"({100 * (final['accuracy'] - dense['accuracy']):+.2f} points)\n"
            )
    results["seconds"] = time.perf_counter() - start
    print(f"total {results['seconds']:.0f} s")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compression.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
