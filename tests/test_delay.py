"""Tests of mixjax.delay: FIFO staleness, warm-up, bit-identity at tau=0, DC-ASGD, errors."""

import doctest

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixjax import delay, select
from mixjax.delay import delayed_updates, fifo


def small_params():
    return {
        "Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))},
        "Dense_1": {"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros((1,))},
    }


def ramp(params, t):
    """The known gradient sequence g_t = (t + 1) * ones (g_0 != 0, so it differs from no update)."""
    return jax.tree.map(lambda p: jnp.full_like(p, t + 1.0), params)


def run_steps(tx, params, grads_fn, steps, harness, move_params=False):
    """Updates and states of `steps` calls; params move by the updates when `move_params`."""
    state = tx.init(params)
    update = harness(tx.update)
    updates_seen, states = [], []
    for t in range(steps):
        updates, state = update(grads_fn(params, t), state, params)
        updates_seen.append(updates)
        states.append(state)
        if move_params:
            params = optax.apply_updates(params, updates)
    return updates_seen, states


@pytest.mark.parametrize("tau", [1, 3])
def test_fixed_tau_applies_the_gradient_of_step_t_minus_tau(harness, tau):
    params = small_params()
    updates, states = run_steps(delay.delayed(optax.sgd(1.0), tau), params, ramp, 8, harness)
    for t, u in enumerate(updates):
        # sgd(1.0) gives updates = -g; before the FIFO fills the update is exactly zero.
        expected = -(t - tau + 1.0) if t >= tau else 0.0
        for leaf in jax.tree.leaves(u):
            assert leaf.dtype == jnp.float32
            np.testing.assert_array_equal(leaf, np.full(leaf.shape, expected, np.float32))
    assert int(states[-1].count) == 8


def test_warm_up_leaves_the_inner_state_untouched_then_replays_the_inner_optimizer(harness):
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    rng = np.random.default_rng(0)
    grads = [{"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)} for _ in range(7)]
    tau, adam = 3, optax.adam(1e-2)
    updates, states = run_steps(delay.delayed(adam, tau), params, lambda p, t: grads[t], 7, harness)
    fresh = adam.init(params)
    for t in range(tau):
        np.testing.assert_array_equal(updates[t]["w"], np.zeros((2, 3), np.float32))
        chex.assert_trees_all_equal(states[t].inner_state, fresh)
    # Stale Adam with fixed params is Adam fed the same gradients tau steps later (equal up to
    # float rounding: the delayed Adam is compiled inside lax.cond, which XLA fuses differently).
    ref_updates, _ = run_steps(adam, params, lambda p, t: grads[t], 7 - tau, harness)
    for t in range(tau, 7):
        np.testing.assert_allclose(updates[t]["w"], ref_updates[t - tau]["w"], rtol=1e-5)


@pytest.mark.parametrize("compensation", [None, "dc", "dc_adaptive"])
def test_tau_zero_is_bit_identical_to_adam(harness, compensation):
    params = {"a": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones((4,))}

    def grads_fn(p, t):
        return jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) + 0.1 * t, p)

    adam = optax.adam(3e-3)
    tx = delay.delayed(adam, 0, compensation=compensation)
    got, _ = run_steps(tx, params, grads_fn, 6, harness, move_params=True)
    ref, _ = run_steps(adam, params, grads_fn, 6, harness, move_params=True)
    for u, r in zip(got, ref, strict=True):
        chex.assert_trees_all_equal(u, r)


def dc_reference(grads, tau, lr, lam, w0, adaptive=False, ms_decay=0.95, eps=1e-7):
    """NumPy float64 DC-ASGD with plain SGD: returns the parameter trajectory."""
    ws, ms = [w0.astype(np.float64)], np.zeros_like(w0, np.float64)
    for t in range(len(grads)):
        w = ws[-1]
        if t < tau:
            ws.append(w)
            continue
        g, w_then = grads[t - tau](ws[t - tau]), ws[t - tau]
        if adaptive:
            ms = ms_decay * ms + (1 - ms_decay) * g * g
            strength = lam / np.sqrt(ms + eps)
        else:
            strength = lam
        ws.append(w - lr * (g + strength * g * g * (w - w_then)))
    return ws


@pytest.mark.parametrize("compensation, lam", [("dc", 0.8), ("dc_adaptive", 0.5)])
def test_dc_asgd_matches_the_formula(harness, compensation, lam):
    rng = np.random.default_rng(1)
    targets = [rng.normal(size=(4, 3)) for _ in range(10)]
    # Gradients of 0.5 * ||w - target_t||^2 scaled by 3, so g depends on the params it is taken at.
    grad_fns = [lambda w, c=c: 3.0 * (w - c) for c in targets]
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    tau, lr = 2, 0.2
    tx = delay.delayed(optax.sgd(lr), tau, compensation=compensation, lam=lam)
    grads_fn = lambda p, t: {"w": grad_fns[t](p["w"]).astype(jnp.float32)}
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    update = harness(tx.update)
    ref = dc_reference(grad_fns, tau, lr, lam, w0, adaptive=compensation == "dc_adaptive")
    plain = dc_reference(grad_fns, tau, lr, 0.0, w0)
    for t in range(10):
        updates, state = update(grads_fn(params, t), state, params)
        params = optax.apply_updates(params, updates)
        assert params["w"].dtype == jnp.float32
        np.testing.assert_allclose(params["w"], ref[t + 1], rtol=1e-5, atol=1e-5)
    # The compensation term is far above the tolerance: the test sees it.
    assert np.max(np.abs(ref[-1] - plain[-1])) > 1e-2
    if compensation == "dc_adaptive":
        np.testing.assert_array_equal(jnp.shape(state.mean_square["w"]), (4, 3))
        assert state.past_params["w"].shape == (tau + 1, 4, 3)


def staleness_draws(key, tau_max, steps):
    """The documented draw: tau_t = floor(u_t * (tau_max + 1)), u_t from fold_in(key, t)."""
    draw = lambda t: jax.random.uniform(jax.random.fold_in(key, t))
    u = np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(steps)))
    return np.minimum(np.floor(u * (tau_max + 1)).astype(int), tau_max)


def scan_updates(tx, params, steps):
    """Updates of `steps` calls with g_t = (t + 1) * ones and fixed params, in one lax.scan."""

    def body(state, t):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1.0) * (t + 1.0), params)
        updates, state = tx.update(grads, state, params)
        return state, updates

    return jax.lax.scan(body, tx.init(params), jnp.arange(steps))[1]


def test_random_staleness_follows_the_documented_draws(harness):
    tau_max, steps = 3, 12
    key = jax.random.key(7)
    tx = delay.delayed(optax.sgd(1.0), tau_max, random_staleness=True, key=key)
    updates, _ = run_steps(tx, {"w": jnp.zeros((2,))}, ramp, steps, harness)
    for t, (u, tau_t) in enumerate(zip(updates, staleness_draws(key, tau_max, steps), strict=True)):
        expected = -(t - tau_t + 1.0) if t >= tau_t else 0.0
        np.testing.assert_array_equal(u["w"], np.full((2,), expected, np.float32))


def test_random_staleness_is_uniform_and_determined_by_the_key():
    tau_max, steps = 3, 2000
    params = {"w": jnp.zeros(())}
    make = lambda key: delay.delayed(optax.sgd(1.0), tau_max, random_staleness=True, key=key)
    run = lambda seed: np.asarray(
        jax.jit(lambda: scan_updates(make(jax.random.key(seed)), params, steps))()["w"]
    )
    # Updates are -(t - tau_t + 1) once the gradient exists: read tau_t back from them.
    first, again, other = run(0), run(0), run(1)
    np.testing.assert_array_equal(first, again)
    assert np.any(first != other)
    t = np.arange(steps)
    taus = (t + 1 + first)[tau_max:]
    np.testing.assert_array_equal(taus, np.round(taus))
    taus = taus.astype(int)
    assert set(np.unique(taus)) == set(range(tau_max + 1))
    freq = np.bincount(taus, minlength=tau_max + 1) / taus.size
    # Four standard deviations of a binomial frequency at p = 1/4, n ~ 2000.
    np.testing.assert_allclose(freq, 0.25, atol=4 * np.sqrt(0.25 * 0.75 / taus.size))


def test_random_staleness_shares_one_draw_across_leaves_of_different_tau():
    key, steps = jax.random.key(3), 16
    params = {"fast": jnp.zeros(()), "slow": jnp.zeros(())}
    tau = {"fast": 1, "slow": 4}
    tx = delay.delayed(optax.sgd(1.0), tau, random_staleness=True, key=key)
    updates = jax.jit(lambda: scan_updates(tx, params, steps))()
    for name, tau_max in tau.items():
        draws = staleness_draws(key, tau_max, steps)
        t = np.arange(steps)
        expected = np.where(t >= draws, -(t - draws + 1.0), 0.0)
        np.testing.assert_array_equal(updates[name], expected.astype(np.float32))


