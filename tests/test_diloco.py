"""Tests of mixjax.delay.diloco: DiLoCo replicas, streaming fragments, compressed messages.

The multi-device tests run on 4 forced CPU devices in one subprocess (as
tests/test_delay_replicas.py does); the one-replica, message and argument tests run here too.
"""

import flax.linen as nn
import forced_devices
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import replica_setup
from flax import nnx
from jax.sharding import PartitionSpec as P

import mixjax
from mixjax import augment, delay, parallel, prune, select, train
from mixjax.delay import messages, streaming
from mixjax.delay.lowcomm import find_diloco_states
from mixjax.export import bitpack

DEVICES = 4
BATCH = 16
multi = pytest.mark.skipif(jax.device_count() < DEVICES, reason="needs 4 (forced CPU) devices")
COLLECTIVES = {"psum", "all_gather", "all_to_all", "ppermute", "psum_scatter", "reduce_scatter"}


@pytest.mark.skipif(
    jax.device_count() >= DEVICES or forced_devices.in_child(), reason="runs the suite itself"
)
def test_suite_on_4_cpu_devices():
    assert " passed" in forced_devices.rerun(__file__, DEVICES)


@pytest.fixture(scope="module")
def setup():
    return replica_setup.mlp_setup(12, BATCH)


def start(params, tx, mesh, **kwargs):
    state = train.init_train_state(params, tx, key=jax.random.key(1), **kwargs)
    return delay.replicate_state(state, mesh)


def run(step, state, batches):
    losses, sent, states = [], [], []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        sent.append(int(metrics["bytes_sent"]))
        states.append(jax.tree.map(jnp.copy, state))  # the next step donates state
    return states, np.array(losses), np.array(sent)


def leaves(tree):
    return {p: np.asarray(x) for p, x in select.leaves_with_paths(jax.device_get(tree))}


def mesh_of(n):
    return parallel.make_mesh(n, devices=jax.devices()[:n])


# --- equivalences ------------------------------------------------------------------------------


@multi
def test_one_step_syncs_equal_synchronous_data_parallel(setup):
    inner = optax.sgd(0.1, momentum=0.9)  # linear in the gradient: the mean of updates is exact
    tx = delay.diloco(inner, optax.sgd(1.0), sync_every=1)
    mesh = parallel.make_mesh()
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
    states, losses, sent = run(step, start(setup["params"], tx, mesh), setup["batches"][:6])
    sync = train.make_train_step(parallel.replica_apply(setup["apply_fn"]), inner)
    ref = train.init_train_state(setup["params"], inner, key=jax.random.key(1))
    ref_states, ref_losses, _ = run(
        lambda s, b: (lambda out: (out[0], {**out[1], "bytes_sent": 0}))(
            parallel.shard_map_step(sync, mesh)(s, b)
        ),
        ref,
        setup["batches"][:6],
    )
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    synced = delay.synced_state(states[-1])
    for path, x in leaves(synced.params).items():
        np.testing.assert_allclose(x, leaves(ref_states[-1].params)[path], rtol=1e-5, atol=1e-5)
        for r in range(DEVICES):  # every replica holds the synced parameters
            got = leaves(states[-1].params)[path][r]
            np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6, err_msg=path)
    # Like with like: each replica sends one full gradient's bytes per step, as sync DP does.
    assert sent.tolist() == [delay.message_bytes(setup["params"])] * 6
    assert delay.message_bytes(setup["params"]) == 4 * sum(
        x.size for x in jax.tree.leaves(setup["params"])
    )


