"""Tests of mixjax.checkpoint: bitwise round trips, resume equivalence, atomicity, errors.

The sharded restore needs several devices, which JAX fixes when it starts, so
``test_sharded_restore_on_4_cpu_devices`` re-runs the sharded test of this module in a subprocess
with ``--xla_force_host_platform_device_count=4``; here that test skips.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import forced_devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import mixjax
from mixjax import (
    augment,
    checkpoint,
    delay,
    models,
    parallel,
    prune,
    quant,
    schedules,
    share,
    train,
)

DEVICES = 4
CLASSES = 4
BATCH = 8


def leaves(tree):
    """Leaves with typed keys as their key data, for bitwise comparison."""
    return [
        jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        for x in jax.tree.leaves(tree)
    ]


def assert_same(a, b):
    """Same tree structure, and every leaf the same type, dtype and bits."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True)


class MLP(nn.Module):
    """``Dense_0`` (64, 16), ReLU, ``Dense_1`` (16, 4): the parameter shapes of the NNX model."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
        return nn.Dense(CLASSES)(x)


def get(state, path):
    node = getattr(state, path[0])
    for key in path[1:]:
        node = node[key]
    return node


def linen_params(seed):
    return MLP().init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]


# One transform object for every test, so its (eager) init compiles once per process.
TRANSFORM = mixjax.chain(
    prune.magnitude(schedules.polynomial(0.0, 0.5, 0, 4)),
    share.cluster(8, per_channel=True, init="linear", where=".*Dense_1/kernel"),
    quant.fake_quant(8),
)
DELAYED = delay.delayed(optax.adam(1e-2), 2, compensation="dc")


def init(seed, tx=DELAYED, params=None):
    params = linen_params(seed) if params is None else params
    return train.init_train_state(params, tx, transform=TRANSFORM, key=jax.random.key(seed))


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.random((BATCH, 8, 8, 1), np.float32),
            "label": rng.integers(0, CLASSES, BATCH).astype(np.int32),
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    "tx",
    [optax.adam(1e-3), delay.delayed(optax.sgd(0.1), 2, compensation="dc")],
    ids=["adam", "delayed_dc"],
)
def test_round_trip_linen_full_state_is_bitwise(tmp_path, tx):
    state = init(0, tx)
    assert state.model_state is None
    path = checkpoint.save(tmp_path, state)
    assert path == tmp_path / "0" and path.is_dir()
    like = init(1, tx)
    restored = checkpoint.restore(tmp_path, like)
    assert isinstance(restored, train.TrainState)
    assert_same(restored, state)
    dtypes = {x.dtype for x in jax.tree.leaves(restored.transform_state)}
    assert {np.dtype(bool), np.dtype(np.uint8), np.dtype(np.float32)} <= dtypes
    assert restored.rng.dtype == jax.random.key(0).dtype
    kernel = ("params", "Dense_0", "kernel")
    assert get(restored, kernel).sharding == get(like, kernel).sharding


def test_round_trip_nnx_state_and_empty_delay_buffers(tmp_path):
    spec = models.Spec(convs=(), kernel=(1, 1), hidden=(16,))
    model = models.NNXClassifier(spec, (8, 8, 1), CLASSES, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    # tau = 0 for biases: zero-size FIFOs, which orbax cannot write, come back from `like`.
    tx = delay.delayed(optax.adam(1e-3), lambda path, leaf: 0 if "bias" in path else 2)
    state = init(0, tx, params)
    assert any(x.size == 0 for x in jax.tree.leaves(state.opt_state))
    checkpoint.save(tmp_path, state, step=7)
    restored = checkpoint.restore(tmp_path, init(1, tx, jax.tree.map(jnp.ones_like, params)))
    assert isinstance(restored.params, nnx.State)
    assert_same(restored, state)


def test_round_trip_dtypes_numpy_leaves_and_raw_keys(tmp_path):
    tree = {
        "bf16": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(2, 3),
        "f16": jnp.array([np.inf, -0.0, 1e-4], jnp.float16),
        "i8": jnp.array([-128, 0, 127], jnp.int8),
        "u32": jnp.array([0, 2**32 - 1], jnp.uint32),
        "np64": np.arange(3, dtype=np.int64),
        "raw_key": jax.random.PRNGKey(5),
        "rbg_key": jax.random.key(5, impl="rbg"),
        "none": None,
        "nan": jnp.array([np.nan, 1.0], jnp.float32),
    }
    checkpoint.save(tmp_path, tree, step=1)
    like = jax.tree.map(lambda x: x.copy(), tree)
    like["nan"], like["np64"] = jnp.zeros(2), np.zeros(3, np.int64)
    assert_same(checkpoint.restore(tmp_path, like), tree)
    # Only zero-size leaves: orbax writes no array item, the manifest alone restores them.
    empty = {"fifo": jnp.zeros((0, 3)), "none": None}
    checkpoint.save(tmp_path / "empty", empty, step=0)
    assert_same(checkpoint.restore(tmp_path / "empty", empty), empty)


def test_resume_equals_uninterrupted_run(tmp_path):
    aug = augment.chain(augment.random_flip(), augment.random_brightness(0.1))
    apply_fn = train.linen_apply(MLP())
    step = train.make_train_step(apply_fn, DELAYED, transform=TRANSFORM, augment=aug)
    data = batches(6)
    uninterrupted = init(0)
    for batch in data:
        uninterrupted, _ = step(uninterrupted, batch)

    first = init(0)
    for batch in data[:3]:
        first, _ = step(first, batch)
    checkpoint.save(tmp_path, first)
    expected = jax.tree.map(lambda x: x.copy(), first)
    # `like` differs in every value (other init key, other rng): all of it must come from disk.
    resumed = checkpoint.restore(tmp_path, init(9))
    assert_same(resumed, expected)
    for batch in data[3:]:
        resumed, _ = step(resumed, batch)

    assert int(resumed.step) == int(uninterrupted.step) == 6
    for part in ("params", "opt_state", "transform_state", "rng"):
        assert_same(getattr(resumed, part), getattr(uninterrupted, part))


CRASH = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from mixjax import checkpoint

    directory = sys.argv[1]
    checkpoint.save(directory, {"w": jnp.arange(1000.0)}, step=1)
    rename = os.rename

    def crash(src, dst, *args, **kwargs):
        # Every file of step 2 is written; die before orbax's final rename commits it.
        if os.fspath(dst).endswith("/2"):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)

    os.rename = crash
    checkpoint.save(directory, {"w": jnp.arange(1000.0) + 1}, step=2)
    """
)


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(tmp_path)], env=env, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert (tmp_path / "2.orbax-checkpoint-tmp").is_dir()
    assert checkpoint.steps(tmp_path) == [1] and checkpoint.latest_step(tmp_path) == 1
    like = {"w": jnp.zeros(1000)}
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, like)["w"], np.arange(1000.0))

    checkpoint.save(tmp_path, {"w": jnp.arange(1000.0) + 2}, step=2)
    assert checkpoint.steps(tmp_path) == [1, 2]
    assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()
    np.testing.assert_array_equal(checkpoint.restore(tmp_path, like)["w"], np.arange(1000.0) + 2)


