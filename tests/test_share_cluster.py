"""Tests of mixjax.share (weight clustering) against NumPy references.

Both kernels have the same size, so each clustering configuration compiles one k-means program
(same-size leaves are clustered together), and most tests share those programs.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mixjax
from mixjax import layout, prune, quant, share
from mixjax.core import EmptyState, ParamTransform
from mixjax.share import kmeans

K = 4
KERNELS = ("Dense_0", "Dense_1")
PRUNE = prune.magnitude(0.5)  # one instance: its compiled programs are reused across tests


def _params(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    return {
        layer: {
            "kernel": jax.random.normal(k[2 * n], (8, 8), dtype),
            "bias": jax.random.normal(k[2 * n + 1], (8,), dtype),
        }
        for n, layer in enumerate(KERNELS)
    }


def _dot(a, b):
    """Sum over leaves of <a, b>."""
    return sum(jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(x * y), a, b)))


def _groups(w, per_channel):
    w = np.asarray(w, np.float32)
    return list(w.reshape(-1, w.shape[-1]).T) if per_channel else [w.reshape(-1)]


def _max_distinct(w, per_channel):
    return max(np.unique(g).size for g in _groups(w, per_channel))


def _uniform_mse(w, levels, per_channel):
    errors = []
    for g in _groups(w, per_channel):
        grid = np.linspace(g.min(), g.max(), levels)
        errors.append((g - grid[np.abs(g[:, None] - grid[None, :]).argmin(axis=1)]) ** 2)
    return np.mean(np.concatenate(errors))


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", share.clustering.MODES)
def test_at_most_k_values_and_beats_uniform_quantization(mode, per_channel, harness):
    params = _params()
    t = share.cluster(K, mode=mode, per_channel=per_channel, preserve_sparsity=False)
    state = t.init(params)
    view = harness(t.apply)(params, state)
    for layer in KERNELS:
        w, v = params[layer]["kernel"], view[layer]["kernel"]
        assert v.dtype == w.dtype and v.shape == w.shape
        assert _max_distinct(v, per_channel) <= K
        mse = np.mean((np.asarray(v) - np.asarray(w)) ** 2)
        assert mse <= _uniform_mse(w, K, per_channel) * (1 + 1e-6)
        np.testing.assert_array_equal(view[layer]["bias"], params[layer]["bias"])


def test_fixed_view_is_the_kmeans_codebook():
    params = _params()
    t = share.cluster(K, preserve_sparsity=False)
    state = t.init(params)
    view = t.apply(params, state)
    stacked = jnp.stack([params[layer]["kernel"].reshape(-1) for layer in KERNELS])
    fit = kmeans.fit(None, stacked, K, mask=jnp.ones(stacked.shape, bool))  # as cluster does
    for n, layer in enumerate(KERNELS):
        w = params[layer]["kernel"]
        expected = np.asarray(fit.centroids[n])[np.asarray(fit.assignments[n])].reshape(w.shape)
        np.testing.assert_allclose(view[layer]["kernel"], expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(
            state.assignments[layer]["kernel"], fit.assignments[n].reshape(w.shape)
        )
        assert state.assignments[layer]["kernel"].dtype == jnp.uint8
        assert state.centroids[layer]["kernel"] is None and state.assignments[layer]["bias"] is None


@pytest.mark.parametrize("per_channel", [False, True])
def test_fixed_mode_centroid_gradient_is_the_sum_of_member_gradients(per_channel, harness):
    params = _params()
    t = share.cluster(K, per_channel=per_channel, preserve_sparsity=False)
    state = t.init(params)
    r = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape), params)

    def loss(p):
        view = t.apply(p, state)
        return _dot(jax.tree.map(jnp.square, view), r)

    grads = harness(jax.grad(loss))(params)
    view = t.apply(params, state)
    for layer in KERNELS:
        a = np.asarray(state.assignments[layer]["kernel"])
        g_view = 2 * np.asarray(view[layer]["kernel"]) * np.asarray(r[layer]["kernel"])
        channel = np.broadcast_to(np.arange(a.shape[-1]), a.shape) if per_channel else 0 * a
        cluster_id = channel * K + a
        summed = np.bincount(cluster_id.ravel(), weights=g_view.ravel(), minlength=a.shape[-1] * K)
        np.testing.assert_allclose(grads[layer]["kernel"], summed[cluster_id], rtol=1e-5, atol=1e-6)
        g_bias = 2 * np.asarray(params[layer]["bias"]) * np.asarray(r[layer]["bias"])
        np.testing.assert_allclose(grads[layer]["bias"], g_bias, rtol=1e-6)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.05), optax.adam(0.05)], ids=["sgd", "adam"])
def test_fixed_mode_trains_centroids_in_a_plain_optax_loop(optimizer):
    """The recipe equals training a codebook directly (Deep Compression's centroid update)."""
    params = _params()
    t = share.cluster(K, preserve_sparsity=False)
    state = t.init(params)
    target = jax.tree.map(lambda x: x * 0.5 + 0.3, params)

    def loss(view):
        difference = jax.tree.map(jnp.subtract, view, target)
        return _dot(difference, difference)

    # Reference: the codebook as the trained parameter, view = centroids[assignments].
    view0 = t.apply(params, state)
    assignments = {layer: state.assignments[layer]["kernel"] for layer in KERNELS}
    codebook = {
        layer: jax.ops.segment_max(view0[layer]["kernel"].ravel(), assignments[layer].ravel(), K)
        for layer in KERNELS
    }

    def reference_view(book):
        view = jax.tree.map(lambda x: x, params)
        for layer in KERNELS:
            view[layer] = dict(view[layer], kernel=book[layer][assignments[layer]])
        return view

    ref_state = optimizer.init(codebook)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, codebook, ref_state):
        grads = jax.grad(lambda p: loss(t.apply(p, state)))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        ref_grads = jax.grad(lambda b: loss(reference_view(b)))(codebook)
        ref_updates, ref_state = optimizer.update(ref_grads, ref_state, codebook)
        return (
            optax.apply_updates(params, updates),
            opt_state,
            optax.apply_updates(codebook, ref_updates),
            ref_state,
        )

    for _ in range(3):
        params, opt_state, codebook, ref_state = step(params, opt_state, codebook, ref_state)
    view, expected = t.apply(params, state), reference_view(codebook)
    for layer in KERNELS:
        np.testing.assert_allclose(view[layer]["kernel"], expected[layer]["kernel"], atol=2e-6)
        assert _max_distinct(view[layer]["kernel"], False) <= K
    assert not np.allclose(
        codebook["Dense_0"],
        jax.ops.segment_max(view0["Dense_0"]["kernel"].ravel(), assignments["Dense_0"].ravel(), K),
    )


