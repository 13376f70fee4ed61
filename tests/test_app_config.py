"""The ``mixjax run`` configuration (:mod:`mixjax.app.config`): options, TOML, overrides, rules.

The command line built on it (``--config`` then flags) is tested in ``test_app_cli.py``.
"""

import dataclasses
import math
import re

import numpy as np
import pytest

from mixjax.app import config as config_lib
from mixjax.app.config import Config, override, validate

SECTIONS = ("data", "train", "model", "compress", "run")


def flags():
    return {key: field.metadata["flag"] for key, field in config_lib.options()}


# ----------------------------------------------------------------------------------------------
# options / base_type.


def test_options_cover_every_field_once_with_a_flag_and_help():
    keys = [key for key, _ in config_lib.options()]
    expected = [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(Config)
        for f in dataclasses.fields(getattr(Config(), section.name))
    ]
    assert keys == expected and len(keys) == len(set(keys)) == 35
    assert {key.split(".")[0] for key in keys} == set(SECTIONS)
    for key, field in config_lib.options():
        flag, text = field.metadata["flag"], field.metadata["help"]
        assert re.fullmatch(r"--[a-z][a-z-]*", flag), (key, flag)
        assert isinstance(text, str) and len(text) > 10, key
        section, name = key.split(".")
        assert getattr(getattr(Config(), section), name) == field.default
    assert len(set(flags().values())) == len(keys)  # flags are unique
    assert flags()["compress.batch_size"] == "--compress-batch-size"
    assert flags()["train.steps"] == "--train-steps"


def test_base_type():
    assert config_lib.base_type("float | None") == "float"
    assert config_lib.base_type("int") == "int"
    assert config_lib.base_type("str") == "str"
    types = {key: config_lib.base_type(f.type) for key, f in config_lib.options()}
    assert set(types.values()) == {"int", "float", "str"}
    assert types["train.lam"] == "float" and types["train.tau"] == "int"


# ----------------------------------------------------------------------------------------------
# override.


def test_override_replaces_only_the_given_fields():
    base = Config()
    cfg = override(base, {"train.steps": 100, "compress.sparsity": 0.5, "run.output": "out"})
    assert (cfg.train.steps, cfg.compress.sparsity, cfg.run.output) == (100, 0.5, "out")
    assert cfg.data == base.data
    assert dataclasses.replace(cfg.train, steps=base.train.steps) == base.train
    assert base.train.steps == 5000  # the input is not modified (frozen dataclasses)
    assert override(base, {}) == base


def test_override_checks_types():
    cfg = override(Config(), {"train.lr": 1, "train.lam": 2})
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float  # an int for a float field
    assert cfg.train.lam == 2.0 and type(cfg.train.lam) is float
    for key, value, noun in [
        ("train.lr", "x", "a float"),
        ("train.lr", True, "a float"),
        ("train.steps", True, "an int"),  # bool is not an int here
        ("train.steps", 2.0, "an int"),
        ("train.steps", "5", "an int"),
        ("data.dataset", 3, "a string"),
    ]:
        message = f"mixjax.app.config: {key} must be {noun}, got {value!r}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            override(Config(), {key: value})


def test_override_unknown_key_lists_the_valid_ones():
    valid = ", ".join(key for key, _ in config_lib.options())
    for key in ("train.stepz", "train", "trian.steps", "train.steps.x"):
        message = f"mixjax.app.config: unknown key {key!r}; valid keys: {valid}"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            override(Config(), {key: 1})


def test_config_errors():
    with pytest.raises(ValueError, match=r"train\.lr must be a float, got 'x'"):
        override(Config(), {"train.lr": "x"})
    with pytest.raises(ValueError, match=r"unknown key 'train\.stepz'; valid keys: data\."):
        override(Config(), {"train.stepz": 1})
    bad = override(Config(), {"compress.sparsity": 1.0})
    with pytest.raises(ValueError, match=r"compress\.sparsity \(--sparsity\) must be in \[0, 1\)"):
        validate(bad)


# ----------------------------------------------------------------------------------------------
# load_toml.