def test_keep_retention_and_older_steps(tmp_path):
    state = {"w": jnp.zeros(3), "step": jnp.zeros([], jnp.int32)}
    for s in range(1, 6):
        checkpoint.save(tmp_path / "two", {"w": state["w"] + s}, step=s, keep=2)
        checkpoint.save(tmp_path / "all", {"w": state["w"] + s}, step=s, keep=None)
    assert checkpoint.steps(tmp_path / "two") == [4, 5]
    assert checkpoint.steps(tmp_path / "all") == [1, 2, 3, 4, 5]
    assert checkpoint.latest_step(tmp_path / "two") == 5
    like = {"w": jnp.zeros(3)}
    np.testing.assert_array_equal(checkpoint.restore(tmp_path / "two", like)["w"], [5.0] * 3)
    older = checkpoint.restore(tmp_path / "all", like, step=2)
    np.testing.assert_array_equal(older["w"], [2.0] * 3)
    assert checkpoint.steps(tmp_path / "missing") == []
    assert checkpoint.latest_step(tmp_path / "missing") is None
    # The step defaults to int(state.step) for a TrainState-like tree.
    ts = train.TrainState(jnp.array(12, jnp.int32), {"w": jnp.ones(2)}, (), None, None, jnp.ones(2))
    assert checkpoint.save(tmp_path / "ts", ts).name == "12"


