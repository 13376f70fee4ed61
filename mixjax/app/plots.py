"""PNG plots of a ``mixjax run`` report (matplotlib, Agg backend: no display needed).

:func:`write_all` draws four figures into the output directory (:func:`files`):

* ``training.png``: training loss and accuracy (next-token accuracy for a language model) per
  step, one colour per stage (a moving mean over ``max(1, steps // 100)`` steps, since single
  batches are noisy);
* ``sparsity.png``: the fraction of exact zeros of every leaf of the artifact;
* ``weights.png``: the histogram of the largest kernel's dense (float-stage) weights with the
  artifact's distinct values (its codebook or integer grid) as vertical lines;
* ``<metric>_bytes.png``: the report's held-out metric of each stage against its stored bytes
  (log scale): ``accuracy_bytes.png`` (test accuracy) for an image run, ``val_loss_bytes.png``
  (validation loss) for a language model.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mixjax import _files, export, select  # noqa: E402
from mixjax.export import kinds  # noqa: E402

__all__ = ["METRICS", "files", "metric_bytes", "sparsity", "training", "weights", "write_all"]

# The held-out metric of each kind of run: its axis label and its scale on that axis.
METRICS = {"accuracy": ("test accuracy (%)", 100.0), "val_loss": ("validation loss (nats)", 1.0)}


def files(metric: str) -> tuple[str, ...]:
    """The file names :func:`write_all` writes for a report of ``metric`` (a key of
    :data:`METRICS`)."""
    return ("training.png", "sparsity.png", "weights.png", f"{metric}_bytes.png")


def _save(fig: Any, path: str) -> None:
    """Writes ``fig`` as a PNG atomically (:func:`mixjax._files.write_atomic`) and closes it."""
    try:
        _files.write_atomic(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def _smooth(values: np.ndarray) -> np.ndarray:
    width = max(1, len(values) // 100)
    return np.convolve(values, np.ones(width) / width, mode="valid")


def training(history: dict[str, list[dict[str, float]]], path: str) -> None:
    """Loss and accuracy per global step (stages laid end to end)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    offset = 0
    for name, rows in history.items():
        if not rows:
            continue
        steps = offset + np.array([r["step"] for r in rows])
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            smooth = _smooth(np.array([r[key] for r in rows]))
            ax.plot(steps[len(steps) - len(smooth) :], smooth, label=name)
        offset = int(steps[-1])
    for ax, label in zip(axes, ("training loss", "training accuracy"), strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    _save(fig, path)


def sparsity(layers: list[dict[str, Any]], path: str) -> None:
    """Bar chart of each leaf's fraction of zeros."""
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(layers)), 3.6))
    names = [row["path"] for row in layers]
    ax.bar(range(len(names)), [100 * row["sparsity"] for row in layers], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("zeros (%)")
    ax.set_ylim(0, 100)
    ax.set_title("sparsity per leaf")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


# Up to this many distinct stored values are drawn as lines (a codebook); more (a grid scaled per
# channel or group has one per scale) as a second histogram.
_MAX_LINES = 256


def weights(dense: Any, artifact: export.Artifact, path: str) -> None:
    """Histogram of the largest kernel's float-stage weights and its stored values: the shared
    values as lines where there are at most 256 (a codebook), else their histogram."""
    kernels = [(p, np.asarray(x)) for p, x in select.leaves_with_paths(dense) if np.ndim(x) >= 2]
    name, values = max(kernels, key=lambda item: item[1].size)
    final = kinds.decode(artifact.record(name), artifact.arrays)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(values.ravel(), bins=100, color="tab:gray", alpha=0.8, label="dense weights")
    centroids = np.unique(final)
    if len(centroids) > _MAX_LINES:
        ax.hist(np.ravel(final), bins=100, color="tab:red", alpha=0.5, label="stored values")
    for i, c in enumerate(centroids if len(centroids) <= _MAX_LINES else ()):
        ax.axvline(c, color="tab:red", lw=1, label="shared values" if i == 0 else None)
    ax.set_title(f"{name}: {values.size} weights, {len(centroids)} distinct stored values")
    ax.set_xlabel("weight")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def metric_bytes(stages: list[dict[str, Any]], path: str, metric: str = "accuracy") -> None:
    """The held-out ``metric`` of each stage (a key of :data:`METRICS`) against its stored
    bytes, one labelled point per stage."""
    label, scale = METRICS[metric]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    nbytes = [s["bytes"] for s in stages]
    values = [scale * s[metric] for s in stages]
    ax.plot(nbytes, values, "o-", color="tab:blue")
    for i, (s, x, y) in enumerate(zip(stages, nbytes, values, strict=True)):
        # alternate above/below: stages that share a size (compressed, integer) stay legible
        offset = (4, 4) if i % 2 == 0 else (4, -12)
        ax.annotate(s["stage"], (x, y), textcoords="offset points", xytext=offset, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes (dense float32; then artifact file)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_all(
    report: dict[str, Any],
    dense: Any,
    artifact: export.Artifact,
    out: str,
    metric: str = "accuracy",
) -> list[str]:
    """Draws the four figures of the module docstring into ``out``; returns their file names.

    Args:
      report: the run's report (its ``"history"``, ``"layers"`` and ``"stages"``, each stage
        with ``"bytes"`` and ``metric``).
      dense: the float-stage parameters.
      artifact: the exported artifact.
      out: the output directory.
      metric: the stages' held-out metric, a key of :data:`METRICS`.
    """
    names = files(metric)
    training(report["history"], os.path.join(out, names[0]))
    sparsity(report["layers"], os.path.join(out, names[1]))
    weights(dense, artifact, os.path.join(out, names[2]))
    metric_bytes(report["stages"], os.path.join(out, names[3]), metric)
    return list(names)
