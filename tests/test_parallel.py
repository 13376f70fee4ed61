"""Tests of mixjax.parallel on 8 CPU devices: data/model parallel, shard_map and pmap steps.

JAX fixes its device count when it starts, so when this process has fewer than 8 devices,
``test_suite_on_8_cpu_devices`` re-runs this module in a subprocess with
``--xla_force_host_platform_device_count=8`` (one JAX start for every multi-device test) and the
multi-device tests skip here.
"""

import types

import flax.linen as nn
import forced_devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import mixjax
from mixjax import delay, models, parallel, prune, quant, schedules, select, share, train
from mixjax.parallel import mesh

DEVICES = 8
STEPS = 5
BATCH = 16
multi = pytest.mark.skipif(jax.device_count() < DEVICES, reason="needs 8 (forced CPU) devices")
RULES = [
    (".*Dense_0/kernel", P(None, "model")),
    (".*Dense_0/bias", P("model")),
    (".*Dense_1/kernel", P("model", None)),
]


@pytest.mark.skipif(
    jax.device_count() >= DEVICES or forced_devices.in_child(), reason="runs the suite itself"
)
def test_suite_on_8_cpu_devices():
    out = forced_devices.rerun(__file__, DEVICES)
    assert " passed" in out and "skipped" in out


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x.reshape((x.shape[0], -1))))
        return nn.Dense(4)(x)


@pytest.fixture(scope="module")
def setup():
    module = MLP()
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    transform = mixjax.chain(
        prune.magnitude(schedules.polynomial(0.0, 0.75, 0, STEPS - 1)),
        share.cluster(16, per_channel=True, init="linear"),
        quant.fake_quant(8),
    )
    # Plain Adam in the compiled runs (compile time); the delay FIFOs' layout is checked on a
    # delayed(...) state in test_state_specs_of_abstract_delayed_state_mirror_parameters.
    tx = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.random((BATCH, 8, 8, 1), np.float32),
            "label": rng.integers(0, 4, BATCH).astype(np.int32),
        }
        for _ in range(STEPS)
    ]
    apply_fn = train.linen_apply(module)

    def init_with(tx):
        return train.init_train_state(params, tx, transform=transform, key=jax.random.key(1))

    init = jax.jit(lambda: init_with(tx))  # one compile, not one per eager op

    def make(replica=False):
        fn = parallel.replica_apply(apply_fn) if replica else apply_fn
        return train.make_train_step(fn, tx, transform=transform)

    return dict(init=init, init_with=init_with, make=make, batches=batches)


def run(step, state, batches):
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


def host(state):
    return jax.device_get(state._replace(rng=jax.random.key_data(state.rng)))


@pytest.fixture(scope="module")
def reference(setup):
    return run(setup["make"](), setup["init"](), setup["batches"])


def assert_equal_runs(got, want):
    (state, losses), (ref_state, ref_losses) = got, want
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert int(state.step) == STEPS
    got, want = (select.leaves_with_paths(host(s)) for s in (state, ref_state))
    for (path, a), (_, b) in zip(got, want, strict=True):
        assert a.dtype == b.dtype, path
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=path)


@multi
def test_data_parallel_equals_single_device(setup, reference):
    step = parallel.data_parallel(setup["make"](), parallel.make_mesh())
    assert_equal_runs(run(step, setup["init"](), setup["batches"]), reference)


def expected_spec(path):
    """What every state leaf's spec must be under RULES (written out, not derived)."""
    table = {
        "params/Dense_0/kernel": P(None, "model"),
        "params/Dense_0/bias": P("model"),
        "params/Dense_1/kernel": P("model", None),
        "params/Dense_1/bias": P(None),
        "opt_state/past_grads/Dense_0/kernel": P(None, None, "model"),
        "opt_state/past_grads/Dense_0/bias": P(None, "model"),
        "opt_state/past_grads/Dense_1/kernel": P(None, "model", None),
        "opt_state/0/mu/Dense_0/kernel": P(None, "model"),
        "opt_state/0/nu/Dense_1/kernel": P("model", None),
        "opt_state/0/count": P(),
        "transform_state/0/masks/Dense_0/kernel": P(None, "model"),
        "transform_state/0/masks/Dense_1/kernel": P("model", None),
        "transform_state/1/assignments/Dense_0/kernel": P(None, "model"),
        "transform_state/2/scale/Dense_0/kernel": P(None, "model"),
        "transform_state/2/scale/Dense_1/kernel": P(None, None),
        "step": P(),
        "rng": P(),
    }
    return table.get(path.replace("opt_state/inner_state/", "opt_state/"))


