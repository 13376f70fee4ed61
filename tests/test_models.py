"""Tests for mixjax.models: the registry, shapes on several image sizes, parameter counts of the
LeNet-like classifiers, NNX = linen, errors. (ResNet-20, ViT and GPT have their own tests in
``test_models_reference.py``; here they are checked as registry entries.)

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


def _abstract(model, shape, dtype=jnp.float32):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, *shape), dtype))


def _params(model, shape, seed=0, dtype=jnp.float32):
    """Concrete variables with the model's structure: parameters drawn with NumPy (scaled like
    LeCun), other collections (batch statistics) ones."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = math.prod(leaf.shape[:-1]) or 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    variables = dict(_abstract(model, shape, dtype))
    others = {k: jax.tree.map(lambda x: np.ones(x.shape, x.dtype), v) for k, v in variables.items()}
    return {**others, "params": jax.tree.map(draw, variables["params"])}


IMAGE_MODELS = sorted(n for n, info in models.MODELS.items() if info.task == "image")
LM_MODELS = sorted(n for n, info in models.MODELS.items() if info.task == "lm")
# The classifiers built from a layer Spec (LeNet-like): their parameters count from it.
SPEC_MODELS = sorted(n for n in IMAGE_MODELS if hasattr(models.create(n, 2), "spec"))


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
@pytest.mark.parametrize("name", SPEC_MODELS)
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


def test_registry():
    assert SPEC_MODELS == ["lenet300100", "lenet5", "small_cnn"]
    assert IMAGE_MODELS == ["lenet300100", "lenet5", "resnet20", "small_cnn", "vit_tiny"]
    assert LM_MODELS == ["gpt_tiny"]
    for name, info in models.MODELS.items():
        assert info.task in models.TASKS and set(info.sizes) <= set(models.SIZES), name
    assert models.create("resnet20", 3).width == models.MODELS["resnet20"].sizes["width"] == 4
    vit = models.create("vit_tiny", 3, width=32, depth=1)
    assert (vit.dim, vit.mlp_dim, vit.depth, vit.heads, vit.patch_size) == (32, 64, 1, 4, 4)
    gpt = models.create("gpt_tiny", 65, context=16)
    assert (gpt.vocab_size, gpt.context, gpt.layers, gpt.dim) == (65, 16, 4, 128)
    assert models.create("small_cnn", 3, width=8).width == 8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_image_model_maps_images_to_logits(name, shape):
    model = models.create(name, 7)
    out = jax.eval_shape(model.apply, _abstract(model, shape), jnp.zeros((3, *shape)))
    assert out.shape == (3, 7) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", LM_MODELS)
def test_every_language_model_maps_tokens_to_next_token_logits(name):
    model = models.create(name, 11, context=16)
    tokens = jnp.zeros((3, 16), jnp.int32)
    out = jax.eval_shape(model.apply, _abstract(model, (16,), jnp.int32), tokens)
    assert out.shape == (3, 16, 11) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_forward_runs(name, harness):
    info = models.MODELS[name]
    small = {k: v for k, v in {"width": 8, "depth": 1, "heads": 2}.items() if k in info.sizes}
    model = models.create(name, 5, **small)
    if info.task == "image":
        shape, x, logits_shape = (8, 8, 1), jnp.ones((3, 8, 8, 1)), (3, 5)
    else:
        shape, x, logits_shape = (8,), jnp.ones((3, 8), jnp.int32), (3, 8, 5)
    variables = _params(model, shape, dtype=x.dtype)
    kwargs = {} if info.train_kwarg is None else {info.train_kwarg: False}
    logits = harness(lambda v, x: model.apply(v, x, **kwargs))(variables, x)
    assert logits.shape == logits_shape and logits.dtype == jnp.float32
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
        (lambda: models.create("resnet", 10), r"create: unknown model 'resnet'; valid: \['gpt_t"),
        (
            lambda: models.create("lenet5", 10, width=4),
            r"create: model 'lenet5' takes no size 'width' \(its sizes: none\)",
        ),
        (
            lambda: models.create("resnet20", 10, heads=2),
            r"create: model 'resnet20' takes no size 'heads' \(its sizes: width\)",
        ),
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
