"""Tests of mixjax.layout: kernel layouts learned from one trace of the model.

The expected axes are computed another way: from the einsum equation of each kernel (the axes
whose letters the output lacks contract, the others are output features), or from Flax's own
documented kernel shapes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import layout, select
from mixjax.layout import Layout


def flat(tree):
    is_leaf = lambda v: v is None or isinstance(v, Layout)  # noqa: E731
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {select.path_str(k): v for k, v in leaves}


def from_equation(equation: str) -> Layout:
    """The layout of the second operand of ``"input,kernel->output"``, read off the letters."""
    inputs, output = equation.split("->")
    x, kernel = inputs.split(",")
    contract = tuple(i for i, c in enumerate(kernel) if c in x and c not in output)
    out = tuple(i for i, c in enumerate(kernel) if c in output and c not in x)
    batch = tuple(i for i, c in enumerate(kernel) if c in output and c in x)
    return Layout("dense", contract, out, batch=batch)


class LinenLM(nn.Module):
    """Tied embeddings, DenseGeneral attention, a conv, an MLP, LayerNorm, dropout."""

    @nn.compact
    def __call__(self, tokens, *, train=False):
        embed = nn.Embed(50, 16)
        h = embed(tokens)
        h = h + nn.MultiHeadDotProductAttention(num_heads=4, deterministic=not train)(h, h)
        h = nn.Dropout(0.1, deterministic=not train)(h)
        h = nn.Conv(8, (3,), padding="SAME")(nn.LayerNorm()(h))
        h = nn.Dense(16)(nn.gelu(h))
        return embed.attend(h)


def test_linen_attention_conv_and_tied_embedding():
    model = LinenLM()
    tokens = jnp.zeros((2, 5), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    found = flat(layout.learn(lambda p, x: model.apply({"params": p}, x), params, tokens))
    attention = "MultiHeadDotProductAttention_0"
    # DenseGeneral q/k/v kernels are (embed, heads, head_dim): "BLE,EHD->BLHD".
    for name in ("query", "key", "value"):
        assert found[f"{attention}/{name}/kernel"] == from_equation("BLE,EHD->BLHD")
        assert found[f"{attention}/{name}/bias"] is None
    assert found[f"{attention}/out/kernel"] == from_equation("BLHD,HDE->BLE")
    # linen Conv kernels are (*window, in, out).
    assert found["Conv_0/kernel"] == Layout("conv", (1,), (2,), window=(0,))
    assert found["Dense_0/kernel"] == from_equation("BLI,IO->BLO")
    assert found["Embed_0/embedding"] == Layout("embedding", (1,), (0,), tied=True)
    for path in ("Conv_0/bias", "Dense_0/bias", "LayerNorm_0/scale", "LayerNorm_0/bias"):
        assert found[path] is None, path
    # The trace is the same in training mode, with dropout's randomness.
    train = lambda p, x: model.apply(  # noqa: E731
        {"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)}
    )
    assert flat(layout.learn(train, params, tokens)) == found


def test_an_untied_embedding_is_a_table_only():
    model = nn.Sequential([nn.Embed(10, 4), nn.Dense(3)])
    tokens = jnp.zeros((2, 3), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    found = flat(layout.learn(lambda p, x: model.apply({"params": p}, x), params, tokens))
    assert found["layers_0/embedding"] == Layout("embedding", (1,), (0,))


class GQA(nnx.Module):
    """Gemma-style grouped-query attention with nnx.Einsum and a fused K/V kernel."""

    Q, KV, OUT = "BTD,NDH->BTNH", "BSD,CKDH->CBSKH", "BTNH,NHD->BTD"

    def __init__(self, rngs):
        self.q = nnx.Einsum(self.Q, (4, 16, 8), rngs=rngs)
        self.kv = nnx.Einsum(self.KV, (2, 2, 16, 8), rngs=rngs)
        self.o = nnx.Einsum(self.OUT, (4, 8, 16), rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, 2, 2, 8)
        k, v = self.kv(x)
        w = jax.nn.softmax(jnp.einsum("BTKGH,BSKH->BKGTS", q, k))
        return self.o(jnp.einsum("BKGTS,BSKH->BTKGH", w, v).reshape(b, t, 4, 8))


def test_nnx_einsum_grouped_query_attention():
    graphdef, state = nnx.split(GQA(nnx.Rngs(0)))
    x = jnp.zeros((2, 5, 16))
    found = flat(layout.learn(lambda s, x: nnx.merge(graphdef, s)(x), state, x))
    assert found["q/kernel"] == from_equation(GQA.Q)
    assert found["kv/kernel"] == from_equation(GQA.KV)
    assert found["o/kernel"] == from_equation(GQA.OUT)
    assert found["q/kernel"] == Layout("dense", (1,), (0, 2))  # N:M must not group heads


def test_conv_2d_with_a_mask_and_fake_quantization_in_between():
    """Transforms between the weight and its matmul (masks, casts, rounding) are followed."""
    model = nn.Sequential([nn.Conv(6, (3, 3)), lambda x: x.reshape(x.shape[0], -1), nn.Dense(4)])
    x = jnp.zeros((1, 5, 5, 2))
    params = model.init(jax.random.key(0), x)["params"]

    def forward(p, x):
        def transformed(w):
            if w.ndim < 2:
                return w
            scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127
            return (jnp.round(w / scale) * scale * (jnp.abs(w) > 0.01)).astype(jnp.bfloat16)

        return model.apply({"params": jax.tree.map(transformed, p)}, x.astype(jnp.bfloat16))

    found = flat(layout.learn(forward, params, x))
    assert found["layers_0/kernel"] == Layout("conv", (2,), (3,), window=(0, 1))
    assert found["layers_2/kernel"] == Layout("dense", (0,), (1,))


class PreNorm(nn.Module):
    """Parameters that meet the activations elementwise, written as ViTs and GPTs write them: a
    class token concatenated to the patches, a position embedding added, a LayerNorm scale."""

    @nn.compact
    def __call__(self, x):
        token = self.param("cls", nn.initializers.normal(0.1), (1, 1, x.shape[-1]))
        x = jnp.concatenate([jnp.broadcast_to(token, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        x = x + self.param("position", nn.initializers.normal(0.1), x.shape[1:])
        return nn.Dense(3)(nn.LayerNorm()(x))


def test_parameters_that_meet_activations_are_not_kernels_even_at_batch_one():
    """At batch 1 a bias, a norm scale or a class token has the activations' shape; what they
    combine with the input is data, never the kernel of the matmul that follows."""
    model = PreNorm()
    x = jnp.ones((1, 4, 6))
    params = model.init(jax.random.key(0), x)["params"]
    found = flat(layout.learn(lambda p, x: model.apply({"params": p}, x), params, x))
    assert found == {
        "Dense_0/bias": None,
        "Dense_0/kernel": Layout("dense", (0,), (1,)),
        "LayerNorm_0/bias": None,
        "LayerNorm_0/scale": None,
        "cls": None,
        "position": None,
    }


def test_reshaped_and_transposed_kernels():
    def forward(p, x):
        w = p["w"].reshape(2, 3, 4).transpose(2, 0, 1)  # (12, 4) -> (4, 2, 3)
        return jnp.einsum("bo,oij->bij", x, w)

    params = {"w": jnp.ones((6, 4))}
    found = flat(layout.learn(forward, params, jnp.ones((1, 4))))
    # Axis 1 (size 4) becomes the contracted "o"; axis 0 (6 = 2 x 3) the output axes "ij".
    assert found["w"] == Layout("dense", (1,), (0,))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(8)(x)), None


def test_scanned_and_rematerialized_layers():
    """nn.scan stacks a layer's kernels (layers, in, out); the body sees one (in, out) slice."""
    stack = nn.scan(
        nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=3
    )()
    x = jnp.zeros((2, 8))
    params = stack.init(jax.random.key(0), x, None)["params"]
    assert params["Dense_0"]["kernel"].shape == (3, 8, 8)
    found = flat(layout.learn(lambda p, x: stack.apply({"params": p}, x, None)[0], params, x))
    assert found["Dense_0/kernel"] == Layout("dense", (1,), (2,))
    assert found["Dense_0/bias"] is None


