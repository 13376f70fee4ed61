"""Launching the worker processes of the multi-process tests. Not a test module; ``import
processes`` from a test.

Every process is a subprocess with a wall-clock timeout, so a broken runtime fails the test
instead of hanging CI.
"""

import os
import socket
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
DISTRIBUTED_ENV = ("MIXJAX_COORDINATOR", "MIXJAX_NUM_PROCESSES", "MIXJAX_PROCESS_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(coordinator: str | None, num: int = 1, pid: int = 0) -> dict:
    """The environment of process ``pid`` of ``num`` on CPU, with the tests' directory on the
    path; without a coordinator, a single-process run (the distributed variables removed)."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["JAX_PLATFORMS"] = "cpu"
    # The workers import the tests' helpers (replica_setup) as the tests do.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [TESTS, env.get("PYTHONPATH")]))
    if coordinator is not None:
        env.update(
            MIXJAX_COORDINATOR=coordinator,
            MIXJAX_NUM_PROCESSES=str(num),
            MIXJAX_PROCESS_ID=str(pid),
        )
    return env


def launch(args: list, env: dict) -> subprocess.Popen:
    """``python *args`` with ``env``, its stdout and stderr together in one text pipe."""
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def launch_group(script, outputs: list) -> list[subprocess.Popen]:
    """``python script outputs[i]`` as process ``i`` of ``len(outputs)``, coordinated on a free
    local port."""
    coordinator = f"127.0.0.1:{free_port()}"
    return [
        launch([script, out], worker_env(coordinator, len(outputs), pid))
        for pid, out in enumerate(outputs)
    ]


def finish(procs: list, timeout: float) -> list[str]:
    """Waits for every process (killing them all afterwards, whatever happened) and fails the
    test, with the ends of their logs, unless all exited 0. Returns the logs."""
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs
