"""Pruning: exact sparsity, patterns, schedules, optax wrapper, jit/no-jit, linen/NNX, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mixjax
from mixjax import prune, schedules


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Conv_0": {
            "kernel": jnp.asarray(rng.standard_normal((3, 3, 8, 16)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(16), jnp.float32),
        },
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(32), jnp.float32),
        },
        "Dense_1": {
            "kernel": jnp.asarray(rng.standard_normal((32, 8)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(8), jnp.float32),
        },
    }


def kernels(tree):
    return {k: np.asarray(v["kernel"]) for k, v in tree.items()}


def masks_of(state):
    return {k: np.asarray(v["kernel"]) for k, v in state.masks.items()}


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_uniform_exact_sparsity_and_largest_kept(harness, sparsity):
    params = make_params()
    t = prune.magnitude(sparsity)
    state = harness(t.init)(params)
    view = harness(t.apply)(params, state)
    for name, mask in masks_of(state).items():
        w = np.abs(kernels(params)[name])
        assert mask.dtype == np.bool_ and mask.shape == w.shape
        assert (~mask).sum() == round(sparsity * w.size)
        if 0 < (~mask).sum() < w.size:
            assert w[mask].min() >= w[~mask].max()
        np.testing.assert_array_equal(
            np.asarray(view[name]["kernel"]), kernels(params)[name] * mask
        )
        np.testing.assert_array_equal(view[name]["bias"], params[name]["bias"])  # untouched


def test_global_one_threshold(harness):
    params = make_params()
    state = harness(prune.magnitude(0.8, scope="global").init)(params)
    masks = masks_of(state)
    w = {k: np.abs(v) for k, v in kernels(params).items()}
    total = sum(m.size for m in masks.values())
    assert sum((~m).sum() for m in masks.values()) == round(0.8 * total)
    kept_min = min(w[k][m].min() for k, m in masks.items())
    pruned_max = max(w[k][~m].max() for k, m in masks.items())
    assert kept_min >= pruned_max
    # One threshold, different per-layer sparsities.
    assert len({round(float((~m).mean()), 3) for m in masks.values()}) > 1


def test_erk_distribution():
    params = make_params()
    masks = masks_of(prune.magnitude(0.8, scope="erk").init(params))
    sizes = {k: m.size for k, m in masks.items()}
    pruned = sum((~m).sum() for m in masks.values())
    assert abs(pruned - 0.8 * sum(sizes.values())) <= len(masks)
    # ERK density is proportional to sum(shape)/prod(shape): the small last layer stays densest.
    density = {k: m.mean() for k, m in masks.items()}
    assert density["Dense_1"] > density["Dense_0"] > density["Conv_0"]
    raw = {k: sum(m.shape) / m.size for k, m in masks.items()}
    ratio = density["Dense_0"] / density["Conv_0"]
    np.testing.assert_allclose(ratio, raw["Dense_0"] / raw["Conv_0"], rtol=0.05)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (4, 4)])
def test_nm_pattern(harness, n, m):
    params = make_params()
    t = prune.magnitude(None, structure=prune.NM(n, m))
    masks = masks_of(harness(t.init)(params))
    for name, mask in masks.items():
        w = np.abs(kernels(params)[name])
        *lead, rows, cols = w.shape
        groups_mask = mask.reshape(*lead, rows // m, m, cols)
        groups_w = w.reshape(*lead, rows // m, m, cols)
        np.testing.assert_array_equal(groups_mask.sum(axis=-2), n)
        # The kept ones are the n largest of each group.
        order = np.argsort(-groups_w, axis=-2, kind="stable")
        expected = np.zeros_like(groups_mask)
        np.put_along_axis(expected, order[..., :n, :], True, axis=-2)
        np.testing.assert_array_equal(groups_mask, expected)


def test_gradual_nm_passes_through_stages():
    params = make_params()
    sched = schedules.polynomial(0.0, 0.5, begin_step=0, end_step=30, power=1)
    t = prune.magnitude(sched, structure=prune.NM(2, 4))
    state = t.init(params)
    update = jax.jit(t.update)
    seen = []
    for step in range(0, 40):
        state = update(params, state, step)
        kept = masks_of(state)["Dense_0"].reshape(16, 4, 32).sum(axis=1)
        assert np.all(kept == kept.flat[0]), "every group keeps the same count"
        seen.append(int(kept.flat[0]))
    assert seen[0] == 4 and seen[-1] == 2
    assert sorted(set(seen), reverse=True) == [4, 3, 2]
    assert all(a >= b for a, b in zip(seen, seen[1:], strict=False))


def test_block_pattern(harness):
    params = make_params()
    t = prune.magnitude(0.5, structure=prune.Block((4, 4)))
    masks = masks_of(harness(t.init)(params))
    for name, mask in masks.items():
        w = np.abs(kernels(params)[name])
        *lead, rows, cols = w.shape
        blocks = mask.reshape(*lead, rows // 4, 4, cols // 4, 4)
        per_block = blocks.sum(axis=(-3, -1))
        assert set(np.unique(per_block)) <= {0, 16}, "blocks are all kept or all pruned"
        assert (per_block == 0).sum() == round(0.5 * per_block.size)
        means = w.reshape(*lead, rows // 4, 4, cols // 4, 4).mean(axis=(-3, -1))
        assert means[per_block == 16].min() >= means[per_block == 0].max()


def test_channel_pattern(harness):
    params = make_params()
    t = prune.magnitude(0.25, structure=prune.Channel())
    masks = masks_of(harness(t.init)(params))
    for name, mask in masks.items():
        w = np.abs(kernels(params)[name]).reshape(-1, mask.shape[-1])
        cols = mask.reshape(-1, mask.shape[-1])
        kept = cols.all(axis=0)
        assert np.all(cols.all(axis=0) | ~cols.any(axis=0)), "whole channels"
        assert (~kept).sum() == round(0.25 * mask.shape[-1])
        assert w.mean(axis=0)[kept].min() >= w.mean(axis=0)[~kept].max()


def test_saliency_uses_grads():
    params = make_params()
    grads = jax.tree.map(lambda x: jnp.flip(x), params)
    t = prune.saliency(0.5)
    state = t.init(params)
    assert all(m.all() for m in masks_of(state).values()), "dense until the first update"
    state = jax.jit(t.update)(params, state, 0, grads=grads)
    for name, mask in masks_of(state).items():
        score = np.abs(kernels(params)[name] * kernels(grads)[name])
        assert (~mask).sum() == round(0.5 * mask.size)
        assert score[mask].min() >= score[~mask].max()
    with pytest.raises(ValueError, match=r"mixjax.prune.saliency: update needs grads="):
        t.update(params, state, 0)


def test_random_keyed_exact_and_monotone():
    params = make_params()
    sched = schedules.polynomial(0.2, 0.6, 0, 10, power=1)
    a = prune.random(jax.random.key(0), sched)
    b = prune.random(jax.random.key(1), sched)
    ma, mb = masks_of(a.init(params)), masks_of(b.init(params))
    assert not np.array_equal(ma["Dense_0"], mb["Dense_0"])
    np.testing.assert_array_equal(ma["Dense_0"], masks_of(a.init(params))["Dense_0"])
    state = a.init(params)
    previous = masks_of(state)
    for step in range(1, 11):
        state = a.update(params, state, step)
        now = masks_of(state)
        for k in now:
            assert not np.any(now[k] & ~previous[k]), "pruned weights never regrow"
        previous = now
    for m in previous.values():
        assert (~m).sum() == round(0.6 * m.size)


def test_update_every_recomputes_only_on_multiples():
    params = make_params()
    t = prune.magnitude(lambda step: jnp.where(step >= 3, 0.8, 0.5), update_every=5)
    state = t.init(params)
    update = jax.jit(t.update)
    same = update(params, state, 3)
    chex.assert_trees_all_equal(same.masks, state.masks)
    moved = update(params, state, 5)
    assert (~masks_of(moved)["Dense_0"]).sum() == round(0.8 * 64 * 32)


_UNPROBED = 3001  # steps from here on are ones the eager schedule probe never visits
_LATE = {_UNPROBED: float("nan"), _UNPROBED + 1: float("inf"), _UNPROBED + 2: -float("inf")}
_LATE.update({_UNPROBED + 3: 1.5, _UNPROBED + 4: -0.5})


def _bad_late(t):
    """A schedule at 0.5 wherever the eager probe looks, and the values of ``_LATE`` later."""
    out = jnp.float32(0.5)
    for step, value in _LATE.items():
        assert step not in schedules._PROBE_STEPS
        out = jnp.where(jnp.asarray(t) == step, value, out)
    return out


@pytest.mark.parametrize(
    "make, fully_pruned",
    [
        (lambda s: prune.magnitude(s), 0.0),
        (lambda s: prune.magnitude(s, scope="global"), 0.0),
        (lambda s: prune.magnitude(s, scope="erk"), 0.0),
        (lambda s: prune.random(jax.random.key(0), s, structure=prune.Block((2, 2))), 0.0),
        (lambda s: prune.magnitude(s, structure=prune.NM(1, 4)), 0.25),  # never below 1:4
    ],
    ids=["uniform", "global", "erk", "random-block", "nm"],
)
def test_schedule_values_the_probe_missed_follow_the_rule_in_jit(make, fully_pruned):
    rng = np.random.default_rng(3)
    params = {
        f"Dense_{i}": {"kernel": jnp.asarray(rng.standard_normal((8, 4 + 4 * i)))} for i in (0, 1)
    }
    t = make(_bad_late)  # the factory's eager probe passes
    update = jax.jit(t.update)
    state = update(params, t.init(params), 8)  # sparsity 0.5: some weights pruned
    assert 0 < sum((~m).sum() for m in masks_of(state).values())
    for step in (_UNPROBED, _UNPROBED + 1, _UNPROBED + 2):  # NaN, inf, -inf: masks kept
        chex.assert_trees_all_equal(update(params, state, step).masks, state.masks)
    for mask in masks_of(update(params, state, _UNPROBED + 3)).values():  # 1.5 acts as 1
        assert mask.mean() == fully_pruned
    for mask in masks_of(update(params, state, _UNPROBED + 4)).values():  # -0.5 acts as 0
        assert mask.all()


def test_update_compiles_once():
    params = make_params()
    t = prune.magnitude(schedules.polynomial(0.0, 0.9, 0, 100), update_every=10)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, step):
        return t.update(params, state, step)

    state = t.init(params)
    for i in range(25):
        state = step(params, state, jnp.asarray(i))


def test_gradient_reaches_kept_weights_only():
    params = make_params()
    t = prune.magnitude(0.5)
    state = t.init(params)
    coeffs = jax.tree.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape), params)

    def loss(p):
        view = t.apply(p, state)
        return sum(
            jnp.sum(v * c)
            for v, c in zip(jax.tree.leaves(view), jax.tree.leaves(coeffs), strict=True)
        )

    grads = jax.grad(loss)(params)
    for name, mask in masks_of(state).items():
        np.testing.assert_array_equal(grads[name]["kernel"], kernels(coeffs)[name] * mask)
        np.testing.assert_array_equal(grads[name]["bias"], coeffs[name]["bias"])


def test_wrap_optax_keeps_zeros_through_adam():
    params = make_params()
    t = prune.magnitude(0.9)
    state = t.init(params)
    params = t.constrain(params, state)
    tx = mixjax.wrap_optax(optax.adam(1e-2), t)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, i):
        # Dense, sign-changing gradients: Adam's momentum would revive every pruned weight.
        grads = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size).reshape(x.shape) + i), params)
        updates, opt_state = tx.update(grads, opt_state, params, transform_state=state)
        return optax.apply_updates(params, updates), opt_state

    before = kernels(params)
    for i in range(100):
        params, opt_state = step(params, opt_state, i)
    for name, mask in masks_of(state).items():
        w = kernels(params)[name]
        assert np.all(w[~mask] == 0.0), "pruned weights stay exactly zero"
        assert np.all(w[mask] != before[name][mask]), "kept weights train"
    # Plain Adam without the wrapper would have revived them (momentum of nonzero grads).
    plain = optax.adam(1e-2)
    p2 = t.constrain(make_params(), state)
    u, _ = plain.update(jax.tree.map(jnp.ones_like, p2), plain.init(p2), p2)
    assert np.any(np.asarray(optax.apply_updates(p2, u)["Dense_0"]["kernel"]) != 0)


def test_apply_updates_plain_function_matches_wrapper():
    params = make_params()
    t = prune.magnitude(0.5)
    state = t.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    inner = optax.sgd(0.1)
    u, _ = inner.update(grads, inner.init(params), params)
    by_function = mixjax.apply_updates(params, u, t, state)
    tx = mixjax.wrap_optax(inner, t)
    u2, _ = tx.update(grads, tx.init(params), params, transform_state=state)
    chex.assert_trees_all_close(by_function, optax.apply_updates(params, u2), atol=1e-6)
    for name, mask in masks_of(state).items():
        assert np.all(np.asarray(by_function[name]["kernel"])[~mask] == 0)


def test_linen_and_nnx_trees_agree():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.Dense_0 = nnx.Linear(64, 32, rngs=rngs)
            self.Dense_1 = nnx.Linear(32, 8, rngs=rngs)

    model = Net(nnx.Rngs(0))
    _, nnx_params = nnx.split(model, nnx.Param)
    linen_params = {
        name: {"kernel": getattr(model, name).kernel[...], "bias": getattr(model, name).bias[...]}
        for name in ("Dense_0", "Dense_1")
    }
    t = prune.magnitude(0.7, where=".*kernel")
    nnx_state, linen_state = t.init(nnx_params), t.init(linen_params)
    nnx_view = jax.jit(t.apply)(nnx_params, nnx_state)
    assert jax.tree.structure(nnx_view) == jax.tree.structure(nnx_params)
    nnx.update(model, nnx_view)
    for name in ("Dense_0", "Dense_1"):
        np.testing.assert_array_equal(
            getattr(model, name).kernel[...],
            t.apply(linen_params, linen_state)[name]["kernel"],
        )


def test_one_shot_and_summary():
    params = make_params()
    pruned, masks = prune.sparsify(prune.magnitude(0.75, scope="global"), params)
    report = prune.summary(pruned)
    assert [r.path for r in report.leaves] == ["Conv_0/kernel", "Dense_0/kernel", "Dense_1/kernel"]
    total = sum(r.size for r in report.leaves)
    assert report.size == total and report.zeros == round(0.75 * total)
    assert report.sparsity == pytest.approx(0.75, abs=1 / total)
    assert prune.summary(masks).zeros == report.zeros
    table = str(report)
    assert "| Dense_0/kernel | 64x32 | 2048 |" in table and "**total**" in table
    everything = prune.summary(pruned, where=lambda p, leaf: True)
    assert len(everything.leaves) == 6


def test_chain_with_pruning_sees_previous_view():
    params = make_params()
    shift = mixjax.ParamTransform(
        init=lambda p: mixjax.EmptyState(),
        apply=lambda p, s: jax.tree.map(lambda x: x + 100.0 * (x.ndim >= 2), p),
        update=lambda p, s, step, **kw: s,
    )
    pruned_then_shifted = mixjax.chain(prune.magnitude(0.5), shift)
    shifted_then_pruned = mixjax.chain(shift, prune.magnitude(0.5))
    a = pruned_then_shifted.apply(params, pruned_then_shifted.init(params))
    b = shifted_then_pruned.apply(params, shifted_then_pruned.init(params))
    ka, kb = np.asarray(a["Dense_0"]["kernel"]), np.asarray(b["Dense_0"]["kernel"])
    assert np.sum(ka == 100.0) == 1024 and np.sum(ka == 0) == 0
    shifted = np.asarray(params["Dense_0"]["kernel"]) + 100.0
    np.testing.assert_array_equal(np.sort(kb[kb != 0]), np.sort(shifted.ravel())[1024:])


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("sparsity", [1.0, 1.2, -0.1, float("nan")])
def test_error_sparsity_out_of_range(sparsity):
    with pytest.raises(
        ValueError, match=r"mixjax.prune.magnitude: sparsity must be in \[0.0, 1.0\)"
    ):
        prune.magnitude(sparsity)


def test_error_schedule_out_of_range():
    with pytest.raises(
        ValueError, match=r"sparsity schedule values must be in .* got sparsity\(10"
    ):
        prune.magnitude(schedules.polynomial(0.0, 1.0, 0, 10))
    with pytest.raises(ValueError, match=r"got sparsity\(0\)=-0.5"):
        prune.magnitude(optax.constant_schedule(-0.5))


@pytest.mark.parametrize(
    "nm,pattern",
    [((3, 2), r"needs 1 <= n <= m, got NM\(3, 2\)"), ((0, 4), r"got NM\(0, 4\)")],
)
def test_error_bad_nm(nm, pattern):
    with pytest.raises(ValueError, match=pattern):
        prune.magnitude(structure=prune.NM(*nm))


def test_error_nm_axis_not_divisible():
    params = {"Dense_0": {"kernel": jnp.ones((6, 4))}}
    with pytest.raises(
        ValueError,
        match=r"mixjax.prune.magnitude: leaf 'Dense_0/kernel' \(6, 4\) float32: N:M 2:4 needs "
        r"the input axis \(axis 0, size 6\) divisible by 4",
    ):
        prune.magnitude(structure=prune.NM(2, 4)).init(params)


def test_error_nm_needs_uniform_scope():
    with pytest.raises(ValueError, match=r"needs scope='uniform', got scope='global'"):
        prune.magnitude(structure=prune.NM(2, 4), scope="global")


def test_error_block_does_not_tile():
    params = {"Dense_0": {"kernel": jnp.ones((8, 6))}}
    with pytest.raises(
        ValueError, match=r"leaf 'Dense_0/kernel' \(8, 6\) float32: block \(4, 4\) "
    ):
        prune.magnitude(structure=prune.Block((4, 4))).init(params)
    with pytest.raises(ValueError, match=r"Block\(shape\) needs two positive integers"):
        prune.magnitude(structure=prune.Block((0, 4)))


def test_error_selector_matches_nothing():
    with pytest.raises(ValueError, match=r"where='.\*Conv_9/kernel' matches no leaf; the tree has"):
        prune.magnitude(0.5, where=".*Conv_9/kernel").init(make_params())


def test_error_integer_or_bool_leaf_selected():
    params = {"emb": jnp.ones((4, 4), jnp.int32), "flag": jnp.ones((4, 4), bool)}
    with pytest.raises(TypeError, match=r"leaf 'emb' \(4, 4\) int32 is selected by where= but"):
        prune.magnitude(0.5, where="emb").init(params)
    with pytest.raises(TypeError, match=r"leaf 'flag' \(4, 4\) bool is selected"):
        prune.magnitude(0.5, where="flag").init(params)


def test_error_state_mismatch():
    params = make_params()
    t = prune.magnitude(0.5)
    state = t.init(params)
    other = {"Dense_0": params["Dense_0"]}
    with pytest.raises(ValueError, match=r"mixjax.prune.magnitude: the mask does not match"):
        t.apply(other, state)
    wrong_shape = {**params, "Dense_1": {**params["Dense_1"], "kernel": jnp.ones((8, 32))}}
    with pytest.raises(
        ValueError, match=r"leaf 'Dense_1/kernel' \(8, 32\) float32: mask has shape"
    ):
        t.apply(wrong_shape, state)
    with pytest.raises(TypeError, match=r"state must be a PruneState, got"):
        t.apply(params, (state,))


def test_error_random_needs_a_key():
    with pytest.raises(TypeError, match=r"mixjax.prune.random: key must be a jax.random.key"):
        prune.random(0, 0.5)


def test_error_bad_scope_structure_update_every():
    with pytest.raises(ValueError, match=r"scope must be one of .* got scope='layer'"):
        prune.magnitude(0.5, scope="layer")
    with pytest.raises(TypeError, match=r"structure must be Unstructured\(\)"):
        prune.magnitude(0.5, structure="nm_2,4")
    with pytest.raises(
        ValueError, match=r"update_every must be an integer >= 1, got update_every=0"
    ):
        prune.magnitude(0.5, update_every=0)
    with pytest.raises(ValueError, match=r"sparsity=None is only meaningful with"):
        prune.magnitude(None)
