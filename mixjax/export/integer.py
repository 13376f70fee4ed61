"""Integer inference: every matmul, convolution and lookup of an artifact's integer weights.

:func:`integer_model` reads an artifact (:mod:`mixjax.export`) and, optionally, calibrated or
QAT activation ranges (:func:`mixjax.quant.activation_quant`, 8 bits at most), traces the model
once to find its *sites* (each ``dot_general``, ``conv_general_dilated`` or ``gather`` of a
parameter, found in the jaxpr: linen ``Dense``, ``DenseGeneral``, ``Conv``, ``Embed`` and its
tied ``attend``, NNX ``Linear``, ``Einsum`` and ``Conv`` alike) and decides per site how it
runs; :func:`mixjax.export.integer_apply` (:mod:`mixjax.export.integer_run`) runs the model so.
The ways, in :attr:`IntModel.table` (:func:`integer_table` prints it):

* ``"int8 x int8 -> int32"``: a symmetric kernel of <= 8 bits whose scale is constant along
  the contraction (per tensor, or per output feature), with an observed input::

      q_x = quantize(x)                                   # int8, scale s_x, zero point z_x
      acc = dot(q_x, q_w) - z_x * sum(q_w)                # int32, the site's own dimension
                                                          #   numbers (exact)
      y = acc * (s_x * s_w)                               # float32

  equal to the fake-quant forward ``dot(dq(q_x), dq(q_w))`` up to float32 summation order.
  Convolutions pad ``q_x`` with ``z_x`` (the code of 0.0) and run unpadded, so the correction
  is exact at the borders too;
* ``"intB weights, float matmul"`` (``"intB gG ..."`` with group-wise scales): the integer codes
  dequantized into the site's float op, the input fake-quantized where it was observed; the way
  for weight-only int8/int4 language models, for group-wise or asymmetric kernels, and for
  kernels above 8 bits;
* ``"intB table lookup"``: a ``gather`` of the integer codes, dequantized by the gathered
  row scales (an out-of-range index still reads NaN where the model's gather fills);
* ``"float"``: the model's own op on the artifact's float values (the input fake-quantized where
  observed), with the reason: a kernel that is not quantized, one transformed by a
  value-changing op before the matmul, a convolution with input dilation, a backend whose XLA
  cannot compile int8 ops. Leaves used where no site can be intercepted (inside ``scan``) are
  listed too. ``integer_model`` warns once, naming every site that runs in float.

Non-finite activations: an example whose site input holds NaN/Inf gets NaN outputs from an int8
site (integers cannot carry NaN).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, _intercept, _markdown
from mixjax.export import kinds, records
from mixjax.export.artifact import Artifact
from mixjax.quant import grids
from mixjax.quant.activations import OUTPUT, ActivationQuant
from mixjax.quant.observers import ObserverState

__all__ = [
    "DEQUANTIZED",
    "INT8",
    "KERNELS",
    "LOOKUP",
    "InputQuant",
    "IntModel",
    "IntSite",
    "IntWeight",
    "SiteRow",
    "integer_model",
    "integer_table",
]

_PREPARE = "mixjax.export.integer_model"
INT8 = "int8 x int8 -> int32"
DEQUANTIZED = "weights dequantized"
LOOKUP = "table lookup"
KERNELS = ("measure", "int8", "dequantized")


class InputQuant(NamedTuple):
    """Activation quantization of one site input (or the output).

    Attributes:
      scale: float32 ``()``.
      zero_point: float32 ``()``, integer-valued.
      qmin, qmax: int32 ``()``, the activation grid.
    """

    scale: jax.Array
    zero_point: jax.Array
    qmin: jax.Array
    qmax: jax.Array


class IntWeight(NamedTuple):
    """A parameter leaf's integer codes: ``float = (codes - zero_point) * scale``.

    Attributes:
      codes: int8 (int16 above 8 bits), the leaf's shape.
      scale: float32, compact (block-broadcast against ``codes``,
        :func:`mixjax.quant.grids.expand_scale`).
      zero_point: int32 of ``scale``'s shape.
      input_scale: float32 factors per input feature (AWQ's; values ``(codes - zero_point) *
        scale * input_scale``), the leaf's shape with 1 on its output axes, or ``None``.
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    input_scale: jax.Array | None = None


