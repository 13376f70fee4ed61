"""One-shot compression from calibration data, layer by layer: :func:`compress`.

A trained model, a few hundred calibration samples and a :class:`mixjax.calibrate.Method`
(:func:`mixjax.quant.gptq`, :func:`mixjax.quant.rtn`, :func:`mixjax.prune.sparsegpt`,
:func:`mixjax.prune.wanda`, :func:`mixjax.prune.layer_magnitude`), no retraining. Each selected
layer (a leaf consumed by a matmul or convolution) is solved on its ``(K, O)`` matrix view from
the statistics of its inputs (:mod:`mixjax.calibrate`), one compiled solve per layer shape.

Sequential mode (the default, as GPTQ and SparseGPT do it) visits the layers in the order the
model evaluates them and gathers each layer's statistics from the inputs the model produces with
the layers before it already compressed, so later layers correct for earlier errors. Layers
that read the very same input (the query, key and value projections of one attention) are
solved from one pass. Memory stays bounded by one such group's statistics; the calibration
batches are read once per group. ``sequential=False`` gathers every layer's statistics from the
original model in one pass (more memory: all layers' statistics at once).

The result is exactly what mixjax's transforms represent: :attr:`OneShot.transform` is
:func:`mixjax.prune.fixed` with the chosen masks and/or :func:`mixjax.quant.fake_quant` with the
chosen scales (kept fixed), chained, and ``transform.apply(result.params, result.state)``
returns ``result.params`` bit for bit. So the result fine-tunes with
:func:`mixjax.train.make_train_step` keeping masks and grids (``transform.init`` returns the
one-shot state), exports with :func:`mixjax.export.compress` (packed int4 included) and runs in
integer inference.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import _checks, _markdown, calibrate, prune, quant, select
from mixjax import layout as layout_lib
from mixjax.calibrate import LayerStats, Method
from mixjax.core import ParamTransform, chain
from mixjax.quant.weights import FakeQuantState, scale_shape, selected_weights

__all__ = ["LayerReport", "OneShot", "compress", "table"]

_NAME = "mixjax.oneshot.compress"


class LayerReport(NamedTuple):
    """How one layer came out.

    Attributes:
      path: the leaf's path.
      shape: its ``(K, O)`` matrix view.
      error: the layer's relative reconstruction error ``||X W - X W'||^2 / ||X W||^2`` on the
        calibration inputs it was solved from (from the statistics; ``nan`` for a method that
        reads none).
      sparsity: the fraction of zeros in the new weights.
      seconds: the time of its statistics pass (shared by a group) and solve.
    """

    path: str
    shape: tuple[int, int]
    error: float
    sparsity: float
    seconds: float


class OneShot(NamedTuple):
    """What :func:`compress` returns.

    Attributes:
      params: the compressed parameter tree (same structure and dtypes).
      transform: the transform that represents it (module docstring).
      state: ``transform.init(params)``: the masks and scales the method chose.
      layers: one :class:`LayerReport` per compressed layer, in the order solved.
    """

    params: Any
    transform: ParamTransform
    state: Any
    layers: tuple[LayerReport, ...]


def table(layers: Iterable[LayerReport]) -> str:
    """The per-layer reports as a markdown table."""
    return _markdown.table(
        [("layer", "<"), ("K x O", ">"), ("error", ">"), ("sparsity", ">"), ("s", ">")],
        [
            (
                r.path,
                f"{r.shape[0]}x{r.shape[1]}",
                f"{r.error:.4g}",
                f"{r.sparsity:.1%}",
                f"{r.seconds:.2f}",
            )
            for r in layers
        ],
    )


@jax.jit
def _relative_error(w: jax.Array, new: jax.Array, stats: LayerStats) -> jax.Array:
    delta = new - w
    hi = jax.lax.Precision.HIGHEST
    lost = jnp.sum(delta * jnp.matmul(stats.gram, delta, precision=hi))
    kept = jnp.sum(w * jnp.matmul(stats.gram, w, precision=hi))
    return lost / jnp.maximum(kept, jnp.finfo(jnp.float32).tiny)


def _input_key(site: Any) -> Any:
    """What identifies a site's input within the traced model (the jaxpr variable)."""
    return site.eqn.invars[1 - site.weight] if site.kind == "dense" else site.eqn.invars[0]


