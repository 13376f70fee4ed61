"""Range observers for activation quantization: min/max, EMA min/max, percentile.

An :class:`Observer` is a NamedTuple of two pure functions over an :class:`ObserverState` pytree
(three scalars), so observer statistics are updated inside a jitted train step and checkpointed
with everything else:

* ``init() -> ObserverState`` (nothing observed yet: ``count == 0``);
* ``update(state, x) -> ObserverState``: folds one batch ``x`` (any shape) into the range.

Non-finite entries (NaN/Inf) of ``x`` are ignored; a batch with no finite entry leaves the state
unchanged (``count`` does not grow), so one bad batch cannot poison a range.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mixjax import _checks

__all__ = [
    "Observer",
    "ObserverState",
    "ema_observer",
    "minmax_observer",
    "percentile_observer",
]


class ObserverState(NamedTuple):
    """Per-tensor range statistics.

    Attributes:
      min: float32 ``()``, the observed lower end of the range (0 before any batch).
      max: float32 ``()``, the observed upper end (0 before any batch).
      count: int32 ``()``, batches observed; ``0`` means no range yet.
    """

    min: jax.Array
    max: jax.Array
    count: jax.Array


class Observer(NamedTuple):
    """``init() -> ObserverState`` and ``update(state, x) -> ObserverState`` (pure, jit-able)."""

    init: Callable[[], ObserverState]
    update: Callable[[ObserverState, jax.Array], ObserverState]


def _empty() -> ObserverState:
    return ObserverState(
        jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
    )


def _finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    return x, finite


def _fold(state: ObserverState, valid: jax.Array, lo: jax.Array, hi: jax.Array) -> ObserverState:
    return ObserverState(
        jnp.where(valid, lo, state.min),
        jnp.where(valid, hi, state.max),
        state.count + valid.astype(jnp.int32),
    )


def _batch_minmax(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, finite = _finite(x)
    lo = jnp.min(jnp.where(finite, x, jnp.inf))
    hi = jnp.max(jnp.where(finite, x, -jnp.inf))
    return jnp.any(finite), lo, hi


def minmax_observer() -> Observer:
    """The running minimum and maximum over every batch seen (PyTorch ``MinMaxObserver``)."""

    def update(state, x):
        valid, lo, hi = _batch_minmax(x)
        first = state.count == 0
        lo = jnp.where(first, lo, jnp.minimum(state.min, lo))
        hi = jnp.where(first, hi, jnp.maximum(state.max, hi))
        return _fold(state, valid, lo, hi)

    return Observer(_empty, update)


def ema_observer(decay: float = 0.99) -> Observer:
    """Exponential moving averages of each batch's min and max (TFMOT's activation default).

    The first batch sets the range; later ones blend in as ``decay * old + (1 - decay) * new``.

    Raises:
      ValueError: ``decay`` outside ``[0, 1)``.
    """
    decay = _checks.real("mixjax.quant.ema_observer", "decay", decay, 0.0, 1.0, high_open=True)

    def update(state, x):
        valid, lo, hi = _batch_minmax(x)
        first = state.count == 0
        lo = jnp.where(first, lo, decay * state.min + (1.0 - decay) * lo)
        hi = jnp.where(first, hi, decay * state.max + (1.0 - decay) * hi)
        return _fold(state, valid, lo, hi)

    return Observer(_empty, update)


def percentile_observer(q: float = 99.99) -> Observer:
    """The mean over batches of each batch's ``100 - q`` and ``q`` percentiles.

    Clips rare outliers that min/max would stretch the range for. Each batch costs a sort of its
    finite entries, so this is meant for calibration rather than every training step.

    Raises:
      ValueError: ``q`` outside ``(50, 100]``.
    """
    q = _checks.real("mixjax.quant.percentile_observer", "q", q, 50.0, 100.0, low_open=True)

    def update(state, x):
        x, finite = _finite(x)
        values = jnp.where(finite, x, jnp.nan).reshape(-1)
        lo, hi = jnp.nanpercentile(values, jnp.array([100.0 - q, q]))
        valid = jnp.any(finite)
        n = state.count.astype(jnp.float32)
        lo = state.min + (lo - state.min) / (n + 1.0)
        hi = state.max + (hi - state.max) / (n + 1.0)
        return _fold(state, valid, lo, hi)

    return Observer(_empty, update)
