"""Training: the composed, jitted step from a batch to new parameters and metrics.

* :mod:`~mixjax.train.step`: :func:`make_train_step` (augment, compressed view, STE gradients,
  any optax optimizer, constraints, K steps per dispatch) and :func:`make_eval_step`, for
  image batches (``"image"``) and token batches (``"tokens"``), with an optional per-position
  ``"weight"`` (:data:`BATCH_KEYS`);
* :mod:`~mixjax.train.state`: :class:`TrainState` and :func:`init_train_state`;
* :mod:`~mixjax.train.apply`: the model interface :class:`ApplyFn`, :func:`linen_apply`,
  :func:`nnx_apply` (model state, RNG streams, a deterministic eval) and :func:`stream_keys`;
* :mod:`~mixjax.train.losses`: :func:`softmax_cross_entropy` for logits of any leading dims,
  :func:`weighted_mean` and the step's :func:`metrics` (with perplexity for sequences).
"""

from mixjax.train.apply import ApplyFn, linen_apply, nnx_apply, stream_keys
from mixjax.train.losses import metrics, softmax_cross_entropy, weighted_mean
from mixjax.train.state import TrainState, init_train_state, trained
from mixjax.train.step import BATCH_KEYS, INPUT_KEYS, TrainStep, make_eval_step, make_train_step

__all__ = [
    "BATCH_KEYS",
    "INPUT_KEYS",
    "ApplyFn",
    "TrainState",
    "TrainStep",
    "init_train_state",
    "linen_apply",
    "make_eval_step",
    "make_train_step",
    "metrics",
    "nnx_apply",
    "softmax_cross_entropy",
    "stream_keys",
    "trained",
    "weighted_mean",
]
