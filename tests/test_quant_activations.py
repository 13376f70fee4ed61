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

LAYERS = ["Conv_0/kernel", "Dense_0/kernel", "Dense_1/kernel"]


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
    params = numpy_init(model.init, jax.random.key(0), data())["params"]
    return model, params, (lambda p, x: model.apply({"params": p}, x))


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

    p = params
    h = jax.lax.conv_general_dilated(
        fq("Conv_0/kernel", x),
        p["Conv_0"]["kernel"],
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    h = jax.nn.relu(h + p["Conv_0"]["bias"]).reshape(x.shape[0], -1)
    h = jax.nn.relu(fq("Dense_0/kernel", h) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return fq("Dense_1/kernel", h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], seen


def test_init_finds_the_dense_and_conv_layers(setup):
    _, P, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, P, data())
    assert sorted(state) == LAYERS
    assert all(int(s.count) == 0 for s in state.values())
    assert sorted(activations.activation_quant(8, output=True).init(fn, P, data())) == [
        *LAYERS,
        "__output__",
    ]
    assert (
        sorted(activations.activation_quant(8, where="Dense_.*").init(fn, P, data())) == LAYERS[1:]
    )


def test_train_mode_matches_the_layerwise_reference(setup, harness):
    model, P, fn = setup
    x = data()
    act = activations.activation_quant(8, observer=observers.minmax_observer())
    state = act.init(fn, P, x)
    out, new = harness(lambda s, x: act.apply(fn, s, P, x, mode="train"))(state, x)
    ref, seen = manual_forward(P, x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for name in LAYERS:
        assert int(new[name].count) == 1
        np.testing.assert_allclose([new[name].min, new[name].max], seen[name], rtol=1e-5, atol=1e-6)


def test_eval_mode_uses_stored_ranges_and_keeps_the_state(setup, harness):
    _, P, fn = setup
    act = activations.activation_quant(8)
    ranges = dict(zip(LAYERS, [(-1.0, 1.0), (0.0, 0.5), (0.0, 2.0)], strict=True))
    state = {
        k: observers.ObserverState(jnp.float32(lo), jnp.float32(hi), jnp.int32(3))
        for k, (lo, hi) in ranges.items()
    }
    x = data(1)
    out, same = harness(lambda s, x: act.apply(fn, s, P, x))(state, x)
    ref, _ = manual_forward(P, x, ranges)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for k in state:
        np.testing.assert_array_equal(same[k], state[k])


def test_clipped_ste_on_activations(setup):
    _, P, fn = setup
    act = activations.activation_quant(8)
    state = {
        k: observers.ObserverState(jnp.float32(-0.5), jnp.float32(0.5), jnp.int32(1))
        for k in LAYERS
    }
    x = data(2)
    g = jax.jit(jax.grad(lambda x: jnp.sum(act.apply(fn, state, P, x)[0])))(x)
    saturated = np.abs(np.asarray(x)) > 0.51
    assert saturated.any() and np.all(np.asarray(g)[saturated] == 0)
    assert np.any(np.asarray(g)[~saturated] != 0)
    g_id = jax.jit(
        jax.grad(
            lambda x: jnp.sum(
                activations.activation_quant(8, ste="identity").apply(fn, state, P, x)[0]
            )
        )
    )(x)
    assert np.any(np.asarray(g_id)[saturated] != 0)


def test_calibrate_mode_is_the_float_forward_and_unobserved_layers_pass_through(setup):
    _, P, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, P, data())
    x = data(3)
    out, new = jax.jit(lambda s, x: act.apply(fn, s, P, x, mode="calibrate"))(state, x)
    np.testing.assert_array_equal(out, fn(P, x))
    assert all(int(new[k].count) == 1 for k in LAYERS)
    out_eval, _ = act.apply(fn, state, P, x)  # nothing observed yet: nothing quantized
    np.testing.assert_array_equal(out_eval, fn(P, x))


def test_calibrate_is_deterministic_and_counts_batches(setup):
    _, P, fn = setup
    act = activations.activation_quant(8, observer=observers.percentile_observer(99.0))
    state = act.init(fn, P, data())
    xs = [data(s) for s in range(4)]
    a = quant.calibrate(act, fn, P, state, xs)
    b = quant.calibrate(act, fn, P, state, ((x,) for x in xs + xs), num_batches=4)
    for k in LAYERS:
        np.testing.assert_array_equal(a[k], b[k])
        assert int(a[k].count) == 4


def test_calibrate_errors(setup):
    _, P, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, P, data())
    with pytest.raises(ValueError, match="calibrate: batches is empty"):
        quant.calibrate(act, fn, P, state, [])
    with pytest.raises(
        ValueError,
        match="calibrate: num_batches must be None or an integer >= 1, got num_batches=0",
    ):
        quant.calibrate(act, fn, P, state, [data()], num_batches=0)


