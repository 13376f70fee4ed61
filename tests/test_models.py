"""Tests for mixjax.models: shapes on several image sizes, parameter counts, NNX = linen, errors.

Parameters come from ``jax.eval_shape`` filled with NumPy draws: running Flax's random
initializers eagerly compiles one kernel per parameter shape, seconds each on a busy CPU.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import models
from mixjax.select import leaves_with_paths

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


def _abstract(model, shape):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, *shape), jnp.float32))


def _params(model, shape, seed=0):
    """Concrete variables with the model's structure, drawn with NumPy (scaled like LeCun)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = math.prod(leaf.shape[:-1]) or 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(draw, _abstract(model, shape))


def _expected_params(spec, shape, num_classes):
    """Parameter count from the layer sizes, with ceil-halving SAME pools."""
    height, width, channels = shape
    total = 0
    for features in spec.convs:
        total += math.prod(spec.kernel) * channels * features + features
        height, width, channels = math.ceil(height / 2), math.ceil(width / 2), features
    size = height * width * channels
    for features in (*spec.hidden, num_classes):
        total += size * features + features
        size = features
    return total


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_output_shapes_and_param_counts(name, shape):
    model = models.create(name, 7)
    variables = _abstract(model, shape)
    out = jax.eval_shape(model.apply, variables, jnp.zeros((3, *shape)))
    assert out.shape == (3, 7) and out.dtype == jnp.float32
    count = sum(leaf.size for leaf in jax.tree.leaves(variables))
    assert count == _expected_params(model.spec, shape, 7)


def test_init_runs():
    model = models.LeNet300100(3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, _abstract(model, (4, 4, 1))
    )
    assert float(jnp.abs(variables["params"]["Dense_0"]["kernel"]).max()) > 0


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_forward_runs(name, harness):
    model = models.create(name, 5)
    logits = harness(model.apply)(_params(model, (8, 8, 1)), jnp.ones((3, 8, 8, 1)))
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_lenet300100_has_266610_params_on_mnist():
    variables = _abstract(models.LeNet300100(), (28, 28, 1))
    assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == 266_610


def test_lenet300100_matches_numpy(harness):
    model = models.LeNet300100(num_classes=4)
    variables = _params(model, (5, 5, 1))
    x = np.random.default_rng(1).normal(size=(3, 5, 5, 1)).astype(np.float32)
    p = variables["params"]
    h = x.reshape(3, -1)
    for name in ("Dense_0", "Dense_1"):
        h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
    expected = h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"]
    np.testing.assert_allclose(harness(model.apply)(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 2)])
def test_conv_models_take_tiny_images(shape):
    for model in (models.LeNet5(), models.SmallCNN(width=4)):
        out = jax.eval_shape(model.apply, _abstract(model, shape), jnp.ones((2, *shape)))
        assert out.shape == (2, 10)


def test_param_paths_use_default_flax_names():
    paths = [p for p, _ in leaves_with_paths(_abstract(models.LeNet5(), (8, 8, 1))["params"])]
    layers = ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]
    assert paths == [f"{layer}/{leaf}" for layer in layers for leaf in ("bias", "kernel")]


NNX_PAIRS = [
    (lambda rngs: models.NNXLeNet300100(64, 5, rngs=rngs), models.LeNet300100(5), (8, 8, 1)),
    (lambda rngs: models.NNXLeNet5((28, 28, 1), 5, rngs=rngs), models.LeNet5(5), (28, 28, 1)),
    (
        lambda rngs: models.NNXClassifier(models.small_cnn_spec(4), (9, 7, 3), 5, rngs=rngs),
        models.SmallCNN(5, width=4),
        (9, 7, 3),
    ),
]


@pytest.mark.parametrize("make_nnx, linen_model, shape", NNX_PAIRS)
def test_nnx_equals_linen_with_the_same_weights(make_nnx, linen_model, shape):
    nnx_model = nnx.eval_shape(lambda: make_nnx(nnx.Rngs(0)))
    variables = _params(linen_model, shape)
    linen_leaves = leaves_with_paths(variables["params"])
    nnx_leaves = leaves_with_paths(nnx.state(nnx_model, nnx.Param))
    assert [p for p, _ in nnx_leaves] == [p for p, _ in linen_leaves]
    for (path, a), (_, b) in zip(nnx_leaves, linen_leaves, strict=True):
        assert a.shape == b.shape, path
    nnx.update(nnx_model, variables["params"])
    x = np.random.default_rng(2).normal(size=(4, *shape)).astype(np.float32)
    expected = linen_model.apply(variables, x)
    np.testing.assert_allclose(nnx_model(x), expected, rtol=1e-5, atol=1e-5)
    jitted = nnx.jit(lambda m, x: m(x))(nnx_model, x)
    np.testing.assert_allclose(jitted, expected, rtol=1e-5, atol=1e-5)


def test_nnx_init_runs():
    model = models.NNXLeNet300100(3, 2, rngs=nnx.Rngs(0))
    assert model(jnp.ones((4, 3))).shape == (4, 2)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: models.create("resnet", 10), r"create: unknown model 'resnet'; valid: \['lenet3"),
        (
            lambda: models.create("lenet5", 0),
            "LeNet5: num_classes must be an integer >= 1, got num_classes=0",
        ),
        (
            lambda: models.LeNet300100(num_classes=2.0),
            "LeNet300100: num_classes must be an integer >= 1",
        ),
        (lambda: models.SmallCNN(width=0), "SmallCNN: width must be an integer >= 1, got width=0"),
        (
            lambda: models.NNXLeNet5((28, 28), rngs=nnx.Rngs(0)),
            r"NNXLeNet5: image_shape must be \(H, W, C\) for a conv network, got \(28, 28\)",
        ),
        (
            lambda: models.NNXLeNet5((28, 0, 1), rngs=nnx.Rngs(0)),
            "NNXLeNet5: image_shape entries must be an integer >= 1, got image_shape entries=0",
        ),
        (
            lambda: models.NNXLeNet300100(0, rngs=nnx.Rngs(0)),
            "NNXLeNet300100: in_features must be an integer >= 1, got in_features=0",
        ),
        (
            lambda: models.NNXLeNet300100(784, True, rngs=nnx.Rngs(0)),
            "NNXLeNet300100: num_classes must be an integer >= 1, got num_classes=True",
        ),
        (
            lambda: models.NNXClassifier(models.LENET300100, (), rngs=nnx.Rngs(0)),
            r"NNXClassifier: image_shape must be \(H, W, C\) for a conv network, got \(\)",
        ),
    ],
)
def test_errors(make, match):
    with pytest.raises((TypeError, ValueError), match=f"mixjax.models.{match}"):
        make()
