"""One-shot pruning by a score, no weight update: :func:`wanda` and :func:`layer_magnitude`.

Matrix view (:mod:`mixjax.calibrate`): ``W`` ``(K, O)``, rows the input features, columns the
output features. Both methods compare the weights of each output feature (column) among
themselves, Wanda's comparison group (Sun et al. 2023): unstructured, each column loses exactly
``round(sparsity * K)`` weights; ``NM(n, m)`` keeps the ``n`` best of every ``m`` consecutive
rows of each column (along the contraction, as :class:`mixjax.prune.NM` everywhere). Ties go to
the lower row (it is pruned first, and kept first within an N:M group), so counts are exact.

* :func:`wanda`: score ``|W[k, o]| * ||X[:, k]||_2`` (``sqrt(diag(X^T X))``);
* :func:`layer_magnitude`: score ``|W[k, o]|`` (no calibration data).

:func:`check_pattern` and :func:`keep_mask` are the pattern rules and the selection that the
one-shot pruners share (:mod:`mixjax.prune.second_order` too).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mixjax import _checks
from mixjax.calibrate import LayerStats, Method, Solution
from mixjax.prune.selection import lowest_per_column
from mixjax.prune.structures import NM, check_structure, nm_mask

__all__ = [
    "as_nm",
    "check_layer_pattern",
    "check_nm_rows",
    "check_pattern",
    "keep_mask",
    "layer_magnitude",
    "pruned_count",
    "wanda",
    "wanda_solve",
]


def check_pattern(fn_name: str, sparsity: Any) -> tuple[float | None, NM | None]:
    """``(sparsity, None)`` for a fraction in ``[0, 1)``, ``(None, nm)`` for an ``NM(n, m)``.

    Raises:
      TypeError: neither a number nor an ``NM``; an ``NM`` of non-integers.
      ValueError: a fraction outside ``[0, 1)``; ``NM(n, m)`` without ``1 <= n <= m``.
    """
    if isinstance(sparsity, NM):
        check_structure(fn_name, sparsity, "uniform")
        return None, NM(int(sparsity.n), int(sparsity.m))
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(
            f"{fn_name}: sparsity must be a fraction in [0, 1) or mixjax.prune.NM(n, m), got "
            f"sparsity={sparsity!r} ({type(sparsity).__name__})"
        )
    return _checks.real(fn_name, "sparsity", sparsity, 0.0, 1.0, high_open=True), None


def check_nm_rows(fn_name: str, nm: NM | None, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` (naming the shape) unless ``m`` divides the ``K`` rows."""
    if nm is not None and shape[0] % nm.m:
        raise ValueError(
            f"{fn_name}: N:M {nm.n}:{nm.m} needs the layer's {shape[0]} input rows (weight of "
            f"shape {tuple(shape)} in the matrix view) divisible by {nm.m}"
        )


def pruned_count(sparsity: float, rows: int) -> int:
    """Weights pruned per column among ``rows``: ``round(sparsity * rows)`` (half to even)."""
    return int(round(sparsity * rows))


def keep_mask(scores: jax.Array, sparsity: float | None, nm: NM | None) -> jax.Array:
    """The kept weights ``(K, O)`` bool for scores ``(K, O)`` (higher is kept): per column, all
    but the ``round(sparsity * K)`` lowest, or the ``n`` highest of every ``m`` rows."""
    if nm is not None:
        return nm_mask(scores, nm.m, jnp.int32(nm.n))
    return ~lowest_per_column(scores, pruned_count(sparsity, scores.shape[0]))


def check_layer_pattern(
    fn_name: str, w: jax.Array, sparsity: float | None, nm: Any
) -> tuple[float | None, NM | None]:
    """A solver's ``(sparsity, nm)`` checked against its weight ``w`` ``(K, O)``: exactly one of
    them given, the fraction in ``[0, 1)``, ``m`` dividing ``K``.

    Raises:
      TypeError: a pattern of the wrong type.
      ValueError: ``w`` not a matrix; both or neither given; a bad value (named, with the
        shape).
    """
    if w.ndim != 2:
        raise ValueError(f"{fn_name}: the weight must be a (K, O) matrix, got shape {w.shape}")
    if (sparsity is None) == (nm is None):
        raise ValueError(f"{fn_name}: give exactly one of sparsity= and nm=")
    if nm is not None:
        _, nm = check_pattern(fn_name, as_nm(fn_name, nm))
        check_nm_rows(fn_name, nm, w.shape)
    else:
        sparsity, _ = check_pattern(fn_name, sparsity)
    return sparsity, nm


