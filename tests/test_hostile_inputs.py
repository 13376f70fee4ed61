"""The guarantees a hostile or careless user relies on, end to end through the ``mixjax`` command.

Every case is a crafted file or argument set that once gave a traceback, a hang, a memory bomb, a
silently wrong run or a lost file; each must now end with one line ``mixjax: error: ...`` naming
the flag or file, exit status 2, and nothing of the user's touched. The crafted artifacts come
from :mod:`crafted` (written with valid checksums: a checksum is not a signature).
"""

from __future__ import annotations

import json
import os
import re

import crafted
import jax
import numpy as np
import pytest

from mixjax.app import cli, rundir

# A run that ends within seconds (the refusals below happen before it trains).
QUICK = [
    "--train-steps", "50", "--prune-steps", "50", "--qat-steps", "50", "--steps-per-call", "50",
    "--checkpoint-every", "50", "--model", "lenet300100", "--quiet",
]  # fmt: skip


def one_line_error(capsys, argv, *expected):
    """``mixjax ARGV`` exits 2 with one ``mixjax: error:`` line holding every ``expected``."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mixjax: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in captured.err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Flags: every number finite and in a range that cannot exhaust memory or alias.

FLAG_CASES = [
    (["--seed", str(2**64)], "run.seed (--seed) must be in 0..4294967295"),
    (["--seed", str(2**32)], "run.seed (--seed) must be in 0..4294967295"),
    (["--seed", "-1"], "run.seed (--seed) must be in 0..4294967295"),
    (["--tau", "1000000000"], "train.tau (--tau) must be in 0..1024 and shorter than every stage"),
    (["--tau", "50"], "train.tau (--tau) must be in 0..1024 and shorter than every stage (50"),
    (["--lr", "inf"], "train.lr (--lr) must be finite, got inf"),
    (["--lr", "nan"], "train.lr (--lr) must be finite, got nan"),
    (["--lam", "inf"], "train.lam (--lam) must be finite, got inf"),
    (["--prune-lr=-inf"], "compress.prune_lr (--prune-lr) must be finite"),
    (["--qat-lr", "nan"], "compress.qat_lr (--qat-lr) must be finite"),
    (["--weight-decay", "inf"], "train.weight_decay (--weight-decay) must be finite"),
    (["--degrees", "nan"], "data.degrees (--degrees) must be finite"),
    (["--sparsity", "nan"], "compress.sparsity (--sparsity) must be finite"),
    (["--stop-after", "0"], "--stop-after: must be >= 1"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
]


@pytest.mark.parametrize("flags, expected", FLAG_CASES, ids=[" ".join(f) for f, _ in FLAG_CASES])
def test_bad_flags(tmp_path, capsys, flags, expected):
    one_line_error(capsys, ["run", "--output", str(tmp_path / "out"), *QUICK, *flags], expected)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_a_toml_infinity_is_refused_naming_the_key(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("[train]\nlr = inf\n")
    one_line_error(
        capsys, ["run", "--config", str(config), "--output", str(tmp_path / "o")], "train.lr"
    )


# ----------------------------------------------------------------------------------------------
# The output directory: nothing of the user's is deleted or replaced.


def test_a_directory_holding_the_users_files_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    one_line_error(
        capsys, ["run", "--output", str(tmp_path), *QUICK], "is not empty (thesis.tex)", "--resume"
    )
    assert os.listdir(tmp_path) == ["thesis.tex"]


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    one_line_error(capsys, ["run", "--output", str(tmp_path / "out"), *QUICK], "not a directory")


def test_overwrite_refuses_the_users_file_at_an_output_path(tmp_path, capsys):
    (tmp_path / "model.mjx").write_text("my model")
    one_line_error(
        capsys,
        ["run", "--output", str(tmp_path), "--overwrite", *QUICK],
        "model.mjx",
        "mixjax did not write it",
    )
    assert (tmp_path / "model.mjx").read_text() == "my model"


def test_resume_refuses_a_directory_without_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    one_line_error(capsys, ["run", "--output", str(tmp_path), "--resume", *QUICK], "no mixjax run")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after its first stage (checkpointed), the way a kill would leave it."""
    out = tmp_path_factory.mktemp("stopped")
    assert cli.main(["run", "--output", str(out), *QUICK, "--stop-after", "50"]) == 0
    return out


def test_rerunning_an_interrupted_run_without_resume_keeps_its_checkpoints(stopped_run, capsys):
    before = sorted(os.listdir(stopped_run / "checkpoints" / "float"))
    assert before
    one_line_error(capsys, ["run", "--output", str(stopped_run), *QUICK], "is not empty")
    assert sorted(os.listdir(stopped_run / "checkpoints" / "float")) == before


def test_resume_with_another_configuration_is_refused_listing_the_keys(stopped_run, capsys):
    with open(stopped_run / rundir.RUN_FILE) as f:
        before = f.read()
    line = one_line_error(
        capsys,
        ["run", "--output", str(stopped_run), *QUICK, "--resume", "--seed", "1", "--lr", "0.01"],
        "holds a run with another configuration",
        "run.seed: 0 in the run, 1 now",
        "train.lr: 0.001 in the run, 0.01 now",  # lenet300100's recipe (MODEL_DEFAULTS)
    )
    assert "--overwrite" in line
    with open(stopped_run / rundir.RUN_FILE) as f:
        assert f.read() == before