def _groups(order: list[str], uses: dict[str, list[Any]], sequential: bool) -> list[list[str]]:
    """The layers in evaluation order, grouped: all at once without ``sequential``; else runs of
    consecutive single-use layers that read the same input."""
    if not sequential:
        return [order]
    groups: list[list[str]] = []
    previous = None
    for path in order:
        key = _input_key(uses[path][0]) if len(uses[path]) == 1 else object()
        if groups and key is previous:
            groups[-1].append(path)
        else:
            groups.append([path])
        previous = key
    return groups


def _selected(fn_name: str, params: Any, where: select.Where, found: dict, method: Method):
    """The chosen leaves' paths, checked: floating and finite (:func:`selected_weights`, whose
    default is the kernels a matmul or convolution consumes), consumed by a matmul or conv
    (:func:`mixjax.calibrate.matrix_layout`), the group size dividing their group axis."""
    chosen = selected_weights(fn_name, params, where, False, found)
    flat = select.leaves_with_paths(params)
    paths = [p for (p, _), c in zip(flat, jax.tree.leaves(chosen), strict=True) if c]
    if not paths:
        raise ValueError(f"{fn_name}: where= selects no leaf to compress")
    for path, leaf in flat:
        if path in paths:
            calibrate.matrix_layout(fn_name, path, leaf, found[path])
    if method.quant is not None and method.quant.group_size is not None:
        chosen_paths = set(paths)
        selected_weights(
            fn_name, params, lambda p, _: p in chosen_paths, True, found, method.quant.group_size
        )
    return paths


