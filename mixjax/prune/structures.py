"""Sparsity structures: which groups of weights are pruned together.

:class:`Unstructured` single weights, :class:`NM` groups along the contraction (input) axis,
:class:`Block` tiles, :class:`Channel` output channels. Each structure turns a leaf's scores into
*unit* scores (:func:`unit_scores`) and a unit mask back into a weight mask (:func:`expand`);
N:M picks the kept weights of each group directly (:func:`nm_mask`). Structures are typed
NamedTuples, validated by :func:`check_structure` when a pruner is built and against each leaf
by :func:`check_leaf` at ``init``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mixjax import _checks, select
from mixjax import layout as layout_lib
from mixjax.layout import Layout

__all__ = [
    "NM",
    "UNSTRUCTURED",
    "Block",
    "Channel",
    "Structure",
    "Unstructured",
    "check_leaf",
    "check_structure",
    "expand",
    "nm_keep",
    "nm_mask",
    "select_leaves",
    "unit_scores",
]


class Unstructured(NamedTuple):
    """Prune individual weights."""


class NM(NamedTuple):
    """Keep ``n`` of every ``m`` consecutive weights along the contraction (input) axis.

    The input axis is ``-2``: axis 0 of a Dense kernel ``(in, out)``, the ``in`` axis of a Conv
    kernel ``(h, w, in, out)``. NVIDIA's 2:4 sparsity is ``NM(2, 4)``. With a sparsity schedule,
    each group keeps ``m - floor(sparsity * m)`` weights, never fewer than ``n``: a ramp from 0 to
    ``1 - n/m`` passes through 4:4, 3:4 and 2:4 for ``NM(2, 4)``. Without a schedule
    (``sparsity=None``) the pattern is ``n:m`` from the start.
    """

    n: int
    m: int


class Block(NamedTuple):
    """Prune whole ``(bh, bw)`` blocks of the last two axes (``(in, out)`` of a kernel).

    A block's score is the mean score of its weights. Conv kernels ``(h, w, in, out)`` are blocked
    per spatial position.
    """

    shape: tuple[int, int]


class Channel(NamedTuple):
    """Prune whole output channels (the last axis); a channel's score is its mean score."""


Structure = Unstructured | NM | Block | Channel
UNSTRUCTURED = Unstructured()
# With layouts, what pruning selects by default: kernels of matmuls and convolutions (not
# embedding tables, tied or not).
_MATMULS = ("dense", "conv")


