"""Per-channel quantization on real layouts: one scale per output feature of every kernel,
wherever the model puts its output axes (mixjax.layout). Expected scales are computed here with
NumPy from the kernels' documented shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import export, layout, quant, select


class Attention(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(32, 16)
        h = embed(tokens)
        h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(h, h)
        return embed.attend(h)


ATT = "MultiHeadDotProductAttention_0"


@pytest.fixture(scope="module")
def attention():
    model = Attention()
    tokens = jnp.zeros((2, 6), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    layouts = layout.learn(lambda p, x: model.apply({"params": p}, x), params, tokens)
    return params, layouts


def leaves(tree):
    return dict(select.leaves_with_paths(tree))


@pytest.mark.parametrize("jit", [False, True])
def test_query_scales_are_per_head_and_feature(attention, jit):
    params, layouts = attention
    t = quant.fake_quant(8, layouts=layouts)
    state = (jax.jit(t.init) if jit else t.init)(params)
    scales = leaves(state.scale)
    kernel = np.asarray(params[ATT]["query"]["kernel"])  # (embed, heads, head_dim)
    expected = np.abs(kernel).max(axis=0, keepdims=True) / 127
    np.testing.assert_allclose(np.asarray(scales[f"{ATT}/query/kernel"]), expected, rtol=1e-6)
    out = np.asarray(params[ATT]["out"]["kernel"])  # (heads, head_dim, embed)
    assert scales[f"{ATT}/out/kernel"].shape == (1, 1, 16)
    np.testing.assert_allclose(
        np.asarray(scales[f"{ATT}/out/kernel"]),
        np.abs(out).max(axis=(0, 1), keepdims=True) / 127,
        rtol=1e-6,
    )
    # The rank convention shares one scale across the 4 heads of each head_dim slot.
    plain = leaves(quant.fake_quant(8, where=f"{ATT}/query/kernel").init(params).scale)
    assert plain[f"{ATT}/query/kernel"].shape == (1, 1, 8)


def test_embeddings_are_quantized_only_when_asked_and_then_per_row(attention):
    params, layouts = attention
    scales = leaves(quant.fake_quant(8, layouts=layouts).init(params).scale)
    assert "Embed_0/embedding" not in scales
    asked = quant.fake_quant(8, layouts=layouts, where="Embed_0/embedding").init(params)
    assert leaves(asked.scale)["Embed_0/embedding"].shape == (32, 1)  # one scale per token


class FusedKV(nnx.Module):
    def __init__(self, rngs):
        self.kv = nnx.Einsum("BSD,CKDH->CBSKH", (2, 2, 16, 8), rngs=rngs)

    def __call__(self, x):
        k, v = self.kv(x)
        return k + v


def test_fused_key_value_kernel_gets_separate_scales():
    graphdef, state = nnx.split(FusedKV(nnx.Rngs(0)))
    x = jnp.zeros((1, 3, 16))
    layouts = layout.learn(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    scales = leaves(quant.fake_quant(8, layouts=layouts).init(state).scale)
    kernel = np.asarray(state["kv"]["kernel"][...])
    # "CKDH": D contracts, C (key/value), K (kv heads) and H are output features.
    expected = np.abs(kernel).max(axis=2, keepdims=True) / 127
    np.testing.assert_allclose(np.asarray(scales["kv/kernel"]), expected, rtol=1e-6)


def test_lsq_step_sizes_follow_the_layout(attention):
    params, layouts = attention
    state = quant.lsq(4, layouts=layouts).init(params)
    assert leaves(state.scale)[f"{ATT}/key/kernel"].shape == (1, 4, 8)


def test_a_per_channel_leaf_without_a_layout_is_an_error(attention):
    params, layouts = attention
    with pytest.raises(
        ValueError,
        match=rf"mixjax\.quant\.fake_quant: leaf '{ATT}/query/bias' \(4, 8\) float32 is selected "
        r"by where= but no matmul, convolution or table lookup consumes it",
    ):
        quant.fake_quant(8, layouts=layouts, where=f"{ATT}/query/bias").init(params)
    t = quant.fake_quant(8, per_channel=False, layouts=layouts, where=f"{ATT}/query/bias")
    assert leaves(t.init(params).scale)[f"{ATT}/query/bias"].shape == ()


def test_per_feature_scales_export_exactly(attention):
    params, layouts = attention
    t = quant.fake_quant(8, layouts=layouts)
    state = t.init(params)
    artifact = export.compress(params, t, state)
    view = jax.device_get(t.apply(params, state))
    for (path, a), (_, b) in zip(
        select.leaves_with_paths(artifact.params()), select.leaves_with_paths(view), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
    assert artifact.record(f"{ATT}/query/kernel")["kind"] in ("int", "codebook")
