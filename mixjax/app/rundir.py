"""The output directory of ``mixjax run``: what mixjax owns there, and which run it holds.

A run writes its outputs into its directory and nothing else: the artifact ``model.mjx``,
``report.json``, the plots (:func:`mixjax.app.plots.files`), one checkpoint directory per stage
``checkpoints/<stage>`` (the list :func:`mixjax.app.common.prepare` passes to :func:`prepare`), and
the *run file* ``mixjax-run.json``::

    {"format": "mixjax.run", "version": 1,
     "config": {"data": {...}, "train": {...}, ...},   # the configuration the run started with
     "owned": ["model.mjx", "report.json", ...],       # the outputs this run owns
     "resumes": [{"changed": {"run.checkpoint_every": [500, 100]}, "quiet": true}, ...]}

The run file is written (atomically) before any output, so every file mixjax may have written
is listed in it, whenever the run was interrupted. :func:`prepare` applies the rules:

* a missing or empty directory starts a new run;
* a directory holding anything is refused, unless ``resume`` or ``overwrite`` is given;
* ``overwrite`` removes the outputs a run file there lists and nothing else; an output path that
  exists without being listed (a file of the user's named ``report.json``) is refused;
* ``resume`` continues the run the run file describes: the configuration must be the one it
  started with, except for the keys in :data:`CHANGE_ON_RESUME` (recorded in ``"resumes"``); a
  directory without a run file is refused if it holds anything, and an empty one starts fresh
  (said on stderr).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

from mixjax import _files
from mixjax.app import config as config_lib

__all__ = [
    "ARTIFACT",
    "CHANGE_ON_RESUME",
    "CHECKPOINTS",
    "REPORT",
    "RUN_FILE",
    "prepare",
    "read_run_file",
    "write_json",
]

ARTIFACT = "model.mjx"
REPORT = "report.json"
RUN_FILE = "mixjax-run.json"
CHECKPOINTS = "checkpoints"
# Keys whose change cannot alter what the run computes (output: the same directory, spelled
# another way; checkpoint_every: how often progress is saved).
CHANGE_ON_RESUME = frozenset({"run.output", "run.checkpoint_every"})
_FORMAT = "mixjax.run"
_VERSION = 1
_NAME = "mixjax.app.rundir"


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (a temporary file, fsync, ``os.replace``)."""
    _files.write_atomic(path, lambda f: json.dump(obj, f, indent=1), text=True)


def _flat(config: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in config.items() for k, v in values.items()}


def read_run_file(out: str) -> dict[str, Any] | None:
    """The run file in ``out`` (module docstring), or ``None`` where there is none.

    Raises:
      ValueError: a file that cannot be read or is not a run file of this version.
    """
    path = os.path.join(out, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            run = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{_NAME}: {path!r} cannot be read ({err})") from None
    ok = (
        isinstance(run, dict)
        and run.get("format") == _FORMAT
        and run.get("version") == _VERSION
        and isinstance(run.get("config"), dict)
        and all(isinstance(v, dict) for v in run["config"].values())
        and isinstance(run.get("owned"), list)
        and all(isinstance(p, str) for p in run["owned"])
        and isinstance(run.get("resumes", []), list)
    )
    if not ok:
        raise ValueError(f"{_NAME}: {path!r} is not a mixjax run file of version {_VERSION}")
    return run


def _inside(out: str, relative: str) -> str:
    """``out/relative``, refusing paths that leave ``out`` (a hand-edited run file)."""
    root = os.path.realpath(out)
    path = os.path.realpath(os.path.join(out, relative))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"{_NAME}: the run file lists {relative!r}, which is not inside {out!r}")
    return path


def _remove(out: str, owned: list[str]) -> None:
    for relative in owned:
        path = _inside(out, relative)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _changes(started: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    keys = sorted(set(started) | set(now))
    return {k: [started.get(k), now.get(k)] for k in keys if started.get(k) != now.get(k)}


def _resume(out: str, run: dict[str, Any], config: dict, extras: dict) -> dict[str, Any]:
    changed = _changes(_flat(run["config"]), _flat(config))
    refused = {k: v for k, v in changed.items() if k not in CHANGE_ON_RESUME}
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in refused.items())
        raise ValueError(
            f"{_NAME}: --resume: {out!r} holds a run with another configuration ({listed}); "
            "resume with the run's settings, or start it again with --overwrite"
        )
    resumes = [*run.get("resumes", []), {"changed": changed, **extras}]
    return {**run, "config": config, "resumes": resumes}


def prepare(
    out: str,
    cfg: config_lib.Config,
    outputs: list[str],
    *,
    resume: bool,
    overwrite: bool,
    extras: dict[str, Any] | None = None,
    log: Callable[[str], Any] = print,
    resumable: bool = True,
) -> dict[str, Any]:
    """Makes ``out`` ready for a run of ``cfg`` (rules in the module docstring).

    Args:
      out: the output directory.
      cfg: the validated configuration.
      outputs: the paths, relative to ``out``, that the run writes.
      resume: continue the run in ``out``.
      overwrite: replace the outputs of the run in ``out``.
      extras: settings outside the configuration to record with a resume (``{"quiet": ...}``).
      log: called with a message when a resume starts fresh.
      resumable: whether the command writing ``out`` can ``--resume`` (the refusal of a
        non-empty directory suggests it only then; ``mixjax compress`` cannot).

    Returns:
      The run file as written: its ``"config"`` and ``"resumes"`` belong in the report.

    Raises:
      ValueError: both ``resume`` and ``overwrite``; ``out`` is not a directory, holds files
        without ``resume``/``overwrite``, holds a run of another configuration (the differing
        keys are listed), or holds a file at an output path that no run file there lists.
    """
    if resume and overwrite:
        raise ValueError(f"{_NAME}: --resume and --overwrite exclude each other")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{_NAME}: --output {out!r} exists and is not a directory")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    config = config_lib.as_dict(cfg)
    run = read_run_file(out) if entries else None
    if resume and run is not None:
        run = _resume(out, run, config, extras or {})
        write_json(os.path.join(out, RUN_FILE), run)
        return run
    if resume and entries:
        raise ValueError(
            f"{_NAME}: --resume: {out!r} holds files but no {RUN_FILE}, so no mixjax run to "
            "continue"
        )
    if resume:
        log(f"--resume: {out!r} holds no run yet; starting a new one")
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        hint = "pass --resume to continue the run there, " if resumable else "pass "
        raise ValueError(
            f"{_NAME}: --output {out!r} is not empty ({shown}); {hint}--overwrite to replace "
            "what mixjax wrote there (other files are kept), or choose another directory"
        )
    if run is not None:
        _remove(out, run["owned"])
    owned = list(outputs)
    for relative in owned:
        if os.path.lexists(os.path.join(out, relative)):
            raise ValueError(
                f"{_NAME}: --overwrite: {os.path.join(out, relative)!r} exists but mixjax did "
                f"not write it (no {RUN_FILE} there lists it); move it away first"
            )
    os.makedirs(out, exist_ok=True)
    run = {"format": _FORMAT, "version": _VERSION, "config": config, "owned": owned}
    write_json(os.path.join(out, RUN_FILE), run)
    return run
