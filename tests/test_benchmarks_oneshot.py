"""benchmarks/oneshot.py: its goal arithmetic and parameter cache (fast), and a quick run of the
LeNet-5 part end to end (slow: about 40 s on 2 CPU cores)."""

import importlib.util
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "oneshot.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmarks_oneshot", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(variant, metric, seconds=1.0):
    return {"variant": variant, "metric": metric, "compress_s": seconds}


def test_goals_are_ratios_of_what_each_method_loses(bench):
    dense = np.log(10.0)  # perplexity 10
    rows = [
        row("dense", dense),
        row("magnitude 50%", np.log(13.0)),  # loses 3
        row("SparseGPT 50%", np.log(10.5)),  # 0.5 / 3
        row("Wanda 50%", np.log(12.0)),  # 2 / 3
        row("RTN int3 g32", np.log(14.0)),  # loses 4
        row("GPTQ int3 g32", np.log(11.0)),  # 1 / 4
        row("AWQ int3 g32", np.log(11.5)),  # 1.5 / 4
        row("GPTQ int3 g32 sym", 2.4, seconds=5.0),
        row("GPTQ int3 g32 sym, one pass", 2.3, seconds=1.0),
        row("qwix GPTQ int3 g32 sym", 2.35, seconds=60.0),
    ]
    goals = {g["goal"]: g for g in bench.goals("gpt_tiny", rows)}
    sparse = goals["SparseGPT 50% lost / magnitude 50% lost"]
    assert sparse["ratio"] == pytest.approx(0.5 / 3) and sparse["met"]
    wanda = goals["Wanda 50% lost / magnitude 50% lost"]
    assert wanda["ratio"] == pytest.approx(2 / 3) and not wanda["met"]
    gptq = goals["GPTQ int3 lost / RTN int3 lost"]
    assert gptq["ratio"] == pytest.approx(0.25) and gptq["met"]
    awq = goals["AWQ int3 lost / RTN int3 lost (info)"]
    assert awq["ratio"] == pytest.approx(0.375) and awq["met"]
    assert not goals["mixjax GPTQ int3 sym loss <= qwix's"]["met"]  # 2.4 > 2.35
    assert goals["mixjax GPTQ int3 sym, one pass loss <= qwix's"]["met"]
    assert goals["mixjax GPTQ int3 sym time <= qwix's"]["met"]
    # Image models: accuracy points lost, not perplexity.
    images = [row("dense", 98.0), row("magnitude 50%", 92.0), row("SparseGPT 50%", 97.0)]
    (goal,) = bench.goals("lenet5", images)
    assert goal["ratio"] == pytest.approx(1 / 6)


def test_cache_round_trip_and_shape_check(bench, tmp_path):
    params = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "b": jnp.ones(4, jnp.int32)}
    path = str(tmp_path / "p.npz")
    made, seconds = bench.cached(path, params, lambda: params, retrain=False)
    assert seconds >= 0.0
    loaded, seconds = bench.cached(path, params, lambda: pytest.fail("retrained"), False)
    assert seconds == 0.0
    np.testing.assert_array_equal(loaded["a"]["kernel"], params["a"]["kernel"])
    assert loaded["b"].dtype == jnp.int32
    other = {"a": {"kernel": jnp.zeros((3, 2))}, "b": jnp.ones(4, jnp.int32)}
    with pytest.raises(ValueError, match=r"\['a'\]\['kernel'\] has shape \(2, 3\), expected"):
        bench.cached(path, other, lambda: other, False)


@pytest.mark.slow
def test_quick_run_of_lenet5_writes_its_table(bench, tmp_path, monkeypatch, capsys):
    argv = ["oneshot.py", "--quick", "--models", "lenet5", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--cache", str(tmp_path / "cache")])
    bench.main()
    out = capsys.readouterr().out
    assert "| lenet5 | GPTQ int3 per-channel |" in out
    payload = json.loads((tmp_path / "oneshot.json").read_text())
    rows = {r["variant"]: r for r in payload["results"]["lenet5"]["rows"]}
    assert set(rows) == {
        "dense",
        "magnitude 50%",
        "Wanda 50%",
        "SparseGPT 50%",
        "RTN int3 per-channel",
        "GPTQ int3 per-channel",
        "AWQ int3 per-channel",
        "SparseGPT 2:4 + int4 per-channel",
    }
    joint = rows["SparseGPT 2:4 + int4 per-channel"]
    assert joint["bytes"] < rows["dense"]["bytes"]
    assert joint["metric_integer"] == pytest.approx(joint["metric"], abs=1.0)
    assert (tmp_path / "oneshot.png").exists()
