"""Runs every script in examples/ with tiny step counts, in this process, and checks its output."""

import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
TINY = {
    "linen_loop": ["--steps", "100", "--batch-size", "32"],
    "nnx_loop": ["--steps", "100", "--batch-size", "32"],
    "train_step": ["--steps", "100", "--steps-per-call", "50", "--batch-size", "32"],
    "prune_lenet": ["--dense-steps", "20", "--prune-steps", "20", "--batch-size", "32"],
}


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(TINY)


@pytest.mark.parametrize("name", ["linen_loop", "nnx_loop", "train_step"])
def test_example_trains(name, capsys):
    accuracy = load(name).main(TINY[name])
    out = capsys.readouterr().out
    assert "compressed test accuracy:" in out
    # 100 steps (seconds; compiling dominates) leave chance (10 %) far behind on the digits.
    assert 0.3 < accuracy <= 1.0


def test_prune_lenet(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prune_lenet.py", *TINY["prune_lenet"]])
    load("prune_lenet").main()
    out = capsys.readouterr().out
    assert "dense accuracy:" in out and "pruned accuracy:" in out and "**total**" in out


def test_train_step_rejects_uneven_steps(capsys):
    with pytest.raises(SystemExit):
        load("train_step").main(["--steps", "25", "--steps-per-call", "10"])
    assert "must be a multiple of --steps-per-call" in capsys.readouterr().err