def compress(
    method: Method,
    fn: Callable[..., Any],
    params: Any,
    batches: Iterable[Any],
    *,
    where: select.Where = None,
    layouts: Any = None,
    sequential: bool = True,
    progress: bool = False,
) -> OneShot:
    """Compresses the layers of ``fn``'s ``params`` one shot with ``method`` (module docstring).

    Args:
      method: from a factory: :func:`mixjax.quant.gptq`, :func:`mixjax.prune.sparsegpt`, ...
      fn: the model's inference forward, ``fn(params, *args)``; close over the rest
        (``lambda p, x: module.apply({"params": p, "batch_stats": bs}, x, train=False)``, or for
        NNX ``lambda s, x: nnx.merge(graphdef, s, rest)(x)``).
      params: the trained parameter tree.
      batches: calibration batches, each the inputs of ``fn`` after ``params`` (a tuple, or one
        array); read once per layer group in sequential mode, so kept as a list.
      where: which leaves to compress (:mod:`mixjax.select`); default: the floating kernels a
        matmul or convolution consumes (not embedding tables). A chosen leaf that no matmul or
        convolution consumes is an error.
      layouts: the params' layouts (:func:`mixjax.layout.learn`); default: learned from ``fn``
        on the first batch.
      sequential: gather each layer's statistics from the model with the layers before it
        already compressed (default); else all from the original model in one pass.
      progress: show a progress bar over the layer groups (tqdm).

    Returns:
      A :class:`OneShot`: the compressed params, the transform and state representing them,
      and one :class:`LayerReport` per layer.

    Raises:
      TypeError: ``method`` is not a :class:`mixjax.calibrate.Method`.
      ValueError: no batches; batches the model rejects; a chosen leaf no calibration input
        reaches (the message names it) or holding NaN/Inf; a group size that does not divide a
        chosen leaf's group axis; a method's own checks (e.g. N:M on a layer whose input size
        ``m`` does not divide).
    """
    _checks.instance(_NAME, "method", method, Method, "a mixjax.calibrate.Method")
    sequential = _checks.boolean(_NAME, "sequential", sequential)
    batches = [calibrate.as_args(b) for b in batches]
    if not batches:
        raise ValueError(f"{_NAME}: no calibration batches (batches= is empty)")
    if layouts is None:
        layouts = layout_lib.learn(fn, params, *batches[0])
    found = layout_lib.by_path(_NAME, params, layouts)
    paths = _selected(_NAME, params, where, found, method)
    all_sites, _ = calibrate.sites(fn, params, batches[0], fn_name=_NAME)
    uses = {p: [s for s in all_sites if s.path == p] for p in paths}
    order = sorted(paths, key=lambda p: all_sites.index(uses[p][0]) if uses[p] else -1)
    flat = dict(select.leaves_with_paths(params))
    views = {p: calibrate.matrix_layout(_NAME, p, flat[p], found[p]) for p in paths}
    solve = jax.jit(method.solve)
    groups = _groups(order, uses, sequential)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415  (optional, loaded only when asked)

        groups = tqdm(groups, desc=f"{method.name}: layer groups")
    current = dict(flat)
    masks, scales, zero_points, input_scales, reports = {}, {}, {}, {}, []
    for group in groups:
        start = time.perf_counter()
        stats = {}
        if method.uses_inputs:
            tree = _rebuild(params, current)
            stats = calibrate.capture(
                fn, tree, batches, layouts=layouts, paths=group, fn_name=_NAME
            )
        passed = time.perf_counter() - start
        for path in group:
            t0 = time.perf_counter()
            leaf = flat[path]
            w = layout_lib.to_matrix(jnp.asarray(leaf, jnp.float32), views[path])
            solution = solve(w, stats.get(path))
            shape = np.shape(leaf)
            current[path] = layout_lib.from_matrix(solution.weight, views[path], shape).astype(
                jnp.result_type(leaf)
            )
            if solution.mask is not None:
                masks[path] = layout_lib.from_matrix(solution.mask, views[path], shape)
            if solution.scale is not None:
                spec = method.quant
                to = scale_shape(leaf, True, found[path], spec.group_size)
                scales[path] = layout_lib.from_matrix(solution.scale, views[path], to)
                zero_points[path] = layout_lib.from_matrix(solution.zero_point, views[path], to)
            if solution.input_scale is not None:
                rows = tuple(1 if a in views[path].out else n for a, n in enumerate(shape))
                factors = solution.input_scale[:, None]
                input_scales[path] = layout_lib.from_matrix(factors, views[path], rows)
            error = float(_relative_error(w, solution.weight, stats[path])) if stats else np.nan
            sparsity = float(jnp.mean(solution.weight == 0))
            seconds = time.perf_counter() - t0 + passed / len(group)
            reports.append(LayerReport(path, tuple(w.shape), error, sparsity, seconds))
    new_params = _rebuild(params, current)
    transform = _transform(method, params, layouts, masks, scales, zero_points, input_scales)
    return OneShot(new_params, transform, transform.init(new_params), tuple(reports))


def _rebuild(params: Any, by_path: dict[str, Any]) -> Any:
    paths = [p for p, _ in select.leaves_with_paths(params)]
    return jax.tree.unflatten(jax.tree.structure(params), [by_path[p] for p in paths])


def _transform(method, params, layouts, masks, scales, zero_points, input_scales) -> ParamTransform:
    """:func:`mixjax.prune.fixed` of the masks and/or :func:`mixjax.quant.fake_quant` with the
    scales, chained (prune first: the quantizer sees the zeros, which stay zero)."""
    paths = [p for p, _ in select.leaves_with_paths(params)]
    mirror = lambda found: jax.tree.unflatten(  # noqa: E731
        jax.tree.structure(params), [found.get(p) for p in paths]
    )
    parts = []
    if method.prunes:
        parts.append(prune.fixed(mirror(masks)))
    if method.quant is not None:
        spec = method.quant
        parts.append(
            quant.fake_quant(
                spec.bits,
                symmetric=spec.symmetric,
                group_size=spec.group_size,
                narrow_range=spec.narrow_range,
                scale="absmax" if spec.symmetric else "minmax",
                layouts=layouts,
                scales=FakeQuantState(
                    mirror(scales),
                    mirror(zero_points),
                    mirror(input_scales) if input_scales else None,
                ),
            )
        )
    return parts[0] if len(parts) == 1 else chain(*parts)
