"""Group-wise weight quantization (GPTQ-style int4 groups) and compact block-broadcast scales,
against NumPy references that reshape each kernel into its groups."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import export, layout, quant, select
from mixjax.export import records


def normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def np_group_scale(w, axis, g, qmax):
    """absmax per group of ``g`` consecutive entries along ``axis``, as float32 * (1 / qmax)."""
    w = np.asarray(w, np.float32)
    split = (*w.shape[:axis], w.shape[axis] // g, g, *w.shape[axis + 1 :])
    return np.abs(w.reshape(split)).max(axis=axis + 1) * np.float32(1 / qmax)


def np_group_view(w, scale, axis, g, qmax):
    """Quantize -> dequantize with each group's scale repeated over its ``g`` entries."""
    s = np.repeat(scale, g, axis=axis)
    q = np.clip(np.round(np.asarray(w, np.float32) * (np.float32(1) / s)), -qmax, qmax)
    return (q * s).astype(np.float32)


def leaves(tree):
    return dict(select.leaves_with_paths(tree))


# ---------------------------------------------------------------- expand_scale


def test_expand_scale_repeats_groups_for_numpy_and_jax(harness):
    scale = np.arange(6, dtype=np.float32).reshape(3, 2)
    expected = np.repeat(scale, 4, axis=0)  # (12, 2): groups of 4 along axis 0
    np.testing.assert_array_equal(quant.expand_scale(scale, (12, 2)), expected)
    out = harness(lambda s: quant.expand_scale(s, (12, 2)))(jnp.asarray(scale))
    assert isinstance(out, jax.Array)
    np.testing.assert_array_equal(out, expected)
    # Size-1 axes stay 1 (broadcast), full axes stay, () is returned as it is, and fewer axes
    # align to the trailing ones.
    assert quant.expand_scale(np.ones((1, 2)), (12, 2)).shape == (1, 2)
    assert quant.expand_scale(np.float32(3), (12, 2)).shape == ()
    grouped = quant.expand_scale(np.arange(4.0).reshape(2, 2), (3, 4, 2))
    np.testing.assert_array_equal(grouped, np.repeat(np.arange(4.0).reshape(1, 2, 2), 2, axis=1))


def test_expand_scale_gradient_sums_each_group():
    x = normal(0, (8, 3))
    grad = jax.grad(lambda s: jnp.sum(quant.expand_scale(s, (8, 3)) * x))(jnp.ones((2, 3)))
    np.testing.assert_allclose(grad, np.asarray(x).reshape(2, 4, 3).sum(axis=1), rtol=1e-6)


@pytest.mark.parametrize(
    "scale, shape, match",
    [
        ((1, 3), (12, 2), r"a scale of shape \(1, 3\) does not block-broadcast against \(12, 2\)"),
        ((5, 2), (12, 2), r".*\(12, 2\): axis 0 has 5 entries, neither 1, 12 nor a divisor of"),
        ((2, 2, 2), (4, 2), r"a scale of shape \(2, 2, 2\) has more axes than the tensor"),
    ],
)
def test_expand_scale_rejects_what_is_no_block_broadcast(scale, shape, match):
    with pytest.raises(ValueError, match=rf"mixjax\.quant\.expand_scale: {match}"):
        quant.expand_scale(np.ones(scale, np.float32), shape)


# ---------------------------------------------------------------- fake_quant(group_size=...)


@pytest.mark.parametrize(
    "shape, g, axis",
    [
        ((64, 32), 16, 0),  # Dense (in, out): groups along in
        ((2, 64, 32), 32, 1),  # a 3-D kernel without layouts: the convention's axis -2
        ((3, 3, 8, 16), 4, 2),  # Conv (h, w, in, out): groups along in, per window position
    ],
)
def test_groups_without_layouts_match_numpy(harness, shape, g, axis):
    params = {"w": normal(1, shape), "b": jnp.ones(shape[-1])}
    t = quant.fake_quant(4, group_size=g)
    state = harness(t.init)(params)
    expected = np_group_scale(params["w"], axis, g, 7)
    assert state.scale["w"].shape == expected.shape and state.scale["b"] is None
    np.testing.assert_array_equal(state.scale["w"], expected)
    view = harness(t.apply)(params, state)
    np.testing.assert_array_equal(view["w"], np_group_view(params["w"], expected, axis, g, 7))
    np.testing.assert_array_equal(view["b"], params["b"])


