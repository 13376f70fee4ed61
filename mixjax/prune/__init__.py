"""Pruning: masks chosen by magnitude, randomly or by saliency, in any sparsity structure.

* :mod:`~mixjax.prune.engine`: the pruning transforms :func:`magnitude`, :func:`random`,
  :func:`saliency` (one mask engine, three scores), and :func:`sparsify` for a trained tree;
* :mod:`~mixjax.prune.structures`: :class:`Unstructured`, :class:`NM`, :class:`Block`,
  :class:`Channel`;
* :mod:`~mixjax.prune.selection`: exact k-smallest selection (radix select) and ERK sparsities;
* :mod:`~mixjax.prune.stats`: :func:`summary`, the zeros per leaf.
"""

from mixjax.prune.engine import SCOPES, PruneState, magnitude, random, saliency, sparsify
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
    "magnitude",
    "random",
    "saliency",
    "sparsify",
    "summary",
]
