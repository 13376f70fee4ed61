"""Parallelism: meshes and shardings, synchronous data/model-parallel steps, multi-process runs.

* :mod:`~mixjax.parallel.mesh`: :func:`make_mesh`, model-parallel rules (:func:`param_specs`),
  shardings of every train-state leaf (:func:`state_shardings`, :func:`shard_state`),
  :func:`shard_batch`;
* :mod:`~mixjax.parallel.steps`: :func:`data_parallel` (``jax.sharding``), :func:`shard_map_step`,
  :func:`pmap_step` (:func:`replicate` / :func:`unreplicate`);
* :mod:`~mixjax.parallel.per_replica`: :func:`replica_apply`, the model of a synchronous
  replica, and the per-replica machinery the wrappers share;
* :mod:`~mixjax.parallel.distributed`: :func:`initialize` and :func:`process_slice` for
  multi-process runs (gloo collectives on CPU).

Asynchronous replicas are :func:`mixjax.delay.async_data_parallel`; an example of a sharded
step is in :mod:`~mixjax.parallel.steps`.
"""

from mixjax.parallel.distributed import initialize, process_slice
from mixjax.parallel.mesh import (
    DATA,
    MODEL,
    Rules,
    batch_spec,
    make_mesh,
    param_specs,
    put,
    shard_batch,
    shard_state,
    state_shardings,
    state_specs,
)
from mixjax.parallel.per_replica import ReplicaApply, replica_apply
from mixjax.parallel.steps import data_parallel, pmap_step, replicate, shard_map_step, unreplicate

__all__ = [
    "DATA",
    "MODEL",
    "ReplicaApply",
    "Rules",
    "batch_spec",
    "data_parallel",
    "initialize",
    "make_mesh",
    "param_specs",
    "pmap_step",
    "process_slice",
    "put",
    "replica_apply",
    "replicate",
    "shard_batch",
    "shard_map_step",
    "shard_state",
    "state_shardings",
    "state_specs",
    "unreplicate",
]
