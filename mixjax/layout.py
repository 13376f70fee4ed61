"""Kernel layouts learned from the model: which axes of each parameter contract, which are outputs.

Whether axis ``-2`` of a kernel is its input axis is a fact of how the model uses the kernel, not
of its rank: a linen ``DenseGeneral`` query kernel ``(embed, heads, head_dim)`` contracts axis 0
and outputs axes 1 and 2; its output projection ``(heads, head_dim, embed)`` contracts axes 0 and
1; an ``nnx.Einsum`` kernel may put its contraction axis anywhere. :func:`learn` traces the model
once (:func:`jax.make_jaxpr` of its forward on an example input), follows every parameter leaf
through casts, reshapes, transposes, broadcasts, elementwise ops (masks, fake quantization) and
nested calls (``jit``, ``custom_jvp``/``custom_vjp``, ``remat``, ``scan`` over stacked layers,
``cond``, ``shard_map``) to the ``dot_general``, ``conv_general_dilated`` or ``gather`` that
consumes it, and reads the dimension numbers there. The result is a tree like ``params`` with a
:class:`Layout` for each leaf a matmul, convolution or table lookup consumes and ``None`` for the
others (biases, norm scales).

Without a model, :func:`convention` is mixjax's rank-based guess, stated as such: a 2-D kernel
is ``(in, out)``, a 3-D or 4-D one a convolution ``(*window, in, out)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from mixjax import _consumers, select

__all__ = [
    "KINDS",
    "Layout",
    "by_path",
    "check_layout",
    "convention",
    "flat_layouts",
    "from_matrix",
    "is_node",
    "learn",
    "matrix_shape",
    "out_axes",
    "to_matrix",
]

KINDS = ("dense", "conv", "embedding")
_NAME = "mixjax.layout.learn"


class Layout(NamedTuple):
    """How a model consumes one parameter leaf.

    Attributes:
      kind: ``"dense"`` (an operand of ``dot_general``: Dense, DenseGeneral, Einsum,
        attention projections), ``"conv"`` (the kernel of ``conv_general_dilated``) or
        ``"embedding"`` (a table read by ``gather``: ``Embed``).
      contract: the axes summed over against the input, in axis order: ``(0,)`` for a Dense
        kernel ``(in, out)``, ``(0, 1)`` for an attention output kernel ``(heads, head_dim,
        embed)``, the input-channel axis of a conv kernel, the feature axis of an embedding.
      out: the output-feature axes: ``(1,)`` for ``(in, out)``, ``(1, 2)`` for a query kernel
        ``(embed, heads, head_dim)``, the output-channel axis of a conv kernel, the row
        (vocabulary) axis of an embedding.
      window: the spatial axes of a conv kernel (``()`` otherwise).
      batch: axes that index independent matrices (``dot_general`` batch dimensions, e.g. one
        kernel per expert), ``()`` usually.
      tied: an embedding that is also used as a matrix (``Embed.attend``: tied input and output
        embeddings).
    """

    kind: str
    contract: tuple[int, ...]
    out: tuple[int, ...]
    window: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    tied: bool = False


def check_layout(fn_name: str, path: str, leaf: Any, layout: Layout) -> Layout:
    """``layout``, checked to fit ``leaf``: a known kind, axes in range, each axis used once.

    Raises:
      ValueError: naming the leaf, its shape and the rule broken.
    """
    where = select.describe(path, leaf)
    if not isinstance(layout, Layout):
        raise ValueError(f"{fn_name}: the layout of {where} must be a Layout, got {layout!r}")
    if layout.kind not in KINDS:
        raise ValueError(f"{fn_name}: {where}: layout kind must be one of {KINDS}, got {layout}")
    axes = [*layout.contract, *layout.out, *layout.window, *layout.batch]
    ndim = np.ndim(leaf)
    if not all(isinstance(a, int) and 0 <= a < ndim for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(
            f"{fn_name}: {where}: the layout's axes must be distinct axes of a {ndim}-D leaf "
            f"(0..{ndim - 1}), got {layout}"
        )
    if not layout.out or (layout.kind != "embedding" and not layout.contract):
        raise ValueError(f"{fn_name}: {where}: a {layout.kind} layout needs contract and out axes")
    return layout


def convention(leaf: Any) -> Layout | None:
    """mixjax's rank-based guess without a model: ``(in, out)`` for 2-D, ``(*window, in, out)``
    for 3-D and 4-D leaves (linen ``Dense`` and ``Conv``), ``None`` for the others."""
    ndim = np.ndim(leaf)
    if ndim == 2:
        return Layout("dense", (0,), (1,))
    if ndim in (3, 4):
        return Layout("conv", (ndim - 2,), (ndim - 1,), window=tuple(range(ndim - 2)))
    return None


def is_node(x: Any) -> bool:
    """``is_leaf`` for trees of layouts: a :class:`Layout` (itself a tuple) or ``None``."""
    return x is None or isinstance(x, Layout)


def flat_layouts(fn_name: str, params: Any, layouts: Any) -> tuple[Layout | None, ...]:
    """``layouts`` (a tree like ``params``, e.g. from :func:`learn`) as one entry per leaf of
    ``params`` in ``jax.tree.leaves`` order, each checked against its leaf.

    Raises:
      ValueError: ``layouts`` has other leaf paths than ``params``, or a layout that does not fit
        its leaf (:func:`check_layout`).
    """
    flat = jax.tree_util.tree_flatten_with_path(layouts, is_leaf=is_node)[0]
    given = {select.path_str(k): v for k, v in flat}
    leaves = select.leaves_with_paths(params)
    paths = [p for p, _ in leaves]
    if sorted(given) != sorted(paths):
        extra, missing = sorted(set(given) - set(paths)), sorted(set(paths) - set(given))
        raise ValueError(
            f"{fn_name}: layouts= must mirror the params: it lacks {missing[:5]} and has "
            f"{extra[:5]} that the params lack"
        )
    return tuple(
        None if given[p] is None else check_layout(fn_name, p, leaf, given[p]) for p, leaf in leaves
    )


def by_path(fn_name: str, params: Any, layouts: Any) -> dict[str, Layout | None] | None:
    """:func:`flat_layouts` as ``{path: layout}`` (``None`` for ``layouts=None``: no layouts)."""
    if layouts is None:
        return None
    paths = [p for p, _ in select.leaves_with_paths(params)]
    return dict(zip(paths, flat_layouts(fn_name, params, layouts), strict=True))


def out_axes(leaf: Any, layout: Layout | None) -> tuple[int, ...]:
    """The output-feature axes of a leaf: its layout's, else (the convention) its last axis."""
    return tuple(layout.out) if layout is not None else (np.ndim(leaf) - 1,)


