"""Re-running a test module on forced CPU devices, in a subprocess.

JAX fixes its device count when it starts, so a module whose tests need ``n`` devices re-runs
itself once under ``--xla_force_host_platform_device_count=n`` (one JAX start for all of its
multi-device tests); in the parent process those tests skip, in the child the re-running test
skips.
"""

import os
import subprocess
import sys

CHILD = "MIXJAX_FORCED_DEVICES_CHILD"


def in_child() -> bool:
    """Whether this process is such a re-run."""
    return CHILD in os.environ


def rerun(path: str, devices: int, *, keyword: str | None = None, timeout: float = 400) -> str:
    """Runs pytest on ``path`` (optionally ``-k keyword``) on ``devices`` CPU devices.

    Returns the child's stdout; fails the calling test, with the child's output, if it fails.
    """
    env = {
        **os.environ,
        CHILD: "1",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    select = ["-k", keyword] if keyword else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select, path]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return done.stdout