@multi
def test_model_parallel_2x4_equals_single_device_and_keeps_shardings(setup, reference):
    mesh2x4 = parallel.make_mesh(data=2, model=4)
    assert dict(mesh2x4.shape) == {"data": 2, "model": 4}
    state = parallel.shard_state(setup["init"](), mesh2x4, RULES)
    shardings_before = jax.tree.map(lambda x: x.sharding, state)
    step = parallel.data_parallel(setup["make"](), mesh2x4, rules=RULES)
    got = run(step, state, setup["batches"])
    assert_equal_runs(got, reference)
    state = got[0]
    assert jax.tree.map(lambda x: x.sharding, state) == shardings_before
    checked = 0
    for path, leaf in select.leaves_with_paths(state):
        want = expected_spec(path)
        if want is not None:
            assert leaf.sharding.spec == want, (path, leaf.sharding.spec, want)
            checked += 1
    assert checked == 14
    shard = state.params["Dense_0"]["kernel"].addressable_shards[0].data
    assert shard.shape == (64, 8)


@multi
def test_state_specs_of_abstract_delayed_state_mirror_parameters(setup):
    tx = delay.delayed(optax.adam(1e-2), 2, compensation="dc")
    state = jax.eval_shape(lambda: setup["init_with"](tx))  # layouts need shapes only
    shardings = parallel.state_shardings(state, parallel.make_mesh(data=2, model=4), RULES)
    checked = 0
    for path, sharding in select.leaves_with_paths(shardings):
        want = expected_spec(path)
        if want is not None:
            assert sharding.spec == want, path
            checked += 1
    assert checked == 17


@multi
def test_shard_map_step_equals_single_device(setup, reference):
    step = parallel.shard_map_step(setup["make"](replica=True), parallel.make_mesh())
    assert_equal_runs(run(step, setup["init"](), setup["batches"]), reference)


@multi
def test_pmap_step_equals_single_device(setup, reference):
    step = parallel.pmap_step(setup["make"](replica=True))
    state, losses = run(step, parallel.replicate(setup["init"]()), setup["batches"])
    assert jax.tree.leaves(state.params)[0].shape[0] == DEVICES
    assert_equal_runs((parallel.unreplicate(state), losses), reference)


# ----------------------------------------------------------------------------------------------
# Bad input: each a clear error before compilation.


@multi
def test_batch_not_divisible_by_data_axis(setup):
    step = parallel.data_parallel(setup["make"](), parallel.make_mesh())
    batch = {k: v[:12] for k, v in setup["batches"][0].items()}
    with pytest.raises(ValueError, match="global batch of 12 examples .* data axis of size 8"):
        step(setup["init"](), batch)
    with pytest.raises(ValueError, match="pmap_step: the global batch of 12"):
        parallel.pmap_step(setup["make"](replica=True))(setup["init"](), batch)


