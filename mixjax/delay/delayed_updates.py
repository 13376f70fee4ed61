"""Delayed-gradient (asynchronous) updates as an optax wrapper, with DC-ASGD delay compensation.

:func:`delayed` wraps any optax transformation so that the update applied at step ``t`` uses the
gradient computed at step ``t - tau``: what a parameter server sees when ``tau`` other workers
push their gradients between a worker's read of the parameters and its write. It simulates
asynchronous SGD (and pipeline-parallel weight staleness) inside one jitted, deterministic step.

Staleness model. Step ``t`` (``t = 0, 1, ...`` counts calls of ``update``) receives the gradient
``g_t`` computed at the parameters ``w_t`` that ``update`` is given. A leaf of maximum staleness
``tau_max > 0`` keeps a FIFO ring buffer of its last ``tau_max + 1`` gradients (and, when
compensating, parameter values) in the optimizer state (:mod:`mixjax.delay.fifo`); a leaf with
``tau_max = 0`` passes its gradient through.

* Fixed staleness: step ``t`` feeds ``g_{t - tau}`` to the inner optimizer.
* Random staleness (``random_staleness=True``): a pool of workers of uneven speed. At each step
  one draw ``u_t ~ Uniform[0, 1)`` from ``fold_in(key, t)`` sets the staleness of every leaf,
  ``tau_t = floor(u_t * (tau_max + 1))``, uniform on ``{0, ..., tau_max}``, and step ``t`` feeds
  ``g_{t - tau_t}`` (``tau_t = 0`` is the fresh gradient). As in real asynchronous SGD with
  variable delays, a gradient may be applied more than once or never. Leaves with different
  ``tau_max`` share ``u_t``, so their staleness is co-monotone (one slow worker is slow for every
  stage).
* Warm-up: a leaf whose selected gradient predates step 0 (``t - tau_t < 0``) gets no update.
  While no leaf has a gradient, the inner optimizer's result is discarded: updates are zero
  and its state is untouched. With per-leaf ``tau`` the inner optimizer runs once any leaf has a
  gradient; leaves still warming up are fed zero gradients and get zero updates (exact for SGD
  and momentum, whose per-leaf state stays zero; a shared step count such as Adam's bias
  correction does advance). For exactly independent stages use one ``delayed`` per stage under
  ``optax.partition``.
* ``tau = 0`` calls the inner optimizer directly: bit-identical to the unwrapped ``tx``.

DC-ASGD (Zheng et al., 2017; :mod:`mixjax.delay.compensation`). The stale gradient is corrected
by a first-order Taylor term with the diagonal outer-product approximation of the Hessian,
``g_comp = g + lam_t * g * g * (w_now - w_then)`` (elementwise), where ``g = g_{t - tau_t}``,
``w_then = w_{t - tau_t}`` and ``w_now = w_t``. ``compensation="dc"`` uses ``lam_t = lam``;
``"dc_adaptive"`` (the paper's DC-ASGD-a) uses ``lam_t = lam / sqrt(MS_t + eps)`` with the
elementwise ``MS_t = ms_decay * MS_{t-1} + (1 - ms_decay) * g**2`` of the received gradients.
``g_comp`` is what the inner optimizer receives. The default ``lam`` depends on the mode
(:data:`mixjax.delay.compensation.DEFAULT_LAM`): ``0.04`` for ``"dc"`` (the paper's constant)
and ``lam_0 = 2.0`` for ``"dc_adaptive"``, whose ``1 / sqrt(MS_t)`` normalization makes the term
``~ lam_0 * |g| * g * (w_now - w_then)``: a correction relative to ``g`` of only
``lam_0 * |g| * |w_now - w_then|``. ``benchmarks/async.py`` (digits, SGD, 3 seeds) sweeps
``lam_0``: ``0.04`` and ``0.5`` change nothing measurable; at ``tau = 16`` ``2`` lifts test
accuracy from 0.56 to 0.67 and ``8`` to 0.72, while at ``tau = 4`` ``2`` is the best (0.932 vs
SGD's 0.931) and ``8`` already costs accuracy (0.927), so ``2`` is the default.

The same stale step (:func:`mixjax.delay.fifo.stale_step`) is what
:func:`mixjax.delay.replica_delayed` runs per data-parallel replica.

Sharding. Every per-parameter buffer is one leaf of shape ``(L, *param.shape)`` in the
parameter's dtype, in a tree with the parameter tree's structure (``jax.tree.map`` over
``state.past_grads`` and ``params`` pairs them). Shard it like its parameter with an unsharded
leading axis: ``PartitionSpec(None, *param_spec)``; ``mean_square`` has the parameter's shape and
takes ``param_spec`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mixjax import _checks, select
from mixjax.delay.compensation import check_options, mean_square_init
from mixjax.delay.fifo import (
    Buffers,
    check_params,
    check_tau,
    fifo_init,
    sample_staleness,
    stale_step,
    update_once_started,
    where_valid,
)

__all__ = ["DelayState", "Tau", "delayed"]

_NAME = "mixjax.delay.delayed"

Tau = int | Callable[[str, Any], int] | Any


class DelayState(NamedTuple):
    """State of :func:`delayed`.

    Attributes:
      count: int32 scalar, the number of ``update`` calls so far (the step ``t``), which is also
        the write index: a leaf with buffer length ``L > 0`` writes step ``t`` into slot
        ``t % L``.
      past_grads: the parameter tree's structure; at each leaf an array of shape
        ``(L, *param.shape)`` in the parameter's dtype, the ring buffer of the leaf's last ``L``
        gradients (zeros before they exist), with ``L = tau_leaf + 1`` for a leaf of (maximum)
        staleness ``tau_leaf > 0`` and ``L = 0`` (an empty buffer) for ``tau_leaf = 0``.
      past_params: like ``past_grads``, the parameters each of those gradients was computed at
        (``w_then``); ``None`` without compensation.
      mean_square: the parameter tree's structure, arrays of each parameter's shape (dtype:
        the parameter's, promoted to at least float32): the moving average ``MS_t`` of squared
        received gradients for ``compensation="dc_adaptive"``; ``None`` otherwise.
      inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    past_grads: Any
    past_params: Any
    mean_square: Any
    inner_state: optax.OptState


def _check_tau(tau: Tau) -> None:
    """Validates an int or tree ``tau`` before the params are known (callables: at ``init``)."""
    if callable(tau):
        return
    flat = select.leaves_with_paths(tau)
    if not flat or (len(flat) == 1 and flat[0][0] == ""):
        check_tau(_NAME, "tau", tau)
    for path, value in flat:
        check_tau(_NAME, f"tau at leaf {path!r}", value)


def _resolve_tau(tau: Tau, params: Any) -> Any:
    """The tree of per-leaf staleness (Python ints) with the structure of ``params``."""
    if _checks.is_integer(tau):
        return jax.tree.map(lambda _: int(tau), params)
    if callable(tau):

        def call(keypath, leaf):
            path = select.path_str(keypath)
            where = f"tau(path, leaf) at {select.describe(path, leaf)}"
            return check_tau(_NAME, where, tau(path, leaf))

        return jax.tree_util.tree_map_with_path(call, params)
    try:
        return jax.tree.map(lambda _, t: int(t), params, tau)
    except (ValueError, TypeError) as err:
        param_paths = [p for p, _ in select.leaves_with_paths(params)][:10]
        tau_paths = [p for p, _ in select.leaves_with_paths(tau)][:10]
        raise ValueError(
            f"{_NAME}: the tau tree does not match the params tree; params have leaves "
            f"{param_paths}..., tau has {tau_paths}...: {err}"
        ) from None


def delayed(
    inner: optax.GradientTransformation,
    tau: Tau,
    *,
    compensation: str | None = None,
    lam: float | None = None,
    ms_decay: float = 0.95,
    eps: float = 1e-7,
    random_staleness: bool = False,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``tx`` so that step ``t`` applies the gradient of step ``t - tau`` (see module doc).

    Example (``sgd(1.0)`` makes the updates ``-g``; the FIFO fills during the first 2 steps):

    ```pycon
    >>> import jax.numpy as jnp, optax
    >>> from mixjax.delay import delayed
    >>> tx = delayed(optax.sgd(1.0), 2, compensation="dc")
    >>> params = {"w": jnp.zeros(2)}
    >>> opt_state = tx.init(params)
    >>> for t in range(4):  # the gradient of step t is (t + 1) * ones
    ...     grads = {"w": jnp.full(2, t + 1.0)}
    ...     updates, opt_state = tx.update(grads, opt_state, params)
    ...     print(updates["w"])
    [0. 0.]
    [0. 0.]
    [-1. -1.]
    [-2. -2.]

    ```

    Args:
      inner: the inner optax transformation, fed the stale (and compensated) gradients; its
        state is ``state.inner_state``.
      tau: the staleness in steps (the maximum staleness with ``random_staleness``): an int
        ``>= 0`` for every leaf; a callable ``(path, leaf) -> int`` of the leaf's path string
        (``"Dense_0/kernel"``, as in :mod:`mixjax.select`) for pipeline stages, e.g.
        ``lambda path, leaf: 2 if path.startswith("Dense_0") else 0``; or a tree of ints with
        the structure of the params (``jax.tree.map(lambda _: 2, params)``).
      compensation: ``None``, ``"dc"`` (DC-ASGD, constant ``lam``) or ``"dc_adaptive"``
        (DC-ASGD-a, ``lam_t = lam / sqrt(MS_t + eps)``). Compensation stores a copy of the
        parameters per buffered step and needs ``params`` in ``update``.
      lam: the compensation strength ``lam`` (``lam_0`` for ``"dc_adaptive"``), ``>= 0``;
        ``None`` takes the mode's default, :data:`mixjax.delay.compensation.DEFAULT_LAM`:
        ``0.04`` for ``"dc"`` and ``2.0`` for ``"dc_adaptive"`` (whose term scales like
        ``lam * |g| * g * (w_now - w_then)``, so it needs a larger value than ``"dc"``).
      ms_decay: the moving-average decay ``m`` of ``MS_t``, in ``[0, 1)``.
      eps: added to ``MS_t`` under the square root, ``> 0``.
      random_staleness: draw the staleness of each step uniformly in ``[0, tau]``.
      key: the ``jax.random`` key of the staleness draws (required with, and only with,
        ``random_staleness``); step ``t`` uses ``jax.random.fold_in(key, t)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``init(params)`` returns a
      :class:`DelayState` and whose ``update(grads, state, params=None, **extra)`` forwards
      ``extra`` to ``inner``.

    Raises:
      TypeError: ``tau`` (or a leaf of it) is not an integer (bools and floats included),
        ``inner`` is not an optax transformation, or an option has the wrong type.
      ValueError: ``tau < 0``, unknown ``compensation``, ``lam < 0``, ``ms_decay`` outside
        ``[0, 1)``, ``eps <= 0``, ``random_staleness`` without ``key`` (or ``key`` without it);
        at ``init``, a tau tree that does not match the params; at ``update``, no ``params``
        with compensation or a gradient tree that does not match the state.
    """
    _checks.optax_transform(_NAME, "inner", inner)
    _check_tau(tau)
    options = check_options(_NAME, compensation, lam, ms_decay, eps, random_staleness, key)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        lengths = jax.tree.map(lambda t: t + 1 if t else 0, _resolve_tau(tau, params))
        return DelayState(
            count=jnp.zeros([], jnp.int32),
            past_grads=fifo_init(params, lengths),
            past_params=None if compensation is None else fifo_init(params, lengths),
            mean_square=mean_square_init(params) if compensation == "dc_adaptive" else None,
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra):
        check_params(_NAME, options, params)
        try:
            lengths = jax.tree.map(lambda g, b: b.shape[0], updates, state.past_grads)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{_NAME}: the gradients do not match the state (was it made by init on these "
                f"params?): {err}"
            ) from None
        shortest, longest = min(jax.tree.leaves(lengths)), max(jax.tree.leaves(lengths))
        if longest == 0:
            new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
            return new_updates, state._replace(count=state.count + 1, inner_state=inner_state)
        count = state.count
        step_key = jax.random.fold_in(key, count) if random_staleness else None

        def staleness(length):  # buffers hold tau_max + 1 slots
            if not length:
                return 0
            return sample_staleness(step_key, length - 1) if random_staleness else length - 1

        taus = jax.tree.map(staleness, lengths)
        # `None` marks leaves that always have a gradient (tau = 0).
        valid = jax.tree.map(lambda t: None if isinstance(t, int) and t == 0 else count >= t, taus)
        buffers = Buffers(state.past_grads, state.past_params, state.mean_square)
        stale, buffers = stale_step(buffers, updates, params, count, taus, valid, options)
        if shortest > 0:
            # Staleness grows with the buffer length, so the leaves of the shortest buffer have a
            # gradient exactly when any leaf does.
            started = count >= staleness(shortest)
            new_updates, inner_state = update_once_started(
                inner, stale, state.inner_state, params, started, **extra
            )
        else:
            new_updates, inner_state = inner.update(stale, state.inner_state, params, **extra)
        new_updates = where_valid(valid, new_updates, jax.tree.map(jnp.zeros_like, new_updates))
        return new_updates, DelayState(count + 1, *buffers, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
