"""Artifacts hold the model's other variables (batch statistics) next to its parameters, so an
artifact alone runs a BatchNorm model."""

import io
import json
import zipfile

import crafted
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import export, models, prune, select


@pytest.fixture(scope="module")
def resnet():
    model = models.ResNet20(num_classes=3, width=2)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    params = variables["params"]
    # One training forward, so the statistics are not their initial zeros and ones.
    _, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return model, params, {"batch_stats": updated["batch_stats"]}, x


def leaves(tree):
    return dict(select.leaves_with_paths(tree))


@pytest.mark.parametrize("container", export.CONTAINERS)
def test_batch_stats_round_trip_and_run_the_model(resnet, tmp_path, container):
    model, params, state, x = resnet
    t = prune.magnitude(0.5)
    artifact = export.compress(params, t, t.init(params), model_state=state, container=container)
    loaded = export.load(export.save(artifact, tmp_path / "m.mjx"))
    for got in (artifact.model_state(), loaded.model_state()):
        want = leaves(jax.device_get(state))
        assert leaves(got).keys() == want.keys()
        for path, value in want.items():
            assert np.array_equal(leaves(got)[path], value), path
    expected = model.apply({"params": t.apply(params, t.init(params)), **state}, x)
    logits = model.apply({"params": loaded.params(), **loaded.model_state()}, x)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
    assert "model-state leaves" in repr(loaded)


def test_without_model_state_the_file_is_unchanged(resnet):
    _, params, _, _ = resnet
    t = prune.magnitude(0.5)
    plain = export.compress(params, t, t.init(params))
    empty = export.compress(params, t, t.init(params), model_state={})
    assert plain.to_bytes() == empty.to_bytes()
    with zipfile.ZipFile(io.BytesIO(plain.to_bytes())) as zf:
        assert "model_state" not in json.loads(zf.read("manifest.json"))
    assert plain.model_state() == {}


def test_nnx_batch_stats_rebuild_into_the_models_state():
    model = models.NNXResNet20(1, 3, width=2, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    stats = jax.tree.map(lambda v: v + 0.5, stats)
    t = prune.magnitude(0.25)
    artifact = export.compress(params, t, t.init(params), model_state=stats)
    rebuilt = artifact.model_state(like=stats)
    for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(stats), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    merged = nnx.merge(graphdef, artifact.params(like=params), rebuilt)
    merged.eval()
    assert merged(jnp.ones((1, 8, 8, 1))).shape == (1, 3)
    with pytest.raises(ValueError, match=r"Artifact\.model_state: like= has leaves"):
        artifact.model_state(like={"other": jnp.zeros(1)})


def test_a_damaged_model_state_is_refused_naming_it(tmp_path):
    leaf = {"path": "w", "kind": "array", "shape": [2], "dtype": "float32", "data": "0"}
    arrays = {"0": np.ones(2, np.float32)}
    bad = {**leaf, "path": "batch_stats/bn/mean", "shape": [3]}
    path = crafted.compact_file(
        str(tmp_path / "a.mjx"), crafted.manifest([leaf], model_state=[bad]), arrays
    )
    with pytest.raises(
        ValueError, match=r"'.*a\.mjx': model-state leaf 'batch_stats/bn/mean': data has shape"
    ):
        export.load(path)
    path = crafted.compact_file(
        str(tmp_path / "b.mjx"), crafted.manifest([leaf], model_state={"x": 1}), arrays
    )
    with pytest.raises(ValueError, match=r"'model_state' must be a list of records, got dict"):
        export.load(path)
