"""Tests of mixjax.replicas: asynchronous data-parallel replicas on 8 forced CPU devices.

The multi-device tests run on 8 forced CPU devices in one subprocess (as tests/test_parallel.py
does); the argument checks run here.
"""

import types

import flax.linen as nn
import forced_devices
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import replica_setup
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixjax import delay, parallel, prune, select, train

DEVICES = 8
STEPS = 5
BATCH = 16
multi = pytest.mark.skipif(jax.device_count() < DEVICES, reason="needs 8 (forced CPU) devices")


@pytest.mark.skipif(
    jax.device_count() >= DEVICES or forced_devices.in_child(), reason="runs the suite itself"
)
def test_suite_on_8_cpu_devices():
    assert " passed" in forced_devices.rerun(__file__, DEVICES)


@pytest.fixture(scope="module")
def setup():
    base = replica_setup.mlp_setup(STEPS, BATCH)
    params, apply_fn = base["params"], base["apply_fn"]

    @jax.jit
    def replica_grads(params, images, labels):
        """Each replica's gradient at ``params`` on its examples, by single-device grad."""

        def grad(images, labels):
            def loss(p):
                logits, _ = apply_fn(p, {}, images, train=True, key=jax.random.key(0))
                return train.softmax_cross_entropy(logits, labels).mean()

            return jax.grad(loss)(params)

        split = lambda x: x.reshape(DEVICES, BATCH // DEVICES, *x.shape[1:])
        return jax.vmap(grad)(split(images), split(labels))

    def init(tx, transform=None):
        make = lambda: train.init_train_state(
            params, tx, transform=transform, key=jax.random.key(1)
        )
        return jax.jit(make)()

    return dict(**base, init=init, replica_grads=replica_grads)


def run(step, state, batches):
    states, losses = [state], []
    for batch in batches:
        state, metrics = step(state, batch)
        states.append(state)
        losses.append(float(metrics["loss"]))
    return states, np.array(losses)


def flat_params(state):
    return {p: np.asarray(x) for p, x in select.leaves_with_paths(jax.device_get(state.params))}


def assert_same_params(a, b):
    for (path, x), (_, y) in zip(flat_params(a).items(), flat_params(b).items(), strict=True):
        assert x.dtype == y.dtype == np.float32, path
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=path)


def compression():
    # Saliency pruning scores the gradients: it must see the replicas' mean, as synchronously.
    return prune.saliency(0.5)


@multi
def test_zero_staleness_equals_the_synchronous_step(setup):
    transform, inner = compression(), optax.adam(1e-2)
    mesh = parallel.make_mesh()
    tx = delay.replica_delayed(inner, (0,) * DEVICES)
    step = delay.async_data_parallel(setup["apply_fn"], tx, mesh, transform=transform)
    states, losses = run(step, setup["init"](tx, transform), setup["batches"])
    sync = train.make_train_step(
        parallel.replica_apply(setup["apply_fn"]), inner, transform=transform
    )
    sync_step = parallel.shard_map_step(sync, mesh)
    ref_states, ref_losses = run(sync_step, setup["init"](inner, transform), setup["batches"])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    assert_same_params(states[-1], ref_states[-1])


@multi
def test_equal_staleness_equals_single_device_delayed(setup):
    tau, inner = 2, optax.adam(1e-2)
    tx = delay.replica_delayed(inner, (tau,) * DEVICES)
    step = delay.async_data_parallel(setup["apply_fn"], tx, parallel.make_mesh(), donate=False)
    states, losses = run(step, setup["init"](tx), setup["batches"])
    single_tx = delay.delayed(inner, tau)
    single = train.make_train_step(setup["apply_fn"], single_tx, donate=False)
    ref_states, ref_losses = run(single, setup["init"](single_tx), setup["batches"])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for got, want in zip(states, ref_states, strict=True):
        assert_same_params(got, want)
    assert int(states[-1].opt_state.count) == STEPS


def replica_grads(setup, state, batch):
    """``[r][path]``: replica ``r``'s float64 gradient at ``state.params``."""
    stacked = setup["replica_grads"](state.params, batch["image"], batch["label"])
    flat = [(p, np.asarray(x, np.float64)) for p, x in select.leaves_with_paths(stacked)]
    return [{p: x[r] for p, x in flat} for r in range(DEVICES)]


