"""mixjax.oneshot: layer-by-layer one-shot compression of whole models (linen and NNX), and that
its result is what mixjax's transforms, training step, export and integer inference take."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixjax import calibrate, export, oneshot, prune, quant, train
from mixjax import layout as layout_lib
from mixjax.quant import grids


def rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def correlated(seed, shape):
    """Inputs whose features are strongly correlated (where GPTQ beats rounding)."""
    mix = rand(seed + 1, (shape[-1], shape[-1])) + 2.0 * jnp.eye(shape[-1])
    return rand(seed, shape) @ mix


class Block(nn.Module):
    """A transformer-ish block: DenseGeneral attention projections, an MLP and a head."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 16), name="q")(x)
        k = nn.DenseGeneral((2, 16), name="k")(x)
        v = nn.DenseGeneral((2, 16), name="v")(x)
        w = jax.nn.softmax(jnp.einsum("blnh,bmnh->bnlm", q, k) / 4.0)
        x = x + nn.DenseGeneral(32, axis=(-2, -1), name="o")(jnp.einsum("bnlm,bmnh->blnh", w, v))
        x = x + nn.Dense(32, name="down")(jax.nn.gelu(nn.Dense(64, name="up")(x)))
        return nn.Dense(10, name="head")(x.mean(1))


@pytest.fixture(scope="module")
def block():
    model = Block()
    x = correlated(0, (8, 6, 32))
    params = model.init(jax.random.key(1), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return fn, params, [x[:4], x[4:]]


KERNELS = [
    "q/kernel",
    "k/kernel",
    "v/kernel",
    "o/kernel",
    "up/kernel",
    "down/kernel",
    "head/kernel",
]


def leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_gptq_result_is_its_transforms_fixed_point_and_exports(block):
    fn, params, batches = block
    result = oneshot.compress(quant.gptq(4, group_size=16), fn, params, batches)
    assert [r.path for r in result.layers] == KERNELS  # evaluation order
    assert leaves_equal(result.transform.apply(result.params, result.state), result.params)
    assert leaves_equal(result.params["q"]["bias"], params["q"]["bias"])  # biases untouched
    scale = result.state.scale["o"]["kernel"]  # (heads, head_dim, embed): groups on head_dim
    assert scale.shape == (2, 1, 32)
    artifact = export.compress(result.params, result.transform, result.state)
    assert artifact.record("up/kernel")["bits"] == 4
    assert leaves_equal(artifact.params(), result.params)
    int_model = export.integer_model(fn, artifact, batches[0])
    out = export.integer_apply(int_model, fn, artifact.params(), batches[0])
    np.testing.assert_allclose(out, fn(result.params, batches[0]), rtol=1e-4, atol=1e-4)


def test_gptq_beats_rounding_layer_by_layer_and_end_to_end(block):
    fn, params, batches = block
    gptq = oneshot.compress(quant.gptq(3, group_size=16), fn, params, batches)
    rtn = oneshot.compress(quant.rtn(3, group_size=16), fn, params, batches)
    assert np.isnan(rtn.layers[0].error)  # rounding reads no inputs
    first = oneshot.compress(quant.rtn(3, group_size=16), fn, params, batches[:1])
    assert leaves_equal(first.params, rtn.params)  # nor any calibration data
    x = jnp.concatenate(batches)
    ref = fn(params, x)
    err = lambda r: float(jnp.mean((fn(r.params, x) - ref) ** 2))  # noqa: E731
    assert err(gptq) < err(rtn)


def test_sequential_differs_from_one_pass_only_in_its_inputs(block):
    """One pass solves every layer from the original model's inputs; sequential mode solves
    layer i from the inputs of the model whose earlier layers are already compressed."""
    fn, params, batches = block
    method = quant.gptq(4)
    seq = oneshot.compress(method, fn, params, batches)
    once = oneshot.compress(method, fn, params, batches, sequential=False)
    for path in ("q", "k", "v"):  # the first group reads the model's input either way
        assert leaves_equal(seq.params[path], once.params[path])
    assert not leaves_equal(seq.params["up"], once.params["up"])
    # Sequential's 'up' is the solve on the statistics of the model compressed before it.
    layouts = layout_lib.learn(fn, params, batches[0])
    before = dict(params)
    for path in ("q", "k", "v", "o"):
        before[path] = seq.params[path]
    stats = calibrate.capture(fn, before, batches, layouts=layouts, paths=["up/kernel"])
    solved = jax.jit(method.solve)(params["up"]["kernel"], stats["up/kernel"])
    np.testing.assert_array_equal(solved.weight, seq.params["up"]["kernel"])


def test_sparsegpt_2_4_masks_are_kept_by_fine_tuning(block):
    fn, params, batches = block
    result = oneshot.compress(prune.sparsegpt(prune.NM(2, 4), bits=4), fn, params, batches)
    up = np.asarray(result.params["up"]["kernel"])  # (32, 64): groups of 4 along the inputs
    assert ((up.reshape(8, 4, 64) != 0).sum(1) <= 2).all()
    masks = result.state[0].masks
    assert (np.asarray(masks["up"]["kernel"]).reshape(8, 4, 64).sum(1) == 2).all()
    assert leaves_equal(result.transform.apply(result.params, result.state), result.params)

    model = Block()
    apply_fn = train.linen_apply(model)
    tx = optax.adam(1e-3)
    state = train.init_train_state(
        result.params, tx, key=jax.random.key(0), transform=result.transform
    )
    assert leaves_equal(state.transform_state, result.state)  # init keeps the one-shot state
    step = train.make_train_step(apply_fn, tx, transform=result.transform, loss=mse_to_zero)
    x = jnp.concatenate(batches)
    for _ in range(3):
        state, _ = step(state, {"image": x, "label": jnp.zeros((8, 10))})
    view = result.transform.apply(state.params, state.transform_state)
    kept = np.asarray(masks["up"]["kernel"])
    assert (np.asarray(view["up"]["kernel"])[~kept] == 0).all()
    assert not leaves_equal(view, result.params)  # it trained
    scale = quant.expand_scale(state.transform_state[1].scale["up"]["kernel"], (32, 64))
    codes = np.asarray(view["up"]["kernel"]) / np.asarray(scale)
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)  # still on the grid


