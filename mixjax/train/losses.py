"""Losses and metrics of the training and evaluation steps (classification)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["metrics", "softmax_cross_entropy"]

_LOSS = "mixjax.train.softmax_cross_entropy"


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy for integer or soft labels.

    Args:
      logits: ``(B, C)`` floats.
      labels: ``(B,)`` integer class ids, or ``(B, C)`` floats, a distribution per example (as
        returned by ``mixjax.augment.mixup``/``cutmix``/``label_smoothing``).

    Returns:
      ``(B,)`` losses in the logits' dtype.

    Raises:
      ValueError: labels neither ``(B,)`` integers nor ``(B, C)`` floats matching ``logits``.
    """
    labels = jnp.asarray(labels)
    if labels.shape == logits.shape[:1] and jnp.issubdtype(labels.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if labels.shape == logits.shape and jnp.issubdtype(labels.dtype, jnp.floating):
        return optax.softmax_cross_entropy(logits, labels)
    raise ValueError(
        f"{_LOSS}: labels must be integer class ids {logits.shape[:1]} or a float distribution "
        f"{logits.shape} for logits {logits.shape}, got {labels.dtype} {labels.shape}"
    )


def _classes(labels: jax.Array) -> jax.Array:
    return labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)


def metrics(logits: jax.Array, labels: jax.Array, per_example: jax.Array) -> dict[str, jax.Array]:
    """``{"loss": mean per-example loss, "accuracy": mean top-1 accuracy}`` (float32 scalars).

    Soft labels ``(B, C)`` count as their argmax class.
    """
    correct = jnp.argmax(logits, axis=-1) == _classes(labels)
    return {"loss": jnp.mean(per_example), "accuracy": jnp.mean(correct.astype(jnp.float32))}