@pytest.mark.parametrize("per_channel", [False, True])
def test_reassign_mode_is_nearest_centroid_with_straight_through_gradient(per_channel, harness):
    params = _params()
    t = share.cluster(K, mode="reassign", per_channel=per_channel, preserve_sparsity=False)
    state = t.init(params)
    moved = jax.tree.map(lambda x: x * 1.3 - 0.1, params)  # assignments change, centroids not
    view = harness(t.apply)(moved, state)
    for layer in KERNELS:
        c = np.asarray(state.centroids[layer]["kernel"])
        assert c.shape == ((8, K) if per_channel else (K,))
        for g, vg, cg in zip(
            _groups(moved[layer]["kernel"], per_channel),
            _groups(view[layer]["kernel"], per_channel),
            c if per_channel else [c],
            strict=True,
        ):
            np.testing.assert_array_equal(vg, cg[np.abs(g[:, None] - cg[None, :]).argmin(axis=1)])
    r = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), params)
    loss = lambda p: _dot(t.apply(p, state), r)
    grads = harness(jax.grad(loss))(moved)
    jax.tree.map(lambda g, q: np.testing.assert_allclose(g, q, rtol=1e-6), grads, r)


def _zero_small(threshold):
    """A tiny pruning stand-in: zeroes the weights with |w| < threshold."""
    zero = lambda params: jax.tree.map(lambda x: jnp.where(jnp.abs(x) < threshold, 0.0, x), params)
    return ParamTransform(
        init=lambda params: EmptyState(),
        apply=lambda params, state: zero(params),
        update=lambda params, state, step, **extra: state,
    )