@multi
def test_rule_errors(setup):
    params = setup["init"]().params
    with pytest.raises(ValueError, match="names mesh axis 'tensor'; the mesh has axes"):
        parallel.data_parallel(
            setup["make"](), parallel.make_mesh(), rules=[(".*kernel", P(None, "tensor"))]
        )
    with pytest.raises(ValueError, match=r"'Dense_1/kernel' \(32, 4\).* size 4 over 8 devices"):
        parallel.param_specs(params, parallel.make_mesh(1, 8), [(".*kernel", P(None, "model"))])
    with pytest.raises(ValueError, match="has 3 entries for 1 dimensions"):
        parallel.param_specs(params, parallel.make_mesh(), [(".*bias", P(None, None, None))])
    with pytest.raises(TypeError, match=r"\(regex str, PartitionSpec\) pair"):
        parallel.param_specs(params, parallel.make_mesh(), [(".*bias", ("model",))])
    with pytest.raises(ValueError, match="needs 16 devices, got 8"):
        parallel.make_mesh(4, 4)


def test_sync_wrappers_require_a_replica_apply_train_step(setup):
    """Checked when the wrapper is built, from the step's model: no tracing involved."""
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    for wrap in (lambda s: parallel.shard_map_step(s, mesh), parallel.pmap_step):
        with pytest.raises(ValueError, match="must average gradients over the 'data' axis"):
            wrap(setup["make"]())
        with pytest.raises(TypeError, match=r"step must be a mixjax.train.TrainStep"):
            wrap(setup["make"](replica=True).jitted)
    other_axis = train.make_train_step(
        parallel.replica_apply(lambda *a, **k: None, "batch"), tx=optax.sgd(0.1)
    )
    with pytest.raises(ValueError, match="got a replica_apply over 'batch'"):
        parallel.pmap_step(other_axis)
    with pytest.raises(TypeError, match=r"data_parallel: step must be a mixjax.train.TrainStep"):
        parallel.data_parallel(lambda state, batch: (state, {}), mesh)


@multi
def test_averaging_check_survives_cached_traces(setup):
    """The old check recorded replica_apply calls made while tracing; a K-step scan whose body
    trace was cached from an earlier wrapper then failed with a false "would diverge" error."""
    step = train.make_train_step(
        parallel.replica_apply(train.linen_apply(MLP())), optax.sgd(0.1), steps_per_call=2
    )
    module = MLP()
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    batch = {k: np.stack([b[k] for b in setup["batches"][:2]]) for k in ("image", "label")}
    init = lambda: train.init_train_state(params, optax.sgd(0.1), key=jax.random.key(1))
    first, _ = parallel.shard_map_step(step, parallel.make_mesh())(init(), batch)
    second, _ = parallel.shard_map_step(step, parallel.make_mesh())(init(), batch)
    third, _ = parallel.pmap_step(step)(parallel.replicate(init()), batch)
    for a, b, c in zip(*(jax.tree.leaves(s.params) for s in (first, second, third)), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(np.asarray(c)[0], a, rtol=1e-6, atol=1e-6)


def test_mesh_module_specs_on_one_device():
    params = {"w": jnp.zeros((4, 6)), "b": jnp.zeros((6,))}
    one = parallel.make_mesh(devices=jax.devices()[:1])
    specs = mesh.param_specs(params, one, [("w", P(None, "model"))])
    assert specs == {"w": P(None, "model"), "b": P()}
    fifo = {"w": jnp.zeros((3, 4, 6)), "b": None}
    assert mesh.state_specs({"fifo": fifo, "n": jnp.zeros([])}, params, specs) == {
        "fifo": {"w": P(None, None, "model"), "b": None},
        "n": P(),
    }
    with pytest.raises(ValueError, match="steps_per_call must be an integer >= 1"):
        parallel.shard_batch({"x": np.zeros((4, 2))}, one, steps_per_call=0)


@multi
def test_steps_per_call_stacked_batches(setup):
    module = MLP()
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    tx = optax.sgd(0.1)
    batch = {k: np.stack([b[k] for b in setup["batches"][:2]]) for k in ("image", "label")}

    def init():
        return train.init_train_state(params, tx, key=jax.random.key(1))

    def make(replica):
        apply_fn = train.linen_apply(module)
        apply_fn = parallel.replica_apply(apply_fn) if replica else apply_fn
        return train.make_train_step(apply_fn, tx, steps_per_call=2)

    want, want_metrics = make(False)(init(), batch)
    mesh8 = parallel.make_mesh()
    runs = {
        "dp": parallel.data_parallel(make(False), mesh8)(init(), batch),
        "shard_map": parallel.shard_map_step(make(True), mesh8)(init(), batch),
    }
    state, metrics = parallel.pmap_step(make(True))(parallel.replicate(init()), batch)
    runs["pmap"] = (parallel.unreplicate(state), metrics)
    for name, (state, metrics) in runs.items():
        assert metrics["loss"].shape == (2,), name
        np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------------------------
# Cross-replica BatchNorm under the model's own axis name (axis_name=), on a real ResNet-20.

SYNC = "batch"


class NormNet(nn.Module):
    """Dense -> BatchNorm (cross-replica over ``axis_name``) -> Dense, a cheap BN model."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
        return nn.Dense(4)(nn.relu(x))


def numpy_init(module, x):
    """The module's variables drawn with NumPy (He-scaled kernels, unit scales and variances,
    zero biases and means): compiling ResNet-20's init costs more than its train step."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name != "kernel":
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(
            np.float32
        )

    abstract = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, abstract))


