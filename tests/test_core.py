"""The ParamTransform protocol: chain, due, update_when_due, learned state, wrap_optax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mixjax


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
    traced = jax.jit(lambda t: every3(t))
    assert [bool(traced(t)) for t in range(7)] == [True, False, False, True, False, False, True]
    assert mixjax.multiples_of(1) is mixjax.every_step
    assert mixjax.every_step(5) is True and mixjax.never(5) is False
    with pytest.raises(
        ValueError, match=r"mixjax.multiples_of: k must be an integer >= 1, got k=0"
    ):
        mixjax.multiples_of(0)
    with pytest.raises(TypeError, match=r"k must be an integer >= 1, got k=True"):
        mixjax.multiples_of(True)


@pytest.mark.parametrize("harness", ["eager", "jit"])
def test_update_when_due(harness):
    calls = []

    def refresh():
        calls.append(1)
        return jnp.ones(3)

    state = jnp.zeros(3)
    due = mixjax.multiples_of(2)
    if harness == "eager":  # a Python step decides in Python: refresh runs only where due
        assert mixjax.update_when_due(due, 3, refresh, state).sum() == 0 and not calls
        assert mixjax.update_when_due(due, 4, refresh, state).sum() == 3 and calls == [1]
        assert mixjax.update_when_due(mixjax.never, 4, refresh, state) is state
        return
    run = jax.jit(lambda t: mixjax.update_when_due(due, t, refresh, state))
    assert [float(run(t).sum()) for t in range(4)] == [3.0, 0.0, 3.0, 0.0]
    jaxpr = jax.make_jaxpr(lambda t: mixjax.update_when_due(due, t, refresh, state))(1)
    assert any(e.primitive.name == "cond" for e in jaxpr.jaxpr.eqns)


def test_chain_update_with_due_equals_refreshing_in_turn():
    """Built-in transforms with schedules: the chain equals refreshing each one in turn.

    Under jit only: eagerly, every ``lax.cond`` compiles anew at each call
    (``test_chain_builds_the_view_of_a_due_transform_only_inside_its_cond`` runs eagerly).
    """
    transforms = (
        mixjax.prune.magnitude(0.5, update_every=3),
        mixjax.share.merge_similar(0.9, update_every=4),
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
# Learned state.


def test_learned_state_round_trips_through_any_nesting():
    lsq = mixjax.quant.lsq(4)
    t = mixjax.chain(mixjax.prune.magnitude(0.5), lsq)
    p = params()
    state = t.init(p)
    learned = mixjax.learned_state(state)
    assert jax.tree.leaves(learned[0]) == []  # a PruneState is not learned
    assert set(learned[1]._fields) == {"scale"}
    doubled = jax.tree.map(lambda s: 2 * s, learned)
    again = mixjax.with_learned_state(state, doubled)
    masks = again[0].masks["Dense_0"]["kernel"]
    np.testing.assert_array_equal(masks, state[0].masks["Dense_0"]["kernel"])
    np.testing.assert_array_equal(
        again[1].scale["Dense_0"]["kernel"], 2 * state[1].scale["Dense_0"]["kernel"]
    )
    assert jax.tree.leaves(mixjax.learned_state(mixjax.prune.magnitude(0.5).init(p))) == []
    with pytest.raises(ValueError, match="with_learned_state: learned does not match"):
        mixjax.with_learned_state(state, (None,))
