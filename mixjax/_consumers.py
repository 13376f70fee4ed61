"""Which operations consume each input of a jaxpr, and along which of the input's axes.

The tracer behind :func:`mixjax.layout.learn`: it follows tracked values (a parameter leaf, and
what casts, reshapes, transposes, broadcasts and shape-keeping elementwise ops make of it) through
a jaxpr and its nested jaxprs, and records every ``dot_general``, ``conv_general_dilated`` and
``gather`` that consumes one as a :class:`Use` of the leaf's axes. A tracked value is ``(leaf
index, axes)``: for each of the value's axes, the tuple of leaf axes it stands for (several after
a reshape merges axes, none for a broadcast axis).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from jax.extend import core as jex_core

__all__ = ["DATA", "ELEMENTWISE", "Tracer", "Use"]

# The mark of a value computed from the model's inputs (an activation) in a Tracer's env.
DATA = "data"


class Use(NamedTuple):
    """One consumer of a leaf: its kind and the leaf axes in each role (as in ``Layout``)."""

    kind: str
    contract: tuple[int, ...]
    out: tuple[int, ...]
    window: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()


ELEMENTWISE = frozenset(
    "abs add and clamp convert_element_type copy copy_p cos div exp floor ceil integer_pow "
    "imag log logistic max min mul ne eq ge gt le lt neg nextafter or pow real reduce_precision "
    "rem round rsqrt select_n sign sin sqrt square stop_gradient sub tanh xor not erf "
    "optimization_barrier".split()
)
_SAME_AXES = frozenset("slice dynamic_slice pad rev concatenate dynamic_update_slice".split())


def _union(axes: tuple[tuple[int, ...], ...], which: Any) -> tuple[int, ...]:
    return tuple(sorted({a for i in which for a in axes[i]}))


def _reshape(axes: tuple, old: tuple[int, ...], new: tuple[int, ...]) -> tuple:
    """The leaf axes of each axis of ``reshape(value, new)``: axes grouped by equal products."""
    result: list[tuple[int, ...]] = []
    i = j = 0
    while j < len(new):
        group_old, group_new = [i], [j]
        size_old = old[i] if i < len(old) else 1
        size_new = new[j]
        while size_old != size_new:
            if size_old < size_new and i + 1 < len(old):
                i += 1
                group_old.append(i)
                size_old *= old[i]
            else:
                j += 1
                group_new.append(j)
                size_new *= new[j]
        mapped = _union(axes, [k for k in group_old if k < len(old)])
        result.extend(mapped for _ in group_new)
        i, j = i + 1, j + 1
    return tuple(result)


def _sub_jaxprs(eqn: Any) -> list[Any]:
    """The jaxprs a call-like equation runs on exactly its operands (jit, custom_jvp, remat)."""
    found = []
    for value in eqn.params.values():
        jaxpr = getattr(value, "jaxpr", value)
        if isinstance(jaxpr, jex_core.Jaxpr) and len(jaxpr.invars) == len(eqn.invars):
            found.append(jaxpr)
    return found[:1]


class Tracer:
    """Walks jaxprs; ``uses[i]`` and ``unknown[i]`` collect what consumes leaf ``i``."""

    def __init__(self, num_leaves: int):
        self.uses: list[list[Use]] = [[] for _ in range(num_leaves)]
        self.unknown: list[set[str]] = [set() for _ in range(num_leaves)]

    def walk(self, jaxpr: Any, env: dict) -> dict:
        for eqn in jaxpr.eqns:
            known = [env.get(v) if _is_var(v) else None for v in eqn.invars]
            data = any(t is DATA for t in known)
            tracked = [(k, t) for k, t in enumerate(known) if t is not None and t is not DATA]
            if tracked:
                self.equation(eqn, tracked, env, data)
            if data:
                for v in eqn.outvars:
                    env.setdefault(v, DATA)
        return env

    def call(self, jaxpr: Any, inputs: list, eqn_outvars: list | None, env: dict) -> None:
        inner = {v: t for v, t in zip(jaxpr.invars, inputs, strict=True) if t is not None}
        inner = self.walk(jaxpr, inner)
        if eqn_outvars is None:
            return
        for outer, v in zip(eqn_outvars, jaxpr.outvars, strict=True):
            if _is_var(v) and v in inner:
                env[outer] = inner[v]

    def equation(self, eqn: Any, tracked: list, env: dict, data: bool = False) -> None:
        name, params = eqn.primitive.name, eqn.params
        out = eqn.outvars[0] if eqn.outvars else None
        if name == "dot_general":
            (contract_l, contract_r), (batch_l, batch_r) = params["dimension_numbers"]
            for k, (leaf, axes) in tracked:
                contract, batch = (contract_l, batch_l) if k == 0 else (contract_r, batch_r)
                free = [i for i in range(len(axes)) if i not in (*contract, *batch)]
                use = Use("dense", _union(axes, contract), _union(axes, free))
                self.uses[leaf].append(use._replace(batch=_union(axes, batch)))
        elif name == "conv_general_dilated":
            for k, (leaf, axes) in tracked:
                if k != 1:
                    self.unknown[leaf].add("conv_general_dilated input")
                    continue
                out_dim, in_dim, *window = params["dimension_numbers"].rhs_spec
                use = Use("conv", _union(axes, [in_dim]), _union(axes, [out_dim]))
                self.uses[leaf].append(use._replace(window=_union(axes, window)))
        elif name == "gather":
            for k, (leaf, axes) in tracked:
                if k != 0:
                    continue
                rows = params["dimension_numbers"].start_index_map
                rest = [i for i in range(len(axes)) if i not in rows]
                self.uses[leaf].append(Use("embedding", _union(axes, rest), _union(axes, rows)))
        elif name in ELEMENTWISE:
            # The weight itself, transformed (a mask, a cast, fake quantization), has the result's
            # shape; a bias or a norm scale meeting the activations (``data``) is not followed
            # further, even where it has their shape (a batch of one).
            same = [t for k, t in tracked if eqn.invars[k].aval.shape == out.aval.shape]
            same = [] if data else same
            if same:
                env[out] = same[0]
        elif name in _SAME_AXES and not data:  # a class token concatenated to data is data
            env[out] = tracked[0][1]
        elif name == "transpose":
            leaf, axes = tracked[0][1]
            env[out] = (leaf, tuple(axes[i] for i in params["permutation"]))
        elif name == "reshape":
            (leaf, axes), old = tracked[0][1], eqn.invars[0].aval.shape
            env[out] = (leaf, _reshape(axes, tuple(old), tuple(out.aval.shape)))
        elif name == "broadcast_in_dim":
            leaf, axes = tracked[0][1]
            new: list[tuple[int, ...]] = [() for _ in out.aval.shape]
            for i, d in enumerate(params["broadcast_dimensions"]):
                new[d] = axes[i]
            env[out] = (leaf, tuple(new))
        elif name == "squeeze":
            leaf, axes = tracked[0][1]
            env[out] = (leaf, tuple(a for i, a in enumerate(axes) if i not in params["dimensions"]))
        elif name == "expand_dims":
            leaf, axes = tracked[0][1]
            new = list(axes)
            for d in sorted(params["dimensions"]):
                new.insert(d, ())
            env[out] = (leaf, tuple(new))
        elif name.startswith("reduce_") or name in ("argmax", "argmin", "cumsum"):
            pass  # statistics of a weight (a norm, a threshold), not the weight itself
        elif name == "scan":
            self.scan(eqn, env)
        elif name == "cond":
            inputs = [env.get(v) if _is_var(v) else None for v in eqn.invars[1:]]
            for branch in params["branches"]:
                self.call(branch.jaxpr, inputs, None, env)
        elif name == "while":
            self.loop(eqn, env)
        elif _sub_jaxprs(eqn):
            inputs = [env.get(v) if _is_var(v) else None for v in eqn.invars]
            self.call(_sub_jaxprs(eqn)[0], inputs, eqn.outvars, env)
        else:
            for _, (leaf, _axes) in tracked:
                self.unknown[leaf].add(name)

    def scan(self, eqn: Any, env: dict) -> None:
        consts, carry = eqn.params["num_consts"], eqn.params["num_carry"]
        inputs = []
        for k, v in enumerate(eqn.invars):
            t = env.get(v) if _is_var(v) else None
            if t not in (None, DATA) and k >= consts + carry:  # stacked: the body sees a slice
                t = (t[0], t[1][1:])
            inputs.append(t if k < consts or k >= consts + carry else None)
        self.call(eqn.params["jaxpr"].jaxpr, inputs, None, env)

    def loop(self, eqn: Any, env: dict) -> None:
        params = eqn.params
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        values = [env.get(v) if _is_var(v) else None for v in eqn.invars]
        body_inputs = values[n_cond : n_cond + n_body] + [None] * (len(values) - n_cond - n_body)
        self.call(params["body_jaxpr"].jaxpr, body_inputs, None, env)


def _is_var(v: Any) -> bool:
    return isinstance(v, jex_core.Var)
