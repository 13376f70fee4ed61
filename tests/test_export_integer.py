"""Tests of mixjax.export.integer: the integer path vs the fake-quant forward, the per-site
table, linen and NNX models of any layer type, weight-only int4, errors."""

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import core, export, models, quant, share
from mixjax import layout as mixjax_layout
from mixjax.export import integer
from mixjax.quant import activations, observers


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32)(x))
        x = nn.tanh(nn.Dense(16)(x))  # signed activations: a zero point inside the grid
        return nn.Dense(10)(x)


class CNN(nn.Module):
    padding: object = "SAME"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding=self.padding)(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="VALID")(x))
        x = nn.relu(nn.Conv(4, (2, 2), kernel_dilation=2, padding=((1, 0), (2, 1)))(x))
        x = nn.Conv(4, (3, 3), feature_group_count=2, use_bias=False)(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def numpy_init(model, x, seed=0):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)


def data(n=64, shape=(8, 8, 1), seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *shape)), jnp.float32)


class Pipeline(NamedTuple):
    """Weights fake-quant + PTQ + export of one model, with both forwards jitted once.

    ``fake(act_state, x)`` is the fake-quant forward and ``run(int_model, x)`` the integer one;
    both take their state as an argument, so tests reuse the compiled functions.
    """

    fake: Any
    run: Any
    artifact: export.Artifact
    act: activations.ActivationQuant
    astate: dict
    fn: Any

    x: Any

    def int_model(self, astate=None):
        astate = self.astate if astate is None else astate
        return export.integer_model(self.fn, self.artifact, self.x, act=self.act, act_state=astate)


def pipeline(model, x, weights=None, act=None):
    params = numpy_init(model, x)
    weights = weights or quant.fake_quant(8)
    wstate = jax.jit(weights.init)(params)
    view = jax.jit(weights.apply)(params, wstate)
    act = act or activations.activation_quant(8, observer=observers.minmax_observer())
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    astate = quant.calibrate(act, fn, view, act.init(fn, view, x), [x])
    artifact = export.compress(params, weights, wstate)
    restored = artifact.params()
    run = lambda m, x: export.integer_apply(m, fn, restored, x)  # noqa: E731
    fake = jax.jit(lambda s, x: act.apply(fn, s, view, x)[0])
    return Pipeline(fake, run, artifact, act, astate, fn, x)


@functools.cache
def mlp_pipeline():
    """The MLP pipeline several tests share (each pipeline costs a few compilations)."""
    return pipeline(MLP(), data())


def check_close(out, ref, rel=1e-3):
    """Logits agree: argmax on >= 99.9 % of rows, and a small relative error.

    Deeper layers see inputs that differ from the fake-quant forward's by float32 summation
    order, so an input within ~1e-7 of a rounding boundary can land on the neighbouring code:
    rare, but each such flip moves the logits by one activation step. The single-layer test
    below, where no such flip can happen, checks the arithmetic itself to 1e-6.
    """
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) <= rel
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.999


def test_single_layer_is_exact_up_to_float32_summation():
    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(512)(x.reshape(x.shape[0], -1))

    x = data(shape=(32, 32, 1))
    p = pipeline(One(), x)
    check_close(jax.jit(p.run)(p.int_model(), x), p.fake(p.astate, x), rel=1e-6)


def test_mlp_eager_and_jit():
    p, x = mlp_pipeline(), data()
    int_model = p.int_model()
    reference = p.fake(p.astate, x)
    check_close(p.run(int_model, x), reference)
    check_close(jax.jit(p.run)(int_model, x), reference)
    jaxpr = str(jax.make_jaxpr(p.run)(int_model, x))
    assert jaxpr.count("preferred_element_type=int32") == 3 and "i8[64,64]" in jaxpr
    assert all(w.codes.dtype == jnp.int8 for w in int_model.weights.values())
    assert [(row.site, row.way) for row in int_model.table] == [
        (f"Dense_{i}/kernel", integer.INT8) for i in range(3)
    ]


def test_cnn_int4_weights_symmetric_activations_output_and_file(tmp_path):
    x = data()
    act = activations.activation_quant(
        8, symmetric=True, output=True, observer=observers.minmax_observer()
    )
    p = pipeline(CNN(), x, quant.fake_quant(4), act)
    loaded = export.load(export.save(p.artifact, tmp_path / "cnn.mjx"))
    int_model = export.integer_model(p.fn, loaded, x, act=act, act_state=p.astate)
    assert int_model.output is not None and len(int_model.sites) == 5
    assert {row.way for row in int_model.table} == {integer.INT8}
    jaxpr = str(jax.make_jaxpr(p.run)(int_model, x))
    assert jaxpr.count("conv_general_dilated") == 4 and "preferred_element_type=int32" in jaxpr
    np.testing.assert_allclose(jax.jit(p.run)(int_model, x), p.fake(p.astate, x), atol=1e-6)


