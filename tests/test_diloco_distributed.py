"""DiLoCo replicas as processes: two processes on 127.0.0.1 (gloo) equal two local devices.

Every run is a subprocess with a wall-clock timeout (tests/processes.py), so a broken runtime
fails the test instead of hanging CI.
"""

import textwrap

import numpy as np
import processes

# The same program in each worker process (one CPU device each) and in the single-process
# reference (two forced CPU devices); argv[1] is the output file.
PROGRAM = textwrap.dedent(
    """
    import os, sys
    distributed = "MIXJAX_COORDINATOR" in os.environ
    os.environ["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=" + ("1" if distributed else "2")
    )
    from mixjax import parallel
    if distributed:
        parallel.initialize(timeout_s=60, heartbeat_timeout_s=10)
    import replica_setup
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from mixjax import delay, train

    module = replica_setup.MLP()
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    tx = delay.diloco(
        optax.adam(1e-2), sync_every=2, fragments=2, outer_delay=1, compensation="dc",
        compress=delay.Quantize(4),
    )
    assert jax.device_count() == 2, jax.devices()
    mesh = parallel.make_mesh()
    state = jax.jit(lambda p: train.init_train_state(p, tx, key=jax.random.key(1)))(params)
    state = delay.replicate_state(state, mesh)
    step = delay.diloco_data_parallel(train.linen_apply(module), tx, mesh)
    rng = np.random.default_rng(0)
    rows = parallel.process_slice(8)
    losses, sent = [], []
    for _ in range(5):
        batch = {"image": rng.random((8, 4, 4, 1), np.float32),
                 "label": rng.integers(0, 4, 8).astype(np.int32)}
        state, metrics = step(state, {k: v[rows] for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
        sent.append(int(metrics["bytes_sent"]))
    synced = delay.synced_state(state)
    out = {"losses": np.array(losses), "sent": np.array(sent)}
    for i, x in enumerate(jax.tree.leaves(synced.params)):
        out[f"outer{i}"] = np.asarray(x.addressable_shards[0].data)
    for i, x in enumerate(jax.tree.leaves(state.params)):
        for shard in x.addressable_shards:  # this process's replicas' own parameters
            out[f"local{i}_{shard.index[0].start}"] = np.asarray(shard.data)
    np.savez(sys.argv[1], **out)
    """
)


def test_two_processes_equal_two_local_devices(tmp_path):
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    procs = processes.launch_group(script, [tmp_path / f"worker{pid}.npz" for pid in range(2)])
    procs.append(processes.launch([script, tmp_path / "local.npz"], processes.worker_env(None)))
    processes.finish(procs, timeout=200)

    local = np.load(tmp_path / "local.npz")
    assert np.all(local["sent"] > 0)  # F = H = 2: one fragment syncs at every step
    for pid in range(2):
        got = np.load(tmp_path / f"worker{pid}.npz")
        np.testing.assert_allclose(got["losses"], local["losses"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["sent"], local["sent"])
        for name in got.files:
            if name.startswith(("outer", "local")):
                np.testing.assert_allclose(got[name], local[name], rtol=1e-5, atol=1e-6)
        # each process holds exactly its own replica's parameters
        assert {n.rsplit("_", 1)[1] for n in got.files if n.startswith("local")} == {str(pid)}
