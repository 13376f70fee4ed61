"""Batches of a :class:`~mixjax.data.Dataset`: shuffled per epoch, reproducible, stacked for
steps per dispatch."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np

from mixjax import _checks
from mixjax.data.loaders import Dataset

__all__ = ["batches", "stacked_batches"]


def _check_batching(
    fn: str, dataset: Any, batch_size: Any, seed: Any, epochs: Any, drop_remainder: bool
) -> None:
    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"mixjax.data.{fn}: dataset must be a Dataset, got {type(dataset).__name__}"
        )
    _checks.integer(f"mixjax.data.{fn}", "batch_size", batch_size, 1)
    _checks.integer(f"mixjax.data.{fn}", "seed", seed, 0)
    if epochs is not None:
        _checks.integer(f"mixjax.data.{fn}", "epochs", epochs, 1)
    if drop_remainder and batch_size > len(dataset.labels):
        raise ValueError(
            f"mixjax.data.{fn}: batch_size={batch_size} exceeds the {len(dataset.labels)} "
            f"examples of {dataset.name!r}; with drop_remainder=True no batch would be produced"
        )


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    epochs: int | None = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterates over ``dataset`` in batches, epoch after epoch.

    Epoch ``e`` visits every example once, in the order ``default_rng([seed, e]).permutation(N)``
    (or in stored order when ``shuffle=False``): the same order for the same ``seed`` on every
    run, a fresh order each epoch. Arguments are checked when ``batches`` is called.

    Args:
        dataset: from :func:`load`.
        batch_size: examples per batch, >= 1.
        seed: int >= 0 for the shuffling.
        shuffle: shuffle each epoch.
        drop_remainder: drop each epoch's last ``N % batch_size`` examples, so every batch has
            the same shape (a smaller last batch would make a jitted step compile again).
        epochs: number of passes, >= 1; ``None`` repeats forever.

    Yields:
        ``{"image": (B, H, W, C) images.dtype, "label": (B,) int32}`` NumPy arrays.

    Raises:
        ValueError: bad ``batch_size``, ``seed`` or ``epochs``; ``batch_size`` larger than the
            dataset with ``drop_remainder=True``.
        TypeError: ``dataset`` is not a :class:`Dataset`.
    """
    _check_batching("batches", dataset, batch_size, seed, epochs, drop_remainder)
    return _batch_stream(dataset, batch_size, seed, shuffle, drop_remainder, epochs)


def _batch_stream(dataset, batch_size, seed, shuffle, drop_remainder, epochs):
    n = len(dataset.labels)
    stop = n - n % batch_size if drop_remainder else n
    for epoch in itertools.count() if epochs is None else range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield {"image": dataset.images[index], "label": dataset.labels[index]}


def stacked_batches(
    dataset: Dataset,
    batch_size: int,
    steps: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    epochs: int | None = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """``steps`` consecutive batches of :func:`batches` stacked on a new leading axis.

    For running ``steps`` training steps per dispatch with ``lax.scan``. The groups take the
    batches of ``batches(dataset, batch_size, seed=seed, shuffle=shuffle, epochs=epochs)`` (with
    ``drop_remainder=True``) in order, so a group may span an epoch boundary; a last incomplete
    group is dropped.

    Yields:
        ``{"image": (steps, B, H, W, C), "label": (steps, B) int32}`` NumPy arrays.

    Raises:
        ValueError: as :func:`batches`; ``steps < 1``; fewer than ``steps`` batches in all epochs.
        TypeError: ``dataset`` is not a :class:`Dataset`.
    """
    _check_batching("stacked_batches", dataset, batch_size, seed, epochs, True)
    _checks.integer("mixjax.data.stacked_batches", "steps", steps, 1)
    total = None if epochs is None else len(dataset.labels) // batch_size * epochs
    if total is not None and total < steps:
        raise ValueError(
            f"mixjax.data.stacked_batches: steps={steps} exceeds the {total} batches of "
            f"batch_size={batch_size} in {epochs} epoch(s) of {dataset.name!r}"
        )
    return _stack(_batch_stream(dataset, batch_size, seed, shuffle, True, epochs), steps)


def _stack(stream, steps):
    while len(group := list(itertools.islice(stream, steps))) == steps:
        yield {key: np.stack([batch[key] for batch in group]) for key in group[0]}
