"""benchmarks/step_floor.py: the hand-written floor computes what the mixjax components do (the
tied clustering view and gradient against mixjax.share.tie, the masks' sparsity), its step
trains, and the accounting adds up."""

import importlib.util
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import share

HERE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def floor():
    sys.path.insert(0, str(HERE))  # step_floor is a sibling of the benchmark that imports it
    spec = importlib.util.spec_from_file_location("benchmarks_step_floor", HERE / "step_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tied_view_and_gradient_equal_mixjax_tie(floor):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((12, 5)) > 0.4)
    ids = jnp.asarray(rng.integers(0, 4, 60), jnp.int32)
    live, counts = floor._live_ids(ids, mask, 4)
    assert int(counts.sum()) == int(mask.sum())
    x = jnp.where(mask, w, 0.0)
    g = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)

    def ours(x):
        return jnp.sum(floor._tied(x, live, counts, 4) * g)

    def theirs(x):
        return jnp.sum(share.tie(x, ids.reshape(12, 5), mask, 4) * g)

    np.testing.assert_allclose(
        floor._tied(x, live, counts, 4), share.tie(x, ids.reshape(12, 5), mask, 4), rtol=1e-6
    )
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(theirs)(x), rtol=1e-5, atol=1e-6)


def test_new_mask_keeps_about_a_tenth(floor):
    w = jnp.asarray(np.random.default_rng(1).normal(size=(200, 50)), jnp.float32)
    kept = float(jnp.mean(floor._new_mask(w)))
    assert 0.09 <= kept <= 0.11  # 1024 bins: the threshold is exact to a bin


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class Model:
    """What floor_step reads of step.Model."""

    def __init__(self):
        self.module = MLP()
        self.train_kwarg = None


def test_floor_step_of_every_part_trains(floor):
    model = Model()
    params = model.module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    masks = jax.tree.map(lambda p: p if p.ndim == 2 else None, params)
    tx = optax.adam(1e-2)
    step = floor.floor_step(model, tx, masks, floor.PARTS, every=2, num_classes=10)
    state = floor.floor_state(params, masks, floor.PARTS)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (16, 8, 8, 1)), jnp.uint8),
        "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    carry = (params, {}, tx.init(params), state)
    losses = []
    for _ in range(12):
        carry, metrics = step(carry, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert int(carry[3]["t"]) == 12


def test_accounting_adds_up(floor):
    parts = {c: 1.0 + i for i, c in enumerate(floor.PARTS)}  # extras 0.5 .. 4.5 over mixjax
    step_ms = {"plain": 10.0, "mixjax": 10.5, **{c: 10.5 + v for c, v in parts.items()}}
    step_ms["full"] = 10.5 + sum(parts.values()) + 2.0
    floor_ms = {"plain": 10.0, **{c: 10.0 + v / 2 for c, v in parts.items()}, "full": 20.0}
    a = floor.accounting(step_ms, floor_ms)
    assert a["wrapper_ms"] == pytest.approx(0.5)
    assert a["remainder_ms"] == pytest.approx(2.0)
    assert a["floor_ms"]["prune"] == pytest.approx(0.5)
    assert a["full_over_floor"] == pytest.approx(step_ms["full"] / 20.0)