@pytest.mark.parametrize(
    "make", [models.LeNet300100, models.LeNet5, models.SmallCNN], ids=lambda m: m.__name__
)
def test_reference_models(make):
    x = data(32)
    p = pipeline(make(num_classes=10), x)
    check_close(jax.jit(p.run)(p.int_model(), x), p.fake(p.astate, x))


def test_saturating_ranges_and_asymmetric_zero_points():
    p, x = mlp_pipeline(), data()
    narrow = {k: s._replace(min=s.min * 0.3, max=s.max * 0.3) for k, s in p.astate.items()}
    check_close(jax.jit(p.run)(p.int_model(narrow), x), p.fake(narrow, x))
    assert any(float(p.act.qparams(s)[1]) != 0 for s in narrow.values())


def test_nonfinite_rows_become_nan_rows():
    p, x = mlp_pipeline(), data()
    bad = x.at[3, 2, 2, 0].set(jnp.nan).at[5, 0, 0, 0].set(jnp.inf)
    out = np.asarray(jax.jit(p.run)(p.int_model(), bad))
    assert np.all(np.isnan(out[[3, 5]]))
    keep = np.setdiff1d(np.arange(64), [3, 5])
    check_close(out[keep], np.asarray(p.fake(p.astate, x))[keep])


def test_circular_padding_runs_integer_and_input_dilation_dequantized():
    """CIRCULAR pads the activation before a VALID conv: the conv itself runs int8. An input
    dilation inserts zeros that are not the zero point: that conv runs its weights dequantized,
    and the table says why."""

    class Dilated(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), padding="CIRCULAR")(x))
            x = nn.Conv(2, (3, 3), input_dilation=2, padding=((1, 1), (1, 1)))(x)
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    x = data(16)
    p = pipeline(Dilated(), x)
    int_model = p.int_model()
    ways = {row.site: (row.way, row.why) for row in int_model.table}
    assert ways["Conv_0/kernel"] == (integer.INT8, "")
    assert ways["Conv_1/kernel"] == (
        f"int8 {integer.DEQUANTIZED}",
        "a convolution with input dilation or batch groups",
    )
    check_close(jax.jit(p.run)(int_model, x), p.fake(p.astate, x))


def test_backend_without_integer_kernels_dequantizes_and_says_why(monkeypatch):
    p, x = mlp_pipeline(), data()
    monkeypatch.setattr(integer, "_integer_ops_compile", lambda backend: False)
    int_model = p.int_model()
    assert {row.why for row in int_model.table} == {
        "XLA on backend 'cpu' cannot compile int8 dot/conv"
    }
    out = jax.jit(lambda m, x: p.run(m, x))(int_model, x)
    np.testing.assert_allclose(out, p.fake(p.astate, x), rtol=0, atol=1e-5)


def test_clustered_then_quantized_kernels_run_on_the_integer_path():
    # cluster -> per-tensor fake_quant stores kernels as codebook records whose shared values
    # are an int record; prepare recovers their integer codes exactly.
    x = data(32)
    weights = core.chain(share.cluster(4), quant.fake_quant(8, per_channel=False))
    p = pipeline(MLP(), x, weights)
    kinds = {r["path"]: r["kind"] for r in p.artifact.leaves}
    assert kinds["Dense_0/kernel"] == "codebook"
    int_model = p.int_model()
    view = p.artifact.params()
    assert {row.way for row in int_model.table} == {integer.INT8}
    for path, weight in int_model.weights.items():
        assert weight.codes.dtype == jnp.int8 and len(np.unique(np.asarray(weight.codes))) <= 4
        layer = path.split("/")[0]
        np.testing.assert_allclose(
            np.asarray(weight.codes) * np.asarray(weight.scale), view[layer]["kernel"], rtol=1e-6
        )
    check_close(jax.jit(p.run)(int_model, x), p.fake(p.astate, x))