# ----------------------------------------------------------------------------------------------
# The matrix view every structure works on: (*rest, contract, out), rest the other axes in order.


def _order(ndim: int, layout: Layout | None) -> tuple[list[int], list[int], list[int]]:
    if layout is None:  # no layout: the leaf's own last two axes (ndim >= 2)
        return list(range(ndim - 2)), [ndim - 2], [ndim - 1]
    used = {*layout.contract, *layout.out}
    rest = [a for a in range(ndim) if a not in used]
    return rest, list(layout.contract), list(layout.out)


def matrix_shape(shape: tuple[int, ...], layout: Layout | None) -> tuple[int, ...]:
    """The shape of :func:`to_matrix`'s view: ``(*rest, prod(contract), prod(out))``."""
    rest, contract, out = _order(len(shape), layout)
    size = lambda axes: int(np.prod([shape[a] for a in axes], dtype=np.int64))  # noqa: E731
    return (*(shape[a] for a in rest), size(contract), size(out))


def to_matrix(x: jax.Array, layout: Layout | None) -> jax.Array:
    """``x`` as a stack of ``(contract, out)`` matrices: the contraction axes flattened in axis
    order into axis ``-2``, the output axes into axis ``-1``, the other axes (a conv window,
    batch axes) leading in order. ``layout=None``: ``x`` itself (its last two axes)."""
    rest, contract, out = _order(x.ndim, layout)
    return x.transpose(*rest, *contract, *out).reshape(matrix_shape(x.shape, layout))


