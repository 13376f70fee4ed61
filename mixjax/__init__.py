"""mixjax: composable, jit-able compression transforms and training wrappers for JAX and Flax."""

from mixjax import (
    augment,
    coding,
    data,
    delay,
    kmeans,
    merge,
    models,
    prune,
    schedules,
    select,
    share,
)
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
    "coding",
    "data",
    "delay",
    "identity",
    "kmeans",
    "merge",
    "models",
    "prune",
    "schedules",
    "select",
    "share",
    "unconstrained",
    "wrap_optax",
]
