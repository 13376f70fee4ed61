"""Tests of mixjax.app.rundir: nothing of the user's in an output directory is ever deleted or
replaced, and a resume never mixes configurations."""

import json
import os
import re

import pytest

from mixjax.app import config as config_lib
from mixjax.app import rundir

OUTPUTS = ["model.mjx", "report.json", "training.png", "checkpoints/float", "checkpoints/qat"]


def cfg(**changes):
    return config_lib.override(config_lib.Config(), changes)


def prepare(out, config=None, **kwargs):
    kwargs = {"resume": False, "overwrite": False, **kwargs}
    return rundir.prepare(str(out), config or cfg(), OUTPUTS, **kwargs)


def fake_outputs(out):
    """What a run writes: a file for each output, a checkpoint step in each stage directory."""
    for relative in OUTPUTS:
        path = out / relative
        if relative.startswith("checkpoints/"):
            (path / "50").mkdir(parents=True)
            (path / "50" / "data").write_text("x")
        else:
            path.write_text("x")


def test_a_new_run_writes_its_run_file_before_any_output(tmp_path):
    out = tmp_path / "new"
    run = prepare(out)
    assert sorted(os.listdir(out)) == [rundir.RUN_FILE]
    with open(out / rundir.RUN_FILE) as f:
        assert json.load(f) == run
    assert run["owned"] == OUTPUTS and run["config"] == config_lib.as_dict(cfg())
    prepare(tmp_path / "empty")  # an existing empty directory is a new run too
    (tmp_path / "empty2").mkdir()
    prepare(tmp_path / "empty2")


def test_a_non_empty_directory_is_refused_without_resume_or_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        ValueError,
        match=re.escape(f"--output {str(tmp_path)!r} is not empty (notes.txt); pass --resume"),
    ):
        prepare(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    # A finished (or interrupted) run is refused the same way: its checkpoints are kept.
    other = tmp_path / "run"
    prepare(other)
    fake_outputs(other)
    with pytest.raises(ValueError, match="is not empty"):
        prepare(other)
    assert (other / "checkpoints" / "float" / "50" / "data").exists()


def test_overwrite_removes_only_what_the_run_wrote(tmp_path):
    prepare(tmp_path)
    fake_outputs(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoints" / "README").write_text("mine too")
    run = prepare(tmp_path, cfg(**{"run.seed": 3}), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", rundir.RUN_FILE, "notes.txt"]
    assert os.listdir(tmp_path / "checkpoints") == ["README"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert run["config"]["run"]["seed"] == 3 and "resumes" not in run


def test_overwrite_refuses_a_file_of_the_users_at_an_output_path(tmp_path):
    (tmp_path / "report.json").write_text("my own report")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"--overwrite: {str(tmp_path / 'report.json')!r} exists but mixjax did not write it"
        ),
    ):
        prepare(tmp_path, overwrite=True)
    assert (tmp_path / "report.json").read_text() == "my own report"
    assert not (tmp_path / rundir.RUN_FILE).exists()


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        prepare(tmp_path, resume=True, overwrite=True)


def test_resume_with_the_same_configuration_records_the_resume(tmp_path):
    prepare(tmp_path)
    fake_outputs(tmp_path)
    changed = cfg(**{"run.checkpoint_every": 100, "run.output": "elsewhere/../same"})
    run = prepare(tmp_path, changed, resume=True, extras={"quiet": True})
    assert run["resumes"] == [
        {
            "changed": {
                "run.checkpoint_every": [500, 100],
                "run.output": ["mixjax-run", "elsewhere/../same"],
            },
            "quiet": True,
        }
    ]
    assert (tmp_path / "checkpoints" / "float" / "50" / "data").exists()
    again = prepare(tmp_path, changed, resume=True)
    assert len(again["resumes"]) == 2 and again["resumes"][1]["changed"] == {}


def test_resume_with_another_configuration_lists_the_differing_keys(tmp_path):
    prepare(tmp_path)
    changed = cfg(**{"run.seed": 1, "compress.prune_lr": 0.01, "compress.sparsity": 0.9})
    with pytest.raises(ValueError, match="holds a run with another configuration") as err:
        prepare(tmp_path, changed, resume=True)
    message = str(err.value)
    for text in (
        "compress.prune_lr: 0.001 in the run, 0.01 now",
        "compress.sparsity: 0.95 in the run, 0.9 now",
        "run.seed: 0 in the run, 1 now",
    ):
        assert text in message
    with open(tmp_path / rundir.RUN_FILE) as f:
        assert "resumes" not in json.load(f)  # nothing recorded for a refused resume


def test_resume_on_an_empty_directory_says_it_starts_fresh(tmp_path):
    said = []
    run = prepare(tmp_path / "new", resume=True, log=said.append)
    assert said == [f"--resume: {str(tmp_path / 'new')!r} holds no run yet; starting a new one"]
    assert run["owned"] == OUTPUTS


def test_resume_refuses_a_directory_that_holds_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"holds files but no {re.escape(rundir.RUN_FILE)}"):
        prepare(tmp_path, resume=True)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "cannot be read"),
        ('{"format": "mixjax.run", "version": 9}', "is not a mixjax run file of version 1"),
        ('["a list"]', "is not a mixjax run file"),
    ],
)
def test_a_damaged_run_file_is_an_error_naming_it(tmp_path, content, match):
    (tmp_path / rundir.RUN_FILE).write_text(content)
    for kwargs in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(ValueError, match=re.escape(rundir.RUN_FILE) + ".*" + match):
            prepare(tmp_path, **kwargs)


def test_a_run_file_cannot_make_overwrite_delete_outside_the_directory(tmp_path):
    out = tmp_path / "out"
    prepare(out)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    with open(out / rundir.RUN_FILE) as f:
        run = json.load(f)
    run["owned"] = ["../precious.txt"]
    (out / rundir.RUN_FILE).write_text(json.dumps(run))
    with pytest.raises(ValueError, match=r"lists '\.\./precious\.txt', which is not inside"):
        prepare(out, overwrite=True)
    assert victim.read_text() == "keep me"


def test_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        prepare(tmp_path / "file")


def test_write_json_leaves_no_half_file(tmp_path):
    path = str(tmp_path / "a.json")
    rundir.write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        rundir.write_json(path, {"a": object()})  # fails while writing
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert os.listdir(tmp_path) == ["a.json"]  # no temporary file left