@pytest.mark.parametrize("form", ["callable", "tree"])
def test_per_leaf_tau_for_pipeline_stages(harness, form):
    params = small_params()
    stage_tau = lambda path, leaf: 2 if path.startswith("Dense_0") else 0
    if form == "callable":
        tau = stage_tau
    else:
        tau = {
            "Dense_0": {"kernel": 2, "bias": 2},
            "Dense_1": {"kernel": np.int64(0), "bias": 0},
        }
    # Momentum keeps per-leaf state: leaves warming up must keep theirs at zero.
    momentum = optax.sgd(1.0, momentum=0.5)
    updates, states = run_steps(delay.delayed(momentum, tau), params, ramp, 6, harness)
    expect = {}
    for lag in (0, 2):
        ref, _ = run_steps(momentum, {"x": jnp.zeros(())}, ramp, 6 - lag, harness)
        expect[lag] = [0.0] * lag + [float(r["x"]) for r in ref]
    for t, u in enumerate(updates):
        for path, leaf in select.leaves_with_paths(u):
            lag = stage_tau(path, leaf)
            np.testing.assert_array_equal(leaf, np.full(leaf.shape, expect[lag][t], np.float32))
    shapes = jax.tree.map(jnp.shape, states[-1].past_grads)
    assert shapes["Dense_0"]["kernel"] == (3, 3, 2)
    assert shapes["Dense_1"]["kernel"] == (0, 2, 1)


def test_state_mirrors_linen_params_with_a_leading_tau_axis_and_compiles_once():
    model = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(3)])
    x = jnp.ones((4, 6))
    params = model.init(jax.random.key(0), x)["params"]
    tx = delay.delayed(optax.sgd(0.1, momentum=0.9), 2, compensation="dc_adaptive", lam=1.0)
    state = tx.init(params)
    for field in (state.past_grads, state.past_params):
        assert jax.tree.structure(field) == jax.tree.structure(params)
        jax.tree.map(lambda b, p: chex.assert_shape(b, (3, *p.shape)), field, params)
    jax.tree.map(lambda m, p: chex.assert_shape(m, p.shape), state.mean_square, params)

    loss = jax.jit(lambda p: jnp.mean(model.apply({"params": p}, x) ** 2))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    losses = []
    for _ in range(8):
        params, state = step(params, state)
        losses.append(float(loss(params)))
    chex.assert_trees_all_equal_structs(state, tx.init(params))
    assert losses[-1] < losses[2]


def test_nnx_state_params_under_jit():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    graphdef, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    loss = jax.jit(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))
    tau = lambda path, leaf: 3 if path.startswith("l1") else 1
    tx = delay.delayed(optax.sgd(0.05), tau, compensation="dc")
    state = tx.init(params)
    assert state.past_grads["l1"]["kernel"].shape == (4, 4, 8)
    assert state.past_params["l2"]["kernel"].shape == (2, 8, 2)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    start = float(loss(params))
    new, state = step(params, state)
    # Step 0: no leaf has a gradient yet.
    chex.assert_trees_all_equal(jax.tree.leaves(new), jax.tree.leaves(params))
    for _ in range(10):
        new, state = step(new, state)
    assert type(new) is type(params)
    assert float(loss(new)) < start


def test_nests_and_forwards_extra_args():
    def scaled():
        def update(updates, state, params=None, *, scale):
            return jax.tree.map(lambda g: scale * g, updates), state

        return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

    tx = delay.delayed(delay.delayed(scaled(), 1), 2)
    params = {"w": jnp.zeros((2,))}
    state = tx.init(params)
    assert isinstance(state.inner_state, delay.DelayState)
    for t in range(6):
        updates, state = tx.update(ramp(params, t), state, params, scale=-2.0)
        expected = -2.0 * (t - 3 + 1.0) if t >= 3 else 0.0
        np.testing.assert_array_equal(updates["w"], np.full((2,), expected, np.float32))


