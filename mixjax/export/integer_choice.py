"""Choosing, by timing the model, which sites run int8 x int8 -> int32.

:func:`mixjax.export.integer_model` with ``kernels="measure"`` hands its int8-capable sites to
:func:`measure`. Whether int8 beats the site's float op depends on the backend, the shapes and
what XLA fuses around the op (on XLA:CPU most int8 convolutions lose to float ones, some int8
matmuls and small convolutions win), and a site timed alone mispredicts how it runs inside the
model, so the whole jitted model is timed (:func:`time_models`): from every capable site
dequantized, each group of sites with the same shapes and dimension numbers is switched to
int8 in turn and kept so where the model gets faster. Both ways equal the fake-quant forward
up to float32 rounding; the choice changes how the model runs, never the artifact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax.export.integer import INT8, IntModel, IntSite
from mixjax.export.integer_run import integer_apply

__all__ = ["measure", "time_models"]


def _random_like(x: Any, key: jax.Array) -> jax.Array:
    shape, dtype = jnp.shape(x), jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.floating):
        return jax.random.normal(key, shape, dtype)
    return jnp.zeros(shape, dtype)  # indices: row 0 is always in range


def time_models(
    fn: Callable[..., Any], params: Any, args: tuple, int_models: list[IntModel], rounds: int
) -> list[float]:
    """Median seconds of :func:`mixjax.export.integer_apply` (jitted) per model of
    ``int_models``, on random inputs shaped like ``args`` (normal floats, zero integers).

    Each model is warmed up, then timed ``rounds`` times, the models interleaved in alternating
    order so that a noisy machine slows all alike.

    Args:
      fn: the model, as given to :func:`mixjax.export.integer_model`.
      params: its float parameters.
      args: example inputs (arrays or ``jax.ShapeDtypeStruct``; only shapes and dtypes used).
      int_models: the candidates (their tables differ; each compiles once).
      rounds: timed calls per candidate.

    Returns:
      One median per candidate, in order.
    """
    leaves, treedef = jax.tree.flatten(args)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    inputs = jax.tree.unflatten(
        treedef, [_random_like(x, k) for x, k in zip(leaves, keys, strict=True)]
    )
    run = jax.jit(lambda m, p, a: integer_apply(m, fn, p, *a))
    for m in int_models:
        jax.block_until_ready(run(m, params, inputs))
    times: list[list[float]] = [[] for _ in int_models]
    order = list(range(len(int_models)))
    for r in range(rounds):
        for i in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(run(int_models[i], params, inputs))
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def measure(
    fn: Callable[..., Any],
    params: Any,
    args: tuple,
    int_model: IntModel,
    capable: list[tuple[int, Any, str]],
    rounds: int,
) -> IntModel:
    """``int_model`` with each group of int8-capable sites on the way that makes the whole
    model faster (module docstring).

    Args:
      fn: the model.
      params: its float parameters.
      args: example inputs (their shapes are timed).
      int_model: the prepared model, its capable rows on int8 (with their int8 factors).
      capable: ``(row index, group key, dequantized way)`` per capable row; rows of one key
        switch together.
      rounds: timed calls per comparison.

    Returns:
      The model with each capable row's way chosen and its reason (both times) in ``why``;
      rows left dequantized lose their int8 factors.
    """
    groups: dict[Any, list[tuple[int, str]]] = {}
    for i, key, dequantized in capable:
        groups.setdefault(key, []).append((i, dequantized))
    notes: dict[Any, str] = {}

    def with_int8(chosen, reasons=False):  # reasons at the end: another table recompiles
        rows = list(int_model.table)
        for key, members in groups.items():
            for i, dequantized in members:
                way = INT8 if key in chosen else dequantized
                rows[i] = rows[i]._replace(way=way, why=notes[key] if reasons else "")
        return int_model._replace(table=tuple(rows))

    chosen: set = set()
    for key in groups:
        candidates = [with_int8(chosen), with_int8({*chosen, key})]
        without, with_ = time_models(fn, params, args, candidates, rounds)
        if with_ < without:
            chosen.add(key)
        notes[key] = (
            f"measured: model {1e3 * with_:.3f} ms with int8 here, {1e3 * without:.3f} ms without"
        )
    measured = with_int8(chosen, reasons=True)
    rows = measured.table
    plain = {
        rows[i].site: IntSite(int_model.sites[rows[i].site].inputs, None, None)
        for members in groups.values()
        for i, _ in members
        if rows[i].way != INT8
    }
    return measured._replace(sites={**int_model.sites, **plain})