def test_one_replica_is_the_inner_optimizer_with_a_hand_computed_outer_step(setup):
    h, steps, lr, momentum = 3, 7, 0.7, 0.9
    inner = optax.adamw(1e-2)
    tx = delay.diloco(inner, sync_every=h)  # the default outer: SGD 0.7, Nesterov 0.9
    mesh = mesh_of(1)
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
    states, losses, sent = run(step, start(setup["params"], tx, mesh), setup["batches"][:steps])

    ref_step = train.make_train_step(setup["apply_fn"], inner)
    state = train.init_train_state(setup["params"], inner, key=jax.random.key(1))
    # the one replica folds its index 0 into the key; nothing here is random
    outer = {p: x.astype(np.float64) for p, x in leaves(state.params).items()}
    buf = {p: np.zeros_like(x) for p, x in outer.items()}
    ref_losses = []
    for t, batch in enumerate(setup["batches"][:steps]):
        state, metrics = ref_step(state, batch)
        ref_losses.append(float(metrics["loss"]))
        if (t + 1) % h == 0:
            local = leaves(state.params)
            for p in outer:
                delta = outer[p] - local[p]
                buf[p] = momentum * buf[p] + delta
                outer[p] = outer[p] - lr * (delta + momentum * buf[p])
            tree = jax.tree.unflatten(
                jax.tree.structure(state.params),
                [jnp.asarray(outer[p], jnp.float32) for p in leaves(state.params)],
            )
            state = state._replace(params=tree)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    got = leaves(states[-1].params)
    for p, x in leaves(state.params).items():
        np.testing.assert_allclose(got[p][0], x, rtol=1e-5, atol=1e-5, err_msg=p)
    synced = leaves(delay.synced_state(states[-1]).params)
    for p, x in outer.items():
        np.testing.assert_allclose(synced[p], x, rtol=1e-5, atol=1e-5, err_msg=p)
    full = delay.message_bytes(setup["params"])
    assert sent.tolist() == [0, 0, full, 0, 0, full, 0]


def changed_leaves(states):
    """Per step, the paths whose outer parameters (replica 0's) changed at that step."""
    outer = [leaves(delay.synced_state(s).params) for s in states]
    return [
        {p for p in outer[t] if not np.array_equal(outer[t][p], outer[t - 1][p])}
        for t in range(1, len(outer))
    ]


@multi
@pytest.mark.parametrize(
    "fragments, tau",
    [(3, 0), (4, 2), ((".*Dense_0/.*", ".*Dense_1/kernel", ".*Dense_1/bias"), 1)],
)
def test_fragments_sync_every_leaf_once_per_period(setup, fragments, tau):
    h, steps = 4, 13
    tx = delay.diloco(optax.sgd(0.1), sync_every=h, fragments=fragments, outer_delay=tau)
    mesh = parallel.make_mesh()
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
    state = start(setup["params"], tx, mesh)
    first = jax.tree.map(jnp.copy, state)  # the step donates state
    states, _, sent = run(step, state, setup["batches"] + setup["batches"][:1])
    changes = changed_leaves([first, *states])
    paths = list(leaves(setup["params"]))
    spec = streaming.check_fragments("test", fragments, h)
    members = streaming.partition("test", setup["params"], spec)
    plans = messages.plan_leaves("test", setup["params"], None)
    starts = streaming.offsets(len(members), h)
    for f, run_ in enumerate(members):
        # A fragment's outer parameters move only tau steps after each of its sends.
        lands = [
            t
            for t in range(steps)
            if (t + 1 - tau - starts[f]) % h == 0 and t + 1 - tau >= starts[f]
        ]
        for i in run_:
            moved = [t for t in range(steps) if paths[i] in changes[t]]
            assert moved == lands, (paths[i], moved, lands)
    # Each window of h steps (after the first landing) moves every leaf exactly once.
    for first in range(h - 1 + tau, steps - h + 1):
        window = [p for t in range(first, first + h) for p in changes[t]]
        assert sorted(window) == sorted(paths), (first, window)
    expected = [
        sum(
            plans[i].nbytes
            for f, run_ in enumerate(members)
            if (t + 1 - starts[f]) % h == 0 and t + 1 >= starts[f]
            for i in run_
        )
        for t in range(steps)
    ]
    assert sent.tolist() == expected
    assert sum(sent[:h]) == delay.message_bytes(setup["params"])