def test_errors_from_preparing_a_damaged_codebook_kernel_name_integer_model():
    """The re-encoding of a codebook kernel on its grid fails in integer_model, not compress."""
    x = data(8)
    p = pipeline(MLP(), x, core.chain(share.cluster(4), quant.fake_quant(8, per_channel=False)))
    record = p.artifact.record("Dense_0/kernel")
    arrays = dict(p.artifact.arrays)
    arrays[record["values"]["scale"]] = np.full_like(arrays[record["values"]["scale"]], np.nan)
    damaged = dataclasses.replace(p.artifact, arrays=arrays)
    with pytest.raises(
        ValueError,
        match=r"^mixjax.export.integer_model: leaf 'Dense_0/kernel' \(64, 32\) float32 holds NaN",
    ):
        export.integer_model(p.fn, damaged, x, act=p.act, act_state=p.astate)


def test_unquantized_kernels_run_in_float_with_a_warning():
    x = data(16)
    p = pipeline(MLP(), x, quant.fake_quant(8, where=".*Dense_[02]/kernel"))
    with pytest.warns(UserWarning, match=r"these run in float: \['Dense_1/kernel'\]"):
        int_model = p.int_model()
    assert int_model.table[1] == integer.SiteRow(
        "Dense_1/kernel", "Dense_1/kernel", "dense", "float", "not quantized in the artifact"
    )
    check_close(jax.jit(p.run)(int_model, x), p.fake(p.astate, x))


def test_asymmetric_and_wide_kernels_run_dequantized():
    x = data(16)
    for weights, bits in [(quant.fake_quant(8, symmetric=False), 8), (quant.fake_quant(12), 12)]:
        p = pipeline(MLP(), x, weights)
        int_model = p.int_model()
        assert {(row.way, row.why) for row in int_model.table} == {
            (
                f"int{bits} {integer.DEQUANTIZED}",
                "the int8 path needs symmetric kernels of <= 8 bits",
            )
        }
        check_close(jax.jit(p.run)(int_model, x), p.fake(p.astate, x), rel=1e-5)


class TiedLM(nn.Module):
    """A one-block LM as users write it: Embed, DenseGeneral attention projections, an MLP and
    the tied decode (Embed.attend)."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(13, 16)
        x = embed(tokens)
        q, k, v = (nn.DenseGeneral((2, 8), name=n)(x) for n in "qkv")
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, axis=-1)
        x = x + nn.DenseGeneral(16, axis=(-2, -1), name="o")(jnp.einsum("bhqk,bkhd->bqhd", w, v))
        x = x + nn.Dense(16)(nn.gelu(nn.Dense(32)(x)))
        return embed.attend(x)


def lm_setup(weights, act=None):
    model = TiedLM()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 13, (4, 6)), jnp.int32)
    params = numpy_init(model, tokens)
    fn = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    wstate = weights.init(params)
    view = weights.apply(params, wstate)
    artifact = export.compress(params, weights, wstate)
    astate = None
    if act is not None:
        astate = quant.calibrate(act, fn, view, act.init(fn, view, tokens), [tokens])
    return fn, tokens, view, artifact, astate


def test_attention_embedding_and_tied_decode_run_integer():
    """Every parameter matmul of a DenseGeneral/Embed LM is an int8 site, the lookup reads int8
    rows, and the tied decode reuses the table's codes; the result is the fake-quant forward."""
    probe = TiedLM()
    tokens = jnp.zeros((1, 6), jnp.int32)
    layouts = mixjax_layout.learn(
        lambda p, t: probe.apply({"params": p}, t), numpy_init(probe, tokens), tokens
    )
    weights = quant.fake_quant(8, layouts=layouts, where=r".*(kernel|embedding)$")
    act = activations.activation_quant(8, observer=observers.minmax_observer())
    fn, tokens, view, artifact, astate = lm_setup(weights, act)
    int_model = export.integer_model(fn, artifact, tokens, act=act, act_state=astate)
    ways = {row.site: row.way for row in int_model.table}
    assert ways == {
        "Embed_0/embedding": f"int8 {integer.LOOKUP}",
        **{f"{n}/kernel": integer.INT8 for n in "qkvo"},
        "Dense_0/kernel": integer.INT8,
        "Dense_1/kernel": integer.INT8,
        "Embed_0/embedding@1": integer.INT8,
    }
    out = jax.jit(lambda m, t: export.integer_apply(m, fn, artifact.params(), t))(int_model, tokens)
    ref = act.apply(fn, astate, view, tokens)[0]
    check_close(out.reshape(-1, 13), ref.reshape(-1, 13))
    table = export.integer_table(int_model)
    assert "| Embed_0/embedding@1 | Embed_0/embedding | dense | int8 x int8 -> int32 |" in table