def test_jit_inside_the_model_and_shape_dtype_structs():
    @jax.jit
    def dense(w, x):
        return x @ w

    params = {"w": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
    found = flat(
        layout.learn(
            lambda p, x: dense(p["w"], x), params, jax.ShapeDtypeStruct((2, 3), jnp.float32)
        )
    )
    assert found["w"] == Layout("dense", (0,), (1,))


def test_override_replaces_the_trace_and_is_checked_against_the_shape():
    params = {"w": jnp.ones((3, 5)), "v": jnp.ones((5,))}
    forward = lambda p, x: x @ p["w"] * p["v"]  # noqa: E731
    given = Layout("dense", (1,), (0,))
    found = flat(layout.learn(forward, params, jnp.ones((2, 3)), override={"w": given}))
    assert found["w"] == given
    with pytest.raises(ValueError, match=r"override names \['nope'\], which params lack"):
        layout.learn(forward, params, jnp.ones((2, 3)), override={"nope": given})
    with pytest.raises(
        ValueError,
        match=r"mixjax\.layout\.learn: leaf 'w' \(3, 5\) float32: the layout's axes must be "
        r"distinct axes of a 2-D leaf \(0\.\.1\)",
    ):
        layout.learn(forward, params, jnp.ones((2, 3)), override={"w": Layout("dense", (2,), (0,))})
    with pytest.raises(ValueError, match="layout kind must be one of"):
        layout.learn(forward, params, jnp.ones((2, 3)), override={"w": Layout("lstm", (0,), (1,))})


def test_a_weight_used_two_ways_is_ambiguous_and_the_error_says_how_to_fix_it():
    def forward(p, x):
        return x @ p["w"] + (x @ p["w"].T).sum()  # (in, out) and (out, in) at once

    with pytest.raises(
        ValueError,
        match=r"leaf 'w' \(4, 4\) float32 is consumed with different layouts \(dense "
        r"contract=\(0,\) out=\(1,\); dense contract=\(1,\) out=\(0,\)\): pass override=",
    ):
        layout.learn(forward, {"w": jnp.ones((4, 4))}, jnp.ones((2, 4)))


def test_an_operation_mixjax_cannot_follow_is_named():
    def forward(p, x):
        w = jnp.fft.fft(p["w"]).real  # not a layout-preserving op
        return x @ p["w"] + x @ w

    with pytest.raises(ValueError, match=r"leaf 'w' \(4, 4\) float32 reaches \['fft'\]"):
        layout.learn(forward, {"w": jnp.ones((4, 4))}, jnp.ones((2, 4)))


def test_a_model_that_rejects_the_example_input():
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    with pytest.raises(ValueError, match=r"the model rejects the example input \(") as err:
        layout.learn(lambda p, x: model.apply({"params": p}, x), params, jnp.ones((1, 7)))
    assert err.value.__cause__ is not None


def test_convention_without_a_model():
    assert layout.convention(np.ones((3, 4))) == Layout("dense", (0,), (1,))
    assert layout.convention(np.ones((3, 3, 2, 4))) == Layout("conv", (2,), (3,), window=(0, 1))
    assert layout.convention(np.ones((3, 2, 4))) == Layout("conv", (1,), (2,), window=(0,))
    assert layout.convention(np.ones(4)) is None
