"""Running a ``mixjax run`` artifact: its model metadata, evaluation and integer-path timing.

The artifact :mod:`mixjax.app.pipeline` exports carries, in its manifest's ``"metadata"``::

    {"model": "lenet5", "num_classes": 10, "input_shape": [8, 8, 1],
     "sizes": {},                                      # mixjax.models.create's, e.g. {"width": 4}
     "preprocess": {"mean": 0.5, "std": 0.5},          # mixjax.data.normalize
     "activations": {"bits": 8, "ranges": {"Conv_0/kernel": [min, max], ...}}}

so :func:`evaluate` rebuilds the linen model (:func:`mixjax.models.create`), the activation
fake-quantizer with its QAT ranges, and the integer model (:mod:`mixjax.export.integer`) from
the file alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import data, export, models, quant, select
from mixjax.data import MAX_CLASSES
from mixjax.export import encoding

__all__ = [
    "MAX_INPUT_ELEMENTS",
    "MAX_SIZE",
    "NORMALIZE",
    "evaluate",
    "forwards",
    "integer_model",
    "metadata",
    "time_integer",
]

_NAME = "mixjax.app.evaluate"
NORMALIZE = {"mean": 0.5, "std": 0.5}


def metadata(
    model: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    act: quant.ActivationQuant,
    act_state: dict[str, quant.ObserverState],
    *,
    sizes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The artifact metadata (module docstring) of a model, its sizes
    (:func:`mixjax.models.create`'s; none: the defaults) and its activation ranges."""
    ranges = {p: [float(s.min), float(s.max)] for p, s in jax.device_get(act_state).items()}
    return {
        "model": model,
        "num_classes": int(num_classes),
        "input_shape": [int(n) for n in input_shape],
        "sizes": {k: int(v) for k, v in (sizes or {}).items()},
        "preprocess": dict(NORMALIZE),
        "activations": {"bits": int(act.grid.bits), "ranges": ranges},
    }


_REQUIRED = ("model", "num_classes", "activations")
MAX_INPUT_ELEMENTS = 1 << 24
# The largest model size metadata may name (a width, a depth): bounds what a file can allocate.
MAX_SIZE = 1 << 16


def _bad(key: str, expected: str, value: Any) -> ValueError:
    return ValueError(
        f"{_NAME}: metadata {key!r} must be {expected}, got {encoding.short_repr(value)}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A JSON number that is finite as a float32 (what the forwards compute in)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= float(np.finfo(np.float32).max)  # False for NaN too


def _preprocess(meta: dict[str, Any], channels: int) -> dict[str, Any]:
    prep = meta.get("preprocess", NORMALIZE)
    expected = f"{{'mean': m, 'std': s}} with finite floats or {channels} per channel, std > 0"
    if not isinstance(prep, dict) or not set(prep) <= {"mean", "std"}:
        raise _bad("preprocess", expected, prep)
    for key, value in prep.items():
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) != channels:
            raise _bad("preprocess", expected, prep)
        if not all(_is_real(v) and (key == "mean" or v > 0) for v in values):
            raise _bad("preprocess", expected, prep)
    return prep


def _activations(meta: dict[str, Any]) -> tuple[quant.ActivationQuant, dict]:
    spec = meta["activations"]
    if not isinstance(spec, dict) or not {"bits", "ranges"} <= set(spec):
        raise _bad("activations", "{'bits': b, 'ranges': {site: [min, max]}}", spec)
    bits, ranges = spec["bits"], spec["ranges"]
    if not _is_int(bits) or not 2 <= bits <= 16:
        raise _bad("activations.bits", "an integer in [2, 16]", bits)
    if not isinstance(ranges, dict):
        raise _bad("activations.ranges", "a dict {site: [min, max]}", ranges)
    for path, pair in ranges.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(map(_is_real, pair))):
            raise _bad(f"activations.ranges.{path}", "[min, max], finite", pair)
        if pair[0] > pair[1]:
            raise _bad(f"activations.ranges.{path}", "[min, max] with min <= max", pair)
    one = jnp.ones([], jnp.int32)
    act_state = {
        p: quant.ObserverState(jnp.float32(lo), jnp.float32(hi), one)
        for p, (lo, hi) in ranges.items()
    }
    return quant.activation_quant(bits), act_state


