"""Tests of mixjax.app.stages: one stage of ``mixjax run``, and the checks before it starts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import core, data, models, quant, train
from mixjax.app import config as config_lib
from mixjax.app import stages


def tiny_dataset():
    rng = np.random.default_rng(0)
    return data.Dataset(
        rng.integers(0, 255, (32, 8, 8, 1)).astype(np.uint8),
        rng.integers(0, 3, 32).astype(np.int32),
        3,
        "tiny",
    )


def tiny_run(tmp_path, **changes):
    cfg = config_lib.override(
        config_lib.Config(),
        {
            "train.steps": 4,
            "train.steps_per_call": 2,
            "run.checkpoint_every": 2,
            "run.output": str(tmp_path),
            **changes,
        },
    )
    dataset = tiny_dataset()
    task = stages.image_task(dataset, dataset)
    return stages.Run(cfg, task, jax.random.key(0), None, False, False, True, None)


def tiny_stage(model):
    return stages.Stage(
        "float", 4, 0, 8, train.linen_apply(model), optax.sgd(0.1), core.identity(), None
    )


def test_a_stage_trains_checkpoints_and_evaluates(tmp_path):
    model = models.create("lenet300100", 3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    result = stages.run_stage(tiny_run(tmp_path), tiny_stage(model), params)
    assert int(result.state.step) == 4
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "float").iterdir()) == ["2", "4"]
    assert set(result.scores) == {"loss", "accuracy"}
    assert 0.0 <= result.scores["accuracy"] <= 1.0 and result.seconds > 0


def test_non_finite_parameters_stop_a_stage_before_it_starts(tmp_path):
    """The jitted initial state cannot check values (fake_quant's init sees tracers), so the
    stage checks the concrete parameters first."""
    model = models.create("lenet300100", 3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    stage = tiny_stage(model)._replace(name="qat", transform=quant.fake_quant(8))
    with pytest.raises(
        ValueError,
        match=r"mixjax.app.pipeline: the qat stage starts from non-finite parameters: leaf "
        r"'Dense_1/kernel' \(300, 100\) float32 holds 1 NaN/Inf values",
    ):
        stages.run_stage(tiny_run(tmp_path), stage, params)
    # What the check stands in for: init rejects NaN where it sees values, not under jit.
    with pytest.raises(ValueError, match="holds 1 non-finite values"):
        quant.fake_quant(8).init(params)
    jax.jit(quant.fake_quant(8).init)(params)


def _params(model):
    return model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]


def _same(a, b):
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(bool(jnp.array_equal(x, y)) for x, y in pairs)


def test_history_is_committed_with_its_checkpoint(tmp_path, monkeypatch):
    """A kill right after a checkpoint (before anything else is written) loses no history: the
    checkpoint holds it. Before, the history was a separate file written after the checkpoint,
    and a kill in between lost the steps up to it."""
    model = models.create("lenet300100", 3)
    whole = stages.run_stage(tiny_run(tmp_path / "whole"), tiny_stage(model), _params(model))
    save = stages.checkpoint.save

    def save_then_die(directory, state, *, step):
        save(directory, state, step=step)
        if step == 2:
            raise KeyboardInterrupt

    run = tiny_run(tmp_path / "killed")
    monkeypatch.setattr(stages.checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(run, tiny_stage(model), _params(model))
    monkeypatch.setattr(stages.checkpoint, "save", save)
    resumed = stages.run_stage(run._replace(resume=True), tiny_stage(model), _params(model))
    assert resumed.history == whole.history
    assert _same(resumed.state.params, whole.state.params)


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_used(tmp_path, capsys):
    model = models.create("lenet300100", 3)
    run = tiny_run(tmp_path)
    whole = stages.run_stage(run, tiny_stage(model), _params(model))
    directory = tmp_path / "checkpoints" / "float"
    (directory / "4" / "manifest" / "metadata").write_text('{"format": 1, "leaves": [{"pa')
    capsys.readouterr()
    resumed = stages.run_stage(run._replace(resume=True), tiny_stage(model), _params(model))
    err = capsys.readouterr().err
    assert (
        f"mixjax: warning: mixjax.checkpoint.restore: checkpoint '{directory / '4'}' is damaged"
        in err
    )
    assert f"moved it to '{directory / '4.damaged'}'" in err
    # Steps 3 and 4 ran again from checkpoint 2: the same result, and a new checkpoint 4.
    assert resumed.history == whole.history
    assert _same(resumed.state.params, whole.state.params)
    assert sorted(p.name for p in directory.iterdir()) == ["2", "4", "4.damaged"]


def test_a_non_finite_loss_stops_the_stage_before_a_checkpoint_holds_it(tmp_path):
    """One NaN pixel makes the loss NaN from the step that draws it: the stage stops there,
    naming the step, and every checkpoint written holds only steps before it."""
    model = models.create("lenet300100", 3)
    run = tiny_run(tmp_path)
    clean = tiny_dataset()
    images = clean.images.astype(np.float32)
    images[5, 2, 3, 0] = np.nan
    run = run._replace(task=stages.image_task(clean._replace(images=images), clean))
    with pytest.raises(
        ValueError, match=r"the float stage diverged: training loss nan at step (\d)"
    ) as err:
        stages.run_stage(run, tiny_stage(model), _params(model))
    step = int(re.search(r"at step (\d)", str(err.value)).group(1))
    directory = tmp_path / "checkpoints" / "float"
    written = sorted(int(p.name) for p in directory.iterdir()) if directory.exists() else []
    assert all(s < step for s in written), (written, step)
    if written:
        assert f"the last is step {written[-1]}" in str(err.value)
    else:
        assert "none was written" in str(err.value)


def test_batch_statistics_train_checkpoint_and_resume_with_the_stage(tmp_path):
    model = models.create("resnet20", 3, width=2)
    variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    params = variables.pop("params")
    stage = tiny_stage(model)._replace(apply_fn=train.linen_apply(model, train_kwarg="train"))
    run = tiny_run(tmp_path)
    result = stages.run_stage(run, stage, params, variables)
    stats = result.state.model_state["batch_stats"]
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
    assert not _same(stats, variables["batch_stats"])  # the running averages moved
    # A resumed stage restores them from its last checkpoint (step 4: nothing left to train).
    resumed = stages.run_stage(run._replace(resume=True), stage, params, variables)
    assert _same(resumed.state.model_state, result.state.model_state)
    assert resumed.scores == result.scores


def test_text_task_batches_and_scores_every_validation_target_once(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(np.random.default_rng(0).choice(list("abcde"), 1500)))
    train_set, val_set = (data.load_text(f"text:{path}", s) for s in ("train", "val"))
    task = stages.text_task(train_set, val_set, context=8)
    group = next(task.batches(4, 3, 0))
    assert group["tokens"].shape == group["label"].shape == (3, 4, 8)
    np.testing.assert_array_equal(group["label"][..., :-1], group["tokens"][..., 1:])
    assert task.preprocess is None and task.held_out == "val"

    def evaluate(state, batch):  # the weighted means an eval step returns: mean label, 1/2
        w = batch["weight"]
        return {"loss": (batch["label"] * w).sum() / w.sum(), "accuracy": jnp.float32(0.5)}

    scores = task.score(evaluate, None)
    expected = float(np.mean(val_set.tokens[1:]))  # every target once
    assert scores["loss"] == pytest.approx(expected, rel=1e-6)
    assert scores["accuracy"] == pytest.approx(0.5)
    assert scores["perplexity"] == pytest.approx(np.exp(expected), rel=1e-6)
