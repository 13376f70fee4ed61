"""Tests of mixjax.quant: grids, scales, the STE op and the weight transform, against NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixjax
from mixjax import core, quant
from mixjax.quant import grids

# Eager op-by-op dispatch compiles every primitive per shape (seconds on a busy 2-core box), so
# each public function runs eagerly in a few tests and the remaining properties under jit only.


def np_fake_quant(x, scale, zero_point, qmin, qmax):
    """NumPy reference of quantize -> dequantize (codes from x * float32(1 / scale))."""
    inverse = (np.float32(1) / np.asarray(scale, np.float32)).astype(np.float32)
    q = np.clip(np.round(np.asarray(x, np.float32) * inverse) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(np.float32), q


def normal(seed, shape):
    """Test data from NumPy (no per-shape compilation of jax.random in eager tests)."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def make_params(key=0):
    rng = np.random.default_rng(key)
    return {
        "Dense_0": {"kernel": normal(rng, (16, 8)), "bias": jnp.full((8,), 0.3)},
        "Conv_0": {"kernel": normal(rng, (3, 3, 2, 4)) * 0.1, "bias": jnp.zeros(4)},
        "scale": jnp.asarray(rng.uniform(size=8), jnp.float32),
    }


# ---------------------------------------------------------------- grid / qparams


@pytest.mark.parametrize(
    "bits, narrow, expected", [(8, True, (-127, 127)), (8, False, (-128, 127)), (4, True, (-7, 7))]
)
def test_grid(bits, narrow, expected):
    g = quant.grid(bits, narrow_range=narrow)
    assert (g.qmin, g.qmax) == expected and g.bits == bits


@pytest.mark.parametrize("bits", [1, 0, 17, -3])
def test_bits_out_of_range(bits):
    with pytest.raises(
        ValueError, match=rf"fake_quant: bits must be an integer in \[2, 16\], got bits={bits}"
    ):
        quant.fake_quant(bits)


@pytest.mark.parametrize("bits", [2.5, True, "8", None])
def test_bits_not_an_integer(bits):
    with pytest.raises(
        TypeError, match=r"fake_quant: bits must be an integer in \[2, 16\], got bits="
    ):
        quant.fake_quant(bits)


def test_qparams_rules(harness):
    g = quant.grid(8)  # [-128, 127]
    lo, hi = jnp.array([-2.0, 0.5, 0.0, 1.0]), jnp.array([1.0, 3.0, 0.0, 1.0])
    s, z = harness(lambda a, b: quant.qparams(a, b, g, symmetric=True))(lo, hi)
    np.testing.assert_allclose(s, [2 / 127, 3 / 127, 1.0, 1 / 127], rtol=1e-6)
    np.testing.assert_array_equal(z, 0.0)
    s, _ = harness(lambda a, b: quant.qparams(a, b, g, symmetric=True, scale="minmax"))(lo, hi)
    np.testing.assert_allclose(s, [2 / 128, 3 / 127, 1.0, 1 / 127], rtol=1e-6)
    s, z = harness(lambda a, b: quant.qparams(a, b, g, symmetric=False))(lo, hi)
    np.testing.assert_allclose(s, [3 / 255, 3 / 255, 1.0, 1 / 255], rtol=1e-6)
    # lo is widened to 0 for the positive ranges, so their zero point is qmin.
    np.testing.assert_array_equal(z, [np.round(-128 + 2 / (3 / 255)), -128, -128, -128])
    assert s.dtype == jnp.float32 and z.dtype == jnp.float32


def test_qparams_handles_tiny_and_huge_ranges_without_zero_or_inf():
    g = quant.grid(8)
    s, _ = quant.qparams(jnp.float32(-1e-44), jnp.float32(1e-44), g, symmetric=True)
    assert float(s) >= grids.TINY
    s, z = quant.qparams(jnp.float32(-3e38), jnp.float32(3e38), g, symmetric=False)
    assert np.isfinite(s) and np.isfinite(z)


# ---------------------------------------------------------------- fake_quantize op


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_matches_numpy_and_error_is_at_most_half_a_step(harness, bits):
    g = quant.grid(bits, narrow_range=True)
    x = normal(bits, (64, 5)) * jnp.arange(1, 6)
    s = jnp.max(jnp.abs(x), axis=0, keepdims=True) / g.qmax
    y = harness(lambda x, s: quant.fake_quantize(x, s, 0.0, g))(x, s)
    ref, _ = np_fake_quant(x, np.asarray(s), 0.0, g.qmin, g.qmax)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)
    assert np.all(np.abs(np.asarray(y - x)) <= np.asarray(s) / 2 + 1e-6)
    for c in range(5):
        assert len(np.unique(np.asarray(y[:, c]))) <= 2**bits