def test_errors(tmp_path):
    good = {"a": jnp.zeros((2, 3)), "b": {"c": jnp.ones(4, jnp.int32)}, "k": jax.random.key(0)}
    checkpoint.save(tmp_path, good, step=4)
    checkpoint.save(tmp_path, good, step=5)
    name = r"mixjax\.checkpoint\."

    with pytest.raises(FileNotFoundError, match=name + "restore: .* does not exist"):
        checkpoint.restore(tmp_path / "nope", good)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=name + "restore: .* holds no checkpoint"):
        checkpoint.restore(tmp_path / "empty", good)
    with pytest.raises(ValueError, match=r"no checkpoint of step 7; available steps: \[4, 5\]"):
        checkpoint.restore(tmp_path, good, step=7)
    with pytest.raises(
        ValueError, match=name + r"restore: step must be an integer >= 0, got step=-1"
    ):
        checkpoint.restore(tmp_path, good, step=-1)

    def mismatch(like, pattern):
        with pytest.raises(ValueError, match=name + "restore: checkpoint .* does not match like"):
            checkpoint.restore(tmp_path, like)
        with pytest.raises(ValueError, match=pattern):
            checkpoint.restore(tmp_path, like)

    shape = r"leaf 0: the checkpoint has leaf 'a' \(2, 3\) float32, like has leaf 'a' \(3, 2\)"
    mismatch({**good, "a": jnp.zeros((3, 2))}, shape)
    mismatch({**good, "b": {"c": jnp.ones(4, jnp.float32)}}, r"leaf 'b/c' \(4,\) float32")
    mismatch({**good, "b": {"d": jnp.ones(4, jnp.int32)}}, r"like has leaf 'b/d' \(4,\) int32")
    mismatch({**good, "z": jnp.ones(1)}, r"has no leaf, like has leaf 'z' \(1,\) float32 \(3 vs 4")
    mismatch({"a": good["a"]}, r"leaf 1: the checkpoint has leaf 'b/c' .* like has no leaf")
    mismatch({**good, "k": jax.random.key(0, impl="rbg")}, r"leaf 'k' \(\) key<fry>, like .*rbg")

    (tmp_path / "5" / "manifest" / "metadata").write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match=name + "restore: .* manifest format 99"):
        checkpoint.restore(tmp_path, good)
    with pytest.raises(TypeError, match=name + r"restore: like must be a pytree of arrays.*'x' is"):
        checkpoint.restore(tmp_path, {**good, "x": 1.0}, step=4)

    not_array = name + r"save: state must be a pytree of arrays .* leaf 'b/s' is a str"
    with pytest.raises(TypeError, match=not_array):
        checkpoint.save(tmp_path, {**good, "b": {"s": "text"}}, step=9)
    with pytest.raises(TypeError, match=name + "save: pass step= for a state without a step"):
        checkpoint.save(tmp_path, good)
    for bad, error in ((-1, ValueError), (True, TypeError), (1.5, TypeError)):
        with pytest.raises(
            error, match=name + rf"save: step must be an integer >= 0, got step={bad}"
        ):
            checkpoint.save(tmp_path, good, step=bad)
    for bad, error in ((0, ValueError), (False, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match=name + r"save: keep must be None or an integer >= 1"):
            checkpoint.save(tmp_path, good, step=9, keep=bad)
    with pytest.raises(ValueError, match=name + "save: .* already holds a checkpoint of step 4"):
        checkpoint.save(tmp_path, good, step=4)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=name + "steps: .* is not a directory"):
        checkpoint.latest_step(tmp_path / "file")
    assert checkpoint.steps(tmp_path) == [4, 5]


