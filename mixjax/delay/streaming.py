"""Streaming DiLoCo's schedule: which leaves form each fragment and when each one syncs.

The parameters are split into ``F`` fragments (:func:`partition`); fragment ``f`` syncs at its
own offset ``o_f = (f + 1) * H // F`` (``1 <= o_f <= H``, distinct for ``F <= H``), after the
inner steps ``t`` (counted from 0) with ``t + 1 = o_f, o_f + H, o_f + 2 H, ...``, so every leaf
syncs once per ``H`` steps and the fragments' messages are spread over the period. With
``F = 1`` the one fragment syncs after steps ``H - 1, 2 H - 1, ...``: plain DiLoCo. With an
outer delay ``tau`` (``0 <= tau < H``) the averaged message of the sync after step ``s`` is
applied after step ``s + tau`` (:func:`due`), before the fragment's next sync.

A fragment spec is either an int ``F`` (the leaves in ``jax.tree.leaves`` order cut into ``F``
contiguous runs of near-equal leaf counts, ``numpy.array_split``: consecutive layers sync
together, as Streaming DiLoCo's sequential pattern), or a sequence of ``where=`` selectors
(:mod:`mixjax.select`), fragment ``f`` being the leaves selector ``f`` selects; they must
partition the leaves: each leaf in exactly one fragment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, select

__all__ = ["check_fragments", "due", "offsets", "partition"]


def check_fragments(fn_name: str, fragments: Any, sync_every: int) -> int | tuple:
    """``fragments`` validated against ``sync_every`` (``H``): an int in ``[1, H]``, or a
    non-empty sequence of at most ``H`` ``where=`` selectors (returned as selector predicates).

    Raises:
      TypeError: neither an int nor a sequence, or a selector of the wrong type.
      ValueError: out of range or empty.
    """
    if _checks.is_integer(fragments) or isinstance(fragments, bool):
        return _checks.integer(fn_name, "fragments", fragments, 1, sync_every)
    if isinstance(fragments, (str, bytes)) or not isinstance(fragments, Sequence):
        raise TypeError(
            f"{fn_name}: fragments must be an int F in [1, sync_every={sync_every}] or a "
            f"sequence of where= selectors, one per fragment, got {type(fragments).__name__}"
        )
    if not 1 <= len(fragments) <= sync_every:
        raise ValueError(
            f"{fn_name}: fragments must name between 1 and sync_every={sync_every} fragments "
            f"(each syncs at its own step of the period), got {len(fragments)}"
        )
    return tuple((w, select.as_selector(w)) for w in fragments)


def partition(fn_name: str, params: Any, fragments: int | tuple) -> list[list[int]]:
    """The leaf indices (``jax.tree.leaves`` order) of each fragment.

    Args:
      fn_name: the public function, for the messages.
      params: the parameter tree.
      fragments: a checked spec (:func:`check_fragments`).

    Returns:
      ``F`` non-empty, disjoint lists covering every leaf index.

    Raises:
      ValueError: an int ``F`` larger than the number of leaves; selectors that leave a leaf
        out or put it in two fragments, or a fragment with no leaf (named with its path,
        shape and the selectors).
    """
    paths = select.leaves_with_paths(params)
    if isinstance(fragments, int):
        if fragments > len(paths):
            raise ValueError(
                f"{fn_name}: fragments={fragments} do not partition the {len(paths)} leaves of "
                "the params: every fragment needs at least one leaf"
            )
        return [list(map(int, run)) for run in np.array_split(np.arange(len(paths)), fragments)]
    members: list[list[int]] = [[] for _ in fragments]
    for i, (path, leaf) in enumerate(paths):
        hits = [f for f, (_, selector) in enumerate(fragments) if selector(path, leaf)]
        if len(hits) != 1:
            found = "no fragment" if not hits else f"fragments {hits}"
            raise ValueError(
                f"{fn_name}: fragments do not partition the leaves: "
                f"{select.describe(path, leaf)} is in {found}, needs exactly one (fragments "
                f"{[w for w, _ in fragments]})"
            )
        members[hits[0]].append(i)
    for f, run in enumerate(members):
        if not run:
            raise ValueError(
                f"{fn_name}: fragments do not partition the leaves: fragment {f} "
                f"(where={fragments[f][0]!r}) selects no leaf"
            )
    return members


def offsets(count: int, sync_every: int) -> list[int]:
    """The offset ``o_f = (f + 1) * H // F`` of each of ``F = count`` fragments."""
    return [(f + 1) * sync_every // count for f in range(count)]


def due(step: jax.Array, offset: int, sync_every: int, lag: int = 0) -> jax.Array:
    """Whether, after step ``step`` (int32 scalar, from 0), the fragment of ``offset`` syncs
    (``lag = 0``) or applies the message it sent ``lag`` steps earlier: a bool scalar, true
    when ``step + 1 - lag`` is one of ``offset, offset + H, ...``."""
    k = jnp.asarray(step, jnp.int32) + 1 - lag - offset
    return (k >= 0) & (k % sync_every == 0)