# --- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compress", [delay.Quantize(4), delay.Quantize(8, group=2), delay.Quantize(2), delay.TopK(0.2)]
)
def test_error_feedback_keeps_what_was_sent_plus_the_residual(compress):
    x = np.zeros((6, 5), np.float32)
    (plan,) = messages.plan_leaves("test", {"k": x}, compress)
    rng = np.random.default_rng(0)
    residual = jnp.zeros(x.shape, jnp.float32)
    sent_total, true_total = np.zeros(x.shape), np.zeros(x.shape)
    step = jax.jit(lambda d, e: messages.send(plan, d, e))
    for _ in range(20):
        delta = jnp.asarray(rng.normal(size=x.shape) * rng.uniform(0.1, 3), jnp.float32)
        payload, sent, new = step(delta, residual)
        # bit for bit: the message and the new residual add up to what was to be sent
        np.testing.assert_array_equal(np.asarray(sent + new), np.asarray(delta + residual))
        np.testing.assert_array_equal(np.asarray(sent), np.asarray(messages.decode(plan, payload)))
        assert sum(a.size * a.dtype.itemsize for a in payload) == plan.nbytes
        sent_total += np.asarray(sent, np.float64)
        true_total += np.asarray(delta, np.float64)
        residual = new
    np.testing.assert_allclose(sent_total + np.asarray(residual), true_total, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(residual)).max() > 0  # compression did lose something


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantized_messages_pack_codes_as_export_bitpack_does(bits):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(7, 3)), jnp.float32)
    (plan,) = messages.plan_leaves("test", [x], delay.Quantize(bits))
    packed, scale = messages.encode(plan, x)
    assert packed.dtype == jnp.uint8 and scale.shape == (1, 3) and scale.dtype == jnp.float32
    qmax = 2 ** (bits - 1) - 1
    codes = np.clip(np.round(np.asarray(x) / np.asarray(scale)), -qmax, qmax) + qmax
    np.testing.assert_array_equal(np.asarray(packed), bitpack.pack_bits(codes.astype(int), bits))
    assert packed.size == bitpack.packed_size(21, bits)
    err = np.abs(np.asarray(messages.decode(plan, (packed, scale))) - np.asarray(x))
    assert np.all(err <= np.asarray(scale) / 2 + 1e-6)


def test_top_k_messages_keep_the_largest_entries():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(10, 10)), jnp.float32)
    (plan,) = messages.plan_leaves("test", [x], delay.TopK(0.05))
    values, indices = messages.encode(plan, x)
    assert plan.k == 5 and indices.dtype == jnp.int32 and plan.nbytes == 40
    want = np.argsort(-np.abs(np.asarray(x).ravel()))[:5]
    assert sorted(np.asarray(indices).tolist()) == sorted(want.tolist())
    np.testing.assert_array_equal(values, np.asarray(x).ravel()[np.asarray(indices)])


def collective_bytes(jaxpr):
    """The operand bytes of the collectives in each ``cond``'s taken (second) branch, in order,
    and of those outside any cond."""
    per_cond, outside = [], []

    def walk(jaxpr, sink):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in COLLECTIVES:
                sink.append(sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars))
            if eqn.primitive.name == "cond":
                found = []
                walk(eqn.params["branches"][1].jaxpr, found)
                if found:
                    per_cond.append(sum(found))
                continue
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub, sink)

    walk(jaxpr.jaxpr, outside)
    return per_cond, outside


@multi
@pytest.mark.parametrize(
    "compress",
    [None, delay.Quantize(4), delay.Quantize(8, group=4), delay.TopK(0.1)],
)
def test_bytes_counted_are_the_bytes_that_cross_the_replica_axis(setup, compress):
    h = 2
    tx = delay.diloco(optax.sgd(0.1), sync_every=h, fragments=2, compress=compress)
    mesh = parallel.make_mesh()
    # The per-replica program, traced on its own: every collective in it is a message.
    state = train.init_train_state(setup["params"], tx, key=jax.random.key(1))
    pure = train.make_train_step(setup["apply_fn"], tx).pure
    mapped = jax.shard_map(
        pure, mesh=mesh, in_specs=(P(), P("data")), out_specs=(P(), P()), check_vma=False
    )
    per_fragment, outside = collective_bytes(jax.make_jaxpr(mapped)(state, setup["batches"][0]))
    assert outside == [] and len(per_fragment) == 2
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
    _, _, sent = run(step, start(setup["params"], tx, mesh), setup["batches"][:4])
    starts = streaming.offsets(2, h)
    expected = [
        sum(b for f, b in enumerate(per_fragment) if (t + 1 - starts[f]) % h == 0) for t in range(4)
    ]
    assert sent.tolist() == expected
    assert sum(per_fragment) == delay.message_bytes(setup["params"], compress)
    if compress is not None:
        ratio = delay.message_bytes(setup["params"]) / sum(per_fragment)
        assert ratio > 1.5, ratio


