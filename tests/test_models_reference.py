"""Tests for the reference architectures: ResNet-20, ViT-tiny and GPT-tiny, in linen and NNX.

Parameter counts are computed from the architectures' formulas, independently of the code.
Variables come from ``jax.eval_shape`` filled with NumPy draws (Flax's initializers compile a
kernel per parameter shape, seconds each on a busy CPU); the NNX models are built abstractly
with ``nnx.eval_shape`` and given the same values with ``nnx.update``, which also proves that
both APIs name their layers the same. Configurations are tiny: 8x8 images, widths of 4-16.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixjax import models, train

IMAGES = (8, 8, 1)
RESNET = {"width": 4}
VIT = {"patch_size": 2, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}
GPT = {"context": 8, "layers": 2, "heads": 2, "dim": 16}
VOCAB = 11


# ----------------------------------------------------------------------------- helpers


def _abstract(model, x):
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _fill(abstract, seed=0, *, random=True):
    """Concrete variables of ``abstract``'s structure, from NumPy.

    ``random``: every leaf drawn (a strict test of the forward pass); otherwise the usual
    starting point (kernels and tables scaled by their fan-in, biases 0, scales and variances
    1), for training.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if not random and name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        if not random and name == "scale":
            return np.ones(leaf.shape, np.float32)
        fan_in = 1 if name == "bias" else math.prod(leaf.shape[:-1]) or 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, abstract))


def _nnx_like(make, variables):
    """The NNX model ``make(rngs)`` holding ``variables`` (a linen variables dict)."""
    model = nnx.eval_shape(lambda: make(nnx.Rngs(0)))
    nnx.update(model, *variables.values())
    nnx.reseed(model, dropout=0)  # concrete keys where the model has dropout streams
    return model


def _count(tree):
    return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _images(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *IMAGES)), jnp.float32)


def _two_class_task(n=16, seed=0):
    """Images whose class is the half (left or right) that holds a bright blob, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.normal(0, 0.3, (n, *IMAGES)).astype(np.float32)
    for i, label in enumerate(labels):
        row = rng.integers(0, 6)
        col = rng.integers(0, 2) + 4 * label
        images[i, row : row + 2, col : col + 2] += 2.0
    return jnp.asarray(images), jnp.asarray(labels, jnp.int32)


def resnet20_params(in_channels, width, num_classes):
    """He et al.'s ResNet-20 with projection shortcuts where the channels change."""
    conv = lambda k, cin, cout: k * k * cin * cout
    bn = lambda c: 2 * c  # scale and bias
    total, cin = conv(3, in_channels, width) + bn(width), width
    for stage in range(3):
        cout = width * 2**stage
        for _ in range(3):
            total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if cin != cout:
                total += conv(1, cin, cout) + bn(cout)
            cin = cout
    return total + cin * num_classes + num_classes


def _block_params(dim, mlp_dim):
    layer_norms = 2 * (2 * dim)
    attention = 4 * (dim * dim + dim)  # query, key, value, out: kernels and biases
    mlp = dim * mlp_dim + mlp_dim + mlp_dim * dim + dim
    return layer_norms + attention + mlp


def gpt_params(vocab, context, layers, dim, tied):
    embeddings = vocab * dim + context * dim
    head = 0 if tied else dim * vocab
    return embeddings + layers * _block_params(dim, 4 * dim) + 2 * dim + head


