"""The tiny model and random batches of the data-parallel replica tests. Not a test module;
``import replica_setup`` from a test."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixjax import train


class MLP(nn.Module):
    """4x4x1 images -> 16 hidden units -> 4 classes."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        return nn.Dense(4)(x)


def mlp_setup(steps: int, batch: int) -> dict:
    """``params`` (seed 0), ``steps`` random ``batches`` of ``batch`` examples (seed 0) and the
    ``apply_fn`` of :class:`MLP`."""
    module = MLP()
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.random((batch, 4, 4, 1), np.float32),
            "label": rng.integers(0, 4, batch).astype(np.int32),
        }
        for _ in range(steps)
    ]
    return dict(params=params, batches=batches, apply_fn=train.linen_apply(module))