def test_output_quantization(setup):
    _, P, fn = setup
    act = activations.activation_quant(8, output=True, observer=observers.minmax_observer())
    x = data(4)
    state = act.init(fn, P, x)
    out, state = jax.jit(lambda s, x: act.apply(fn, s, P, x, mode="train"))(state, x)
    s, z = act.qparams(state["__output__"])
    codes = np.asarray(out) / float(s) + float(z)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert act.grid.qmin == -128 and act.grid.qmax == 127
    with pytest.raises(ValueError, match="output=True but the state has no '__output__' entry"):
        act.apply(fn, {k: v for k, v in state.items() if k != "__output__"}, P, x)
    with pytest.raises(TypeError, match="output=True needs fn to return a float array, got dict"):
        act.apply(lambda p, x: {"logits": fn(p, x)}, state, P, x)
    # (logits, model_state), as a training-step model returns: the logits are quantized.
    (pair, extra), _ = act.apply(lambda p, x: (fn(p, x), x), state, P, x)
    np.testing.assert_array_equal(pair, out)
    np.testing.assert_array_equal(extra, x)


def test_nonfinite_inputs_propagate_and_do_not_spoil_observers(setup):
    _, P, fn = setup
    act = activations.activation_quant(8)
    x = data(5).at[0, 0, 0, 0].set(jnp.nan)
    state = act.init(fn, P, x)
    out, state = jax.jit(lambda s, x: act.apply(fn, s, P, x, mode="train"))(state, x)
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1:]))
    assert all(np.isfinite(state[k].min) and np.isfinite(state[k].max) for k in LAYERS)


def test_nnx_path_matches_linen(setup):
    """An NNX model (merged from its state inside fn) has the same sites as the linen one."""
    _, P, fn = setup
    graphdef, params = nnx.split(nnx_net(P))
    nnx_fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    act = activations.activation_quant(8, observer=observers.minmax_observer())
    state = act.init(nnx_fn, params, data())
    assert sorted(state) == LAYERS
    out, new = jax.jit(lambda s, x: act.apply(nnx_fn, s, params, x, mode="train"))(state, data())
    out_linen, new_linen = jax.jit(lambda s, x: act.apply(fn, s, P, x, mode="train"))(state, data())
    np.testing.assert_allclose(out, out_linen, rtol=1e-5, atol=1e-6)
    for k in LAYERS:
        np.testing.assert_allclose(new[k], new_linen[k], rtol=1e-6)

    def loss(params, state, x):
        out, state = act.apply(nnx_fn, state, params, x, mode="train")
        return jnp.sum(out**2), state

    grads, _ = jax.jit(jax.grad(loss, has_aux=True))(params, state, data())
    assert np.all(np.isfinite(grads["Dense_0"]["kernel"][...]))