@pytest.fixture(scope="module")
def bn_setup(setup):
    """ResNet-20 (width 2) with BatchNorm axis_name="batch", and the same model without one
    trained on one device with the global batch: the reference the wrappers must equal."""
    synced = models.ResNet20(4, width=2, axis_name=SYNC)
    plain = models.ResNet20(4, width=2)
    batches = setup["batches"][:2]
    init, make = bn_steps(numpy_init(plain, batches[0]["image"][:1]))
    reference = run_bn(make(plain), init(), batches)
    return types.SimpleNamespace(
        synced=synced, plain=plain, batches=batches, init=init, make=make, reference=reference
    )


def bn_steps(variables):
    """``(init, make)``: a fresh SGD state of ``variables`` (with their batch_stats), and the
    train step of a module (its per-replica gradient mean over ``replica_axis``, if given)."""
    tx = optax.sgd(0.1)

    def init():
        stats = {"batch_stats": variables["batch_stats"]}
        return train.init_train_state(
            variables["params"], tx, key=jax.random.key(1), model_state=stats
        )

    def make(module, replica_axis=None):
        apply_fn = train.linen_apply(module, train_kwarg="train")
        if replica_axis is not None:
            apply_fn = parallel.replica_apply(apply_fn, replica_axis)
        return train.make_train_step(apply_fn, tx)

    return init, make


def run_bn(step, state, batches):
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


def assert_same_bn_run(got, want, atol=1e-5):
    (state, losses), (ref_state, ref_losses) = got, want
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=atol)
    for tree in ("params", "model_state"):
        a = select.leaves_with_paths(jax.device_get(getattr(state, tree)))
        b = select.leaves_with_paths(jax.device_get(getattr(ref_state, tree)))
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=f"{tree}/{path}")


@multi
def test_data_parallel_cross_replica_batchnorm_equals_the_global_batch(bn_setup):
    step = parallel.data_parallel(
        bn_setup.make(bn_setup.synced), parallel.make_mesh(), axis_name=SYNC
    )
    got = run_bn(step, bn_setup.init(), bn_setup.batches)
    assert_same_bn_run(got, bn_setup.reference)
    moved = got[0].model_state["batch_stats"]["stem_bn"]["mean"]
    assert float(np.max(np.abs(np.asarray(moved)))) > 1e-3  # the statistics did update


@multi
def test_shard_map_cross_replica_batchnorm_equals_the_global_batch(bn_setup):
    mesh8 = parallel.make_mesh()
    step = parallel.shard_map_step(bn_setup.make(bn_setup.synced, SYNC), mesh8, axis_name=SYNC)
    assert_same_bn_run(run_bn(step, bn_setup.init(), bn_setup.batches), bn_setup.reference)


@pytest.fixture(scope="module")
def norm_net(setup):
    batches = setup["batches"][:2]
    init, make = bn_steps(NormNet().init(jax.random.key(0), batches[0]["image"][:1], False))
    reference = run_bn(make(NormNet()), init(), batches)
    return types.SimpleNamespace(batches=batches, init=init, make=make, reference=reference)


