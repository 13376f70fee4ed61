"""Schedules: plain functions ``step -> value`` for sparsity, bit-widths, cluster counts.

Any callable ``step -> value`` is a schedule here, optax schedules included. The factories below
return jit-able functions of an integer step (Python int or traced scalar array) that also accept
arrays of steps elementwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks

__all__ = [
    "ScalarOrSchedule",
    "Schedule",
    "as_schedule",
    "check_schedule",
    "constant",
    "one_shot",
    "polynomial",
]

Schedule = Callable[[Any], Any]
ScalarOrSchedule = float | Schedule


def constant(value: float) -> Schedule:
    """``step -> value`` for every step.

    Raises:
      TypeError / ValueError: ``value`` not a finite number.
    """
    value = _checks.real("mixjax.schedules.constant", "value", value)
    return lambda step: jnp.full(jnp.shape(step), value, dtype=jnp.float32)


def one_shot(step: int, value: float) -> Schedule:
    """``0`` before ``step``, ``value`` from ``step`` on (one-shot pruning at a given step).

    Raises:
      TypeError / ValueError: ``step`` not an integer ``>= 0``, ``value`` not a finite number.
    """
    at = _checks.integer("mixjax.schedules.one_shot", "step", step, 0)
    value = _checks.real("mixjax.schedules.one_shot", "value", value)
    return lambda t: jnp.where(jnp.asarray(t) >= at, value, 0.0).astype(jnp.float32)


def polynomial(
    initial: float,
    final: float,
    begin_step: int,
    end_step: int,
    power: float = 3.0,
    frequency: int = 1,
) -> Schedule:
    """Zhu & Gupta (2017) gradual schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))**power`` for ``t0 <= t <= t0 + n*dt``,
    where ``t0 = begin_step``, ``n * dt = end_step - begin_step`` and ``t`` is rounded down to a
    multiple of ``frequency`` steps after ``t0`` (the value changes only every ``frequency``
    steps). Before ``begin_step`` the value is ``initial``; after ``end_step``, ``final``.

    Raises:
      TypeError / ValueError: ``begin_step`` not an integer ``>= 0``, ``end_step`` not an
        integer ``> begin_step``, ``frequency`` not an integer ``>= 1``, ``power <= 0``.
    """
    name = "mixjax.schedules.polynomial"
    t0 = _checks.integer(name, "begin_step", begin_step, 0)
    end = _checks.integer(name, "end_step", end_step)
    if end <= t0:
        raise ValueError(
            f"{name}: end_step must be an integer > begin_step={t0}, got end_step={end_step!r}"
        )
    freq = _checks.integer(name, "frequency", frequency, 1)
    power = _checks.real(name, "power", power, 0.0, low_open=True)
    initial, final = _checks.real(name, "initial", initial), _checks.real(name, "final", final)
    span = end - t0

    def schedule(step):
        t = jnp.clip(jnp.asarray(step) - t0, 0, span)
        t = (t // freq) * freq
        progress = t.astype(jnp.float32) / span
        return (final + (initial - final) * (1.0 - progress) ** power).astype(jnp.float32)

    return schedule


def as_schedule(value: ScalarOrSchedule) -> Schedule:
    """A float becomes :func:`constant`; a callable is returned as is."""
    if callable(value):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(
            "mixjax.schedules.as_schedule: expected a float or a schedule (step -> value), "
            f"got {value!r}"
        )
    return constant(float(value))


# Steps at which user schedules are probed eagerly: dense early on, where ramps usually start,
# then geometric up to 10 million steps.
_PROBE_STEPS = np.unique(
    np.concatenate([np.arange(0, 2048), np.geomspace(2048, 10_000_000, 256).astype(np.int64)])
)


def check_schedule(
    fn_name: str,
    arg: str,
    value: ScalarOrSchedule,
    low: float,
    high: float,
    *,
    high_inclusive: bool = False,
) -> Schedule:
    """Validates a float or schedule eagerly: every value must lie in ``[low, high)``.

    A scalar ``jax.Array`` counts as a float; a *traced* scalar (e.g. a sparsity under
    ``jax.vmap``, to sweep several levels in one program) cannot be checked and is returned as a
    constant schedule.

    A schedule is evaluated at steps 0..2047 and on a geometric grid up to 10^7 (vectorized where
    it accepts an array of steps), outside any trace, so a bad schedule fails when the transform
    is built rather than silently producing garbage inside ``jit``.

    Returns:
      The value as a schedule.

    Raises:
      ValueError: a value (at the first offending step, for schedules) is outside the range.
      TypeError: ``value`` is neither a number nor a callable.
    """
    interval = f"[{low}, {high}]" if high_inclusive else f"[{low}, {high})"

    def bad(v):
        return not (low <= v <= high if high_inclusive else low <= v < high) or not np.isfinite(v)

    if isinstance(value, jax.core.Tracer) and value.ndim == 0:
        # A traced scalar (a vmapped sweep over sparsities): its values are unknown here, so the
        # rule of the transform's update applies instead (mixjax.prune: clamped to [low, high],
        # non-finite values keep the current state).
        return lambda step: value
    if isinstance(value, jax.Array) and value.ndim == 0:
        value = value.item()
    if not callable(value):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            raise TypeError(
                f"{fn_name}: {arg} must be a float or a schedule (step -> value), got {value!r}"
            )
        if bad(float(value)):
            raise ValueError(f"{fn_name}: {arg} must be in {interval}, got {arg}={value!r}")
        return constant(float(value))
    schedule = value
    try:
        values = np.asarray(schedule(jnp.asarray(_PROBE_STEPS)), dtype=np.float64)
        if values.shape != _PROBE_STEPS.shape:
            raise TypeError("not elementwise")
    except Exception:  # noqa: BLE001 - a schedule with Python control flow: probe step by step
        values = np.asarray([float(schedule(int(s))) for s in _PROBE_STEPS[:2048:8]])
        steps = _PROBE_STEPS[:2048:8]
    else:
        steps = _PROBE_STEPS
    offending = [i for i, v in enumerate(values) if bad(v)]
    if offending:
        i = offending[0]
        raise ValueError(
            f"{fn_name}: {arg} schedule values must be in {interval}, "
            f"got {arg}({int(steps[i])})={float(values[i])}"
        )
    return schedule
