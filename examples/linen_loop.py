"""A plain Flax linen + optax training loop with pruning and 8-bit fake quantization.

Everything is hand-written (no ``mixjax.train``): the only mixjax pieces are the transform
``chain(prune, quant)``, its ``apply`` in the loss, its ``update`` after the optimizer step, and
``wrap_optax`` around Adam so pruned weights stay exactly zero. Trains LeNet-300-100 on the
embedded digits and prints the test accuracy of the compressed view.

    python examples/linen_loop.py [--steps 600] [--sparsity 0.8] [--bits 8]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import mixjax


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--sparsity", type=float, default=0.8, help="final sparsity")
    parser.add_argument("--bits", type=int, default=8, help="weight bit-width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train = mixjax.data.load("digits", "train")
    test = mixjax.data.load("digits", "test")
    x_test, y_test = mixjax.data.normalize(test.images), test.labels
    model = mixjax.models.LeNet300100(num_classes=train.num_classes)
    params = model.init(jax.random.key(args.seed), x_test[:1])["params"]

    # Dense for the first quarter, prune gradually until three quarters, then fine-tune.
    begin, end = args.steps // 4, max(3 * args.steps // 4, args.steps // 4 + 1)
    sparsity = mixjax.schedules.polynomial(0.0, args.sparsity, begin, end)
    transform = mixjax.chain(
        mixjax.prune.magnitude(sparsity, update_every=10),
        mixjax.quant.fake_quant(args.bits),  # quantizes the pruned view: zeros stay zero
    )
    tx = mixjax.wrap_optax(optax.adam(1e-3), transform)
    t_state, opt_state = transform.init(params), tx.init(params)

    @jax.jit
    def train_step(params, opt_state, t_state, step, images, labels):
        def loss_fn(params):
            # The forward pass sees the compressed view; gradients reach the float params
            # through the straight-through estimators.
            logits = model.apply({"params": transform.apply(params, t_state)}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, transform_state=t_state)
        params = optax.apply_updates(params, updates)
        t_state = transform.update(params, t_state, step)  # new masks / scales at this step
        return params, opt_state, t_state, loss

    @jax.jit
    def accuracy(params, t_state):
        logits = model.apply({"params": transform.apply(params, t_state)}, x_test)
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    stream = mixjax.data.batches(train, args.batch_size, seed=args.seed, epochs=None)
    start = time.perf_counter()
    for step in range(args.steps):
        batch = next(stream)
        images = mixjax.data.normalize(batch["image"])
        params, opt_state, t_state, loss = train_step(
            params, opt_state, t_state, step, images, batch["label"]
        )
    acc = float(accuracy(params, t_state))
    seconds = time.perf_counter() - start
    print(f"compressed test accuracy: {acc:.2%}  ({args.steps} steps in {seconds:.1f} s)")
    print(mixjax.prune.summary(params))
    return acc


if __name__ == "__main__":
    main()