@pytest.mark.parametrize("harness", [jax.jit], ids=["jit"])
def test_zero_is_exact_also_asymmetric(harness):
    g = quant.grid(4)
    x = jnp.array([0.0, -0.37, 1.91, 0.0, 0.55])
    s, z = quant.qparams(x.min(), x.max(), g, symmetric=False)
    assert float(z) == np.round(float(z)) and g.qmin <= float(z) <= g.qmax
    y = harness(lambda x: quant.fake_quantize(x, s, z, g))(x)
    assert float(y[0]) == 0.0 and float(y[3]) == 0.0


def test_nonfinite_entries_pass_through(harness):
    g = quant.grid(8)
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.5])
    y = harness(lambda x: quant.fake_quantize(x, 0.01, 0.0, g))(x)
    assert np.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf and np.isfinite(y[3])


def test_ste_clipped_and_identity(harness):
    g = quant.grid(4, narrow_range=True)  # [-7, 7]
    s = 0.1
    # u = x / s: inside, at the bounds, within half a step beyond (the clip does not act), and
    # saturated.
    x = jnp.array([0.0, 0.33, -0.7, 0.7, 0.74, -0.73, 0.8, -0.9, 5.0])
    upstream = jnp.arange(1.0, 10.0)

    def grad(ste):
        f = lambda x: jnp.sum(quant.fake_quantize(x, s, 0.0, g, ste=ste) * upstream)
        return harness(jax.grad(f))(x)

    np.testing.assert_array_equal(grad("clipped"), [1, 2, 3, 4, 5, 6, 0, 0, 0])
    np.testing.assert_array_equal(grad("identity"), upstream)


def test_fake_quantize_rejects_bad_ste():
    with pytest.raises(
        ValueError,
        match=r"fake_quantize: ste must be one of \('clipped', 'identity'\), got ste='round'",
    ):
        quant.fake_quantize(jnp.ones(3), 1.0, 0.0, quant.grid(8), ste="round")


