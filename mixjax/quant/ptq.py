"""Post-training calibration (PTQ): activation ranges from batches, with no training."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

from mixjax import _checks
from mixjax.quant.activations import ActivationQuant
from mixjax.quant.observers import ObserverState

__all__ = ["calibrate"]


def calibrate(
    act: ActivationQuant,
    fn: Callable[..., Any],
    params: Any,
    state: dict[str, ObserverState],
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
) -> dict[str, ObserverState]:
    """Post-training calibration: folds batches into the observers (float forward, no training).

    Args:
      act: the activation quantizer.
      fn: the model, ``fn(params, *args)`` (as for ``act.init``).
      params: its fixed parameters.
      state: the observer state (from ``act.init`` or an earlier calibration).
      batches: iterable of ``fn``'s inputs after ``params``: an array or a tuple of arrays.
      num_batches: stop after this many batches (default: all).

    Returns:
      The updated state. Deterministic: the same batches give the same ranges.

    Raises:
      ValueError: no batch was given, or ``num_batches < 1``.
    """
    name = "mixjax.quant.calibrate"
    _checks.instance(name, "act", act, ActivationQuant, "an ActivationQuant")
    num_batches = _checks.integer(name, "num_batches", num_batches, 1, optional=True)
    step = jax.jit(lambda st, args: act.apply(fn, st, params, *args, mode="calibrate")[1])
    seen = 0
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        state = step(state, batch if isinstance(batch, tuple) else (batch,))
        seen += 1
    if not seen:
        raise ValueError(f"{name}: batches is empty; calibration needs at least one batch")
    return state
