"""Learned step size quantization (LSQ, Esser et al. 2020): weight scales trained by gradient.

:func:`lsq` is :func:`mixjax.quant.fake_quant` with symmetric scales that are *learned*: they
start at ``2 * mean|w| / sqrt(qmax)`` and live in the state (an :class:`LsqState`), whose
``scale`` field is marked learned (``LsqState.LEARNED``), and ``jax.grad`` reaches them through
``apply`` with LSQ's gradient (:mod:`mixjax.quant.grids`) scaled by ``1 / sqrt(N * qmax)``, ``N``
being the number of weights sharing a scale. ``update`` never changes them:

* :func:`mixjax.train.make_train_step` trains them with the step's optimizer, beside the
  parameters (the optimizer state is ``tx.init((params, learned))``);
* in a hand-written loop, :func:`mixjax.learned_state` takes them out of any (e.g. chained)
  state for ``jax.grad`` and the optimizer, and :func:`mixjax.with_learned_state` puts them back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, select
from mixjax import layout as layout_lib
from mixjax.core import ParamTransform, never
from mixjax.quant.grids import STE_RULES, TINY, Grid, fake_quantize, grid
from mixjax.quant.weights import check_scales, reduce_axes, selected_weights

__all__ = ["LsqState", "lsq"]


class LsqState(NamedTuple):
    """State of :func:`lsq`.

    Attributes:
      scale: mirror tree (``None`` at unselected leaves): float32 ``(1, ..., 1, C)`` per output
        channel or ``()`` per tensor, the learned step sizes (a learned field: see
        :func:`mixjax.learned_state`).
    """

    scale: Any
    LEARNED = ("scale",)


def _initial_scale(x: jax.Array, per_channel: bool, g: Grid, layout: Any) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    axes = reduce_axes(x, per_channel, layout)
    count = jnp.maximum(jnp.sum(finite, axis=axes, keepdims=per_channel), 1)
    mean_abs = jnp.sum(jnp.where(finite, jnp.abs(x), 0.0), axis=axes, keepdims=per_channel) / count
    s = 2.0 * mean_abs / np.sqrt(g.qmax)
    return jnp.where(s > 0, jnp.maximum(s, TINY), 1.0)


def lsq(
    bits: int = 8,
    *,
    per_channel: bool = True,
    narrow_range: bool = True,
    ste: str = "clipped",
    where: select.Where = None,
    layouts: Any = None,
) -> ParamTransform:
    """Weight fake-quantization with learned symmetric step sizes (see the module docstring).

    Args:
      bits: grid width, 2 to 16.
      per_channel: one step size per output feature (a kernel's last axis, or with ``layouts``
        all its output axes); else per tensor.
      narrow_range: use ``[-qmax, qmax]`` instead of ``[-qmax - 1, qmax]``.
      ste: ``"clipped"`` or ``"identity"`` straight-through gradient for the weights.
      where: which leaves to quantize (:mod:`mixjax.select`); default as
        :func:`mixjax.quant.fake_quant`.
      layouts: the params' layouts (:func:`mixjax.layout.learn`), as for
        :func:`mixjax.quant.fake_quant`.

    Returns:
      A :class:`mixjax.ParamTransform` whose state is an :class:`LsqState`; its ``update`` is
      the identity (``due`` is :func:`mixjax.never`).

    Raises:
      TypeError / ValueError (here): bad ``bits`` or ``ste``.
      ValueError (in ``init``): as :func:`mixjax.quant.fake_quant`.
    """
    name = "mixjax.quant.lsq"
    g = grid(bits, narrow_range=narrow_range, fn_name=name)
    _checks.choice(name, "ste", ste, STE_RULES)
    per_channel = _checks.boolean(name, "per_channel", per_channel)

    def init_fn(params):
        found = layout_lib.by_path(name, params, layouts)
        chosen = selected_weights(name, params, where, per_channel, found)
        scales = select.mirror(
            lambda p, x: _initial_scale(x, per_channel, g, (found or {}).get(p)), params, chosen
        )
        return LsqState(scales)

    def apply_fn(params, state):
        _checks.instance(name, "state", state, LsqState, "an LsqState")
        check_scales(
            name, params, state.scale, per_channel, layout_lib.by_path(name, params, layouts)
        )

        def leaf(x, s):
            if s is None:
                return x
            n = x.size // max(int(np.prod(jnp.shape(s))), 1)
            return fake_quantize(x, s, 0.0, g, ste=ste, grad_scale=1.0 / np.sqrt(n * g.qmax))

        return jax.tree.map(leaf, params, state.scale)

    return ParamTransform(init_fn, apply_fn, lambda params, state, step, **extra: state, due=never)
