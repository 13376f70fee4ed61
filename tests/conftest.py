"""Shared test harnesses: one test body runs eagerly, under ``jax.jit`` and under ``jax.vmap``.

A harness takes a function and returns one that computes the same thing another way:

* ``eager``: the function itself, op by op;
* ``jit``: ``jax.jit`` of it;
* ``vmap``: ``jax.vmap`` of it over a new leading axis holding two copies of every array
  argument; the two results must be equal (checked), and the first is returned. A function is
  vmappable when it is pure and works on traced arrays, which is what this proves.

Fixtures: ``harness`` (eager, jit) for any jit-able function, ``array_harness`` (eager, jit,
vmap) for functions of arrays (and pytrees of arrays) to arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def eager(fn):
    return fn


def vmapped(fn):
    def run(*args):
        stacked = jax.tree.map(lambda x: jnp.stack([x, x]) if _is_array(x) else x, args)
        axes = tuple(jax.tree.map(lambda x: 0 if _is_array(x) else None, a) for a in args)
        out = jax.vmap(fn, in_axes=axes)(*stacked)
        first, second = (jax.tree.map(lambda y, i=i: y[i], out) for i in (0, 1))
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        return first

    return run


def _is_array(x):
    return isinstance(x, (jax.Array, np.ndarray)) and not jnp.issubdtype(
        x.dtype, jax.dtypes.prng_key
    )


HARNESSES = {"eager": eager, "jit": jax.jit, "vmap": vmapped}


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for one module's end-to-end runs (each ``mixjax run``
    compiles the same steps again), restored afterwards; use it with ``pytestmark``."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = [getattr(jax.config, name) for name in names]
    jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(names[1], 0.0)
    yield
    for name, value in zip(names, saved, strict=True):
        jax.config.update(name, value)


@pytest.fixture(params=["eager", "jit"])
def harness(request):
    """A function wrapper: the function itself, or ``jax.jit`` of it."""
    return HARNESSES[request.param]


@pytest.fixture(params=["eager", "jit", "vmap"])
def array_harness(request):
    """As ``harness``, and ``jax.vmap`` over a leading axis of two copies (see the module doc)."""
    return HARNESSES[request.param]
