"""End-to-end tests of ``mixjax run --task lm`` (:mod:`mixjax.app.lm`) on a synthetic text.

The corpus is written into ``tmp_path``: sentences of a dozen words drawn with a fixed seed, so
a one-layer GPT learns it in a hundred steps; no test reads a real corpus.
"""

from __future__ import annotations

import json
import math
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import export, layout, models, select
from mixjax.app import cli, common, lm, pipeline, plots

SIZES = ["--width", "32", "--heads", "1", "--depth", "1", "--context", "16"]
# Every run here compiles the same steps: share one compilation cache per module.
pytestmark = pytest.mark.usefixtures("compilation_cache")

TINY = [
    "--task", "lm", "--train-steps", "100", "--prune-steps", "50", "--steps-per-call", "50",
    "--checkpoint-every", "50", *SIZES, "--quiet",
]  # fmt: skip
KEYS = [
    *(f"{metric}_{name}" for metric in ("val_loss", "perplexity") for name in (
        "float", "pruned", "int8", "compressed"
    )),
    "bytes_dense", "bytes_compressed", "compression_ratio", "train_steps_per_second",
    "stages", "layers", "history", "config", "timings_s", "environment", "plots", "vocab_size",
]  # fmt: skip


WORDS = "the cat dog sat ran on a mat log big small red blue and".split()
VOCAB = len(set(" ".join(WORDS) + ".\n"))


def write_text(path, characters=20_000, seed=0):
    r = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < characters:
        lines.append(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 9))) + ".\n")
    path.write_text("".join(lines))
    return f"text:{path}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_text(tmp_path_factory.mktemp("text") / "corpus.txt")


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, corpus):
    out = str(tmp_path_factory.mktemp("lm") / "out")
    assert cli.main(["run", "--dataset", corpus, "--output", out, *TINY]) == 0
    with open(os.path.join(out, pipeline.REPORT)) as f:
        return out, json.load(f)


def test_lm_run_reports_loss_perplexity_and_bytes(lm_run, capsys):
    out, report = lm_run
    assert [k for k in KEYS if k not in report] == []
    assert report["task"] == "lm" and report["vocab_size"] == VOCAB
    names = ("float", "pruned", "int8", "compressed")
    for name in names:
        loss = report[f"val_loss_{name}"]
        assert math.isfinite(loss) and 0 < loss < math.log(VOCAB), (name, loss)  # < uniform
        assert report[f"perplexity_{name}"] == pytest.approx(math.exp(loss))
    # Quantizing the pruned weights (int8; int4 in groups of 32) barely moves the loss.
    assert abs(report["val_loss_int8"] - report["val_loss_pruned"]) < 0.01
    assert abs(report["val_loss_compressed"] - report["val_loss_pruned"]) < 0.05
    assert abs(report["val_loss_compressed"] - report["val_loss_float"]) < 0.3
    sizes = [s["bytes"] for s in report["stages"]]
    assert [s["stage"] for s in report["stages"]] == ["dense", *names[1:]]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4  # each step smaller
    assert sizes[0] == report["bytes_dense"] and sizes[-1] == report["bytes_compressed"]
    assert report["compression_ratio"] == pytest.approx(sizes[0] / sizes[-1])
    assert report["compression_ratio"] > 3
    assert {len(h) for h in report["history"].values()} == {100, 50}


def test_lm_artifact_is_2_4_sparse_int4_with_dense_embeddings(lm_run):
    out, report = lm_run
    artifact = export.load(os.path.join(out, pipeline.ARTIFACT))
    assert artifact.nbytes == report["bytes_compressed"]
    meta = artifact.metadata
    assert (meta["task"], meta["model"], len(meta["vocab"])) == ("lm", "gpt_tiny", VOCAB)
    assert meta["sizes"] == {"width": 32, "depth": 1, "heads": 1, "context": 16}
    assert meta["quantization"] == {"bits": 4, "group_size": lm.GROUP_SIZE, "weights_only": True}
    rows = {row["path"]: row for row in report["layers"]}
    kernels = [p for p in rows if p.endswith("/kernel")]
    assert len(kernels) == 6  # query, key, value, out, mlp_in, mlp_out
    params = artifact.params()
    module = models.create("gpt_tiny", VOCAB, **meta["sizes"])
    tokens = jnp.zeros((2, 16), jnp.int32)
    layouts = layout.by_path(
        "test", params, layout.learn(common.forward(module, {}), params, tokens)
    )
    for path, leaf in select.leaves_with_paths(params):
        if path in kernels:  # 2 of every 4 along the contraction axes kept (some round to 0)
            view = np.asarray(layout.to_matrix(jnp.asarray(leaf), layouts[path]))
            kept = (view.reshape(*view.shape[:-2], -1, 4, view.shape[-1]) != 0).sum(axis=-2)
            assert kept.max() <= 2 and 0.5 <= rows[path]["sparsity"] < 0.55, path
    for table in ("token_embed", "pos_embed"):
        assert rows[f"{table}/embedding"]["sparsity"] < 0.01, table
    for name in (*plots.files("val_loss"), pipeline.REPORT):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == list(lm.STAGES)


def test_interrupted_and_resumed_lm_run_matches_uninterrupted(lm_run, corpus, tmp_path, capsys):
    out, report = lm_run
    argv = ["run", "--dataset", corpus, "--output", str(tmp_path), *TINY]
    assert cli.main([*argv, "--stop-after", "50"]) == 0
    assert "stopped after 50 steps" in capsys.readouterr().err
    assert cli.main([*argv, "--resume"]) == 0
    with open(tmp_path / pipeline.REPORT) as f:
        resumed = json.load(f)
    assert resumed["history"] == report["history"]
    assert resumed["val_loss_compressed"] == report["val_loss_compressed"]
    with (
        open(tmp_path / pipeline.ARTIFACT, "rb") as a,
        open(f"{out}/{pipeline.ARTIFACT}", "rb") as b,
    ):
        assert a.read() == b.read()


def test_eval_says_it_does_not_evaluate_language_models(lm_run, capsys):
    out, _ = lm_run
    path = os.path.join(out, pipeline.ARTIFACT)
    assert cli.main(["eval", path, "--data", "digits"]) == 2
    err = capsys.readouterr().err
    assert f"mixjax: error: {path!r} holds a language model; `mixjax eval` evaluates image" in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["--task", "lm", "--dataset", "text:x.txt", "--model", "lenet5"],
            "train.model (--model) must be a language model (gpt_tiny), got 'lenet5'",
        ),
        (["--task", "lm"], "data.dataset (--dataset) must be 'text:FILE' for --task lm"),
        (
            ["--dataset", "text:x.txt"],
            "data.dataset (--dataset) must be an image dataset for --task image",
        ),
        (["--model", "gpt_tiny"], "train.model (--model) must be an image model"),
        (
            ["--task", "lm", "--dataset", "text:x.txt", "--sparsity", "0.5"],
            "compress.sparsity (--sparsity) must be left at its default 0.95 with --task lm",
        ),
        (["--model", "lenet5", "--width", "8"], "model.width (--width) must be unset for model"),
    ],
)
def test_bad_combinations(capsys, argv, match):
    assert cli.main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixjax: error: ") and match in err, err


def test_sizes_that_int4_groups_cannot_divide_fail_before_training(tmp_path, capsys):
    source = write_text(tmp_path / "corpus.txt", characters=3000)
    out = tmp_path / "out"
    argv = ["run", "--dataset", source, "--output", str(out), *TINY, "--width", "48"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "mixjax.app.lm: --task lm quantizes to int4 in groups of 32" in err, err
    assert not out.exists()  # nothing written
