"""Bounded readers of the two artifact containers (:mod:`mixjax.export.artifact` has the layouts).

Checksums only catch accidents: whoever hands over a file can recompute them. So the readers
trust no size, count or shape the file declares: each is checked against the bytes actually
present, and against the limits below, before anything is allocated or inflated, and the
manifest's structure is validated before any of it is used. Reading a container costs a few
times the file's size (the file, its arrays, one member at a time; a compact manifest inflates
to at most :data:`MAX_MANIFEST_BYTES`); the records are then checked by their decoders, which
bound each decoded leaf by its stored bits (:mod:`mixjax.export.codebook`).

* Zip: members must be stored (our writer never deflates), with declared sizes the file holds;
  no member appears twice and only ``manifest.json`` and the manifest's ``arrays/<name>.npy``
  may appear. Each ``.npy`` header is parsed here: a plain numeric dtype (bool, int, uint,
  float), C order, and exactly ``count * itemsize`` bytes after it.
* Compact: the zlib manifest is inflated in one bounded step, to at most
  :data:`MAX_MANIFEST_BYTES` and to :data:`MANIFEST_RATIO` times its compressed size plus
  :data:`MANIFEST_SLACK` (the manifests of ``mixjax run`` inflate 3.6 to 4.6 times; a
  thousand near-identical leaves, 19 times); the stream must end exactly at its ``n`` bytes.
* JSON: no key twice in an object, nesting at most :data:`MAX_DEPTH` deep (records nest 5).

Every failure is a ``ValueError`` made by the caller's ``fail(message)``, which names the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from mixjax import _files
from mixjax.export import encoding

__all__ = [
    "DIGEST",
    "FORMAT",
    "MAGIC",
    "MANIFEST_RATIO",
    "MANIFEST_SLACK",
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "VERSION",
    "canonical",
    "read",
    "sha256",
]

FORMAT = "mixjax.artifact"
VERSION = 1
MAGIC = b"MJXA"
DIGEST = 32
MAX_MANIFEST_BYTES = 64 << 20
MANIFEST_RATIO = 64
MANIFEST_SLACK = 64 << 10
MAX_DEPTH = 32
_MANIFEST = "manifest.json"

Fail = Callable[[str], ValueError]
_short = encoding.short_repr


def sha256(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    """The canonical JSON of ``obj``: sorted keys, no spaces (what the zip manifest hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def read(blob: bytes, fail: Fail) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """``(container, manifest, arrays)`` of a file's bytes, everything checked (module doc).

    The manifest has ``"leaves"`` and, when present, ``"model_state"`` (lists of records with
    unique ``"path"`` strings that form a tree, and a ``"kind"`` string) and a ``"metadata"``
    dict; the records themselves are checked by decoding them (:func:`mixjax.export.load`).
    """
    if blob.startswith(MAGIC):
        return ("compact", *_read_compact(blob, fail))
    return ("zip", *_read_zip(blob, fail))


def _parse(text: bytes, fail: Fail) -> dict[str, Any]:
    try:
        manifest = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise fail("corrupted manifest (JSON nested too deeply)") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a duplicate key
        raise fail(f"corrupted manifest ({str(err)[:200]})") from None
    if not _shallow(manifest, MAX_DEPTH):
        raise fail(f"corrupted manifest (JSON nested more than {MAX_DEPTH} deep)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise fail(f"not a mixjax artifact (format {_short(found)})")
    version = manifest.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= VERSION:
        raise fail(f"format version {_short(version)}; this mixjax reads {VERSION}")
    return manifest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {_short(twice)} appears twice in an object")
    return obj


def _shallow(obj: Any, limit: int) -> bool:
    """Whether ``obj`` (parsed JSON) nests lists and dicts at most ``limit`` deep (no recursion)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return False
            stack.extend(
                (v, depth + 1) for v in (node.values() if isinstance(node, dict) else node)
            )
    return True


def _check_structure(manifest: dict[str, Any], fail: Fail) -> None:
    _check_records(manifest.get("leaves"), "leaves", fail)
    if "model_state" in manifest:
        _check_records(manifest["model_state"], "model_state", fail)
    metadata = manifest.get("metadata", {})
    if not isinstance(metadata, dict):
        raise fail(f"metadata must be a JSON object, got {type(metadata).__name__}")


def _check_records(leaves: Any, key: str, fail: Fail) -> None:
    """``manifest[key]``: a list of records with unique non-empty paths that form a tree."""
    if not isinstance(leaves, list):
        raise fail(f"{key!r} must be a list of records, got {type(leaves).__name__}")
    tree: dict[str, Any] = {}
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, dict):
            raise fail(f"leaf {i} is not a record (a JSON object): {_short(leaf)}")
        path, kind = leaf.get("path"), leaf.get("kind")
        if not isinstance(path, str) or not path:
            raise fail(f"leaf {i} has no path (a non-empty string), got {_short(path)}")
        if not isinstance(kind, str):
            raise fail(f"leaf {_short(path)} has no kind (a string), got {_short(kind)}")
        # The paths must form a tree, as Artifact.params nests them: no leaf under another.
        *parents, last = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
            if node is None:
                raise fail(f"leaf {_short(path)} lies under another leaf")
        if last in node:
            again = node[last] is None
            raise fail(f"leaf {_short(path)} {'appears twice' if again else 'has leaves under it'}")
        node[last] = None


def _plain(dtype: np.dtype) -> bool:
    """A dtype arrays may be stored in: bool, int, uint or float, no fields or subarrays."""
    return dtype.kind in "biuf" and dtype.fields is None and dtype.subdtype is None


# ---------------------------------------------------------------- zip


def _read_zip(blob: bytes, fail: Fail) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(blob))
        infos = zf.infolist()
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, struct.error) as err:
        raise fail(f"truncated or corrupted file ({err})") from None
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if name in members:
            raise fail(f"member {_short(name)} appears twice")
        members[name] = info
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise fail(
                f"member {_short(name)} is compressed or encrypted (method "
                f"{info.compress_type}); artifacts store their members"
            )
        if info.file_size != info.compress_size or info.header_offset + info.file_size > len(blob):
            raise fail(
                f"member {_short(name)} declares {info.file_size} bytes ({info.compress_size} "
                f"stored at offset {info.header_offset}), which the {len(blob)}-byte file "
                "does not hold"
            )
    if _MANIFEST not in members:
        raise fail(f"not a mixjax artifact (no {_MANIFEST})")
    if members[_MANIFEST].file_size > MAX_MANIFEST_BYTES:
        raise fail(f"the manifest has {members[_MANIFEST].file_size} bytes, more than the limit")
    manifest = _parse(_member(zf, _MANIFEST, fail, "truncated or corrupted file"), fail)
    claimed = manifest.pop("sha256", None)
    if claimed != sha256(canonical(manifest)):
        raise fail("manifest checksum mismatch (the file is corrupted or was modified)")
    _check_structure(manifest, fail)
    digests = manifest.get("arrays")
    if not isinstance(digests, dict) or not all(isinstance(d, str) for d in digests.values()):
        raise fail(f"'arrays' must map array names to sha256 strings, got {_short(digests)}")
    expected = {f"arrays/{name}.npy": name for name in digests}
    unexpected = [name for name in members if name != _MANIFEST and name not in expected]
    if unexpected:
        raise fail(f"unexpected member {_short(unexpected[0])}")
    arrays = {}
    for member, name in expected.items():
        if member not in members:
            raise fail(f"array {_short(name)} is missing")
        data = _member(zf, member, fail, f"array {_short(name)} is corrupted")
        if sha256(data) != digests[name]:
            raise fail(f"array {_short(name)} checksum mismatch (corrupted or modified)")
        arrays[name] = _npy(data, name, fail)
    return manifest, arrays


def _member(zf: zipfile.ZipFile, name: str, fail: Fail, what: str) -> bytes:
    """A stored member's bytes (sizes checked by the caller), its CRC verified by zipfile."""
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, RuntimeError, struct.error) as err:
        raise fail(f"{what} ({err})") from None


def _npy(data: bytes, name: str, fail: Fail) -> np.ndarray:
    """The array of a ``.npy`` member, its header checked against its bytes before any copy."""
    fp = io.BytesIO(data)
    try:
        shape, fortran, dtype = _files.npy_header(fp)
        count = encoding.shape_size(shape)
    except (ValueError, TypeError, SyntaxError) as err:
        raise fail(f"array {_short(name)} is not a plain .npy array ({err})") from None
    if fortran or not _plain(dtype):
        order = ", Fortran order" if fortran else ""
        raise fail(f"array {_short(name)} is not a plain .npy array (dtype {dtype}{order})")
    offset = fp.tell()
    if count * dtype.itemsize != len(data) - offset:
        raise fail(
            f"array {_short(name)}: its header declares {shape} {dtype} "
            f"({count * dtype.itemsize} bytes), the member holds {len(data) - offset}"
        )
    return np.frombuffer(data, dtype, count, offset).reshape(shape).copy()


# ---------------------------------------------------------------- compact


def _read_compact(blob: bytes, fail: Fail) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    body, digest = memoryview(blob)[:-DIGEST], blob[-DIGEST:]  # a view: no copy of the file
    if len(blob) < len(MAGIC) + 4 + DIGEST or hashlib.sha256(body).digest() != digest:
        raise fail("checksum mismatch (the file is truncated, corrupted or was modified)")
    (size,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    if start + size > len(body):
        raise fail(f"the manifest's {size} bytes run past the end of the file")
    manifest = _parse(_inflate(body[start : start + size], fail), fail)
    _check_structure(manifest, fail)
    entries = manifest.get("arrays")
    if not isinstance(entries, list):
        raise fail(f"'arrays' must be a list of [name, dtype, shape], got {_short(entries)}")
    offset, arrays = start + size, {}
    for entry in entries:
        try:
            if not isinstance(entry, list) or len(entry) != 3:
                raise TypeError("expected [name, dtype, shape]")
            name, dtype, shape = entry
            if not isinstance(name, str) or not isinstance(dtype, str):
                raise TypeError("expected [name, dtype, shape]")
            dtype = np.dtype(dtype)
            count = encoding.shape_size(shape)
            if not _plain(dtype):
                raise TypeError(f"dtype {dtype}")
        except (TypeError, ValueError, SyntaxError) as err:
            raise fail(f"bad array entry {_short(entry)} ({err})") from None
        if name in arrays:
            raise fail(f"array {_short(name)} is listed twice")
        end = offset + count * dtype.itemsize
        if end > len(body):
            raise fail(f"array {_short(name)} runs past the end of the data")
        arrays[name] = np.frombuffer(body, dtype, count, offset).reshape(shape).copy()
        offset = end
    if offset != len(body):
        raise fail(f"{len(body) - offset} bytes follow the last array")
    return manifest, arrays


def _inflate(data: memoryview, fail: Fail) -> bytes:
    """The compact manifest's JSON bytes, inflated at most to the limits (module docstring)."""
    limit = min(MAX_MANIFEST_BYTES, MANIFEST_RATIO * len(data) + MANIFEST_SLACK)
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, limit + 1)
    except zlib.error as err:
        raise fail(f"corrupted manifest ({err})") from None
    if len(text) > limit:
        raise fail(
            f"the manifest inflates to more than {limit} bytes ({MANIFEST_RATIO}x its "
            f"{len(data)} compressed bytes + {MANIFEST_SLACK}, at most {MAX_MANIFEST_BYTES})"
        )
    if not inflater.eof:
        raise fail("corrupted manifest (its zlib stream is truncated)")
    if inflater.unused_data:
        raise fail(f"{len(inflater.unused_data)} bytes follow the manifest's zlib stream")
    return text
