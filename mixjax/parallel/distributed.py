"""Multi-process runs on JAX's distributed runtime: the process half of :mod:`mixjax.parallel`.

Every process runs the same program: it calls :func:`initialize` before anything else touches
JAX, builds a mesh over every process's devices (:func:`mixjax.parallel.make_mesh`), loads only
its own consecutive part of each global batch (:func:`process_slice`) and passes that part to
the step wrappers, which assemble global arrays with ``jax.make_array_from_process_local_data``.
On CPU the processes exchange data through gloo collectives.

Example (two processes on one host, run once with ``MIXJAX_PROCESS_ID=0`` and once with ``1``)::

    # MIXJAX_COORDINATOR=127.0.0.1:1234 MIXJAX_NUM_PROCESSES=2 MIXJAX_PROCESS_ID=0 python train.py
    mixjax.parallel.initialize()
    mesh = mixjax.parallel.make_mesh()
    rows = mixjax.parallel.process_slice(global_batch)
    state, metrics = step(state, {k: v[rows] for k, v in batch.items()})
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax

from mixjax import _checks

__all__ = ["ENV_COORDINATOR", "ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "initialize", "process_slice"]

_INIT = "mixjax.parallel.initialize"
ENV_COORDINATOR = "MIXJAX_COORDINATOR"
ENV_NUM_PROCESSES = "MIXJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MIXJAX_PROCESS_ID"


def _resolve(name: str, value: Any, env: str, cast: type) -> Any:
    """The argument, else the environment variable; both given and different is an error."""
    raw = os.environ.get(env)
    from_env = None
    if raw is not None:
        try:
            from_env = cast(raw)
        except ValueError:
            raise ValueError(f"{_INIT}: environment {env}={raw!r} is not a valid {name}") from None
    if value is not None and from_env is not None and value != from_env:
        raise ValueError(
            f"{_INIT}: {name}={value!r} does not match the environment {env}={raw!r}; the "
            "launcher and the program disagree"
        )
    return value if value is not None else from_env


def _wait_for_coordinator(coordinator: str, process_id: int, num_processes: int, timeout_s: int):
    """Polls the coordinator's port: the runtime aborts the process when it is unreachable."""
    host, port = coordinator.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{_INIT}: process {process_id} of {num_processes} could not join the run: "
                    f"coordinator {coordinator} unreachable within timeout_s={timeout_s} ({err})"
                ) from None
            time.sleep(0.2)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
    heartbeat_timeout_s: int = 100,
    cpu_collectives: str | None = "gloo",
) -> None:
    """Joins this process to a multi-process run (``jax.distributed.initialize``).

    Call it first, before any other JAX call. Arguments left ``None`` come from the environment
    variables ``MIXJAX_COORDINATOR``, ``MIXJAX_NUM_PROCESSES`` and ``MIXJAX_PROCESS_ID``.

    Args:
      coordinator: ``"host:port"`` of process 0, which runs the coordination service.
      num_processes: the number of processes ``P >= 1``.
      process_id: this process's index in ``[0, P)``.
      timeout_s: seconds to wait for every process to join before raising.
      heartbeat_timeout_s: seconds without a heartbeat after which a process counts as dead.
        A process that dies mid-run then ends every survivor within about this bound (a dead
        coordinator, at once): JAX's coordination service logs ``Terminating process because
        the JAX distributed service detected fatal errors ... another task died`` (naming the
        tasks that ``stopped sending heartbeats``) and aborts the process (``SIGABRT``, exit
        status 134). It is a process exit, not a Python exception, by necessity: the survivor's
        main thread is blocked inside a collective waiting for the dead peer (gloo on CPU has
        no timeout of its own), where no Python code runs. Launchers should treat a non-zero
        exit of any process as the run's failure.
      cpu_collectives: the CPU collectives implementation (``"gloo"``; ``None`` leaves JAX's
        setting alone); ignored by GPU/TPU backends.

    Raises:
      ValueError: a missing or malformed setting, a ``process_id`` out of range, an argument that
        disagrees with its environment variable, or a runtime whose process count differs from
        ``num_processes``.
      RuntimeError: the coordinator was not reached (or not every process joined) within
        ``timeout_s``.
    """
    coordinator = _resolve("coordinator", coordinator, ENV_COORDINATOR, str)
    num_processes = _resolve("num_processes", num_processes, ENV_NUM_PROCESSES, int)
    process_id = _resolve("process_id", process_id, ENV_PROCESS_ID, int)
    if coordinator is None or ":" not in coordinator:
        raise ValueError(
            f"{_INIT}: coordinator must be 'host:port' (argument or {ENV_COORDINATOR}), "
            f"got {coordinator!r}"
        )
    num_processes = _checks.integer(_INIT, "num_processes", num_processes, 1)
    process_id = _checks.integer(_INIT, "process_id", process_id, 0)
    if process_id >= num_processes:
        raise ValueError(
            f"{_INIT}: process_id must be in [0, num_processes={num_processes}), "
            f"got process_id={process_id}"
        )
    timeout_s = _checks.integer(_INIT, "timeout_s", timeout_s, 1)
    heartbeat_timeout_s = _checks.integer(_INIT, "heartbeat_timeout_s", heartbeat_timeout_s, 1)
    if process_id != 0:
        _wait_for_coordinator(coordinator, process_id, num_processes, timeout_s)
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(num_processes),
            process_id=int(process_id),
            initialization_timeout=int(timeout_s),
            heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        )
    except Exception as err:  # the runtime raises XlaRuntimeError / RuntimeError variants
        raise RuntimeError(
            f"{_INIT}: process {process_id} of {num_processes} could not join the run at "
            f"coordinator {coordinator} within timeout_s={timeout_s}: {err}"
        ) from err
    if jax.process_count() != num_processes:
        raise ValueError(
            f"{_INIT}: the runtime has {jax.process_count()} processes, expected "
            f"num_processes={num_processes}"
        )


def process_slice(global_size: int) -> slice:
    """The rows of a global batch of ``global_size`` examples this process loads.

    Process ``i`` of ``P`` loads examples ``[i * global_size // P, (i + 1) * global_size // P)``,
    the part :func:`mixjax.parallel.shard_batch` expects from it.

    Raises:
      ValueError: ``global_size`` not a positive multiple of the process count.
    """
    count, index = jax.process_count(), jax.process_index()
    if not _checks.is_integer(global_size) or global_size < 1 or global_size % count:
        raise ValueError(
            f"mixjax.parallel.process_slice: the global batch size must be a positive multiple "
            f"of the process count {count}, got {global_size!r}"
        )
    size = int(global_size) // count
    return slice(index * size, (index + 1) * size)
