"""End-to-end tests of ``mixjax compress`` (:mod:`mixjax.app.compress`, :mod:`mixjax.app.cli`).

One tiny ``mixjax run`` per module, stopped after its float stage (``--stop-after``, so only
that stage trains), is compressed one shot with GPTQ and SparseGPT 2:4; a tiny language-model
run with GPTQ int4 in groups. The runs share a persistent compilation cache.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from test_app_lm import SIZES, write_text

from mixjax import export
from mixjax.app import cli, compress, plots

pytestmark = pytest.mark.usefixtures("compilation_cache")


def _float(steps=200):
    """Options of a run stopped after its float stage of ``steps`` steps."""
    return [
        "--train-steps", str(steps), "--stop-after", str(steps), "--steps-per-call", "50",
        "--checkpoint-every", str(max(50, steps // 2)), "--quiet",
    ]  # fmt: skip


KEYS = {
    "task": str,
    "accuracy_float": float,
    "accuracy_compressed": float,
    "accuracy_integer": float,
    "accuracy_float_activations": float,
    "bytes_dense": int,
    "bytes_compressed": int,
    "compression_ratio": float,
    "inference_speedup_integer": float,
    "inference_ms": dict,
    "stages": list,
    "layers": list,
    "layers_markdown": str,
    "history": dict,
    "config": dict,
    "timings_s": dict,
    "environment": dict,
    "plots": list,
    "oneshot": dict,
    "oneshot_layers": list,
    "oneshot_layers_markdown": str,
}
KERNELS = ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]  # (64, 300), (300, 100), (100, 10)


def _compress(capsys, run_dir, out, *options):
    assert cli.main(["compress", run_dir, "--output", out, "--quiet", *options]) == 0
    text = capsys.readouterr().out
    with open(os.path.join(out, compress.REPORT)) as f:
        return json.load(f), text


def _error(capsys, argv, *matches):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mixjax: error: "), lines[0]
    for match in matches:
        assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "run")
    assert cli.main(["run", "--output", out, "--model", "lenet300100", *_float()]) == 0
    return out


@pytest.fixture(scope="module")
def gptq(float_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gptq") / "out")
    assert cli.main(["compress", float_run, "--method", "gptq", "--bits", "4", "--output", out,
                     "--quiet"]) == 0  # fmt: skip
    with open(os.path.join(out, compress.REPORT)) as f:
        return out, json.load(f)


def test_gptq_report_has_run_keys_and_honest_values(gptq):
    out, report = gptq
    for key, typ in KEYS.items():
        assert isinstance(report[key], typ), (key, report[key])
    assert report["task"] == "image" and report["train_steps_per_second"] is None
    for key in ("accuracy_float", "accuracy_compressed", "accuracy_integer"):
        assert 0.5 < report[key] <= 1.0, (key, report[key])  # chance is 0.1
    assert abs(report["accuracy_compressed"] - report["accuracy_float"]) <= 0.05
    assert abs(report["accuracy_integer"] - report["accuracy_compressed"]) <= 0.02
    assert report["bytes_dense"] == 4 * 50_610  # LeNet-300-100 on 8x8x1 inputs, 10 classes
    assert report["compression_ratio"] == pytest.approx(
        report["bytes_dense"] / report["bytes_compressed"]
    )
    assert report["compression_ratio"] > 2  # int4 kernels, float biases
    assert [s["stage"] for s in report["stages"]] == ["dense", "compressed", "integer"]
    assert report["oneshot"]["method"] == "gptq" and report["oneshot"]["bits"] == 4
    assert report["oneshot"]["calibration_samples"] == compress.DEFAULT_SAMPLES
    assert report["oneshot"]["source"].endswith(os.path.join("checkpoints", "float", "200"))
    rows = report["oneshot_layers"]
    assert [r["path"] for r in rows] == KERNELS
    assert all(0 <= r["error"] < 0.1 for r in rows), rows
    assert report["oneshot_layers_markdown"].count("\n") == len(rows) + 1
    assert len(report["history"]["float"]) == 200
    assert report["config"]["run"]["output"] == out
    assert report["plots"] == list(plots.files("accuracy"))
    for name in (*report["plots"], compress.ARTIFACT, "mixjax-run.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name


def test_gptq_artifact_is_int4_per_channel_and_mixjax_eval_runs_it(gptq, capsys):
    out, report = gptq
    artifact = export.load(os.path.join(out, compress.ARTIFACT))
    assert artifact.nbytes == report["bytes_compressed"]
    assert artifact.metadata["model"] == "lenet300100"
    params = artifact.params()
    for path in KERNELS:
        layer, leaf = path.split("/")
        w = np.asarray(params[layer][leaf])
        assert max(len(np.unique(column)) for column in w.T) <= 16, path  # one 4-bit grid each
    assert cli.main(["eval", os.path.join(out, compress.ARTIFACT)]) == 0
    text = capsys.readouterr().out
    assert f"accuracy_compressed: {100 * report['accuracy_compressed']:.2f}%" in text
    assert f"accuracy_integer: {100 * report['accuracy_integer']:.2f}%" in text


def test_sparsegpt_2_4_with_int8_keeps_exact_masks(float_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    report, text = _compress(
        capsys, float_run, out, "--method", "sparsegpt", "--sparsity", "2:4", "--bits", "8"
    )
    assert "| Dense_0/kernel | 64x300 |" in text and "smaller than float32" in text
    assert report["oneshot"]["sparsity"] == "2:4" and report["oneshot"]["passes"] == ["sparsegpt"]
    assert 0.5 < report["accuracy_compressed"] <= 1.0
    assert report["compression_ratio"] > 3
    params = export.load(os.path.join(out, compress.ARTIFACT)).params()
    for path in KERNELS:
        layer, leaf = path.split("/")
        w = np.asarray(params[layer][leaf])
        kept = (w.reshape(-1, 4, w.shape[1]) != 0).sum(1)  # groups of 4 along the inputs
        assert kept.max() <= 2, path  # a kept weight may round to 0 on the int8 grid
        assert np.mean(w == 0) >= 0.5, path
    assert {r["sparsity"] for r in report["oneshot_layers"]} >= {0.5}


def test_wanda_with_bits_chains_round_to_nearest(float_run, tmp_path, capsys):
    report, _ = _compress(
        capsys, str(float_run), str(tmp_path / "out"), "--method", "wanda", "--sparsity", "0.5",
        "--bits", "4",
    )  # fmt: skip
    assert report["oneshot"]["passes"] == ["wanda", "rtn"]
    assert [r["method"] for r in report["oneshot_layers"]] == ["wanda"] * 3 + ["rtn"] * 3
    assert all(r["error"] is None for r in report["oneshot_layers"][3:])  # rtn reads no inputs
    assert [row["sparsity"] >= 0.5 for row in report["layers"] if row["path"] in KERNELS] == [
        True
    ] * 3
    assert 0.5 < report["accuracy_compressed"] <= 1.0


def test_awq_with_a_skipped_layer_keeps_it_float(float_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    report, _ = _compress(
        capsys, float_run, out, "--method", "awq", "--bits", "4", "--group-size", "4",
        "--skip", "Dense_2",
    )  # fmt: skip
    assert report["oneshot"]["skip"] == "Dense_2" and report["oneshot"]["passes"] == ["awq"]
    assert [r["path"] for r in report["oneshot_layers"]] == KERNELS[:2]
    assert abs(report["accuracy_compressed"] - report["accuracy_float"]) <= 0.05
    artifact = export.load(os.path.join(out, compress.ARTIFACT))
    records = {leaf["path"]: leaf for leaf in artifact.leaves}
    for path in KERNELS[:2]:  # int4 codes with AWQ's per-input-feature factors
        assert records[path]["kind"] == "int" and records[path]["bits"] <= 4, path
        factors = artifact.arrays[records[path]["input_scale"]]
        assert factors.shape == (records[path]["shape"][0], 1) and np.all(factors > 0), path
    assert records[KERNELS[2]]["kind"] == "array"  # skipped: stays float
    head = np.asarray(artifact.params()["Dense_2"]["kernel"])
    assert min(len(np.unique(column)) for column in head.T) > 16  # on no 4-bit grid
    assert 0.5 < report["accuracy_integer"] <= 1.0


def test_skip_that_matches_no_layer_is_an_error(float_run, tmp_path, capsys):
    _error(
        capsys,
        ["compress", float_run, "--method", "rtn", "--bits", "4", "--skip", "Conv_9",
         "--output", str(tmp_path / "o"), "--quiet"],
        "--skip 'Conv_9' matches none of the layers",
        "Dense_0/kernel",
    )  # fmt: skip


def test_output_rules_and_a_named_float_checkpoint(float_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = ["compress", float_run, "--method", "rtn", "--bits", "8", "--output", out, "--quiet"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    _error(capsys, argv, "is not empty", "pass --overwrite")
    _error(capsys, [*argv[:-3], "--output", float_run], "is the run directory itself")
    assert cli.main([*argv, "--overwrite"]) == 0
    # An unfinished float stage is refused; its checkpoint, named, is compressed.
    copy = str(tmp_path / "unfinished")
    shutil.copytree(float_run, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "float", "200"))
    _error(
        capsys,
        ["compress", copy, "--method", "rtn", "--bits", "8"],
        "float stage of",
        "is not finished (its latest checkpoint is step 100 of 200)",
    )
    named = os.path.join(copy, "checkpoints", "float", "100")
    report, _ = _compress(capsys, named, str(tmp_path / "named"), "--method", "rtn", "--bits", "8")
    assert report["oneshot"]["source"] == named and len(report["history"]["float"]) == 100


def test_bad_sources_are_one_line_errors(float_run, tmp_path, capsys):
    rtn = ["--method", "rtn", "--bits", "8"]
    _error(capsys, ["compress", str(tmp_path), *rtn], "holds no mixjax-run.json")
    _error(capsys, ["compress", str(tmp_path / "missing"), *rtn], "does not exist")
    _error(capsys, ["compress", os.path.join(float_run, "mixjax-run.json"), *rtn], "is a file")
    prune_stage = tmp_path / "run" / "checkpoints" / "prune"
    prune_stage.mkdir(parents=True)
    (tmp_path / "run" / "mixjax-run.json").write_text("{}")
    _error(capsys, ["compress", str(prune_stage), *rtn], "checkpoint of the 'prune' stage")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(float_run, "mixjax-run.json"), empty)
    _error(capsys, ["compress", str(empty), *rtn], "holds no float-stage checkpoint")


def test_checkpoint_of_another_model_names_the_first_differing_leaf(float_run, tmp_path, capsys):
    other = str(tmp_path / "other")
    shutil.copytree(float_run, other)
    path = os.path.join(other, "mixjax-run.json")
    with open(path) as f:
        run = json.load(f)
    run["config"]["train"]["model"] = "small_cnn"
    with open(path, "w") as f:
        json.dump(run, f)
    _error(
        capsys,
        ["compress", other, "--method", "rtn", "--bits", "8", "--output", str(tmp_path / "o")],
        "the float checkpoint is not one of model 'small_cnn'",
        "the checkpoint has leaf 'state/params/Dense_0/bias' (300,)",
        "the model has leaf 'state/params/Conv_0/bias'",
    )


def test_calibration_data_that_does_not_fit_the_model(float_run, tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {
        f"{x}_{split}": rng.integers(0, 255, (n, 4, 4, 1)).astype(np.uint8)
        if x == "x"
        else rng.integers(0, 10, n)
        for x in ("x", "y")
        for split, n in (("train", 200), ("test", 50))
    }
    np.savez(tmp_path / "small.npz", **arrays)
    _error(
        capsys,
        ["compress", float_run, "--method", "gptq", "--bits", "4", "--dataset",
         f"npz:{tmp_path / 'small.npz'}", "--output", str(tmp_path / "o")],
        "images (4, 4, 1)",
        "leaf 'state/params/Dense_0/kernel' (64, 300)",
        "the model has leaf 'state/params/Dense_0/kernel' (16, 300)",
    )  # fmt: skip
    _error(
        capsys,
        ["compress", float_run, "--method", "gptq", "--bits", "4", "--dataset", "text:x.txt"],
        "must be an image dataset for --task image",
    )


def test_group_size_that_does_not_divide_a_layer_names_it(float_run, tmp_path, capsys):
    _error(
        capsys,
        ["compress", float_run, "--method", "gptq", "--bits", "4", "--group-size", "32",
         "--output", str(tmp_path / "o"), "--quiet"],
        "leaf 'Dense_1/kernel' (300, 100)",
        "group_size=32 does not divide axis 0",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--method", "awq", "--bits", "4", "--skip", "(Dense"], "argument --skip: not a "
         "regular expression"),
        (["--method", "obs"], "argument --method: invalid choice 'obs'"),
        (["--method", "gptq"], "--method gptq needs --bits"),
        (["--method", "rtn", "--bits", "9"], "argument --bits: must be in 2..8, got 9"),
        (["--method", "gptq", "--bits", "1"], "argument --bits: must be in 2..8, got 1"),
        (["--method", "wanda"], "--method wanda needs --sparsity"),
        (["--method", "sparsegpt", "--sparsity", "1.5"], "--sparsity: must be a fraction in "
         "[0, 1) or N:M"),
        (["--method", "magnitude", "--sparsity", "5:4"], "got '5:4'"),
        (["--method", "magnitude", "--sparsity", "half"], "got 'half'"),
        (["--method", "gptq", "--bits", "4", "--sparsity", "0.5"], "--method gptq only quantizes"),
        (["--method", "wanda", "--sparsity", "0.5", "--group-size", "8"], "--group-size needs "
         "--bits"),
        (["--method", "rtn", "--bits", "4", "--group-size", "0"], "--group-size: must be >= 1"),
        (["--method", "rtn", "--bits", "4", "--calibration-samples", "0"], "must be >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors(options, match, capsys):
    _error(capsys, ["compress", "anywhere", *options], match)


def test_cli_method_names_are_the_library_s():
    assert cli._QUANTIZERS == compress.QUANTIZERS and cli._PRUNERS == compress.PRUNERS
    assert cli._SAMPLES == compress.DEFAULT_SAMPLES


def test_language_model_gptq_int4_groups(tmp_path_factory, capsys):
    corpus = write_text(tmp_path_factory.mktemp("text") / "corpus.txt")
    run = str(tmp_path_factory.mktemp("lm") / "run")
    argv = ["run", "--task", "lm", "--dataset", corpus, "--output", run, *SIZES]
    assert cli.main([*argv, *_float(100)]) == 0
    capsys.readouterr()
    out = str(tmp_path_factory.mktemp("lmc") / "out")
    options = ["--method", "gptq", "--bits", "4", "--group-size", "16"]
    report, text = _compress(capsys, run, out, *options, "--calibration-samples", "32")
    assert "val loss float" in text
    assert report["task"] == "lm" and report["vocab_size"] > 1
    for name in ("float", "compressed"):
        loss = report[f"val_loss_{name}"]
        assert math.isfinite(loss) and 0 < loss < math.log(report["vocab_size"]), (name, loss)
        assert report[f"perplexity_{name}"] == pytest.approx(math.exp(loss))
    assert abs(report["val_loss_compressed"] - report["val_loss_float"]) < 0.05
    assert report["compression_ratio"] > 2 and report["oneshot"]["calibration_samples"] == 32
    assert report["plots"] == list(plots.files("val_loss"))
    artifact = export.load(os.path.join(out, compress.ARTIFACT))
    meta = artifact.metadata
    assert meta["task"] == "lm" and meta["model"] == "gpt_tiny"
    assert meta["quantization"] == {"bits": 4, "group_size": 16, "weights_only": True}
    assert "block0/attn/query/kernel" in [r["path"] for r in report["oneshot_layers"]]


@pytest.mark.slow
def test_batchnorm_statistics_are_used_and_stored(tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["run", "--model", "resnet20", "--width", "4", "--tau", "0", "--output", run]
    assert cli.main([*argv, *_float(50)]) == 0
    capsys.readouterr()
    out = str(tmp_path / "out")
    report, _ = _compress(capsys, run, out, "--method", "gptq", "--bits", "8")
    assert abs(report["accuracy_compressed"] - report["accuracy_float"]) <= 0.03
    artifact = export.load(os.path.join(out, compress.ARTIFACT))
    assert any("batch_stats" in leaf["path"] for leaf in artifact.state_leaves)
    assert cli.main(["eval", os.path.join(out, compress.ARTIFACT)]) == 0
