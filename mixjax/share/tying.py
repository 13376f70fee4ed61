"""Tied entries: values shared within segments, with the shared value's gradient.

:func:`tie` is the one primitive behind weight sharing: :func:`mixjax.share.cluster` ties the
members of each cluster (Deep Compression's shared weights) and :func:`mixjax.share.merge_similar`
ties merged units. :func:`straight_through` is the rounding-style alternative: a forward value
with the identity gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["straight_through", "tie"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tie(x: jax.Array, segment_ids: jax.Array, live: jax.Array, num_segments: int) -> jax.Array:
    """Ties entries to their segment's mean, with Deep Compression's shared-weight gradient.

    Args:
      x: float array, any shape.
      segment_ids: int array of ``x``'s shape, values in ``[0, num_segments)``.
      live: bool array of ``x``'s shape; dead entries neither count in a mean nor get one.
      num_segments: the number of segments (static).

    Returns:
      ``x``'s shape and dtype: each live entry holds the mean of the live entries of its segment;
      dead entries are 0. Under ``jax.grad``, each live entry of ``x`` receives the *sum* of the
      output gradients over the live entries of its segment (the gradient of the shared value),
      dead entries receive 0.
    """
    return _tie_forward(x, segment_ids, live, num_segments)[0]


def _segment_sum(values, segment_ids, num_segments):
    return jax.ops.segment_sum(values.ravel(), segment_ids.ravel(), num_segments)


def _tie_forward(x, segment_ids, live, num_segments):
    # Dead entries (e.g. pruned zeros) go to an out-of-range segment that segment_sum drops:
    # sending them all to one real segment serializes XLA's CPU scatter-add on one address.
    ids = jnp.where(live, segment_ids, num_segments).astype(jnp.int32)
    # Sums and counts in one scatter of (value, 1) pairs: XLA's CPU scatter is a serial loop
    # whose cost is per index, so two scalar scatters cost about twice one of pairs.
    pairs = jnp.stack([x.astype(jnp.float32).ravel(), jnp.ones(x.size, jnp.float32)], axis=-1)
    totals = jax.ops.segment_sum(pairs, ids.ravel(), num_segments)
    means = totals[:, 0] / jnp.maximum(totals[:, 1], 1.0)
    out = jnp.where(live, jnp.take(means, ids, mode="clip"), 0).astype(x.dtype)
    return out, (ids, live)


def _tie_backward(num_segments, residuals, g):
    ids, live = residuals
    total = _segment_sum(jnp.where(live, g, 0).astype(jnp.float32), ids, num_segments)
    return jnp.where(live, jnp.take(total, ids, mode="clip"), 0).astype(g.dtype), None, None


tie.defvjp(_tie_forward, _tie_backward)


def straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Exactly ``q`` forward, the identity backward (``x - x`` is exactly 0)."""
    return (x - jax.lax.stop_gradient(x) + jax.lax.stop_gradient(q)).astype(x.dtype)
