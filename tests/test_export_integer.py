"""Tests of mixjax.export.integer: the integer path vs the fake-quant forward, fallbacks, errors."""

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import core, export, models, quant, share
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

    def int_model(self, astate=None):
        return export.integer_model(
            self.artifact, self.act, self.astate if astate is None else astate
        )


def pipeline(model, x, weights=None, act=None):
    params = numpy_init(model, x)
    weights = weights or quant.fake_quant(8)
    wstate = jax.jit(weights.init)(params)
    view = jax.jit(weights.apply)(params, wstate)
    act = act or activations.activation_quant(8, observer=observers.minmax_observer())
    fn = lambda x: model.apply({"params": view}, x)
    astate = quant.calibrate(act, fn, act.init(fn, x), [x])
    artifact = export.compress(params, weights, wstate)
    restored = artifact.params()
    run = lambda m, x: export.integer_apply(lambda x: model.apply({"params": restored}, x), m, x)
    fake = jax.jit(lambda s, x: act.apply(fn, s, x)[0])
    return Pipeline(fake, run, artifact, act, astate, fn)


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
    assert all(layer.kernel.dtype == jnp.int8 for layer in int_model.layers.values())


def test_cnn_int4_weights_symmetric_activations_output_and_file(tmp_path):
    x = data()
    act = activations.activation_quant(
        8, symmetric=True, output=True, observer=observers.minmax_observer()
    )
    p = pipeline(CNN(), x, quant.fake_quant(4), act)
    loaded = export.load(export.save(p.artifact, tmp_path / "cnn.mjx"))
    int_model = export.integer_model(loaded, act, p.astate)
    assert int_model.output is not None and len(int_model.layers) == 5
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


def test_unsupported_conv_falls_back_with_a_warning():
    x = data(16)
    p = pipeline(CNN(padding="CIRCULAR"), x)
    with pytest.warns(
        UserWarning, match=r"layer 'Conv_0' runs in float fake-quant, not int8: padding='CIRCULAR'"
    ):
        out = jax.jit(p.run)(p.int_model(), x)
    check_close(out, p.fake(p.astate, x))


def test_backend_without_integer_kernels_falls_back_with_a_warning(monkeypatch):
    p, x = mlp_pipeline(), data()
    monkeypatch.setattr(integer, "_integer_ops_compile", lambda backend: False)
    with pytest.warns(UserWarning, match="XLA on backend 'cpu' cannot compile int8 dot/conv"):
        # A fresh function: jit would reuse the trace of p.run made by other tests.
        out = jax.jit(lambda m, x: p.run(m, x))(p.int_model(), x)
    np.testing.assert_allclose(out, p.fake(p.astate, x), rtol=0, atol=1e-6)


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
    for name, layer in int_model.layers.items():
        assert layer.kernel is not None and layer.kernel.dtype == jnp.int8
        assert len(np.unique(np.asarray(layer.kernel))) <= 4
        kernel_scale = np.asarray(layer.rescale) / np.asarray(layer.inputs.scale)
        np.testing.assert_allclose(
            np.asarray(layer.kernel) * kernel_scale, view[name]["kernel"], rtol=1e-6
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
        export.integer_model(damaged, p.act, p.astate)


def test_unquantized_kernels_run_in_float_with_a_warning():
    x = data(16)
    p = pipeline(MLP(), x, quant.fake_quant(8, where=".*Dense_[02]/kernel"))
    with pytest.warns(UserWarning, match="layer 'Dense_1' has no quantized kernel in the artifact"):
        int_model = p.int_model()
    assert int_model.layers["Dense_1"].kernel is None
    check_close(jax.jit(p.run)(int_model, x), p.fake(p.astate, x))


def test_errors():
    p, x = mlp_pipeline(), data()
    empty = {k: observers.minmax_observer().init() for k in p.astate}
    with pytest.raises(
        ValueError,
        match=r"integer_model: layers \['Dense_0', 'Dense_1', 'Dense_2'\] have no activation range",
    ):
        p.int_model(empty)
    with pytest.raises(
        ValueError, match="integer_model: integer inference needs activations of <= 8 bits, got 12"
    ):
        export.integer_model(p.artifact, activations.activation_quant(12), p.astate)
    params = numpy_init(MLP(), x)
    for weights, match in [
        (quant.fake_quant(8, symmetric=False), "got bits=8, zero_point=nonzero"),
        (quant.fake_quant(12), "got bits=12, zero_point=0"),
    ]:
        bad = export.compress(params, weights, jax.jit(weights.init)(params))
        with pytest.raises(
            ValueError,
            match=r"kernel 'Dense_0/kernel' must be symmetric \(zero point 0\) with <= 8 bits "
            f"for the integer path, {match}",
        ):
            export.integer_model(bad, p.act, p.astate)
