"""Tests of mixjax.app.pruning: the kernels the image pipeline prunes, read off the model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import data, layout, models, select
from mixjax.app import common, pruning
from mixjax.app import config as config_lib


def _digits(n=16):
    rng = np.random.default_rng(0)
    return data.normalize(rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8))


def _model(name, classes, **sizes):
    module = models.create(name, classes, **sizes)
    x = _digits()
    variables = dict(jax.jit(module.init)(jax.random.key(0), x[:2]))
    params = variables.pop("params")
    forward = common.forward(module, variables)
    return forward, params, x, layout.learn(forward, params, x)


@pytest.mark.parametrize(
    ("name", "classes", "sizes", "head"),
    [
        ("lenet5", 10, {}, "Dense_2/kernel"),
        # 100 classes: Dense_1 (300, 100) has as many outputs as the head Dense_2 (100, 100).
        ("lenet300100", 100, {}, "Dense_2/kernel"),
        ("resnet20", 10, {"width": 2}, "head/kernel"),
        ("vit_tiny", 10, {"width": 16, "depth": 1, "heads": 2}, "head/kernel"),
    ],
)
def test_output_kernel_is_the_kernel_whose_features_are_the_logits(name, classes, sizes, head):
    forward, params, x, layouts = _model(name, classes, **sizes)
    assert pruning.output_kernel(forward, params, x, layouts) == head


@pytest.mark.parametrize(
    ("mix", "candidates", "found"),
    [
        # Logits that mix every feature of the last kernel: no kernel is the output layer.
        (lambda y, z: y + y.sum(-1, keepdims=True), "['last/kernel', 'other/kernel']", "none"),
        # Two heads summed: each is one, so the output layer is ambiguous.
        (
            lambda y, z: y + z,
            "['last/kernel', 'other/kernel']",
            "all of ['last/kernel', 'other/kernel']",
        ),
    ],
)
def test_output_kernel_refuses_a_model_without_exactly_one(mix, candidates, found):
    rng = np.random.default_rng(1)
    shapes = {"hidden": (6, 4), "last": (4, 3), "other": (4, 3)}
    params = {
        k: {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for k, s in shapes.items()
    }

    def forward(p, x):
        h = jnp.tanh(x @ p["hidden"]["kernel"])
        return mix(h @ p["last"]["kernel"], h @ p["other"]["kernel"])

    x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    layouts = layout.learn(forward, params, x)
    message = (
        "mixjax.app.pipeline: cannot tell the output layer: of the matmul kernels with 3 output "
        f"features ({candidates}), the one whose feature k feeds logit k alone is {found}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        pruning.output_kernel(forward, params, x, layouts)


def test_groups_follow_the_layouts():
    _, params, _, layouts = _model("vit_tiny", 10, width=16, depth=1, heads=2)
    groups = pruning.groups(layouts, "head/kernel")
    assert groups["output"] == ["head/kernel"]
    assert groups["conv"] == ["patch_embed/kernel"]
    attention = [f"block0/attn/{n}/kernel" for n in ("key", "out", "query", "value")]
    assert sorted(groups["matmul"]) == sorted(
        [*attention, "block0/mlp_in/kernel", "block0/mlp_out/kernel"]
    )
    kernels = {p for paths in groups.values() for p in paths}
    # Added, not multiplied: the position embedding is no kernel; nor are biases and norms.
    assert "pos_embedding" not in kernels and all(p.endswith("kernel") for p in kernels)


def test_pruning_reaches_each_group_sparsity_along_the_layouts():
    _, params, _, layouts = _model("vit_tiny", 10, width=16, depth=1, heads=2)
    c = config_lib.Compress(prune_steps=100, sparsity=0.5, conv_sparsity=0.0, output_sparsity=0.8)
    transform = pruning.pruning(c, layouts, "head/kernel")
    state = transform.init(params)
    end = int(c.prune_steps * pruning.PRUNE_END)
    state = transform.update(params, state, end)
    view = transform.apply(params, state)
    zeros = {p: float(np.mean(np.asarray(x) == 0)) for p, x in select.leaves_with_paths(view)}
    assert zeros["head/kernel"] == pytest.approx(0.8, abs=0.01)
    assert zeros["block0/attn/out/kernel"] == pytest.approx(0.5, abs=0.01)
    assert zeros["block0/mlp_in/kernel"] == pytest.approx(0.5, abs=0.01)
    assert zeros["patch_embed/kernel"] == 0.0 and zeros["pos_embedding"] == 0.0