def drawn_taus(key, taus, t):
    """The staleness each replica draws at step ``t`` (the documented formula, recomputed)."""
    out = []
    for r, tau_max in enumerate(taus):
        u = float(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, t), r)))
        out.append(min(int(np.floor(u * (tau_max + 1))), tau_max))
    return out


TAUS = (0, 1, 2, 3, 0, 2, 4, 1)


@multi
@pytest.mark.parametrize(
    "compensation, lam, random",
    # "dc" differs from "dc_adaptive" only in mixjax.delay.dc_compensate's strength (tested in
    # tests/test_delay.py); each case here is one 8-device compile.
    [(None, None, False), ("dc_adaptive", None, True)],
)
def test_distinct_staleness_matches_numpy_reference(setup, compensation, lam, random):
    lr, ms_decay, eps = 0.5, 0.95, 1e-7
    key = jax.random.key(7) if random else None
    tx = delay.replica_delayed(
        optax.sgd(lr),
        TAUS,
        compensation=compensation,
        lam=lam,
        random_staleness=random,
        key=key,
    )
    step = delay.async_data_parallel(setup["apply_fn"], tx, parallel.make_mesh(), donate=False)
    states, _ = run(step, setup["init"](tx), setup["batches"])
    lam = delay.DEFAULT_LAM.get(compensation, 0.0) if lam is None else lam
    params = [{p: x.astype(np.float64) for p, x in flat_params(s).items()} for s in states]
    grads = [replica_grads(setup, s, b) for s, b in zip(states[:-1], setup["batches"], strict=True)]
    ms = [{p: np.zeros_like(x) for p, x in params[0].items()} for _ in range(DEVICES)]
    for t in range(STEPS):
        taus = drawn_taus(key, TAUS, t) if random else TAUS
        total, count = {p: np.zeros_like(x) for p, x in params[0].items()}, 0
        for r, tau in enumerate(taus):
            if t < tau:
                continue
            count += 1
            for p in total:
                g = grads[t - tau][r][p]
                if compensation == "dc_adaptive":
                    ms[r][p] = ms_decay * ms[r][p] + (1 - ms_decay) * g**2
                strength = lam / np.sqrt(ms[r][p] + eps) if compensation == "dc_adaptive" else lam
                total[p] += g + strength * g * g * (params[t][p] - params[t - tau][p])
        for p in total:
            want = params[t][p] - (lr * total[p] / count if count else 0.0)
            np.testing.assert_allclose(params[t + 1][p], want, rtol=1e-5, atol=1e-6, err_msg=p)


@multi
def test_fifo_is_split_over_the_data_axis(setup):
    tx = delay.replica_delayed(optax.sgd(0.1), TAUS, compensation="dc_adaptive")
    step = delay.async_data_parallel(setup["apply_fn"], tx, parallel.make_mesh(data=4, model=2))
    with pytest.raises(ValueError, match=r"len\(taus\)=8 for a mesh whose 'data' axis has 4"):
        step(setup["init"](tx), setup["batches"][0])
    tx = delay.replica_delayed(optax.sgd(0.1), TAUS[:4], compensation="dc_adaptive")
    state, _ = step(setup["init"](tx), setup["batches"][0])
    state, _ = step(state, setup["batches"][1])
    fifo = state.opt_state.past_grads["Dense_0"]["kernel"]
    assert fifo.shape == (4, max(TAUS[:4]) + 1, 16, 16)
    assert fifo.sharding.spec == P("data")
    assert {s.data.shape for s in fifo.addressable_shards} == {(1, 4, 16, 16)}
    for leaf in jax.tree.leaves((state.opt_state.past_params, state.opt_state.mean_square)):
        assert leaf.sharding.spec == P("data") and leaf.shape[0] == 4
    assert state.params["Dense_0"]["kernel"].sharding.spec == P()
    assert state.opt_state.count.sharding.spec == P()


@multi
def test_replica_apply_model_is_rejected(setup):
    tx = delay.replica_delayed(optax.sgd(0.1), (0,) * DEVICES)
    with pytest.raises(ValueError, match="async_data_parallel: the model averages gradients"):
        delay.async_data_parallel(
            parallel.replica_apply(setup["apply_fn"]), tx, parallel.make_mesh()
        )


# ----------------------------------------------------------------------------------------------
# Cross-replica BatchNorm under the model's own axis name (axis_name=)


