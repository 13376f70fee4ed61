"""Tests of mixjax.select: where= selectors on tree paths, selections and mirror trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import select


def test_selectors():
    tree = {
        "Conv_0": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)},
        "BatchNorm_0": {"scale": jnp.ones(4)},
        "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
        "step": jnp.zeros((2, 2), jnp.int32),
    }

    def chosen(where):
        hits = select.selection("t", tree, where, floating_only=False)
        return sorted(p for p, hit in select.leaves_with_paths(hits) if hit)

    assert chosen(None) == ["Conv_0/kernel", "Dense_0/kernel"]
    assert chosen(".*Dense_0/kernel") == ["Dense_0/kernel"]
    with pytest.raises(ValueError, match="matches no leaf"):  # a regex matches whole paths
        chosen("Dense_0")
    assert chosen(("Conv_0/bias", "Dense_0/bias")) == ["Conv_0/bias", "Dense_0/bias"]
    assert chosen(select.all_of(None, select.min_size(10))) == ["Conv_0/kernel"]
    assert chosen(select.exclude(".*kernel")) == [
        "BatchNorm_0/scale",
        "Conv_0/bias",
        "Dense_0/bias",
        "step",
    ]
    assert chosen(lambda path, leaf: leaf.ndim == 1 and path.startswith("Conv")) == ["Conv_0/bias"]


def test_selection_errors():
    with pytest.raises(ValueError, match=r"mixjax.select: where='\[' is not a valid regex"):
        select.as_selector("[")
    with pytest.raises(TypeError, match=r"where= must be None, a regex string, a callable"):
        select.as_selector(3)
    with pytest.raises(ValueError, match=r"fn: where='nothing' matches no leaf; the tree has 'a'"):
        select.selection("fn", {"a": jnp.ones((2, 2))}, "nothing")


def test_nnx_paths_match_linen_paths():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.Dense_0 = nnx.Linear(3, 2, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    assert sorted(p for p, _ in select.leaves_with_paths(state)) == [
        "Dense_0/bias",
        "Dense_0/kernel",
    ]


def test_path_strings_of_every_key_kind():
    tree = {"a": [jnp.ones(1), {"b": jnp.ones(2)}], "c": (jnp.ones(3),)}
    assert [p for p, _ in select.leaves_with_paths(tree)] == ["a/0", "a/1/b", "c/0"]
    keypath = (jax.tree_util.GetAttrKey("layer"), jax.tree_util.GetAttrKey("value"))
    assert select.path_str(keypath) == "layer"  # NNX's trailing .value is dropped
    assert select.path_str((jax.tree_util.GetAttrKey("value"),)) == "value"  # but not alone
    assert select.describe("w", jnp.ones((2, 3), jnp.bfloat16)) == "leaf 'w' (2, 3) bfloat16"


def test_the_default_selects_float_kernels_only():
    assert select.kernels("k", jnp.ones((2, 2)))
    assert not select.kernels("b", jnp.ones(2))
    assert not select.kernels("i", jnp.ones((2, 2), jnp.int32))
    assert not select.is_floating(3.0) and select.is_floating(jnp.ones(1, jnp.float16))


def test_regex_matches_the_whole_path():
    r = select.regex("Dense_[0-9]/kernel")
    assert r("Dense_0/kernel", None) and not r("net/Dense_0/kernel", None)
    assert not r("Dense_0/kernel_2", None)
    assert select.as_selector(".*kernel")("net/Dense_0/kernel", None)


def test_selection_of_a_non_float_leaf_is_a_type_error():
    tree = {"w": jnp.ones((2, 2)), "n": jnp.ones((2, 2), jnp.int32)}
    with pytest.raises(TypeError, match=r"fn: leaf 'n' \(2, 2\) int32 is selected by where="):
        select.selection("fn", tree, lambda p, leaf: True)
    hits = select.selection("fn", tree, lambda p, leaf: True, floating_only=False)
    assert hits == {"w": True, "n": True}


def test_mirror_and_its_checks():
    tree = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    chosen = select.selection("fn", tree, None)
    shapes = select.mirror(lambda path, leaf: jnp.zeros(leaf.shape, bool), tree, chosen)
    assert shapes["b"] is None and shapes["w"].shape == (2, 3)
    doubled = select.mirror(lambda path, leaf, m: leaf * 2 + m, tree, chosen, shapes)
    np.testing.assert_array_equal(doubled["w"], np.full((2, 3), 2.0))
    select.check_mirror_shapes("fn", tree, shapes, "mask")
    with pytest.raises(ValueError, match="fn: the mask does not match the params tree"):
        select.check_mirror("fn", tree, {"w": None}, "mask")
    with pytest.raises(
        ValueError, match=r"fn: leaf 'w' \(2, 3\) float32: mask has shape \(3, 2\), expected"
    ):
        select.check_mirror_shapes("fn", tree, {"w": jnp.zeros((3, 2)), "b": None}, "mask")


@pytest.mark.parametrize("harness", ["eager", "jit"], indirect=False)
def test_selection_is_static_and_free_under_jit(harness):
    """Selectors see paths, shapes and dtypes only, so they run at trace time."""
    seen = []

    def where(path, leaf):
        seen.append((path, tuple(leaf.shape)))
        return leaf.ndim >= 2

    def fn(tree):
        chosen = select.selection("fn", tree, where)
        return select.mirror(lambda path, leaf: leaf + 1, tree, chosen)

    tree = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    run = jax.jit(fn) if harness == "jit" else fn
    out = run(tree)
    assert out["b"] is None and float(out["w"].sum()) == 8.0
    assert sorted(seen) == [("b", (2,)), ("w", (2, 2))]
