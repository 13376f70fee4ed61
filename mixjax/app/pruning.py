"""Which kernels the image pipeline of ``mixjax run`` prunes, and how much, read off the model.

Every leaf that a matmul or a convolution consumes is a kernel (its
:class:`mixjax.layout.Layout`, from :func:`mixjax.layout.learn`, says so, and which axes it
contracts); tables that are gathered (embeddings), position embeddings that are added, biases and
norm scales are not. The kernels fall in three groups, each with its own final sparsity:

* the **output layer** (``compress.output_sparsity``): the kernel whose output features are the
  logits (:func:`output_kernel`);
* the other **matmul** kernels (``compress.sparsity``): hidden ``Dense`` layers, attention
  projections, MLPs;
* the **conv** kernels (``compress.conv_sparsity``), a ViT's patch embedding included.

The masks follow the layouts (``layouts=`` of :func:`mixjax.prune.magnitude`), so structured
masks group along the axes each kernel really contracts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mixjax import core, layout, prune, schedules, select
from mixjax.app import config as config_lib

__all__ = ["MASK_EVERY", "PRUNE_END", "groups", "output_kernel", "pruning"]

# The sparsity ramp ends here (fraction of the stage); the final masks are then fine-tuned while
# the learning rate decays to zero (a gentle ramp and a decayed fine-tune lose the least).
PRUNE_END = 0.4
MASK_EVERY = 10
_NAME = "mixjax.app.pipeline"


def output_kernel(forward: Callable[[Any, Any], Any], params: Any, x: Any, layouts: Any) -> str:
    """The path of the output layer's kernel: the matmul kernel whose output features are the
    logits.

    The rule is read off the model, not its layer names or ranks: the output kernel ``(..., C)``
    of ``C`` logits is the matmul kernel whose output feature ``k`` feeds logit ``k`` alone. So
    the gradient of logit 0 (summed over the examples ``x``) is zero at every output feature
    of that kernel but feature 0, and not zero there; a hidden kernel's features each reach
    every logit, so its gradient is not zero elsewhere (given examples that activate more
    than one hidden unit).

    Args:
      forward: ``(params, x) -> (N, C)`` logits in evaluation.
      params: the parameters (trained or freshly initialized).
      x: example inputs ``(N, ...)``, real data, so that hidden units are active.
      layouts: the layouts of ``params`` (:func:`mixjax.layout.learn`).

    Raises:
      ValueError: no kernel, or more than one, fits the rule (the message lists the matmul
        kernels with ``C`` output features).
    """
    classes = jax.eval_shape(forward, params, x).shape[-1]

    @jax.jit  # one compilation: op by op, a ResNet's backward pass costs seconds of dispatch
    def logit_zero_gradient(params):
        logits, pullback = jax.vjp(lambda p: forward(p, x), params)
        return pullback(jax.numpy.zeros_like(logits).at[..., 0].set(1.0))[0]

    grads = logit_zero_gradient(params)
    by_path = layout.by_path(_NAME, params, layouts)
    candidates, hits = [], []
    for path, grad in select.leaves_with_paths(jax.device_get(grads)):
        lay = by_path[path]
        if lay is None or lay.kind != "dense":
            continue
        view = np.asarray(layout.to_matrix(grad, lay))  # (*rest, contract, out)
        if view.shape[-1] != classes:
            continue
        candidates.append(path)
        if np.any(view[..., 0]) and not np.any(view[..., 1:]):
            hits.append(path)
    if len(hits) != 1:
        found = "none" if not hits else f"all of {hits}"
        raise ValueError(
            f"{_NAME}: cannot tell the output layer: of the matmul kernels with {classes} output "
            f"features ({candidates or 'none'}), the one whose feature k feeds logit k alone is "
            f"{found}"
        )
    return hits[0]


def groups(layouts: Any, output: str) -> dict[str, list[str]]:
    """The kernels' paths by group: ``{"output": [output], "matmul": [...], "conv": [...]}``
    (module docstring); leaves without a matmul or conv layout are in none."""
    flat = jax.tree_util.tree_flatten_with_path(layouts, is_leaf=layout.is_node)[0]
    kinds = {select.path_str(k): lay.kind for k, lay in flat if lay is not None}
    return {
        "output": [output],
        "matmul": [p for p, kind in kinds.items() if kind == "dense" and p != output],
        "conv": [p for p, kind in kinds.items() if kind == "conv"],
    }


def pruning(c: config_lib.Compress, layouts: Any, output: str) -> core.ParamTransform:
    """One gradual magnitude pruner per group of :func:`groups` with a positive final sparsity
    (a polynomial ramp to it over the first ``PRUNE_END`` of the ``c.prune_steps`` steps, masks
    refreshed every ``MASK_EVERY`` steps)."""
    sparsities = {"output": c.output_sparsity, "matmul": c.sparsity, "conv": c.conv_sparsity}
    end = max(MASK_EVERY + 1, int(c.prune_steps * PRUNE_END))
    pruners = [
        prune.magnitude(
            schedules.polynomial(0.0, sparsities[name], 0, end, frequency=MASK_EVERY),
            where=lambda path, leaf, paths=frozenset(paths): path in paths,
            update_every=MASK_EVERY,
            layouts=layouts,
        )
        for name, paths in groups(layouts, output).items()
        if paths and sparsities[name] > 0
    ]
    return core.chain(*pruners)
