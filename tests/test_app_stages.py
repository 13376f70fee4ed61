"""Tests of mixjax.app.stages: one stage of ``mixjax run``, and the checks before it starts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixjax import core, data, models, quant, train
from mixjax.app import config as config_lib
from mixjax.app import stages


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
    rng = np.random.default_rng(0)
    dataset = data.Dataset(
        rng.integers(0, 255, (32, 8, 8, 1)).astype(np.uint8),
        rng.integers(0, 3, 32).astype(np.int32),
        3,
        "tiny",
    )
    return stages.Run(cfg, dataset, dataset, jax.random.key(0), None, False, False, True, None)


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
    assert 0.0 <= result.accuracy <= 1.0 and result.seconds > 0


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
