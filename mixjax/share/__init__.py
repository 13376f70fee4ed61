"""Weight sharing: clustering weights into few values, and merging near-duplicate units.

* :mod:`~mixjax.share.clustering`: :func:`cluster` (Deep Compression fixed mode with trained
  centroids, TFMOT reassign mode, sparsity-preserving);
* :mod:`~mixjax.share.codebooks`: :func:`codebook` / :func:`reconstruct`, a clustered leaf as
  shared values and indices;
* :mod:`~mixjax.share.kmeans`: 1-D k-means on device (``mixjax.share.kmeans.fit``), with its
  summaries and initializations in :mod:`~mixjax.share.kmeans_init`;
* :mod:`~mixjax.share.merge`: :func:`merge_similar` ties near-duplicate output units,
  :func:`remove_merged` removes them for real;
* :mod:`~mixjax.share.tying`: :func:`tie`, shared values with the shared value's gradient.
"""

from mixjax.share import kmeans
from mixjax.share.clustering import ClusterState, cluster
from mixjax.share.codebooks import Codebook, codebook, reconstruct
from mixjax.share.merge import MergeReport, MergeState, merge_similar, remove_merged
from mixjax.share.tying import straight_through, tie

__all__ = [
    "ClusterState",
    "Codebook",
    "MergeReport",
    "MergeState",
    "cluster",
    "codebook",
    "kmeans",
    "merge_similar",
    "reconstruct",
    "remove_merged",
    "straight_through",
    "tie",
]
