"""Delayed-gradient (asynchronous) updates as an optax wrapper, with DC-ASGD delay compensation.

:func:`delayed` wraps any optax transformation so that the update applied at step ``t`` uses the
gradient computed at step ``t - tau``: what a parameter server sees when ``tau`` other workers
push their gradients between a worker's read of the parameters and its write. It simulates
asynchronous SGD (and pipeline-parallel weight staleness) inside one jitted, deterministic step.

Staleness model. Step ``t`` (``t = 0, 1, ...`` counts calls of ``update``) receives the gradient
``g_t`` computed at the parameters ``w_t`` that ``update`` is given. A leaf of maximum staleness
``tau_max > 0`` keeps a FIFO ring buffer of its last ``tau_max + 1`` gradients (and, when
compensating, parameter values) in the optimizer state, of fixed shape
``(tau_max + 1, *param.shape)``: step ``t`` first writes ``g_t`` into slot ``t % (tau_max + 1)``
(``lax.dynamic_update_index_in_dim``), then reads ``g_{t - tau_t}`` from slot
``(t - tau_t) % (tau_max + 1)``. The extra slot buys an in-place update: reading a slot *before*
overwriting it (a buffer of ``tau_max``) makes XLA copy the whole buffer twice per step (seen in
the compiled HLO on CPU), while a read after the write depends on it, so the write aliases. A
leaf with ``tau_max = 0`` has an empty ``(0, *param.shape)`` buffer and passes its gradient
through.

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

DC-ASGD (Zheng et al., 2017). The stale gradient is corrected by a first-order Taylor term with
the diagonal outer-product approximation of the Hessian,
``g_comp = g + lam_t * g * g * (w_now - w_then)`` (elementwise), where ``g = g_{t - tau_t}``,
``w_then = w_{t - tau_t}`` and ``w_now = w_t``. ``compensation="dc"`` uses ``lam_t = lam``;
``"dc_adaptive"`` (the paper's DC-ASGD-a) uses ``lam_t = lam / sqrt(MS_t + eps)`` with the
elementwise ``MS_t = ms_decay * MS_{t-1} + (1 - ms_decay) * g**2`` of the received gradients.
``g_comp`` is what the inner optimizer receives. The default ``lam`` depends on the mode
(:data:`DEFAULT_LAM`): ``0.04`` for ``"dc"`` (the paper's constant) and ``lam_0 = 2.0`` for
``"dc_adaptive"``, whose ``1 / sqrt(MS_t)`` normalization makes the term
``~ lam_0 * |g| * g * (w_now - w_then)``: a correction relative to ``g`` of only
``lam_0 * |g| * |w_now - w_then|``. ``benchmarks/async.py`` (digits, SGD, 3 seeds) sweeps
``lam_0``: ``0.04`` and ``0.5`` change nothing measurable; at ``tau = 16`` ``2`` lifts test
accuracy from 0.56 to 0.67 and ``8`` to 0.72, while at ``tau = 4`` ``2`` is the best (0.932 vs
SGD's 0.931) and ``8`` already costs accuracy (0.927), so ``2`` is the default.

The FIFO (:func:`fifo_init`, :func:`fifo_push`, :func:`fifo_read`) and the correction
(:func:`dc_compensate`) are also what :mod:`mixjax.replicas` runs per data-parallel replica.

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
import numpy as np
import optax
from jax import lax

from mixjax import select

_NAME = "mixjax.delay.delayed"
_COMPENSATIONS = (None, "dc", "dc_adaptive")
#: The default compensation strength of each mode (``lam=None``): DC-ASGD's constant ``0.04``
#: and DC-ASGD-a's ``lam_0 = 2.0`` (see the module docstring and ``benchmarks/async.py``).
DEFAULT_LAM = {"dc": 0.04, "dc_adaptive": 2.0}

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


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_tau_value(value: Any, where: str, fn_name: str = _NAME) -> int:
    """``value`` as an int staleness ``>= 0``; ``where`` names it in the error (``"tau"``).

    Raises:
      TypeError: not a Python or NumPy int (bools, floats and arrays included).
      ValueError: negative.
    """
    if not _is_int(value):
        raise TypeError(
            f"{fn_name}: {where} must be an integer >= 0 (a Python or NumPy int, not a bool, float "
            f"or array), got tau={value!r} ({type(value).__name__})"
        )
    if value < 0:
        raise ValueError(f"{fn_name}: {where} must be an integer >= 0, got tau={value!r}")
    return int(value)


def _check_tau(tau: Tau) -> None:
    """Validates an int or tree ``tau`` before the params are known (callables: at ``init``)."""
    if callable(tau):
        return
    flat = select.leaves_with_paths(tau)
    if not flat or (len(flat) == 1 and flat[0][0] == ""):
        check_tau_value(tau, "tau")
    for path, value in flat:
        check_tau_value(value, f"tau at leaf {path!r}")


def _resolve_tau(tau: Tau, params: Any) -> Any:
    """The tree of per-leaf staleness (Python ints) with the structure of ``params``."""
    if _is_int(tau):
        return jax.tree.map(lambda _: int(tau), params)
    if callable(tau):

        def call(keypath, leaf):
            path = select.path_str(keypath)
            where = f"tau(path, leaf) at {select.describe(path, leaf)}"
            return check_tau_value(tau(path, leaf), where)

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


def check_options(
    compensation, lam, ms_decay, eps, random_staleness, key, fn_name: str = _NAME
) -> float:
    """Validates the compensation and staleness options; returns ``lam`` (its mode's default).

    Raises:
      TypeError / ValueError: as :func:`delayed` documents, naming ``fn_name``.
    """
    if compensation not in _COMPENSATIONS:
        raise ValueError(
            f"{fn_name}: compensation must be one of {_COMPENSATIONS}, got "
            f"compensation={compensation!r}"
        )
    if lam is None:
        lam = DEFAULT_LAM.get(compensation, 0.0)
    for arg, value in (("lam", lam), ("ms_decay", ms_decay), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{fn_name}: {arg} must be a float, got {arg}={value!r}")
    if not lam >= 0:
        raise ValueError(f"{fn_name}: lam must be >= 0, got lam={lam!r}")
    if not 0 <= ms_decay < 1:
        raise ValueError(f"{fn_name}: ms_decay must be in [0, 1), got ms_decay={ms_decay!r}")
    if not eps > 0:
        raise ValueError(f"{fn_name}: eps must be > 0, got eps={eps!r}")
    if not isinstance(random_staleness, bool):
        raise TypeError(
            f"{fn_name}: random_staleness must be a bool, got random_staleness={random_staleness!r}"
        )
    if random_staleness and key is None:
        raise ValueError(f"{fn_name}: random_staleness=True needs a key=jax.random.key(...)")
    if not random_staleness and key is not None:
        raise ValueError(
            f"{fn_name}: key= is only used with random_staleness=True, got key={key!r}"
        )
    if key is not None:
        typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        raw = isinstance(key, (jax.Array, np.ndarray)) and key.dtype == np.uint32 and key.ndim == 1
        if not ((typed and key.ndim == 0) or raw):
            raise TypeError(
                f"{fn_name}: key must be a jax.random.key(...) scalar or a raw uint32 key array, "
                f"got key={key!r}"
            )
    return float(lam)


def fifo_init(params: Any, lengths: Any) -> Any:
    """Zero FIFOs: at each leaf an array ``(L, *param.shape)`` in the parameter's dtype.

    Args:
      params: the parameter tree.
      lengths: an int ``L >= 0`` for every leaf, or a tree of ints with ``params``' structure.
    """
    if _is_int(lengths):
        lengths = jax.tree.map(lambda _: int(lengths), params)
    return jax.tree.map(
        lambda length, p: jnp.zeros((length, *jnp.shape(p)), jnp.result_type(p)), lengths, params
    )


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


def mean_square_init(params: Any) -> Any:
    """Zero ``MS`` accumulators of DC-ASGD-a: each parameter's shape, at least float32."""
    return jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)),
        params,
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