def mse_to_zero(logits, labels):
    return jnp.mean((logits - labels) ** 2, axis=-1)


class GQA(nnx.Module):
    """nnx.Einsum grouped-query attention in an NNX module that takes rngs."""

    def __init__(self, rngs):
        self.q = nnx.Einsum("BTD,NDH->BTNH", (4, 16, 4), rngs=rngs)
        self.kv = nnx.Einsum("BSD,CKDH->CBSKH", (2, 2, 16, 4), rngs=rngs)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (4, 4, 16), rngs=rngs)

    def __call__(self, x):
        q = self.q(x)
        k, v = (jnp.repeat(t, 2, axis=2) for t in self.kv(x))
        w = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k))
        return self.o(jnp.einsum("BNTS,BSNH->BTNH", w, v))


def test_nnx_einsum_wanda_groups_along_the_true_contraction():
    graphdef, state = nnx.split(GQA(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    x = correlated(2, (4, 5, 16))
    result = oneshot.compress(prune.wanda(prune.NM(2, 4)), fn, state, [x])
    q = np.asarray(result.params["q"]["kernel"])  # (N, D, H): contracts D, axis 1
    assert ((np.moveaxis(q, 1, -1).reshape(4, 4, 4, 4) != 0).sum(-1) == 2).all()
    o = np.asarray(result.params["o"]["kernel"])  # (N, H, D): contracts N and H, rows N*H
    assert ((o.reshape(16, 16).reshape(4, 4, 16) != 0).sum(1) == 2).all()


def test_batchnorm_resnet_with_its_statistics():
    from mixjax import models

    model = models.create("resnet20", 10, width=4)
    x = rand(3, (4, 8, 8, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    stats = variables["batch_stats"]
    fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x, train=False)  # noqa: E731
    result = oneshot.compress(quant.gptq(4), fn, variables["params"], [x])
    assert len(result.layers) == 22  # 19 3x3 convs + 2 projections + the head
    assert all(np.isfinite(r.error) for r in result.layers)
    artifact = export.compress(
        result.params, result.transform, result.state, model_state={"batch_stats": stats}
    )
    np.testing.assert_allclose(fn(artifact.params(), x), fn(result.params, x), rtol=1e-5, atol=1e-5)


def test_errors(block):
    fn, params, batches = block
    with pytest.raises(TypeError, match="method must be a mixjax.calibrate.Method"):
        oneshot.compress(quant.fake_quant(4), fn, params, batches)
    with pytest.raises(ValueError, match="no calibration batches"):
        oneshot.compress(quant.gptq(4), fn, params, [])
    with pytest.raises(ValueError, match=r"'up/kernel' \(32, 64\).*group_size=24 does not divide"):
        oneshot.compress(
            quant.gptq(4, group_size=24), fn, params, batches, where=lambda p, x: p == "up/kernel"
        )
    with pytest.raises(ValueError, match=r"'q/bias' \(2, 16\).*no matmul or convolution"):
        oneshot.compress(quant.gptq(4), fn, params, batches, where=lambda p, x: p == "q/bias")
    with pytest.raises(ValueError, match="the model rejects the example input"):
        oneshot.compress(quant.gptq(4), fn, params, [jnp.zeros((2, 6, 31))])
    with pytest.raises(ValueError, match="oneshot.compress: the model rejects its input"):
        oneshot.compress(quant.gptq(4), fn, params, [batches[0], jnp.zeros((2, 6, 31))])
    nan = jax.tree.map(lambda x: x, params)
    nan["up"] = {**params["up"], "kernel": params["up"]["kernel"].at[0, 0].set(jnp.nan)}
    with pytest.raises(ValueError, match=r"'up/kernel' \(32, 64\).*non-finite"):
        oneshot.compress(quant.gptq(4), fn, nan, batches)


def test_on_the_grid(block):
    fn, params, batches = block
    result = oneshot.compress(quant.gptq(4, symmetric=True), fn, params, batches)
    w = result.params["head"]["kernel"]
    s = quant.expand_scale(result.state.scale["head"]["kernel"], w.shape)
    g = grids.grid(4)
    np.testing.assert_array_equal(grids.quantize_dequantize(w, s, 0.0, g), w)