class NormNet(nn.Module):
    """Dense -> BatchNorm (cross-replica over ``axis_name``, if given) -> Dense."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x)
        return nn.Dense(4)(nn.relu(x))


@pytest.fixture(scope="module")
def norm_net(setup):
    """``run(module, **wrapper_kwargs)``: 3 async steps, zero staleness, of ``module`` from
    one init; ``reference``: the model without an axis name on one device, global batch."""
    batches = setup["batches"][:3]
    variables = NormNet().init(jax.random.key(0), batches[0]["image"][:1], False)
    stats = {"batch_stats": variables["batch_stats"]}

    def init(tx):
        make = lambda: train.init_train_state(
            variables["params"], tx, key=jax.random.key(1), model_state=stats
        )
        return jax.jit(make)()

    def apply_fn(module):
        return train.linen_apply(module, train_kwarg="train")

    def run_async(module, **kwargs):
        tx = delay.replica_delayed(optax.sgd(0.1), (0,) * DEVICES, **kwargs)
        step = delay.async_data_parallel(apply_fn(module), tx, parallel.make_mesh(), **kwargs)
        return run(step, init(tx), batches)

    tx = optax.sgd(0.1)
    reference = run(train.make_train_step(apply_fn(NormNet()), tx), init(tx), batches)
    return types.SimpleNamespace(run=run_async, reference=reference)


def flat_stats(state):
    return dict(select.leaves_with_paths(jax.device_get(state.model_state["batch_stats"])))


@multi
@pytest.mark.parametrize("axis_name", ["batch", "data"])
def test_cross_replica_batchnorm_equals_the_global_batch(norm_net, axis_name):
    """BatchNorm(axis_name=...) under the same async_data_parallel(axis_name=...) ("data": the
    default, not passed) normalizes with the statistics of all 16 examples, not its 2."""
    kwargs = {} if axis_name == "data" else {"axis_name": axis_name}
    states, losses = norm_net.run(NormNet(axis_name), **kwargs)
    ref_states, ref_losses = norm_net.reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    assert_same_params(states[-1], ref_states[-1])
    stats, ref_stats = flat_stats(states[-1]), flat_stats(ref_states[-1])
    assert list(stats) == list(ref_stats)
    for path, x in stats.items():
        np.testing.assert_allclose(x, ref_stats[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert float(np.max(np.abs(stats["BatchNorm_0/mean"]))) > 1e-3  # the statistics moved
    fifo = states[-1].opt_state.past_grads["Dense_0"]["kernel"]
    assert fifo.sharding.spec == P("data")  # on the caller's mesh, whatever the axis name


@multi
def test_per_replica_batchnorm_differs_from_the_global_batch(norm_net):
    """The comparison above is sensitive: without an axis name each replica normalizes with
    its own 2 examples, and the averaged statistics are not the global batch's."""
    states, losses = norm_net.run(NormNet())
    ref_states, ref_losses = norm_net.reference
    assert abs(losses[0] - ref_losses[0]) > 1e-3
    var, ref_var = (flat_stats(s[-1])["BatchNorm_0/var"] for s in (states, ref_states))
    assert float(np.max(np.abs(var - ref_var))) > 1e-3


# ----------------------------------------------------------------------------------------------
# Argument checks (any device count)


@pytest.mark.parametrize(
    "taus, kwargs, error, match",
    [
        ((1, -1), {}, ValueError, r"replica_delayed: taus\[1\] \(replica 1\) must be .*tau=-1"),
        ((), {}, ValueError, r"replica_delayed: taus must name one staleness per replica"),
        (3, {}, TypeError, r"replica_delayed: taus must be a sequence of ints"),
        ((1, 2.0), {}, TypeError, r"replica_delayed: taus\[1\] .*tau=2.0"),
        ((1,), {"compensation": "x"}, ValueError, r"replica_delayed: compensation must be"),
        ((1,), {"random_staleness": True}, ValueError, r"replica_delayed: random_staleness=True"),
        ((1,), {"axis_name": 0}, TypeError, r"replica_delayed: axis_name must be a str"),
    ],
)
def test_replica_delayed_bad_arguments(taus, kwargs, error, match):
    with pytest.raises(error, match=match):
        delay.replica_delayed(optax.sgd(0.1), taus, **kwargs)


