"""Gradual magnitude pruning of LeNet-300-100 on the embedded digits, to 90 % sparsity.

Trains dense, then prunes gradually (Zhu & Gupta cubic schedule, masks refreshed every 10 steps
inside the jitted step) while fine-tuning with Adam wrapped by ``mixjax.wrap_optax``, so pruned
weights stay exactly zero. Prints accuracy before and after and the sparsity table.

    python examples/prune_lenet.py [--steps 1500] [--sparsity 0.9]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import mixjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-steps", type=int, default=1500, help="dense training steps")
    parser.add_argument("--prune-steps", type=int, default=1500, help="pruning + fine-tune steps")
    parser.add_argument("--sparsity", type=float, default=0.9, help="final sparsity")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train = mixjax.data.load("digits", "train")
    test = mixjax.data.load("digits", "test")
    x_test, y_test = mixjax.data.normalize(test.images), test.labels
    model = mixjax.models.LeNet300100(num_classes=train.num_classes)
    params = model.init(jax.random.key(args.seed), x_test[:1])["params"]

    # Prune from 0 to the target over the first 2/3 of the fine-tuning, then fine-tune the rest.
    ramp_end = args.dense_steps + 2 * args.prune_steps // 3
    sparsity = mixjax.schedules.polynomial(0.0, args.sparsity, args.dense_steps, ramp_end)
    pruning = mixjax.prune.magnitude(sparsity, update_every=10)
    tx = mixjax.wrap_optax(optax.adam(1e-3), pruning)
    prune_state, opt_state = pruning.init(params), tx.init(params)

    @jax.jit
    def train_step(params, opt_state, prune_state, step, images, labels):
        def loss_fn(params):
            logits = model.apply({"params": pruning.apply(params, prune_state)}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, transform_state=prune_state)
        params = optax.apply_updates(params, updates)
        prune_state = pruning.update(params, prune_state, step)
        return params, opt_state, prune_state, loss

    @jax.jit
    def accuracy(params, prune_state):
        logits = model.apply({"params": pruning.apply(params, prune_state)}, x_test)
        return jnp.mean(jnp.argmax(logits, -1) == y_test)

    total = args.dense_steps + args.prune_steps
    stream = mixjax.data.batches(train, args.batch_size, seed=args.seed, epochs=None)
    start = time.perf_counter()
    for step in range(total):
        if step == args.dense_steps:
            print(f"dense accuracy:  {float(accuracy(params, prune_state)):.2%}")
        batch = next(stream)
        images = mixjax.data.normalize(batch["image"])
        params, opt_state, prune_state, loss = train_step(
            params, opt_state, prune_state, step, images, batch["label"]
        )
    final = float(accuracy(params, prune_state))
    print(f"pruned accuracy: {final:.2%}  ({total} steps in {time.perf_counter() - start:.1f} s)")
    print(mixjax.prune.summary(params))


if __name__ == "__main__":
    main()