def dc_compensate(
    stale: Any,
    w_now: Any,
    w_then: Any,
    mean_square: Any,
    *,
    compensation: str,
    lam: float,
    ms_decay: float,
    eps: float,
) -> tuple[Any, Any]:
    """DC-ASGD's correction ``g + lam_t * g * g * (w_now - w_then)`` of each stale gradient.

    Args:
      stale: the stale gradients ``g``, a tree like the params.
      w_now: the current parameters.
      w_then: the parameters ``g`` was computed at.
      mean_square: ``MS_{t-1}`` (a tree of float32+ arrays) for ``"dc_adaptive"``, else ignored.
      compensation: ``"dc"`` (``lam_t = lam``) or ``"dc_adaptive"``
        (``lam_t = lam / sqrt(MS_t + eps)``, ``MS_t = m * MS_{t-1} + (1 - m) * g**2``).
      lam: the strength ``lam`` (``lam_0``).
      ms_decay: ``m``.
      eps: added under the square root.

    Returns:
      ``(g_comp, MS_t)``: the corrected gradients in ``g``'s dtypes (computed in at least
      float32) and the new mean square (``mean_square`` unchanged under ``"dc"``).
    """
    if compensation == "dc":
        strengths = jax.tree.map(lambda g: lam, stale)
    else:
        mean_square = jax.tree.map(
            lambda ms, g: ms_decay * ms + (1.0 - ms_decay) * jnp.square(g.astype(ms.dtype)),
            mean_square,
            stale,
        )
        strengths = jax.tree.map(lambda ms: lam / jnp.sqrt(ms + eps), mean_square)

    def correct(g, now, then, strength):
        dtype = jnp.promote_types(g.dtype, jnp.float32)
        g32, delta = g.astype(dtype), now.astype(dtype) - then.astype(dtype)
        return (g32 + strength * g32 * g32 * delta).astype(g.dtype)

    return jax.tree.map(correct, stale, w_now, w_then, strengths), mean_square


