"""The ParamTransform protocol, chain, selectors and schedules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mixjax
from mixjax import schedules, select


def params():
    return {
        "Dense_0": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)},
        "Dense_1": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }


def counter(scale):
    """A transform whose state counts updates and whose view scales kernels by scale**count."""

    def scaled(p, count):
        return jax.tree.map(lambda x: x * scale**count if x.ndim >= 2 else x, p)

    return mixjax.ParamTransform(
        init=lambda p: jnp.zeros((), jnp.int32),
        apply=lambda p, s: scaled(p, s),
        update=lambda p, s, step, **extra: s + 1,
    )


def recorder():
    """A transform whose state records the sum of the view it was updated on."""
    total = lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p))
    return mixjax.ParamTransform(
        init=lambda p: total(p),
        apply=lambda p, s: p,
        update=lambda p, s, step, **extra: total(p),
    )


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit])
def test_chain_applies_left_to_right(wrap):
    add = mixjax.ParamTransform(
        init=lambda p: mixjax.EmptyState(),
        apply=lambda p, s: jax.tree.map(lambda x: x + 1.0, p),
        update=lambda p, s, step, **extra: s,
    )
    double = counter(2.0)
    chained = mixjax.chain(add, double)
    state = chained.init(params())
    state = wrap(chained.update)(params(), state, 0)
    out = wrap(chained.apply)(params(), state)
    np.testing.assert_array_equal(out["Dense_0"]["kernel"], (np.arange(12.0).reshape(3, 4) + 1) * 2)
    reverse = mixjax.chain(double, add)
    rstate = reverse.update(params(), reverse.init(params()), 0)
    rout = reverse.apply(params(), rstate)
    np.testing.assert_array_equal(rout["Dense_0"]["kernel"], np.arange(12.0).reshape(3, 4) * 2 + 1)


def test_chain_update_sees_refreshed_previous_view():
    chained = mixjax.chain(counter(3.0), recorder())
    state = chained.init(params())
    base = sum(float(jnp.sum(x)) for x in jax.tree.leaves(params()))
    assert float(state[1]) == pytest.approx(base)  # init sees the view at count 0
    state = chained.update(params(), state, 0)
    kernels = 66.0 + 8.0  # sum of the two kernels; biases are not scaled
    assert float(state[1]) == pytest.approx(base + 2 * kernels)  # the view after count -> 1


def sine_view():
    """A stateless transform whose view is ``sin`` of every leaf (a primitive easy to spot)."""
    return mixjax.ParamTransform(
        init=lambda p: mixjax.EmptyState(),
        apply=lambda p, s: jax.tree.map(jnp.sin, p),
        update=lambda p, s, step, **extra: s,
        due=mixjax.never,
    )


def due_recorder(due):
    """``recorder`` refreshed only where ``due``: the sum of the view at its last refresh."""
    return recorder()._replace(due=due)


def test_multiples_of():
    every3 = mixjax.multiples_of(3)
    assert [every3(t) for t in range(7)] == [True, False, False, True, False, False, True]
    assert all(isinstance(every3(t), bool) for t in range(4))
    from1 = mixjax.multiples_of(2, from_step=1)
    assert [from1(t) for t in range(5)] == [False, False, True, False, True]
    traced = jax.jit(lambda t: from1(t))
    assert [bool(traced(t)) for t in range(5)] == [False, False, True, False, True]
    assert mixjax.every_step(5) is True and mixjax.never(5) is False
    with pytest.raises(
        ValueError, match=r"mixjax.multiples_of: k must be an integer >= 1, got k=0"
    ):
        mixjax.multiples_of(0)
    with pytest.raises(ValueError, match=r"from_step must be an integer >= 0, got from_step=-1"):
        mixjax.multiples_of(2, from_step=-1)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got k=True"):
        mixjax.multiples_of(True)


def test_chain_update_with_due_equals_refreshing_in_turn():
    """Built-in transforms with schedules: the chain equals refreshing each one in turn.

    Under jit only: eagerly, every ``lax.cond`` compiles anew at each call
    (``test_chain_builds_the_view_of_a_due_transform_only_inside_its_cond`` runs eagerly).
    """
    transforms = (
        mixjax.prune.magnitude(0.5, update_every=3),
        mixjax.merge.merge_similar(0.9, update_every=4),
        mixjax.quant.fake_quant(4, update_every=2),
    )
    chained = mixjax.chain(*transforms)
    state = expected = chained.init(params())
    update = jax.jit(chained.update)
    # The reference: each transform refreshed on the view of those before it (jitted once).
    steps = [(jax.jit(t.update), jax.jit(t.apply)) for t in transforms]
    for t in range(5):  # prune due at 0 and 3, merging at 4, quant at 0, 2 and 4
        p = jax.tree.map(lambda x, t=t: x * 0.9 + 0.05 * t, params())
        state = update(p, state, t)
        view, refreshed = p, []
        for (refresh, apply), s in zip(steps, expected, strict=True):
            s = refresh(view, s, t)
            refreshed.append(s)
            view = apply(view, s)
        expected = tuple(refreshed)
        chex.assert_trees_all_close(state, expected, rtol=1e-6)


def test_chain_skips_transforms_that_are_not_due():
    def refuse(p, s, step, **extra):
        raise AssertionError("update of a transform that is not due")

    quiet = mixjax.ParamTransform(
        init=lambda p: mixjax.EmptyState(), apply=lambda p, s: p, update=refuse, due=mixjax.never
    )
    chained = mixjax.chain(counter(2.0), quiet)
    state = chained.update(params(), chained.init(params()), 0)
    assert int(state[0]) == 1
    assert chained.due(0) is True
    assert mixjax.chain(quiet, mixjax.identity()).due(0) is False


def test_chain_builds_the_view_of_a_due_transform_only_inside_its_cond():
    chained = mixjax.chain(sine_view(), due_recorder(mixjax.multiples_of(10)))
    state = chained.init(params())
    jaxpr = jax.make_jaxpr(lambda p, s, t: chained.update(p, s, t))(params(), state, 3).jaxpr
    top = [e.primitive.name for e in jaxpr.eqns]
    assert "sin" not in top and "cond" in top
    cond = next(e for e in jaxpr.eqns if e.primitive.name == "cond")
    branches = [[e.primitive.name for e in b.jaxpr.eqns] for b in cond.params["branches"]]
    assert any("sin" in names for names in branches)
    # ... and the refresh is the sum of the sine view, at due steps only.
    view_sum = sum(float(jnp.sum(jnp.sin(x))) for x in jax.tree.leaves(params()))
    for update in (chained.update, jax.jit(chained.update)):
        assert float(update(params(), state, 10)[1]) == pytest.approx(view_sum, rel=1e-6)
        assert float(update(params(), state, 3)[1]) == pytest.approx(float(state[1]))
    assert bool(jax.jit(chained.due)(10)) and not bool(jax.jit(chained.due)(3))


def test_chain_constrain_in_order_and_identity():
    pin = mixjax.ParamTransform(
        init=lambda p: mixjax.EmptyState(),
        apply=lambda p, s: p,
        update=lambda p, s, step, **extra: s,
        constrain=lambda p, s: jax.tree.map(lambda x: jnp.clip(x, 0.0, 5.0), p),
    )
    shift = pin._replace(constrain=lambda p, s: jax.tree.map(lambda x: x - 1.0, p))
    out = mixjax.chain(pin, shift).constrain(params(), (mixjax.EmptyState(),) * 2)
    np.testing.assert_array_equal(
        out["Dense_0"]["kernel"], np.clip(np.arange(12.0), 0, 5).reshape(3, 4) - 1
    )
    ident = mixjax.identity()
    chex.assert_trees_all_equal(ident.apply(params(), ident.init(params())), params())
    chex.assert_trees_all_equal(ident.constrain(params(), ident.init(params())), params())


def test_chain_errors():
    with pytest.raises(TypeError, match=r"mixjax.chain: argument 1 must be a ParamTransform, got"):
        mixjax.chain(mixjax.identity(), lambda p: p)
    chained = mixjax.chain(mixjax.identity(), mixjax.identity())
    with pytest.raises(ValueError, match=r"mixjax.chain: state must be a tuple of 2 states"):
        chained.apply(params(), (mixjax.EmptyState(),))


def test_wrap_optax_errors():
    with pytest.raises(TypeError, match=r"mixjax.wrap_optax: transform must be a ParamTransform"):
        mixjax.wrap_optax(optax.sgd(0.1), "prune")
    with pytest.raises(TypeError, match=r"mixjax.wrap_optax: inner must be an optax"):
        mixjax.wrap_optax("adam", mixjax.identity())
    tx = mixjax.wrap_optax(optax.sgd(0.1), mixjax.identity())
    grads = jax.tree.map(jnp.ones_like, params())
    with pytest.raises(ValueError, match=r"update needs transform_state="):
        tx.update(grads, tx.init(params()), params())
    with pytest.raises(ValueError, match=r"update needs params"):
        tx.update(grads, tx.init(params()), transform_state=mixjax.EmptyState())


def test_wrap_optax_identity_equals_inner():
    p = params()
    grads = jax.tree.map(lambda x: jnp.sin(x) + 0.5, p)
    inner = optax.adam(0.1)
    tx = mixjax.wrap_optax(inner, mixjax.identity())
    u1, _ = inner.update(grads, inner.init(p), p)
    u2, _ = tx.update(grads, tx.init(p), p, transform_state=mixjax.EmptyState())
    chex.assert_trees_all_close(optax.apply_updates(p, u1), optax.apply_updates(p, u2), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Selectors.


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


# ----------------------------------------------------------------------------------------------
# Schedules.


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
    with pytest.raises(ValueError, match=r"polynomial: frequency must be an integer >= 1, got 0"):
        schedules.polynomial(0, 0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match=r"one_shot: step must be an integer >= 0, got -1"):
        schedules.one_shot(-1, 0.5)


def test_check_range_probes_any_callable():
    # optax schedules and Python-branching callables are probed eagerly.
    ok = schedules.check_range("f", "s", optax.linear_schedule(0.0, 0.9, 100), 0.0, 1.0)
    assert float(ok(50)) == pytest.approx(0.45)
    python_branching = lambda step: 0.5 if step < 100 else 1.5
    with pytest.raises(
        ValueError, match=r"f: s schedule values must be in \[0.0, 1.0\), got s\(104\)=1.5"
    ):
        schedules.check_range("f", "s", python_branching, 0.0, 1.0)
    with pytest.raises(TypeError, match=r"f: s= expected a float or a schedule"):
        schedules.check_range("f", "s", "0.5", 0.0, 1.0)
