"""Pruning structures on real layouts (mixjax.layout): N:M along the true contraction axes,
channels as output features, blocks on the (contract, out) matrix, wherever a model puts them.

The expected groups are computed independently: from Flax's documented kernel shapes or from the
einsum equation, never from mixjax.layout itself.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import layout, prune, select
from mixjax.prune import NM, Block, Channel


class Attention(nn.Module):
    """A user's block: DenseGeneral attention (4 heads of 8), a tied embedding, LayerNorm."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(32, 16)
        h = embed(tokens)
        h = h + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)(h, h)
        h = nn.LayerNorm()(h)
        return embed.attend(nn.Dense(16)(h))


@pytest.fixture(scope="module")
def attention():
    model = Attention()
    tokens = jnp.zeros((2, 6), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    params = jax.tree.map(  # distinct magnitudes: no ties
        lambda x: jax.random.normal(jax.random.key(x.size), x.shape), params
    )
    layouts = layout.learn(lambda p, x: model.apply({"params": p}, x), params, tokens)
    return params, layouts


def leaves(tree):
    return dict(select.leaves_with_paths(tree))


def kept_per_group(mask, contract_axes, m):
    """Kept weights of each group of m consecutive entries along the flattened contract axes."""
    mask = np.asarray(mask)
    rest = [a for a in range(mask.ndim) if a not in contract_axes]
    moved = np.moveaxis(mask, contract_axes, range(len(contract_axes)))
    size = int(np.prod([mask.shape[a] for a in contract_axes]))
    flat = moved.reshape(size, -1)
    assert len(rest) == moved.ndim - len(contract_axes)
    return flat.reshape(size // m, m, -1).sum(axis=1)


ATT = "MultiHeadDotProductAttention_0"


@pytest.mark.parametrize("jit", [False, True])
def test_nm_groups_run_along_the_contraction_of_attention_kernels(attention, jit):
    params, layouts = attention
    t = prune.magnitude(None, structure=NM(2, 4), layouts=layouts)
    init = jax.jit(t.init) if jit else t.init
    masks = leaves(init(params).masks)
    # q/k/v kernels (embed, heads, head_dim) contract embed (axis 0): 2 of every 4 along it,
    # for every (head, head_dim) column -- not across heads.
    for name in ("query", "key", "value"):
        kept = kept_per_group(masks[f"{ATT}/{name}/kernel"], [0], 4)
        assert kept.shape == (4, 32) and (kept == 2).all(), name
    # The output kernel (heads, head_dim, embed) contracts heads and head_dim together.
    kept = kept_per_group(masks[f"{ATT}/out/kernel"], [0, 1], 4)
    assert kept.shape == (8, 16) and (kept == 2).all()
    # The same kernels under the rank convention group along axis -2 (the heads of q/k/v):
    plain = leaves(prune.magnitude(None, structure=NM(2, 4)).init(params).masks)
    across_heads = kept_per_group(plain[f"{ATT}/query/kernel"], [1], 4)
    assert (across_heads == 2).all()
    assert not (kept_per_group(plain[f"{ATT}/query/kernel"], [0], 4) == 2).all()


def test_default_selection_with_layouts_leaves_out_embeddings_biases_and_norms(attention):
    params, layouts = attention
    masks = leaves(prune.magnitude(0.5, layouts=layouts).init(params).masks)
    selected = {p for p, m in masks.items() if m is not None}
    assert selected == {f"{ATT}/{n}/kernel" for n in ("query", "key", "value", "out")} | {
        "Dense_0/kernel"
    }
    # Without layouts the rank rule takes the (tied) embedding table too.
    plain = leaves(prune.magnitude(0.5).init(params).masks)
    assert plain["Embed_0/embedding"] is not None


def test_channel_pruning_removes_whole_output_features(attention):
    params, layouts = attention
    t = prune.magnitude(0.25, structure=Channel(), layouts=layouts, where=f"{ATT}/query/kernel")
    mask = np.asarray(leaves(t.init(params).masks)[f"{ATT}/query/kernel"])
    # An output feature of a query kernel is one (head, head_dim) pair: constant along embed.
    assert (mask == mask[:1]).all()
    assert mask[0].sum() == 32 - 8  # a quarter of the 32 features removed
    # The rank convention would remove one head_dim slot in every head at once.
    plain = leaves(prune.magnitude(0.25, structure=Channel(), where=f"{ATT}/query/kernel")
                   .init(params).masks)[f"{ATT}/query/kernel"]  # fmt: skip
    assert (np.asarray(plain) == np.asarray(plain)[:, :1, :]).all()


def test_blocks_tile_the_contract_by_out_matrix(attention):
    params, layouts = attention
    t = prune.magnitude(0.5, structure=Block((4, 8)), layouts=layouts, where=f"{ATT}/out/kernel")
    mask = np.asarray(leaves(t.init(params).masks)[f"{ATT}/out/kernel"])
    matrix = mask.reshape(32, 16)  # (heads * head_dim, embed): the kernel's own C order
    tiles = matrix.reshape(8, 4, 2, 8).transpose(0, 2, 1, 3).reshape(16, 32)
    assert set(tiles.sum(axis=1).tolist()) <= {0, 32} and tiles.sum() == 32 * 8


class GQA(nnx.Module):
    Q = "BTD,NDH->BTNH"

    def __init__(self, rngs):
        self.q = nnx.Einsum(self.Q, (4, 16, 8), rngs=rngs)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (4, 8, 16), rngs=rngs)

    def __call__(self, x):
        return self.o(self.q(x))


def test_nm_on_an_nnx_einsum_kernel_follows_its_equation():
    graphdef, state = nnx.split(GQA(nnx.Rngs(0)))
    x = jnp.zeros((1, 3, 16))
    layouts = layout.learn(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    masks = leaves(prune.magnitude(None, structure=NM(1, 4), layouts=layouts).init(state).masks)
    inputs, _ = GQA.Q.split("->")
    x_spec, kernel_spec = inputs.split(",")
    contracted = [i for i, c in enumerate(kernel_spec) if c in x_spec]  # "D": axis 1
    assert contracted == [1]
    assert (kept_per_group(masks["q/kernel"], contracted, 4) == 1).all()


def test_a_selected_leaf_no_matmul_consumes_is_an_error(attention):
    params, layouts = attention
    with pytest.raises(
        ValueError,
        match=r"mixjax\.prune\.magnitude: leaf 'LayerNorm_0/scale' \(16,\) float32 is selected by "
        r"where= but no matmul, convolution or table lookup consumes it",
    ):
        prune.magnitude(0.5, layouts=layouts, where="LayerNorm_0/scale").init(params)


def test_layouts_that_do_not_mirror_the_params_are_an_error(attention):
    params, layouts = attention
    with pytest.raises(ValueError, match="layouts= must mirror the params"):
        prune.magnitude(0.5, layouts={"w": None}).init(params)
    bad = jax.tree.map(lambda x: x, layouts, is_leaf=layout.is_node)
    bad["Dense_0"]["kernel"] = layout.Layout("dense", (0,), (3,))
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/kernel' \(16, 16\) float32: the layout"):
        prune.magnitude(0.5, layouts=bad).init(params)


def test_skip_incompatible_leaves_what_does_not_fit_dense_with_one_warning():
    params = {"a": {"kernel": jnp.ones((8, 4))}, "head": {"kernel": jnp.ones((6, 10))}}
    with pytest.raises(ValueError, match=r"leaf 'head/kernel' \(6, 10\) float32: N:M 2:4"):
        prune.magnitude(None, structure=NM(2, 4)).init(params)
    t = prune.magnitude(None, structure=NM(2, 4), skip_incompatible=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        masks = leaves(t.init(params).masks)
    assert len(caught) == 1
    assert "left 1 leaves dense: leaf 'head/kernel' (6, 10) float32" in str(caught[0].message)
    assert caught[0].filename == __file__
    assert "head/kernel" not in masks and masks["a/kernel"] is not None  # None: left dense


def test_update_under_jit_keeps_the_layout(attention):
    params, layouts = attention
    t = prune.magnitude(lambda step: 0.5 * jnp.minimum(step / 10, 1.0), structure=NM(2, 4),
                        layouts=layouts, update_every=5)  # fmt: skip
    state = t.init(params)
    eager = t.update(params, state, 10)
    jitted = jax.jit(t.update)(params, state, 10)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert (np.asarray(a) == np.asarray(b)).all()
    kept = kept_per_group(leaves(eager.masks)[f"{ATT}/key/kernel"], [0], 4)
    assert (kept == 2).all()


def _sweep_run(sparsity, params, x, y):
    """Five SGD steps of a linear model pruned to ``sparsity`` (masks refreshed every step)."""
    t = prune.magnitude(sparsity, structure=Block((2, 2)))
    state = t.init(params)
    loss = lambda p: jnp.mean((x @ t.apply(p, state)["w"] - y) ** 2)  # noqa: E731
    for step in range(5):
        grads = jax.grad(loss)(params)
        params = jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)
        state = t.update(params, state, step + 1)
        params = t.apply(params, state)
    return params["w"], state.masks["w"]


def test_a_vmapped_sparsity_sweep_equals_separate_runs():
    """Several sparsity levels train in one compiled program (the sparsity is a traced value)."""
    keys = jax.random.split(jax.random.key(3), 3)
    params = {"w": jax.random.normal(keys[0], (8, 6))}
    x, y = jax.random.normal(keys[1], (32, 8)), jax.random.normal(keys[2], (32, 6))
    levels = jnp.array([0.0, 0.25, 0.5, 0.75])
    swept = jax.jit(jax.vmap(lambda s: _sweep_run(s, params, x, y)))(levels)
    for i, s in enumerate([0.0, 0.25, 0.5, 0.75]):
        weights, mask = _sweep_run(s, params, x, y)
        np.testing.assert_allclose(np.asarray(swept[0][i]), np.asarray(weights), rtol=1e-5)
        assert (np.asarray(swept[1][i]) == np.asarray(mask)).all()
        assert np.asarray(mask).mean() == 1 - s
