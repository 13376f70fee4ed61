"""The second-order row sweep shared by GPTQ and SparseGPT: Optimal Brain Surgeon with lazy blocks.

Matrix view (:mod:`mixjax.calibrate`): a layer computes ``X @ W`` with ``W`` of shape ``(K, O)``
(rows: input features, the contraction; columns: output features) and ``X`` ``(N, K)``; the
Hessian of ``||X W - X W'||^2`` in each column of ``W`` is ``2 H`` with ``H = X^T X`` (``gram``).
Rows are fixed one at a time in order. With ``U`` the upper Cholesky factor of ``H^-1``
(``H^-1 = U^T U``), fixing row ``i`` to ``q_i`` and re-solving the rows not yet fixed for the
least error is

    e_i = (w_i - q_i) / U[i, i],        w_j <- w_j - U[i, j] e_i   for every j > i,

(Frantar et al. 2022, GPTQ; Frantar & Alistarh 2023, SparseGPT), where ``w_i`` is row ``i`` as
the updates of the rows before it left it. :func:`sweep` runs this recursion with *lazy block
updates*: rows are processed in blocks of ``block`` rows; inside a block each fixed row updates
the later rows of its block (a ``lax.fori_loop`` of rank-1 updates), and the rows after the block
receive the block's errors at once, ``W -= U[block, :]^T E`` (one matmul). The result is the
recursion's, up to float rounding. One compiled program serves every layer of a shape: the
blocks are a ``lax.fori_loop`` too (the last one padded with zero rows that stay zero).

:func:`inverse_factor` prepares ``U``: *dead* inputs (``H[k, k] == 0``: an input that is always
zero) get ``H[k, k] = 1`` and ``W[k, :] = 0``, then ``H += damp * mean(diag(H)) * I``; so a layer
whose inputs are all zero has ``H = (1 + damp) I`` and never gives NaN.

Everything is float32; matmuls run at ``Precision.HIGHEST`` (no TF32 on GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.linalg import solve_triangular

__all__ = ["Event", "fit_block", "inverse_factor", "sweep"]

_HI = lax.Precision.HIGHEST

# An event (size, fn): before row r is fixed, whenever r % size == 0 and r < K,
# aux = fn(r, rows, diag, aux) with rows = the current rows [r, r + size) ``(size, O)`` and
# diag = U[r:r + size, r:r + size]'s diagonal ``(size,)``.
Event = tuple[int, Callable[[jax.Array, jax.Array, jax.Array, Any], Any]]


def inverse_factor(w: jax.Array, gram: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
    """The weights with dead rows zeroed and the upper Cholesky factor of the damped ``H^-1``.

    Args:
      w: ``(K, O)`` float32 weights.
      gram: ``(K, K)`` float32 ``X^T X``.
      damp: the relative damping (``> 0``), times the mean of ``diag(H)``.

    Returns:
      ``(w, u)``: ``w`` with the rows of dead inputs set to 0, and ``u`` ``(K, K)`` upper
      triangular (exact zeros below the diagonal) with ``u^T u = H^-1`` and ``u[i, i] > 0``.

    ``u`` comes from one Cholesky factorization: with ``J`` the order reversal,
    ``J H J = L L^T`` gives ``H = R R^T`` with ``R = J L J`` upper, so ``H^-1 = R^-T R^-1`` and
    ``u = R^-1 = J L^-1 J`` (no explicit inverse of ``H`` is formed).
    """
    k = gram.shape[0]
    gram = jnp.asarray(gram, jnp.float32)
    diag = jnp.diagonal(gram)
    dead = ~(diag > 0)  # zero (or a broken non-positive) energy
    eye = jnp.eye(k, dtype=bool)
    h = jnp.where(eye & dead[:, None], 1.0, jnp.where(dead[:, None] | dead[None, :], 0.0, gram))
    w = jnp.where(dead[:, None], 0.0, jnp.asarray(w, jnp.float32))
    h = h + jnp.where(eye, damp * jnp.mean(jnp.diagonal(h)), 0.0)
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    inverse = solve_triangular(lower, jnp.eye(k, dtype=jnp.float32), lower=True)
    return w, jnp.triu(inverse[::-1, ::-1])


def fit_block(block_size: int, sizes: Sequence[int]) -> int:
    """The lazy block size used: ``block_size`` rounded down to a multiple of the least common
    multiple ``L`` of ``sizes`` (the group sizes of the events), or ``L`` when that is larger,
    so that every group lies inside one block."""
    unit = math.lcm(*sizes) if sizes else 1
    return max(1, block_size // unit) * unit


def sweep(
    w: jax.Array,
    u: jax.Array,
    *,
    block: int,
    events: Sequence[Event],
    finish: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]],
    aux: Any,
) -> tuple[jax.Array, Any, Any]:
    """Fixes the rows of ``w`` in order with error feedback (module docstring).

    Args:
      w: ``(K, O)`` float32 weights (dead rows zeroed: :func:`inverse_factor`).
      u: ``(K, K)`` upper factor of the damped ``H^-1``.
      block: rows per lazy block; a multiple of every event's size (:func:`fit_block`).
      events: ``(size, fn)`` pairs: ``aux = fn(r, rows, diag, aux)`` runs before row ``r`` is
        fixed whenever ``r % size == 0`` (``rows``: the current rows ``[r, r + size)``,
        ``(size, O)``, all updates of earlier rows applied; ``diag``: ``u``'s diagonal there,
        ``(size,)``); in order, never on the padding rows ``r >= K``.
      finish: ``(r, w_r (O,), aux) -> (q_r (O,), extra_r)``: the value row ``r`` is fixed to
        and a pytree of per-row outputs (e.g. a mask row); it also runs on zero padding rows,
        for which it must return zeros.
      aux: the state the events keep (scales of the current group, a block's mask, ...).

    Returns:
      ``(q, extra, aux)``: the fixed rows ``(K, O)``, the per-row outputs stacked ``(K, ...)``
      and the final ``aux``.
    """
    k, o = w.shape
    blocks = -(-k // block)
    kp = blocks * block
    pad = kp - k
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(kp) >= k).astype(jnp.float32)
    _, extra_row = jax.eval_shape(finish, jnp.int32(0), w[0], aux)
    extra = jax.tree.map(lambda s: jnp.zeros((kp, *s.shape), s.dtype), extra_row)

    def one_block(b, carry):
        w, extra, aux = carry
        start = b * block
        wb = lax.dynamic_slice_in_dim(w, start, block)
        rows_u = lax.dynamic_slice_in_dim(u, start, block)  # (block, Kp)
        ub = lax.dynamic_slice_in_dim(rows_u, start, block, axis=1)
        diag = jnp.diagonal(ub)

        def one_row(i, carry):
            wb, qb, eb, xb, aux = carry
            r = start + i
            for size, fn in events:
                aux = lax.cond(
                    (i % size == 0) & (r < k),
                    lambda a, fn=fn, size=size: fn(
                        r,
                        lax.dynamic_slice_in_dim(wb, i, size),
                        lax.dynamic_slice_in_dim(diag, i, size),
                        a,
                    ),
                    lambda a: a,
                    aux,
                )
            row = wb[i]
            q, x = finish(r, row, aux)
            err = (row - q) / diag[i]
            # u is upper triangular: only rows after i change (row i itself is done).
            wb = wb - ub[i][:, None] * err[None, :]
            xb = jax.tree.map(lambda acc, v: acc.at[i].set(v), xb, x)
            return wb, qb.at[i].set(q), eb.at[i].set(err), xb, aux

        xb = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, block), extra)
        zeros = jnp.zeros((block, o), jnp.float32)
        _, qb, eb, xb, aux = lax.fori_loop(0, block, one_row, (wb, zeros, zeros, xb, aux))
        # The rows after the block, at once; earlier rows have zero coefficients (upper
        # triangular) and the block's own rows are overwritten by their fixed values.
        w = w - jnp.matmul(rows_u.T, eb, precision=_HI)
        w = lax.dynamic_update_slice_in_dim(w, qb, start, axis=0)
        extra = jax.tree.map(
            lambda a, v: lax.dynamic_update_slice_in_dim(a, v, start, axis=0), extra, xb
        )
        return w, extra, aux

    w, extra, aux = lax.fori_loop(0, blocks, one_block, (w, extra, aux))
    return w[:k], jax.tree.map(lambda a: a[:k], extra), aux