def as_nm(fn_name: str, nm: Any) -> NM:
    """``nm`` (an ``NM`` or a pair ``(n, m)``) as an ``NM``, unchecked.

    Raises:
      TypeError: not a pair.
    """
    if isinstance(nm, (tuple, list)) and len(nm) == 2:
        return NM(*nm)
    raise TypeError(f"{fn_name}: nm must be NM(n, m) or a pair (n, m), got nm={nm!r}")


def _pruned(w: jax.Array, scores: jax.Array, sparsity, nm) -> Solution:
    mask = keep_mask(scores, sparsity, nm)
    return Solution(jnp.where(mask, w, 0.0), mask, None, None)


def wanda_solve(
    w: jax.Array, stats: LayerStats, *, sparsity: float | None, nm: NM | None
) -> Solution:
    """Wanda on one layer (module docstring): prune by ``|W| * ||X_k||_2`` per output column.

    Args:
      w: ``(K, O)`` float32 weights.
      stats: the layer's input statistics; ``diag(stats.gram)`` is ``||X_k||_2^2``.
      sparsity: the fraction pruned per column, or ``None`` with ``nm``.
      nm: ``NM(n, m)``, or ``None`` with ``sparsity``.

    Returns:
      A :class:`mixjax.calibrate.Solution` with the mask and ``w`` zeroed outside it (no
      scales).

    Raises:
      ValueError: not exactly one of ``sparsity`` / ``nm``; ``m`` not dividing ``K``; a
        ``gram`` that is not ``(K, K)``.
    """
    name = "mixjax.prune.wanda_solve"
    sparsity, nm = check_layer_pattern(name, w, sparsity, nm)
    if tuple(stats.gram.shape) != (w.shape[0],) * 2:
        raise ValueError(
            f"{name}: the gram matrix must be {(w.shape[0],) * 2} for a weight of shape "
            f"{tuple(w.shape)}, got {tuple(stats.gram.shape)}"
        )
    w = jnp.asarray(w, jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(stats.gram), 0.0))
    return _pruned(w, jnp.abs(w) * norms[:, None], sparsity, nm)


def _wanda_from_stats(w: jax.Array, stats: LayerStats, **pattern) -> Solution:
    return wanda_solve(w, stats, **pattern)


def _magnitude_from_stats(w: jax.Array, stats: LayerStats | None, *, sparsity, nm) -> Solution:
    del stats  # magnitude reads no inputs
    sparsity, nm = check_layer_pattern("mixjax.prune.layer_magnitude", w, sparsity, nm)
    w = jnp.asarray(w, jnp.float32)
    return _pruned(w, jnp.abs(w), sparsity, nm)


def wanda(sparsity: float | NM = 0.5) -> Method:
    """Wanda one-shot pruning, for :func:`mixjax.oneshot.compress` (module docstring).

    Args:
      sparsity: the fraction of each output column pruned, in ``[0, 1)``, or ``NM(n, m)``.

    Returns:
      A :class:`mixjax.calibrate.Method` named ``"wanda"``.

    Raises:
      TypeError / ValueError: a bad ``sparsity`` (named).

    Example:
      >>> import mixjax
      >>> mixjax.prune.wanda(mixjax.prune.NM(2, 4)).name
      'wanda'
    """
    sparsity, nm = check_pattern("mixjax.prune.wanda", sparsity)
    solve = functools.partial(_wanda_from_stats, sparsity=sparsity, nm=nm)
    return Method("wanda", solve, None, prunes=True, uses_inputs=True)


def layer_magnitude(sparsity: float | NM = 0.5) -> Method:
    """Magnitude pruning per output column as a one-shot method (no calibration data): the
    baseline of :func:`wanda` and :func:`mixjax.prune.sparsegpt`, the same selection with score
    ``|W|``. (:func:`mixjax.prune.magnitude` is the training-time transform.)

    Args:
      sparsity: the fraction of each output column pruned, in ``[0, 1)``, or ``NM(n, m)``.

    Returns:
      A :class:`mixjax.calibrate.Method` named ``"magnitude"`` with ``uses_inputs=False``.
    """
    sparsity, nm = check_pattern("mixjax.prune.layer_magnitude", sparsity)
    solve = functools.partial(_magnitude_from_stats, sparsity=sparsity, nm=nm)
    return Method("magnitude", solve, None, prunes=True, uses_inputs=False)
