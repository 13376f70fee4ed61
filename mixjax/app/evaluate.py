"""Running a ``mixjax run`` artifact: its model metadata, evaluation and integer-path timing.

The artifact :mod:`mixjax.app.pipeline` exports carries, in its manifest's ``"metadata"``::

    {"model": "lenet5", "num_classes": 10, "input_shape": [8, 8, 1],
     "preprocess": {"mean": 0.5, "std": 0.5},          # mixjax.data.normalize
     "activations": {"bits": 8, "ranges": {"Conv_0": [min, max], ...}}}

so :func:`evaluate` rebuilds the linen model (:func:`mixjax.models.create`), the activation
fake-quantizer with its QAT ranges, and the integer model (:mod:`mixjax.export.integer`) from
the file alone.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import data, export, models, quant

__all__ = ["NORMALIZE", "evaluate", "forwards", "metadata", "time_integer"]

_NAME = "mixjax.app.evaluate"
NORMALIZE = {"mean": 0.5, "std": 0.5}


def metadata(
    model: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    act: quant.ActivationQuant,
    act_state: dict[str, quant.ObserverState],
) -> dict[str, Any]:
    """The artifact metadata (module docstring) of a model and its activation ranges."""
    ranges = {p: [float(s.min), float(s.max)] for p, s in jax.device_get(act_state).items()}
    return {
        "model": model,
        "num_classes": int(num_classes),
        "input_shape": [int(n) for n in input_shape],
        "preprocess": dict(NORMALIZE),
        "activations": {"bits": int(act.grid.bits), "ranges": ranges},
    }


def _model(artifact: export.Artifact) -> tuple[Any, Any, quant.ActivationQuant, dict]:
    meta = artifact.metadata
    missing = [k for k in ("model", "num_classes", "activations") if k not in meta]
    if missing:
        raise ValueError(
            f"{_NAME}: the artifact has no {missing} metadata (was it made by `mixjax run`?)"
        )
    model = models.create(meta["model"], meta["num_classes"])
    act = quant.activation_quant(meta["activations"]["bits"])
    one = jnp.ones([], jnp.int32)
    act_state = {
        p: quant.ObserverState(jnp.float32(lo), jnp.float32(hi), one)
        for p, (lo, hi) in meta["activations"]["ranges"].items()
    }
    return model, artifact.params(), act, act_state


def forwards(artifact: export.Artifact) -> dict[str, Any]:
    """Jitted ``images -> logits`` forwards of the artifact's model on raw ``(N, H, W, C)``
    images (preprocessed inside): ``"float"`` (float activations), ``"compressed"``
    (activations fake-quantized with the stored ranges) and ``"integer"``
    (:func:`mixjax.export.integer_apply`).

    Raises:
      ValueError: the artifact lacks the metadata of :func:`metadata`.
    """
    model, params, act, act_state = _model(artifact)
    prep = artifact.metadata.get("preprocess", NORMALIZE)
    fn = lambda x: model.apply({"params": params}, x)  # noqa: E731
    int_model = export.integer_model(artifact, act, act_state)
    norm = lambda x: data.normalize(x, **prep)  # noqa: E731
    return {
        "float": jax.jit(lambda x: fn(norm(x))),
        "compressed": jax.jit(lambda x: act.apply(fn, act_state, norm(x))[0]),
        "integer": jax.jit(lambda x: export.integer_apply(fn, int_model, norm(x))),
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
