"""Orbax checkpoints of a whole :class:`mixjax.train.TrainState` (or any pytree of arrays).

Layout on disk (one checkpoint per step, named by the step)::

    DIRECTORY/
      3/
        _CHECKPOINT_METADATA      orbax's step metadata (commit time)
        arrays/                   the non-empty array leaves in ``jax.tree.leaves`` order, named
                                  0, 1, ... (orbax OCDBT / TensorStore; each process writes its
                                  own shards). Orbax refuses zero-size arrays (a delay FIFO of a
                                  leaf with no staleness), so those are rebuilt from ``like``.
        manifest/metadata         JSON: the path, shape and dtype of every leaf
      6/
      9.orbax-checkpoint-tmp/     a save in progress, or one a crash interrupted: ignored

The tree structure itself is not stored: :func:`restore` rebuilds it from ``like`` (e.g. a fresh
:func:`mixjax.train.init_train_state`), so NamedTuple optimizer states, ``nnx.State`` parameters,
``None`` leaves of mask mirror trees and a ``None`` model state come back exactly as ``like``
has them. The manifest lets :func:`restore` refuse a checkpoint that does not match ``like``
(naming the first differing leaf) before it reads any array; restored arrays take ``like``'s
shardings, so a state sharded over a mesh (:func:`mixjax.parallel.shard_state`) restores
sharded. No pickle is involved.

Atomicity: orbax writes a checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` when every file is written; :func:`save` then fsyncs the new checkpoint's files and
directories and ``DIRECTORY``, so the checkpoint survives a power loss once :func:`save` returns.
A crash mid-save leaves only the temporary directory, which :func:`steps`, :func:`latest_step`
and :func:`restore` ignore and the next :func:`save` removes; earlier checkpoints are untouched.
A checkpoint damaged afterwards (truncated or missing files) is a :class:`DamagedCheckpointError`
on :func:`restore`, so a caller can fall back to an older step.

Typed keys: orbax stores plain arrays, so a ``jax.random.key`` leaf (the state's ``rng``) is
saved as its ``jax.random.key_data`` (``uint32``) and rewrapped on restore with the key
implementation of ``like``'s leaf; the manifest records its dtype (``key<fry>``), so restoring
into a state with another implementation is refused.

Example (resume where a run stopped, checkpoint every 500 steps)::

    state = mixjax.train.init_train_state(params, tx, transform=transform, key=key)
    if mixjax.checkpoint.latest_step(ckpt_dir) is not None:
        state = mixjax.checkpoint.restore(ckpt_dir, state)
    for batch in batches:
        state, metrics = step(state, batch)
        if int(state.step) % 500 == 0:
            mixjax.checkpoint.save(ckpt_dir, state, keep=3)
"""

from __future__ import annotations

import itertools
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mixjax import _checks, select

__all__ = ["DamagedCheckpointError", "latest_step", "restore", "save", "steps"]