class IntSite(NamedTuple):
    """What one site needs at run time (``None`` where its way does not use it).

    Attributes:
      inputs: the input's :class:`InputQuant`, ``None`` where the input was not observed.
      rescale: float32, ``s_x * s_w`` shaped to broadcast against the site's output (int8).
      correction: int32 like ``rescale``, ``z_x * sum(q_w)`` over the contraction (int8).
    """

    inputs: InputQuant | None
    rescale: jax.Array | None
    correction: jax.Array | None


class SiteRow(NamedTuple):
    """One row of :attr:`IntModel.table`: site name, leaf path, kind, way, reason."""

    site: str
    path: str
    kind: str
    way: str
    why: str


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weights", "sites", "output"],
    meta_fields=["table"],
)
class IntModel(NamedTuple):
    """Everything :func:`integer_apply` needs besides the model and its float parameters.

    A pytree (pass it to a jitted function); ``table`` is static.

    Attributes:
      weights: ``{leaf path: IntWeight}`` for the leaves some site runs from integer codes.
      sites: ``{site name: IntSite}`` for every site found.
      output: the :class:`InputQuant` of the model output, or ``None``.
      table: the :class:`SiteRow` s, in site order.
    """

    weights: dict[str, IntWeight]
    sites: dict[str, IntSite]
    output: InputQuant | None
    table: tuple[SiteRow, ...]


def integer_table(int_model: IntModel) -> str:
    """``int_model.table`` as a markdown table (site, leaf, kind, way, why)."""
    columns = [("site", "<"), ("leaf", "<"), ("kind", "<"), ("runs as", "<"), ("why", "<")]
    return _markdown.table(columns, [tuple(row) for row in int_model.table])


def _input_quant(act: ActivationQuant, obs: ObserverState) -> InputQuant:
    scale, zero_point = act.qparams(obs)
    return InputQuant(scale, zero_point, np.int32(act.grid.qmin), np.int32(act.grid.qmax))


def _integer_kernel(
    record: records.Record, arrays: dict[str, np.ndarray]
) -> tuple[records.IntTensor, int] | None:
    """The integer codes and bits of a record, or ``None`` where it has no integer grid.

    Clustered-then-quantized kernels are stored as ``"codebook"`` records (indices into shared
    values) whose values are themselves an ``"int"`` record: the kernel is exactly
    ``(q - zero_point) * scale`` on the values' grid, so it is re-encoded on that grid
    (:func:`mixjax.export.records.int_encoder` verifies exactness).
    """
    if record.get("kind") == "int":
        return records.decode_int(record, arrays), record["bits"]
    values = record.get("values")
    if record.get("kind") != "codebook" or not isinstance(values, dict):
        return None
    if values.get("kind") != "int":
        return None
    grid = records.decode_int(values, arrays)
    own: dict[str, np.ndarray] = {}

    def store(array: np.ndarray) -> str:
        name = f"k{len(own)}"
        own[name] = np.asarray(array)
        return name

    kernel = kinds.decode(record, arrays)
    encoded = records.int_encoder(grid.scale, grid.zero_point, fn_name=_PREPARE)(
        record["path"], kernel, store
    )
    return records.decode_int(encoded, own), encoded["bits"]


