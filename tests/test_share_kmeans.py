"""Tests of mixjax.kmeans against NumPy references.

Most tests share one data shape and K so the jit cache is reused (compiling dominates here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.share import kmeans, kmeans_init

N, K, BINS = 4000, 8, 256  # BINS < N: the histogram path
X = np.random.default_rng(0).standard_normal(N).astype(np.float32)
KEY = jax.random.key(0)  # passed to every fit so that all inits share compiled programs


def _numpy_lloyd(x, centroids, iterations=10_000):
    """Exact Lloyd in float64 NumPy (ties at a midpoint go up)."""
    x = np.asarray(x, np.float64)
    c = np.sort(np.asarray(centroids, np.float64))
    for _ in range(iterations):
        a = np.searchsorted((c[1:] + c[:-1]) / 2, x, side="right")
        counts = np.bincount(a, minlength=c.size)
        sums = np.bincount(a, weights=x, minlength=c.size)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c))
        if np.array_equal(new, c):
            break
        c = new
    return c


def _check_result(x, result, mask=None, means=True):
    """Assignments are nearest, inertia right, centroids member means (NumPy, float64).

    Histogram fits end one exact Lloyd step after the binned fixed point, so their centroids
    are only near their members' means (``means=False``).
    """
    x = np.asarray(x, np.float64)
    c = np.asarray(result.centroids, np.float64)
    a = np.asarray(result.assignments)
    m = np.ones(x.shape, bool) if mask is None else np.asarray(mask)
    assert result.centroids.dtype == jnp.float32 and result.assignments.dtype == jnp.int32
    assert np.all(np.diff(c) >= 0)
    distance = np.abs(x[:, None] - c[None, :])
    np.testing.assert_allclose(distance[np.arange(x.size), a], distance.min(axis=1), atol=1e-6)
    for k in range(c.size if means else 0):
        members = x[(a == k) & m]
        if members.size:
            np.testing.assert_allclose(c[k], members.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(result.inertia), np.sum(((x - c[a]) ** 2)[m]), rtol=1e-4)


def test_exact_fit_matches_numpy_lloyd(harness):
    init = kmeans.init_centroids(None, X, K, method="linear")
    result = harness(lambda x: kmeans.refine(x, init))(X)
    _check_result(X, result)
    np.testing.assert_allclose(result.centroids, _numpy_lloyd(X, init), rtol=1e-5, atol=1e-6)
    assert int(result.iterations) > 1


def test_histogram_fit_close_to_exact():
    exact = kmeans.fit(KEY, X, K)
    binned = kmeans.fit(KEY, X, K, bins=BINS)
    _check_result(X, binned, means=False)
    # 256 bins for 4000 values is coarse; the default 16384 bins gets within 0.02% at 1e6.
    assert float(binned.inertia) <= float(exact.inertia) * 1.01


def _optimal_inertia(x, k):
    """The global 1-D k-means optimum by dynamic programming over the sorted values (NumPy)."""
    x = np.sort(np.asarray(x, np.float64))
    sums = np.concatenate([[0.0], np.cumsum(x)])
    squares = np.concatenate([[0.0], np.cumsum(x * x)])
    i, j = np.arange(x.size + 1)[:, None], np.arange(x.size + 1)[None, :]
    count = np.maximum(j - i, 1)
    cost = np.where(i <= j, squares[j] - squares[i] - (sums[j] - sums[i]) ** 2 / count, np.inf)
    best = cost[0]
    for _ in range(k - 1):
        best = np.min(best[:, None] + cost, axis=0)
    return best[-1]


def test_default_init_reaches_the_optimum_and_beats_sklearn():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x = X[:1000]
    ours = jax.jit(lambda x: kmeans.fit(None, x, K))(x)
    _check_result(x, ours)
    # The dynamic program runs on 256 groups; Lloyd closes most of what that restriction costs.
    np.testing.assert_allclose(float(ours.inertia), _optimal_inertia(x, K), rtol=1e-3)
    theirs = sklearn_cluster.KMeans(K, random_state=0).fit(x[:, None].astype(np.float64))
    assert float(ours.inertia) <= theirs.inertia_ * (1 + 1e-6)


def test_optimal_init_is_exact_when_every_value_is_a_group():
    x = X[: kmeans_init.OPTIMAL_GROUPS - 56].astype(np.float64)
    c = np.asarray(kmeans.init_centroids(None, x.astype(np.float32), K), np.float64)
    inertia = np.sum(np.min((x[:, None] - c[None, :]) ** 2, axis=1))
    np.testing.assert_allclose(inertia, _optimal_inertia(x, K), rtol=1e-5)


@pytest.mark.parametrize("init", kmeans.INITS)
def test_every_init_converges(init):
    result = kmeans.fit(KEY, X, K, init=init)
    _check_result(X, result)
    assert 0 < int(result.iterations) < kmeans.DEFAULT_MAX_ITERATIONS


def test_mse_no_worse_than_uniform_quantization():
    rng = np.random.default_rng(3)
    for x in (rng.standard_normal(N), rng.laplace(size=N), rng.uniform(-1, 1, N)):
        x = x.astype(np.float32)
        grid = np.linspace(x.min(), x.max(), K)
        uniform = grid[np.abs(x[:, None] - grid[None, :]).argmin(axis=1)]
        result = kmeans.fit(KEY, x, K, init="linear")
        assert float(result.inertia) / N <= np.mean((x - uniform) ** 2) * (1 + 1e-6)


def test_inits_match_their_definitions():
    linear = kmeans.init_centroids(None, X, K, method="linear")
    np.testing.assert_allclose(linear, np.linspace(X.min(), X.max(), K), atol=1e-6)
    density = kmeans.init_centroids(None, X, K, method="density")
    optimal = kmeans.init_centroids(None, X, K)
    assert np.all(np.diff(optimal) > 0) and optimal.shape == (K,)
    quantile_rank = np.ceil((np.arange(K) + 0.5) / K * N).astype(int) - 1
    np.testing.assert_array_equal(density, np.sort(X)[quantile_rank])
    random = kmeans.init_centroids(jax.random.key(1), X, K, method="random")
    assert np.all((random >= X.min()) & (random <= X.max())) and np.all(np.diff(random) >= 0)
    other = kmeans.init_centroids(jax.random.key(2), X, K, method="random")
    assert not np.array_equal(random, other)


def test_kmeanspp_draws_from_the_data_and_spreads_over_modes():
    plus = kmeans.init_centroids(jax.random.key(1), X, K, method="kmeans++")
    assert np.all(np.isin(np.asarray(plus), X)) and np.all(np.diff(plus) >= 0)
    modes = np.repeat(np.arange(K) * 10.0, N // K)
    x = (modes + np.random.default_rng(5).normal(0, 0.01, N)).astype(np.float32)
    for seed in range(3):
        c = kmeans.init_centroids(jax.random.key(seed), x, K, method="kmeans++")
        np.testing.assert_allclose(c, np.arange(K) * 10.0, atol=0.1)


def test_mask_ignores_values():
    mask = np.abs(X) > 0.5
    init = np.linspace(-2, 2, K)
    masked = kmeans.refine(X, init, mask=mask)
    np.testing.assert_allclose(masked.centroids, _numpy_lloyd(X[mask], init), rtol=1e-5, atol=1e-6)
    _check_result(X, masked, mask)


def test_batched_groups_are_independent():
    # Groups: two normal ones, a constant one and a fully masked one, on the histogram path.
    x = np.stack([X[: N // 2], X[N // 2 :] * 3, np.full(N // 2, 2.5), X[: N // 2]])
    x = x.astype(np.float32).reshape(2, 2, N // 2)
    mask = np.ones(x.shape, bool)
    mask[1, 1] = False
    result = kmeans.fit(KEY, x, K, mask=mask, bins=BINS)
    assert result.centroids.shape == (2, 2, K) and result.assignments.shape == x.shape
    assert result.inertia.shape == result.iterations.shape == (2, 2)
    for i, j in [(0, 0), (0, 1)]:
        _check_result(x[i, j], jax.tree.map(lambda v, i=i, j=j: v[i, j], result), means=False)
    np.testing.assert_allclose(result.centroids[1, 0], 2.5)
    assert float(result.inertia[1, 0]) == 0.0
    assert np.all(np.isfinite(result.centroids[1, 1])) and float(result.inertia[1, 1]) == 0.0


def test_one_cluster_per_value():
    every = kmeans.fit(None, np.arange(6, dtype=np.float32), 6)
    np.testing.assert_array_equal(every.centroids, np.arange(6))
    np.testing.assert_array_equal(every.assignments, np.arange(6))
    assert float(every.inertia) == 0.0


def test_assign_is_nearest():
    x = X.reshape(2, N // 2)
    centroids = np.sort(np.random.default_rng(8).standard_normal((2, 7)), axis=1)
    expected = np.abs(x[..., None] - centroids[:, None, :]).argmin(axis=-1)
    np.testing.assert_array_equal(kmeans.assign(x, centroids), expected)


def test_compiles_once_per_shape():
    kmeans.fit(KEY, X, K)
    before = kmeans._fit_jit._cache_size()
    kmeans.fit(KEY, X + 1.0, K)
    kmeans.fit(jax.random.key(1), X * 2.0, K)
    assert kmeans._fit_jit._cache_size() == before


def test_errors():
    x = X[:10]
    with pytest.raises(
        ValueError, match=r"mixjax.share.kmeans.fit: num_clusters must be .* got num"
    ):
        kmeans.fit(None, x, 0)
    with pytest.raises(ValueError, match=r"num_clusters=11 exceeds the 10 values per group"):
        kmeans.fit(None, x, 11)
    with pytest.raises(TypeError, match=r"mixjax.share.kmeans.fit: x must be a floating-point"):
        kmeans.fit(None, np.arange(10), 2)
    with pytest.raises(ValueError, match=r"init must be one of .* got init='kmeans'"):
        kmeans.fit(None, x, 2, init="kmeans")
    with pytest.raises(ValueError, match=r"init='random' is random and needs a jax.random key"):
        kmeans.fit(None, x, 2, init="random")
    with pytest.raises(ValueError, match=r"mask must have x's shape \(10,\), got \(9,\)"):
        kmeans.fit(None, x, 2, mask=np.ones(9, bool))
    with pytest.raises(ValueError, match=r"bins must be an integer >= 2, got bins=1"):
        kmeans.fit(None, x, 2, bins=1)
    with pytest.raises(ValueError, match=r"max_iterations must be (None or )?an integer >= 0"):
        kmeans.fit(None, x, 2, max_iterations=-1)
    with pytest.raises(ValueError, match=r"non-empty last axis, got shape \(0,\)"):
        kmeans.fit(None, np.zeros(0, np.float32), 1)
    with pytest.raises(ValueError, match=r"mixjax.share.kmeans.refine: centroids must have shape"):
        kmeans.refine(x.reshape(2, 5), np.zeros((3, 2)))
    with pytest.raises(
        ValueError, match=r"mixjax.share.kmeans.init_centroids: method must be one of"
    ):
        kmeans.init_centroids(None, x, 2, method="nope")