def test_load_toml_over_defaults_and_over_a_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[train]\nsteps = 100\nsteps_per_call = 10\nlr = 1\n[data]\ndataset = "npz:x.npz"\n'
    )
    cfg = config_lib.load_toml(path)
    assert (cfg.train.steps, cfg.train.steps_per_call, cfg.data.dataset) == (100, 10, "npz:x.npz")
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.compress == config_lib.Compress() and cfg.run == config_lib.Run()
    base = override(Config(), {"run.seed": 7, "train.steps": 5})
    over = config_lib.load_toml(str(path), base)
    assert (over.run.seed, over.train.steps) == (7, 100)  # the file wins, the rest is kept
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert config_lib.load_toml(empty) == Config()


def test_load_toml_errors(tmp_path):
    missing = tmp_path / "none.toml"
    with pytest.raises(
        FileNotFoundError,
        match=f"^mixjax\\.app\\.config: config file {re.escape(repr(str(missing)))} "
        "does not exist$",
    ):
        config_lib.load_toml(missing)
    path = tmp_path / "bad.toml"
    name = re.escape(repr(str(path)))
    path.write_text("[train\nsteps = 5\n")
    with pytest.raises(ValueError, match=f"^mixjax\\.app\\.config: {name} is not valid TOML: "):
        config_lib.load_toml(path)
    path.write_text("[train]\nstepz = 5\n")
    with pytest.raises(
        ValueError,
        match=r"^mixjax\.app\.config: unknown key 'train\.stepz'; valid keys: data\.task, .*"
        f" \\(in {name}\\)$",
    ):
        config_lib.load_toml(path)
    path.write_text("[training]\nsteps = 5\n")
    with pytest.raises(ValueError, match=f"unknown key 'training\\.steps'.* \\(in {name}\\)$"):
        config_lib.load_toml(path)
    path.write_text("steps = 5\n")
    with pytest.raises(
        ValueError,
        match=f"^mixjax\\.app\\.config: {name}: unknown key 'steps' \\(top-level keys must be "
        r"tables: data, train, model, compress, run\)$",
    ):
        config_lib.load_toml(path)
    path.write_text("[train]\nsteps = 'many'\n")
    with pytest.raises(
        ValueError,
        match=f"^mixjax\\.app\\.config: train\\.steps must be an int, got 'many' \\(in {name}\\)$",
    ):
        config_lib.load_toml(path)


# ----------------------------------------------------------------------------------------------
# validate.


def invalid(changes, key, rule, value):
    """``validate`` of the defaults with ``changes`` fails on ``key``, naming its flag."""
    message = f"mixjax.app.config: {key} ({flags()[key]}) must be {rule}, got {value!r}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate(override(Config(), changes))


def test_validate_returns_a_valid_config_unchanged():
    cfg = Config()
    assert validate(cfg) is cfg
    tiny = override(cfg, {"train.steps": 300, "compress.prune_steps": 100, "train.tau": 0})
    assert validate(tiny) is tiny


@pytest.mark.parametrize(
    "key", ["train.steps", "compress.prune_steps", "compress.qat_steps", "run.checkpoint_every"]
)
def test_validate_step_counts_are_positive_multiples_of_steps_per_call(key):
    rule = "a positive multiple of steps_per_call=50"
    for value in (0, 25, 75, -50):
        invalid({key: value}, key, rule, value)
    validate(override(Config(), {key: 150}))
    per_call = {"train.steps_per_call": 7, "train.steps": 14, "compress.prune_steps": 7}
    per_call |= {"compress.qat_steps": 21, "run.checkpoint_every": 28, key: 10}
    invalid(per_call, key, "a positive multiple of steps_per_call=7", 10)


def test_validate_positive_values():
    invalid({"train.steps_per_call": 0}, "train.steps_per_call", ">= 1", 0)
    invalid({"data.batch_size": 0}, "data.batch_size", ">= 1", 0)
    invalid({"compress.batch_size": -4}, "compress.batch_size", ">= 1", -4)
    invalid({"train.weight_decay": -0.1}, "train.weight_decay", ">= 0", -0.1)
    invalid({"train.lam": -1.0}, "train.lam", ">= 0", -1.0)
    for key in ("train.lr", "compress.prune_lr", "compress.qat_lr"):
        invalid({key: 0.0}, key, "> 0", 0.0)
    invalid({"run.devices": 0}, "run.devices", ">= 1", 0)
    invalid({"run.output": ""}, "run.output", "a non-empty path", "")