@pytest.mark.parametrize("mode", share.clustering.MODES)
def test_preserve_sparsity_after_pruning_keeps_every_zero(mode, harness):
    params = _params()
    for pruning in (PRUNE, _zero_small(0.8)):
        t = mixjax.chain(pruning, share.cluster(K, mode=mode))
        state = t.init(params)
        pruned = pruning.apply(params, state[0])
        view = harness(t.apply)(params, state)
        for layer in KERNELS:
            p, v = np.asarray(pruned[layer]["kernel"]), np.asarray(view[layer]["kernel"])
            assert np.sum(p == 0) > 0
            np.testing.assert_array_equal(v == 0, p == 0)  # zeros kept, no new zeros
            assert np.unique(v).size <= K and 0.0 in v
        if mode == "fixed":
            a = np.asarray(state[1].assignments["Dense_0"]["kernel"])
            np.testing.assert_array_equal(a == K - 1, np.asarray(pruned["Dense_0"]["kernel"]) == 0)


@pytest.mark.parametrize("mode", share.clustering.MODES)
def test_weights_pruned_after_clustering_are_zero_in_the_view(mode):
    params = _params()
    t = share.cluster(K, mode=mode)
    state = t.init(params)
    later = _zero_small(0.5).apply(params, EmptyState())
    view = t.apply(later, state)
    for layer in KERNELS:
        zero = np.asarray(later[layer]["kernel"]) == 0
        v = np.asarray(view[layer]["kernel"])
        assert np.all(v[zero] == 0) and np.all(v[~zero] != 0)
        assert np.unique(v).size <= K


def test_prune_cluster_quantize_compose():
    params = _params()
    t = mixjax.chain(PRUNE, share.cluster(K), quant.fake_quant(8))
    state = t.init(params)
    view = jax.jit(t.apply)(params, state)
    pruned = PRUNE.apply(params, state[0])
    for layer in KERNELS:
        v = np.asarray(view[layer]["kernel"])
        np.testing.assert_array_equal(v == 0, np.asarray(pruned[layer]["kernel"]) == 0)
        assert _max_distinct(v, False) <= K  # per-channel scales follow the per-tensor codebook


def test_update_every_reclusters_inside_jit_and_compiles_once():
    params = _params()
    t = share.cluster(K, update_every=2, preserve_sparsity=False)
    state = t.init(params)
    # Not an affine map of the weights: k-means would give the same assignments.
    moved = jax.tree.map(lambda x: x + 0.7 * jnp.sin(3.0 * x), params)
    traces = []

    @jax.jit
    def update(params, state, step):
        traces.append(step)
        return t.update(params, state, step)

    same = update(moved, state, jnp.int32(1))
    jax.tree.map(np.testing.assert_array_equal, same, state)
    fresh = update(moved, state, jnp.int32(2))
    view = t.apply(moved, fresh)
    assert not np.array_equal(
        fresh.assignments["Dense_0"]["kernel"], state.assignments["Dense_0"]["kernel"]
    )
    for layer in KERNELS:
        mse = np.mean((np.asarray(view[layer]["kernel"]) - np.asarray(moved[layer]["kernel"])) ** 2)
        assert mse <= _uniform_mse(moved[layer]["kernel"], K, False)
    update(moved, fresh, jnp.int32(3))
    assert len(traces) == 1
    # Without update_every the state never changes.
    still = share.cluster(K).update(moved, state, 2)
    jax.tree.map(np.testing.assert_array_equal, still, state)


def test_random_inits_are_reproducible_from_the_key():
    params = _params()
    make = lambda seed: share.cluster(
        K, init="random", key=jax.random.key(seed), mode="reassign", max_iterations=0
    )
    first, again, other = (make(seed).init(params) for seed in (1, 1, 2))
    jax.tree.map(np.testing.assert_array_equal, first, again)
    centroids = lambda state: np.concatenate([np.ravel(c) for c in jax.tree.leaves(state)])
    assert not np.array_equal(centroids(first), centroids(other))


def test_bfloat16_leaves_keep_their_dtype():
    params = _params(dtype=jnp.bfloat16)
    t = share.cluster(K)
    view = t.apply(params, t.init(params))
    assert view["Dense_0"]["kernel"].dtype == jnp.bfloat16
    assert _max_distinct(view["Dense_0"]["kernel"], False) <= K