def _check_leaves(records: Any, shapes: Any, what: str, noun: str = "parameter") -> None:
    """Raises naming the first leaf whose path or shape differs from the model's variables
    (``records``: the artifact's leaves or model-state leaves)."""
    stored = {leaf.get("path"): tuple(leaf.get("shape") or ()) for leaf in records}
    wanted = {path: tuple(s.shape) for path, s in select.leaves_with_paths(shapes)}
    for path, shape in wanted.items():
        if path not in stored:
            raise ValueError(
                f"{_NAME}: {what} has a {noun} {path!r} {shape}; the artifact has none"
            )
        if stored[path] != shape:
            raise ValueError(
                f"{_NAME}: leaf {path!r} has shape {stored[path]} in the artifact, {what} has "
                f"{shape}"
            )
    for path, shape in stored.items():
        if path not in wanted:
            name = encoding.short_repr(path, 200)  # a name from the file: maybe megabytes
            raise ValueError(f"{_NAME}: the artifact's leaf {name} {shape} is no {noun} of {what}")


def _sizes(meta: dict[str, Any], name: str) -> dict[str, int]:
    """The metadata's model sizes, checked: sizes ``name`` takes, integers in
    ``[1, MAX_SIZE]``, that the model accepts."""
    sizes = meta.get("sizes", {})
    takes = sorted(models.MODELS[name].sizes)
    expected = f"a dict of sizes of {name!r} ({takes}), integers in [1, {MAX_SIZE}]"
    if not isinstance(sizes, dict) or not all(
        key in takes and _is_int(value) and 1 <= value <= MAX_SIZE for key, value in sizes.items()
    ):
        raise _bad("sizes", expected, sizes)
    try:
        models.create(name, 2, **sizes)
    except (TypeError, ValueError) as err:
        raise _bad("sizes", f"sizes model {name!r} accepts ({err})", sizes) from None
    return sizes


def _model(artifact: export.Artifact) -> tuple[Any, Any, quant.ActivationQuant, dict, dict]:
    """The model, params, activation quantizer, its state and the preprocessing, all checked."""
    meta = artifact.metadata
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(
            f"{_NAME}: the artifact has no {missing} metadata (was it made by `mixjax run`?)"
        )
    if "input_shape" not in meta:
        raise ValueError(f"{_NAME}: the artifact has no 'input_shape' metadata")
    name, num_classes, input_shape = meta["model"], meta["num_classes"], meta["input_shape"]
    image = sorted(n for n, info in models.MODELS.items() if info.task == "image")
    if not isinstance(name, str) or name not in image:
        raise _bad("model", f"one of {image}", name)
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise _bad("num_classes", f"an integer in [1, {MAX_CLASSES}]", num_classes)
    if (
        not isinstance(input_shape, list)
        or not 1 <= len(input_shape) <= 8
        or not all(_is_int(n) and 1 <= n <= MAX_INPUT_ELEMENTS for n in input_shape)
        or math.prod(input_shape) > MAX_INPUT_ELEMENTS
    ):
        raise _bad(
            "input_shape",
            f"a list of 1 to 8 positive integers, at most {MAX_INPUT_ELEMENTS} elements",
            input_shape,
        )
    prep = _preprocess(meta, input_shape[-1])
    act, act_state = _activations(meta)
    model = models.create(name, num_classes, **_sizes(meta, name))
    what = f"model {name!r} ({num_classes} classes, input {input_shape})"
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
    except Exception as err:  # noqa: BLE001 - flax/JAX shape errors of many types
        raise ValueError(f"{_NAME}: {what} cannot be built: {err}") from None
    shapes = variables["params"]
    _check_leaves(artifact.leaves, shapes, what)
    others = {k: v for k, v in variables.items() if k != "params"}
    _check_leaves(artifact.state_leaves, others, what, "model variable (batch statistics)")
    state = artifact.model_state()  # the sites' discovery runs the model as evaluation does
    layers = act.init(lambda p, x: model.apply({"params": p, **state}, x), shapes, x)
    for path in [*layers, *act_state]:
        if (path in layers) != (path in act_state):
            raise ValueError(
                f"{_NAME}: metadata 'activations.ranges' must have one range per matmul/conv site "
                f"of {what} ({sorted(layers)}), got {sorted(act_state)}"
            )
    return model, artifact.params(), act, act_state, prep


def _apply(artifact: export.Artifact, model: Any) -> Any:
    model_state = artifact.model_state()
    return lambda p, x: model.apply({"params": p, **model_state}, x)


