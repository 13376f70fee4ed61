"""Tests of mixjax.merge: tying near-duplicate units and removing them for real."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.share import merge

LAYERS = [("Dense_0", "Dense_1"), ("Dense_1", "Dense_2")]


def _mlp_params(noise=0.0, seed=0):
    """A 6-8-5-3 MLP whose first two layers have duplicated units (plus ``noise``)."""
    rng = np.random.default_rng(seed)
    w0, b0 = rng.standard_normal((6, 8)), rng.standard_normal(8)
    for copy, source in [(4, 1), (6, 1), (7, 2)]:
        w0[:, copy], b0[copy] = w0[:, source], b0[source]
        w0[:, copy] += noise * rng.standard_normal(6)
    w1, b1 = rng.standard_normal((8, 5)), rng.standard_normal(5)
    w1[:, 3], b1[3] = w1[:, 0], b1[0]
    w2, b2 = rng.standard_normal((5, 3)), rng.standard_normal(3)
    params = {"Dense_0": (w0, b0), "Dense_1": (w1, b1), "Dense_2": (w2, b2)}
    return {
        name: {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
        for name, (w, b) in params.items()
    }


def _mlp(params, x):
    for name in ("Dense_0", "Dense_1"):
        x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
    return x @ params["Dense_2"]["kernel"] + params["Dense_2"]["bias"]


def _flops(params):
    return sum(2 * p["kernel"].size for p in params.values())


X = jax.random.normal(jax.random.key(1), (32, 6))


def test_identical_units_are_removed_exactly(harness):
    params = _mlp_params()
    t = merge.merge_similar(1.0)
    state = t.init(params)
    np.testing.assert_array_equal(state.leaders["Dense_0"]["kernel"], [0, 1, 2, 3, 1, 5, 1, 2])
    np.testing.assert_array_equal(state.leaders["Dense_0"]["bias"], [0, 1, 2, 3, 1, 5, 1, 2])
    np.testing.assert_array_equal(state.leaders["Dense_1"]["kernel"], [0, 1, 2, 0, 4])
    np.testing.assert_array_equal(state.leaders["Dense_2"]["kernel"], [0, 1, 2])
    view = harness(t.apply)(params, state)
    jax.tree.map(lambda v, p: np.testing.assert_allclose(v, p, rtol=1e-6, atol=1e-7), view, params)
    small, reports = merge.remove_merged(params, state, LAYERS)
    assert small["Dense_0"]["kernel"].shape == (6, 5) and small["Dense_0"]["bias"].shape == (5,)
    assert small["Dense_1"]["kernel"].shape == (5, 4) and small["Dense_1"]["bias"].shape == (4,)
    assert small["Dense_2"]["kernel"].shape == (4, 3)
    assert reports["Dense_0"].units_before == 8 and reports["Dense_0"].units_after == 5
    np.testing.assert_array_equal(reports["Dense_0"].kept, [0, 1, 2, 3, 5])
    np.testing.assert_array_equal(reports["Dense_1"].kept, [0, 1, 2, 4])
    assert reports["Dense_0"].max_deviation == 0.0 == reports["Dense_1"].max_deviation
    np.testing.assert_allclose(_mlp(small, X), _mlp(params, X), rtol=1e-5, atol=1e-5)
    assert _flops(small) < _flops(params)


def test_similar_units_are_tied_and_the_error_is_measured():
    params = _mlp_params(noise=0.02)
    t = merge.merge_similar(0.99)
    state = t.init(params)
    np.testing.assert_array_equal(state.leaders["Dense_0"]["kernel"], [0, 1, 2, 3, 1, 5, 1, 2])
    view = t.apply(params, state)
    tied = np.asarray(view["Dense_0"]["kernel"])
    np.testing.assert_array_equal(tied[:, 1], tied[:, 4])
    original = np.asarray(params["Dense_0"]["kernel"])
    np.testing.assert_allclose(tied[:, 1], original[:, [1, 4, 6]].mean(axis=1), rtol=1e-6)
    small, reports = merge.remove_merged(params, state, LAYERS)
    # The smaller model computes the tied model's function; the tying itself costs a little.
    np.testing.assert_allclose(_mlp(small, X), _mlp(view, X), rtol=1e-5, atol=1e-5)
    error = np.max(np.abs(_mlp(small, X) - _mlp(params, X))) / np.max(np.abs(_mlp(params, X)))
    deviation = reports["Dense_0"].max_deviation
    assert 0 < error < 0.05 and 0.001 < deviation < 0.05


def test_conv_filters_fold_into_the_next_conv():
    rng = np.random.default_rng(2)
    k0, b0 = rng.standard_normal((3, 3, 2, 6)), rng.standard_normal(6)
    k0[..., 5], b0[5] = k0[..., 0], b0[0]
    params = {
        "Conv_0": {"kernel": jnp.asarray(k0, jnp.float32), "bias": jnp.asarray(b0, jnp.float32)},
        "Conv_1": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 6, 4)), jnp.float32)},
    }

    def net(p, x):
        conv = lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return conv(
            jax.nn.relu(conv(x, p["Conv_0"]["kernel"]) + p["Conv_0"]["bias"]), p["Conv_1"]["kernel"]
        )

    t = merge.merge_similar(1.0, where=".*Conv_0/kernel")
    state = t.init(params)
    small, reports = merge.remove_merged(params, state, [("Conv_0", "Conv_1")])
    assert small["Conv_0"]["kernel"].shape == (3, 3, 2, 5)
    assert small["Conv_1"]["kernel"].shape == (3, 3, 5, 4)
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 2))
    np.testing.assert_allclose(net(small, x), net(params, x), rtol=1e-5, atol=1e-4)


def _numpy_leaders(units, threshold):
    units = np.asarray(units, np.float64)
    norms = np.linalg.norm(units, axis=0)
    c = units.shape[1]
    leaders, grouped = np.arange(c), np.zeros(c, bool)
    for i in range(c):
        if grouped[i]:
            continue
        for j in range(i + 1, c):
            if grouped[j]:
                continue
            if norms[i] == 0 or norms[j] == 0:
                close = norms[i] == norms[j]
            else:
                close = units[:, i] @ units[:, j] / (norms[i] * norms[j]) >= threshold
            if close:
                leaders[j], grouped[j] = i, True
    return leaders


def test_leaders_by_cosine_matches_a_numpy_greedy_reference(harness):
    rng = np.random.default_rng(4)
    units = rng.standard_normal((10, 12))
    units[:, 3] = 2.5 * units[:, 0]  # cosine ignores scale
    units[:, 5] = units[:, 1] + 0.05 * rng.standard_normal(10)
    units[:, 7] = units[:, 5] + 0.05 * rng.standard_normal(10)
    units[:, [8, 10]] = 0.0
    for threshold in (1.0, 0.99, 0.9, 0.3):
        leaders = harness(lambda u, t=threshold: merge.leaders_by_cosine(u, t))(units)
        assert leaders.dtype == jnp.int32
        np.testing.assert_array_equal(leaders, _numpy_leaders(units, threshold))


def test_tied_units_receive_their_group_gradient():
    params = _mlp_params(noise=0.02)
    t = merge.merge_similar(0.99, where=".*Dense_0/kernel")
    state = t.init(params)
    r = jax.random.normal(jax.random.key(5), (6, 8))
    grads = jax.grad(lambda p: jnp.vdot(t.apply(p, state)["Dense_0"]["kernel"], r))(params)
    expected = np.asarray(r).copy()
    expected[:, [1, 4, 6]] = np.asarray(r)[:, [1, 4, 6]].sum(axis=1, keepdims=True)
    expected[:, [2, 7]] = np.asarray(r)[:, [2, 7]].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(grads["Dense_0"]["kernel"], expected, rtol=1e-6)
    np.testing.assert_array_equal(grads["Dense_0"]["bias"], 0.0)  # not used by this loss


def test_update_every_regroups_inside_jit_and_compiles_once():
    params = _mlp_params(noise=0.02)
    t = merge.merge_similar(0.99, update_every=3)
    state = t.init(params)
    apart = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(6), x.shape), params)
    traces = []

    @jax.jit
    def update(params, state, step):
        traces.append(step)
        return t.update(params, state, step)

    jax.tree.map(np.testing.assert_array_equal, update(apart, state, jnp.int32(2)), state)
    fresh = update(apart, state, jnp.int32(3))
    np.testing.assert_array_equal(fresh.leaders["Dense_0"]["kernel"], np.arange(8))
    assert len(traces) == 1


def test_errors():
    params = _mlp_params()
    for bad in (0, 0.0, 1.5, -0.2, True, "0.9"):
        error = TypeError if isinstance(bad, (bool, str)) else ValueError
        with pytest.raises(error, match=r"mixjax.share.merge_similar: threshold must be "):
            merge.merge_similar(bad)
    with pytest.raises(ValueError, match=r"update_every must be None or an integer >= 1"):
        merge.merge_similar(0.9, update_every=0)
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/bias' \(8,\) float32 is selected but has"):
        merge.merge_similar(0.9, where=".*Dense_0/bias").init(params)
    state = merge.merge_similar(1.0, where=".*Dense_1/kernel").init(params)
    with pytest.raises(ValueError, match=r"mixjax.share.remove_merged: no leaf 'Dense_9/kernel'"):
        merge.remove_merged(params, state, [("Dense_9", "Dense_1")])
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/kernel' \(6, 8\) float32 was not merged"):
        merge.remove_merged(params, state, [("Dense_0", "Dense_1")])
    with pytest.raises(
        ValueError,
        match=r"cannot fold leaf 'Dense_1/kernel' \(8, 5\) float32 into leaf 'Dense_1/kernel' "
        r"\(8, 5\) float32: the consumer's fan-in axis -2 must have the producer's 5 units",
    ):
        merge.remove_merged(params, state, [("Dense_1", "Dense_1")])
    with pytest.raises(TypeError, match=r"state must be a MergeState, got dict"):
        merge.remove_merged(params, {}, LAYERS)
    with pytest.raises(TypeError, match=r"mixjax.share.merge_similar: state must be a MergeState"):
        merge.merge_similar(0.9).apply(params, None)