_SAVE = "mixjax.checkpoint.save"
_RESTORE = "mixjax.checkpoint.restore"
_STEPS = "mixjax.checkpoint.steps"
_ARRAYS = "arrays"
_MANIFEST = "manifest"
_FORMAT = 1


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be read: files missing, truncated or corrupted.

    Raised by :func:`restore` (the message names the checkpoint's directory); a checkpoint that
    reads but does not match ``like`` raises a plain ``ValueError`` instead. Resuming code can
    catch this one to fall back to an older checkpoint.
    """


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _flatten(fn_name: str, tree: Any, name: str) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)`` of ``tree``; every leaf must be an array."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [select.path_str(keypath) for keypath, _ in flat]
    leaves = [leaf for _, leaf in flat]
    for path, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{fn_name}: {name} must be a pytree of arrays (jax.Array or np.ndarray); leaf "
                f"{path!r} is a {type(leaf).__name__}"
            )
    return paths, leaves, treedef


def _entry(path: str, leaf: Any) -> dict[str, Any]:
    return {"path": path, "shape": list(np.shape(leaf)), "dtype": str(leaf.dtype)}


def _describe(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "no leaf"
    return f"leaf {entry['path']!r} {tuple(entry['shape'])} {entry['dtype']}"


def _sync_tree(root: pathlib.Path, checkpoint: pathlib.Path) -> None:
    """fsyncs the checkpoint's files, then its directories bottom-up, then ``root``'s entry."""
    walk = os.walk(checkpoint, topdown=False)
    for path in [*(os.path.join(d, f) for d, _, fs in walk for f in (*fs, "")), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, ascending.

    Temporary directories of saves in progress or interrupted by a crash are not listed.

    Args:
      directory: the checkpoint directory; one that does not exist holds no checkpoint.

    Returns:
      The steps, ascending (``[]`` if none).

    Raises:
      ValueError: ``directory`` exists but is not a directory.
    """
    root = pathlib.Path(directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{_STEPS}: {str(root)!r} is not a directory")
    return sorted(ocp.step.checkpoint_steps(root))


def latest_step(directory: str | os.PathLike) -> int | None:
    """The step of the newest complete checkpoint in ``directory``; ``None`` if there is none.

    Raises:
      ValueError: as :func:`steps`.
    """
    found = steps(directory)
    return found[-1] if found else None


def save(
    directory: str | os.PathLike,
    state: Any,
    *,
    step: int | None = None,
    keep: int | None = 3,
) -> pathlib.Path:
    """Writes ``state`` as the checkpoint of ``step``, atomically and durably (module docstring).

    Every process of a multi-process run must call it with its part of the same global state.

    Args:
      directory: the checkpoint directory (created if missing).
      state: a :class:`mixjax.train.TrainState`, or any pytree of arrays.
      step: the checkpoint's step (default ``int(state.step)``).
      keep: how many of the newest checkpoints to keep (older ones are deleted after this one is
        complete); ``None`` keeps all.

    Returns:
      The checkpoint's path, ``directory / str(step)``.

    Raises:
      TypeError: a leaf of ``state`` is not an array, or ``step`` is ``None`` and ``state`` has no
        ``step``.
      ValueError: ``step`` or ``keep`` not an int ``>= 0`` / ``>= 1``, or ``directory`` already
        holds a checkpoint of ``step``.
    """
    paths, leaves, _ = _flatten(_SAVE, state, "state")
    if step is None:
        if not hasattr(state, "step"):
            raise TypeError(
                f"{_SAVE}: pass step= for a state without a step attribute, got "
                f"{type(state).__name__}"
            )
        step = int(state.step)
    step = _checks.integer(_SAVE, "step", step, 0)
    keep = _checks.integer(_SAVE, "keep", keep, 1, optional=True)
    root = pathlib.Path(directory).absolute()
    if step in steps(root):
        raise ValueError(f"{_SAVE}: {str(root)!r} already holds a checkpoint of step {step}")
    manifest = {
        "format": _FORMAT,
        "leaves": [_entry(p, leaf) for p, leaf in zip(paths, leaves, strict=True)],
    }
    items = {_MANIFEST: ocp.args.JsonSave(manifest)}
    arrays = [jax.random.key_data(x) if _is_key(x) else x for x in leaves if np.size(x)]
    if arrays:  # orbax refuses an empty item
        items[_ARRAYS] = ocp.args.StandardSave(arrays)
    args = ocp.args.Composite(**items)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, cleanup_tmp_directories=True, enable_async_checkpointing=False
    )
    with ocp.CheckpointManager(root, options=options) as manager:
        manager.save(step, args=args)
        manager.wait_until_finished()
    checkpoint = root / str(step)
    _sync_tree(root, checkpoint)
    return checkpoint


def _check_match(where: str, saved: Any, paths: list[str], leaves: list[Any]) -> None:
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else None
        raise ValueError(
            f"{_RESTORE}: {where} has manifest format {found!r}; this version reads format "
            f"{_FORMAT}"
        )
    entries = saved.get("leaves")
    if not isinstance(entries, list):
        raise DamagedCheckpointError(
            f"{_RESTORE}: {where} is damaged: its manifest lists no leaves"
        )
    expected = [_entry(p, leaf) for p, leaf in zip(paths, leaves, strict=True)]
    for i, (got, want) in enumerate(itertools.zip_longest(entries, expected)):
        if got != want:
            raise ValueError(
                f"{_RESTORE}: {where} does not match like at leaf {i}: the checkpoint has "
                f"{_describe(got)}, like has {_describe(want)} ({len(entries)} vs "
                f"{len(expected)} leaves)"
            )


def _read(where: str, checkpointer: Any, checkpoint: pathlib.Path, item: str, args: Any) -> Any:
    """One item of a checkpoint; any failure to read it is a :class:`DamagedCheckpointError`."""
    try:
        return checkpointer.restore(checkpoint, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as err:  # orbax and TensorStore raise many types for damaged files
        detail = " ".join(str(err).split())[:300]
        raise DamagedCheckpointError(
            f"{_RESTORE}: {where} is damaged: its {item!r} cannot be read "
            f"({type(err).__name__}: {detail})"
        ) from err


def _target(leaf: Any) -> Any:
    """What orbax restores a leaf into: ``like``'s shape, dtype and sharding."""
    if isinstance(leaf, np.ndarray):
        return leaf
    data = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=data.sharding)


def restore(directory: str | os.PathLike, like: Any, *, step: int | None = None) -> Any:
    """Reads the checkpoint of ``step`` into the structure, dtypes and shardings of ``like``.

    Args:
      directory: the checkpoint directory.
      like: a state of the saved structure, e.g. a fresh :func:`mixjax.train.init_train_state`
        with the run's ``tx`` and ``transform`` (placed with :func:`mixjax.parallel.shard_state`
        for a sharded restore); only its structure, shapes, dtypes, shardings and key
        implementations are used.
      step: the checkpoint's step (default: the latest).

    Returns:
      A tree of ``like``'s type and structure holding the checkpoint's values: ``jax.Array``
      leaves with ``like``'s shardings (``np.ndarray`` where ``like`` has one).

    Raises:
      FileNotFoundError: ``directory`` does not exist or holds no checkpoint.
      TypeError: a leaf of ``like`` is not an array.
      ValueError: no checkpoint of ``step`` (the available steps are listed), or the checkpoint
        does not match ``like`` (the first differing leaf is named).
      DamagedCheckpointError: the checkpoint's files are missing, truncated or corrupted.
    """
    root = pathlib.Path(directory).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{_RESTORE}: checkpoint directory {str(root)!r} does not exist")
    available = steps(root)
    if not available:
        raise FileNotFoundError(f"{_RESTORE}: {str(root)!r} holds no checkpoint")
    step = available[-1] if step is None else _checks.integer(_RESTORE, "step", step, 0)
    if step not in available:
        raise ValueError(
            f"{_RESTORE}: {str(root)!r} holds no checkpoint of step {step}; available steps: "
            f"{available}"
        )
    paths, leaves, treedef = _flatten(_RESTORE, like, "like")
    checkpoint = root / str(step)
    where = f"checkpoint {str(checkpoint)!r}"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        saved = _read(where, checkpointer, checkpoint, _MANIFEST, ocp.args.JsonRestore())
        _check_match(where, saved, paths, leaves)
        targets = [_target(leaf) for leaf in leaves if np.size(leaf)]
        restore_args = ocp.args.StandardRestore(targets)
        arrays = iter(
            _read(where, checkpointer, checkpoint, _ARRAYS, restore_args) if targets else ()
        )
    restored = []
    for leaf in leaves:
        if not np.size(leaf):
            restored.append(leaf.copy())
        elif _is_key(leaf):
            restored.append(jax.random.wrap_key_data(next(arrays), impl=jax.random.key_impl(leaf)))
        else:
            restored.append(next(arrays))
    return jax.tree.unflatten(treedef, restored)