def test_lsq_scale_gradient_matches_the_formula(harness):
    g = quant.grid(4, narrow_range=True)
    x = normal(3, (10, 3))
    s = jnp.full((1, 3), 0.2)
    upstream = normal(4, (10, 3))
    gs = 1 / np.sqrt(10 * g.qmax)
    f = lambda x, s: jnp.sum(quant.fake_quantize(x, s, 0.0, g, grad_scale=gs) * upstream)
    _, ds = harness(jax.grad(f, argnums=(0, 1)))(x, s)
    u = np.asarray(x, np.float64) / 0.2
    r = np.round(u)
    per = np.where(r < g.qmin, g.qmin, np.where(r > g.qmax, g.qmax, r - u))
    ref = (np.asarray(upstream) * per).sum(axis=0, keepdims=True) * gs
    np.testing.assert_allclose(ds, ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the weight transform


@pytest.mark.parametrize("per_channel", [True, False])
def test_per_channel_and_per_tensor_scales(harness, per_channel):
    params = make_params()
    t = quant.fake_quant(8, per_channel=per_channel)
    state = harness(t.init)(params)
    w = np.asarray(params["Dense_0"]["kernel"])
    expected = (np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()) / 127
    np.testing.assert_allclose(state.scale["Dense_0"]["kernel"], expected, rtol=1e-6)
    assert state.scale["Dense_0"]["bias"] is None and state.scale["scale"] is None
    assert state.scale["Conv_0"]["kernel"].shape == ((1, 1, 1, 4) if per_channel else ())
    view = harness(t.apply)(params, state)
    ref, _ = np_fake_quant(w, expected, 0.0, -127, 127)
    np.testing.assert_allclose(view["Dense_0"]["kernel"], ref, atol=1e-6)
    np.testing.assert_array_equal(view["Dense_0"]["bias"], params["Dense_0"]["bias"])
    np.testing.assert_array_equal(view["scale"], params["scale"])


@pytest.mark.parametrize("harness", [jax.jit], ids=["jit"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_at_most_2_to_the_bits_values_per_channel(harness, bits):
    params = make_params(bits)
    for symmetric in (True, False):
        t = quant.fake_quant(bits, symmetric=symmetric, narrow_range=False)
        view = harness(t.apply)(params, t.init(params))
        k = np.asarray(view["Conv_0"]["kernel"]).reshape(-1, 4)
        assert max(len(np.unique(k[:, c])) for c in range(4)) <= 2**bits


@pytest.mark.parametrize("harness", [jax.jit], ids=["jit"])
def test_asymmetric_zero_points_are_integers_in_the_grid(harness):
    params = {"w": jnp.asarray(np.random.default_rng(0).uniform(-0.2, 1.0, (20, 6)), jnp.float32)}
    t = quant.fake_quant(4, symmetric=False, narrow_range=False)
    state = harness(t.init)(params)
    z = np.asarray(state.zero_point["w"])
    np.testing.assert_array_equal(z, np.round(z))
    assert z.min() >= -8 and z.max() <= 7 and np.any(z != 0)
    view = harness(t.apply)(params, state)
    ref, _ = np_fake_quant(params["w"], np.asarray(state.scale["w"]), z, -8, 7)
    np.testing.assert_allclose(view["w"], ref, atol=1e-6)


@pytest.mark.parametrize("harness", [jax.jit], ids=["jit"])
def test_all_zero_and_constant_tensors(harness):
    params = {
        "zero": jnp.zeros((4, 3)),
        "const": jnp.full((4, 3), -0.7),
        "tiny": jnp.full((4, 3), 1e-42),
    }
    for t in (
        quant.fake_quant(8),
        quant.fake_quant(4, symmetric=False),
        quant.lsq(4),
    ):
        state = harness(t.init)(params)
        view = harness(t.apply)(params, state)
        for leaf in jax.tree.leaves(state) + jax.tree.leaves(view):
            assert np.all(np.isfinite(leaf))
        for s in jax.tree.leaves(state.scale):
            assert np.all(np.asarray(s) > 0)
        np.testing.assert_array_equal(view["zero"], 0.0)
        if not isinstance(state, quant.LsqState):  # LSQ starts at 2 mean|w| / sqrt(qmax)
            np.testing.assert_allclose(view["const"], -0.7, rtol=1e-6)


@pytest.mark.parametrize("harness", [jax.jit], ids=["jit"])
def test_ste_gradient_reaches_the_weights(harness):
    params = make_params()
    t = quant.fake_quant(4)
    state = t.init(params)
    upstream = normal(9, (16, 8))
    loss = lambda p: jnp.sum(t.apply(p, state)["Dense_0"]["kernel"] * upstream)
    grads = harness(jax.grad(loss))(params)
    # Abs-max scales keep every weight inside the range: the gradient is the upstream one.
    np.testing.assert_array_equal(grads["Dense_0"]["kernel"], upstream)
    np.testing.assert_array_equal(grads["Conv_0"]["kernel"], 0.0)


@pytest.mark.parametrize("harness", [jax.jit], ids=["jit"])
def test_update_recomputes_scales_from_the_new_params(harness):
    params = make_params()
    t = quant.fake_quant(8)
    state = t.init(params)
    doubled = jax.tree.map(lambda x: 2 * x, params)
    new = harness(t.update)(doubled, state, 3)
    np.testing.assert_allclose(
        new.scale["Dense_0"]["kernel"], 2 * state.scale["Dense_0"]["kernel"], rtol=1e-6
    )
    view = harness(t.apply)(doubled, new)
    np.testing.assert_allclose(
        view["Dense_0"]["kernel"],
        doubled["Dense_0"]["kernel"],
        atol=float(new.scale["Dense_0"]["kernel"].max()) / 2,
    )


def test_update_every_refreshes_scales_only_at_multiples(harness):
    params = make_params()
    t = quant.fake_quant(8, update_every=4, per_channel=True)
    state = t.init(params)
    doubled = jax.tree.map(lambda x: 2 * x, params)
    update = harness(t.update)
    kernel = np.asarray(doubled["Dense_0"]["kernel"])
    expected = np.abs(kernel).max(axis=0, keepdims=True) / np.float32(127)
    for step in (0, 4, 8):
        new = update(doubled, state, jnp.asarray(step))
        np.testing.assert_allclose(new.scale["Dense_0"]["kernel"], expected, rtol=1e-6)
        assert new.scale["Dense_0"]["kernel"].dtype == jnp.float32
    for step in (1, 3, 5, 9):
        new = update(doubled, state, jnp.asarray(step))
        for got, old in zip(jax.tree.leaves(new), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(got, old)
            assert got.dtype == old.dtype


@pytest.mark.parametrize("harness", [jax.jit], ids=["jit"])
def test_update_every_one_is_the_per_step_refresh(harness):
    params = make_params()
    doubled = jax.tree.map(lambda x: 2 * x, params)
    every, default = quant.fake_quant(8, update_every=1), quant.fake_quant(8)
    state = default.init(params)
    for step in (1, 3):
        a = harness(every.update)(doubled, state, step)
        b = harness(default.update)(doubled, state, step)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a.scale["Dense_0"]["kernel"], state.scale["Dense_0"]["kernel"])


def masking(mask_tree):
    """A tiny local pruning-like transform: multiplies by a fixed 0/1 mask."""
    return core.ParamTransform(
        init=lambda p: mask_tree,
        apply=lambda p, m: jax.tree.map(lambda x, k: x * k, p, m),
        update=lambda p, m, step, **extra: m,
        constrain=lambda p, m: jax.tree.map(lambda x, k: x * k, p, m),
    )


def test_chain_after_pruning_keeps_zeros(harness):
    params = make_params()
    masks = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(1).uniform(size=x.shape) > 0.5, x.dtype), params
    )
    t = core.chain(masking(masks), quant.fake_quant(4, symmetric=False))
    view = harness(t.apply)(params, harness(t.init)(params))
    for v, m in zip(jax.tree.leaves(view), jax.tree.leaves(masks), strict=True):
        assert np.all(np.asarray(v)[np.asarray(m) == 0] == 0.0)


def test_lsq_init_and_gradient_through_a_chain(harness):
    params = make_params()
    masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), params)
    t = core.chain(
        core.ParamTransform(lambda p: masks, lambda p, m: p, lambda p, m, s, **e: m),
        quant.lsq(4),
    )
    state = t.init(params)
    w = np.asarray(params["Dense_0"]["kernel"])
    np.testing.assert_allclose(
        state[1].scale["Dense_0"]["kernel"],
        2 * np.abs(w).mean(axis=0, keepdims=True) / np.sqrt(7),
        rtol=1e-5,
    )
    upstream = normal(2, (16, 8))

    def loss(p, s):
        return jnp.sum(
            t.apply(p, mixjax.with_learned_state(state, s))["Dense_0"]["kernel"] * upstream
        )

    scales = mixjax.learned_state(state)
    assert scales[0] is None or jax.tree.leaves(scales[0]) == []
    _, g_scales = harness(jax.grad(loss, argnums=(0, 1)))(params, scales)
    s = np.asarray(state[1].scale["Dense_0"]["kernel"], np.float64)
    u = w / s
    r = np.round(u)
    per = np.where(r < -7, -7, np.where(r > 7, 7, r - u))
    ref = (np.asarray(upstream) * per).sum(axis=0, keepdims=True) / np.sqrt(16 * 7)
    np.testing.assert_allclose(g_scales[1].scale["Dense_0"]["kernel"], ref, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(g_scales[1].scale["Conv_0"]["kernel"]) == 0)  # unused in the loss
    # update leaves trained scales alone.
    assert harness(t.update)(params, state, 5)[1].scale["Dense_0"]["kernel"] is not None
    np.testing.assert_array_equal(
        t.update(params, state, 5)[1].scale["Dense_0"]["kernel"],
        state[1].scale["Dense_0"]["kernel"],
    )


