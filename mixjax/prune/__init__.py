"""Pruning: masks chosen by magnitude, randomly or by saliency, in any sparsity structure.

* :mod:`~mixjax.prune.engine`: the pruning transforms :func:`magnitude`, :func:`random`,
  :func:`saliency` (one mask engine, three scores), :func:`sparsify` for a trained tree, and
  :func:`fixed` for given masks (one-shot results);
* :mod:`~mixjax.prune.structures`: :class:`Unstructured`, :class:`NM`, :class:`Block`,
  :class:`Channel`;
* :mod:`~mixjax.prune.second_order`: :func:`sparsegpt`, one-shot second-order pruning from
  calibration data (optionally joint with quantization), and its per-layer solver
  :func:`sparsegpt_solve`;
* :mod:`~mixjax.prune.scored`: :func:`wanda` (score ``|W| * ||X_k||_2``) and
  :func:`layer_magnitude` (score ``|W|``), one-shot pruning per output feature, and
  :func:`wanda_solve`; methods for :func:`mixjax.oneshot.compress`;
* :mod:`~mixjax.prune.selection`: exact k-smallest selection (radix select, and per column)
  and ERK sparsities;
* :mod:`~mixjax.prune.stats`: :func:`summary`, the zeros per leaf.
"""

from mixjax.prune.engine import SCOPES, PruneState, fixed, magnitude, random, saliency, sparsify
from mixjax.prune.scored import layer_magnitude, wanda, wanda_solve
from mixjax.prune.second_order import sparsegpt, sparsegpt_solve
from mixjax.prune.stats import LeafSparsity, SparsitySummary, summary
from mixjax.prune.structures import NM, Block, Channel, Structure, Unstructured

__all__ = [
    "NM",
    "SCOPES",
    "Block",
    "Channel",
    "LeafSparsity",
    "PruneState",
    "SparsitySummary",
    "Structure",
    "Unstructured",
    "fixed",
    "layer_magnitude",
    "magnitude",
    "random",
    "saliency",
    "sparsegpt",
    "sparsegpt_solve",
    "sparsify",
    "summary",
    "wanda",
    "wanda_solve",
]
