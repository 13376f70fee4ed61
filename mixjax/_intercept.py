"""Running a model's jaxpr with the matmuls, convolutions and lookups of its parameters rewritten.

The interpreter behind activation quantization (:mod:`mixjax.quant.activations`) and integer
inference (:mod:`mixjax.export.integer`). :func:`run` traces ``fn(params, *args)`` once
(:func:`jax.make_jaxpr`) and evaluates the jaxpr equation by equation, binding each primitive
as JAX itself would, at the caller's trace level (so it runs inside ``jax.jit``, ``jax.grad``
and ``jax.vmap``), except at *sites*: a ``dot_general`` or ``conv_general_dilated`` with exactly
one operand derived from a parameter leaf (the kernel of a convolution), and a ``gather`` from
one (an embedding lookup). There a ``rewrite`` callback may compute the outputs instead.

Values derived from a leaf are followed through casts, reshapes, transposes, broadcasts, slices
and ``jit`` bodies (entered and inlined, as are ``remat`` bodies, whose recomputation policy is
then not kept). The structural steps are kept as a :class:`Chain`, so a rewrite can replay them
on another array of the leaf's shape (its integer codes, its scales); a shape-keeping elementwise
step (a mask multiply) keeps the value tracked but marks the chain inexact.

Sites are named by the leaf's path, ``path@k`` for the leaf's ``k``-th further site (a tied
embedding's decode is ``".../embedding@1"``), in evaluation order; the same function traced at
other batch sizes names the same sites. A leaf that reaches a construct the interpreter does not
enter (``scan``, ``while``, ``cond``, ``custom_jvp``/``custom_vjp``, ``shard_map``), or a matmul
whose both operands are parameters, is listed in :attr:`Run.hidden`, so callers can say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.extend import core as jex_core

from mixjax import select
from mixjax._consumers import DATA, ELEMENTWISE

__all__ = ["Chain", "Rewrite", "Run", "Site", "bind", "run"]

_STRUCTURAL = frozenset("reshape transpose broadcast_in_dim squeeze rev slice".split())
_VALUE_KEEPING = frozenset("convert_element_type copy copy_p reduce_precision".split())
_ENTERED = frozenset("jit pjit closed_call core_call checkpoint remat".split())
_KINDS = {"dot_general": "dense", "conv_general_dilated": "conv", "gather": "embedding"}


class Chain(NamedTuple):
    """How a value derives from a parameter leaf.

    Attributes:
      leaf: the leaf's index in ``jax.tree.leaves(params)`` order.
      steps: ``((primitive, params), ...)``, the structural ops from the leaf to the value.
      exact: ``False`` once a value-changing op (a multiply by a mask, a fake quantization)
        came between, so replaying ``steps`` on the leaf does not give the value.
    """

    leaf: int
    steps: tuple[tuple[Any, dict[str, Any]], ...]
    exact: bool

    def replay(self, x: Any) -> Any:
        """``steps`` applied to ``x``, an array of the leaf's shape (any dtype)."""
        for primitive, params in self.steps:
            x = primitive.bind(x, **params)
        return x


class Site(NamedTuple):
    """One equation that consumes a parameter leaf.

    Attributes:
      name: ``path`` for the leaf's first site, ``path@k`` for later ones.
      path: the leaf's path (:func:`mixjax.select.path_str`).
      kind: ``"dense"`` (``dot_general``), ``"conv"`` (``conv_general_dilated``) or
        ``"embedding"`` (``gather``).
      weight: the index of the parameter operand (the other is the activation, or the indices).
      eqn: the jaxpr equation (``eqn.params``: the dimension numbers, padding, ...).
      chain: how the parameter operand derives from the leaf.
    """

    name: str
    path: str
    kind: str
    weight: int
    eqn: Any
    chain: Chain


Rewrite = Callable[[Site, list[Any]], "list[Any] | None"]