@functools.cache
def _integer_ops_compile(backend: str) -> bool:
    lhs = jax.ShapeDtypeStruct((1, 3, 3, 1), jnp.int8)
    rhs = jax.ShapeDtypeStruct((3, 3, 1, 1), jnp.int8)
    dims = ("NHWC", "HWIO", "NHWC")

    def ops(a, b):
        conv = jax.lax.conv_general_dilated(
            a, b, (1, 1), "VALID", dimension_numbers=dims, preferred_element_type=jnp.int32
        )
        dot = jax.lax.dot_general(
            a.reshape(1, 9),
            b.reshape(9, 1),
            (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.int32,
        )
        return conv, dot

    try:
        jax.jit(ops).lower(lhs, rhs).compile()  # on the default backend, named by `backend`
    except Exception:  # noqa: BLE001 - any compile failure means: no integer kernels here
        return False
    return True


class _Dims(NamedTuple):
    """A site's weight axes: contracted, batch, free (in output order), and the output shape
    (as a list of axis sizes, 1 where the activation's axes go) the weight's factors take."""

    contract: tuple[int, ...]
    keep: tuple[int, ...]
    out_shape: tuple[int, ...]


def _dims(site: _intercept.Site, weight_shape: tuple[int, ...], out_ndim: int) -> _Dims:
    params = site.eqn.params
    if site.kind == "conv":
        rhs_spec, out_spec = (
            params["dimension_numbers"].rhs_spec,
            params["dimension_numbers"].out_spec,
        )
        shape = [1] * out_ndim
        shape[out_spec[1]] = weight_shape[rhs_spec[0]]
        return _Dims((rhs_spec[1], *rhs_spec[2:]), (rhs_spec[0],), tuple(shape))
    (contract_l, contract_r), (batch_l, batch_r) = params["dimension_numbers"]
    contract, batch = (contract_r, batch_r) if site.weight == 1 else (contract_l, batch_l)
    free = tuple(a for a in range(len(weight_shape)) if a not in (*contract, *batch))
    act_free = out_ndim - len(batch) - len(free)
    sizes = [weight_shape[a] for a in free]
    middle = ([1] * act_free + sizes) if site.weight == 1 else (sizes + [1] * act_free)
    shape = [weight_shape[a] for a in batch] + middle
    return _Dims(tuple(contract), (*batch, *free), tuple(shape))


def _per_output(values: np.ndarray, dims: _Dims, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """``values`` (the weight operand's shape) reduced over the contraction, in output order."""
    moved = np.transpose(values, (*dims.keep, *dims.contract))
    axes = tuple(range(len(dims.keep), moved.ndim))
    return reduce(moved, axis=axes).reshape(dims.out_shape)


def _int8_site(
    site: _intercept.Site, weight: IntWeight, inputs: InputQuant, out_ndim: int
) -> tuple[IntSite | None, str]:
    """The int8 way's factors for ``site``, or ``(None, why not)``."""
    if not _integer_ops_compile(jax.default_backend()):
        return None, f"XLA on backend {jax.default_backend()!r} cannot compile int8 dot/conv"
    if site.kind == "conv":
        params = site.eqn.params
        if any(d != 1 for d in params["lhs_dilation"]) or params["batch_group_count"] != 1:
            return None, "a convolution with input dilation or batch groups"
    codes = np.asarray(site.chain.replay(weight.codes))
    scale = np.asarray(
        site.chain.replay(
            np.broadcast_to(
                grids.expand_scale(weight.scale, weight.codes.shape), weight.codes.shape
            )
        )
    )
    dims = _dims(site, codes.shape, out_ndim)
    lo, hi = _per_output(scale, dims, np.min), _per_output(scale, dims, np.max)
    if not np.array_equal(lo, hi):
        return None, "its scales vary along the contraction (group-wise)"
    colsum = _per_output(codes.astype(np.int64), dims, np.sum)
    rescale = jnp.asarray(inputs.scale * lo, jnp.float32)
    correction = jnp.asarray(np.int32(inputs.zero_point) * colsum.astype(np.int32))
    return IntSite(inputs, rescale, correction), ""


def _weight(record: records.Record, arrays: dict[str, np.ndarray]) -> tuple[IntWeight, int] | None:
    found = _integer_kernel(record, arrays)
    if found is None:
        return None
    t, bits = found
    if not np.all(np.isfinite(t.scale) & (t.scale > 0)):
        raise ValueError(
            f"{_PREPARE}: leaf {record['path']!r} has scales that are not finite and positive "
            f"(shape {t.scale.shape}); the artifact is damaged"
        )
    codes = t.q.astype(np.int8 if bits <= 8 else np.int16)
    factors = None if t.input_scale is None else jnp.asarray(t.input_scale)
    weight = IntWeight(jnp.asarray(codes), jnp.asarray(t.scale), jnp.asarray(t.zero_point), factors)
    return weight, bits


def _way(site, weight, bits, record, inputs, out_ndim) -> tuple[str, str, IntSite]:
    """How ``site`` runs: ``(way, why, IntSite)``."""
    plain = IntSite(inputs, None, None)
    if weight is None:
        why = "not quantized in the artifact" if record is not None else "not in the artifact"
        return "float", why, plain
    if not site.chain.exact:
        return "float", "a value-changing op transforms the kernel before it is used", plain
    label = f"int{bits}{_group_label(weight)}"
    dequantized = f"{label} {DEQUANTIZED}"
    if weight.input_scale is not None:
        return dequantized, "per-input-feature (AWQ) scales fold into the kernel", plain
    if site.kind == "embedding" and not site.chain.steps:
        return f"{label} {LOOKUP}", "", plain
    if site.kind == "embedding":
        return dequantized, "the table is reshaped before the lookup", plain
    if inputs is None:
        return dequantized, "input not observed (weight-only)", plain
    if bits > 8 or np.any(np.asarray(weight.zero_point)):
        return dequantized, "the int8 path needs symmetric kernels of <= 8 bits", plain
    factors, why = _int8_site(site, weight, inputs, out_ndim)
    if factors is None:
        return dequantized, why, plain
    return INT8, "", factors


def _group_label(weight: IntWeight) -> str:
    """``" g32"`` for scales in groups of 32 along an axis, ``""`` otherwise."""
    shape = np.shape(weight.scale)
    padded = (1,) * (weight.codes.ndim - len(shape)) + shape  # aligned as in broadcasting
    pairs = zip(weight.codes.shape, padded, strict=True)
    return "".join(f" g{n // s}" for n, s in pairs if s not in (1, n))


def integer_model(
    fn: Callable[..., Any],
    artifact: Artifact,
    *args: Any,
    act: ActivationQuant | None = None,
    act_state: dict[str, ObserverState] | None = None,
    like: Any = None,
    kernels: str = "int8",
    rounds: int = 7,
) -> IntModel:
    """Prepares integer inference of ``fn`` from an artifact (module docstring).

    Where a site can run int8 x int8 -> int32, ``kernels`` chooses between that and its
    integer weights dequantized into the site's float op: both equal the fake-quant forward up
    to float32 rounding, neither changes the artifact. ``"measure"`` keeps int8 where it makes
    the whole model faster, timed at the shapes of ``args`` (:mod:`mixjax.export.integer_choice`:
    give an example of the batch size you will run); the table's ``why`` gives the times.

    Args:
      fn: the model, ``fn(params, *args)``, e.g. ``lambda p, x: module.apply({"params": p}, x)``
        or ``lambda s, x: nnx.merge(graphdef, s)(x)``; the same function
        :func:`integer_apply` runs.
      artifact: from :func:`mixjax.export.compress` on the params ``fn`` takes (or loaded).
      *args: example inputs (only traced: ``jax.ShapeDtypeStruct`` works).
      act: the activation quantizer (``bits <= 8``); ``None`` for weight-only inference.
      act_state: its calibrated (or QAT-trained) observer state (with ``act``).
      like: the params' tree structure ``fn`` takes, when the artifact does not hold it (a
        loaded artifact of an ``nnx.State``; :meth:`mixjax.export.Artifact.params`).
      kernels: ``"int8"`` (int8 wherever possible, the default), ``"measure"`` (int8 where it
        makes the model faster, timed here) or ``"dequantized"`` (never int8).
      rounds: timing rounds per comparison (``"measure"``), at least 1.

    Raises:
      ValueError: an unknown ``kernels``, ``rounds < 1``; activation bits above 8; ``act``
        without ``act_state``; an observer that has seen nothing (run calibration first);
        observers of sites the model does not have; a damaged artifact record (the message
        names the leaf); a model that rejects ``args``.
    """
    if kernels not in KERNELS:
        raise ValueError(f"{_PREPARE}: kernels must be one of {KERNELS}, got {kernels!r}")
    rounds = _checks.integer(_PREPARE, "rounds", rounds, 1)
    if (act is None) != (act_state is None):
        raise ValueError(f"{_PREPARE}: give act and act_state together (or neither)")
    act_state = dict(act_state or {})
    if act is not None and act.grid.bits > 8:
        raise ValueError(
            f"{_PREPARE}: integer inference needs activations of <= 8 bits, got {act.grid.bits}"
        )
    unobserved = [path for path, obs in act_state.items() if int(obs.count) == 0]
    if unobserved:
        raise ValueError(
            f"{_PREPARE}: sites {unobserved} have no activation range (count == 0); run "
            "mixjax.quant.calibrate or QAT first"
        )
    params = artifact.params(like)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    found: dict[str, Any] = {}

    def trace():
        def record_out(site, invals):
            found[site.name] = len(site.eqn.outvars[0].aval.shape)

        traced = _intercept.run(fn, shapes, args, record_out, fn_name=_PREPARE)
        found["__run__"] = traced

    jax.eval_shape(trace)
    traced = found.pop("__run__")
    extra = sorted(set(act_state) - set(found) - {OUTPUT})
    if extra:
        raise ValueError(
            f"{_PREPARE}: act_state has sites {extra} this model does not have (its sites: "
            f"{sorted(found)}); was it made by act.init on this model?"
        )
    by_path = {leaf["path"]: leaf for leaf in artifact.leaves}
    weights, sites, rows, loaded, capable = {}, {}, [], {}, []
    for site in traced.sites:
        record = by_path.get(site.path)
        if site.path not in loaded:
            loaded[site.path] = None if record is None else _weight(record, artifact.arrays)
        weight, bits = loaded[site.path] or (None, 0)
        obs = act_state.get(site.name)
        inputs = None if obs is None else _input_quant(act, obs)
        way, why, int_site = _way(site, weight, bits, record, inputs, found[site.name])
        if way == INT8 and kernels != "int8":
            dequantized = f"int{bits}{_group_label(weight)} {DEQUANTIZED}"
            if kernels == "dequantized":
                way, why, int_site = (
                    dequantized,
                    "kernels='dequantized'",
                    IntSite(inputs, None, None),
                )
            else:
                key = (site.kind, str(site.eqn.params), tuple(str(v.aval) for v in site.eqn.invars))
                capable.append((len(rows), key, dequantized))
        if way != "float":
            weights[site.path] = weight
        sites[site.name] = int_site
        rows.append(SiteRow(site.name, site.path, site.kind, way, why))
    rows += [
        SiteRow("-", path, "?", "float", f"used inside {why}")
        for path, why in traced.hidden.items()
    ]
    floats = [row.site if row.site != "-" else row.path for row in rows if row.way == "float"]
    if floats:
        warnings.warn(f"{_PREPARE}: these run in float: {floats}", stacklevel=2)
    output = act_state.get(OUTPUT)
    int_model = IntModel(
        weights, sites, None if output is None else _input_quant(act, output), tuple(rows)
    )
    if capable:
        # integer_choice runs the model and imports this module's types: a late import.
        from mixjax.export.integer_choice import measure

        int_model = measure(fn, params, args, int_model, capable, rounds)
    return int_model
