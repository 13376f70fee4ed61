"""Asynchronous training: delayed (stale) gradients with DC-ASGD compensation, and replicas.

* :mod:`~mixjax.delay.delayed_updates`: :func:`delayed`, an optax wrapper that applies the
  gradient of step ``t - tau`` at step ``t`` (fixed, per-leaf or random staleness);
* :mod:`~mixjax.delay.replicas`: :func:`replica_delayed` and :func:`async_data_parallel`,
  data-parallel replicas as asynchronous workers, each with its own staleness;
* :mod:`~mixjax.delay.fifo`: the FIFOs and the stale step both are built from;
* :mod:`~mixjax.delay.compensation`: DC-ASGD (:data:`DEFAULT_LAM`).
"""

from mixjax.delay.compensation import COMPENSATIONS, DEFAULT_LAM
from mixjax.delay.delayed_updates import DelayState, delayed
from mixjax.delay.replicas import (
    ReplicaDelayState,
    async_data_parallel,
    replica_delayed,
    replica_specs,
)

__all__ = [
    "COMPENSATIONS",
    "DEFAULT_LAM",
    "DelayState",
    "ReplicaDelayState",
    "async_data_parallel",
    "delayed",
    "replica_delayed",
    "replica_specs",
]
