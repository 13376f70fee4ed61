"""Tests of mixjax.schedules: step -> value functions and their eager validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import schedules


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit])
def test_polynomial_equals_formula(wrap):
    si, sf, t0, t1, power = 0.1, 0.8, 20, 120, 3
    sched = wrap(schedules.polynomial(si, sf, t0, t1, power=power))
    steps = np.arange(0, 150)
    t = np.clip(steps - t0, 0, t1 - t0)
    expected = sf + (si - sf) * (1 - t / (t1 - t0)) ** power
    np.testing.assert_allclose([float(sched(s)) for s in steps], expected, rtol=1e-6, atol=1e-6)
    assert sched(jnp.asarray(5)).dtype == jnp.float32


def test_polynomial_frequency_and_others():
    sched = schedules.polynomial(0.0, 0.5, 0, 100, power=1, frequency=10)
    values = np.asarray(sched(jnp.arange(100)))
    assert len(np.unique(values)) == 10 and values[9] == 0.0 and values[10] == pytest.approx(0.05)
    np.testing.assert_array_equal(
        schedules.one_shot(5, 0.7)(jnp.arange(8)), np.float32([0] * 5 + [0.7] * 3)
    )
    np.testing.assert_array_equal(schedules.constant(0.3)(jnp.arange(3)), np.float32([0.3] * 3))


def test_schedule_errors():
    with pytest.raises(
        ValueError, match=r"polynomial: end_step must be an integer > begin_step=10"
    ):
        schedules.polynomial(0, 0.5, 10, 10)
    with pytest.raises(
        ValueError, match=r"polynomial: frequency must be an integer >= 1, got frequency=0"
    ):
        schedules.polynomial(0, 0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match=r"one_shot: step must be an integer >= 0, got step=-1"):
        schedules.one_shot(-1, 0.5)


def test_check_schedule_probes_any_callable():
    # optax schedules and Python-branching callables are probed eagerly.
    ok = schedules.check_schedule("f", "s", optax.linear_schedule(0.0, 0.9, 100), 0.0, 1.0)
    assert float(ok(50)) == pytest.approx(0.45)
    python_branching = lambda step: 0.5 if step < 100 else 1.5
    with pytest.raises(
        ValueError, match=r"f: s schedule values must be in \[0.0, 1.0\), got s\(104\)=1.5"
    ):
        schedules.check_schedule("f", "s", python_branching, 0.0, 1.0)
    with pytest.raises(TypeError, match=r"f: s must be a float or a schedule"):
        schedules.check_schedule("f", "s", "0.5", 0.0, 1.0)


def test_constant_and_one_shot_with_python_and_array_steps():
    assert float(schedules.constant(0.25)(7)) == 0.25
    np.testing.assert_array_equal(schedules.constant(0.25)(jnp.arange(3)), np.float32([0.25] * 3))
    step = schedules.one_shot(3, 0.9)
    np.testing.assert_allclose([float(step(t)) for t in range(5)], [0, 0, 0, 0.9, 0.9], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(step)(jnp.arange(5)), [0, 0, 0, 0.9, 0.9], rtol=1e-6)


def test_polynomial_holds_before_begin_and_after_end():
    sched = schedules.polynomial(0.1, 0.8, begin_step=10, end_step=20, power=2)
    assert float(sched(0)) == pytest.approx(0.1) and float(sched(10)) == pytest.approx(0.1)
    assert float(sched(20)) == pytest.approx(0.8) and float(sched(10**6)) == pytest.approx(0.8)
    assert float(sched(15)) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**2)


def test_as_schedule():
    sched = schedules.as_schedule(0.5)
    assert float(sched(3)) == 0.5
    f = lambda step: step * 0.0
    assert schedules.as_schedule(f) is f
    with pytest.raises(TypeError, match="expected a float or a schedule"):
        schedules.as_schedule("0.5")


def test_check_schedule_ranges():
    assert float(schedules.check_schedule("f", "s", 0.5, 0.0, 1.0)(3)) == 0.5
    with pytest.raises(ValueError, match=r"f: s must be in \[0.0, 1.0\), got s=1.0"):
        schedules.check_schedule("f", "s", 1.0, 0.0, 1.0)
    assert float(schedules.check_schedule("f", "s", 1.0, 0.0, 1.0, high_inclusive=True)(0)) == 1.0
    with pytest.raises(ValueError, match=r"f: s must be in \[0.0, 1.0\), got s=nan"):
        schedules.check_schedule("f", "s", float("nan"), 0.0, 1.0)
    late = schedules.polynomial(0.0, 1.0, 0, 5000)  # reaches 1.0 at step 5000
    with pytest.raises(ValueError, match=r"f: s schedule values must be in .* got s\(\d+\)=1.0"):
        schedules.check_schedule("f", "s", late, 0.0, 1.0)
    nan_after = lambda step: jnp.where(jnp.asarray(step) > 7, jnp.nan, 0.5)
    with pytest.raises(ValueError, match=r"got s\(8\)=nan"):
        schedules.check_schedule("f", "s", nan_after, 0.0, 1.0)
    with pytest.raises(TypeError, match=r"f: s must be a float or a schedule"):
        schedules.check_schedule("f", "s", True, 0.0, 1.0)