def test_weight_only_int4_group_wise_equals_the_dequantized_forward():
    probe = TiedLM()
    tokens = jnp.zeros((1, 6), jnp.int32)
    layouts = mixjax_layout.learn(
        lambda p, t: probe.apply({"params": p}, t), numpy_init(probe, tokens), tokens
    )
    weights = quant.fake_quant(4, group_size=8, layouts=layouts)
    fn, tokens, view, artifact, _ = lm_setup(weights)
    int_model = export.integer_model(fn, artifact, tokens)
    ways = {row.site: row.way for row in int_model.table}
    assert ways["q/kernel"] == f"int4 g8 {integer.DEQUANTIZED}"
    assert ways["Embed_0/embedding"] == "float"  # embeddings are quantized only when asked
    out = jax.jit(lambda m, t: export.integer_apply(m, fn, artifact.params(), t))(int_model, tokens)
    np.testing.assert_allclose(out, fn(view, tokens), rtol=1e-5, atol=1e-5)


class NNXBlock(nnx.Module):
    """NNX GQA projections with nnx.Einsum (a fused kv kernel), an Embed and a Linear head."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(13, 8, rngs=rngs)
        self.q = nnx.Einsum("btd,dnh->btnh", (8, 4, 2), rngs=rngs)
        self.kv = nnx.Einsum("btd,cdkh->cbtkh", (2, 8, 2, 2), rngs=rngs)
        self.out = nnx.Einsum("btnh,nhd->btd", (4, 2, 8), rngs=rngs)
        self.head = nnx.Linear(8, 13, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        q = self.q(x)
        k, v = (jnp.repeat(t, 2, axis=2) for t in self.kv(x))
        w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
        return self.head(x + self.out(jnp.einsum("bnts,bsnh->btnh", w, v)))


def test_nnx_einsum_gqa_runs_integer():
    graphdef, params = nnx.split(NNXBlock(nnx.Rngs(0)))
    fn = lambda s, t: nnx.merge(graphdef, s)(t)  # noqa: E731
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 13, (3, 5)), jnp.int32)
    layouts = mixjax_layout.learn(fn, params, tokens)
    weights = quant.fake_quant(8, layouts=layouts)
    wstate = weights.init(params)
    view = weights.apply(params, wstate)
    act = activations.activation_quant(8, observer=observers.minmax_observer())
    astate = quant.calibrate(act, fn, view, act.init(fn, view, tokens), [tokens])
    artifact = export.compress(params, weights, wstate)
    int_model = export.integer_model(fn, artifact, tokens, act=act, act_state=astate, like=params)
    assert {row.site: row.way for row in int_model.table if row.way != "float"} == {
        f"{n}/kernel": integer.INT8 for n in ("q", "kv", "out", "head")
    }
    restored = artifact.params(like=params)
    out = jax.jit(lambda m, t: export.integer_apply(m, fn, restored, t))(int_model, tokens)
    check_close(out.reshape(-1, 13), act.apply(fn, astate, view, tokens)[0].reshape(-1, 13))


def test_errors():
    p, x = mlp_pipeline(), data()
    empty = {k: observers.minmax_observer().init() for k in p.astate}
    with pytest.raises(
        ValueError,
        match=r"integer_model: sites \['Dense_0/kernel', 'Dense_1/kernel', 'Dense_2/kernel'\] "
        "have no activation range",
    ):
        p.int_model(empty)
    with pytest.raises(
        ValueError, match="integer_model: integer inference needs activations of <= 8 bits, got 12"
    ):
        export.integer_model(
            p.fn, p.artifact, x, act=activations.activation_quant(12), act_state=p.astate
        )
    with pytest.raises(ValueError, match="give act and act_state together"):
        export.integer_model(p.fn, p.artifact, x, act=p.act)
    with pytest.raises(ValueError, match=r"act_state has sites \['Conv_9/kernel'\] this model"):
        export.integer_model(
            p.fn,
            p.artifact,
            x,
            act=p.act,
            act_state={**p.astate, "Conv_9/kernel": p.astate["Dense_0/kernel"]},
        )
    with pytest.raises(ValueError, match=r"integer_model: the model rejects its input"):
        export.integer_model(p.fn, p.artifact, x[:, :3], act=p.act, act_state=p.astate)
    int_model = p.int_model()

    def another_model(params, x):  # uses Dense_0's kernel twice: a site it was not prepared for
        kernel = params["Dense_0"]["kernel"]
        return (x.reshape(-1, 64) @ kernel) @ kernel.T

    with pytest.raises(ValueError, match=r"integer_apply: site 'Dense_0/kernel@1' was not found"):
        export.integer_apply(int_model, another_model, p.artifact.params(), x)