def from_matrix(view: jax.Array, layout: Layout | None, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of :func:`to_matrix`: the leaf of ``shape`` whose view is ``view``."""
    rest, contract, out = _order(len(shape), layout)
    order = [*rest, *contract, *out]
    x = view.reshape([shape[a] for a in order])
    return x.transpose(np.argsort(order))


def _resolve(path: str, leaf: Any, uses: list[_consumers.Use], unknown: set[str]) -> Layout | None:
    where = select.describe(path, leaf)
    how = (
        "pass override={path: mixjax.layout.Layout(...)} to mixjax.layout.learn to give its "
        "layout, or leave the leaf out of the transform's where="
    )
    if unknown and uses:
        raise ValueError(
            f"{_NAME}: {where} reaches {sorted(unknown)}, which mixjax cannot follow, as well as "
            f"a {uses[0].kind}; its layout is ambiguous: {how}"
        )
    if not uses:
        return None
    tables = [u for u in uses if u.kind == "embedding"]
    if tables:
        rows = {u.out for u in tables}
        matrices = [u for u in uses if u.kind != "embedding"]
        # Embed.attend: the table (rows, features) contracted over its features.
        if len(rows) > 1 or any(u.out != tables[0].out for u in matrices):
            raise ValueError(f"{_NAME}: {where} is read as a table in several ways ({uses}): {how}")
        u = tables[0]
        return Layout("embedding", u.contract, u.out, tied=bool(matrices))
    distinct = set(uses)
    if len(distinct) > 1:
        listed = "; ".join(f"{u.kind} contract={u.contract} out={u.out}" for u in sorted(distinct))
        raise ValueError(f"{_NAME}: {where} is consumed with different layouts ({listed}): {how}")
    u = uses[0]
    return Layout(u.kind, u.contract, u.out, u.window, u.batch)


def learn(
    fn: Callable[..., Any],
    params: Any,
    *args: Any,
    override: Mapping[str, Layout] | None = None,
    **kwargs: Any,
) -> Any:
    """The :class:`Layout` of every leaf of ``params``, learned from one trace of the model.

    Args:
      fn: the model's forward, ``fn(params, *args, **kwargs)``, e.g. ``lambda p, x:
        module.apply({"params": p}, x)`` or, for NNX, ``lambda s, x: nnx.merge(graphdef, s,
        rest)(x)``. Only traced (no FLOPs run), so ``args`` may be ``jax.ShapeDtypeStruct``\\ s.
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
      *args: example inputs.
      override: ``{path: Layout}`` for leaves whose layout the trace cannot tell (checked against
        the leaf's shape); these leaves are not traced for a layout.
      **kwargs: keyword inputs of ``fn``.

    Returns:
      A tree of ``params``' structure holding a :class:`Layout` or ``None`` per leaf.

    Raises:
      ValueError: ``override`` names a path ``params`` lacks, or a layout that does not fit its
        leaf; a leaf consumed in incompatible ways, or reaching an operation mixjax cannot follow
        as well as a matmul (the message names the leaf and says how to give its layout); a
        model that rejects the example input (the model's own error is kept as the cause).
    """
    override = dict(override or {})
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [select.path_str(k) for k, _ in flat]
    leaves = [leaf for _, leaf in flat]
    missing = sorted(set(override) - set(paths))
    if missing:
        raise ValueError(f"{_NAME}: override names {missing}, which params lack; paths: {paths}")
    for path, leaf in zip(paths, leaves, strict=True):
        if path in override:
            check_layout(_NAME, path, leaf, override[path])
    shapes = [jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.float32)) for x in leaves]

    def forward(flat_leaves, inputs):  # the inputs traced too: what derives from them is data
        return fn(jax.tree.unflatten(treedef, flat_leaves), *inputs, **kwargs)

    try:
        closed = jax.make_jaxpr(forward)(shapes, list(args))
    except Exception as err:
        raise ValueError(
            f"{_NAME}: the model rejects the example input ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]})"
        ) from err
    tracer = _consumers.Tracer(len(leaves))
    env = {
        v: (i, tuple((a,) for a in range(len(shapes[i].shape))))
        for i, v in enumerate(closed.jaxpr.invars[: len(leaves)])
        if paths[i] not in override
    }
    env.update({v: _consumers.DATA for v in closed.jaxpr.invars[len(leaves) :]})
    tracer.walk(closed.jaxpr, env)
    layouts = [
        override[p] if p in override else _resolve(p, leaf, tracer.uses[i], tracer.unknown[i])
        for i, (p, leaf) in enumerate(zip(paths, leaves, strict=True))
    ]
    return jax.tree.unflatten(treedef, layouts)
