"""Compressed artifacts: real integer tensors (int8, packed int4, ...) with scales, saved safely.

:func:`compress` turns a parameter tree, a transform and its state into an :class:`Artifact`;
``artifact.params()`` rebuilds the float tree, equal (``==``) to ``transform.apply(params,
state)``; :func:`save` writes one file atomically and :func:`load` reads it back, checking every
checksum. Leaves are encoded as records (:mod:`mixjax.export.records`): quantized leaves as
``"int"`` (int8; 4-bit codes two per byte), the others verbatim as ``"array"``. Leaves with few
distinct values (clustered, pruned, quantized) become ``"codebook"`` or ``"sparse"`` records
(:mod:`mixjax.export.codebook`) where those are smaller; :func:`mixjax.export.table` lists what
each leaf costs.

Two containers hold the same manifest (version 1), chosen by ``compress(..., container=)``:

* ``"zip"``: a zip archive (stored, not deflated; fixed timestamps, so the bytes are
  reproducible) holding ``manifest.json``: ``{"format": "mixjax.artifact", "version": 1,
  "leaves": [{"path": ..., **record}, ...], "arrays": {name: sha256 hex of its member},
  "sha256": ...}``, the last field being the sha256 of the canonical JSON (sorted keys, no
  spaces) of the manifest without it; and ``arrays/<name>.npy``, one ``.npy`` file per array,
  read with ``allow_pickle=False``. About 250 bytes per array go to headers.
* ``"compact"``, for small models where those headers would dominate: the 4 bytes ``MJXA``, a
  little-endian uint32 ``n``, ``n`` bytes of zlib-deflated canonical JSON ``{"format",
  "version", "leaves", "arrays": [[name, numpy dtype str, shape], ...]}``, the arrays' raw C-order
  bytes back to back in that order, and the sha256 (32 raw bytes) of everything before it.

No pickle anywhere. Loading rejects, with an error naming the file: a truncated or corrupted
file (zip CRC, checksums), a manifest or array whose checksum does not match, an unknown format,
a newer version, and records that do not decode. The checksums only catch accidents (anyone can
recompute them), so the reader (:mod:`mixjax.export.reading`) trusts no declared size either:
every size, count and shape is checked against the bytes present and against fixed limits
before anything is allocated or inflated, and the manifest's structure before it is used.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mixjax import _checks, _files, select
from mixjax.core import ParamTransform
from mixjax.export import encoding, kinds, reading
from mixjax.export.reading import FORMAT, MAGIC, VERSION
from mixjax.export.records import Record

__all__ = ["CONTAINERS", "FORMAT", "VERSION", "Artifact", "compress", "load", "save"]

CONTAINERS = ("zip", "compact")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_sha256, _canonical = reading.sha256, reading.canonical


def _nested(paths: list[str], values: list[Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in zip(paths, values, strict=True):
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


@dataclasses.dataclass(frozen=True, eq=False)
class Artifact:
    """A compressed parameter tree.

    Attributes:
      leaves: one record per parameter leaf, in ``jax.tree.leaves`` order, each with its
        ``"path"`` (see :mod:`mixjax.export.records`).
      arrays: the arrays the records name (uint8 packed codes, float32 scales, ...).
      treedef: the parameter tree's structure when made by :func:`compress`; ``None`` after
        :func:`load`, where :meth:`params` builds nested dicts from the paths.
      container: ``"zip"`` or ``"compact"``, the file layout :func:`save` writes (module
        docstring).
      metadata: JSON-able dict saved in the manifest under ``"metadata"`` (omitted when
        empty), e.g. the model name and preprocessing ``mixjax eval`` needs; add it with
        ``dataclasses.replace(artifact, metadata={...})``.
      state_leaves: one record per leaf of the model's other variables (``batch_stats`` and
        any other collection: :func:`compress`'s ``model_state``), saved under
        ``"model_state"`` (omitted when empty); :meth:`model_state` rebuilds them.
      state_treedef: the model state's structure when made by :func:`compress`.
    """

    leaves: tuple[Record, ...]
    arrays: Mapping[str, np.ndarray]
    treedef: Any = None
    container: str = "zip"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    state_leaves: tuple[Record, ...] = ()
    state_treedef: Any = None

    def __repr__(self) -> str:
        kinds = [leaf["kind"] for leaf in self.leaves]
        counts = ", ".join(f"{k}={kinds.count(k)}" for k in sorted(set(kinds)))
        state = f", {len(self.state_leaves)} model-state leaves" if self.state_leaves else ""
        return f"Artifact({len(self.leaves)} leaves: {counts}{state}; {self.nbytes} bytes)"

    @property
    def paths(self) -> list[str]:
        """The leaf paths, in order."""
        return [leaf["path"] for leaf in self.leaves]

    def record(self, path: str) -> Record:
        """The record of the leaf at ``path``; ``KeyError`` if there is none."""
        for leaf in self.leaves:
            if leaf["path"] == path:
                return leaf
        raise KeyError(f"mixjax.export.Artifact: no leaf {path!r}; leaves are {self.paths}")

    def params(self, like: Any = None) -> Any:
        """The float parameter tree (NumPy arrays), equal to the fake-quant view it came from.

        Args:
          like: optional tree whose structure (and paths) to rebuild, e.g. the original params
            or an ``nnx.State``; default: the compressed tree's structure, or nested dicts keyed
            by path components after :func:`load`.

        Raises:
          ValueError: ``like`` has different leaf paths.
        """
        return self._tree("params", self.leaves, self.treedef, like)

    def model_state(self, like: Any = None) -> Any:
        """The model's other variables (e.g. ``{"batch_stats": ...}``), as stored; ``{}`` if the
        artifact holds none. ``like`` as for :meth:`params`.

        Raises:
          ValueError: ``like`` has different leaf paths.
        """
        return self._tree("model_state", self.state_leaves, self.state_treedef, like)

    def _tree(self, name: str, records: tuple[Record, ...], treedef: Any, like: Any) -> Any:
        values = [kinds.decode(leaf, self.arrays) for leaf in records]
        paths = [leaf["path"] for leaf in records]
        if like is not None:
            found = [p for p, _ in select.leaves_with_paths(like)]
            if found != paths:
                raise ValueError(
                    f"mixjax.export.Artifact.{name}: like= has leaves {found[:10]}, the "
                    f"artifact has {paths[:10]}"
                )
            return jax.tree.unflatten(jax.tree.structure(like), values)
        if treedef is not None:
            return jax.tree.unflatten(treedef, values)
        return _nested(paths, values)

    def to_bytes(self) -> bytes:
        """The file contents :func:`save` writes."""
        return self._bytes

    @functools.cached_property
    def _bytes(self) -> bytes:
        if self.container == "compact":
            return self._compact_bytes()
        members = {}
        for name, array in sorted(self.arrays.items()):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            members[f"arrays/{name}.npy"] = buf.getvalue()
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "leaves": list(self.leaves),
            "arrays": {name: _sha256(members[f"arrays/{name}.npy"]) for name in self.arrays},
            **self._metadata_entry(),
        }
        manifest["sha256"] = _sha256(_canonical(manifest))
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(zipfile.ZipInfo("manifest.json", _ZIP_DATE), json.dumps(manifest))
            for member, data in members.items():
                zf.writestr(zipfile.ZipInfo(member, _ZIP_DATE), data)
        return out.getvalue()

    def _metadata_entry(self) -> dict[str, Any]:
        """The manifest's optional entries: metadata and model state, each only when present."""
        entries: dict[str, Any] = {"metadata": dict(self.metadata)} if self.metadata else {}
        if self.state_leaves:
            entries["model_state"] = list(self.state_leaves)
        return entries

    def _compact_bytes(self) -> bytes:
        names = sorted(self.arrays)
        arrays = [np.ascontiguousarray(self.arrays[name]) for name in names]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "leaves": list(self.leaves),
            "arrays": [[n, a.dtype.str, list(a.shape)] for n, a in zip(names, arrays, strict=True)],
            **self._metadata_entry(),
        }
        head = zlib.compress(_canonical(manifest), 9)
        body = b"".join([MAGIC, struct.pack("<I", len(head)), head, *(a.tobytes() for a in arrays)])
        return body + hashlib.sha256(body).digest()

    @property
    def nbytes(self) -> int:
        """Bytes :func:`save` writes (the whole file: codes, scales, manifest, headers)."""
        return len(self._bytes)