def test_works_on_an_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.Dense_0 = nnx.Linear(6, 4, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    t = quant.fake_quant(8, where=".*kernel")
    qstate = t.init(state)
    view = jax.jit(t.apply)(state, qstate)
    w = np.asarray(state["Dense_0"]["kernel"][...])
    ref, _ = np_fake_quant(w, np.abs(w).max(axis=0, keepdims=True) / 127, 0, -127, 127)
    np.testing.assert_allclose(view["Dense_0"]["kernel"][...], ref, atol=1e-6)


# ---------------------------------------------------------------- errors


def test_per_channel_on_a_vector_leaf_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"fake_quant: leaf 'Conv_0/bias' \(4,\) float32: per_channel=True needs ndim >= 2",
    ):
        quant.fake_quant(8, where=".*bias").init(make_params())
    state = quant.fake_quant(8, per_channel=False, where=".*bias").init(make_params())
    assert state.scale["Dense_0"]["bias"].shape == ()


def test_nonfinite_weights_are_rejected_at_init():
    params = make_params()
    params["Dense_0"]["kernel"] = (
        params["Dense_0"]["kernel"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
    )
    with pytest.raises(
        ValueError,
        match=r"fake_quant: leaf 'Dense_0/kernel' \(16, 8\) float32 holds 2 non-finite values",
    ):
        quant.fake_quant(8).init(params)


def test_nonfinite_weights_under_jit_pass_through_and_do_not_spoil_the_scale():
    params = {"w": jnp.array([[1.0, 2.0], [jnp.nan, -4.0]])}
    t = quant.fake_quant(8)
    state = jax.jit(t.init)(params)
    np.testing.assert_allclose(state.scale["w"], [[1 / 127, 4 / 127]], rtol=1e-6)
    view = jax.jit(t.apply)(params, state)
    assert np.isnan(view["w"][1, 0]) and view["w"][1, 1] == -4.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(ste="round"),
            ValueError,
            r"fake_quant: ste must be one of \('clipped', 'identity'\), got ste='round'",
        ),
        (
            dict(scale="mse"),
            ValueError,
            r"fake_quant: scale must be one of \('absmax', 'minmax'\), got scale='mse'",
        ),
        (
            dict(symmetric=False, scale="absmax"),
            ValueError,
            "asymmetric quantization uses scale='minmax'",
        ),
        (
            dict(update_every=0),
            ValueError,
            r"fake_quant: update_every must be an integer >= 1, got update_every=0",
        ),
        (
            dict(update_every=2.0),
            TypeError,
            r"fake_quant: update_every must be an integer >= 1, got update_every=2.0",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quant.fake_quant(4, **kwargs)


def test_state_from_other_params_is_an_error():
    t = quant.fake_quant(8)
    state = t.init(make_params())
    with pytest.raises(
        ValueError, match="fake_quant: the state.scale does not match the params tree"
    ):
        t.apply({"other": jnp.ones((3, 3))}, state)
    other = make_params()
    other["Dense_0"]["kernel"] = jnp.ones((16, 5))
    with pytest.raises(
        ValueError,
        match=r"leaf 'Dense_0/kernel' \(16, 5\) float32: state scale has shape \(1, 8\), "
        r"expected \(1, 5\)",
    ):
        t.apply(other, state)


def test_where_matching_nothing_is_an_error():
    with pytest.raises(
        ValueError, match="mixjax.quant.fake_quant: where='nothing' matches no leaf"
    ):
        quant.fake_quant(8, where="nothing").init(make_params())


@pytest.mark.parametrize("learnable", [False, True])
def test_a_jitted_qat_step_compiles_once(learnable):
    chex.clear_trace_counter()
    params = make_params()
    t = quant.lsq(4) if learnable else quant.fake_quant(4)
    state = t.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s):
        p = jax.tree.map(lambda x: x * 1.01, p)
        return p, t.update(p, s, 0), t.apply(p, s)

    for _ in range(3):
        params, state, _ = step(params, state)