class Attention(nn.Module):
    """A DenseGeneral query (embed, heads, head_dim) and output projection (heads, head_dim,
    embed), as in linen attention."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((4, 16), name="query")(x)
        return nn.DenseGeneral(32, axis=(-2, -1), name="out")(h)


@pytest.fixture(scope="module")
def attention():
    x = jnp.zeros((2, 5, 32))
    params = Attention().init(jax.random.key(0), x)["params"]
    fn = lambda p, x: Attention().apply({"params": p}, x)  # noqa: E731
    return params, layout.learn(fn, params, x)


@pytest.mark.parametrize("jit", [False, True])
def test_groups_follow_the_layouts_last_contraction_axis(attention, jit):
    params, layouts = attention
    assert layouts["out"]["kernel"].contract == (0, 1)  # (heads, head_dim) contract
    t = quant.fake_quant(4, group_size=8, layouts=layouts)
    state = (jax.jit(t.init) if jit else t.init)(params)
    # Output projection (heads, head_dim, embed): groups of 8 along head_dim, per head (a group
    # never spans two heads), scales (heads, head_dim / 8, embed).
    out = params["out"]["kernel"]
    expected = np_group_scale(out, 1, 8, 7)
    assert expected.shape == (4, 2, 32)
    np.testing.assert_array_equal(state.scale["out"]["kernel"], expected)
    # Query (embed, heads, head_dim): groups of 8 along embed for every (head, feature).
    query = params["query"]["kernel"]
    np.testing.assert_array_equal(state.scale["query"]["kernel"], np_group_scale(query, 0, 8, 7))
    view = (jax.jit(t.apply) if jit else t.apply)(params, state)
    np.testing.assert_array_equal(view["out"]["kernel"], np_group_view(out, expected, 1, 8, 7))


def test_lsq_groups_start_at_the_mean_of_each_group_and_learn_compact_steps(harness):
    w = normal(2, (32, 4))
    params = {"w": w}
    t = quant.lsq(4, group_size=8)
    state = harness(t.init)(params)
    ref = 2 * np.abs(np.asarray(w)).reshape(4, 8, 4).mean(axis=1) / np.sqrt(7)
    np.testing.assert_allclose(state.scale["w"], ref, rtol=1e-6)
    upstream = normal(3, (32, 4))

    def loss(s):
        return jnp.sum(t.apply(params, quant.LsqState({"w": s}))["w"] * upstream)

    grad = harness(jax.grad(loss))(state.scale["w"])
    # Another way: the already tested op on the expanded scale, its gradient summed per group.
    g = quant.grid(4, narrow_range=True)
    gs = 1 / np.sqrt(8 * g.qmax)
    full = jnp.repeat(state.scale["w"], 8, axis=0)
    per_entry = jax.grad(
        lambda s: jnp.sum(quant.fake_quantize(w, s, 0.0, g, grad_scale=gs) * upstream)
    )(full)
    assert grad.shape == (4, 4)
    np.testing.assert_allclose(grad, np.asarray(per_entry).reshape(4, 8, 4).sum(1), rtol=1e-5)


def test_a_jitted_grouped_step_compiles_once():
    chex.clear_trace_counter()
    params = {"w": normal(4, (64, 16))}
    t = quant.fake_quant(4, group_size=32)
    state = t.init(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s):
        p = jax.tree.map(lambda x: x * 1.01, p)
        return p, t.update(p, s, 0), t.apply(p, s)

    for _ in range(3):
        params, state, _ = step(params, state)
    np.testing.assert_array_equal(state.scale["w"], np_group_scale(params["w"], 0, 32, 7))


def test_group_size_errors(attention):
    params = {"Dense_0": {"kernel": normal(5, (64, 32))}}
    with pytest.raises(
        ValueError,
        match=r"mixjax\.quant\.fake_quant: leaf 'Dense_0/kernel' \(64, 32\) float32: "
        r"group_size=24 does not divide axis 0 \(64 entries\), the input axis \(-2\)",
    ):
        quant.fake_quant(4, group_size=24).init(params)
    att, layouts = attention
    with pytest.raises(
        ValueError,
        match=r"lsq: leaf 'out/kernel' \(4, 16, 32\) float32: group_size=5 does not divide "
        r"axis 1 \(16 entries\), its layout's last contraction axis",
    ):
        quant.lsq(4, group_size=5, layouts=layouts, where="out/kernel").init(att)
    for factory in (quant.fake_quant, quant.lsq):
        with pytest.raises(ValueError, match=r"group_size=32 needs per_channel=True"):
            factory(4, group_size=32, per_channel=False)
        with pytest.raises(
            ValueError, match=r"group_size must be None or an integer >= 1, got group_size=0"
        ):
            factory(4, group_size=0)
    per_channel = quant.fake_quant(4).init(params)
    with pytest.raises(ValueError, match=r"state scale has shape \(1, 32\), expected \(2, 32\)"):
        quant.fake_quant(4, group_size=32).apply(params, per_channel)


# ---------------------------------------------------------------- export


GROUPED = {
    "symmetric": lambda: quant.fake_quant(4, group_size=32),
    "asymmetric": lambda: quant.fake_quant(4, group_size=32, symmetric=False),
    "lsq": lambda: quant.lsq(4, group_size=32),
}


@pytest.mark.parametrize("name", GROUPED)
def test_grouped_export_round_trips_exactly_and_counts_its_scales(tmp_path, name):
    params = {"Dense_0": {"kernel": normal(6, (256, 128), 0.05), "bias": normal(7, (128,))}}
    t = GROUPED[name]()
    symmetric = name != "asymmetric"
    state = t.init(params)
    artifact = export.compress(params, t, state)
    for view in (t.apply(params, state), jax.jit(t.apply)(params, state)):
        np.testing.assert_array_equal(
            artifact.params()["Dense_0"]["kernel"], view["Dense_0"]["kernel"]
        )
    loaded = export.load(export.save(artifact, tmp_path / "g32.mjx"))
    np.testing.assert_array_equal(
        loaded.params()["Dense_0"]["kernel"], artifact.params()["Dense_0"]["kernel"]
    )
    record = artifact.record("Dense_0/kernel")
    assert record["kind"] == "int" and record["bits"] == 4
    decoded = records.decode_int(record, artifact.arrays)
    assert decoded.scale.shape == (8, 128)  # compact: one per group of 32 inputs
    np.testing.assert_array_equal(decoded.scale, np.asarray(state.scale["Dense_0"]["kernel"]))
    n = 256 * 128
    codes, scales = n * 4 // 8, n // 32 * 4  # packed int4 + one float32 per 32 weights
    points = 0 if symmetric else n // 32 * 4  # int32 zero points
    assert records.record_nbytes(record, artifact.arrays) == codes + scales + points
    row = {r.path: r for r in export.table(artifact).rows}["Dense_0/kernel"]
    assert row.bytes_after == codes + scales + points
    if symmetric:  # (4 bits + 32 bits / 32) per weight, plus the bias and the file's headers
        assert 5 * n / 8 < artifact.nbytes < 5 * n / 8 + 128 * 4 + 2000


def test_grouped_layout_scales_export_exactly(attention):
    params, layouts = attention
    t = quant.fake_quant(4, group_size=8, layouts=layouts)
    state = t.init(params)
    artifact = export.compress(params, t, state)
    view = leaves(jax.device_get(jax.jit(t.apply)(params, state)))
    for path, leaf in leaves(artifact.params()).items():
        np.testing.assert_array_equal(leaf, view[path])
    record = artifact.record("out/kernel")
    assert records.decode_int(record, artifact.arrays).scale.shape == (4, 2, 32)