@pytest.mark.skipif(
    jax.device_count() >= DEVICES or forced_devices.in_child(),
    reason="runs the sharded test itself",
)
def test_sharded_restore_on_4_cpu_devices():
    out = forced_devices.rerun(__file__, DEVICES, keyword="sharded_state", timeout=300)
    assert "1 passed" in out


@pytest.mark.skipif(jax.device_count() < DEVICES, reason="needs 4 (forced CPU) devices")
def test_sharded_state_restores_with_like_shardings(tmp_path):
    mesh = parallel.make_mesh(data=2, model=2)
    rules = [(".*Dense_0/kernel", P(None, "model")), (".*Dense_1/kernel", P("model", None))]
    plain = init(0)
    state = parallel.shard_state(plain, mesh, rules)
    checkpoint.save(tmp_path, state)
    like = parallel.shard_state(init(1), mesh, rules)
    restored = checkpoint.restore(tmp_path, like)
    assert_same(restored, state)
    shardings = jax.tree.map(lambda x: x.sharding, restored)
    assert shardings == jax.tree.map(lambda x: x.sharding, like)
    kernel = restored.params["Dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "model") and len(kernel.addressable_shards) == DEVICES
    mask = restored.transform_state[0].masks["Dense_1"]["kernel"]
    assert mask.sharding.spec == P("model", None)
    # The same checkpoint restores into an unsharded state: the layout comes from `like`.
    unsharded = checkpoint.restore(tmp_path, plain)
    path = ("params", "Dense_0", "kernel")
    assert get(unsharded, path).sharding == get(plain, path).sharding
    assert_same(jax.device_get(unsharded.params), jax.device_get(state.params))


def _truncate(path, size=10):
    with open(path, "r+b") as f:
        f.truncate(size)


DAMAGE = {
    "truncated manifest": lambda c: _truncate(c / "manifest" / "metadata"),
    "manifest without leaves": lambda c: (c / "manifest" / "metadata").write_text('{"format": 1}'),
    "truncated array metadata": lambda c: _truncate(c / "arrays" / "_METADATA"),
    "array files removed": lambda c: [p.unlink() for p in (c / "arrays").glob("*d/*")],
    "array files truncated": lambda c: [_truncate(p, 20) for p in (c / "arrays").glob("*d/*")],
    "arrays removed": lambda c: shutil.rmtree(c / "arrays"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_one_before_still_reads(tmp_path, damage):
    """Once a JSONDecodeError / KeyError / TensorStore error naming no file."""
    state = {"a": jnp.arange(6.0), "b": {"c": jnp.ones((2, 3), jnp.int32)}}
    checkpoint.save(tmp_path, state, step=1)
    checkpoint.save(tmp_path, jax.tree.map(lambda x: x + 1, state), step=2)
    DAMAGE[damage](tmp_path / "2")
    where = re.escape(f"checkpoint {str(tmp_path / '2')!r} is damaged")
    with pytest.raises(
        checkpoint.DamagedCheckpointError, match=f"^mixjax.checkpoint.restore: {where}"
    ):
        checkpoint.restore(tmp_path, state)
    older = checkpoint.restore(tmp_path, state, step=1)
    pairs = zip(jax.tree.leaves(older), jax.tree.leaves(state), strict=True)
    assert all(jnp.array_equal(x, y) for x, y in pairs)


def test_a_mismatch_is_not_damage(tmp_path):
    checkpoint.save(tmp_path, {"a": jnp.zeros(3)}, step=1)
    with pytest.raises(ValueError, match="does not match like") as err:
        checkpoint.restore(tmp_path, {"a": jnp.zeros(4)})
    assert not isinstance(err.value, checkpoint.DamagedCheckpointError)
