"""Device meshes and shardings for mixjax train states: the layout half of :mod:`mixjax.parallel`.

A mixjax mesh has two named axes: ``"data"`` (the batch is split along it, gradients are
averaged over it by XLA) and ``"model"`` (parameters are split along it by rules). Model
parallelism is declared by *rules*, ``(regex, PartitionSpec)`` pairs matched against parameter
path strings (``"Dense_0/kernel"``, see :mod:`mixjax.select`); the first rule whose regex
matches the whole path gives the parameter's ``PartitionSpec``, unmatched parameters are
replicated.

Every other state leaf takes the sharding of the parameter it mirrors: wherever a subtree of the
train state has the parameters' tree structure (optax moments, pruning masks, cluster
assignments, quantization scales, delay FIFOs), each array in it at a parameter's position is
aligned with that parameter from the right: a dimension equal to the parameter's takes the
parameter's mesh axes, a dimension of size 1 (per-channel scales ``(1, C)``) and extra leading
dimensions (a ``(tau + 1, *shape)`` FIFO) are unsharded, and an array that does not align
(``(C, K)`` centroids) is replicated. Scalars and counters are replicated.

Example::

    mesh = mixjax.parallel.make_mesh(data=2, model=4)
    rules = [(".*Dense_0/kernel", P(None, "model")), (".*Dense_1/kernel", P("model", None))]
    state = mixjax.parallel.shard_state(state, mesh, rules)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixjax import _checks, select

__all__ = [
    "DATA",
    "MODEL",
    "Rules",
    "batch_spec",
    "check_batch",
    "check_rules",
    "make_mesh",
    "param_specs",
    "put",
    "shard_batch",
    "shard_state",
    "state_shardings",
    "state_specs",
]

DATA = "data"
MODEL = "model"
Rules = Sequence[tuple[str, PartitionSpec]]


def make_mesh(
    data: int | None = None, model: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ``(data, model)`` mesh with axes ``("data", "model")`` over the first devices.

    Args:
      data: the size of the ``"data"`` axis; default ``len(devices) // model``.
      model: the size of the ``"model"`` axis.
      devices: the devices to use (default ``jax.devices()``, every process's devices); the
        first ``data * model`` are laid out row-major.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(data, model)``.

    Raises:
      TypeError / ValueError: a size not an int >= 1, or more devices asked for than there are.
    """
    fn_name = "mixjax.parallel.make_mesh"
    devices = list(jax.devices() if devices is None else devices)
    model = _checks.integer(fn_name, "model", model, 1)
    data = len(devices) // model if data is None else data
    data = _checks.integer(fn_name, "data", data, 1)
    if data * model > len(devices):
        raise ValueError(
            f"{fn_name}: a {data}x{model} (data x model) mesh needs {data * model} devices, "
            f"got {len(devices)}"
        )
    grid = np.empty((data, model), dtype=object)
    for i, device in enumerate(devices[: data * model]):
        grid[divmod(i, model)] = device
    return Mesh(grid, (DATA, MODEL))


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def check_rules(fn_name: str, rules: Rules, mesh: Mesh) -> list[tuple[re.Pattern, PartitionSpec]]:
    """Validates rules against the mesh; returns them with compiled regexes.

    Raises:
      TypeError: a rule not a ``(str, PartitionSpec)`` pair.
      ValueError: an invalid regex, or a spec naming an axis the mesh does not have.
    """
    compiled = []
    for rule in rules:
        if (
            not isinstance(rule, (tuple, list))
            or len(rule) != 2
            or not isinstance(rule[0], str)
            or not isinstance(rule[1], PartitionSpec)
        ):
            raise TypeError(
                f"{fn_name}: each rule must be a (regex str, PartitionSpec) pair, got {rule!r}"
            )
        pattern, spec = rule
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{fn_name}: rule regex {pattern!r} is invalid: {err}") from None
        for entry in spec:
            for axis in _axes(entry):
                if axis not in mesh.shape:
                    raise ValueError(
                        f"{fn_name}: rule ({pattern!r}, {spec}) names mesh axis {axis!r}; the "
                        f"mesh has axes {tuple(mesh.axis_names)}"
                    )
        compiled.append((regex, spec))
    return compiled


def param_specs(params: Any, mesh: Mesh, rules: Rules = ()) -> Any:
    """The ``PartitionSpec`` of each parameter: the first rule whose regex matches its path.

    Args:
      params: the parameter tree (linen dict or ``nnx.State``).
      mesh: the mesh the specs refer to.
      rules: ``(regex, PartitionSpec)`` pairs; the regex must match the whole path string.
        Unmatched parameters are replicated (``PartitionSpec()``).

    Returns:
      A tree with ``params``' structure holding ``PartitionSpec`` leaves.

    Raises:
      TypeError / ValueError: as :func:`check_rules`; a spec with more entries than the
        parameter has dimensions, or a dimension not divisible by its mesh axes' total size.
    """
    fn_name = "mixjax.parallel.param_specs"
    compiled = check_rules(fn_name, rules, mesh)

    def spec_of(keypath, leaf):
        path = select.path_str(keypath)
        spec = next((s for r, s in compiled if r.fullmatch(path)), PartitionSpec())
        shape = tuple(np.shape(leaf))
        if len(spec) > len(shape):
            raise ValueError(
                f"{fn_name}: {select.describe(path, leaf)}: spec {spec} has {len(spec)} entries "
                f"for {len(shape)} dimensions"
            )
        for dim, entry in zip(shape, spec, strict=False):
            size = math.prod(mesh.shape[a] for a in _axes(entry))
            if dim % size:
                raise ValueError(
                    f"{fn_name}: {select.describe(path, leaf)}: spec {spec} splits a dimension "
                    f"of size {dim} over {size} devices; it must divide it"
                )
        return spec

    return jax.tree_util.tree_map_with_path(spec_of, params)


