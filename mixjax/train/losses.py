"""Losses and metrics of the training and evaluation steps, for any leading dims.

Classification and sequence tasks share one convention: logits ``(..., V)`` over ``V`` classes
(a vocabulary, for a language model), with either integer labels ``(...)`` (the logits'
leading dims: ``(B,)`` for ``(B, C)`` logits, ``(B, L)`` for next-token logits ``(B, L, V)``)
or float distributions ``(..., V)`` (soft labels, e.g. from ``mixjax.augment.mixup``). A loss
gives one value per position, ``(...)``; an optional weight of that shape (a padding mask,
float or boolean) makes every mean a weighted one::

    mean = sum(where(w != 0, w * values, 0)) / max(sum(w), EPS)

so positions of weight 0 do not count at all (whatever their label, even a NaN loss), an
all-zero mask gives 0, and without a weight it is the plain mean. :func:`metrics` adds
``"perplexity"``, ``exp(loss)``, for sequence tasks (logits with more than one leading dim).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["EPS", "check_labels", "metrics", "softmax_cross_entropy", "weighted_mean"]

_LOSS = "mixjax.train.softmax_cross_entropy"
_METRICS = "mixjax.train.metrics"
EPS = float(np.finfo(np.float32).tiny)
"""The floor of a weighted mean's denominator: only an all-zero weight is affected."""


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_labels(fn_name: str, logits: Any, labels: Any, *, name: str = "labels") -> bool:
    """Checks that ``labels`` fit ``(..., V)`` logits; returns whether they are integer ids.

    Integer labels must have the logits' leading dims ``(...)`` and, where their values are
    concrete (not traced), lie in ``[0, V)``; float labels must have the logits' shape.

    Args:
      fn_name: the public function, for the message.
      logits: ``(..., V)`` floats (or their abstract value).
      labels: the labels (or their abstract value).
      name: how the message names the labels (``"batch['label']"`` in the step).

    Raises:
      ValueError: logits without a class axis, labels of another shape or kind, or concrete
        integer labels outside ``[0, V)`` (naming the first such label, its index and how many
        there are).
    """
    shape, lead = tuple(jnp.shape(logits)), tuple(jnp.shape(logits))[:-1]
    if not shape:
        raise ValueError(f"{fn_name}: logits must have a class axis (..., V), got shape ()")
    dtype, got = jnp.result_type(labels), tuple(jnp.shape(labels))
    integer = jnp.issubdtype(dtype, jnp.integer)
    if not ((integer and got == lead) or (jnp.issubdtype(dtype, jnp.floating) and got == shape)):
        raise ValueError(
            f"{fn_name}: {name} must be integer class ids of the logits' leading dims {lead} "
            f"or a float distribution {shape} for logits {shape}, got {dtype} {got}"
        )
    if integer and _is_concrete(labels):
        values = np.asarray(labels)
        bad = (values < 0) | (values >= shape[-1])
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{fn_name}: {name} must be class ids in [0, {shape[-1]}) (the logits' last "
                f"axis, logits {shape}), got {values[index]} at index {index} "
                f"({int(bad.sum())} of {values.size} out of range)"
            )
    return bool(integer)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position softmax cross-entropy for integer or soft labels, any leading dims.

    Args:
      logits: ``(..., V)`` floats: ``(B, C)`` for classification, ``(B, L, V)`` for next-token
        prediction.
      labels: ``(...)`` integer class ids in ``[0, V)`` (the logits' leading dims), or
        ``(..., V)`` floats, a distribution per position (as returned by
        ``mixjax.augment.mixup``/``cutmix``/``label_smoothing``).

    Returns:
      ``(...)`` losses in the logits' dtype. Integer labels outside ``[0, V)`` can only be
      caught where their values are concrete (an eager call raises); traced ones (under
      ``jax.jit``, so in the train and eval steps) give a NaN loss at their position, never a
      wrapped-around class, so a batch with such a label has a NaN mean loss unless its weight
      there is 0 (:func:`weighted_mean`).

    Raises:
      ValueError: labels neither ``(...)`` integers nor ``(..., V)`` floats matching ``logits``;
        concrete integer labels outside ``[0, V)``.
    """
    if not check_labels(_LOSS, logits, labels):
        return optax.softmax_cross_entropy(logits, labels)
    labels = jnp.asarray(labels)
    classes = jnp.shape(logits)[-1]
    valid = (labels >= 0) & (labels < classes)
    safe = jnp.where(valid, labels, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.where(valid, losses, jnp.asarray(jnp.nan, losses.dtype))


def weighted_mean(values: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """``sum(where(w != 0, w * values, 0)) / max(sum(w), EPS)``, or ``mean(values)``.

    Args:
      values: per-position values (losses, 0/1 correctness), any shape.
      weight: ``None``, or an array of ``values``' shape (float, integer or bool; a padding
        mask), or of a prefix of it (broadcast over the trailing axes, e.g. a per-sequence
        ``(B,)`` weight on ``(B, L)`` values, each position then counting with its sequence's
        weight). Negative weights are not checked (they cannot be, under ``jax.jit``).

    Returns:
      A scalar: float32 when weighted, else ``values``' dtype.
    """
    if weight is None:
        return jnp.mean(values)
    w = jnp.asarray(weight).astype(jnp.float32)
    w = jnp.broadcast_to(w.reshape(w.shape + (1,) * (jnp.ndim(values) - w.ndim)), values.shape)
    total = jnp.sum(jnp.where(w != 0, w * values, 0.0))
    return total / jnp.maximum(jnp.sum(w), EPS)


def _prefix(weight_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(weight_shape) <= len(shape) and shape[: len(weight_shape)] == weight_shape


def metrics(
    logits: jax.Array,
    labels: jax.Array,
    per_example: jax.Array,
    weight: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The step's metrics, float32 scalars, each a :func:`weighted_mean` over the positions.

    Args:
      logits: ``(..., V)`` floats.
      labels: ``(...)`` integer ids or ``(..., V)`` distributions (counted as their argmax).
      per_example: the loss of each position, what the step's ``loss`` returned (``(...)``
        for the built-in :func:`softmax_cross_entropy`).
      weight: ``None`` or a per-position weight (a prefix of ``per_example``'s shape and of the
        logits' leading dims; see :func:`weighted_mean`).

    Returns:
      ``{"loss", "accuracy"}``: the weighted mean loss and top-1 accuracy; for sequence tasks
      (logits with more than one leading dim, ``(B, L, V)``) also ``"perplexity"``,
      ``exp(loss)``. To combine batches, average their losses weighted by their total weight
      (``sum(batch["weight"])``, or the batch size) and take ``exp`` of that, not the mean of
      the perplexities.

    Raises:
      ValueError: labels of neither shape (accuracy needs a class per position), or a weight
        whose shape is not a prefix of the logits' leading dims.
    """
    lead = tuple(jnp.shape(logits))[:-1]
    got = tuple(jnp.shape(labels))
    if got == lead:
        classes = labels
    elif got == tuple(jnp.shape(logits)):
        classes = jnp.argmax(labels, axis=-1)
    else:
        raise ValueError(
            f"{_METRICS}: labels must be class ids {lead} or distributions "
            f"{tuple(jnp.shape(logits))} for the accuracy of logits {tuple(jnp.shape(logits))}, "
            f"got {got}"
        )
    losses = tuple(jnp.shape(per_example))
    if weight is not None and not (
        _prefix(tuple(jnp.shape(weight)), lead) and _prefix(tuple(jnp.shape(weight)), losses)
    ):
        raise ValueError(
            f"{_METRICS}: weight {tuple(jnp.shape(weight))} must have the shape of the "
            f"positions (or a prefix of it): losses {losses}, logits {tuple(jnp.shape(logits))}"
        )
    correct = (jnp.argmax(logits, axis=-1) == classes).astype(jnp.float32)
    loss = weighted_mean(per_example, weight).astype(jnp.float32)
    out = {"loss": loss, "accuracy": weighted_mean(correct, weight).astype(jnp.float32)}
    if len(lead) > 1:
        out["perplexity"] = jnp.exp(loss)
    return out
