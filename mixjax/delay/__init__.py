"""Asynchronous training: delayed (stale) gradients with DC-ASGD compensation, and replicas.

* :mod:`~mixjax.delay.delayed_updates`: :func:`delayed`, an optax wrapper that applies the
  gradient of step ``t - tau`` at step ``t`` (fixed, per-leaf or random staleness);
* :mod:`~mixjax.delay.replicas`: :func:`replica_delayed` and :func:`async_data_parallel`,
  data-parallel replicas as asynchronous workers, each with its own staleness;
* :mod:`~mixjax.delay.fifo`: the FIFOs and the stale step both are built from;
* :mod:`~mixjax.delay.compensation`: DC-ASGD (:data:`DEFAULT_LAM`);
* :mod:`~mixjax.delay.lowcomm`: :func:`diloco`, low-communication training: replicas with their
  own parameters take ``H`` inner steps, then average pseudo-gradients for an outer step
  (Streaming DiLoCo's fragments, delayed and compensated outer steps);
* :mod:`~mixjax.delay.diloco_replicas`: :func:`diloco_data_parallel`, :func:`replicate_state`
  and :func:`synced_state`, DiLoCo replicas on a mesh, each with its own train state;
* :mod:`~mixjax.delay.streaming`: the fragments and their sync schedule;
* :mod:`~mixjax.delay.messages`: the messages: :class:`Quantize` and :class:`TopK`
  compression with error feedback, and :func:`message_bytes`.
"""

from mixjax.delay.compensation import COMPENSATIONS, DEFAULT_LAM
from mixjax.delay.delayed_updates import DelayState, delayed
from mixjax.delay.diloco_replicas import diloco_data_parallel, replicate_state, synced_state
from mixjax.delay.lowcomm import DiLoCoState, default_outer, diloco
from mixjax.delay.messages import Quantize, TopK, message_bytes
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
    "DiLoCoState",
    "Quantize",
    "ReplicaDelayState",
    "TopK",
    "async_data_parallel",
    "default_outer",
    "delayed",
    "diloco",
    "diloco_data_parallel",
    "message_bytes",
    "replica_delayed",
    "replica_specs",
    "replicate_state",
    "synced_state",
]