def test_validate_every_float_is_finite():
    """inf and nan (TOML has both) would pass every range check below and fail only at export."""
    floats = [k for k, f in config_lib.options() if config_lib.base_type(f.type) == "float"]
    assert {"train.lr", "train.lam", "compress.qat_lr", "data.degrees"} <= set(floats)
    for key in floats:
        for value in (math.inf, -math.inf):
            invalid({key: value}, key, "finite", value)
        with pytest.raises(ValueError, match=f"{re.escape(key)} .* must be finite, got nan"):
            validate(override(Config(), {key: math.nan}))


def test_validate_seed_fits_the_32_bits_a_key_keeps():
    # Without x64, jax.random.key(2**32) is jax.random.key(0): larger seeds would alias.
    rule = f"in 0..{2**32 - 1}"
    for value in (-1, 2**32, 2**64):
        invalid({"run.seed": value}, "run.seed", rule, value)
    validate(override(Config(), {"run.seed": 2**32 - 1}))


def test_validate_tau_is_bounded_and_shorter_than_every_stage():
    # --tau 1000000000 used to reach XLA as a 40 TB gradient FIFO.
    short = {"compress.qat_steps": 100}
    rule = "in 0..1024 and shorter than every stage (100 steps)"
    for value in (-1, 100, 10**9):
        invalid({**short, "train.tau": value}, "train.tau", rule, value)
    validate(override(Config(), {**short, "train.tau": 99}))
    rule = "in 0..1024 and shorter than every stage (1000 steps)"
    invalid({"train.tau": 1025}, "train.tau", rule, 1025)
    validate(override(Config(), {"train.tau": 999}))


def test_validate_ranges():
    invalid({"data.degrees": 181.0}, "data.degrees", "in [0, 180]", 181.0)
    invalid({"data.degrees": -1.0}, "data.degrees", "in [0, 180]", -1.0)
    invalid({"data.translate": 1.0}, "data.translate", "in [0, 1)", 1.0)
    for name in ("sparsity", "conv_sparsity", "output_sparsity"):
        invalid({f"compress.{name}": 1.0}, f"compress.{name}", "in [0, 1)", 1.0)
        invalid({f"compress.{name}": -0.1}, f"compress.{name}", "in [0, 1)", -0.1)
        validate(override(Config(), {f"compress.{name}": 0.0}))
    for name in ("clusters", "bias_clusters"):
        for value in (1, 257):
            invalid({f"compress.{name}": value}, f"compress.{name}", "in 2..256", value)
        validate(override(Config(), {f"compress.{name}": 256}))
    for name in ("bits", "act_bits"):
        for value in (1, 9):
            rule = "in 2..8 (integer inference)"
            invalid({f"compress.{name}": value}, f"compress.{name}", rule, value)
        validate(override(Config(), {f"compress.{name}": 2}))
    compensations = str(config_lib.COMPENSATIONS)
    invalid({"train.compensation": "dcx"}, "train.compensation", f"one of {compensations}", "dcx")


def test_validate_batch_sizes_divisible_by_devices():
    both = {"run.devices": 3, "data.batch_size": 96}
    invalid(
        {**both, "compress.batch_size": 64}, "compress.batch_size", "divisible by devices=3", 64
    )
    invalid(
        {"run.devices": 3, "data.batch_size": 64}, "data.batch_size", "divisible by devices=3", 64
    )
    ok = override(Config(), {**both, "compress.batch_size": 48})
    assert validate(ok) is ok


# ----------------------------------------------------------------------------------------------
# as_dict.


def test_as_dict_round_trips_through_override():
    cfg = override(Config(), {"train.lam": 0.5, "train.steps": 100, "data.dataset": "npz:a"})
    d = config_lib.as_dict(cfg)
    assert list(d) == list(SECTIONS)
    assert d["train"]["lam"] == 0.5 and d["train"]["steps"] == 100
    flat = {f"{section}.{k}": v for section, values in d.items() for k, v in values.items()}
    assert list(flat) == [key for key, _ in config_lib.options()]
    optional = {k for k, f in config_lib.options() if f.type.endswith("| None")}
    sizes = {f"model.{name}" for name in ("width", "depth", "heads", "patch_size", "context")}
    assert optional == {"data.num_classes", "train.lam", *sizes}
    # TOML-able, where a None of an optional field is written by leaving the key out.
    assert all(isinstance(v, (int, float, str)) or k in optional for k, v in flat.items())
    assert override(Config(), flat) == cfg