def unit_scores(structure: Structure, scores: jax.Array) -> jax.Array:
    """The score of each unit of a leaf: its weights' mean score (a block, a channel), or the
    weights' own scores (unstructured).

    Args:
      structure: :class:`Unstructured`, :class:`Block` or :class:`Channel`.
      scores: float32 scores of the leaf's shape ``(..., in, out)``.

    Returns:
      ``(..., in // bh, out // bw)`` for a block, ``(out,)`` for channels, ``scores`` else.
    """
    if isinstance(structure, Block):
        bh, bw = structure.shape
        *lead, rows, cols = scores.shape
        blocks = scores.reshape(*lead, rows // bh, bh, cols // bw, bw)
        return blocks.mean(axis=(-3, -1))
    if isinstance(structure, Channel):
        return scores.reshape(-1, scores.shape[-1]).mean(axis=0)
    return scores


def expand(structure: Structure, unit_mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The weight mask of ``shape`` that a unit mask (of :func:`unit_scores`' shape) stands for."""
    if isinstance(structure, Block):
        bh, bw = structure.shape
        *lead, rows, cols = unit_mask.shape
        full = jnp.broadcast_to(unit_mask[..., :, None, :, None], (*lead, rows, bh, cols, bw))
        return full.reshape(shape)
    if isinstance(structure, Channel):
        return jnp.broadcast_to(unit_mask, shape)
    return unit_mask


def nm_mask(scores: jax.Array, m: int, keep: jax.Array) -> jax.Array:
    """Keeps the ``keep`` highest scores in every group of ``m`` along axis -2."""
    *lead, rows, cols = scores.shape
    groups = scores.reshape(*lead, rows // m, m, cols)
    a = groups[..., :, None, :]  # candidate i
    b = groups[..., None, :, :]  # competitor j
    order = jnp.arange(m)
    earlier = (order[None, :] < order[:, None])[:, :, None]  # j before i
    beaten_by = (b > a) | ((b == a) & earlier)
    rank = jnp.sum(beaten_by, axis=-2)  # how many in the group outrank i
    return (rank < keep).reshape(scores.shape)


def nm_keep(sparsity: jax.Array, nm: NM) -> jax.Array:
    """Weights kept per group of ``m``: ``m - floor(sparsity * m)``, never fewer than ``n``."""
    pruned = jnp.floor(sparsity * nm.m + 1e-6).astype(jnp.int32)
    return jnp.clip(nm.m - pruned, nm.n, nm.m)


def check_leaf(
    fn_name: str, structure: Structure, path: str, leaf: Any, layout: Layout | None = None
) -> None:
    """Raises ``ValueError`` (naming the leaf, its shape and the rule) unless ``structure`` fits
    ``leaf`` seen as the matrices of its ``layout`` (:func:`mixjax.layout.to_matrix`; without a
    layout, its last two axes): N:M needs the contraction size divisible by ``m``, a block must
    tile the ``(contract, out)`` matrix, N:M, blocks and channels need ``ndim >= 2`` without a
    layout."""
    where = select.describe(path, leaf)
    if isinstance(structure, Unstructured):
        return
    if layout is None and leaf.ndim < 2:
        kind = {NM: "N:M sparsity", Block: "block sparsity", Channel: "channel pruning"}
        raise ValueError(
            f"{fn_name}: {where}: {kind[type(structure)]} needs a kernel with ndim >= 2"
        )
    rows, cols = layout_lib.matrix_shape(tuple(leaf.shape), layout)[-2:]
    if layout is None:
        axis = f"the input axis (axis {leaf.ndim - 2}, size {rows})"
    else:
        axis = f"the contraction axes {layout.contract} (size {rows})"
    if isinstance(structure, NM) and rows % structure.m:
        raise ValueError(
            f"{fn_name}: {where}: N:M {structure.n}:{structure.m} needs {axis} divisible by "
            f"{structure.m}"
        )
    if isinstance(structure, Block):
        bh, bw = structure.shape
        if rows % bh or cols % bw:
            seen = "the last two axes" if layout is None else "the (contract, out) matrix"
            raise ValueError(
                f"{fn_name}: {where}: block {structure.shape} does not tile {seen} {(rows, cols)}"
            )


def select_leaves(
    fn_name: str,
    params: Any,
    where: select.Where,
    layouts: Any,
    structure: Structure,
    skip_incompatible: bool,
) -> Any:
    """The mirror tree of bools of the leaves a pruner masks, checked.

    The leaves are ``where``'s (by default, with ``layouts``, the kernels a matmul or
    convolution consumes; embeddings are left out), each with a layout when ``layouts`` are
    given, and each fitting ``structure`` (:func:`check_leaf`); with ``skip_incompatible``,
    those that do not fit are left dense, with one warning that lists them.
    """
    by_path = layout_lib.by_path(fn_name, params, layouts)
    if by_path is not None:
        if where is None:
            where = lambda p, leaf: (  # noqa: E731
                select.is_floating(leaf) and getattr(by_path[p], "kind", None) in _MATMULS
            )
    chosen = select.selection(fn_name, params, where)
    skipped = []

    def fits(path, leaf):
        layout = None if by_path is None else by_path[path]
        if by_path is not None and layout is None:
            raise ValueError(
                f"{fn_name}: {select.describe(path, leaf)} is selected by where= but no matmul, "
                "convolution or table lookup consumes it (its layout is None)"
            )
        try:
            check_leaf(fn_name, structure, path, leaf, layout)
        except ValueError as err:
            if not skip_incompatible:
                raise
            skipped.append(str(err).removeprefix(f"{fn_name}: "))
            return False
        return True

    kept = select.mirror(fits, params, chosen)
    if skipped:
        warnings.warn(
            f"{fn_name}: skip_incompatible=True left {len(skipped)} leaves dense: "
            + "; ".join(skipped),
            stacklevel=3,
        )
    return jax.tree.map(lambda c, k: bool(c and k), chosen, kept)


def check_structure(fn_name: str, structure: Any, scope: str) -> None:
    """Raises unless ``structure`` is a well-formed structure usable with ``scope``.

    Raises:
      TypeError: not a structure, or ``NM`` of non-integers.
      ValueError: ``NM(n, m)`` without ``1 <= n <= m`` or with a scope other than
        ``"uniform"``; ``Block`` without two positive integers.
    """
    if not isinstance(structure, (Unstructured, NM, Block, Channel)):
        raise TypeError(
            f"{fn_name}: structure must be Unstructured(), NM(n, m), Block((bh, bw)) or "
            f"Channel(), got {structure!r}"
        )
    if isinstance(structure, NM):
        n, m = structure
        if not all(_checks.is_integer(v) for v in (n, m)):
            raise TypeError(f"{fn_name}: NM(n, m) needs integers, got NM({n!r}, {m!r})")
        if n < 1 or n > m:
            raise ValueError(f"{fn_name}: NM(n, m) needs 1 <= n <= m, got NM({n}, {m})")
        if scope != "uniform":
            raise ValueError(
                f"{fn_name}: N:M sparsity is per group of {m}; it needs scope='uniform', "
                f"got scope={scope!r}"
            )
    if isinstance(structure, Block):
        shape = tuple(structure.shape) if isinstance(structure.shape, Sequence) else None
        if (
            shape is None
            or len(shape) != 2
            or not all(_checks.is_integer(v) and v >= 1 for v in shape)
        ):
            raise ValueError(
                f"{fn_name}: Block(shape) needs two positive integers, got {structure.shape!r}"
            )
