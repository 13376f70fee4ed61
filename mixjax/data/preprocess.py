"""Preprocessing of image batches: :func:`normalize`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["normalize"]


def normalize(images: Any, *, mean: Any = 0.5, std: Any = 0.5) -> Any:
    """Scales pixels to ``[0, 1]``, then standardizes: ``(x - mean) / std``, in float32.

    The defaults map ``[0, 1]`` onto ``[-1, 1]``; MNIST's statistics are ``mean=0.1307,
    std=0.3081``. Works inside ``jax.jit`` (the branch is on the static dtype).

    Args:
        images: ``(..., C)`` pixels: uint8 in ``0..255`` (divided by 255) or floating, taken to
            be in ``[0, 1]`` already. NumPy in, NumPy out; JAX in, JAX out.
        mean: a float, or ``(C,)`` floats per channel (the last axis). Static Python values.
        std: like ``mean``; every entry > 0.

    Returns:
        float32 array of ``images``' shape.

    Raises:
        TypeError: pixels neither uint8 nor floating.
        ValueError: ``mean``/``std`` of rank > 1, or ``std <= 0``.
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.ndim > 1 or std.ndim > 1 or not np.all(std > 0):
        raise ValueError(
            "mixjax.data.normalize: mean and std must be floats or per-channel (C,) sequences "
            f"with std > 0, got mean={mean.tolist()}, std={std.tolist()}"
        )
    dtype = getattr(images, "dtype", None)
    if dtype == np.uint8:
        scale = 255.0
    elif dtype is not None and jnp.issubdtype(dtype, jnp.floating):
        scale = 1.0
    else:
        raise TypeError(
            f"mixjax.data.normalize: images must be a uint8 or floating array, got {dtype}"
        )
    xp = np if isinstance(images, np.ndarray) else jnp
    return (xp.asarray(images, np.float32) / np.float32(scale) - mean) / std