def compress(
    params: Any,
    transform: ParamTransform,
    state: Any,
    *,
    model_state: Any = None,
    container: str = "zip",
) -> Artifact:
    """Encodes the view ``transform.apply(params, state)`` leaf by leaf.

    Leaves covered by a quantization state inside ``state`` (a
    :class:`mixjax.quant.FakeQuantState` or :class:`mixjax.quant.LsqState`, also inside a
    ``chain`` state; :data:`mixjax.export.kinds.ENCODERS`) become integer records; the others
    are stored verbatim; a leaf with at most 256 distinct values becomes a ``"codebook"`` record
    instead where that is smaller (:mod:`mixjax.export.codebook`).

    Args:
      params: the parameter tree (e.g. a linen ``params`` dict, not the ``{"params": ...}``
        variables dict, or an ``nnx.State``).
      transform: the transform (e.g. ``fake_quant(4)`` or a ``chain`` ending in it).
      state: its state.
      model_state: the model's other variables, stored losslessly beside the parameters (e.g.
        a linen ``{"batch_stats": ...}`` or an NNX ``nnx.State`` of batch statistics), so the
        artifact runs the model alone; ``None``: none.
      container: the file layout, ``"zip"`` or ``"compact"`` (module docstring).

    Returns:
      An :class:`Artifact` whose ``params()`` equals the view and ``model_state()`` the
      model state.

    Raises:
      TypeError: ``transform`` is not a ParamTransform.
      ValueError: a quantized leaf holds NaN/Inf or is not on its grid; an unknown container.
    """
    _checks.choice("mixjax.export.compress", "container", container, CONTAINERS)
    _checks.instance(
        "mixjax.export.compress", "transform", transform, ParamTransform, "a ParamTransform"
    )
    view = jax.device_get(jax.jit(transform.apply)(params, state))
    arrays: dict[str, np.ndarray] = {}

    def store(array):
        name = str(len(arrays))
        arrays[name] = np.asarray(array)
        return name

    leaves = []
    encoders = kinds.leaf_encoders(view, state, "mixjax.export.compress")
    for (path, leaf), encoder in zip(select.leaves_with_paths(view), encoders, strict=True):
        record = kinds.encode_leaf(path, np.asarray(leaf), encoder, store)
        leaves.append({"path": path, **record})
    model_state = {} if model_state is None else jax.device_get(model_state)
    state_leaves = tuple(
        {"path": path, **kinds.encode_leaf(path, np.asarray(leaf), None, store)}
        for path, leaf in select.leaves_with_paths(model_state)
    )
    return Artifact(
        tuple(leaves),
        arrays,
        jax.tree.structure(view),
        container,
        state_leaves=state_leaves,
        state_treedef=jax.tree.structure(model_state),
    )