class Attention(nn.Module):
    """Self-attention written as users write it: a learned position embedding and a LayerNorm
    (parameters that meet the activations elementwise: still activations), DenseGeneral
    projections, an einsum between activations (not a site), an Embed whose table also decodes
    (tied)."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 8)
        position = self.param("position", nn.initializers.normal(0.1), (tokens.shape[1], 8))
        x = nn.LayerNorm()(embed(tokens) + position)
        q, k, v = (nn.DenseGeneral((2, 4), name=n)(x) for n in "qkv")
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return embed.attend(nn.DenseGeneral(8, axis=(-2, -1), name="out")(mixed))


class GQA(nnx.Module):
    """NNX grouped-query attention projections with nnx.Einsum (a fused kv kernel)."""

    def __init__(self, rngs):
        self.q = nnx.Einsum("btd,dnh->btnh", (8, 4, 2), rngs=rngs)
        self.kv = nnx.Einsum("btd,cdkh->cbtkh", (2, 8, 2, 2), rngs=rngs)
        self.out = nnx.Einsum("btnh,nhd->btd", (4, 2, 8), rngs=rngs)

    def __call__(self, x):
        q = self.q(x)
        k, v = self.kv(x)
        k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
        return self.out(jnp.einsum("bnts,bsnh->btnh", w, v))


def test_attention_sites_are_the_parameter_matmuls_of_any_layer_type():
    model = Attention()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 5)))
    params = numpy_init(model.init, jax.random.key(0), tokens)["params"]
    fn = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    act = activations.activation_quant(8, observer=observers.minmax_observer())
    state = act.init(fn, params, tokens)
    # The lookup and the activation x activation einsums are not sites; the tied decode is.
    assert list(state) == ["q/kernel", "k/kernel", "v/kernel", "out/kernel", "Embed_0/embedding@1"]
    out, new = jax.jit(lambda s, t: act.apply(fn, s, params, t, mode="train"))(state, tokens)
    x = fn(params, tokens)
    assert out.shape == x.shape == (3, 5, 11)
    assert all(int(s.count) == 1 for s in new.values())
    assert not np.allclose(out, x)  # quantized

    gqa = GQA(nnx.Rngs(0))
    graphdef, nnx_params = nnx.split(gqa)
    nnx_fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    x = data(6).reshape(2, 6, 8)
    state = act.init(nnx_fn, nnx_params, x)
    assert list(state) == ["q/kernel", "kv/kernel", "out/kernel"]


def test_parameters_used_inside_a_scan_are_named_in_a_warning():
    rng = np.random.default_rng(0)
    params = {
        "stack": jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
    }

    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["stack"])
        return h @ p["head"]

    act = activations.activation_quant(8)
    with pytest.warns(UserWarning, match=r"not quantized: \{'stack': 'scan'\}"):
        state = act.init(fn, params, jnp.ones((2, 4)))
    assert list(state) == ["head"]


def test_errors(setup):
    _, P, fn = setup
    act = activations.activation_quant(8)
    state = act.init(fn, P, data())
    with pytest.raises(
        ValueError, match=r"mode must be one of \('train', 'eval', 'calibrate'\), got mode='fit'"
    ):
        act.apply(fn, state, P, data(), mode="fit")
    with pytest.raises(TypeError, match="state must be the dict made by init, got list"):
        act.apply(fn, [], P, data())
    with pytest.raises(
        ValueError,
        match=r"site 'Dense_1/kernel' has no observer state \(the state has "
        r"\['Conv_0/kernel', 'Dense_0/kernel'\]\)",
    ):
        act.apply(fn, {k: state[k] for k in LAYERS[:2]}, P, data())
    with pytest.raises(ValueError, match="init found no matmul or convolution of a parameter"):
        act.init(lambda p, x: x * 2, P, data())
    with pytest.raises(ValueError, match=r"the model rejects its input \(ScopeParamShapeError"):
        act.init(fn, P, data()[..., 0])  # the conv needs a channel axis
    with pytest.raises(TypeError, match="observer must be a mixjax.quant.Observer, got function"):
        activations.activation_quant(8, observer=lambda s, x: s)
    with pytest.raises(
        ValueError,
        match=r"quant.activation_quant: bits must be an integer in \[2, 16\], got bits=1",
    ):
        activations.activation_quant(1)
    with pytest.raises(ValueError, match="quant.activation_quant: ste must be one of"):
        activations.activation_quant(8, ste="none")
    with pytest.raises(TypeError, match="act must be a mixjax.quant.ActivationQuant, got int"):
        activations.quantized_apply(fn, 8)


def test_a_jitted_train_step_compiles_once(setup):
    chex.clear_trace_counter()
    _, P, fn = setup
    act = activations.activation_quant(8, output=True)
    state = act.init(fn, P, data())

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, x):
        return act.apply(fn, state, P, x, mode="train")[1]

    for seed in range(3):
        state = step(state, data(seed))
    assert all(int(s.count) == 3 for s in state.values())