class Run(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      out: ``fn``'s output.
      sites: the sites in evaluation order.
      hidden: ``{leaf path: why}`` for leaves that reach a matmul the interpreter cannot see or
        rewrite (``"scan"``, ``"matmul of two parameters"``, ...).
    """

    out: Any
    sites: list[Site]
    hidden: dict[str, str]


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Evaluates one equation on ``invals`` as :func:`jax.core.eval_jaxpr` does."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


class _Interpreter:
    def __init__(self, paths: list[str], rewrite: Rewrite | None):
        self.paths, self.rewrite = paths, rewrite
        self.sites: list[Site] = []
        self.hidden: dict[str, str] = {}
        self.count: dict[str, int] = {}

    def eval(self, jaxpr, consts, values, shadows) -> tuple[list[Any], list[Any]]:
        """Evaluates ``jaxpr``; ``shadows`` (one per invar) are a :class:`Chain`, ``DATA`` for a
        value that depends on ``fn``'s inputs, or ``None`` (a constant)."""
        env = dict(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, values, strict=True))
        shadow = {v: c for v, c in zip(jaxpr.invars, shadows, strict=True) if c is not None}
        for eqn in jaxpr.eqns:
            invals = [_read(env, v) for v in eqn.invars]
            known = [shadow.get(v) if _is_var(v) else None for v in eqn.invars]
            outs, out_shadows = self.equation(eqn, invals, known)
            env.update(zip(eqn.outvars, outs, strict=True))
            shadow.update(
                {v: c for v, c in zip(eqn.outvars, out_shadows, strict=True) if c is not None}
            )
        return [_read(env, v) for v in jaxpr.outvars], [
            shadow.get(v) if _is_var(v) else None for v in jaxpr.outvars
        ]

    def equation(self, eqn, invals, known) -> tuple[list[Any], list[Any]]:
        name = eqn.primitive.name
        tracked = {k: c for k, c in enumerate(known) if isinstance(c, Chain)}
        data = any(c is DATA for c in known)
        # A value computed from fn's inputs is an activation, whatever parameters it met (a
        # LayerNorm scale, a position embedding): only data-free values can be weights.
        plain = [DATA if data else None] * len(eqn.outvars)
        if not tracked:
            return bind(eqn, invals), plain
        if name in _ENTERED:
            inner = eqn.params["jaxpr"]
            jaxpr, consts = getattr(inner, "jaxpr", inner), getattr(inner, "consts", [])
            return self.eval(jaxpr, consts, invals, known)
        site = self.site(eqn, tracked)
        if site is not None:
            self.sites.append(site)
            out = None if self.rewrite is None else self.rewrite(site, invals)
            return (bind(eqn, invals) if out is None else list(out)), plain
        if any(isinstance(getattr(v, "jaxpr", v), jex_core.Jaxpr) for v in eqn.params.values()):
            for chain in tracked.values():  # scan, while, cond, custom_jvp, shard_map, ...
                self.hidden.setdefault(self.paths[chain.leaf], name)
            return bind(eqn, invals), plain
        outs = bind(eqn, invals)
        first = tracked.get(0)
        if data or len(eqn.outvars) != 1:
            return outs, plain
        if name in _STRUCTURAL and first is not None:
            params = eqn.primitive.get_bind_params(eqn.params)
            return outs, [first._replace(steps=(*first.steps, (eqn.primitive, params)))]
        if name in _VALUE_KEEPING and first is not None:
            return outs, [first]
        if name in ELEMENTWISE:
            shape = eqn.outvars[0].aval.shape
            same = [c for k, c in tracked.items() if eqn.invars[k].aval.shape == shape]
            if same:  # a mask or a fake quantization of the weight, inside fn
                return outs, [same[0]._replace(exact=False)]
        return outs, plain

    def site(self, eqn, tracked) -> Site | None:
        kind = _KINDS.get(eqn.primitive.name)
        if kind is None:
            return None
        if kind == "dense" and len(tracked) == 2:
            for chain in tracked.values():
                self.hidden.setdefault(self.paths[chain.leaf], "matmul of two parameters")
            return None
        side = {"dense": next(iter(tracked)), "conv": 1, "embedding": 0}[kind]
        if side not in tracked:
            return None
        chain = tracked[side]
        path = self.paths[chain.leaf]
        k = self.count.get(path, 0)
        self.count[path] = k + 1
        return Site(path if k == 0 else f"{path}@{k}", path, kind, side, eqn, chain)


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jex_core.Literal) else env[v]


def _is_var(v: Any) -> bool:
    return isinstance(v, jex_core.Var)


def run(
    fn: Callable[..., Any],
    params: Any,
    args: Sequence[Any],
    rewrite: Rewrite | None = None,
    *,
    fn_name: str,
) -> Run:
    """Evaluates ``fn(params, *args)`` with ``rewrite`` at its sites (module docstring).

    Args:
      fn: the model, ``fn(params, *args)``; close over anything static (``train=``).
      params: the parameter tree whose leaves define the sites.
      args: the traced inputs.
      rewrite: ``(site, invals) -> outvals | None``; ``None`` (or a ``None`` return) evaluates
        the site unchanged.
      fn_name: the public function, for the error message.

    Raises:
      ValueError: ``fn`` fails on these inputs (its error is kept as the cause).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [select.path_str(k) for k, _ in flat]
    leaves = [leaf for _, leaf in flat]

    def forward(leaves, args):
        return fn(jax.tree.unflatten(treedef, leaves), *args)

    try:
        closed, out_shape = jax.make_jaxpr(forward, return_shape=True)(leaves, list(args))
    except Exception as err:
        raise ValueError(
            f"{fn_name}: the model rejects its input ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:300]})"
        ) from err
    values = jax.tree.leaves((leaves, list(args)))
    shadows = [Chain(i, (), True) if i < len(leaves) else DATA for i in range(len(values))]
    interpreter = _Interpreter(paths, rewrite)
    outs, _ = interpreter.eval(closed.jaxpr, closed.consts, values, shadows)
    out = jax.tree.unflatten(jax.tree.structure(out_shape), outs)
    return Run(out, interpreter.sites, interpreter.hidden)
