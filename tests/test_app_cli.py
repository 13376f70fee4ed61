"""End-to-end tests of the ``mixjax`` command (:mod:`mixjax.app.cli`, :mod:`mixjax.app.pipeline`).

A tiny configuration (a few dozen steps of batch 32) runs the whole pipeline in seconds; the
runs share a persistent compilation cache, so the later ones reuse the first one's programs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib

import jax
import numpy as np
import pytest

import mixjax
from mixjax import export
from mixjax.app import cli, evaluate, pipeline, plots, stages
from mixjax.app import config as config_lib

# Every run here compiles the same steps: share one compilation cache per module.
pytestmark = pytest.mark.usefixtures("compilation_cache")

TINY = [
    "--train-steps", "300", "--prune-steps", "100", "--qat-steps", "100", "--steps-per-call", "50",
    "--checkpoint-every", "50", "--model", "lenet300100", "--quiet",
]  # fmt: skip
KEYS = {
    "task": str,
    "accuracy_float": float,
    "accuracy_pruned": float,
    "accuracy_compressed": float,
    "accuracy_integer": float,
    "bytes_dense": int,
    "bytes_compressed": int,
    "compression_ratio": float,
    "train_steps_per_second": float,
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
}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    assert cli.main(["run", "--output", out, *TINY]) == 0
    with open(os.path.join(out, pipeline.REPORT)) as f:
        return out, json.load(f)


def _error(capsys, argv, match):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mixjax: error: "), lines[0]
    assert match in lines[0], lines[0]
    assert "Traceback" not in captured.err


def test_run_writes_report_artifact_plots_and_checkpoints(full_run, capsys):
    out, report = full_run
    for key, typ in KEYS.items():
        assert isinstance(report[key], typ), (key, report[key])
    for key in ("accuracy_float", "accuracy_compressed", "accuracy_integer"):
        assert 0.5 < report[key] <= 1.0, (key, report[key])  # chance is 0.1
    assert abs(report["accuracy_integer"] - report["accuracy_compressed"]) <= 0.02
    assert report["compression_ratio"] == pytest.approx(
        report["bytes_dense"] / report["bytes_compressed"]
    )
    assert report["bytes_dense"] == 4 * 50_610  # LeNet-300-100 on 8x8x1 inputs, 10 classes
    artifact = export.load(os.path.join(out, pipeline.ARTIFACT))
    assert artifact.nbytes == report["bytes_compressed"]
    assert artifact.metadata["model"] == "lenet300100"
    assert [row["path"] for row in report["layers"]] == artifact.paths
    rows = {row["path"]: row for row in report["layers"]}
    assert rows["Dense_0/kernel"]["sparsity"] == pytest.approx(0.95, abs=1e-3)
    assert rows["Dense_0/kernel"]["clusters"] <= 16
    assert [s["stage"] for s in report["stages"]] == ["dense", "pruned", "compressed", "integer"]
    assert {len(h) for h in report["history"].values()} == {300, 100}
    assert report["config"] == config_lib.as_dict(
        config_lib.override(
            config_lib.defaults("image", "lenet300100"),
            {
                "train.steps": 300,
                "compress.prune_steps": 100,
                "compress.qat_steps": 100,
                "train.steps_per_call": 50,
                "run.checkpoint_every": 50,
                "train.model": "lenet300100",
                "run.output": out,
            },
        )
    )
    assert report["task"] == "image" and report["plots"] == list(plots.files("accuracy"))
    for name in (*report["plots"], pipeline.REPORT, pipeline.ARTIFACT):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for name in report["plots"]:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for stage in stages.STAGES:
        assert os.listdir(os.path.join(out, "checkpoints", stage))


def test_interrupted_and_resumed_run_matches_uninterrupted(full_run, tmp_path, capsys):
    # Stopped inside the prune stage (the float stage done): resumes across a stage boundary
    # and within a stage. The persistent cache makes these two runs cheap.
    out, report = full_run
    argv = ["run", "--output", str(tmp_path), *TINY]
    assert cli.main([*argv, "--stop-after", "350"]) == 0
    assert "stopped after 350 steps; continue with --resume" in capsys.readouterr().err
    assert not (tmp_path / pipeline.REPORT).exists()
    # The prune stage's only checkpoint is damaged: the resume says so and redoes that stage.
    latest = tmp_path / "checkpoints" / "prune" / "50"
    (latest / "manifest" / "metadata").write_text("{")
    assert cli.main([*argv, "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"mixjax: warning: mixjax.checkpoint.restore: checkpoint '{latest}' is damaged" in (
        captured.err
    )
    text = captured.out
    assert "| compressed |" in text and "smaller than float32" in text
    with open(tmp_path / pipeline.REPORT) as f:
        resumed = json.load(f)
    assert resumed["history"] == report["history"]  # every step's loss and accuracy
    for key in ("accuracy_float", "accuracy_pruned", "accuracy_compressed", "accuracy_integer"):
        assert resumed[key] == report[key], key
    assert resumed["resumes"] == [{"changed": {}, "quiet": True, "stop_after": None}]
    assert report["resumes"] == []
    with (
        open(tmp_path / pipeline.ARTIFACT, "rb") as a,
        open(f"{out}/{pipeline.ARTIFACT}", "rb") as b,
    ):
        assert a.read() == b.read()


def test_report_and_eval_commands(full_run, capsys):
    out, report = full_run
    path = os.path.join(out, pipeline.ARTIFACT)
    assert cli.main(["report", path]) == 0
    text = capsys.readouterr().out
    assert "model lenet300100, 10 classes" in text and "| Dense_0/kernel |" in text
    assert "**file** (compact)" in text
    assert cli.main(["report", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == report["layers"]
    assert cli.main(["eval", path, "--data", "digits", "--split", "test"]) == 0
    lines = dict(line.split(": ") for line in capsys.readouterr().out.splitlines() if ": " in line)
    assert lines["accuracy_integer"] == f"{100 * report['accuracy_integer']:.2f}%"
    assert lines["accuracy_compressed"] == f"{100 * report['accuracy_compressed']:.2f}%"


def test_help_documents_every_option_with_its_default(capsys):
    assert cli.main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for key, field in config_lib.options():
        assert field.metadata["flag"] in text, key
        lm = config_lib.LM_DEFAULTS.get(key)
        default = (
            f"{field.default}"
            if lm is None or key == "data.task"
            else f"{field.default}; --task lm: {lm}"
        )
        for model, recipe in config_lib.MODEL_DEFAULTS.items():
            if key in recipe:
                default += f"; --model {model}: {recipe[key]}"
        assert f"(default: {default}; TOML: {key})" in text, key
    for flag in ("--config", "--resume", "--stop-after", "--quiet"):
        assert flag in text


def test_config_file_then_options(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 100\nsteps_per_call = 10\n[data]\ndataset = "npz:x.npz"\n')
    args = cli.build_parser().parse_args(["run", "--config", str(path), "--train-steps", "200"])
    cfg = cli._config(args)
    assert (cfg.train.steps, cfg.train.steps_per_call) == (200, 10)
    assert cfg.data.dataset == "npz:x.npz"
    assert cfg.compress == config_lib.Compress()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["run", "--train-steps", "abc"], "argument --train-steps: invalid int value: 'abc'"),
        (["run", "--model", "vgg"], "argument --model: invalid choice: 'vgg'"),
        (["run", "--train-steps", "7"], "train.steps (--train-steps) must be a positive multiple"),
        (["run", "--sparsity", "1.5"], "compress.sparsity (--sparsity) must be in [0, 1)"),
        (
            ["run", "--devices", "3", "--batch-size", "96", "--compress-batch-size", "64"],
            "compress.batch_size (--compress-batch-size) must be divisible by devices=3, got 64",
        ),
        (["run", "--batch-size", "0"], "data.batch_size (--batch-size) must be >= 1, got 0"),
        (["run", "--stop-after", "0"], "--stop-after: must be >= 1"),
        (
            ["run", "--config", "/no/such/run.toml"],
            "config file '/no/such/run.toml' does not exist",
        ),
        (["bogus"], "invalid choice: 'bogus'"),
        ([], "the following arguments are required: COMMAND"),
        (["report", "/no/such/model.mjx"], "No such file or directory"),
    ],
)
def test_command_line_errors(capsys, argv, match):
    _error(capsys, argv, match)


def test_data_and_file_errors(tmp_path, capsys):
    out = ["--output", str(tmp_path / "out"), *TINY]
    _error(capsys, ["run", "--dataset", "no_such_dataset_xyz", *out], "no TFDS dataset")
    _error(capsys, ["run", "--dataset", "idx:/no/such/dir", *out], "does not exist")
    _error(capsys, ["run", "--dataset", "foo:bar", *out], "unknown source scheme 'foo'")
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nstepz = 5\n")
    _error(capsys, ["run", "--config", str(toml)], "unknown key 'train.stepz'")
    toml.write_text("[train\nsteps = 5\n")
    _error(capsys, ["run", "--config", str(toml)], "is not valid TOML")
    toml.write_text("steps = 5\n")
    _error(capsys, ["run", "--config", str(toml)], "unknown key 'steps'")
    toml.write_text("[train]\nsteps = 'many'\n")
    _error(capsys, ["run", "--config", str(toml)], "train.steps must be an int, got 'many'")
    junk = tmp_path / "junk.mjx"
    junk.write_bytes(b"not an artifact")
    _error(capsys, ["report", str(junk)], "mixjax.export.load")
    _error(capsys, ["eval", str(junk)], "mixjax.export.load")


def test_eval_rejects_artifact_without_metadata(tmp_path, capsys):
    params = {"Dense_0": {"kernel": np.ones((4, 2), np.float32)}}
    path = export.save(export.compress(params, mixjax.identity(), ()), tmp_path / "a.mjx")
    _error(capsys, ["eval", path], "has no ['model', 'num_classes', 'activations'] metadata")


@pytest.mark.parametrize("container", export.CONTAINERS)
def test_artifact_metadata_round_trip(tmp_path, container):
    params = {"Dense_0": {"kernel": np.ones((4, 2), np.float32)}}
    artifact = export.compress(params, mixjax.identity(), (), container=container)
    meta = {"model": "lenet5", "ranges": {"Dense_0": [-1.0, 2.0]}}
    path = export.save(dataclasses.replace(artifact, metadata=meta), tmp_path / "a.mjx")
    assert export.load(path).metadata == meta
    assert export.load(export.save(artifact, tmp_path / "b.mjx")).metadata == {}
    assert artifact.nbytes < export.load(path).nbytes


def test_load_rejects_metadata_that_is_not_an_object(tmp_path):
    manifest = {
        "format": export.artifact.FORMAT,
        "version": 1,
        "leaves": [],
        "arrays": [],
        "metadata": [1],
    }
    head = zlib.compress(json.dumps(manifest).encode())
    body = export.artifact.MAGIC + struct.pack("<I", len(head)) + head
    path = tmp_path / "bad.mjx"
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(ValueError, match=r"bad\.mjx'.*metadata must be a JSON object, got list"):
        export.load(path)


MODEL_RUN = [
    "--train-steps", "20", "--prune-steps", "20", "--qat-steps", "20", "--steps-per-call", "10",
    "--checkpoint-every", "10", "--batch-size", "16", "--compress-batch-size", "16", "--quiet",
]  # fmt: skip
NEW_MODELS = [
    ("resnet20", {"width": 2}),
    ("vit_tiny", {"width": 16, "depth": 1, "heads": 2, "patch_size": 4}),
]


@pytest.mark.slow  # about a minute each on 2 CPU cores (compiling ResNet-20 / the ViT thrice)
@pytest.mark.parametrize(("model", "sizes"), NEW_MODELS)
def test_resnet_and_vit_runs_carry_their_model_state_into_the_artifact_and_eval(
    tmp_path, capsys, model, sizes
):
    out = tmp_path / "out"
    flags = [arg for k, v in sizes.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
    assert cli.main(["run", "--model", model, *flags, "--output", str(out), *MODEL_RUN]) == 0
    with open(out / pipeline.REPORT) as f:
        report = json.load(f)
    path = str(out / pipeline.ARTIFACT)
    artifact = export.load(path)
    assert (artifact.metadata["model"], artifact.metadata["sizes"]) == (model, sizes)
    module = mixjax.models.create(model, 10, **sizes)
    images = mixjax.data.load("digits", "test").images[:64]
    x = mixjax.data.normalize(images)
    initial = dict(module.init(jax.random.key(0), x[:1]))
    initial.pop("params")
    state = artifact.model_state()
    assert jax.tree.structure(state) == jax.tree.structure(initial)  # batch_stats, or nothing
    params = artifact.params()
    expected = module.apply({"params": params, **state}, x)
    fns = evaluate.forwards(artifact)
    np.testing.assert_allclose(fns["float"](images), expected, rtol=1e-4, atol=1e-4)
    if model == "resnet20":
        # Trained statistics, the ones the evaluation runs with (the initial ones differ).
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state, initial)
        assert all(jax.tree.leaves(moved))
        assert not np.allclose(module.apply({"params": params, **initial}, x), expected)
    assert cli.main(["eval", path, "--data", "digits", "--split", "test"]) == 0
    lines = dict(line.split(": ") for line in capsys.readouterr().out.splitlines() if ": " in line)
    assert lines["accuracy_compressed"] == f"{100 * report['accuracy_compressed']:.2f}%"
    assert lines["accuracy_integer"] == f"{100 * report['accuracy_integer']:.2f}%"