def test_as_dict_of_the_defaults_round_trips_through_override():
    d = config_lib.as_dict(Config())
    assert d["train"]["lam"] is None and d["compress"]["clusters"] == 16
    flat = {f"{section}.{k}": v for section, values in d.items() for k, v in values.items()}
    assert override(Config(), flat) == Config()


def test_override_accepts_none_for_optional_fields_only():
    set_lam = override(Config(), {"train.lam": 0.1})
    assert override(set_lam, {"train.lam": None}).train.lam is None
    with pytest.raises(
        ValueError, match=r"^mixjax\.app\.config: train\.lr must be a float, got None$"
    ):
        override(Config(), {"train.lr": None})
    with pytest.raises(
        ValueError, match=r"^mixjax\.app\.config: run\.output must be a string, got None$"
    ):
        override(Config(), {"run.output": None})


def test_numpy_numbers_become_plain_python_values():
    cfg = config_lib.override(
        config_lib.Config(), {"train.steps": np.int64(100), "train.lr": np.float32(0.5)}
    )
    assert type(cfg.train.steps) is int and cfg.train.steps == 100
    assert type(cfg.train.lr) is float and cfg.train.lr == 0.5
    with pytest.raises(ValueError, match=r"train\.steps must be an int, got np.float64\(1.5\)"):
        config_lib.override(config_lib.Config(), {"train.steps": np.float64(1.5)})


def test_validate_num_classes():
    invalid({"data.num_classes": 1}, "data.num_classes", "in 2..100000", 1)
    invalid({"data.num_classes": 100_001}, "data.num_classes", "in 2..100000", 100_001)
    assert validate(override(Config(), {"data.num_classes": 10})).data.num_classes == 10


# ----------------------------------------------------------------------------------------------
# tasks: defaults, load, combinations, model sizes.


def test_defaults_of_each_task():
    assert config_lib.defaults() == config_lib.defaults("image") == Config()
    lm = config_lib.defaults("lm")
    changed = {
        key
        for key, _ in config_lib.options()
        if getattr(getattr(lm, key.split(".")[0]), key.split(".")[1])
        != getattr(getattr(Config(), key.split(".")[0]), key.split(".")[1])
    }
    assert changed == set(config_lib.LM_DEFAULTS)
    assert (lm.data.task, lm.train.model, lm.data.batch_size) == ("lm", "gpt_tiny", 12)
    with pytest.raises(
        ValueError, match=r"^mixjax\.app\.config: data\.task \(--task\) must be one of \('image', "
    ):
        config_lib.defaults("video")


def test_load_starts_from_the_defaults_of_the_task_of_the_options_or_the_file(tmp_path):
    assert config_lib.load(None, {}) == Config()
    cfg = config_lib.load(None, {"data.task": "lm", "data.batch_size": 4})
    assert cfg == override(config_lib.defaults("lm"), {"data.batch_size": 4})
    path = tmp_path / "lm.toml"
    path.write_text('[data]\ntask = "lm"\ndataset = "text:a.txt"\n[train]\nsteps = 100\n')
    cfg = config_lib.load(path, {"train.steps": 200})
    assert (cfg.train.model, cfg.data.dataset, cfg.train.steps) == ("gpt_tiny", "text:a.txt", 200)
    # The option's task wins over the file's, and so do its defaults.
    assert config_lib.load(path, {"data.task": "image"}).train.model == "lenet5"
    path.write_text("[data]\ntask = 3\n")
    with pytest.raises(ValueError, match=r"data\.task must be a string, got 3"):
        config_lib.load(path, {})


