"""Schedules (:mod:`mixjax.schedules`): values at Python and array steps, under jit, checks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import schedules


def values(schedule, steps):
    return np.asarray(schedule(jnp.asarray(steps)))


# ----------------------------------------------------------------------------------------------
# constant / one_shot / polynomial.


def test_constant(harness):
    sched = harness(schedules.constant(0.3))
    assert float(sched(7)) == pytest.approx(0.3) and sched(7).shape == ()
    out = sched(jnp.arange(4))
    assert out.dtype == jnp.float32 and out.shape == (4,)
    np.testing.assert_array_equal(out, np.float32([0.3] * 4))
    np.testing.assert_array_equal(harness(schedules.constant(2))(jnp.arange(2)), [2.0, 2.0])


def test_constant_errors():
    with pytest.raises(TypeError, match=r"^mixjax\.schedules\.constant: value must be a number"):
        schedules.constant("0.3")
    with pytest.raises(TypeError, match=r"^mixjax\.schedules\.constant: value must be a number"):
        schedules.constant(True)
    with pytest.raises(
        ValueError, match=r"^mixjax\.schedules\.constant: value must be finite, got value=nan$"
    ):
        schedules.constant(float("nan"))


def test_one_shot(harness):
    sched = harness(schedules.one_shot(5, 0.7))
    assert [float(sched(t)) for t in (0, 4, 5, 6, 10**6)] == pytest.approx([0, 0, 0.7, 0.7, 0.7])
    out = sched(jnp.arange(8))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, np.float32([0] * 5 + [0.7] * 3))
    np.testing.assert_array_equal(
        sched(jnp.asarray([[9, 1], [5, 4]])), np.float32([[0.7, 0], [0.7, 0]])
    )
    at_zero = harness(schedules.one_shot(0, 0.25))
    np.testing.assert_array_equal(at_zero(jnp.arange(3)), np.float32([0.25] * 3))


def test_one_shot_errors():
    with pytest.raises(
        ValueError,
        match=r"^mixjax\.schedules\.one_shot: step must be an integer >= 0, got step=-1$",
    ):
        schedules.one_shot(-1, 0.5)
    with pytest.raises(TypeError, match=r"^mixjax\.schedules\.one_shot: step must be an integer"):
        schedules.one_shot(2.0, 0.5)
    with pytest.raises(ValueError, match=r"^mixjax\.schedules\.one_shot: value must be finite"):
        schedules.one_shot(2, float("inf"))


def test_polynomial_equals_formula(harness):
    si, sf, t0, t1, power = 0.1, 0.8, 20, 120, 3
    sched = harness(schedules.polynomial(si, sf, t0, t1, power=power))
    steps = np.arange(0, 150)
    t = np.clip(steps - t0, 0, t1 - t0)
    expected = sf + (si - sf) * (1 - t / (t1 - t0)) ** power
    np.testing.assert_allclose(values(sched, steps), expected, rtol=1e-6, atol=1e-6)
    for step in (0, 19, 20, 70, 120, 149):  # Python int steps too
        assert float(sched(step)) == pytest.approx(expected[step], rel=1e-6, abs=1e-6)
    assert sched(jnp.asarray(5)).dtype == jnp.float32


def test_polynomial_before_begin_and_after_end(harness):
    sched = harness(schedules.polynomial(0.2, 0.9, 100, 200, power=2))
    np.testing.assert_allclose(values(sched, [0, 50, 99, 100]), [0.2] * 4, rtol=1e-6)
    np.testing.assert_allclose(values(sched, [200, 201, 10**6, 2**31 - 1]), [0.9] * 4, rtol=1e-6)
    assert float(sched(150)) == pytest.approx(0.9 + (0.2 - 0.9) * 0.25, rel=1e-6)
    # A decreasing schedule works the same way.
    down = harness(schedules.polynomial(1.0, 0.0, 0, 4, power=1))
    np.testing.assert_allclose(values(down, [0, 1, 2, 3, 4, 5]), [1, 0.75, 0.5, 0.25, 0, 0])


def test_polynomial_frequency_counts_from_begin_step(harness):
    sched = harness(schedules.polynomial(0.0, 0.5, 0, 100, power=1, frequency=10))
    out = values(sched, np.arange(100))
    assert len(np.unique(out)) == 10 and out[9] == 0.0 and out[10] == pytest.approx(0.05)
    # The value changes every `frequency` steps after begin_step, not at multiples of it.
    late = harness(schedules.polynomial(0.0, 1.0, 5, 25, power=1, frequency=10))
    np.testing.assert_allclose(
        values(late, np.arange(30)), [0.0] * 15 + [0.5] * 10 + [1.0] * 5, rtol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"end_step": 10},
            ValueError,
            "end_step must be an integer > begin_step=10, got end_step=10",
        ),
        (
            {"end_step": 5},
            ValueError,
            "end_step must be an integer > begin_step=10, got end_step=5",
        ),
        ({"frequency": 0}, ValueError, "frequency must be an integer >= 1, got frequency=0"),
        (
            {"frequency": 2.0},
            TypeError,
            "frequency must be an integer >= 1, got frequency=2.0 (float)",
        ),
        ({"begin_step": -1}, ValueError, "begin_step must be an integer >= 0, got begin_step=-1"),
        (
            {"begin_step": True},
            TypeError,
            "begin_step must be an integer >= 0, got begin_step=True (bool)",
        ),
        ({"power": 0}, ValueError, "power must be > 0.0, got power=0"),
        ({"power": "3"}, TypeError, "power must be a number, got power='3'"),
        ({"initial": None}, TypeError, "initial must be a number, got initial=None"),
        ({"final": float("nan")}, ValueError, "final must be finite, got final=nan"),
    ],
)
def test_polynomial_errors(kwargs, error, message):
    args = {"initial": 0.0, "final": 0.5, "begin_step": 10, "end_step": 20, **kwargs}
    with pytest.raises(error) as info:
        schedules.polynomial(**args)
    assert str(info.value) == f"mixjax.schedules.polynomial: {message}"


# ----------------------------------------------------------------------------------------------
# as_schedule.


def test_as_schedule():
    for number in (0.25, 1, np.float32(0.5), np.int64(3)):
        sched = schedules.as_schedule(number)
        np.testing.assert_array_equal(sched(jnp.arange(3)), np.float32([float(number)] * 3))
    poly = schedules.polynomial(0.0, 1.0, 0, 10)
    assert schedules.as_schedule(poly) is poly
    optax_sched = optax.linear_schedule(0.0, 1.0, 10)
    assert schedules.as_schedule(optax_sched) is optax_sched
    for bad in ("0.5", True, np.bool_(False), None, [0.5]):
        with pytest.raises(
            TypeError,
            match=r"expected a float or a schedule \(step -> value\), got " + re.escape(repr(bad)),
        ):
            schedules.as_schedule(bad)


# ----------------------------------------------------------------------------------------------
# check_schedule.


def test_check_schedule_accepts_floats_and_schedules():
    sched = schedules.check_schedule("f", "s", 0.5, 0.0, 1.0)
    np.testing.assert_array_equal(sched(jnp.arange(3)), np.float32([0.5] * 3))
    np.testing.assert_array_equal(
        schedules.check_schedule("f", "s", 0, 0, 1)(jnp.arange(2)), [0, 0]
    )
    poly = schedules.polynomial(0.0, 0.9, 0, 100)
    assert schedules.check_schedule("f", "s", poly, 0.0, 1.0) is poly
    # optax schedules and Python-branching callables are probed eagerly.
    ok = schedules.check_schedule("f", "s", optax.linear_schedule(0.0, 0.9, 100), 0.0, 1.0)
    assert float(ok(50)) == pytest.approx(0.45)
    python_constant = lambda step: 0.5  # not elementwise: probed step by step
    assert schedules.check_schedule("f", "s", python_constant, 0.0, 1.0) is python_constant


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (1.0, r"^f: s must be in \[0\.0, 1\.0\), got s=1\.0$"),
        (-0.1, r"^f: s must be in \[0\.0, 1\.0\), got s=-0\.1$"),
        (float("nan"), r"^f: s must be in \[0\.0, 1\.0\), got s=nan$"),
        (float("inf"), r"^f: s must be in \[0\.0, 1\.0\), got s=inf$"),
        (np.float32(2.0), r"^f: s must be in \[0\.0, 1\.0\), got s=np\.float32\(2\.0\)$"),
    ],
)
def test_check_schedule_rejects_floats_out_of_range(value, match):
    with pytest.raises(ValueError, match=match):
        schedules.check_schedule("f", "s", value, 0.0, 1.0)


def test_check_schedule_reports_the_first_offending_step():
    ramp = schedules.polynomial(0.0, 2.0, 0, 1000, power=1)  # reaches 1.0 at step 500
    with pytest.raises(
        ValueError, match=r"^f: s schedule values must be in \[0\.0, 1\.0\), got s\(500\)=1\.0$"
    ):
        schedules.check_schedule("f", "s", ramp, 0.0, 1.0)
    nan_at_7 = lambda step: jnp.where(step == 7, jnp.nan, 0.1)
    with pytest.raises(ValueError, match=r"got s\(7\)=nan$"):
        schedules.check_schedule("f", "s", nan_at_7, 0.0, 1.0)
    negative_at_0 = schedules.polynomial(-0.5, 0.5, 0, 10)
    with pytest.raises(ValueError, match=r"got s\(0\)=-0\.5$"):
        schedules.check_schedule("f", "s", negative_at_0, 0.0, 1.0)
    # Beyond step 2047 the probes are geometric (about 3.4% apart) up to 10^7 steps.
    late = lambda step: jnp.where(step >= 5000, 1.5, 0.5)
    with pytest.raises(ValueError, match=r"got s\(\d+\)=1\.5$") as info:
        schedules.check_schedule("f", "s", late, 0.0, 1.0)
    step = int(re.search(r"s\((\d+)\)", str(info.value)).group(1))
    assert 5000 <= step < 5200
    very_late = lambda step: jnp.where(step >= 9_000_000, 1.5, 0.5)
    with pytest.raises(ValueError, match=r"got s\(\d+\)=1\.5$"):
        schedules.check_schedule("f", "s", very_late, 0.0, 1.0)


def test_check_schedule_probes_any_callable():
    python_branching = lambda step: 0.5 if step < 100 else 1.5  # fails on an array of steps
    with pytest.raises(
        ValueError, match=r"^f: s schedule values must be in \[0\.0, 1\.0\), got s\(104\)=1\.5$"
    ):  # probed step by step, every 8th step
        schedules.check_schedule("f", "s", python_branching, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"got s\(600\)=1\.0$"):
        schedules.check_schedule("f", "s", optax.linear_schedule(0.0, 2.0, 1200), 0.0, 1.0)


def test_check_schedule_high_inclusive():
    assert float(schedules.check_schedule("f", "s", 1.0, 0.0, 1.0, high_inclusive=True)(3)) == 1.0
    to_one = schedules.polynomial(0.0, 1.0, 0, 10)
    assert schedules.check_schedule("f", "s", to_one, 0.0, 1.0, high_inclusive=True) is to_one
    with pytest.raises(ValueError, match=r"^f: s schedule values must be in \[0\.0, 1\.0\), "):
        schedules.check_schedule("f", "s", to_one, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"^f: s must be in \[0, 8\], got s=9$"):
        schedules.check_schedule("f", "s", 9, 0, 8, high_inclusive=True)
    with pytest.raises(ValueError, match=r"^f: s must be in \[0, 8\], got s=nan$"):
        schedules.check_schedule("f", "s", float("nan"), 0, 8, high_inclusive=True)
    over = schedules.polynomial(0.0, 8.5, 0, 100, power=1)
    with pytest.raises(
        ValueError, match=r"^f: s schedule values must be in \[0, 8\], got s\(95\)="
    ):
        schedules.check_schedule("f", "s", over, 0, 8, high_inclusive=True)


@pytest.mark.parametrize("bad", ["0.5", True, None, [0.5], {"s": 0.5}])
def test_check_schedule_rejects_non_numbers(bad):
    with pytest.raises(
        TypeError,
        match=r"^mixjax\.prune\.magnitude: sparsity must be a float or a schedule "
        r"\(step -> value\), got " + re.escape(repr(bad)) + "$",
    ):
        schedules.check_schedule("mixjax.prune.magnitude", "sparsity", bad, 0.0, 1.0)


def test_check_schedule_takes_jax_scalars_and_traced_ones():
    assert schedules.check_schedule("f", "s", jnp.float32(0.5), 0.0, 1.0)(7) == 0.5
    with pytest.raises(ValueError, match=r"f: s must be in \[0.0, 1.0\), got s=1.5"):
        schedules.check_schedule("f", "s", jnp.float32(1.5), 0.0, 1.0)
    traced = jax.vmap(lambda v: schedules.check_schedule("f", "s", v, 0.0, 1.0)(3))
    assert traced(jnp.array([0.1, 0.2])).tolist() == pytest.approx([0.1, 0.2])
