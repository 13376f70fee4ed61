"""Running an artifact (:mod:`mixjax.app.evaluate`): metadata, the three forwards, accuracy, timing.

One tiny untrained artifact is made the way :mod:`mixjax.app.pipeline` makes one (a pruned,
clustered, fake-quantized SmallCNN on 8x8x1 images with QAT activation ranges), saved and loaded;
every forward is compared with a reference computed directly from the loaded parameters.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

import mixjax
from mixjax import data, export, models, prune, quant, share
from mixjax.app import evaluate

MODEL, CLASSES, SHAPE = "small_cnn", 10, (8, 8, 1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    rng = np.random.default_rng(0)
    # Float pixels in [0, 1]: inputs do not sit on rounding ties of the activation grid.
    images = rng.random((24, *SHAPE), dtype=np.float32)
    model = models.create(MODEL, CLASSES)
    x = data.normalize(images)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"]
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.3, shapes)
    transform = mixjax.chain(
        prune.magnitude(0.5, where=".*Dense_0/kernel"),
        share.cluster(4, init="linear", max_iterations=5, where=".*Conv_0/kernel"),
        quant.fake_quant(8, per_channel=False, where=".*"),
    )
    state = jax.jit(transform.init)(params)
    act = quant.activation_quant(8)
    view = jax.jit(transform.apply)(params, state)
    fn = lambda p, x: model.apply({"params": p}, x)
    act_state = act.init(fn, view, x)
    _, act_state = jax.jit(lambda s, x: act.apply(fn, s, view, x, mode="train"))(act_state, x)
    artifact = export.compress(params, transform, state, container="compact")
    meta = evaluate.metadata(MODEL, CLASSES, x.shape[1:], act, act_state)
    artifact = dataclasses.replace(artifact, metadata=meta)
    path = export.save(artifact, tmp_path_factory.mktemp("artifact") / "model.mjx")
    loaded = export.load(path)
    return {
        "images": images,
        "model": model,
        "view": view,
        "act": act,
        "act_state": act_state,
        "meta": meta,
        "loaded": loaded,
        "fns": evaluate.forwards(loaded),
    }


def test_metadata_fields_are_json_and_survive_save_and_load(made):
    meta, act_state = made["meta"], made["act_state"]
    assert list(meta) == [
        "model",
        "num_classes",
        "input_shape",
        "sizes",
        "preprocess",
        "activations",
    ]
    assert meta["sizes"] == {}  # the model's defaults
    assert meta["model"] == MODEL and meta["num_classes"] == CLASSES
    assert meta["input_shape"] == list(SHAPE)
    assert meta["preprocess"] == evaluate.NORMALIZE == {"mean": 0.5, "std": 0.5}
    assert meta["preprocess"] is not evaluate.NORMALIZE  # a copy: editing it changes nothing
    assert meta["activations"]["bits"] == 8
    ranges = meta["activations"]["ranges"]
    assert (
        sorted(ranges) == sorted(act_state) == ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]
    )
    for path, (lo, hi) in ranges.items():
        assert type(lo) is float and type(hi) is float
        assert (lo, hi) == (float(act_state[path].min), float(act_state[path].max))
        assert lo <= 0.0 < hi
    assert ranges["Conv_0/kernel"] == pytest.approx([-1.0, 1.0], abs=0.05)  # normalized pixels
    assert json.loads(json.dumps(meta)) == meta
    assert made["loaded"].metadata == meta


def test_float_forward_is_the_model_on_normalized_images(made):
    loaded, images = made["loaded"], made["images"]
    params = loaded.params()
    # The loaded parameters are the compressed view the artifact was made from.
    for (path, a), (_, b) in zip(
        mixjax.select.leaves_with_paths(params),
        mixjax.select.leaves_with_paths(made["view"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
    normalized = (images - 0.5) / 0.5
    expected = np.asarray(made["model"].apply({"params": params}, normalized))
    got = np.asarray(made["fns"]["float"](images))
    assert got.shape == (len(images), CLASSES)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_compressed_forward_fake_quantizes_activations_with_the_stored_ranges(made):
    images, act, model = made["images"], made["act"], made["model"]
    params = made["loaded"].params()
    fn = lambda p, x: model.apply({"params": p}, x)
    expected, state = jax.jit(lambda s, x: act.apply(fn, s, params, x, mode="eval"))(
        made["act_state"], data.normalize(images)
    )
    got = np.asarray(made["fns"]["compressed"](images))
    np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-5)
    float_logits = np.asarray(made["fns"]["float"](images))
    assert np.abs(got - float_logits).max() > 1e-4  # activations really are quantized
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), state, made["act_state"]))


def test_integer_forward_is_close_to_the_compressed_one(made):
    images = made["images"]
    compressed = np.asarray(made["fns"]["compressed"](images))
    integer = np.asarray(made["fns"]["integer"](images))
    assert integer.shape == compressed.shape and integer.dtype == np.float32
    scale = np.abs(compressed).max()
    assert np.abs(integer - compressed).max() <= 0.01 * scale
    agree = np.mean(integer.argmax(-1) == compressed.argmax(-1))
    assert agree >= 0.9


def test_evaluate_accuracies_are_argmax_matches(made):
    images, fns = made["images"], made["fns"]
    predicted = {name: np.asarray(fns[name](images)).argmax(-1) for name in fns}
    # Labels: the float forward's class on the first 18 images, another class on the last 6.
    labels = predicted["float"].copy()
    labels[18:] = (labels[18:] + 1) % CLASSES
    dataset = data.Dataset(images, labels.astype(np.int32), CLASSES, "tiny")
    scores = evaluate.evaluate(made["loaded"], dataset, fns=fns)
    assert list(scores) == [
        "accuracy_compressed",
        "accuracy_integer",
        "accuracy_float_activations",
    ]
    assert scores["accuracy_float_activations"] == 0.75
    assert scores["accuracy_compressed"] == np.mean(predicted["compressed"] == labels)
    assert scores["accuracy_integer"] == np.mean(predicted["integer"] == labels)
    assert all(type(v) is float for v in scores.values())
    # Without fns it builds the forwards itself, with the same results.
    assert evaluate.evaluate(made["loaded"], dataset) == scores


def test_errors_name_what_is_missing_or_mismatched(made, tmp_path):
    params = {"Dense_0": {"kernel": np.ones((4, 2), np.float32)}}
    bare = export.load(export.save(export.compress(params, mixjax.identity(), ()), tmp_path / "a"))
    message = (
        r"^mixjax\.app\.evaluate: the artifact has no \['model', 'num_classes', 'activations'\] "
        r"metadata \(was it made by `mixjax run`\?\)$"
    )
    with pytest.raises(ValueError, match=message):
        evaluate.forwards(bare)
    images = made["images"][:4]
    dataset = data.Dataset(images, np.zeros(4, np.int32), CLASSES, "tiny")
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate(bare, dataset)
    partial = dict(made["meta"])
    del partial["activations"]
    without = dataclasses.replace(made["loaded"], metadata=partial)
    with pytest.raises(ValueError, match=r"the artifact has no \['activations'\] metadata"):
        evaluate.forwards(without)
    small = data.Dataset(np.zeros((4, 6, 6, 1), np.float32), np.zeros(4, np.int32), 10, "six")
    with pytest.raises(
        ValueError,
        match=r"^mixjax\.app\.evaluate: the model takes images of shape \[8, 8, 1\], the dataset "
        r"'six' has \[6, 6, 1\]$",
    ):
        evaluate.evaluate(made["loaded"], small, fns=made["fns"])


def test_time_integer(made):
    calls = {"float": 0, "integer": 0}

    def counted(name):
        def run(x):
            calls[name] += 1
            return made["fns"][name](x)

        return run

    fns = {**{name: counted(name) for name in calls}, "compressed": None}  # only two are timed
    timing = evaluate.time_integer(fns, made["images"][:8], rounds=4)
    assert list(timing) == ["float_ms", "integer_ms", "speedup"]
    assert timing["float_ms"] > 0 and timing["integer_ms"] > 0
    assert timing["speedup"] == pytest.approx(timing["float_ms"] / timing["integer_ms"], rel=1e-12)
    assert calls == {"float": 5, "integer": 5}  # a warm-up call each, then `rounds` calls


def _with(made, *, leaves=None, **changes):
    """The loaded artifact with its leaves replaced and metadata fields changed (None: drop)."""
    meta = {k: v for k, v in {**made["meta"], **changes}.items() if v is not None}
    loaded = made["loaded"]
    return dataclasses.replace(
        loaded, leaves=loaded.leaves if leaves is None else leaves, metadata=meta
    )


def test_leaves_must_be_the_models_parameters(made):
    what = r"model 'small_cnn' \((\d+) classes, input \[8, 8, 1\]\)"
    leaves = made["loaded"].leaves
    renamed = tuple(
        {**r, "path": "Dense_0/weight"} if r["path"] == "Dense_0/kernel" else r for r in leaves
    )
    with pytest.raises(
        ValueError,
        match=rf"^mixjax\.app\.evaluate: {what} has a parameter 'Dense_0/kernel' \(256, 10\); "
        "the artifact has none$",
    ):
        evaluate.forwards(_with(made, leaves=renamed))
    extra = (*leaves, {**leaves[0], "path": "Extra/bias"})
    with pytest.raises(
        ValueError, match=rf"the artifact's leaf 'Extra/bias' \(32,\) is no parameter of {what}$"
    ):
        evaluate.forwards(_with(made, leaves=extra))
    with pytest.raises(
        ValueError,
        match=r"^mixjax\.app\.evaluate: leaf 'Dense_0/bias' has shape \(10,\) in the artifact, "
        r"model 'small_cnn' \(7 classes, input \[8, 8, 1\]\) has \(7,\)$",
    ):
        evaluate.forwards(_with(made, num_classes=7))
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/kernel' has shape \(256, 10\) in the"):
        evaluate.forwards(_with(made, input_shape=[12, 12, 1]))


RANGES = {"Conv_0/kernel": [-1.0, 1.0], "Conv_1/kernel": [0.0, 2.0], "Dense_0/kernel": [0.0, 2.0]}
MALFORMED = [
    ({"model": "vgg"}, r"metadata 'model' must be one of \[.*'small_cnn'.*\], got 'vgg'"),
    ({"model": ["small_cnn"]}, r"metadata 'model' must be one of .*, got \['small_cnn'\]"),
    (
        {"model": "gpt_tiny"},
        r"metadata 'model' must be one of \['lenet300100', .*'vit_tiny'\], got",
    ),
    ({"sizes": [32]}, r"metadata 'sizes' must be a dict of sizes of 'small_cnn' \(\['width'\]\)"),
    (
        {"sizes": {"depth": 2}},
        r"metadata 'sizes' must be a dict of sizes of .*, got \{'depth': 2\}",
    ),
    (
        {"sizes": {"width": 2**17}},
        r"'sizes' must be .*integers in \[1, 65536\], got \{'width': 131072",
    ),
    ({"sizes": {"width": 8.0}}, r"metadata 'sizes' must be a dict .*, got \{'width': 8\.0\}"),
    ({"sizes": {"width": 8}}, r"leaf 'Conv_0/bias' has shape \(32,\) in the artifact, model"),
    (
        {"model": "vit_tiny", "sizes": {"width": 30}},
        r"metadata 'sizes' must be sizes model 'vit_tiny' accepts \(mixjax\.models\.ViTTiny: dim "
        r"must be divisible by heads, got dim=30, heads=4\), got \{'width': 30\}",
    ),
    ({"num_classes": 0}, r"metadata 'num_classes' must be an integer in \[1, 100000\], got 0"),
    ({"num_classes": True}, r"metadata 'num_classes' must be .*, got True"),
    ({"num_classes": "10"}, r"metadata 'num_classes' must be .*, got '10'"),
    ({"num_classes": 10**12}, r"metadata 'num_classes' must be .*, got 1000000000000"),
    ({"input_shape": None}, r"the artifact has no 'input_shape' metadata"),
    ({"input_shape": "8x8x1"}, r"metadata 'input_shape' must be a list of 1 to 8 positive"),
    ({"input_shape": [8, 0, 1]}, r"metadata 'input_shape' must be .*, got \[8, 0, 1\]"),
    ({"input_shape": [8.0, 8, 1]}, r"metadata 'input_shape' must be .*, got \[8\.0, 8, 1\]"),
    ({"input_shape": [2**20, 2**20, 1]}, r"metadata 'input_shape' must be .* 16777216 elements"),
    ({"activations": [8]}, r"metadata 'activations' must be \{'bits': b, 'ranges'"),
    ({"activations": {"bits": 1, "ranges": RANGES}}, r"'activations\.bits' must be an integer"),
    ({"activations": {"bits": 8.0, "ranges": RANGES}}, r"'activations\.bits' .*, got 8\.0"),
    ({"activations": {"bits": 8, "ranges": [1]}}, r"'activations\.ranges' must be a dict"),
    (
        {"activations": {"bits": 8, "ranges": {**RANGES, "Conv_0/kernel": [1.0]}}},
        r"metadata 'activations\.ranges\.Conv_0/kernel' must be \[min, max\], finite, got \[1\.0\]",
    ),
    (
        {"activations": {"bits": 8, "ranges": {**RANGES, "Conv_0/kernel": [1.0, float("nan")]}}},
        r"'activations\.ranges\.Conv_0/kernel' must be \[min, max\], finite, got \[1\.0, nan\]",
    ),
    (
        {"activations": {"bits": 8, "ranges": {**RANGES, "Conv_0/kernel": [2.0, 1.0]}}},
        r"'activations\.ranges\.Conv_0/kernel' must be \[min, max\] with min <= max",
    ),
    (
        {"activations": {"bits": 8, "ranges": {"Conv_0/kernel": [0.0, 1.0]}}},
        r"'activations\.ranges' must have one range per matmul/conv site of model 'small_cnn' "
        r"\(10 classes, input \[8, 8, 1\]\) \(\['Conv_0/kernel', 'Conv_1/kernel', "
        r"'Dense_0/kernel'\]\), got \['Conv_0/kernel'\]",
    ),
    (
        {"activations": {"bits": 8, "ranges": {**RANGES, "Dense_7/kernel": [0.0, 1.0]}}},
        r"must have one range per matmul/conv site .*, got "
        r"\['Conv_0/kernel', 'Conv_1/kernel', 'Dense_0/kernel', 'Dense_7/kernel'",
    ),
    ({"preprocess": {"mean": 0.5, "std": 0.0}}, r"metadata 'preprocess' must be \{'mean': m"),
    ({"preprocess": {"mean": [0.5, 0.5]}}, r"'preprocess' must be .* or 1 per channel"),
    ({"preprocess": {"scale": 2.0}}, r"metadata 'preprocess' must be .*, got \{'scale': 2\.0\}"),
    ({"preprocess": {"mean": "0.5"}}, r"metadata 'preprocess' must be"),
]


@pytest.mark.parametrize(("change", "match"), MALFORMED)
def test_malformed_metadata_names_the_key(made, change, match):
    with pytest.raises(ValueError, match=rf"^mixjax\.app\.evaluate: .*{match}"):
        evaluate.forwards(_with(made, **change))


def test_metadata_strings_from_the_file_are_escaped_in_errors(made):
    with pytest.raises(ValueError, match=r"got 'lenet\\x1b\[2J\\nforged'$") as info:
        evaluate.forwards(_with(made, model="lenet\x1b[2J\nforged"))
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)