@multi
def test_error_feedback_state_lives_per_replica(setup):
    mesh = parallel.make_mesh()
    for feedback in (True, False):
        tx = delay.diloco(
            optax.sgd(0.1), sync_every=2, compress=delay.Quantize(2), error_feedback=feedback
        )
        step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
        states, losses, _ = run(step, start(setup["params"], tx, mesh), setup["batches"][:4])
        (found,) = find_diloco_states(states[-1].opt_state)
        assert np.all(np.isfinite(losses))
        if not feedback:
            assert found.residual is None
            continue
        res = leaves(found.residual)
        assert res["Dense_0/kernel"].shape == (DEVICES, 16, 16)
        assert res["Dense_0/bias"].shape == (DEVICES, 0)  # biases travel dense
        kernel = res["Dense_0/kernel"]
        assert np.abs(kernel).max() > 0 and not np.array_equal(kernel[0], kernel[1])


# --- streaming with delay and compensation ----------------------------------------------------


@multi
def test_compensated_delayed_outer_steps(setup):
    mesh = parallel.make_mesh()
    outers = {}
    for compensation in (None, "dc", "dc_adaptive"):
        tx = delay.diloco(
            optax.adam(1e-2),
            sync_every=3,
            fragments=3,
            outer_delay=2,
            compensation=compensation,
            lam=None if compensation != "dc" else 5.0,
            merge=0.5,
        )
        step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
        states, losses, _ = run(step, start(setup["params"], tx, mesh), setup["batches"][:9])
        assert np.all(np.isfinite(losses))
        (found,) = find_diloco_states(states[-1].opt_state)
        outer = leaves(found.outer_params)["Dense_1/kernel"]  # (R, ...) replicas' copies
        outers[compensation] = outer
        same = all(np.array_equal(outer[0], outer[r]) for r in range(DEVICES))
        # Without compensation the replicas' outer copies agree bit for bit; with it each
        # corrects by its own drift.
        assert same == (compensation is None), compensation
    assert not np.allclose(outers[None], outers["dc"])


# --- the step: composition, user models, harnesses ----------------------------------------------


@multi
def test_steps_per_call_equals_single_steps(setup):
    mesh = parallel.make_mesh()
    tx = delay.diloco(optax.adam(1e-2), sync_every=2, fragments=2, compress=delay.TopK(0.3))
    single = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
    states, losses, sent = run(single, start(setup["params"], tx, mesh), setup["batches"][:4])
    stacked = {k: np.stack([b[k] for b in setup["batches"][:4]]) for k in ("image", "label")}
    multi_step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh, steps_per_call=4)
    state, metrics = multi_step(start(setup["params"], tx, mesh), stacked)
    assert metrics["bytes_sent"].shape == (4,) and metrics["bytes_sent"].dtype == jnp.int32
    np.testing.assert_array_equal(metrics["bytes_sent"], sent)
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5, atol=1e-6)
    for p, x in leaves(state.params).items():
        np.testing.assert_allclose(x, leaves(states[-1].params)[p], rtol=1e-5, atol=1e-6)
    shard = jax.tree.leaves(state.params)[0].sharding
    assert shard.spec == P("data") and shard.mesh.shape["data"] == DEVICES