def test_nnx_state():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    t = share.cluster(K, per_channel=True, preserve_sparsity=False)
    view = t.apply(state, t.init(state))
    kernel = (
        jax.tree.leaves(view)[1] if jax.tree.leaves(view)[0].ndim == 1 else jax.tree.leaves(view)[0]
    )
    assert kernel.shape == (8, 8) and _max_distinct(kernel, True) <= K


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("mode", share.clustering.MODES)
def test_codebook_reconstructs_the_view_exactly(mode, per_channel):
    params = _params()
    t = mixjax.chain(PRUNE, share.cluster(K, mode=mode, per_channel=per_channel))
    view = t.apply(params, t.init(params))
    for layer in KERNELS:
        book = share.codebook(view[layer]["kernel"], K, per_channel=per_channel)
        assert book.indices.dtype == np.uint8 and book.indices.shape == view[layer]["kernel"].shape
        assert book.centroids.shape == (
            (view[layer]["kernel"].shape[-1], K) if per_channel else (K,)
        )
        np.testing.assert_array_equal(share.reconstruct(book), view[layer]["kernel"])
    with pytest.raises(
        ValueError, match=r"mixjax.share.codebook: the leaf of shape \(8, 8\) has 64"
    ):
        share.codebook(params["Dense_0"]["kernel"], K)
    with pytest.raises(ValueError, match=r"output channel 0 of shape \(8, 8\) has 8 distinct"):
        share.codebook(params["Dense_0"]["kernel"], K, per_channel=True)


def test_tie_gradient_is_the_segment_sum():
    x = jnp.arange(6.0)
    ids = jnp.array([0, 1, 0, 1, 2, 2])
    live = jnp.array([True, True, True, False, True, True])
    np.testing.assert_allclose(share.tie(x, ids, live, 3), [1, 1, 1, 0, 4.5, 4.5])
    g = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    grads = jax.grad(lambda x: jnp.vdot(share.tie(x, ids, live, 3), g))(x)
    np.testing.assert_allclose(grads, [4, 2, 4, 0, 11, 11])


