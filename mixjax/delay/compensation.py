"""DC-ASGD delay compensation (Zheng et al., 2017): a first-order correction of stale gradients.

A gradient ``g`` computed at ``w_then`` and applied at ``w_now`` is corrected by the Taylor term
with the diagonal outer-product approximation of the Hessian,
``g_comp = g + lam_t * g * g * (w_now - w_then)`` (elementwise): :func:`dc_compensate`.
``"dc"`` uses a constant ``lam_t = lam``; ``"dc_adaptive"`` (the paper's DC-ASGD-a) uses
``lam_t = lam / sqrt(MS_t + eps)`` with the moving average ``MS_t`` of squared received
gradients. :func:`check_options` validates the options every delayed optimizer takes and returns
them as :class:`Compensation`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mixjax import _checks

__all__ = [
    "COMPENSATIONS",
    "DEFAULT_LAM",
    "Compensation",
    "check_options",
    "dc_compensate",
    "mean_square_init",
]

COMPENSATIONS = (None, "dc", "dc_adaptive")
#: The default compensation strength of each mode (``lam=None``): DC-ASGD's constant ``0.04``
#: and DC-ASGD-a's ``lam_0 = 2.0`` (see :mod:`mixjax.delay.delayed_updates` and
#: ``benchmarks/async.py``).
DEFAULT_LAM = {"dc": 0.04, "dc_adaptive": 2.0}


class Compensation(NamedTuple):
    """Validated compensation options.

    Attributes:
      mode: ``None``, ``"dc"`` or ``"dc_adaptive"``.
      lam: the strength ``lam`` (``lam_0`` for ``"dc_adaptive"``), ``>= 0``.
      ms_decay: the decay ``m`` of ``MS_t = m * MS_{t-1} + (1 - m) * g**2``, in ``[0, 1)``.
      eps: added to ``MS_t`` under the square root, ``> 0``.
    """

    mode: str | None
    lam: float
    ms_decay: float
    eps: float


def check_options(
    fn_name: str,
    compensation: Any,
    lam: Any,
    ms_decay: Any,
    eps: Any,
    random_staleness: Any,
    key: Any,
) -> Compensation:
    """Validates the compensation and staleness options of a delayed optimizer.

    Args:
      fn_name: the public function, for the messages.
      compensation: ``None``, ``"dc"`` or ``"dc_adaptive"``.
      lam: ``>= 0``, or ``None`` for the mode's :data:`DEFAULT_LAM`.
      ms_decay: in ``[0, 1)``.
      eps: ``> 0``.
      random_staleness: a bool.
      key: a ``jax.random`` key with, and only with, ``random_staleness``.

    Returns:
      The options as a :class:`Compensation`.

    Raises:
      TypeError / ValueError: a bad value, named.
    """
    _checks.choice(fn_name, "compensation", compensation, COMPENSATIONS)
    if lam is None:
        lam = DEFAULT_LAM.get(compensation, 0.0)
    lam = _checks.real(fn_name, "lam", lam, 0.0)
    ms_decay = _checks.real(fn_name, "ms_decay", ms_decay, 0.0, 1.0, high_open=True)
    eps = _checks.real(fn_name, "eps", eps, 0.0, low_open=True)
    _checks.boolean(fn_name, "random_staleness", random_staleness)
    if random_staleness and key is None:
        raise ValueError(f"{fn_name}: random_staleness=True needs a key=jax.random.key(...)")
    if not random_staleness and key is not None:
        raise ValueError(
            f"{fn_name}: key= is only used with random_staleness=True, got key={key!r}"
        )
    if key is not None:
        _checks.key(fn_name, "key", key)
    return Compensation(compensation, lam, ms_decay, eps)


def mean_square_init(params: Any) -> Any:
    """Zero ``MS`` accumulators of DC-ASGD-a: each parameter's shape, at least float32."""
    return jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)),
        params,
    )


def dc_compensate(
    stale: Any, w_now: Any, w_then: Any, mean_square: Any, options: Compensation
) -> tuple[Any, Any]:
    """DC-ASGD's correction ``g + lam_t * g * g * (w_now - w_then)`` of each stale gradient.

    Args:
      stale: the stale gradients ``g``, a tree like the params.
      w_now: the current parameters.
      w_then: the parameters ``g`` was computed at.
      mean_square: ``MS_{t-1}`` (a tree of float32+ arrays) for ``"dc_adaptive"``, else ignored.
      options: the mode (``"dc"``: ``lam_t = lam``; ``"dc_adaptive"``:
        ``lam_t = lam / sqrt(MS_t + eps)``, ``MS_t = m * MS_{t-1} + (1 - m) * g**2``) and its
        constants.

    Returns:
      ``(g_comp, MS_t)``: the corrected gradients in ``g``'s dtypes (computed in at least
      float32) and the new mean square (``mean_square`` unchanged under ``"dc"``).
    """
    if options.mode == "dc":
        strengths = jax.tree.map(lambda g: options.lam, stale)
    else:
        m = options.ms_decay
        mean_square = jax.tree.map(
            lambda ms, g: m * ms + (1.0 - m) * jnp.square(g.astype(ms.dtype)), mean_square, stale
        )
        strengths = jax.tree.map(lambda ms: options.lam / jnp.sqrt(ms + options.eps), mean_square)

    def correct(g, now, then, strength):
        dtype = jnp.promote_types(g.dtype, jnp.float32)
        g32, delta = g.astype(dtype), now.astype(dtype) - then.astype(dtype)
        return (g32 + strength * g32 * g32 * delta).astype(g.dtype)

    return jax.tree.map(correct, stale, w_now, w_then, strengths), mean_square
