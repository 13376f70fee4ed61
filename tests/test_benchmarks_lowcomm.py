"""benchmarks/lowcomm.py: its goal arithmetic and outer optimizers (fast), and a quick run of the
LeNet-5 part end to end on 2 forced devices (slow: about 30 s on 2 CPU cores)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import optax
import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "lowcomm.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmarks_lowcomm", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(method, loss, sent, replicas=4, bits=None):
    return {
        "model": "m",
        "method": method,
        "replicas": replicas,
        "val_loss": loss,
        "bytes_per_replica": sent,
        "bits": bits,
    }


def test_goals_compare_each_row_with_sync(bench):
    rows = [
        row("sync", 2.0, 1000, replicas=None),
        row("DiLoCo H=10", 2.02, 100),  # 1 % worse, 10x fewer: below the byte goal
        row("DiLoCo H=100", 2.05, 10),  # 2.5 %, 100x: met
        row("DiLoCo H=100 +int4", 2.05, 2, bits=4),  # 500x >= 400x: met
        row("stream", 2.08, 10),  # 4 %: missed
    ]
    goals = {g["method"]: g for g in bench.goals(rows)}
    assert len(goals) == len(rows) - 1  # every row but sync
    assert goals["DiLoCo H=10"]["fewer_bytes"] == pytest.approx(10.0)
    assert not goals["DiLoCo H=10"]["met"]
    assert goals["DiLoCo H=100"]["loss_gap"] == pytest.approx(0.025)
    assert goals["DiLoCo H=100"]["met"]
    assert goals["DiLoCo H=100 +int4"]["bytes_goal"] == 400.0
    assert goals["DiLoCo H=100 +int4"]["met"]
    assert not goals["stream"]["met"]


def test_outer_optimizers_are_nesterov_sgd_or_plain_sgd(bench):
    grads, params = {"w": np.ones(3, np.float32)}, {"w": np.zeros(3, np.float32)}
    for outer, reference in [
        (bench.Outer(), optax.sgd(0.7, momentum=0.9, nesterov=True)),
        (bench.Outer(1.0, 0.0), optax.sgd(1.0)),
    ]:
        tx = outer.tx()
        mine, _ = tx.update(grads, tx.init(params), params)
        theirs, _ = reference.update(grads, reference.init(params), params)
        np.testing.assert_array_equal(mine["w"], theirs["w"])
    assert bench.Outer().suffix() == ""
    assert bench.Outer(1.0, 0.0).suffix() == " outer 1/0"


@pytest.mark.slow
def test_quick_lenet_run_writes_its_rows(tmp_path):
    out = tmp_path / "lowcomm.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    command = [sys.executable, str(PATH), "--quick", "--models", "lenet5", "--replicas", "2"]
    command += ["--methods", "DiLoCo H=10,DiLoCo H=100 +int4", "--outer", "0.7:0.9,1:0"]
    subprocess.run([*command, "--out", str(out)], check=True, env=env, timeout=600)
    result = json.loads(out.read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods == [
        "sync",
        "DiLoCo H=10",
        "DiLoCo H=10 outer 1/0",
        "DiLoCo H=100 +int4",
        "DiLoCo H=100 +int4 outer 1/0",
    ]
    sync, h10 = result["rows"][0], result["rows"][1]
    assert sync["bytes_per_replica"] == 10 * h10["bytes_per_replica"]  # 200 steps, 20 syncs
    assert all(np.isfinite(r["val_loss"]) and r["accuracy"] > 50 for r in result["rows"])
    assert (tmp_path / "lowcomm.png").stat().st_size > 0