def test_tie_matches_a_numpy_loop_in_values_and_gradients(harness):
    """Random segments, dead entries and a NaN in a dead entry, against per-segment loops."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((12, 10)).astype(np.float32)
    ids = rng.integers(0, 5, x.shape)
    live = rng.uniform(size=x.shape) > 0.3
    x[~live] = np.where(np.arange((~live).sum()) == 0, np.nan, 7.0)
    g = rng.standard_normal(x.shape).astype(np.float32)
    want, want_grad = np.zeros_like(x), np.zeros_like(x)
    for s in range(5):
        members = live & (ids == s)
        want[members] = x[members].astype(np.float64).mean() if members.any() else 0.0
        want_grad[members] = g[members].astype(np.float64).sum()
    tie = harness(lambda x: share.tie(x, jnp.asarray(ids), jnp.asarray(live), 5))
    got = tie(jnp.asarray(x))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    grad = harness(jax.grad(lambda x: jnp.vdot(share.tie(x, ids, live, 5), g)))(jnp.asarray(x))
    assert grad.dtype == jnp.float32
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-5)


def test_errors():
    params = _params()
    with pytest.raises(
        ValueError,
        match=r"mixjax.share.cluster: num_clusters must be an integer >= 2, got num_clusters=1",
    ):
        share.cluster(1)
    with pytest.raises(ValueError, match=r"init must be one of .* got init='kmeans'"):
        share.cluster(K, init="kmeans")
    with pytest.raises(
        ValueError, match=r"mode must be one of \('fixed', 'reassign'\), got mode='soft'"
    ):
        share.cluster(K, mode="soft")
    with pytest.raises(ValueError, match=r"init='kmeans\+\+' is random and needs key="):
        share.cluster(K, init="kmeans++")
    with pytest.raises(
        ValueError, match=r"update_every must be None or an integer >= 1, got update_every=0"
    ):
        share.cluster(K, update_every=0)
    with pytest.raises(ValueError, match=r"max_iterations must be (None or )?an integer >= 0"):
        share.cluster(K, max_iterations=-1)
    with pytest.raises(ValueError, match=r"bins must be an integer >= 2, got bins=1"):
        share.cluster(K, bins=1)
    with pytest.raises(
        ValueError,
        match=r"mixjax.share.cluster: leaf 'Dense_0/kernel' \(8, 8\) float32: num_clusters=65 "
        r"exceeds the 64 weights per leaf",
    ):
        share.cluster(65).init(params)
    with pytest.raises(
        ValueError,
        match=r"leaf 'Dense_0/kernel' \(8, 8\) float32: num_clusters=9 exceeds the 8 weights "
        r"per output channel",
    ):
        share.cluster(9, per_channel=True).init(params)
    ints = dict(params, Dense_1=dict(params["Dense_1"], kernel=jnp.ones((8, 8), jnp.int32)))
    with pytest.raises(
        TypeError,
        match=r"leaf 'Dense_1/kernel' \(8, 8\) int32 is selected by where= but is not floating",
    ):
        share.cluster(K, where=".*kernel").init(ints)
    t = share.cluster(K)
    with pytest.raises(
        TypeError, match=r"mixjax.share.cluster: state must be a ClusterState, got tuple"
    ):
        t.apply(params, ())
    other = {
        "Dense_0": params["Dense_0"],
        "Dense_1": dict(params["Dense_1"], kernel=jnp.ones((4, 8))),
    }
    with pytest.raises(
        ValueError, match=r"assignments has shape \(8, 8\), expected the parameter's shape"
    ):
        t.apply(other, t.init(params))


def _with(params, layer, index, value):
    kernel = params[layer]["kernel"].at[index].set(value)
    return dict(params, **{layer: dict(params[layer], kernel=kernel)})


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("mode", share.clustering.MODES)
def test_non_finite_weights_are_refused_where_they_are_concrete(mode, bad):
    params = _with(_params(), "Dense_1", (2, 3), bad)
    t = share.cluster(K, mode=mode, update_every=1)
    match = (
        r"mixjax.share.cluster: leaf 'Dense_1/kernel' \(8, 8\) float32 holds 1 non-finite "
        r"values \(NaN/Inf\)"
    )
    with pytest.raises(ValueError, match=match):
        t.init(params)
    with pytest.raises(ValueError, match=match):  # an eager re-clustering update
        t.update(params, t.init(_params()), 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("mode", share.clustering.MODES)
def test_under_jit_non_finite_weights_stay_put_and_do_not_spread(mode, bad):
    params = _with(_params(), "Dense_0", (2, 3), bad)
    t = share.cluster(K, mode=mode, preserve_sparsity=False)
    state = jax.jit(t.init)(params)  # traced: the values cannot be checked
    view = np.asarray(jax.jit(t.apply)(params, state)["Dense_0"]["kernel"])
    w = np.asarray(params["Dense_0"]["kernel"])
    finite = np.isfinite(w)
    np.testing.assert_array_equal(view[~finite], w[~finite])  # passed through unchanged
    # The 63 finite weights are clustered as k-means clusters them without the bad one.
    fit = kmeans.fit(None, jnp.asarray(w[finite]), K)
    expected = np.asarray(fit.centroids)[np.asarray(fit.assignments)]
    np.testing.assert_allclose(view[finite], expected, rtol=1e-6, atol=1e-7)
    assert np.unique(view[finite]).size == K


@pytest.mark.parametrize("mode", ["fixed", "reassign"])
def test_per_channel_with_layouts_clusters_each_output_feature(mode):
    """A query kernel (embed, heads, head_dim): its output features are (head, head_dim) pairs
    (mixjax.layout), each clustered on its own along embed -- not one head_dim slot of every
    head at once, as the last-axis convention would."""
    attention = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
    x = jnp.zeros((1, 3, 16))
    params = attention.init(jax.random.key(0), x, x)["params"]
    params = jax.tree.map(lambda w: jax.random.normal(jax.random.key(w.size), w.shape), params)
    layouts = layout.learn(lambda p, x: attention.apply({"params": p}, x, x), params, x)
    t = share.cluster(3, per_channel=True, mode=mode, layouts=layouts, preserve_sparsity=False)
    view = t.apply(params, t.init(params))
    query = np.asarray(view["query"]["kernel"])  # (16, 4, 8)
    distinct = [len(np.unique(query[:, h, d])) for h in range(4) for d in range(8)]
    assert max(distinct) <= 3 and min(distinct) >= 2
    # Across one head_dim slot of all heads (what the convention groups) there are more values.
    assert len(np.unique(query[:, :, 0])) > 3
    out = np.asarray(view["out"]["kernel"])  # (heads, head_dim, embed): features on embed
    assert max(len(np.unique(out[:, :, e])) for e in range(16)) <= 3
    jitted = jax.jit(t.apply)(params, jax.jit(t.init)(params))
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(view), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