def integer_model(artifact: export.Artifact, *, batch: int = 256) -> export.IntModel:
    """The artifact's :func:`mixjax.export.integer_model`, each int8-capable site on the kernel
    measured faster at ``batch`` images (``kernels="measure"``; the table says which and why).

    Raises:
      ValueError: as :func:`forwards`.
    """
    model, _, act, act_state, _ = _model(artifact)
    example = jax.ShapeDtypeStruct((batch, *artifact.metadata["input_shape"]), jnp.float32)
    return export.integer_model(
        _apply(artifact, model), artifact, example, act=act, act_state=act_state, kernels="measure"
    )


def forwards(artifact: export.Artifact, *, int_model: export.IntModel | None = None) -> dict:
    """Jitted ``images -> logits`` forwards of the artifact's model on raw ``(N, H, W, C)``
    images (preprocessed inside): ``"float"`` (float activations), ``"compressed"``
    (activations fake-quantized with the stored ranges) and ``"integer"``
    (:func:`mixjax.export.integer_apply` with ``int_model``, default :func:`integer_model` at
    256 images).

    The metadata is validated first, and the artifact's leaves (paths and shapes) are compared
    with the parameters of the model it names (``jax.eval_shape`` of its ``init``).

    Raises:
      ValueError: the artifact lacks the metadata of :func:`metadata`; a field is malformed
        (an unknown model, ``num_classes`` not in ``[1, 2**20]``, ``input_shape`` not a list of
        positive integers, bad activation bits or ranges, bad preprocessing), naming the key;
        or a leaf differs from the model's parameters, naming it with both shapes.
    """
    model, params, act, act_state, prep = _model(artifact)
    fn = _apply(artifact, model)
    int_model = integer_model(artifact) if int_model is None else int_model
    norm = lambda x: data.normalize(x, **prep)  # noqa: E731
    return {
        "float": jax.jit(lambda x: fn(params, norm(x))),
        "compressed": jax.jit(lambda x: act.apply(fn, act_state, params, norm(x))[0]),
        "integer": jax.jit(lambda x: export.integer_apply(int_model, fn, params, norm(x))),
    }


def evaluate(
    artifact: export.Artifact, dataset: data.Dataset, *, fns: dict[str, Any] | None = None
) -> dict[str, float]:
    """Test accuracy of the artifact's model on ``dataset``.

    Args:
      artifact: from ``mixjax run`` (with metadata).
      dataset: the images and labels.
      fns: :func:`forwards` of the artifact, if already built (saves compiling them again).

    Returns:
      ``{"accuracy_compressed": ..., "accuracy_integer": ..., "accuracy_float_activations":
      ...}``: the reconstructed parameters with fake-quantized activations, on the integer
      path, and with float activations.

    Raises:
      ValueError: the artifact lacks the metadata of :func:`metadata`, or the dataset's images
        do not fit the model.
    """
    meta = artifact.metadata
    fns = forwards(artifact) if fns is None else fns
    shape = list(dataset.images.shape[1:])
    if "input_shape" in meta and shape != meta["input_shape"]:
        raise ValueError(
            f"{_NAME}: the model takes images of shape {meta['input_shape']}, the dataset "
            f"{dataset.name!r} has {shape}"
        )
    labels = np.asarray(dataset.labels)

    def acc(name):
        return float(np.mean(np.asarray(fns[name](dataset.images)).argmax(-1) == labels))

    return {
        "accuracy_compressed": acc("compressed"),
        "accuracy_integer": acc("integer"),
        "accuracy_float_activations": acc("float"),
    }


def time_integer(fns: dict[str, Any], images: Any, *, rounds: int = 30) -> dict[str, float]:
    """Median milliseconds per call of ``fns["float"]`` and ``fns["integer"]`` (from
    :func:`forwards`) on ``images``, runs interleaved (alternating order), after a warm-up call
    each; ``"speedup"`` is float time over integer time."""
    fns = {name: fns[name] for name in ("float", "integer")}
    x = jnp.asarray(images)
    times = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(x))
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            jax.block_until_ready(fns[name](x))
            times[name].append(time.perf_counter() - start)
    f, i = (float(np.median(times[n])) for n in names)
    return {"float_ms": 1e3 * f, "integer_ms": 1e3 * i, "speedup": f / i}
