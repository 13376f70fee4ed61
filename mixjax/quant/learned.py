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
from mixjax.quant.weights import (
    ScaleBlocks,
    block_reduce,
    check_group_size,
    check_scales,
    selected_weights,
)

__all__ = ["LsqState", "lsq"]


class LsqState(NamedTuple):
    """State of :func:`lsq`.

    Attributes:
      scale: mirror tree (``None`` at unselected leaves): float32 of the leaf's
        :meth:`mixjax.quant.weights.ScaleBlocks.shape` (``(1, ..., 1, C)`` per output channel,
        the leaf's shape with ``n / g`` on the group axis for ``group_size=g``, ``()`` per
        tensor or for leaves clustered per tensor before it in a chain), the learned step
        sizes (a learned field: see :func:`mixjax.learned_state`).
    """

    scale: Any
    LEARNED = ("scale",)


def _initial_scale(x: jax.Array, shape: tuple[int, ...], g: Grid) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(x)
    count = jnp.maximum(block_reduce(finite, shape, jnp.sum), 1)
    mean_abs = block_reduce(jnp.where(finite, jnp.abs(x), 0.0), shape, jnp.sum) / count
    s = 2.0 * mean_abs / np.sqrt(g.qmax)
    return jnp.where(s > 0, jnp.maximum(s, TINY), 1.0)


def lsq(
    bits: int = 8,
    *,
    per_channel: bool = True,
    group_size: int | None = None,
    narrow_range: bool = True,
    ste: str = "clipped",
    where: select.Where = None,
    layouts: Any = None,
) -> ParamTransform:
    """Weight fake-quantization with learned symmetric step sizes (see the module docstring).

    Step sizes go where :func:`mixjax.quant.fake_quant` puts its scales, group-wise ones and
    those coarsened to shared values in a chain after clustering included
    (:mod:`mixjax.quant.weights`).

    Args:
      bits: grid width, 2 to 16.
      per_channel: one step size per output feature (a kernel's last axis, or with ``layouts``
        all its output axes); else per tensor.
      group_size: one step size per ``g`` consecutive entries along the group axis, as
        :func:`mixjax.quant.fake_quant` (needs ``per_channel``).
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
      TypeError / ValueError (here): bad ``bits``, ``ste`` or ``group_size``.
      ValueError (in ``init``): as :func:`mixjax.quant.fake_quant`.
    """
    name = "mixjax.quant.lsq"
    # Concrete bits only: the step-size init and LSQ's gradient scale are host constants of qmax
    # (a traced bit-width sweep is fake_quant's).
    g = grid(_checks.integer(name, "bits", bits, 2, 16), narrow_range=narrow_range, fn_name=name)
    _checks.choice(name, "ste", ste, STE_RULES)
    per_channel = _checks.boolean(name, "per_channel", per_channel)
    group_size = check_group_size(name, group_size, per_channel)

    def build(blocks: ScaleBlocks) -> ParamTransform:
        def init_fn(params):
            found = layout_lib.by_path(name, params, layouts)
            chosen = selected_weights(name, params, where, per_channel, found, group_size)
            scales = select.mirror(
                lambda p, x: _initial_scale(x, blocks.shape(p, x, (found or {}).get(p)), g),
                params,
                chosen,
            )
            return LsqState(scales)

        def apply_fn(params, state):
            _checks.instance(name, "state", state, LsqState, "an LsqState")
            found = layout_lib.by_path(name, params, layouts)
            check_scales(name, params, state.scale, blocks, found)

            def leaf(x, s):
                if s is None:
                    return x
                n = x.size // max(int(np.prod(jnp.shape(s))), 1)  # weights sharing a step size
                return fake_quantize(x, s, 0.0, g, ste=ste, grad_scale=1.0 / np.sqrt(n * g.qmax))

            return jax.tree.map(leaf, params, state.scale)

        return ParamTransform(
            init_fn,
            apply_fn,
            lambda params, state, step, **extra: state,
            due=never,
            adapt=lambda shared: build(blocks._replace(shared=dict(shared))),
        )

    return build(ScaleBlocks(per_channel, group_size))
