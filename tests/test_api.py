"""The shape of the public API: families as subpackages, every `__all__`, a light import."""

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import pytest

import mixjax

MODULES = sorted(m.name for m in pkgutil.walk_packages(mixjax.__path__, "mixjax."))
FAMILIES = [
    "augment",
    "data",
    "delay",
    "export",
    "models",
    "parallel",
    "prune",
    "quant",
    "share",
    "train",
]


def test_importing_mixjax_loads_no_heavy_dependency():
    code = (
        "import sys, mixjax\n"
        "heavy = {'orbax', 'matplotlib', 'tensorflow_datasets', 'tqdm'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
        "mixjax.checkpoint.latest_step\n"  # the lazy family still resolves
        "print('orbax' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]


def test_top_level_exports_the_families_not_internals():
    modules = {n for n in mixjax.__all__ if isinstance(getattr(mixjax, n), types.ModuleType)}
    assert modules == {
        *FAMILIES,
        "calibrate",
        "checkpoint",
        "layout",
        "oneshot",
        "schedules",
        "select",
    }
    for internal in ("codecs", "coding", "packing", "config", "deploy", "intinfer", "app"):
        assert internal not in mixjax.__all__
    assert sorted(dir(mixjax)) == sorted(mixjax.__all__)
    with pytest.raises(AttributeError, match="module 'mixjax' has no attribute 'codecs'"):
        mixjax.codecs  # noqa: B018


@pytest.mark.parametrize("name", MODULES)
def test_every_module_declares_its_public_names(name):
    module = importlib.import_module(name)
    assert isinstance(module.__all__, (list, tuple)), name
    assert module.__doc__, name
    for public in module.__all__:
        obj = getattr(module, public)  # every name listed exists
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__doc__, f"{name}.{public} has no docstring"
    assert len(set(module.__all__)) == len(module.__all__), name


@pytest.mark.parametrize("family", FAMILIES)
def test_no_submodule_is_shadowed_by_a_name_of_its_package(family):
    """``mixjax.share.cluster`` is the function; its module is ``mixjax.share.clustering``."""
    package = importlib.import_module(f"mixjax.{family}")
    for sub in pkgutil.iter_modules(package.__path__):
        assert getattr(package, sub.name) is importlib.import_module(
            f"{package.__name__}.{sub.name}"
        )
    for public in package.__all__:  # re-exported, and defined inside the family
        obj = getattr(package, public)
        home = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", "")
        if inspect.isfunction(obj) or inspect.isclass(obj) or isinstance(obj, types.ModuleType):
            assert home.startswith(f"mixjax.{family}") or home.startswith("mixjax.core"), public


@pytest.mark.parametrize(
    "path",
    [
        "chain",
        "identity",
        "wrap_optax",
        "ParamTransform",
        "prune.magnitude",
        "prune.random",
        "prune.saliency",
        "prune.NM",
        "prune.Block",
        "prune.Channel",
        "prune.summary",
        "quant.fake_quant",
        "share.cluster",
        "share.merge_similar",
        "export.compress",
        "export.save",
        "export.load",
        "delay.delayed",
        "augment.chain",
        "augment.random_flip",
        "schedules.polynomial",
        "train.make_train_step",
        "train.init_train_state",
        "train.make_eval_step",
        "train.linen_apply",
        "train.nnx_apply",
        "checkpoint.save",
        "checkpoint.restore",
        "parallel.data_parallel",
        "data.load",
        "models.LeNet5",
    ],
)
def test_public_paths_keep_working(path):
    obj = mixjax
    for part in path.split("."):
        obj = getattr(obj, part)
    assert callable(obj)
