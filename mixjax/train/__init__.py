"""Training: the composed, jitted step from a batch to new parameters and metrics.

* :mod:`~mixjax.train.step`: :func:`make_train_step` (augment, compressed view, STE gradients,
  any optax optimizer, constraints, K steps per dispatch) and :func:`make_eval_step`;
* :mod:`~mixjax.train.state`: :class:`TrainState` and :func:`init_train_state`;
* :mod:`~mixjax.train.apply`: the model interface :class:`ApplyFn`, :func:`linen_apply`,
  :func:`nnx_apply`;
* :mod:`~mixjax.train.losses`: :func:`softmax_cross_entropy` and the step's metrics.
"""

from mixjax.train.apply import ApplyFn, linen_apply, nnx_apply
from mixjax.train.losses import metrics, softmax_cross_entropy
from mixjax.train.state import TrainState, init_train_state, trained
from mixjax.train.step import BATCH_KEYS, TrainStep, make_eval_step, make_train_step

__all__ = [
    "BATCH_KEYS",
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
    "trained",
]
