"""mixjax: composable, jit-able compression transforms and training wrappers for JAX and Flax.

The top level holds the protocol every compression transform implements (:mod:`mixjax.core`)
and the families, one subpackage each:

* compression transforms: :mod:`mixjax.prune`, :mod:`mixjax.quant`, :mod:`mixjax.share`, chosen
  by :mod:`mixjax.select`, driven by :mod:`mixjax.schedules` and told each kernel's axes by
  :mod:`mixjax.layout`; :mod:`mixjax.export` stores and runs what they make;
* one-shot compression from calibration data: :mod:`mixjax.calibrate` (the statistics of every
  layer's inputs) and :mod:`mixjax.oneshot` (GPTQ, SparseGPT, Wanda, ... layer by layer);
* training: :mod:`mixjax.augment`, :mod:`mixjax.train`, :mod:`mixjax.delay` (asynchronous
  training), :mod:`mixjax.parallel`, :mod:`mixjax.checkpoint`;
* :mod:`mixjax.models` and :mod:`mixjax.data`, reference models and datasets.

``import mixjax`` loads neither Orbax, Matplotlib, TFDS nor tqdm: :mod:`mixjax.checkpoint`
(Orbax) is imported on first use, TFDS when a TFDS dataset is loaded, and the command line
(:mod:`mixjax.app`) only by the ``mixjax`` command.
"""

import importlib
from typing import Any

from mixjax import (
    augment,
    calibrate,
    data,
    delay,
    export,
    layout,
    models,
    oneshot,
    parallel,
    prune,
    quant,
    schedules,
    select,
    share,
    train,
)
from mixjax.core import (
    ConstrainedState,
    EmptyState,
    ParamTransform,
    apply_updates,
    chain,
    every_step,
    identity,
    learned_state,
    multiples_of,
    never,
    unconstrained,
    update_when_due,
    with_learned_state,
    wrap_optax,
)

__version__ = "0.1.0"

# Families whose import is heavy (Orbax) load when first used: ``mixjax.checkpoint.save(...)``.
_LAZY = ("checkpoint",)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"mixjax.{name}")
    raise AttributeError(f"module 'mixjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "ConstrainedState",
    "EmptyState",
    "ParamTransform",
    "apply_updates",
    "augment",
    "calibrate",
    "chain",
    "checkpoint",
    "data",
    "delay",
    "every_step",
    "export",
    "identity",
    "layout",
    "learned_state",
    "models",
    "multiples_of",
    "never",
    "oneshot",
    "parallel",
    "prune",
    "quant",
    "schedules",
    "select",
    "share",
    "train",
    "unconstrained",
    "update_when_due",
    "with_learned_state",
    "wrap_optax",
]