def vit_params(image_shape, patch, dim, depth, mlp_dim, num_classes):
    height, width, channels = image_shape
    tokens = (height // patch) * (width // patch)
    embed = patch * patch * channels * dim + dim + tokens * dim
    head = 2 * dim + dim * num_classes + num_classes
    return embed + depth * _block_params(dim, mlp_dim) + head


# ----------------------------------------------------------------------------- sizes


def test_resnet20_has_the_papers_272474_parameters():
    variables = _abstract(models.ResNet20(), jnp.zeros((2, 32, 32, 3)))
    assert _count(variables["params"]) == resnet20_params(3, 16, 10) == 272_474
    assert _count(variables["batch_stats"]) == 2 * 784  # mean and var of every BatchNorm
    model = nnx.eval_shape(lambda: models.NNXResNet20(3, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(model, nnx.Param)) == 272_474
    assert _count(nnx.state(model, nnx.BatchStat)) == 2 * 784


@pytest.mark.parametrize("tied, expected", [(True, 809_856), (False, 818_176)])
def test_gpt_tiny_parameter_counts(tied, expected):
    model = models.GPTTiny(65, tie_embeddings=tied)  # 4 layers x 4 heads x 128, context 64
    variables = _abstract(model, jnp.zeros((1, 64), jnp.int32))
    assert _count(variables) == gpt_params(65, 64, 4, 128, tied) == expected
    nnx_model = nnx.eval_shape(lambda: models.NNXGPTTiny(65, tie_embeddings=tied, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(nnx_model, nnx.Param)) == expected


@pytest.mark.parametrize("shape, patch", [((28, 28, 1), 4), ((28, 28, 1), 7), ((8, 8, 1), 2)])
def test_vit_tiny_parameter_counts(shape, patch):
    variables = _abstract(models.ViTTiny(patch_size=patch), jnp.zeros((1, *shape)))
    assert _count(variables) == vit_params(shape, patch, 128, 4, 256, 10)
    nnx_model = nnx.eval_shape(lambda: models.NNXViTTiny(shape, patch_size=patch, rngs=nnx.Rngs(0)))
    assert _count(nnx.state(nnx_model, nnx.Param)) == _count(variables)


def test_attention_kernels_are_dense_general():
    params = _abstract(models.ViTTiny(), jnp.zeros((1, 28, 28, 1)))["params"]
    attn = params["block0"]["attn"]
    for name in ("query", "key", "value"):
        assert attn[name]["kernel"].shape == (128, 4, 32)
    assert attn["out"]["kernel"].shape == (4, 32, 128)
    assert params["patch_embed"]["kernel"].shape == (4, 4, 1, 128)


@pytest.mark.parametrize(
    "model, x, shape",
    [
        (models.ResNet20(7, **RESNET), jnp.zeros((3, 28, 28, 1)), (3, 7)),
        (models.ResNet20(7, **RESNET), jnp.zeros((3, 32, 32, 3)), (3, 7)),
        (models.ViTTiny(7, patch_size=7), jnp.zeros((3, 28, 28, 1)), (3, 7)),
        (models.ViTTiny(7, patch_size=4), jnp.zeros((3, 8, 8, 1)), (3, 7)),
        (models.GPTTiny(VOCAB, **GPT), jnp.zeros((3, 5), jnp.int32), (3, 5, VOCAB)),
    ],
)
def test_output_shapes_on_other_sizes(model, x, shape):
    variables = _abstract(model, x)
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert out.shape == shape and out.dtype == jnp.float32


# ----------------------------------------------------------------------------- BatchNorm


@pytest.fixture(scope="module")
def resnet():
    """A ResNet-20 of width 4, its variables, a batch of 8 and its jitted linen ApplyFn."""
    module = models.ResNet20(3, **RESNET)
    x = _images(8, seed=1)
    variables = _fill(_abstract(module, x))
    apply = jax.jit(train.linen_apply(module, train_kwarg="train"), static_argnames="train")
    return module, variables, x, apply


def test_batchnorm_updates_statistics_in_training_and_uses_them_in_eval(resnet):
    module, variables, x, apply = resnet
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    key = jax.random.key(0)

    logits, new_state = apply(params, state, x, train=True, key=key)
    assert logits.shape == (8, 3) and logits.dtype == jnp.float32
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    # stem_bn: running averages move by momentum 0.1 towards the batch's (biased) statistics.
    h = jax.lax.conv_general_dilated(
        x, params["stem_conv"]["kernel"], (1, 1), ((1, 1), (1, 1)), None, None,
        ("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip
    old, new = state["batch_stats"]["stem_bn"], new_state["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(
        new["mean"], 0.9 * old["mean"] + 0.1 * h.mean((0, 1, 2)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        new["var"], 0.9 * old["var"] + 0.1 * h.var((0, 1, 2)), rtol=1e-4, atol=1e-5
    )

    # eval: the state comes back unchanged, and each example is normalized with it alone.
    eval_logits, same = apply(params, state, x, train=False, key=key)
    jax.tree.map(np.testing.assert_array_equal, same, state)
    others, _ = apply(params, state, x.at[2:].set(0.0), train=False, key=key)
    np.testing.assert_allclose(others[:2], eval_logits[:2], rtol=1e-5, atol=1e-5)
    moved, _ = apply(params, new_state, x, train=False, key=key)
    assert not np.allclose(moved, eval_logits)


def test_batchnorm_axis_name_gives_cross_replica_statistics(resnet):
    """Two replicas of 4 under ``vmap(axis_name="batch")`` = one batch of 8 without it."""
    module, variables, x, apply = resnet
    params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
    full, full_state = apply(params, state, x, train=True, key=jax.random.key(0))
    shards = x.reshape(2, 4, *IMAGES)

    def check(logits, states):
        np.testing.assert_allclose(logits.reshape(8, -1), full, rtol=1e-4, atol=1e-4)
        for replica in (0, 1):
            jax.tree.map(
                lambda a, b, r=replica: np.testing.assert_allclose(a[r], b, rtol=1e-4, atol=1e-5),
                states,
                full_state,
            )

    synced = module.clone(axis_name="batch")
    run = lambda shard: synced.apply(variables, shard, train=True, mutable=["batch_stats"])
    check(*jax.jit(jax.vmap(run, axis_name="batch"))(shards))

    # NNX: the same weights, through nnx_apply (so this also proves NNX = linen in training).
    make = lambda rngs: models.NNXResNet20(1, 3, **RESNET, axis_name="batch", rngs=rngs)
    graphdef, nnx_params, rest = nnx.split(_nnx_like(make, variables), nnx.Param, ...)
    nnx_apply = train.nnx_apply(graphdef)
    run = lambda shard: nnx_apply(nnx_params, rest, shard, train=True, key=jax.random.key(0))
    logits, states = jax.jit(jax.vmap(run, axis_name="batch"))(shards)
    check(logits, {"batch_stats": nnx.to_pure_dict(states)})


# ----------------------------------------------------------------------------- NNX = linen


def _nnx_eval(make, variables, x):
    model = _nnx_like(make, variables)
    model.eval()
    out = nnx.jit(lambda m, x: m(x))(model, x)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    return out


def test_nnx_resnet_equals_linen_in_eval(resnet):
    module, variables, x, apply = resnet
    expected, _ = apply(
        variables["params"], {"batch_stats": variables["batch_stats"]}, x, train=False, key=None
    )
    make = lambda rngs: models.NNXResNet20(1, 3, **RESNET, rngs=rngs)
    np.testing.assert_allclose(_nnx_eval(make, variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, patch", [(IMAGES, 2), ((28, 28, 1), 7)])
def test_nnx_vit_equals_linen_with_the_same_weights(shape, patch):
    sizes = {**VIT, "patch_size": patch}
    module = models.ViTTiny(5, **sizes, dropout=0.3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, *shape)), jnp.float32)
    variables = _fill(_abstract(module, x))
    expected = jax.jit(module.apply)(variables, x)  # train=False: no dropout
    assert expected.shape == (3, 5) and expected.dtype == jnp.float32
    make = lambda rngs: models.NNXViTTiny(shape, 5, **sizes, dropout=0.3, rngs=rngs)
    np.testing.assert_allclose(_nnx_eval(make, variables, x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dropout


def _check_dropout(apply, params, state, x):
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a, _ = apply(params, state, x, train=True, key=k1)
    b, _ = apply(params, state, x, train=True, key=k1)
    c, _ = apply(params, state, x, train=True, key=k2)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    e1, _ = apply(params, state, x, train=False, key=k1)
    e2, _ = apply(params, state, x, train=False, key=k2)
    np.testing.assert_array_equal(e1, e2)
    assert not np.allclose(a, e1)


def test_nnx_dropout_follows_the_key_through_nnx_apply():
    """Built with one default stream, and still ``nnx_apply``'s reseed reaches every dropout."""
    module = models.ViTTiny(5, **VIT)
    x = _images(2)
    make = lambda rngs: models.NNXViTTiny(IMAGES, 5, **VIT, dropout=0.3, rngs=rngs)
    model = _nnx_like(make, _fill(_abstract(module, x)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply = jax.jit(train.nnx_apply(graphdef), static_argnames="train")
    _check_dropout(apply, params, rest, x)


@pytest.mark.parametrize("rngs", [lambda: nnx.Rngs(0), lambda: nnx.Rngs(params=0, dropout=1)])
@pytest.mark.parametrize(
    "make",
    [
        lambda rngs: models.NNXViTTiny(IMAGES, **VIT, dropout=0.1, rngs=rngs),
        lambda rngs: models.NNXGPTTiny(VOCAB, **GPT, dropout=0.1, rngs=rngs),
    ],
)
def test_nnx_dropout_streams_are_tagged_dropout(make, rngs):
    model = nnx.eval_shape(lambda: make(rngs()))
    keys = nnx.state(model, nnx.RngKey)
    tags = {v.tag for v in jax.tree.leaves(keys, is_leaf=lambda v: isinstance(v, nnx.Variable))}
    assert tags == {"dropout"}
    assert "rngs" in nnx.to_pure_dict(keys)["block0"]["attn"]  # the attention's dropout too


def test_no_rng_state_without_dropout():
    model = nnx.eval_shape(lambda: models.NNXGPTTiny(VOCAB, **GPT, rngs=nnx.Rngs(0)))
    assert jax.tree.leaves(nnx.state(model, nnx.RngState)) == []


# ----------------------------------------------------------------------------- GPT


@pytest.fixture(scope="module")
def gpt():
    """A tied GPT-tiny with dropout 0.3, its variables, tokens and a jitted capturing apply."""
    module = models.GPTTiny(VOCAB, **GPT, dropout=0.3)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 8)), jnp.int32)
    variables = _fill(_abstract(module, tokens))
    capture = jax.jit(functools.partial(module.apply, capture_intermediates=True))
    return module, variables, tokens, capture


def test_gpt_is_causal(gpt):
    _, variables, tokens, capture = gpt
    before, _ = capture(variables, tokens)
    assert before.shape == (2, 8, VOCAB) and before.dtype == jnp.float32
    for t in (0, 3, 7):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
        after, _ = capture(variables, changed)
        np.testing.assert_array_equal(after[:, :t], before[:, :t])
        assert not np.allclose(after[:, t:], before[:, t:])


def test_gpt_tied_logits_are_the_token_embedding_attend(gpt):
    _, variables, tokens, capture = gpt
    params = variables["params"]
    assert "head" not in params
    with_vocab = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if VOCAB in leaf.shape
    ]
    assert with_vocab == ["['token_embed']['embedding']"]
    logits, captured = capture(variables, tokens)
    hidden = np.asarray(captured["intermediates"]["final_ln"]["__call__"][0], np.float64)
    embedding = np.asarray(params["token_embed"]["embedding"], np.float64)
    np.testing.assert_allclose(logits, hidden @ embedding.T, rtol=1e-5, atol=1e-5)


def test_gpt_dropout_follows_the_key_in_training_only_and_nnx_equals_linen(gpt):
    module, variables, tokens, _ = gpt
    apply = jax.jit(train.linen_apply(module, train_kwarg="train"), static_argnames="train")
    _check_dropout(apply, variables["params"], {}, tokens)
    expected, _ = apply(variables["params"], {}, tokens, train=False, key=None)
    make = lambda rngs: models.NNXGPTTiny(VOCAB, **GPT, dropout=0.3, rngs=rngs)
    np.testing.assert_allclose(_nnx_eval(make, variables, tokens), expected, rtol=1e-5, atol=1e-5)


def test_gpt_untied_logits_use_the_head_and_nnx_equals_linen():
    module = models.GPTTiny(VOCAB, **GPT, tie_embeddings=False)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (3, 6)), jnp.int32)
    variables = _fill(_abstract(module, tokens))
    head = np.asarray(variables["params"]["head"]["kernel"], np.float64)
    assert head.shape == (GPT["dim"], VOCAB)
    logits, captured = jax.jit(functools.partial(module.apply, capture_intermediates=True))(
        variables, tokens
    )
    hidden = np.asarray(captured["intermediates"]["final_ln"]["__call__"][0], np.float64)
    np.testing.assert_allclose(logits, hidden @ head, rtol=1e-5, atol=1e-5)
    make = lambda rngs: models.NNXGPTTiny(VOCAB, **GPT, tie_embeddings=False, rngs=rngs)
    np.testing.assert_allclose(_nnx_eval(make, variables, tokens), logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors

_R = nnx.Rngs(0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: models.ResNet20(0), "ResNet20: num_classes must be an integer >= 1, got num_c"),
        (lambda: models.ResNet20(width=2.0), "ResNet20: width must be an integer >= 1"),
        (lambda: models.ResNet20(momentum=1.0), r"ResNet20: momentum must be in \[0.0, 1.0\)"),
        (lambda: models.ResNet20(axis_name=0), "ResNet20: axis_name must be None or a str, got"),
        (
            lambda: models.ResNet20().init(jax.random.key(0), jnp.zeros((8, 8, 1))),
            r"ResNet20: expected images \(N, H, W, C\), got shape \(8, 8, 1\)",
        ),
        (
            lambda: models.NNXResNet20(0, rngs=_R),
            "NNXResNet20: in_channels must be an integer >= 1, got in_channels=0",
        ),
        (lambda: models.NNXResNet20(3, width=0, rngs=_R), "NNXResNet20: width must be an integer"),
        (lambda: models.ViTTiny(patch_size=0), "ViTTiny: patch_size must be an integer >= 1"),
        (
            lambda: models.ViTTiny(dim=130),
            "ViTTiny: dim must be divisible by heads, got dim=130, heads=4",
        ),
        (lambda: models.ViTTiny(depth=0), "ViTTiny: depth must be an integer >= 1, got depth=0"),
        (lambda: models.ViTTiny(dropout=1.0), r"ViTTiny: dropout must be in \[0.0, 1.0\)"),
        (
            lambda: models.ViTTiny(patch_size=3).init(jax.random.key(0), jnp.zeros((1, *IMAGES))),
            r"ViTTiny: image sides must be divisible by patch_size, got image \(H, W, C\)="
            r"\(8, 8, 1\) and patch_size=3",
        ),
        (
            lambda: models.ViTTiny(patch_size=4).init(jax.random.key(0), jnp.zeros((1, 28, 30, 1))),
            r"ViTTiny: image sides must be divisible by patch_size, got image \(H, W, C\)="
            r"\(28, 30, 1\) and patch_size=4",
        ),
        (
            lambda: models.NNXViTTiny((28, 28, 1), patch_size=8, rngs=_R),
            r"NNXViTTiny: image sides must be divisible by patch_size, got image \(H, W, C\)="
            r"\(28, 28, 1\) and patch_size=8",
        ),
        (
            lambda: models.NNXViTTiny((28, 28), rngs=_R),
            r"NNXViTTiny: image_shape must be \(H, W, C\), got \(28, 28\)",
        ),
        (
            lambda: models.NNXViTTiny(IMAGES, heads=3, rngs=_R),
            "NNXViTTiny: dim must be divisible by heads, got dim=128, heads=3",
        ),
        (lambda: models.GPTTiny(0), "GPTTiny: vocab_size must be an integer >= 1, got vocab_s"),
        (lambda: models.GPTTiny(65, context=0), "GPTTiny: context must be an integer >= 1"),
        (lambda: models.GPTTiny(65, layers=0), "GPTTiny: layers must be an integer >= 1"),
        (
            lambda: models.GPTTiny(65, tie_embeddings=1),
            "GPTTiny: tie_embeddings must be a bool, got tie_embeddings=1",
        ),
        (
            lambda: models.GPTTiny(65, dim=100, heads=3),
            "GPTTiny: dim must be divisible by heads, got dim=100, heads=3",
        ),
        (
            lambda: models.GPTTiny(65, context=8).init(
                jax.random.key(0), jnp.zeros((2, 9), jnp.int32)
            ),
            r"GPTTiny: sequence length 9 exceeds context=8 \(tokens \(2, 9\)\)",
        ),
        (
            lambda: models.GPTTiny(65).init(jax.random.key(0), jnp.zeros((2, 9))),
            r"GPTTiny: expected integer tokens \(B, L\), got float32 \(2, 9\)",
        ),
        (
            lambda: models.NNXGPTTiny(65, dropout=-0.1, rngs=_R),
            r"NNXGPTTiny: dropout must be in \[0.0, 1.0\), got dropout=-0.1",
        ),
    ],
)
def test_errors(make, match):
    with pytest.raises((TypeError, ValueError), match=f"mixjax.models.{match}"):
        make()


def test_nnx_errors_at_the_call():
    model = nnx.eval_shape(lambda: models.NNXGPTTiny(VOCAB, **GPT, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NNXGPTTiny: sequence length 9 exceeds context=8"):
        model(jnp.zeros((1, 9), jnp.int32))
    vit = nnx.eval_shape(lambda: models.NNXViTTiny(IMAGES, **VIT, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"NNXViTTiny: expected images \(N, \*\(8, 8, 1\)\)"):
        vit(jnp.zeros((1, 16, 16, 1)))


# ----------------------------------------------------------------------------- training

STEPS = 20


def _losses_fall(losses):
    losses = np.asarray(losses)
    assert losses.shape == (STEPS,) and np.all(np.isfinite(losses))
    assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses


def _stacked(images, labels):
    return {
        "image": jnp.broadcast_to(images, (STEPS, *images.shape)),
        "label": jnp.broadcast_to(labels, (STEPS, *labels.shape)),
    }


def test_resnet20_trains_with_make_train_step():
    module = models.ResNet20(2, **RESNET)
    images, labels = _two_class_task()
    variables = _fill(_abstract(module, images), random=False)
    apply_fn = train.linen_apply(module, train_kwarg="train")
    tx = optax.adam(1e-2)
    state = train.init_train_state(
        variables["params"],
        tx,
        key=jax.random.key(0),
        model_state={"batch_stats": variables["batch_stats"]},
    )
    step = train.make_train_step(apply_fn, tx, steps_per_call=STEPS)
    state, metrics = step(state, _stacked(images, labels))
    _losses_fall(metrics["loss"])
    moved = state.model_state["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(moved, variables["batch_stats"]["stem_bn"]["mean"])


def test_nnx_vit_trains_with_make_train_step_and_dropout():
    model = nnx.eval_shape(
        lambda: models.NNXViTTiny(IMAGES, 2, **VIT, dropout=0.1, rngs=nnx.Rngs(0))
    )
    images, labels = _two_class_task()
    module = models.ViTTiny(2, **VIT)
    nnx.update(model, _fill(_abstract(module, images), random=False)["params"])
    nnx.reseed(model, dropout=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    state = train.init_train_state(params, tx, key=jax.random.key(0), model_state=rest)
    step = train.make_train_step(train.nnx_apply(graphdef), tx, steps_per_call=STEPS)
    _, metrics = step(state, _stacked(images, labels))
    _losses_fall(metrics["loss"])


def test_gpt_trains_with_an_optax_loop():
    """The model alone, in a hand-written optax loop (make_train_step's sequence path is tested
    in tests/test_train_sequence.py)."""
    module = models.GPTTiny(VOCAB, **{**GPT, "layers": 1}, dropout=0.1)
    rng = np.random.default_rng(0)
    # The successor task: token t + 1 follows token t (mod VOCAB), from random starts.
    seqs = (rng.integers(0, VOCAB, (16, 1)) + np.arange(GPT["context"] + 1)) % VOCAB
    tokens, targets = jnp.asarray(seqs[:, :-1], jnp.int32), jnp.asarray(seqs[:, 1:], jnp.int32)
    params = _fill(_abstract(module, tokens), random=False)["params"]
    apply_fn = train.linen_apply(module, train_kwarg="train")
    tx = optax.adam(1e-2)

    def loss_fn(params, key):
        logits, _ = apply_fn(params, {}, tokens, train=True, key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def run(params):
        def one(carry, key):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        keys = jax.random.split(jax.random.key(0), STEPS)
        return jax.lax.scan(one, (params, tx.init(params)), keys)[1]

    losses = run(params)
    _losses_fall(losses)