def load(path: str | os.PathLike) -> Artifact:
    """Reads an artifact written by :func:`save` (either container), verifying it.

    No size the file declares is trusted (:mod:`mixjax.export.reading`): sizes, counts and
    shapes are checked against the bytes present before anything is allocated or inflated, and
    every record is decoded once to check it, one at a time. Memory stays a bounded multiple of
    the file's size: the containers a few times it, a decoded leaf at most ``2**gap_bits``
    entries per stored position code (:mod:`mixjax.export.codebook`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is truncated, corrupted, tampered with (checksums), of another format
        or a newer version, malformed (sizes, structure) or holds records that do not decode;
        the message names the file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()

    def fail(message):
        return ValueError(f"mixjax.export.load: {path!r}: {message}")

    container, manifest, arrays = reading.read(blob, fail)
    artifact = Artifact(
        tuple(manifest["leaves"]),
        arrays,
        container=container,
        metadata=manifest.get("metadata", {}),
        state_leaves=tuple(manifest.get("model_state", ())),
    )
    for what, leaf in [
        *(("leaf", leaf) for leaf in artifact.leaves),
        *(("model-state leaf", leaf) for leaf in artifact.state_leaves),
    ]:
        try:
            kinds.decode(leaf, arrays)
        except (ValueError, TypeError, OverflowError) as err:
            where = encoding.short_repr(leaf["path"], 200)
            raise fail(f"{what} {where}: {err}") from None
    return artifact


def save(artifact: Artifact, path: str | os.PathLike) -> str:
    """Writes ``artifact`` to ``path`` atomically (a temporary file, then ``os.replace``).

    A crash leaves either the previous file or the complete new one, never half a file.

    Returns:
      ``path`` as a string.

    Raises:
      TypeError: ``artifact`` is not an :class:`Artifact`.
      OSError: the file cannot be written.
    """
    _checks.instance("mixjax.export.save", "artifact", artifact, Artifact, "an Artifact")
    path = os.fspath(path)
    data = artifact.to_bytes()
    _files.write_atomic(path, lambda f: f.write(data))
    return path
