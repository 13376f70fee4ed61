"""Tests of mixjax.observe: observers against NumPy, inside jit, convergence, non-finite data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.quant import observers


def batches(n=20, size=(64, 8), low=-1.0, high=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(low, high, size).astype(np.float32) for _ in range(n)]


def run(observer, data, harness):
    update = harness(observer.update)
    state = observer.init()
    for x in data:
        state = update(state, jnp.asarray(x))
    return state


def check_dtypes(state):
    assert state.min.dtype == jnp.float32 and state.max.dtype == jnp.float32
    assert state.count.dtype == jnp.int32 and state.min.shape == ()


def test_minmax_is_the_running_extreme(harness):
    data = batches(5)
    state = run(observers.minmax_observer(), data, harness)
    check_dtypes(state)
    assert float(state.min) == np.min(data) and float(state.max) == np.max(data)
    assert int(state.count) == 5


def test_ema_matches_the_recurrence_and_converges_to_the_range(harness):
    data = batches(300, size=(256,))
    state = run(observers.ema_observer(0.9), data, harness)
    check_dtypes(state)
    lo, hi = data[0].min(), data[0].max()
    for x in data[1:]:
        lo, hi = 0.9 * lo + 0.1 * x.min(), 0.9 * hi + 0.1 * x.max()
    np.testing.assert_allclose([state.min, state.max], [lo, hi], rtol=1e-5)
    np.testing.assert_allclose([state.min, state.max], [-1.0, 3.0], atol=0.05)


def test_percentile_is_the_mean_of_batch_percentiles(harness):
    data = batches(4, size=(1000,), seed=3)
    state = run(observers.percentile_observer(99.0), data, harness)
    check_dtypes(state)
    ref_lo = np.mean([np.percentile(x, 1.0) for x in data])
    ref_hi = np.mean([np.percentile(x, 99.0) for x in data])
    np.testing.assert_allclose([state.min, state.max], [ref_lo, ref_hi], rtol=1e-5, atol=1e-6)
    assert -1.0 < float(state.min) < -0.9 and 2.9 < float(state.max) < 3.0


def test_observer_runs_inside_a_scanned_step():
    data = jnp.asarray(np.stack(batches(50)))
    obs = observers.ema_observer(0.95)
    final, _ = jax.jit(lambda s, xs: jax.lax.scan(lambda s, x: (obs.update(s, x), None), s, xs))(
        obs.init(), data
    )
    assert int(final.count) == 50
    np.testing.assert_allclose([final.min, final.max], [-1.0, 3.0], atol=0.05)


@pytest.mark.parametrize(
    "make", [observers.minmax_observer, observers.ema_observer, observers.percentile_observer]
)
def test_nonfinite_values_are_ignored(make):
    obs = make()
    update = jax.jit(obs.update)
    state = update(obs.init(), jnp.array([0.5, jnp.nan, -2.0, jnp.inf, -jnp.inf, 1.5]))
    assert int(state.count) == 1
    assert float(state.min) <= -1.9 and float(state.max) >= 1.4
    assert np.isfinite(state.min) and np.isfinite(state.max)
    again = update(state, jnp.array([jnp.nan, jnp.inf]))
    assert int(again.count) == 1
    np.testing.assert_array_equal([again.min, again.max], [state.min, state.max])


@pytest.mark.parametrize("decay", [1.0, -0.1, 2])
def test_ema_bad_decay(decay):
    with pytest.raises(
        ValueError,
        match=rf"mixjax.quant.ema_observer: decay must be in \[0.0, 1.0\), got decay={decay}",
    ):
        observers.ema_observer(decay)


@pytest.mark.parametrize("q, error", [(50, ValueError), (100.5, ValueError), ("99", TypeError)])
def test_percentile_bad_q(q, error):
    with pytest.raises(error, match=r"mixjax.quant.percentile_observer: q must be "):
        observers.percentile_observer(q)