def test_a_model_named_by_the_options_or_the_file_brings_its_recipe(tmp_path):
    recipe = config_lib.MODEL_DEFAULTS["lenet300100"]
    mlp = config_lib.load(None, {"train.model": "lenet300100"})
    assert mlp == override(Config(), {"train.model": "lenet300100", **recipe})
    assert (mlp.train.lr, mlp.data.translate, mlp.data.degrees) == (1e-3, 0.07, 5.0)
    assert config_lib.defaults("image", "lenet300100") == mlp
    # The file and the options still win over the recipe; other models keep the task's.
    path = tmp_path / "mlp.toml"
    path.write_text('[train]\nmodel = "lenet300100"\nlr = 2e-3\n')
    from_file = config_lib.load(path, {"data.degrees": 0.0})
    assert (from_file.train.lr, from_file.data.translate, from_file.data.degrees) == (
        2e-3,
        0.07,
        0.0,
    )
    lenet5 = config_lib.load(path, {"train.model": "lenet5"})  # the file's lr, no recipe
    assert (lenet5.train.lr, lenet5.data.translate) == (2e-3, Config().data.translate)
    path.write_text("[train]\nmodel = 5\n")
    with pytest.raises(ValueError, match=r"train\.model must be a string, got 5"):
        config_lib.load(path, {})


def lm_config(**changes):
    return override(config_lib.defaults("lm"), {"data.dataset": "text:a.txt", **changes})


def test_validate_task_combinations():
    assert validate(lm_config()) == lm_config()
    message = "train.model (--model) must be a language model (gpt_tiny), got 'lenet5'"
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(lm_config(**{"train.model": "lenet5"}))
    message = "data.dataset (--dataset) must be 'text:FILE' for --task lm, got 'digits'"
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(lm_config(**{"data.dataset": "digits"}))
    message = "train.model (--model) must be an image model (lenet300100, lenet5, resnet20, "
    with pytest.raises(ValueError, match=re.escape(message) + r".*--task lm trains gpt_tiny"):
        validate(override(Config(), {"train.model": "gpt_tiny"}))
    message = "data.dataset (--dataset) must be an image dataset for --task image (a text corpus"
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(override(Config(), {"data.dataset": "text:a.txt"}))


@pytest.mark.parametrize("key", config_lib.IMAGE_ONLY)
def test_lm_refuses_image_only_settings_changed_from_their_default(key):
    section, name = key.split(".")
    default = getattr(getattr(Config(), section), name)
    value = {None: 10, 1000: 500}.get(default, default * 0.5 if isinstance(default, float) else 4)
    rule = f"left at its default {default!r} with --task lm (only the image pipeline reads it)"
    with pytest.raises(
        ValueError,
        match=f"^mixjax\\.app\\.config: {re.escape(f'{key} ({flags()[key]}) must be {rule}')}",
    ):
        validate(lm_config(**{key: value}))


def test_lm_stage_lengths_skip_the_qat_stage_it_does_not_have():
    # The image defaults' qat_steps=1000 is no multiple of 30, and not an LM stage.
    changes = {"train.steps_per_call": 30, "train.steps": 60, "compress.prune_steps": 30}
    cfg = lm_config(**changes, **{"run.checkpoint_every": 30, "train.tau": 29})
    assert validate(cfg) is cfg
    rule = "in 0..1024 and shorter than every stage (30 steps)"
    with pytest.raises(ValueError, match=re.escape(f"train.tau (--tau) must be {rule}, got 30")):
        validate(lm_config(**changes, **{"run.checkpoint_every": 30, "train.tau": 30}))


def test_model_sizes():
    cfg = override(Config(), {"train.model": "vit_tiny", "model.width": 32, "model.depth": 1})
    assert validate(cfg) is cfg
    assert config_lib.model_sizes(cfg) == {"width": 32, "depth": 1}
    assert config_lib.model_sizes(Config()) == {}
    invalid({"model.width": 4}, "model.width", "unset for model 'lenet5' (its sizes: none)", 4)
    resnet = {"train.model": "resnet20"}
    invalid(
        {**resnet, "model.heads": 2},
        "model.heads",
        "unset for model 'resnet20' (its sizes: width)",
        2,
    )
    invalid({**resnet, "model.width": 0}, "model.width", ">= 1", 0)
    message = (
        "mixjax.app.config: the sizes {'width': 30} do not fit model 'vit_tiny': "
        "mixjax.models.ViTTiny: dim must be divisible by heads, got dim=30, heads=4"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate(override(Config(), {"train.model": "vit_tiny", "model.width": 30}))