def test_resume_on_an_empty_directory_starts_fresh_and_says_so(tmp_path, capsys):
    out = tmp_path / "new"
    argv = ["run", "--output", str(out), *QUICK, "--resume", "--stop-after", "50"]
    assert cli.main(argv) == 0
    assert "holds no run yet; starting a new one" not in capsys.readouterr().err  # --quiet
    argv = ["run", "--output", str(tmp_path / "new2"), *QUICK[:-1], "--resume", "--stop-after"]
    assert cli.main([*argv, "50"]) == 0
    assert "holds no run yet; starting a new one" in capsys.readouterr().err
    with open(tmp_path / "new2" / rundir.RUN_FILE) as f:
        assert json.load(f)["owned"]


# ----------------------------------------------------------------------------------------------
# Data: checked before it trains.


def _npz(path, images, labels):
    np.savez(path, images=images, labels=labels)
    return f"npz:{path}"


def test_a_dataset_with_an_absurd_label_is_refused_before_building_the_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 8, 8), dtype=np.uint8)
    labels = np.arange(40) % 10
    labels[7] = 2**31 - 1  # once: a 2**31-class model, and a hang
    source = _npz(tmp_path / "bad.npz", images, labels)
    one_line_error(
        capsys, ["run", "--dataset", source, "--output", str(tmp_path / "o"), *QUICK], "bad.npz"
    )
    assert not (tmp_path / "o").exists()


def test_a_dataset_with_a_nan_pixel_is_refused(tmp_path, capsys):
    images = np.random.default_rng(0).random((40, 8, 8)).astype(np.float32)
    images[3, 4, 5] = np.nan
    source = _npz(tmp_path / "nan.npz", images, np.arange(40) % 10)
    one_line_error(
        capsys, ["run", "--dataset", source, "--output", str(tmp_path / "o"), *QUICK], "nan.npz"
    )


def test_a_truncated_npz_is_an_error_naming_it(tmp_path, capsys):
    source = _npz(tmp_path / "cut.npz", np.zeros((40, 8, 8), np.uint8), np.arange(40) % 10)
    data = (tmp_path / "cut.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    one_line_error(
        capsys, ["run", "--dataset", source, "--output", str(tmp_path / "o"), *QUICK], "cut.npz"
    )


# ----------------------------------------------------------------------------------------------
# Artifacts: crafted files with valid checksums (a checksum is not a signature). The memory
# bombs are read under an address-space cap in tests/test_export_hostile.py.


@pytest.mark.parametrize("command", ["report", "eval"])
@pytest.mark.parametrize("craft", crafted.STRUCTURE, ids=lambda fn: fn.__name__)
def test_malformed_artifacts_are_one_line_naming_the_file(tmp_path, capsys, command, craft):
    jax.devices()  # any backend notice is printed now, not in the captured command
    capsys.readouterr()
    path = craft(str(tmp_path))
    line = one_line_error(capsys, [command, path], repr(str(path)))
    assert "\x1b" not in line


EVAL_CASES = {
    crafted.renamed_leaf: r"model 'small_cnn' \(10 classes, input \[8, 8, 1\]\) has a "
    r"parameter 'Dense_0/kernel' \(256, 10\); the artifact has none",
    crafted.wrong_num_classes: r"leaf 'Dense_0/bias' has shape \(10,\) in the artifact, "
    r"model 'small_cnn' \(7 classes, input \[8, 8, 1\]\) has \(7,\)",
    crafted.escaped_names: r"metadata 'model' must be one of \[.*\], got "
    r"'small_cnn\\x1b\[31m\\n\| forged",
}


@pytest.mark.parametrize("craft", list(EVAL_CASES), ids=lambda fn: fn.__name__)
def test_eval_of_an_artifact_that_does_not_fit_its_model(tmp_path, capsys, craft):
    """Once flax ScopeParamShapeError / ScopeParamNotFoundError tracebacks."""
    jax.devices()
    capsys.readouterr()
    path = craft(str(tmp_path))
    line = one_line_error(capsys, ["eval", path], repr(str(path)))
    assert re.search(r"mixjax\.app\.evaluate: " + EVAL_CASES[craft], line), line


def test_report_escapes_names_from_the_file(tmp_path, capsys):
    """A leaf or model name with ANSI escapes and a newline once forged table rows."""
    path = crafted.escaped_names(str(tmp_path))
    assert cli.main(["report", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 6, out  # the model line, 2 header lines, 1 leaf, 2 totals
    assert lines[0] == (
        r"model small_cnn\x1b[31m\n\| forged \| row \|\x1b[0m, 10\x1b[31m\n\| forged \| row "
        r"\|\x1b[0m classes, input [8]"
    )
    assert lines[3].startswith(r"| w\x1b[31m\n\| forged \| row \|\x1b[0m | 2 | array |")
