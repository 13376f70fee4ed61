"""Leaf selection (:mod:`mixjax.select`): path strings, selectors, ``where=``, mirror trees."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import select
from mixjax.select import all_of, any_of, exclude, min_size


def tree():
    return {
        "Conv_0": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)},
        "BatchNorm_0": {"scale": jnp.ones(4)},
        "Dense_0": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
        "step": jnp.zeros((2, 2), jnp.int32),
    }


def chosen(where, params=None):
    """The sorted paths ``where`` selects in ``params`` (default :func:`tree`)."""
    hits = select.selection("t", tree() if params is None else params, where, floating_only=False)
    return sorted(p for p, hit in select.leaves_with_paths(hits) if hit)


# ----------------------------------------------------------------------------------------------
# Paths.


class Pair(NamedTuple):
    first: jax.Array
    value: jax.Array


def test_path_str_of_each_key_kind():
    dict_key, attr, seq = jax.tree_util.DictKey, jax.tree_util.GetAttrKey, jax.tree_util.SequenceKey
    flat = jax.tree_util.FlattenedIndexKey
    assert select.path_str((dict_key("Dense_0"), dict_key("kernel"))) == "Dense_0/kernel"
    assert select.path_str((dict_key(3), seq(1), flat(2))) == "3/1/2"
    assert select.path_str((attr("layers"), seq(0), attr("kernel"))) == "layers/0/kernel"
    # NNX's trailing `value` attribute is dropped ...
    assert select.path_str((dict_key("Dense_0"), dict_key("kernel"), attr("value"))) == (
        "Dense_0/kernel"
    )
    # ... but not a `value` dict key, a `value` in the middle, or a path of `value` alone.
    assert select.path_str((dict_key("a"), dict_key("value"))) == "a/value"
    assert select.path_str((attr("value"), attr("b"))) == "value/b"
    assert select.path_str((attr("value"),)) == "value"
    assert select.path_str(()) == ""


def test_leaves_with_paths_in_tree_leaves_order():
    params = {"b": [jnp.zeros(2), (jnp.ones(1), jnp.ones(3))], "a": Pair(jnp.ones(4), jnp.ones(5))}
    got = select.leaves_with_paths(params)
    # A NamedTuple field is an attribute key; its trailing `value` is dropped like NNX's.
    assert [p for p, _ in got] == ["a/first", "a", "b/0", "b/1/0", "b/1/1"]
    for (_, leaf), expected in zip(got, jax.tree.leaves(params), strict=True):
        assert leaf is expected
    assert select.leaves_with_paths({}) == []


def test_nnx_paths_match_linen_paths():
    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.Dense_0 = nnx.Linear(3, 2, rngs=rngs)
            self.Dense_1 = nnx.Linear(2, 5, rngs=rngs)

    class LinenNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            hidden = nn.Dense(2)(x)  # Dense_0, then Dense_1
            return nn.Dense(5)(hidden)

    _, state = nnx.split(NNXNet(nnx.Rngs(0)), nnx.Param)
    linen = jax.eval_shape(LinenNet().init, jax.random.key(0), jnp.ones((1, 3)))["params"]
    expected = ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]
    nnx_paths = [p for p, _ in select.leaves_with_paths(state)]
    assert sorted(nnx_paths) == expected
    assert sorted(p for p, _ in select.leaves_with_paths(linen)) == expected
    # The same where= selects the same leaves (of the same shapes) in both trees.
    for where in (None, ".*Dense_1/kernel", ".*bias"):
        assert chosen(where, state) == chosen(where, linen)
    shapes = {p: leaf.shape for p, leaf in select.leaves_with_paths(state)}
    assert shapes == {p: leaf.shape for p, leaf in select.leaves_with_paths(linen)}


def test_describe():
    assert select.describe("Dense_0/kernel", jnp.zeros((784, 300))) == (
        "leaf 'Dense_0/kernel' (784, 300) float32"
    )
    assert select.describe("b", np.zeros(3, np.int8)) == "leaf 'b' (3,) int8"
    assert select.describe("s", jnp.zeros((), jnp.bfloat16)) == "leaf 's' () bfloat16"
    assert select.describe("n", 3) == "leaf 'n' () int"  # no shape nor dtype: the type


# ----------------------------------------------------------------------------------------------
# Selectors.


@pytest.mark.parametrize(
    ("leaf", "expected"),
    [
        (jnp.ones((4, 2)), True),
        (jnp.ones((3, 3, 1, 4)), True),
        (jnp.ones((2, 2), jnp.bfloat16), True),
        (np.ones((2, 2), np.float64), True),
        (jnp.ones(4), False),  # a bias
        (jnp.ones(()), False),
        (jnp.ones((2, 2), jnp.int32), False),
        (jnp.ones((2, 2), bool), False),
        (1.5, False),  # no dtype
    ],
)
def test_kernels_default_selector(leaf, expected):
    assert select.kernels("any/path", leaf) is expected
    assert select.as_selector(None)("any/path", leaf) is expected


def test_default_selection_picks_kernels_never_biases_or_ints():
    assert chosen(None) == ["Conv_0/kernel", "Dense_0/kernel"]


def test_regex_matches_the_whole_path():
    leaf = jnp.ones((2, 2))
    kernel = select.regex(".*Dense_0/kernel")
    assert kernel("Dense_0/kernel", leaf) and kernel("block/Dense_0/kernel", leaf)
    assert not kernel("Dense_0/kernel_1", leaf)  # fullmatch, not match
    assert not select.regex("Dense_0")("Dense_0/kernel", leaf)  # fullmatch, not search
    assert not select.regex("kernel")("Dense_0/kernel", leaf)
    assert not select.regex("a|b")("ab", leaf)  # the alternation matches whole paths too
    assert select.regex("a|b")("b", leaf)
    assert select.regex("D.*")("Dense_0/bias", "not even an array")  # paths only
    assert select.regex("D.*").__name__ == "regex('D.*')"
    assert chosen(".*Dense_0/kernel") == ["Dense_0/kernel"]


def test_combinators():
    assert chosen(any_of(".*Conv_0/bias", ".*Dense_0/bias")) == ["Conv_0/bias", "Dense_0/bias"]
    assert chosen(any_of(None, "step")) == ["Conv_0/kernel", "Dense_0/kernel", "step"]
    assert chosen(all_of(None, min_size(10))) == ["Conv_0/kernel"]
    assert chosen(all_of(".*bias", lambda path, leaf: leaf.size == 2)) == ["Dense_0/bias"]
    assert chosen(exclude(".*kernel")) == [
        "BatchNorm_0/scale",
        "Conv_0/bias",
        "Dense_0/bias",
        "step",
    ]
    assert chosen(exclude(None)) == chosen(any_of(".*bias", ".*scale", "step"))
    assert chosen(all_of()) == chosen(".*")  # no condition: everything
    with pytest.raises(ValueError, match=r"^t: where=.* matches no leaf"):
        chosen(any_of())  # no alternative: nothing


def test_min_size():
    assert min_size(8)("p", jnp.ones((2, 4))) and not min_size(9)("p", jnp.ones((2, 4)))
    assert min_size(0)("p", object()) and not min_size(1)("p", object())  # no size: 0
    assert chosen(min_size(8)) == ["Conv_0/kernel", "Dense_0/kernel"]
    assert chosen(min_size(4)) == [
        "BatchNorm_0/scale",
        "Conv_0/bias",
        "Conv_0/kernel",
        "Dense_0/kernel",
        "step",
    ]


def test_as_selector_of_each_kind():
    assert select.as_selector(None) is select.kernels

    def predicate(path, leaf):
        return path.startswith("Conv") and leaf.ndim == 1

    assert select.as_selector(predicate) is predicate
    assert chosen(predicate) == ["Conv_0/bias"]
    from_str = select.as_selector(".*bias")
    assert from_str("Dense_0/bias", None) and not from_str("Dense_0/bias_1", None)
    # A tuple or list (nested too) selects what any of its entries selects.
    assert chosen(("Conv_0/bias", "Dense_0/bias")) == ["Conv_0/bias", "Dense_0/bias"]
    assert chosen(["step", (None, "BatchNorm_0/scale")]) == [
        "BatchNorm_0/scale",
        "Conv_0/kernel",
        "Dense_0/kernel",
        "step",
    ]


def test_as_selector_errors():
    with pytest.raises(ValueError, match=r"^mixjax\.select: where='\[' is not a valid regex: "):
        select.as_selector("[")
    with pytest.raises(ValueError, match=r"^mixjax\.select: where='a\(' is not a valid regex"):
        select.as_selector(("ok", "a("))  # inside a sequence too
    message = (
        r"^mixjax\.select: where= must be None, a regex string, a callable \(path, leaf\) -> "
        r"bool or a sequence of those; got {}$"
    )
    for bad, name in [(3, "int"), ({"a": 1}, "dict"), (b".*", "bytes")]:
        with pytest.raises(TypeError, match=message.format(name)):
            select.as_selector(bad)
    with pytest.raises(TypeError, match=message.format("float")):
        select.as_selector([".*", 1.0])


# ----------------------------------------------------------------------------------------------
# selection.


def test_selection_is_a_bool_mirror_tree():
    hits = select.selection("fn", tree(), None)
    assert jax.tree.structure(hits) == jax.tree.structure(tree())
    assert all(type(h) is bool for h in jax.tree.leaves(hits))
    assert hits["Conv_0"] == {"kernel": True, "bias": False}
    assert hits["Dense_0"] == {"kernel": True, "bias": False}
    assert hits["BatchNorm_0"] == {"scale": False} and hits["step"] is False


def test_selection_works_on_traced_leaves():
    def count(params):
        hits = select.selection("fn", params, None)
        return sum(int(h) for h in jax.tree.leaves(hits)) + jnp.zeros(())

    assert int(jax.jit(count)(tree())) == 2  # static information only (shapes, dtypes)


def test_selection_errors():
    params = {"a": jnp.ones((2, 2)), "b": {"c": jnp.ones(3)}}
    with pytest.raises(
        ValueError, match=r"^fn: where='nothing' matches no leaf; the tree has 'a', 'b/c'$"
    ):
        select.selection("fn", params, "nothing")
    many = {f"w{i:02d}": jnp.ones((2, 2)) for i in range(23)}
    with pytest.raises(ValueError, match=r"the tree has 'w00', 'w01', .*'w19' \(\+3 more\)$"):
        select.selection("fn", many, "nothing")
    with pytest.raises(
        TypeError,
        match=r"^mixjax\.prune\.magnitude: leaf 'step' \(2, 2\) int32 is selected by where= but "
        r"is not floating point; only float leaves can be transformed$",
    ):
        select.selection("mixjax.prune.magnitude", tree(), ".*")
    assert chosen(".*") == sorted(p for p, _ in select.leaves_with_paths(tree()))


# ----------------------------------------------------------------------------------------------
# Mirror trees.


def test_mirror_calls_fn_at_selected_leaves_only():
    params = tree()
    hits = select.selection("fn", params, None)
    seen = []

    def shape_of(path, leaf):
        seen.append(path)
        return np.asarray(leaf.shape)

    shapes = select.mirror(shape_of, params, hits)
    assert sorted(seen) == ["Conv_0/kernel", "Dense_0/kernel"]
    assert shapes["Conv_0"]["bias"] is None and shapes["step"] is None
    assert shapes["BatchNorm_0"]["scale"] is None
    np.testing.assert_array_equal(shapes["Conv_0"]["kernel"], [3, 3, 1, 4])
    # Further trees: mirror trees (None at unselected leaves) or full trees, passed leafwise.
    full = jax.tree.map(lambda x: x.size, params)
    both = select.mirror(lambda path, leaf, s, n: (path, s.tolist(), n), params, hits, shapes, full)
    assert both["Dense_0"]["kernel"] == ("Dense_0/kernel", [4, 2], 8)
    assert both["Conv_0"]["kernel"] == ("Conv_0/kernel", [3, 3, 1, 4], 36)
    assert both["Dense_0"]["bias"] is None


def test_check_mirror_accepts_mirrors():
    params = tree()
    masks = select.mirror(lambda p, leaf: jnp.ones(leaf.shape, bool), params, select.selection(
        "fn", params, None
    ))  # fmt: skip
    assert select.check_mirror("fn", params, masks) is None
    assert select.check_mirror_shapes("fn", params, masks, "masks") is None
    # A structured value (e.g. a NamedTuple) at a leaf is allowed by check_mirror.
    structured = jax.tree.map(lambda x: Pair(x, x), params)
    assert select.check_mirror("fn", params, structured) is None


def test_check_mirror_errors():
    params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
    head = (
        r"^mixjax\.share\.cluster: the {} does not match the params tree \(was it made by init on "
        r"these params\?\); params have leaves \['a', 'b'\]\.\.\.: "
    )
    for bad in ({"a": None}, {"a": None, "b": None, "c": None}, [None, None]):
        with pytest.raises(ValueError, match=head.format("state")):
            select.check_mirror("mixjax.share.cluster", params, bad)
        with pytest.raises(ValueError, match=head.format("masks")):
            select.check_mirror_shapes("mixjax.share.cluster", params, bad, "masks")
    with pytest.raises(
        ValueError,
        match=r"^fn: leaf 'a' \(2, 3\) float32: masks has shape \(3, 2\), expected the "
        r"parameter's shape \(was the state made by init on these params\?\)$",
    ):
        select.check_mirror_shapes("fn", params, {"a": jnp.ones((3, 2)), "b": None}, "masks")