def test_vmap_over_independent_runs():
    tx = delay.delayed(optax.sgd(1.0), 2)
    params = {"w": jnp.zeros((3,))}
    batch = 4
    states = jax.vmap(tx.init)(jax.tree.map(lambda p: jnp.stack([p] * batch), params))
    scales = jnp.arange(1.0, batch + 1.0)
    update = jax.jit(jax.vmap(tx.update))
    for t in range(4):
        grads = {"w": scales[:, None] * (t + 1.0) * jnp.ones((batch, 3))}
        stacked = jax.tree.map(lambda p: jnp.stack([p] * batch), params)
        updates, states = update(grads, states, stacked)
        expected = -(t - 1.0) * scales[:, None] * jnp.ones((batch, 3)) if t >= 2 else 0.0
        np.testing.assert_array_equal(updates["w"], np.broadcast_to(expected, (batch, 3)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"tau": -1}, ValueError, r"mixjax.delay.delayed: tau must be an integer >= 0, got tau=-1"),
        ({"tau": True}, TypeError, r"mixjax.delay.delayed: tau must be an integer .*tau=True"),
        ({"tau": 2.0}, TypeError, r"mixjax.delay.delayed: tau must be an integer .*tau=2.0"),
        ({"tau": None}, TypeError, r"mixjax.delay.delayed: tau must be an integer .*tau=None"),
        ({"tau": jnp.array(2)}, TypeError, r"mixjax.delay.delayed: tau must be an integer"),
        (
            {"tau": {"a": 1, "b": -2}},
            ValueError,
            r"mixjax.delay.delayed: tau at leaf 'b' must be an integer >= 0, got tau=-2",
        ),
        (
            {"tau": {"a": 1, "b": 1.5}},
            TypeError,
            r"mixjax.delay.delayed: tau at leaf 'b' must be an integer .*tau=1.5",
        ),
        (
            {"tau": 1, "compensation": "dcasgd"},
            ValueError,
            r"mixjax.delay.delayed: compensation must be one of .*compensation='dcasgd'",
        ),
        ({"tau": 1, "lam": -0.1}, ValueError, r"mixjax.delay.delayed: lam must be >= 0.*lam=-0.1"),
        (
            {"tau": 1, "lam": "big"},
            TypeError,
            r"mixjax.delay.delayed: lam must be a number, got lam='big'",
        ),
        (
            {"tau": 1, "ms_decay": 1.0},
            ValueError,
            r"ms_decay must be in \[0.0, 1.0\), got ms_decay=1.0",
        ),
        (
            {"tau": 1, "eps": 0.0},
            ValueError,
            r"mixjax.delay.delayed: eps must be > 0.0, got eps=0.0",
        ),
        (
            {"tau": 1, "random_staleness": True},
            ValueError,
            r"mixjax.delay.delayed: random_staleness=True needs a key",
        ),
        (
            {"tau": 1, "key": jax.random.key(0)},
            ValueError,
            r"mixjax.delay.delayed: key= is only used with random_staleness=True",
        ),
        (
            {"tau": 1, "random_staleness": 1, "key": jax.random.key(0)},
            TypeError,
            r"random_staleness must be a bool, got random_staleness=1",
        ),
        (
            {"tau": 1, "random_staleness": True, "key": 0},
            TypeError,
            r"mixjax.delay.delayed: key must be a jax.random.key\(...\).*got key=0",
        ),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        delay.delayed(optax.sgd(1.0), **kwargs)


def test_tx_must_be_an_optax_transformation():
    with pytest.raises(TypeError, match=r"mixjax.delay.delayed: inner must be an optax .*got str"):
        delay.delayed("sgd", 1)


def test_raw_uint32_key_draws_what_its_typed_key_draws():
    params = {"w": jnp.zeros(())}
    raw, typed = jax.random.PRNGKey(3), jax.random.key(3)
    run = lambda key: np.asarray(
        scan_updates(delay.delayed(optax.sgd(1.0), 3, random_staleness=True, key=key), params, 40)[
            "w"
        ]
    )
    np.testing.assert_array_equal(run(raw), run(typed))
    assert np.any(run(raw) != run(jax.random.key(4)))


def test_bad_per_leaf_tau_at_init():
    params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
    tx = delay.delayed(optax.sgd(1.0), lambda path, leaf: -1 if path == "b" else 1)
    with pytest.raises(
        ValueError, match=r"tau\(path, leaf\) at leaf 'b' \(2,\) float32 must be .*got tau=-1"
    ):
        tx.init(params)
    tx = delay.delayed(optax.sgd(1.0), lambda path, leaf: leaf.ndim > 1)
    with pytest.raises(TypeError, match=r"tau\(path, leaf\) at leaf 'a' .*got tau=True"):
        tx.init(params)
    tx = delay.delayed(optax.sgd(1.0), {"a": 1, "c": 2})
    with pytest.raises(ValueError, match=r"the tau tree does not match the params tree"):
        tx.init(params)


