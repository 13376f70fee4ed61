"""Leaf selection on parameter-tree paths: the ``where=`` argument of every transform.

A *selector* is a predicate ``(path, leaf) -> bool`` where ``path`` is the leaf's path string,
its keys joined by ``/`` (``"Dense_0/kernel"``; NNX trees drop their trailing ``value`` key, so a
linen ``params`` dict and an ``nnx.State`` give the same paths). :func:`as_selector` turns what
users pass as ``where=`` into one:

* ``None``: the default, :func:`kernels` (floating leaves with ``ndim >= 2``: weight kernels,
    never biases or norm scales);
* a ``str``: a regular expression that must match the **whole** path (``re.fullmatch``), e.g.
    ``".*Dense_0/kernel"``;
* a callable ``(path, leaf) -> bool``;
* a tuple or list of any of these: a leaf is selected when any of them selects it.

Selection happens on static information only (paths, shapes, dtypes), so it costs nothing inside
``jax.jit``. Transforms store their per-leaf state in *mirror trees*: the parameter tree's
structure with the state at selected leaves and ``None`` elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "Selector",
    "Where",
    "all_of",
    "any_of",
    "as_selector",
    "check_mirror",
    "check_mirror_shapes",
    "describe",
    "exclude",
    "is_floating",
    "kernels",
    "leaves_with_paths",
    "min_size",
    "mirror",
    "path_str",
    "regex",
    "selection",
]

Selector = Callable[[str, Any], bool]
Where = None | str | Selector | Sequence[Any]


def path_str(keypath: Sequence[Any]) -> str:
    """The ``/``-joined string of a JAX key path; NNX's trailing ``value`` attribute is dropped."""
    parts = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if (
        len(parts) > 1
        and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
        and parts[-1] == "value"
    ):
        parts.pop()
    return "/".join(parts)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path string, leaf), ...]`` in ``jax.tree.leaves`` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_str(keypath), leaf) for keypath, leaf in flat]


def describe(path: str, leaf: Any) -> str:
    """``"leaf 'Dense_0/kernel' (784, 300) float32"``: how errors name a leaf."""
    shape = tuple(getattr(leaf, "shape", ()))
    dtype = getattr(leaf, "dtype", type(leaf).__name__)
    return f"leaf {path!r} {shape} {dtype}"


def is_floating(leaf: Any) -> bool:
    """Whether ``leaf`` is an array of a floating dtype."""
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def kernels(path: str, leaf: Any) -> bool:
    """Default selector: floating leaves with ``ndim >= 2`` (Dense and Conv kernels)."""
    del path
    return is_floating(leaf) and leaf.ndim >= 2


def regex(pattern: str) -> Selector:
    """Selects leaves whose whole path matches ``pattern`` (``re.fullmatch``)."""
    compiled = re.compile(pattern)
    selector = lambda path, leaf: compiled.fullmatch(path) is not None
    selector.__name__ = f"regex({pattern!r})"
    return selector


def any_of(*wheres: Where) -> Selector:
    """Selects a leaf when any of ``wheres`` selects it."""
    selectors = [as_selector(w) for w in wheres]
    return lambda path, leaf: any(s(path, leaf) for s in selectors)


def all_of(*wheres: Where) -> Selector:
    """Selects a leaf when every one of ``wheres`` selects it."""
    selectors = [as_selector(w) for w in wheres]
    return lambda path, leaf: all(s(path, leaf) for s in selectors)


def exclude(where: Where) -> Selector:
    """Selects the leaves ``where`` does not select."""
    selector = as_selector(where)
    return lambda path, leaf: not selector(path, leaf)


def min_size(size: int) -> Selector:
    """Selects leaves with at least ``size`` elements (e.g. to skip small first/last layers)."""
    return lambda path, leaf: int(getattr(leaf, "size", 0)) >= size