@multi
def test_pmap_cross_replica_batchnorm_equals_the_global_batch(norm_net):
    step = parallel.pmap_step(norm_net.make(NormNet(SYNC), SYNC), axis_name=SYNC)
    state, losses = run_bn(step, parallel.replicate(norm_net.init()), norm_net.batches)
    assert_same_bn_run((parallel.unreplicate(state), losses), norm_net.reference)


@multi
def test_per_replica_batchnorm_differs_from_the_global_batch(norm_net):
    """The comparison above is sensitive: without an axis name each replica normalizes its 2
    examples with their own statistics, and the run differs from the global-batch one."""
    step = parallel.shard_map_step(norm_net.make(NormNet(), parallel.DATA), parallel.make_mesh())
    (state, losses), (ref_state, ref_losses) = (
        run_bn(step, norm_net.init(), norm_net.batches),
        (norm_net.reference),
    )
    assert abs(losses[0] - ref_losses[0]) > 1e-3
    stats, ref_stats = (
        s.model_state["batch_stats"]["BatchNorm_0"]["var"] for s in (state, ref_state)
    )
    assert float(np.max(np.abs(np.asarray(stats) - np.asarray(ref_stats)))) > 1e-3
    # ... while the synchronized model, under the same wrapper and its own axis name, is equal.
    step = parallel.shard_map_step(
        norm_net.make(NormNet(SYNC), SYNC), parallel.make_mesh(), axis_name=SYNC
    )
    assert_same_bn_run(run_bn(step, norm_net.init(), norm_net.batches), norm_net.reference)


@multi
def test_data_parallel_binds_the_data_axis_by_default(norm_net):
    """A model whose BatchNorm names the mesh's "data" axis needs no axis_name=; the plain
    step cannot run it (its collective needs the axis bound)."""
    with pytest.raises(NameError, match="unbound axis name: data"):
        norm_net.make(NormNet("data"))(norm_net.init(), norm_net.batches[0])
    step = parallel.data_parallel(
        norm_net.make(NormNet("data")), parallel.make_mesh(data=2, model=4)
    )
    assert_same_bn_run(run_bn(step, norm_net.init(), norm_net.batches), norm_net.reference)


def test_data_parallel_on_one_device_runs_a_cross_replica_model(norm_net):
    mesh1 = parallel.make_mesh(devices=jax.devices()[:1])
    step = parallel.data_parallel(norm_net.make(NormNet(SYNC)), mesh1, axis_name=SYNC)
    assert_same_bn_run(run_bn(step, norm_net.init(), norm_net.batches), norm_net.reference)


def test_axis_name_errors(setup):
    mesh = parallel.make_mesh(devices=jax.devices()[:1])
    data_step = setup["make"](replica=True)  # replica_apply over "data"
    with pytest.raises(
        ValueError,
        match=r"shard_map_step: the step's model must average gradients over the 'batch' axis.*"
        r"got a replica_apply over 'data'.*replica_apply\(apply_fn, 'batch'\)",
    ):
        parallel.shard_map_step(data_step, mesh, axis_name="batch")
    with pytest.raises(ValueError, match=r"pmap_step: the step's model must average .* 'batch'"):
        parallel.pmap_step(data_step, axis_name="batch")
    with pytest.raises(ValueError, match=r"axis_name='model' is another axis of the mesh"):
        parallel.shard_map_step(data_step, mesh, axis_name="model")
    for wrap in (
        lambda n: parallel.data_parallel(setup["make"](), mesh, axis_name=n),
        lambda n: parallel.shard_map_step(data_step, mesh, axis_name=n),
        lambda n: parallel.pmap_step(data_step, axis_name=n),
    ):
        for bad in (3, "", None):
            with pytest.raises(TypeError, match=r"axis_name must be a non-empty str .* got axis_n"):
                wrap(bad)
