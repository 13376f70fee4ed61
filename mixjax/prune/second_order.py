"""SparseGPT one-shot pruning of a layer, optionally joint with quantization: :func:`sparsegpt`.

SparseGPT (Frantar & Alistarh 2023) prunes a layer to minimize ``||X W - X W'||^2``: rows of the
matrix view ``W`` ``(K, O)`` (input features; columns: output features) are fixed one at a time,
each pruned entry set to 0 and its error fed back into the rows after it through the inverse
Hessian ``H = X^T X`` (:mod:`mixjax._hessian`: damping, dead inputs, lazy blocks; the row
recursion of GPTQ with ``q`` = the pruned row). The mask is chosen as the rows are reached, from
the scores ``w^2 / U[i, i]^2`` of the *current* (error-updated) weights, ``U`` the upper Cholesky
factor of ``H^-1``:

* unstructured (``sparsity``): at the first row of each lazy block of ``block_size`` rows, per
  output column, the ``round(sparsity * rows)`` lowest scores of the block's rows are pruned
  (exact per column and block; the last block may be shorter). The paper's reference code takes
  one threshold over the whole block of all outputs; per output column, as Wanda compares,
  keeps every output feature at the same sparsity;
* ``NM(n, m)``: at the first row of each group of ``m`` rows, the ``n`` highest scores of each
  column are kept.

With ``spec`` (the paper's joint sparsity + quantization), kept entries are put on the grid in
the same sweep (as :func:`mixjax.quant.gptq_solve` without ``act_order``: group scales from the
current rows of each group at its first row; per output feature, from the whole ``W`` at the
start) and pruned ones are 0, which every grid holds exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mixjax import _checks, _hessian
from mixjax.calibrate import LayerStats, Method, QuantSpec, Solution
from mixjax.prune.scored import check_layer_pattern, check_pattern, pruned_count
from mixjax.prune.selection import lowest_per_column
from mixjax.prune.structures import NM, nm_mask
from mixjax.quant.grids import quantize_dequantize
from mixjax.quant.layerwise import check_spec, group_qparams, on_grid

__all__ = ["sparsegpt", "sparsegpt_solve"]


def sparsegpt_solve(
    w: jax.Array,
    gram: jax.Array,
    *,
    sparsity: float | None,
    nm: NM | tuple[int, int] | None,
    block_size: int,
    damp: float,
    spec: QuantSpec | None,
) -> Solution:
    """SparseGPT on one layer (module docstring), jit-able with the options static.

    Args:
      w: ``(K, O)`` float32 weights (rows: input features).
      gram: ``(K, K)`` float32 ``X^T X``.
      sparsity: the fraction pruned per column and block, in ``[0, 1)``, or ``None`` with ``nm``.
      nm: ``NM(n, m)`` (or ``(n, m)``): keep ``n`` of every ``m`` rows per column; or ``None``.
      block_size: rows per lazy block and per unstructured mask choice, rounded down to a
        multiple of ``m`` and of the group size (or up to their least common multiple):
        :func:`mixjax._hessian.fit_block`.
      damp: ``H += damp * mean(diag(H)) * I`` (``> 0``).
      spec: quantize the kept weights on this grid, or ``None``.

    Returns:
      A :class:`mixjax.calibrate.Solution`: ``mask`` ``(K, O)`` bool, ``weight`` 0 outside it
      (and on the grid of ``scale`` / ``zero_point`` with ``spec``; else no scales).

    Raises:
      ValueError: not exactly one of ``sparsity`` / ``nm``; ``m`` or the group size not
        dividing ``K``; shapes that do not match; bad options.
    """
    name = "mixjax.prune.sparsegpt_solve"
    sparsity, nm = check_layer_pattern(name, w, sparsity, nm)
    k, o = w.shape
    if tuple(gram.shape) != (k, k):
        raise ValueError(
            f"{name}: the gram matrix must be {(k, k)} for a weight of shape {(k, o)}, got "
            f"{tuple(gram.shape)}"
        )
    spec = None if spec is None else check_spec(name, spec, k)
    block_size = _checks.integer(name, "block_size", block_size, 1)
    damp = _checks.real(name, "damp", damp, 0.0, low_open=True)
    g = None if spec is None else spec.group_size
    w, u = _hessian.inverse_factor(w, gram, damp)
    block = _hessian.fit_block(block_size, [s for s in (g, nm and nm.m) if s])
    span = block if nm is None else nm.m  # the rows one mask choice covers
    aux: dict[str, Any] = {"keep": jnp.ones((span, o), bool)}
    events: list[_hessian.Event] = []

    if nm is None:
        blocks = -(-k // block)
        full, last = pruned_count(sparsity, block), pruned_count(sparsity, k - (blocks - 1) * block)

        def choose(r, rows, diag, aux):
            scores = jnp.square(rows) / jnp.square(diag)[:, None]
            padding = (r + jnp.arange(block) >= k)[:, None]  # the last block's padding rows
            count = jnp.where(r == (blocks - 1) * block, last, full)
            pruned = lowest_per_column(jnp.where(padding, jnp.inf, scores), count)
            return {**aux, "keep": ~pruned}

    else:

        def choose(r, rows, diag, aux):
            scores = jnp.square(rows) / jnp.square(diag)[:, None]
            return {**aux, "keep": nm_mask(scores, nm.m, jnp.int32(nm.n))}

    events.append((span, choose))

    if spec is not None and g is not None:
        aux["scales"] = jnp.ones((k // g, o), jnp.float32)
        aux["zeros"] = jnp.zeros((k // g, o), jnp.float32)
        aux["scale"], aux["zero"] = aux["scales"][:1], aux["zeros"][:1]

        def new_group(r, rows, diag, aux):
            s, z = group_qparams(rows, spec, 1)
            scales = aux["scales"].at[r // g].set(s[0])
            zeros = aux["zeros"].at[r // g].set(z[0])
            return {**aux, "scales": scales, "zeros": zeros, "scale": s, "zero": z}

        events.append((g, new_group))
    elif spec is not None:
        aux["scale"], aux["zero"] = group_qparams(w, spec, 1)  # per column, from the whole W

    def finish(r, row, aux):
        keep = aux["keep"][r % span]
        if spec is not None:
            row = quantize_dequantize(row[None], aux["scale"], aux["zero"], spec.grid)[0]
        return jnp.where(keep, row, 0.0), keep

    q, mask, aux = _hessian.sweep(w, u, block=block, events=events, finish=finish, aux=aux)
    if spec is None:
        return Solution(jnp.where(mask, q, 0.0), mask, None, None)
    scale, zero = (aux["scales"], aux["zeros"]) if g is not None else (aux["scale"], aux["zero"])
    return Solution(jnp.where(mask, on_grid(q, scale, zero, spec), 0.0), mask, scale, zero)


def _from_stats(w: jax.Array, stats: LayerStats, **options) -> Solution:
    return sparsegpt_solve(w, stats.gram, **options)


def sparsegpt(
    sparsity: float | NM = 0.5,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    narrow_range: bool = False,
) -> Method:
    """SparseGPT one-shot pruning (with ``bits``, joint with quantization), for
    :func:`mixjax.oneshot.compress` (module docstring).

    Args:
      sparsity: the fraction pruned per output column and block, in ``[0, 1)``, or
        ``NM(n, m)`` (keep ``n`` of every ``m`` input rows).
      block_size: rows per lazy block (and per unstructured mask choice), ``>= 1``.
      damp: relative Hessian damping, ``> 0``.
      bits: quantize the kept weights to ``bits`` (2..8) in the same pass, or ``None``.
      group_size: with ``bits``, one scale per ``group_size`` input rows and output feature
        (must divide each layer's input size), or ``None`` (per output feature).
      symmetric: with ``bits``, zero point 0; else min/max with an integer zero point.
      narrow_range: with ``bits``, the grid ``[-qmax, qmax]``.

    Returns:
      A :class:`mixjax.calibrate.Method` named ``"sparsegpt"`` (``quant`` set with ``bits``).

    Raises:
      TypeError / ValueError: an argument of the wrong type or out of range (named);
        ``group_size`` without ``bits``.

    Example:
      >>> import mixjax
      >>> method = mixjax.prune.sparsegpt(mixjax.prune.NM(2, 4), bits=4)
      >>> method.name, method.prunes, method.quant.bits
      ('sparsegpt', True, 4)
    """
    name = "mixjax.prune.sparsegpt"
    sparsity, nm = check_pattern(name, sparsity)
    block_size = _checks.integer(name, "block_size", block_size, 1)
    damp = _checks.real(name, "damp", damp, 0.0, low_open=True)
    if bits is None:
        if group_size is not None:
            raise ValueError(
                f"{name}: group_size={group_size!r} is a quantization option; it needs bits="
            )
        spec = None
    else:
        spec = check_spec(name, QuantSpec(bits, group_size, symmetric, narrow_range))
    solve = functools.partial(
        _from_stats, sparsity=sparsity, nm=nm, block_size=block_size, damp=damp, spec=spec
    )
    return Method("sparsegpt", solve, spec, prunes=True, uses_inputs=True)