def _aligned(leaf: Any, param: Any, spec: PartitionSpec) -> PartitionSpec:
    """The spec of a state array at a parameter's position (see the module docstring)."""
    shape, pshape = tuple(np.shape(leaf)), tuple(np.shape(param))
    extra = len(shape) - len(pshape)
    if extra < 0:
        return PartitionSpec()
    entries = list(spec) + [None] * (len(pshape) - len(spec))
    out = [None] * extra
    for dim, pdim, entry in zip(shape[extra:], pshape, entries, strict=True):
        if dim == pdim:
            out.append(entry)
        elif dim == 1:
            out.append(None)
        else:
            return PartitionSpec()
    return PartitionSpec(*out)


def _one_level(tree: Any) -> tuple[list[Any], Any]:
    """The direct children of a pytree node and the treedef that rebuilds it."""
    return jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)


def state_specs(tree: Any, params: Any, specs: Any) -> Any:
    """``PartitionSpec`` leaves for ``tree``, mirroring ``specs`` wherever ``params`` fits.

    Args:
      tree: any state tree containing parameter-structured subtrees (a ``TrainState``, an optax
        state, a transform state).
      params: the parameter tree.
      specs: the parameters' specs (:func:`param_specs`).

    Returns:
      A tree with ``tree``'s structure of ``PartitionSpec`` (``None`` leaves stay ``None``).
    """
    try:
        return jax.tree.map(
            lambda p, s, sub: jax.tree.map(lambda x: _aligned(x, p, s), sub),
            params,
            specs,
            tree,
        )
    except (ValueError, TypeError):
        pass
    children, treedef = _one_level(tree)
    if len(children) == 1 and children[0] is tree:
        return PartitionSpec()
    return jax.tree_util.tree_unflatten(
        treedef, [None if c is None else state_specs(c, params, specs) for c in children]
    )


def state_shardings(state: Any, mesh: Mesh, rules: Rules = ()) -> Any:
    """The ``NamedSharding`` of every leaf of a train state (see the module docstring).

    Args:
      state: a :class:`mixjax.train.TrainState` (or any tree with a ``params`` attribute).
      mesh: the mesh.
      rules: model-parallel rules (:func:`param_specs`); none replicates everything.

    Returns:
      A tree with ``state``'s structure holding ``NamedSharding`` leaves.
    """
    specs = param_specs(state.params, mesh, rules)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        state_specs(state, state.params, specs),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    # device_put cannot target other processes' devices: each process fills its own shards.
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def put(tree: Any, shardings: Any) -> Any:
    """``tree`` placed with ``shardings`` (a no-op for leaves already there), in any process.

    Every process must pass the same values; across processes each fills only its own devices.
    """
    return jax.tree.map(_put, tree, shardings)


def shard_state(state: Any, mesh: Mesh, rules: Rules = ()) -> Any:
    """Places ``state`` on the mesh with :func:`state_shardings` (same value in every process)."""
    return put(state, state_shardings(state, mesh, rules))


def batch_spec(steps_per_call: int = 1) -> PartitionSpec:
    """The spec of a batch array: examples (axis 0, or 1 for a stacked ``(K, B, ...)``) on data."""
    return PartitionSpec(DATA) if steps_per_call == 1 else PartitionSpec(None, DATA)


def check_batch(
    fn_name: str, batch: Mapping[str, Any], size: int, steps_per_call: int, processes: int = 1
) -> None:
    """Raises ``ValueError`` unless every batch array's example axis splits over ``size``.

    ``batch`` is this process's part; the global batch is ``processes`` times larger.
    """
    axis = 0 if steps_per_call == 1 else 1
    for name, value in batch.items():
        shape = tuple(np.shape(value))
        if len(shape) <= axis:
            raise ValueError(
                f"{fn_name}: batch[{name!r}] of shape {shape} has no example axis {axis}"
            )
        total = shape[axis] * processes
        if total % size:
            raise ValueError(
                f"{fn_name}: the global batch of {total} examples (batch[{name!r}] {shape}, "
                f"{processes} process(es)) is not divisible by the data axis of size {size}"
            )


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, *, steps_per_call: int = 1) -> dict:
    """This process's batch as global arrays split over the mesh's ``"data"`` axis.

    Args:
      batch: a dict of ``(B_local, ...)`` arrays (``(K, B_local, ...)`` when ``steps_per_call
        = K > 1``), this process's consecutive part of the global batch (the whole batch in a
        single process); process ``i`` holds examples ``[i * B_local, (i + 1) * B_local)``.
      mesh: the mesh.
      steps_per_call: ``K``, as in :func:`mixjax.train.make_train_step`.

    Returns:
      A dict of global ``jax.Array`` of ``(B_local * process_count, ...)`` examples.

    Raises:
      ValueError: the global batch size is not divisible by the data axis size.
    """
    fn_name = "mixjax.parallel.shard_batch"
    steps_per_call = _checks.integer(fn_name, "steps_per_call", steps_per_call, 1)
    check_batch(fn_name, batch, mesh.shape[DATA], steps_per_call, jax.process_count())
    sharding = NamedSharding(mesh, batch_spec(steps_per_call))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
