"""Tests of mixjax.activations: interception (linen, NNX), modes, calibration, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import quant
from mixjax.quant import activations, observers

LAYERS = ["Conv_0", "Dense_0", "Dense_1"]


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3))(x))
        x = nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1)))
        return nn.Dense(4)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.Conv_0 = nnx.Conv(1, 3, (3, 3), rngs=rngs)
        self.Dense_0 = nnx.Linear(48, 8, rngs=rngs)
        self.Dense_1 = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.Conv_0(x))
        x = nnx.relu(self.Dense_0(x.reshape(x.shape[0], -1)))
        return self.Dense_1(x)


def numpy_init(init_fn, *args, seed=0):
    """Parameters of init_fn's shapes drawn with NumPy: no jax.random kernels to compile."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(init_fn, *args)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.4, s.dtype), shapes)


def nnx_net(params):
    """An NNXNet holding ``params`` (a linen params dict), built without random initialization."""
    model = nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0)))
    nnx.update(model, params)
    return model


def data(seed=0, n=6):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 4, 4, 1)), jnp.float32)


@pytest.fixture(scope="module")
def setup():
    model = Net()
    variables = numpy_init(model.init, jax.random.key(0), data())
    return model, variables, (lambda x: model.apply(variables, x))


def np_qparams(lo, hi):
    """NumPy float32 reference of the asymmetric 8-bit activation grid [-128, 127]."""
    lo, hi = np.float32(min(float(lo), 0.0)), np.float32(max(float(hi), 0.0))
    s = (hi * np.float32(0.5) - lo * np.float32(0.5)) * np.float32(2 / 255)
    return s, np.clip(-128 - np.round(lo * (np.float32(1) / s)), -128, 127)


def np_fq(x, lo, hi):
    s, z = np_qparams(lo, hi)
    scaled = np.asarray(x, np.float32) * (np.float32(1) / s).astype(np.float32)
    q = np.clip(np.round(scaled) + z, -128, 127)
    return ((q - z) * s).astype(np.float32)


def manual_forward(params, x, ranges=None):
    """The quantized forward written out layer by layer; ranges=None means min/max of the input."""
    seen = {}

    def fq(name, h):
        lo, hi = (np.min(h), np.max(h)) if ranges is None else ranges[name]
        seen[name] = (np.min(h), np.max(h))
        return jnp.asarray(np_fq(h, lo, hi))

    p = params["params"]
    h = jax.lax.conv_general_dilated(
        fq("Conv_0", x),
        p["Conv_0"]["kernel"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    h = jax.nn.relu(h + p["Conv_0"]["bias"]).reshape(x.shape[0], -1)
    h = jax.nn.relu(fq("Dense_0", h) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return fq("Dense_1", h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], seen


def test_init_finds_the_dense_and_conv_layers(setup):
    _, _, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, data())
    assert sorted(state) == LAYERS
    assert all(int(s.count) == 0 for s in state.values())
    assert sorted(activations.activation_quant(8, output=True).init(fn, data())) == [
        *LAYERS,
        "__output__",
    ]
    assert sorted(activations.activation_quant(8, where="Dense_.*").init(fn, data())) == LAYERS[1:]


def test_train_mode_matches_the_layerwise_reference(setup, harness):
    model, variables, fn = setup
    x = data()
    act = activations.activation_quant(8, observer=observers.minmax_observer())
    state = act.init(fn, x)
    out, new = harness(lambda s, x: act.apply(fn, s, x, mode="train"))(state, x)
    ref, seen = manual_forward(variables, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for name in LAYERS:
        assert int(new[name].count) == 1
        np.testing.assert_allclose([new[name].min, new[name].max], seen[name], rtol=1e-5, atol=1e-6)


def test_eval_mode_uses_stored_ranges_and_keeps_the_state(setup, harness):
    _, variables, fn = setup
    act = activations.activation_quant(8)
    ranges = {"Conv_0": (-1.0, 1.0), "Dense_0": (0.0, 0.5), "Dense_1": (0.0, 2.0)}
    state = {
        k: observers.ObserverState(jnp.float32(lo), jnp.float32(hi), jnp.int32(3))
        for k, (lo, hi) in ranges.items()
    }
    x = data(1)
    out, same = harness(lambda s, x: act.apply(fn, s, x))(state, x)
    ref, _ = manual_forward(variables, x, ranges)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for k in state:
        np.testing.assert_array_equal(same[k], state[k])


def test_clipped_ste_on_activations(setup):
    _, _, fn = setup
    act = activations.activation_quant(8)
    state = {
        k: observers.ObserverState(jnp.float32(-0.5), jnp.float32(0.5), jnp.int32(1))
        for k in LAYERS
    }
    x = data(2)
    g = jax.jit(jax.grad(lambda x: jnp.sum(act.apply(fn, state, x)[0])))(x)
    saturated = np.abs(np.asarray(x)) > 0.51
    assert saturated.any() and np.all(np.asarray(g)[saturated] == 0)
    assert np.any(np.asarray(g)[~saturated] != 0)
    g_id = jax.jit(
        jax.grad(
            lambda x: jnp.sum(
                activations.activation_quant(8, ste="identity").apply(fn, state, x)[0]
            )
        )
    )(x)
    assert np.any(np.asarray(g_id)[saturated] != 0)


def test_calibrate_mode_is_the_float_forward_and_unobserved_layers_pass_through(setup):
    _, _, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, data())
    x = data(3)
    out, new = jax.jit(lambda s, x: act.apply(fn, s, x, mode="calibrate"))(state, x)
    np.testing.assert_array_equal(out, fn(x))
    assert all(int(new[k].count) == 1 for k in LAYERS)
    out_eval, _ = act.apply(fn, state, x)  # nothing observed yet: nothing quantized
    np.testing.assert_array_equal(out_eval, fn(x))


def test_calibrate_is_deterministic_and_counts_batches(setup):
    _, _, fn = setup
    act = activations.activation_quant(8, observer=observers.percentile_observer(99.0))
    state = act.init(fn, data())
    xs = [data(s) for s in range(4)]
    a = quant.calibrate(act, fn, state, xs)
    b = quant.calibrate(act, fn, state, ((x,) for x in xs + xs), num_batches=4)
    for k in LAYERS:
        np.testing.assert_array_equal(a[k], b[k])
        assert int(a[k].count) == 4


def test_calibrate_errors(setup):
    _, _, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, data())
    with pytest.raises(ValueError, match="calibrate: batches is empty"):
        quant.calibrate(act, fn, state, [])
    with pytest.raises(
        ValueError,
        match="calibrate: num_batches must be None or an integer >= 1, got num_batches=0",
    ):
        quant.calibrate(act, fn, state, [data()], num_batches=0)


def test_output_quantization(setup):
    _, _, fn = setup
    act = activations.activation_quant(8, output=True, observer=observers.minmax_observer())
    x = data(4)
    state = act.init(fn, x)
    out, state = jax.jit(lambda s, x: act.apply(fn, s, x, mode="train"))(state, x)
    s, z = act.qparams(state["__output__"])
    codes = np.asarray(out) / float(s) + float(z)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert act.grid.qmin == -128 and act.grid.qmax == 127
    with pytest.raises(ValueError, match="output=True but the state has no '__output__' entry"):
        act.apply(fn, {k: v for k, v in state.items() if k != "__output__"}, x)
    with pytest.raises(TypeError, match="output=True needs fn to return a float array, got tuple"):
        act.apply(lambda x: (fn(x), fn(x)), state, x)


def test_nonfinite_inputs_propagate_and_do_not_spoil_observers(setup):
    _, _, fn = setup
    act = activations.activation_quant(8)
    x = data(5).at[0, 0, 0, 0].set(jnp.nan)
    state = act.init(fn, x)
    out, state = jax.jit(lambda s, x: act.apply(fn, s, x, mode="train"))(state, x)
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1:]))
    assert all(np.isfinite(state[k].min) and np.isfinite(state[k].max) for k in LAYERS)


