"""Tests of mixjax.parallel's multi-process runs: two processes on 127.0.0.1 with gloo.

Every multi-process run happens in subprocesses with wall-clock timeouts, so a broken runtime
fails the test instead of hanging CI.
"""

import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import processes
import pytest

from mixjax import parallel

# Shared by the workers and the single-process reference (exec'd in both).
SETUP = textwrap.dedent(
    """
    import replica_setup
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import mixjax
    from mixjax import prune, quant, train

    module = replica_setup.MLP()
    # jitted: one compile instead of one per eager op, in every process
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    transform = mixjax.chain(prune.magnitude(0.5), quant.fake_quant(8))
    tx = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.random((8, 4, 4, 1), np.float32),
         "label": rng.integers(0, 4, 8).astype(np.int32)}
        for _ in range(3)
    ]
    init = lambda p: train.init_train_state(p, tx, transform=transform, key=jax.random.key(1))
    state = jax.jit(init)(params)
    step = train.make_train_step(train.linen_apply(module), tx, transform=transform)
    """
)

WORKER = (
    textwrap.dedent(
        """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    from mixjax import parallel
    parallel.initialize(timeout_s=60, heartbeat_timeout_s=10)
    """
    )
    + SETUP
    + textwrap.dedent(
        """
    assert jax.process_count() == 2 and jax.device_count() == 4, jax.devices()
    mesh = parallel.make_mesh()
    step = parallel.data_parallel(step, mesh)
    rows = parallel.process_slice(8)
    losses = []
    for batch in batches:
        state, metrics = step(state, {k: v[rows] for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    leaves = [np.asarray(x.addressable_shards[0].data) for x in jax.tree.leaves(state.params)]
    np.savez(sys.argv[1], losses=np.array(losses), *leaves)
    """
    )
)


# Process argv[1] takes two steps of a data-parallel computation, then dies without a word (a
# crash, an OOM kill); the survivor goes on to the next step's collective and must not wait
# forever for it. (A tiny step: compiling the train step would only slow the test down.)
DYING_WORKER = WORKER.split("parallel.initialize(")[0] + textwrap.dedent(
    """
    parallel.initialize(timeout_s=60, heartbeat_timeout_s=HEARTBEAT_S)
    import time
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    split = NamedSharding(parallel.make_mesh(), P("data"))
    step = jax.jit(lambda x: x - jnp.mean(x))
    x = jax.make_array_from_process_local_data(split, np.arange(2.0))
    for i in range(1000):
        x = step(x)
        print(jax.process_index(), "step", i, float(jnp.sum(x)), flush=True)
        if i == 1 and jax.process_index() == int(sys.argv[1]):
            open(sys.argv[2], "w").write(str(time.time()))
            os._exit(3)
    """
)
HEARTBEAT_S = 3


def test_two_processes_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = processes.launch_group(script, [tmp_path / f"out{pid}.npz" for pid in range(2)])
    processes.finish(procs, timeout=150)

    scope = {}
    exec(SETUP, scope)
    state, step, batches = scope["state"], scope["step"], scope["batches"]
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    want = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    for pid in range(2):
        got = np.load(tmp_path / f"out{pid}.npz")
        np.testing.assert_allclose(got["losses"], losses, rtol=1e-5, atol=1e-6)
        for i, leaf in enumerate(want):
            assert got[f"arr_{i}"].dtype == leaf.dtype
            np.testing.assert_allclose(got[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)


def test_dead_process_fails_the_survivor_in_bounded_time(tmp_path):
    """Two runs at once: in one a worker dies, in the other the coordinator (process 0) does."""
    script = tmp_path / "worker.py"
    script.write_text(DYING_WORKER.replace("HEARTBEAT_S", str(HEARTBEAT_S)))
    runs = {}
    for dies in (1, 0):
        coordinator, died_at = f"127.0.0.1:{processes.free_port()}", tmp_path / f"died_at{dies}"
        runs[dies] = (
            died_at,
            [
                processes.launch([script, dies, died_at], processes.worker_env(coordinator, 2, pid))
                for pid in range(2)
            ],
        )
    try:
        for dies, (died_at, procs) in runs.items():
            logs = [proc.communicate(timeout=150)[0] for proc in procs]
            waited = time.time() - float(died_at.read_text())
            survivor, log = procs[1 - dies], logs[1 - dies]
            assert procs[dies].returncode == 3, logs[dies][-3000:]
            # The runtime ends the survivor (SIGABRT), whose main thread is blocked in a collective.
            assert survivor.returncode != 0, log[-3000:]
            assert f"{1 - dies} step 1 " in log
            assert "Terminating process because the JAX distributed service detected fatal" in log
            assert "another task died" in log
            if dies == 1:
                assert "stopped sending heartbeats" in log
            assert waited < 10 * HEARTBEAT_S + 15, waited
    finally:
        for _, procs in runs.values():
            for proc in procs:
                proc.kill()


def test_unreachable_coordinator_fails_in_bounded_time():
    code = (
        "from mixjax import parallel\n"
        f"parallel.initialize('127.0.0.1:{processes.free_port()}', 2, 1, timeout_s=3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=processes.worker_env(None),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode != 0
    assert "RuntimeError: mixjax.parallel.initialize: process 1 of 2 could not join" in done.stderr
    assert "unreachable within timeout_s=3" in done.stderr


@pytest.mark.parametrize(
    "env, kwargs, match",
    [
        ({"MIXJAX_NUM_PROCESSES": "3"}, dict(num_processes=2, process_id=0), "does not match"),
        ({}, dict(num_processes=2, process_id=2), r"process_id must be in \[0, num_processes=2"),
        ({}, dict(num_processes=0, process_id=0), "num_processes must be an integer >= 1"),
        ({"MIXJAX_PROCESS_ID": "x"}, dict(num_processes=2), "MIXJAX_PROCESS_ID='x' is not"),
        ({}, dict(coordinator="nohostport", num_processes=1, process_id=0), "'host:port'"),
    ],
)
def test_initialize_bad_settings_raise_before_connecting(monkeypatch, env, kwargs, match):
    for name in ("MIXJAX_COORDINATOR", "MIXJAX_NUM_PROCESSES", "MIXJAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kwargs = {"coordinator": "127.0.0.1:1", **kwargs}
    with pytest.raises(ValueError, match=f"mixjax.parallel.initialize: .*{match}"):
        parallel.initialize(**kwargs)


def test_process_slice_single_process():
    assert parallel.process_slice(8) == slice(0, 8)
    with pytest.raises(ValueError, match="positive multiple of the process count 1, got 0"):
        parallel.process_slice(0)
