"""Tests of mixjax.app.config: the settings of ``mixjax run``, their TOML form and their checks."""

import dataclasses

import pytest

from mixjax.app import config as config_lib


def test_every_option_has_a_unique_flag_help_and_a_valid_default():
    options = config_lib.options()
    flags = [f.metadata["flag"] for _, f in options]
    assert len(flags) == len(set(flags)) and all(f.startswith("--") for f in flags)
    assert all(f.metadata["help"] for _, f in options)
    assert {key.split(".")[0] for key, _ in options} == {"data", "train", "compress", "run"}
    assert config_lib.validate(config_lib.Config()) == config_lib.Config()
    assert config_lib.base_type("float | None") == "float" and config_lib.base_type("int") == "int"


def test_override_checks_types_not_ranges():
    cfg = config_lib.override(config_lib.Config(), {"train.lr": 1, "train.steps": 10})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.steps == 10
    with pytest.raises(ValueError, match=r"mixjax.app.config: train\.lr must be a float, got 'x'"):
        config_lib.override(config_lib.Config(), {"train.lr": "x"})
    with pytest.raises(ValueError, match=r"train\.steps must be an int, got True"):
        config_lib.override(config_lib.Config(), {"train.steps": True})
    with pytest.raises(ValueError, match=r"unknown key 'train\.stepz'; valid keys: data\."):
        config_lib.override(config_lib.Config(), {"train.stepz": 1})


def test_load_toml_reads_tables_over_the_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nsteps = 100\nsteps_per_call = 10\n[compress]\nclusters = 8\n")
    cfg = config_lib.load_toml(path)
    assert (cfg.train.steps, cfg.train.steps_per_call, cfg.compress.clusters) == (100, 10, 8)
    assert cfg.data == config_lib.Data()


@pytest.mark.parametrize(
    "text, error, match",
    [
        ("[train\n", ValueError, r"'.*bad.toml' is not valid TOML"),
        ("[training]\nsteps = 1\n", ValueError, r"unknown key 'training\.steps'.*bad.toml"),
        ("steps = 1\n", ValueError, r"unknown key 'steps' \(top-level keys must be tables"),
        ('[train]\nsteps = "many"\n', ValueError, r"train\.steps must be an int.*bad.toml"),
    ],
)
def test_load_toml_errors_name_the_file_and_key(tmp_path, text, error, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(error, match=match):
        config_lib.load_toml(path)


def test_load_toml_missing_file():
    with pytest.raises(FileNotFoundError, match=r"config file '/no/such.toml' does not exist"):
        config_lib.load_toml("/no/such.toml")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"train.steps": 70}, r"train\.steps \(--train-steps\) must be a positive multiple of "),
        ({"compress.sparsity": 1.0}, r"compress\.sparsity \(--sparsity\) must be in \[0, 1\)"),
        ({"compress.clusters": 1}, r"compress\.clusters \(--clusters\) must be in 2\.\.256"),
        ({"compress.bits": 9}, r"compress\.bits \(--bits\) must be in 2\.\.8"),
        ({"train.lr": 0.0}, r"train\.lr \(--lr\) must be > 0"),
        ({"data.degrees": 200.0}, r"data\.degrees \(--degrees\) must be in \[0, 180\]"),
        ({"run.devices": 3}, r"data\.batch_size \(--batch-size\) must be divisible by devices=3"),
        ({"train.lam": -1.0}, r"train\.lam \(--lam\) must be >= 0"),
        ({"train.compensation": "x"}, r"train\.compensation \(--compensation\) must be one of"),
    ],
)
def test_validate_names_the_setting_and_its_flag(changes, match):
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config_lib.override(config_lib.Config(), changes))


def test_as_dict_round_trips_through_override():
    cfg = config_lib.override(config_lib.Config(), {"compress.clusters": 8, "run.seed": 3})
    flat = {
        f"{section}.{key}": value
        for section, values in config_lib.as_dict(cfg).items()
        for key, value in values.items()
    }
    assert config_lib.override(config_lib.Config(), flat) == cfg
    assert dataclasses.asdict(cfg)["compress"]["clusters"] == 8