def test_nnx_path_matches_linen(setup):
    _, variables, fn = setup
    model = nnx_net(variables["params"])
    reference = model(data())
    assert activations.instrument(model) is model
    activations.instrument(model)  # idempotent
    np.testing.assert_array_equal(model(data()), reference)  # no apply running: plain ops
    act = activations.activation_quant(8, observer=observers.minmax_observer())
    state = act.init(model, data())
    assert sorted(state) == LAYERS

    @nnx.jit
    def step(model, state, x):
        return act.apply(model, state, x, mode="train")

    out, new = step(model, state, data())
    out_linen, new_linen = jax.jit(lambda s, x: act.apply(fn, s, x, mode="train"))(state, data())
    np.testing.assert_allclose(out, out_linen, rtol=1e-5, atol=1e-6)
    for k in LAYERS:
        np.testing.assert_allclose(new[k], new_linen[k], rtol=1e-6)
    graphdef, params = nnx.split(model)

    def loss(params, state, x):
        out, state = act.apply(nnx.merge(graphdef, params), state, x, mode="train")
        return jnp.sum(out**2), state

    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, state, data())
    assert np.all(np.isfinite(grads["Dense_0"]["kernel"][...]))


def test_errors(setup):
    _, _, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, data())
    with pytest.raises(
        ValueError, match=r"mode must be one of \('train', 'eval', 'calibrate'\), got mode='fit'"
    ):
        act.apply(fn, state, data(), mode="fit")
    with pytest.raises(TypeError, match="state must be the dict made by init, got list"):
        act.apply(fn, [], data())
    with pytest.raises(
        ValueError,
        match=r"layer 'Dense_1' has no observer state \(the state has \['Conv_0', 'Dense_0'\]\)",
    ):
        act.apply(fn, {k: state[k] for k in LAYERS[:2]}, data())
    with pytest.raises(ValueError, match="init found no Dense/Conv layer to quantize"):
        act.init(lambda x: x * 2, data())
    with pytest.raises(ValueError, match="init found no Dense/Conv layer to quantize"):
        act.init(nnx_net(setup[1]["params"]), data())  # NNX without instrument
    with pytest.raises(TypeError, match="observer must be a mixjax.quant.Observer, got function"):
        activations.activation_quant(8, observer=lambda s, x: s)
    with pytest.raises(
        ValueError,
        match=r"quant.activation_quant: bits must be an integer in \[2, 16\], got bits=1",
    ):
        activations.activation_quant(1)
    with pytest.raises(ValueError, match="quant.activation_quant: ste must be one of"):
        activations.activation_quant(8, ste="none")
    with pytest.raises(TypeError, match="instrument: model must be an nnx.Module, got Net"):
        activations.instrument(Net())


def test_a_jitted_train_step_compiles_once(setup):
    chex.clear_trace_counter()
    _, _, fn = setup
    act = activations.activation_quant(8, output=True)
    state = act.init(fn, data())

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, x):
        return act.apply(fn, state, x, mode="train")[1]

    for seed in range(3):
        state = step(state, data(seed))
    assert all(int(s.count) == 3 for s in state.values())
