"""The stale-gradient machinery every delayed optimizer shares: FIFOs, staleness, one stale step.

A leaf whose gradient is applied up to ``tau`` steps late keeps a ring buffer (FIFO) of its last
``L = tau + 1`` gradients (and, when compensating, of the parameters they were computed at), of
fixed shape ``(L, *param.shape)``. Step ``t`` first writes into slot ``t % L``
(:func:`fifo_push`), then reads the value of step ``t - tau`` from slot ``(t - tau) % L``
(:func:`fifo_read`). The extra slot buys an in-place update: reading a slot *before* overwriting
it (a buffer of ``tau``) makes XLA copy the whole buffer twice per step (seen in the compiled HLO
on CPU), while a read after the write depends on it, so the write aliases. A leaf with
``tau = 0`` has an empty ``(0, *param.shape)`` buffer and passes its gradient through.

:func:`stale_step` is one step of it for a tree of leaves (push, read, warm-up, DC-ASGD
compensation), :func:`sample_staleness` the random staleness of a step, and
:func:`update_once_started` runs the inner optimizer only once gradients exist; both
:func:`mixjax.delay.delayed` and :func:`mixjax.delay.replica_delayed` are built from them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mixjax import _checks
from mixjax.delay.compensation import Compensation, dc_compensate

__all__ = [
    "Buffers",
    "check_params",
    "check_tau",
    "fifo_init",
    "fifo_push",
    "fifo_read",
    "sample_staleness",
    "stale_step",
    "update_once_started",
    "where_valid",
]


class Buffers(NamedTuple):
    """The per-leaf buffers of one stale step (trees with the parameters' structure).

    Attributes:
      past_grads: ``(L, *param.shape)`` ring buffers of gradients.
      past_params: like ``past_grads``, the parameters each was computed at; ``None`` without
        compensation.
      mean_square: DC-ASGD-a's ``MS`` per parameter; ``None`` unless ``"dc_adaptive"``.
    """

    past_grads: Any
    past_params: Any
    mean_square: Any


def check_params(fn_name: str, compensation: Compensation, params: Any) -> None:
    """Raises ``ValueError`` when compensating without ``params`` (``w_now`` is needed)."""
    if compensation.mode is not None and params is None:
        raise ValueError(
            f"{fn_name}: update needs params with compensation={compensation.mode!r} "
            "(w_now - w_then is part of the correction)"
        )


def check_tau(fn_name: str, where: str, value: Any) -> int:
    """``value`` as an int staleness ``>= 0``; ``where`` names it in the error
    (``"tau at leaf 'b'"``), which shows the value as ``tau=...``.

    Raises:
      TypeError: not a Python or NumPy int (bools, floats and arrays included).
      ValueError: negative.
    """
    return _checks.integer(fn_name, where, value, 0, shown="tau")


def fifo_init(params: Any, lengths: Any) -> Any:
    """Zero FIFOs: at each leaf an array ``(L, *param.shape)`` in the parameter's dtype.

    Args:
      params: the parameter tree.
      lengths: an int ``L >= 0`` for every leaf, or a tree of ints with ``params``' structure.
    """
    if _checks.is_integer(lengths):
        lengths = jax.tree.map(lambda _: int(lengths), params)
    return jax.tree.map(
        lambda length, p: jnp.zeros((length, *jnp.shape(p)), jnp.result_type(p)), lengths, params
    )


def fifo_push(buffer: jax.Array, value: jax.Array, count: jax.Array) -> jax.Array:
    """``buffer`` with ``value`` in slot ``count % L`` (in place under jit with donation)."""
    if buffer.shape[0] == 0:
        return buffer
    return lax.dynamic_update_index_in_dim(
        buffer, value.astype(buffer.dtype), count % buffer.shape[0], 0
    )


def fifo_read(buffer: jax.Array, fresh: jax.Array, count: jax.Array, tau: Any) -> jax.Array:
    """The value of step ``count - tau``: slot ``(count - tau) % L`` of a pushed ``buffer``.

    ``tau`` (an int or an int32 scalar, ``0 <= tau < L``) may be traced; an empty buffer
    (``L = 0``) returns ``fresh``.
    """
    if buffer.shape[0] == 0:
        return fresh
    return lax.dynamic_index_in_dim(buffer, (count - tau) % buffer.shape[0], 0, keepdims=False)


def sample_staleness(key: jax.Array, tau_max: Any) -> jax.Array:
    """A staleness drawn uniformly from ``{0, ..., tau_max}`` (int32; ``tau_max`` may be traced).

    ``floor(u * (tau_max + 1))`` for ``u ~ Uniform[0, 1)`` from ``key``; the ``min`` guards the
    rounding of ``u * (tau_max + 1)``.
    """
    tau_max = jnp.asarray(tau_max, jnp.int32)
    u = jax.random.uniform(key)
    return jnp.minimum(jnp.floor(u * (tau_max + 1)).astype(jnp.int32), tau_max)


def where_valid(valid: Any, tree: Any, fallback: Any) -> Any:
    """``tree`` where ``valid`` (a tree of bool scalars, ``None`` = always), else ``fallback``."""
    return jax.tree.map(
        lambda v, x, f: x if v is None else jnp.where(v, x, f),
        valid,
        tree,
        fallback,
        is_leaf=lambda v: v is None,
    )


def stale_step(
    buffers: Buffers,
    grads: Any,
    params: Any,
    count: jax.Array,
    taus: Any,
    valid: Any,
    compensation: Compensation,
) -> tuple[Any, Buffers]:
    """One step of delayed gradients: push this step's, read (and compensate) the stale ones.

    Args:
      buffers: the FIFOs (and DC-ASGD-a's ``MS``) before the step.
      grads: this step's gradients.
      params: the parameters they were computed at (``w_now``); used with compensation only.
      count: the step ``t`` (int32 scalar).
      taus: a tree like ``grads`` of each leaf's staleness this step (ints or int32 scalars).
      valid: a tree like ``grads`` of bool scalars, whether the stale gradient exists
        (``t >= tau``), or ``None`` where it always does; invalid leaves get zero gradients and
        keep their ``MS``.
      compensation: the DC-ASGD options (mode ``None``: no compensation).

    Returns:
      ``(stale, buffers)``: the (compensated) stale gradients and the buffers after the step.
    """
    past_grads = jax.tree.map(lambda b, g: fifo_push(b, g, count), buffers.past_grads, grads)
    stale = jax.tree.map(lambda b, g, t: fifo_read(b, g, count, t), past_grads, grads, taus)
    stale = where_valid(valid, stale, jax.tree.map(jnp.zeros_like, stale))
    if compensation.mode is None:
        return stale, buffers._replace(past_grads=past_grads)
    past_params = jax.tree.map(lambda b, w: fifo_push(b, w, count), buffers.past_params, params)
    w_then = jax.tree.map(lambda b, w, t: fifo_read(b, w, count, t), past_params, params, taus)
    stale, mean_square = dc_compensate(stale, params, w_then, buffers.mean_square, compensation)
    if compensation.mode == "dc_adaptive":
        mean_square = where_valid(valid, mean_square, buffers.mean_square)
    return stale, Buffers(past_grads, past_params, mean_square)


def update_once_started(
    inner: optax.GradientTransformationExtraArgs,
    grads: Any,
    inner_state: optax.OptState,
    params: Any,
    started: jax.Array,
    **extra: Any,
) -> tuple[Any, optax.OptState]:
    """``inner.update(grads, inner_state, params, **extra)`` once ``started``, before: nothing.

    Before ``started`` (a bool scalar) the updates are zeros and ``inner_state`` is returned
    unchanged. A ``lax.cond`` rather than a select of the new and the old state: the select
    reads the old moments in the fusion that writes the new ones, so XLA copies the donated
    optimizer state at every step (3 extra copies of a 784x300 kernel per step, measured).
    """
    run = lambda: inner.update(grads, inner_state, params, **extra)
    updates = jax.eval_shape(run)[0]
    wait = lambda: (jax.tree.map(lambda u: jnp.zeros(u.shape, u.dtype), updates), inner_state)
    return lax.cond(started, run, wait)