@multi
def test_with_augmentation_and_a_compression_transform(setup):
    mesh = parallel.make_mesh()
    transform = mixjax.chain(prune.magnitude(0.5), mixjax.quant.fake_quant(8))
    aug = augment.chain(augment.random_flip())
    tx = delay.diloco(optax.adam(1e-2), sync_every=2, compress=delay.Quantize(4))
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh, transform=transform, augment=aug)
    states, losses, _ = run(
        step, start(setup["params"], tx, mesh, transform=transform), setup["batches"][:4]
    )
    assert np.all(np.isfinite(losses))
    kernel = leaves(states[-1].params)["Dense_0/kernel"]
    for r in range(DEVICES):  # the constraint holds on every replica's own parameters
        assert np.mean(kernel[r] == 0) >= 0.5
    evaluate = train.make_eval_step(setup["apply_fn"], transform=transform)
    assert np.isfinite(float(evaluate(delay.synced_state(states[-1]), setup["batches"][0])["loss"]))


class UserNet(nn.Module):
    """A model written the way users write one: BatchNorm and Dropout, a train flag."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x)


def user_net():
    module = UserNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    params = variables.pop("params")
    return params, variables, train.linen_apply(module, train_kwarg="train")


@multi
def test_user_linen_model_with_dropout_and_batchnorm(setup):
    params, variables, apply_fn = user_net()
    mesh = parallel.make_mesh()
    tx = delay.diloco(optax.adamw(1e-2), sync_every=3)
    step = delay.diloco_data_parallel(apply_fn, tx, mesh)
    state = start(params, tx, mesh, model_state=variables)
    states, losses, sent = run(step, state, setup["batches"][:6])
    assert np.all(np.isfinite(losses)) and sent.tolist() == [0, 0, sent[2], 0, 0, sent[2]]
    for t, s in enumerate(states):
        kernel = leaves(s.params)["Dense_0/kernel"]
        # own parameters between syncs; after one, the outer parameters (up to the rounding
        # of the train step's params + updates)
        agree = all(np.allclose(kernel[0], kernel[r], rtol=0, atol=1e-6) for r in range(DEVICES))
        assert agree == ((t + 1) % 3 == 0), t
        stats = leaves(s.model_state)["batch_stats/BatchNorm_0/mean"]
        assert not np.allclose(stats[0], stats[1])  # each replica's own batch statistics
    evaluation = delay.synced_state(states[-1])
    evaluate = train.make_eval_step(apply_fn)
    assert np.isfinite(float(evaluate(evaluation, setup["batches"][0])["loss"]))


@multi
def test_without_jit_equals_with_jit(setup):
    # SGD: Adam's normalisation turns rounding-level differences of tiny gradients into
    # lr-sized steps, so eager and jitted Adam runs part ways without any bug.
    mesh = mesh_of(2)
    tx = delay.diloco(optax.sgd(0.1, momentum=0.9), sync_every=1)  # one step, one sync
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
    batches = [{k: v[:4] for k, v in b.items()} for b in setup["batches"][:1]]
    runs = []
    for eager in (False, True):
        with jax.disable_jit(eager):
            runs.append(run(step, start(setup["params"], tx, mesh), batches))
    (jitted, jitted_losses, jitted_sent), (eager, losses, sent) = runs
    np.testing.assert_allclose(losses, jitted_losses, rtol=1e-5, atol=1e-6)
    assert sent.tolist() == jitted_sent.tolist() and sent[0] > 0
    for p, x in leaves(eager[-1].params).items():
        np.testing.assert_allclose(x, leaves(jitted[-1].params)[p], rtol=1e-4, atol=1e-5)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(16, 8, rngs=rngs)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = self.drop(nnx.relu(self.norm(self.dense(x.reshape((x.shape[0], -1))))))
        return self.out(x)


@multi
def test_nnx_module(setup):
    graphdef, params, model_state = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param, ...)
    apply_fn = train.nnx_apply(graphdef)
    mesh = parallel.make_mesh()
    tx = delay.diloco(optax.adamw(1e-2), sync_every=2, fragments=2, compress=delay.Quantize(8))
    step = delay.diloco_data_parallel(apply_fn, tx, mesh)
    states, losses, sent = run(step, start(params, tx, mesh, model_state=model_state),
                               setup["batches"][:4])  # fmt: skip
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert sum(sent[:2]) == delay.message_bytes(params, delay.Quantize(8))
    evaluation = delay.synced_state(states[-1])
    assert isinstance(evaluation.params, nnx.State)


# --- bad input ---------------------------------------------------------------------------------

NAME = "mixjax.delay.diloco"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sync_every=0), ValueError, "sync_every must be an integer >= 1, got sync_every=0"),
        (dict(sync_every=-2), ValueError, "sync_every must be an integer >= 1"),
        (dict(sync_every=2.0), TypeError, r"sync_every must be an integer >= 1, got .*float"),
        (dict(sync_every=4, fragments=0), ValueError, r"fragments must be an integer in \[1, 4\]"),
        (dict(sync_every=2, fragments=3), ValueError, r"fragments must be an integer in \[1, 2\]"),
        (dict(sync_every=2, fragments="k"), TypeError, "fragments must be an int F"),
        (
            dict(sync_every=2, fragments=()),
            ValueError,
            "fragments must name between 1 and sync_every=2",
        ),
        (
            dict(sync_every=4, outer_delay=4),
            ValueError,
            r"outer_delay must be .* in \[0, 3\]",
        ),
        (dict(sync_every=4, compensation="dc"), ValueError, "needs outer_delay >= 1"),
        (
            dict(sync_every=4, outer_delay=1, compensation="x"),
            ValueError,
            "compensation must be",
        ),
        (dict(sync_every=4, merge=0.0), ValueError, r"merge must be in \(0.0, 1.0\]"),
        (dict(sync_every=4, compress=8), TypeError, "compress must be None, mixjax.delay.Quantize"),
        (
            dict(sync_every=4, compress=delay.Quantize(3)),
            ValueError,
            "bits must be 2, 4 or 8",
        ),
        (dict(sync_every=4, compress=delay.Quantize(4, 0)), ValueError, "compress.group must be"),
        (
            dict(sync_every=4, compress=delay.TopK(0.0)),
            ValueError,
            r"fraction must be in \(0",
        ),
        (dict(sync_every=4, error_feedback=1), TypeError, "error_feedback must be a bool"),
    ],
)
def test_bad_options_raise_in_the_factory(kwargs, error, match):
    with pytest.raises(error, match=f"{NAME}: .*{match}"):
        delay.diloco(optax.sgd(0.1), **kwargs)


def test_bad_transforms_raise_in_the_factory():
    with pytest.raises(TypeError, match=f"{NAME}: inner_tx must be an optax"):
        delay.diloco(None, sync_every=2)
    with pytest.raises(TypeError, match=f"{NAME}: outer_tx must be an optax"):
        delay.diloco(optax.sgd(0.1), "sgd", sync_every=2)


@pytest.mark.parametrize(
    "fragments, match",
    [
        (5, r"fragments=5 do not partition the 4 leaves of the params"),
        (
            ("Dense_0/.*", ".*kernel"),
            r"'Dense_0/kernel' \(16, 16\) float32 is in fragments \[0, 1\]",
        ),
        (
            ("Dense_0/.*", ".*1/kernel"),
            r"'Dense_1/bias' \(4,\) float32 is in no fragment",
        ),
    ],
)
def test_fragments_that_do_not_partition_the_leaves_raise_at_init(setup, fragments, match):
    tx = delay.diloco(optax.sgd(0.1), sync_every=8, fragments=fragments)
    with pytest.raises(ValueError, match=f"{NAME}: .*{match}"):
        tx.init(setup["params"])


def test_empty_fragment_raises_at_init(setup):
    tx = delay.diloco(optax.sgd(0.1), sync_every=8, fragments=(".*", "nothing"))
    with pytest.raises(ValueError, match="fragment 1 \\(where='nothing'\\) selects no leaf"):
        # every leaf matches ".*" only, so the second fragment is empty
        tx.init(setup["params"])


def test_a_compressor_that_cannot_encode_a_leaf_raises_at_init(setup):
    tx = delay.diloco(optax.sgd(0.1), sync_every=2, compress=delay.Quantize(4, group=3))
    with pytest.raises(
        ValueError,
        match=r"mixjax.delay.diloco: leaf 'Dense_0/kernel' \(16, 16\) float32 cannot be encoded "
        r"by Quantize\(bits=4, group=3\): .* its 16 rows .* divisible by group=3",
    ):
        train.init_train_state(setup["params"], tx, key=jax.random.key(0))
    with pytest.raises(ValueError, match="mixjax.delay.diloco: where='nothing' matches no leaf"):
        delay.diloco(optax.sgd(0.1), sync_every=2, compress=delay.TopK(), where="nothing").init(
            setup["params"]
        )


def test_a_sync_larger_than_the_byte_counter_raises_at_init():
    half = jax.ShapeDtypeStruct((2**28,), jnp.float32)  # 1 GiB each, never allocated
    params = {"a": half, "b": half}
    with pytest.raises(ValueError, match=r"fragment 0 of 1 sends 2147483648 bytes .* int32"):
        jax.eval_shape(delay.diloco(optax.sgd(0.1), sync_every=2).init, params)
    state = jax.eval_shape(delay.diloco(optax.sgd(0.1), sync_every=2, fragments=2).init, params)
    assert state.outer_params["a"].shape == half.shape


def test_update_outside_shard_map_and_without_params_raise(setup):
    tx = delay.diloco(optax.sgd(0.1), sync_every=2)
    state = tx.init(setup["params"])
    with pytest.raises(ValueError, match=f"{NAME}: update must run per replica inside a shard_map"):
        tx.update(setup["params"], state, setup["params"])
    with pytest.raises(ValueError, match=f"{NAME}: update needs params"):
        tx.update(setup["params"], state)


def test_step_argument_errors(setup):
    tx = delay.diloco(optax.sgd(0.1), sync_every=2)
    fn = "mixjax.delay.diloco_data_parallel"
    mesh = mesh_of(1)
    with pytest.raises(ValueError, match=f"{fn}: the model averages gradients"):
        delay.diloco_data_parallel(parallel.replica_apply(setup["apply_fn"]), tx, mesh)
    with pytest.raises(TypeError, match=f"{fn}: mesh must be a jax.sharding.Mesh"):
        delay.diloco_data_parallel(setup["apply_fn"], tx, "mesh")
    with pytest.raises(ValueError, match=f"{fn}: steps_per_call must be an integer >= 1"):
        delay.diloco_data_parallel(setup["apply_fn"], tx, mesh, steps_per_call=0)
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, mesh)
    plain = train.init_train_state(setup["params"], tx, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=f"{fn}: the state holds no replica\\(s\\) .*replicate_state"
    ):
        step(plain, setup["batches"][0])
    other = train.init_train_state(setup["params"], optax.sgd(0.1), key=jax.random.key(0))
    with pytest.raises(ValueError, match=f"{fn}: the state's opt_state must hold exactly one"):
        step(delay.replicate_state(other, mesh), setup["batches"][0])


@multi
def test_a_replica_count_that_does_not_match_the_mesh_raises(setup):
    tx = delay.diloco(optax.sgd(0.1), sync_every=2)
    state = start(setup["params"], tx, mesh_of(2))
    step = delay.diloco_data_parallel(setup["apply_fn"], tx, parallel.make_mesh())
    with pytest.raises(
        ValueError,
        match="diloco_data_parallel: the state holds 2 replica\\(s\\) \\(state.step \\(2,\\)\\) "
        "for a mesh whose 'data' axis has 4",
    ):
        step(state, setup["batches"][0])
    named = delay.diloco(optax.sgd(0.1), sync_every=2, axis_name="batch")
    step = delay.diloco_data_parallel(setup["apply_fn"], named, mesh_of(2))
    with pytest.raises(ValueError, match="shard_map over 'batch'"):
        step(start(setup["params"], named, mesh_of(2)), setup["batches"][0])