def _bits_run(bits, params, x, y):
    """Three QAT steps of a linear model whose kernel is fake-quantized to ``bits``."""
    t = quant.fake_quant(bits)
    state = t.init(params)
    for step in range(3):
        grads = jax.grad(lambda p, s=state: jnp.mean((x @ t.apply(p, s)["w"] - y) ** 2))(params)
        params = jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)
        state = t.update(params, state, step + 1)
    return t.apply(params, state)["w"]


def test_a_vmapped_bit_width_sweep_equals_separate_runs():
    """Several bit widths train in one compiled program (the width is a traced value)."""
    keys = jax.random.split(jax.random.key(4), 3)
    params = {"w": jax.random.normal(keys[0], (8, 6))}
    x, y = jax.random.normal(keys[1], (32, 8)), jax.random.normal(keys[2], (32, 6))
    widths = [2, 3, 4, 8]
    swept = jax.jit(jax.vmap(lambda b: _bits_run(b, params, x, y)))(jnp.array(widths))
    for i, bits in enumerate(widths):
        alone = np.asarray(_bits_run(bits, params, x, y))
        np.testing.assert_array_equal(np.asarray(swept[i]), alone)
        # per channel: at most 2**bits - 1 values (narrow range) in every output column
        assert max(len(np.unique(alone[:, c])) for c in range(6)) <= 2**bits - 1
    with pytest.raises(TypeError, match="a traced bits must be an integer scalar, got float32"):
        jax.vmap(lambda b: quant.fake_quant(b).init(params)["w"])(jnp.array([4.0, 8.0]))