def test_replica_delayed_bad_tx():
    with pytest.raises(TypeError, match="replica_delayed: inner must be an optax"):
        delay.replica_delayed(object(), (0,))


@pytest.mark.parametrize("harness", [lambda f: f, jax.jit])
def test_update_outside_shard_map_is_an_error(setup, harness):
    tx = delay.replica_delayed(optax.sgd(0.1), (1,))
    state = tx.init(setup["params"])
    grads = jax.tree.map(jnp.zeros_like, setup["params"])
    with pytest.raises(ValueError, match="update must run per replica inside a shard_map"):
        harness(tx.update)(grads, state)


def test_update_on_a_replicated_fifo_is_an_error(setup):
    tx = delay.replica_delayed(optax.sgd(0.1), (0, 1))
    state = tx.init(setup["params"])
    grads = jax.tree.map(jnp.zeros_like, setup["params"])
    mapped = jax.shard_map(
        lambda g, s: tx.update(g, s)[0],
        mesh=parallel.make_mesh(data=1),
        in_specs=(P(), P()),
        out_specs=P(),
    )
    with pytest.raises(ValueError, match=r"each replica must see its own FIFO row.*got leading"):
        mapped(grads, state)


def test_init_shapes_and_specs(setup):
    tx = delay.replica_delayed(optax.adam(0.1), (0, 2, 1), compensation="dc")
    state = tx.init(setup["params"])
    kernel = setup["params"]["Dense_0"]["kernel"]
    assert state.past_grads["Dense_0"]["kernel"].shape == (3, 3, *kernel.shape)
    assert state.past_params["Dense_0"]["kernel"].dtype == kernel.dtype
    assert state.mean_square is None and state.count.dtype == jnp.int32
    specs = delay.replica_specs({"opt": state, "w": kernel})
    assert specs["w"] == P()
    assert specs["opt"].past_params["Dense_1"]["bias"] == P("data")
    assert all(s == P() for s in jax.tree.leaves(specs["opt"].inner_state))


def test_len_taus_must_match_the_data_axis(setup):
    tx = delay.replica_delayed(optax.sgd(0.1), (0, 1))
    step = delay.async_data_parallel(setup["apply_fn"], tx, parallel.make_mesh(data=1))
    with pytest.raises(ValueError, match=r"len\(taus\)=2 for a mesh whose 'data' axis has 1"):
        step(setup["init"](tx), setup["batches"][0])


def test_state_without_replica_delayed_is_an_error(setup):
    tx = optax.sgd(0.1)
    step = delay.async_data_parallel(setup["apply_fn"], tx, parallel.make_mesh(data=1))
    with pytest.raises(ValueError, match="must hold exactly one mixjax.delay.replica_delayed"):
        step(setup["init"](tx), setup["batches"][0])


def test_axis_name_errors(setup):
    tx = delay.replica_delayed(optax.sgd(0.1), (0,))
    mesh = parallel.make_mesh(data=1)
    with pytest.raises(ValueError, match=r"axis_name='model' is another axis of the mesh"):
        delay.async_data_parallel(setup["apply_fn"], tx, mesh, axis_name="model")
    for bad in (3, "", None):
        with pytest.raises(TypeError, match=r"async_data_parallel: axis_name must be a non-empty"):
            delay.async_data_parallel(setup["apply_fn"], tx, mesh, axis_name=bad)
    batch_only = Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(TypeError, match=r"with a 'data' axis .* got .*'batch', 1"):
        delay.async_data_parallel(setup["apply_fn"], tx, batch_only, axis_name="batch")


def test_replica_delayed_on_another_axis_name_is_an_error(setup):
    tx = delay.replica_delayed(optax.sgd(0.1), (0,))  # on "data"
    mesh = parallel.make_mesh(data=1)
    step = delay.async_data_parallel(setup["apply_fn"], tx, mesh, axis_name="batch")
    with pytest.raises(ValueError, match=r"shard_map over 'data' .*axis_name='data', the same"):
        step(setup["init"](tx), setup["batches"][0])
    tx = delay.replica_delayed(optax.sgd(0.1), (0,), axis_name="batch")
    step = delay.async_data_parallel(setup["apply_fn"], tx, mesh, axis_name="batch")
    state, metrics = step(setup["init"](tx), setup["batches"][0])
    assert np.isfinite(float(metrics["loss"])) and int(state.opt_state.count) == 1