def test_bad_update_calls():
    params = {"a": jnp.zeros((2, 2))}
    tx = delay.delayed(optax.sgd(1.0), 1, compensation="dc")
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"mixjax.delay.delayed: update needs params with comp"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"the gradients do not match the state"):
        tx.update({"b": jnp.zeros((2, 2))}, state, params)


@pytest.mark.parametrize("compensation", [None, "dc_adaptive"])
def test_ring_buffers_update_in_place(compensation):
    # Reading a slot before overwriting it made XLA copy whole buffers every step; the
    # write-then-read order must compile to no copy of a (tau + 1, *shape) buffer.
    params = {"w": jnp.zeros((6, 7))}
    tx = delay.delayed(optax.sgd(0.1), 4, compensation=compensation)
    state = tx.init(params)
    update = jax.jit(tx.update, donate_argnums=1)
    hlo = update.lower(params, state, params).compile().as_text()
    copies = [line for line in hlo.splitlines() if " copy(" in line and "f32[5,6,7]" in line]
    assert not copies, copies


@pytest.mark.parametrize("compensation", [None, "dc"])
def test_inner_moments_update_in_place(compensation):
    # Selecting the new or the old Adam state made XLA copy the donated moments (and params)
    # every step; update_once_started's lax.cond must compile to no copy of a (6, 7) buffer.
    params = {"w": jnp.zeros((6, 7))}
    tx = delay.delayed(optax.adam(0.1), 2, compensation=compensation)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    copies = [line for line in compiled.as_text().splitlines() if "f32[6,7]{1,0} copy(" in line]
    assert not copies, copies


def test_update_once_started(harness):
    inner = optax.with_extra_args_support(optax.adam(0.1))
    params = small_params()
    grads, state = ramp(params, 2), inner.init(params)
    run = harness(lambda started: fifo.update_once_started(inner, grads, state, params, started))
    updates, kept = run(jnp.asarray(False))
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
    chex.assert_trees_all_equal(kept, state)
    want = inner.update(grads, state, params)
    chex.assert_trees_all_close(run(jnp.asarray(True)), want, rtol=1e-6)


def test_bfloat16_params_keep_their_dtype(harness):
    params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
    tx = delay.delayed(optax.sgd(0.5), 2, compensation="dc_adaptive", lam=1.0)
    updates, states = run_steps(tx, params, ramp, 4, harness, move_params=True)
    assert states[-1].past_grads["w"].dtype == jnp.bfloat16
    assert states[-1].past_params["w"].dtype == jnp.bfloat16
    assert states[-1].mean_square["w"].dtype == jnp.float32
    for u in updates:
        assert u["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(updates[2]["w"], np.float32), -0.5)


@pytest.mark.parametrize("compensation, want_lam", [("dc", 0.04), ("dc_adaptive", 2.0)])
def test_default_lam_depends_on_the_mode(harness, compensation, want_lam):
    # DC-ASGD's constant 0.04; lam_0 = 2 for DC-ASGD-a, whose 1/sqrt(MS) normalization makes
    # 0.04 a no-op (benchmarks/async.py).
    assert delay.DEFAULT_LAM == {"dc": 0.04, "dc_adaptive": 2.0}
    rng = np.random.default_rng(2)
    targets = [rng.normal(size=(4, 3)) for _ in range(8)]
    grad_fns = [lambda w, c=c: 3.0 * (w - c) for c in targets]
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    tau, lr = 2, 0.2
    tx = delay.delayed(optax.sgd(lr), tau, compensation=compensation)
    adaptive = compensation == "dc_adaptive"
    ref = dc_reference(grad_fns, tau, lr, want_lam, w0, adaptive=adaptive)
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    update = harness(tx.update)
    for t in range(8):
        grads = {"w": grad_fns[t](params["w"]).astype(jnp.float32)}
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["w"], ref[t + 1], rtol=1e-5, atol=1e-5)
    plain = dc_reference(grad_fns, tau, lr, 0.0, w0)
    assert np.max(np.abs(ref[-1] - plain[-1])) > 1e-3


def test_docstring_example_runs():
    result = doctest.testmod(delayed_updates, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0, result
