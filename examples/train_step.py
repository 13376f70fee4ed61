"""The composed, jitted train step: augmentation, compression, delayed updates, K steps per call.

``mixjax.train.make_train_step`` builds one ``jax.jit`` function that augments the batch on
device, runs the model on the compressed view (pruning + fake quantization), takes the gradient
through the straight-through estimators, applies an optax optimizer that sees gradients
``tau`` steps stale (``mixjax.delay.delayed``, with DC-ASGD compensation), re-imposes the
pruning masks and refreshes the transform state; ``steps_per_call=K`` runs K steps per dispatch
under ``lax.scan``. Trains LeNet-300-100 on the embedded digits and prints the test accuracy.

    python examples/train_step.py [--steps 600] [--steps-per-call 10] [--tau 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax

import mixjax


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--steps-per-call", type=int, default=10, help="steps per dispatch (K)")
    parser.add_argument("--tau", type=int, default=2, help="gradient staleness in steps")
    parser.add_argument("--sparsity", type=float, default=0.8, help="final sparsity")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    k = args.steps_per_call
    if args.steps % k:
        parser.error(f"--steps ({args.steps}) must be a multiple of --steps-per-call ({k})")

    train = mixjax.data.load("digits", "train")
    test = mixjax.data.load("digits", "test")
    module = mixjax.models.LeNet300100(num_classes=train.num_classes)
    key, init_key = jax.random.split(jax.random.key(args.seed))
    params = module.init(init_key, mixjax.data.normalize(test.images[:1]))["params"]

    begin, end = args.steps // 4, max(3 * args.steps // 4, args.steps // 4 + 1)
    sparsity = mixjax.schedules.polynomial(0.0, args.sparsity, begin, end)
    transform = mixjax.chain(
        mixjax.prune.magnitude(sparsity, update_every=10), mixjax.quant.fake_quant(8)
    )
    # Step t applies the gradient of step t - tau: what an asynchronous worker would send.
    tx = mixjax.delay.delayed(optax.adam(1e-3), args.tau, compensation="dc")
    # Per example, on device, on the raw uint8 pixels (normalization comes after, in preprocess).
    augment = mixjax.augment.chain(
        mixjax.augment.random_affine(degrees=10.0, translate=0.1),
        mixjax.augment.label_smoothing(0.1, num_classes=train.num_classes),
    )

    apply_fn = mixjax.train.linen_apply(module)
    state = mixjax.train.init_train_state(params, tx, key=key, transform=transform)
    step = mixjax.train.make_train_step(
        apply_fn,
        tx,  # not wrap_optax: the step itself re-imposes transform.constrain after the update
        transform=transform,
        augment=augment,
        preprocess=mixjax.data.normalize,
        steps_per_call=k,
    )
    evaluate = mixjax.train.make_eval_step(
        apply_fn, transform=transform, preprocess=mixjax.data.normalize
    )

    stream = mixjax.data.stacked_batches(train, args.batch_size, k, seed=args.seed, epochs=None)
    start = time.perf_counter()
    losses = []
    for _ in range(args.steps // k):
        state, metrics = step(state, next(stream))  # batch (K, B, ...); metrics (K,)
        losses.append(metrics["loss"])  # kept on device; read once at the end
    train_loss = float(np.mean(jax.device_get(losses)[-1]))
    acc = float(evaluate(state, {"image": test.images, "label": test.labels})["accuracy"])
    seconds = time.perf_counter() - start
    print(f"last train loss: {train_loss:.3f}")
    print(f"compressed test accuracy: {acc:.2%}  ({args.steps} steps in {seconds:.1f} s)")
    return acc


if __name__ == "__main__":
    main()
