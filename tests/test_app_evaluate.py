"""Tests of mixjax.app.evaluate: an artifact's metadata, its three forwards, accuracy, timing."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import mixjax
from mixjax import data, export, models, prune, quant
from mixjax.app import evaluate

CLASSES = 4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A `mixjax run`-style artifact of an untrained LeNet-300-100 on 8x8x1 images."""
    rng = np.random.default_rng(0)
    # Float pixels: uint8 ones normalize onto exact half-steps of the input grid, where the
    # rounding of an ulp decides the code.
    images = rng.random((48, 8, 8, 1), np.float32)
    dataset = data.Dataset(images, rng.integers(0, CLASSES, 48).astype(np.int32), CLASSES, "t")
    model = models.create("lenet300100", CLASSES)
    x = data.normalize(images)
    params = model.init(jax.random.key(0), x[:1])["params"]
    transform = mixjax.chain(
        prune.magnitude(0.5), quant.fake_quant(8, per_channel=False, where=".*")
    )
    state = transform.init(params)
    view = transform.apply(params, state)
    act = quant.activation_quant(8)
    fn = lambda images: model.apply({"params": view}, images)
    act_state = act.apply(fn, act.init(fn, x), x, mode="train")[1]
    meta = evaluate.metadata("lenet300100", CLASSES, (8, 8, 1), act, act_state)
    artifact = dataclasses.replace(
        export.compress(params, transform, state, container="compact"), metadata=meta
    )
    path = export.save(artifact, tmp_path_factory.mktemp("a") / "model.mjx")
    return dict(
        loaded=export.load(path), model=model, view=view, act=act, act_state=act_state,
        x=x, dataset=dataset, meta=meta,
    )  # fmt: skip


def test_metadata_is_json_and_describes_the_model(made):
    meta = made["meta"]
    assert json.loads(json.dumps(meta)) == meta
    assert (meta["model"], meta["num_classes"], meta["input_shape"]) == (
        "lenet300100",
        4,
        [8, 8, 1],
    )
    assert meta["preprocess"] == evaluate.NORMALIZE
    assert sorted(meta["activations"]["ranges"]) == ["Dense_0", "Dense_1", "Dense_2"]
    for path, (lo, hi) in meta["activations"]["ranges"].items():
        assert lo == float(made["act_state"][path].min) and hi == float(made["act_state"][path].max)


def test_the_forwards_equal_references_computed_another_way(made):
    fns = evaluate.forwards(made["loaded"])
    images, x = made["dataset"].images, made["x"]
    params = made["loaded"].params()
    want_float = made["model"].apply({"params": params}, x)
    np.testing.assert_allclose(fns["float"](images), want_float, rtol=1e-5, atol=1e-6)
    fn = lambda images: made["model"].apply({"params": params}, images)
    want_compressed = made["act"].apply(fn, made["act_state"], x, mode="eval")[0]
    np.testing.assert_allclose(fns["compressed"](images), want_compressed, rtol=1e-5, atol=1e-6)
    integer = np.asarray(fns["integer"](images))
    # Equal up to float32 summation order, except where a hidden activation lies within that
    # error of a rounding boundary and takes the neighbouring code (mixjax.export.integer).
    close = np.all(np.isclose(integer, want_compressed, rtol=1e-4, atol=1e-5), axis=1)
    assert close.mean() >= 0.9, close
    np.testing.assert_allclose(integer, want_compressed, atol=5e-3)


def test_evaluate_is_argmax_accuracy(made):
    fns = evaluate.forwards(made["loaded"])
    scores = evaluate.evaluate(made["loaded"], made["dataset"], fns=fns)
    labels = made["dataset"].labels
    for key, name in [
        ("accuracy_compressed", "compressed"),
        ("accuracy_integer", "integer"),
        ("accuracy_float_activations", "float"),
    ]:
        want = np.mean(np.asarray(fns[name](made["dataset"].images)).argmax(-1) == labels)
        assert scores[key] == pytest.approx(float(want))


def test_errors_name_what_is_missing(made):
    bare = dataclasses.replace(made["loaded"], metadata={})
    with pytest.raises(ValueError, match=r"the artifact has no \['model', 'num_classes', "):
        evaluate.forwards(bare)
    wide = made["dataset"]._replace(images=np.zeros((4, 9, 9, 1), np.float32))
    with pytest.raises(
        ValueError, match=r"the model takes images of shape \[8, 8, 1\], the dataset 't' has"
    ):
        evaluate.evaluate(made["loaded"], wide)


def test_time_integer_reports_both_paths(made):
    fns = evaluate.forwards(made["loaded"])
    speed = evaluate.time_integer(fns, made["dataset"].images, rounds=3)
    assert speed["float_ms"] > 0 and speed["integer_ms"] > 0
    assert speed["speedup"] == pytest.approx(speed["float_ms"] / speed["integer_ms"])
