"""mixjax: composable, jit-able compression transforms and training wrappers for JAX and Flax."""

from mixjax import augment, data, delay, models, prune, schedules, select
from mixjax.core import (
    ConstrainedState,
    EmptyState,
    ParamTransform,
    apply_updates,
    chain,
    identity,
    unconstrained,
    wrap_optax,
)

__version__ = "0.1.0"

__all__ = [
    "ConstrainedState",
    "EmptyState",
    "ParamTransform",
    "apply_updates",
    "augment",
    "chain",
    "data",
    "delay",
    "identity",
    "models",
    "prune",
    "schedules",
    "select",
    "unconstrained",
    "wrap_optax",
]