def delayed(
    tx: optax.GradientTransformation,
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
      tx: the inner optax transformation, fed the stale (and compensated) gradients; its state
        is ``state.inner_state``.
      tau: the staleness in steps (the maximum staleness with ``random_staleness``): an int
        ``>= 0`` for every leaf; a callable ``(path, leaf) -> int`` of the leaf's path string
        (``"Dense_0/kernel"``, as in :mod:`mixjax.select`) for pipeline stages, e.g.
        ``lambda path, leaf: 2 if path.startswith("Dense_0") else 0``; or a tree of ints with
        the structure of the params (``jax.tree.map(lambda _: 2, params)``).
      compensation: ``None``, ``"dc"`` (DC-ASGD, constant ``lam``) or ``"dc_adaptive"``
        (DC-ASGD-a, ``lam_t = lam / sqrt(MS_t + eps)``). Compensation stores a copy of the
        parameters per buffered step and needs ``params`` in ``update``.
      lam: the compensation strength ``lam`` (``lam_0`` for ``"dc_adaptive"``), ``>= 0``;
        ``None`` takes the mode's default, :data:`DEFAULT_LAM`: ``0.04`` for ``"dc"`` and
        ``2.0`` for ``"dc_adaptive"`` (whose term scales like ``lam * |g| * g * (w_now -
        w_then)``, so it needs a larger value than ``"dc"``).
      ms_decay: the moving-average decay ``m`` of ``MS_t``, in ``[0, 1)``.
      eps: added to ``MS_t`` under the square root, ``> 0``.
      random_staleness: draw the staleness of each step uniformly in ``[0, tau]``.
      key: the ``jax.random`` key of the staleness draws (required with, and only with,
        ``random_staleness``); step ``t`` uses ``jax.random.fold_in(key, t)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``init(params)`` returns a
      :class:`DelayState` and whose ``update(grads, state, params=None, **extra)`` forwards
      ``extra`` to ``tx``.

    Raises:
      TypeError: ``tau`` (or a leaf of it) is not an integer (bools and floats included),
        ``tx`` is not an optax transformation, or an option has the wrong type.
      ValueError: ``tau < 0``, unknown ``compensation``, ``lam < 0``, ``ms_decay`` outside
        ``[0, 1)``, ``eps <= 0``, ``random_staleness`` without ``key`` (or ``key`` without it);
        at ``init``, a tau tree that does not match the params; at ``update``, no ``params``
        with compensation or a gradient tree that does not match the state.
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(
            f"{_NAME}: tx must be an optax GradientTransformation, got {type(tx).__name__}"
        )
    _check_tau(tau)
    lam = check_options(compensation, lam, ms_decay, eps, random_staleness, key)
    inner = optax.with_extra_args_support(tx)
    ms_decay, eps = float(ms_decay), float(eps)

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
        if compensation is not None and params is None:
            raise ValueError(
                f"{_NAME}: update needs params with compensation={compensation!r} "
                "(w_now - w_then is part of the correction)"
            )
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
        if random_staleness:
            u = jax.random.uniform(jax.random.fold_in(key, count))

            def staleness(length):
                # Buffers hold tau_max + 1 slots; min() guards the rounding of u * length.
                tau_max = length - 1
                return (
                    jnp.minimum(jnp.floor(u * length).astype(jnp.int32), tau_max) if length else 0
                )

        else:
            staleness = lambda length: max(length - 1, 0)
        taus = jax.tree.map(staleness, lengths)
        # `None` marks leaves that always have a gradient (tau = 0).
        valid = jax.tree.map(lambda t: None if isinstance(t, int) and t == 0 else count >= t, taus)

        def select_valid(tree, fallback):
            return jax.tree.map(
                lambda v, x, f: x if v is None else jnp.where(v, x, f),
                valid,
                tree,
                fallback,
                is_leaf=lambda v: v is None,
            )

        past_grads = jax.tree.map(lambda b, g: fifo_push(b, g, count), state.past_grads, updates)
        stale = jax.tree.map(lambda b, g, t: fifo_read(b, g, count, t), past_grads, updates, taus)
        stale = select_valid(stale, jax.tree.map(jnp.zeros_like, stale))
        mean_square = state.mean_square
        past_params = None
        if compensation is not None:
            past_params = jax.tree.map(
                lambda b, w: fifo_push(b, w, count), state.past_params, params
            )
            w_then = jax.tree.map(
                lambda b, w, t: fifo_read(b, w, count, t), past_params, params, taus
            )
            stale, new_ms = dc_compensate(
                stale,
                params,
                w_then,
                mean_square,
                compensation=compensation,
                lam=lam,
                ms_decay=ms_decay,
                eps=eps,
            )
            if compensation == "dc_adaptive":
                mean_square = select_valid(new_ms, mean_square)
        if shortest > 0:
            # Staleness grows with the buffer length, so the leaves of the shortest buffer have a
            # gradient exactly when any leaf does.
            new_updates, inner_state = update_once_started(
                inner, stale, state.inner_state, params, count >= staleness(shortest), **extra
            )
        else:
            new_updates, inner_state = inner.update(stale, state.inner_state, params, **extra)
        new_updates = select_valid(new_updates, jax.tree.map(jnp.zeros_like, new_updates))
        new_state = DelayState(
            count=count + 1,
            past_grads=past_grads,
            past_params=past_params,
            mean_square=mean_square,
            inner_state=inner_state,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