def as_selector(where: Where) -> Selector:
    """Turns a ``where=`` argument into a selector predicate (see the module docstring)."""
    if where is None:
        return kernels
    if isinstance(where, str):
        try:
            return regex(where)
        except re.error as err:
            raise ValueError(
                f"mixjax.select: where={where!r} is not a valid regex: {err}"
            ) from None
    if isinstance(where, (tuple, list)):
        return any_of(*where)
    if callable(where):
        return where
    raise TypeError(
        "mixjax.select: where= must be None, a regex string, a callable (path, leaf) -> bool "
        f"or a sequence of those; got {type(where).__name__}"
    )


def selection(fn_name: str, params: Any, where: Where, *, floating_only: bool = True) -> Any:
    """The mirror tree of booleans saying which leaves ``where`` selects, validated.

    Args:
        fn_name: the public function being validated, for error messages.
        params: the parameter tree.
        where: the ``where=`` argument.
        floating_only: raise ``TypeError`` when a non-floating leaf is selected.

    Returns:
        A tree with ``params``' structure holding Python ``bool`` leaves.

    Raises:
        ValueError: the selector matches no leaf (the message lists the paths there are).
        TypeError: a selected leaf is an integer or boolean array while ``floating_only``.
    """
    selector = as_selector(where)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    chosen = []
    for keypath, leaf in flat:
        path = path_str(keypath)
        hit = bool(selector(path, leaf))
        if hit and floating_only and not is_floating(leaf):
            raise TypeError(
                f"{fn_name}: {describe(path, leaf)} is selected by where= but is not "
                "floating point; only float leaves can be transformed"
            )
        chosen.append(hit)
    if not any(chosen):
        paths = ", ".join(repr(path_str(k)) for k, _ in flat[:20])
        more = f" (+{len(flat) - 20} more)" if len(flat) > 20 else ""
        raise ValueError(f"{fn_name}: where={where!r} matches no leaf; the tree has {paths}{more}")
    return jax.tree_util.tree_unflatten(treedef, chosen)


def mirror(fn: Callable[..., Any], params: Any, chosen: Any, *rest: Any) -> Any:
    """``fn(path, leaf, *rest_leaves)`` at selected leaves and ``None`` elsewhere.

    ``chosen`` is a tree from :func:`selection`; ``rest`` are mirror trees (``None`` at unselected
    leaves) or trees with ``params``' structure.
    """
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf, hit, *others: fn(path_str(kp), leaf, *others) if hit else None,
        params,
        chosen,
        *rest,
    )


def check_mirror(fn_name: str, params: Any, state_tree: Any, name: str = "state") -> None:
    """Raises ``ValueError`` unless ``state_tree`` mirrors ``params``' structure (same paths).

    A mirror tree may hold ``None``, an array or a structured value (e.g. a NamedTuple) at each
    leaf of ``params``; only the structure is compared here, since per-leaf state may have any
    shape (per-channel scales, centroids). :func:`check_mirror_shapes` also compares shapes,
    for state arrays that have their parameter's shape (masks, assignments).
    """
    try:
        jax.tree_util.tree_map(lambda p, s: None, params, state_tree)
    except (ValueError, TypeError) as err:
        param_paths = sorted(p for p, _ in leaves_with_paths(params))
        raise ValueError(
            f"{fn_name}: the {name} does not match the params tree (was it made by init on "
            f"these params?); params have leaves {param_paths[:10]}...: {err}"
        ) from None


def check_mirror_shapes(fn_name: str, params: Any, arrays: Any, name: str) -> None:
    """Like :func:`check_mirror`, and each non-``None`` array in ``arrays`` has its leaf's shape."""
    check_mirror(fn_name, params, arrays, name)

    def check(path, leaf, other):
        if other is not None and tuple(other.shape) != tuple(leaf.shape):
            raise ValueError(
                f"{fn_name}: {describe(path, leaf)}: {name} has shape {tuple(other.shape)}, "
                "expected the parameter's shape (was the state made by init on these params?)"
            )

    jax.tree_util.tree_map_with_path(lambda kp, p, o: check(path_str(kp), p, o), params, arrays)
