"""Hostile artifact files for the reader's tests: each function writes one into a directory and
returns its path (a ``str``). Not a test module; ``import crafted`` from a test.

A checksum is no signature: whoever hands over a file can recompute it. So every file here has
valid checksums (the zip manifest's sha256, its members' CRC-32 and sha256, the compact file's
sha256) and is wrong only where its name says, which :func:`mixjax.export.load` must see for
itself. :func:`compact_file` and :func:`zip_file` build either container from any manifest dict
and arrays; the bombs are small files that declare huge sizes, built in well under a second
each (:func:`deflated_member` hashes its 1 GiB in about two).

The bombs (``BOMBS``) must only be loaded under a memory limit (``RLIMIT_AS``): a reader that
trusts their sizes allocates gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

FORMAT, VERSION, MAGIC = "mixjax.artifact", 1, b"MJXA"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
ESCAPES = "\x1b[31m\n| forged | row |\x1b[0m"  # ANSI codes, a newline, markdown cells


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def manifest(leaves: list, metadata: dict | None = None, **extra: Any) -> dict:
    """A version-1 manifest of ``leaves`` (records with their ``"path"``)."""
    out = {"format": FORMAT, "version": VERSION, "leaves": leaves, **extra}
    return {**out, "metadata": metadata} if metadata is not None else out


def compact_bytes(head: bytes, arrays: dict[str, np.ndarray] | None = None) -> bytes:
    """A compact file: MAGIC, ``len(head)``, ``head`` (zlib bytes), the arrays, the sha256."""
    data = [np.ascontiguousarray(a).tobytes() for a in (arrays or {}).values()]
    body = b"".join([MAGIC, struct.pack("<I", len(head)), head, *data])
    return body + hashlib.sha256(body).digest()


def compact_file(path: str, man: dict, arrays: dict[str, np.ndarray] | None = None) -> str:
    """Writes ``man`` (its ``"arrays"`` entries added from ``arrays`` unless given) as a compact
    file with a valid checksum."""
    arrays = arrays or {}
    if "arrays" not in man:
        entries = [[n, np.asarray(a).dtype.str, list(np.shape(a))] for n, a in arrays.items()]
        man = {**man, "arrays": entries}
    with open(path, "wb") as f:
        f.write(compact_bytes(zlib.compress(_canonical(man), 9), arrays))
    return str(path)


def zip_file(
    path: str, man: dict, arrays: dict[str, np.ndarray] | None = None, *, text: bytes = b""
) -> str:
    """Writes ``man`` (``"arrays"`` digests and ``"sha256"`` added) and the arrays as a stored
    zip artifact; ``text``, if given, is the manifest's exact JSON instead."""
    members = {f"arrays/{n}.npy": _npy(a) for n, a in (arrays or {}).items()}
    if not text:
        digests = {n: hashlib.sha256(members[f"arrays/{n}.npy"]).hexdigest() for n in arrays or {}}
        man = {**man, "arrays": man.get("arrays", digests)}
        text = json.dumps({**man, "sha256": hashlib.sha256(_canonical(man)).hexdigest()}).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(zipfile.ZipInfo("manifest.json", ZIP_DATE), text)
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, ZIP_DATE), data)
    return str(path)


def _array(path: str, name: str, shape: list, dtype: str = "float32") -> dict:
    return {"path": path, "kind": "array", "shape": shape, "dtype": dtype, "data": name}


# ---------------------------------------------------------------- bombs


def sparse_bomb(directory: str) -> str:
    """A ~275-byte ``"sparse"`` record of shape ``[2**31, 4]`` (32 GiB of float32) with no
    entries: relative positions with 0 entries "cover" any size unless the tail is checked."""
    positions = {"codec": "packed", "bits": 8, "count": 0, "data": "0"}
    sparse = {"codec": "relative", "zero": 0, "gap_bits": 8, "num_entries": 0}
    leaf = {
        "path": "w",
        "kind": "sparse",
        "shape": [2**31, 4],
        "dtype": "float32",
        "sparse": {**sparse, "positions": positions},
        "values": {"kind": "array", "shape": [0], "dtype": "float32", "data": "1"},
    }
    arrays = {"0": np.zeros(0, np.uint8), "1": np.zeros(0, np.float32)}
    return compact_file(os.path.join(directory, "sparse_bomb.mjx"), manifest([leaf]), arrays)


def bitmask_bomb(directory: str) -> str:
    """As :func:`sparse_bomb`, with a 1-bit mask of no bytes for its 2**33 entries."""
    positions = {"codec": "packed", "bits": 1, "count": 0, "data": "0"}
    leaf = {
        "path": "w",
        "kind": "sparse",
        "shape": [2**31, 4],
        "dtype": "float32",
        "sparse": {"codec": "bitmask", "zero": 0, "positions": positions},
        "values": {"kind": "array", "shape": [0], "dtype": "float32", "data": "1"},
    }
    arrays = {"0": np.zeros(0, np.uint8), "1": np.zeros(0, np.float32)}
    return compact_file(os.path.join(directory, "bitmask_bomb.mjx"), manifest([leaf]), arrays)


def huffman_bomb(directory: str) -> str:
    """A ~290-byte codebook whose Huffman index stream declares ``2**31`` symbols in 8 bits."""
    indices = {
        "codec": "huffman",
        "shape": [2**31],
        "dtype": "uint8",
        "num_bits": 8,
        "lengths": "0",
        "stream": "1",
    }
    leaf = {
        "path": "w",
        "kind": "codebook",
        "shape": [2**31],
        "dtype": "float32",
        "clusters": 1,
        "bits": 1,
        "values": {"kind": "array", "shape": [1], "dtype": "float32", "data": "2"},
        "indices": indices,
        "sparse": None,
    }
    arrays = {"0": np.ones(1, np.uint8), "1": np.zeros(1, np.uint8), "2": np.ones(1, np.float32)}
    return compact_file(os.path.join(directory, "huffman_bomb.mjx"), manifest([leaf]), arrays)


def manifest_bomb(directory: str, megabytes: int = 300) -> str:
    """A ~310 KB compact file whose zlib manifest, a valid empty manifest padded with spaces,
    inflates to ``megabytes`` MiB. One fully flushed deflate block of 1 MiB of spaces is
    repeated (a full flush resets the compressor's history, so every copy is the same bytes)."""
    prefix = _canonical(manifest([], arrays=[]))[:-1]
    chunk = b" " * (1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = deflate.compress(prefix) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    tail = deflate.compress(b"}") + deflate.flush()
    adler = zlib.adler32(prefix)
    for _ in range(megabytes):
        adler = zlib.adler32(chunk, adler)
    adler = zlib.adler32(b"}", adler)
    stream = b"\x78\xda" + head + block * megabytes + tail + struct.pack(">I", adler)
    path = os.path.join(directory, "manifest_bomb.mjx")
    with open(path, "wb") as f:
        f.write(compact_bytes(stream))
    return path


def deflated_member(directory: str, gibibytes: int = 1) -> str:
    """A ~1 MB zip whose ``arrays/0.npy`` member is deflated: a float32 ``.npy`` of
    ``gibibytes`` GiB of zeros, with its true CRC-32 and sha256 (the zip is written by hand,
    from one repeated deflate block, so the 1 GiB never exists)."""
    count = (gibibytes << 30) // 4
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (count,)}
    )
    header = buf.getvalue()
    chunk = bytes(1 << 20)
    repeats = (count * 4) // len(chunk)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = deflate.compress(header) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    data += block * repeats + deflate.flush()
    crc, digest = zlib.crc32(header), hashlib.sha256(header)
    for _ in range(repeats):
        crc = zlib.crc32(chunk, crc)
        digest.update(chunk)
    size = len(header) + repeats * len(chunk)
    man = manifest([_array("w", "0", [count])], arrays={"0": digest.hexdigest()})
    text = json.dumps({**man, "sha256": hashlib.sha256(_canonical(man)).hexdigest()}).encode()
    members = [
        ("manifest.json", 0, zlib.crc32(text), len(text), text),
        ("arrays/0.npy", 8, crc, size, data),
    ]
    path = os.path.join(directory, "deflated_member.mjx")
    with open(path, "wb") as f:
        f.write(_zip_bytes(members))
    return path


def _zip_bytes(members: list[tuple[str, int, int, int, bytes]]) -> bytes:
    """A zip archive of ``(name, method, crc, uncompressed size, stored bytes)`` members."""
    out, directory = io.BytesIO(), io.BytesIO()
    date = (0 << 9) | (1 << 5) | 1  # 1980-01-01
    for name, method, crc, size, data in members:
        offset, raw = out.tell(), name.encode()
        fields = (20, 0, method, 0, date, crc, len(data), size, len(raw), 0)
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields) + raw + data)
        central = (20, 20, *fields[1:], 0, 0, 0, 0, offset)
        directory.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", *central) + raw)
    start, listing = out.tell(), directory.getvalue()
    n = len(members)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(listing), start, 0)
    return out.getvalue() + listing + end


BOMBS = (sparse_bomb, bitmask_bomb, huffman_bomb, manifest_bomb, deflated_member)


# ---------------------------------------------------------------- malformed structure


def deep_json(directory: str, depth: int = 200_000) -> str:
    """A zip whose manifest nests an array ``depth`` deep (its canonical JSON, and so its
    checksum, written by hand: ``json.dumps`` cannot)."""
    deep = b"[" * depth + b"]" * depth
    fields = b'"format":"mixjax.artifact","leaves":[]'
    body = b'{"arrays":{},"deep":' + deep + b"," + fields + b',"version":1}'
    digest = hashlib.sha256(body).hexdigest().encode()
    text = body[: -len(b'"version":1}')] + b'"sha256":"' + digest + b'","version":1}'
    return zip_file(os.path.join(directory, "deep_json.mjx"), {}, text=text)


def huge_shape(directory: str) -> str:
    """A compact array entry of shape ``[2**32, 2**32]`` (2**64 elements: 0 in int64)."""
    man = manifest([], arrays=[["0", "<f4", [2**32, 2**32]]])
    return compact_file(os.path.join(directory, "huge_shape.mjx"), man)


def huge_record_shape(directory: str) -> str:
    """An ``"array"`` record of shape ``[2**32, 2**32]`` whose data is 0 floats."""
    leaf = _array("w", "0", [2**32, 2**32])
    man = manifest([leaf])
    return compact_file(os.path.join(directory, "huge_record_shape.mjx"), man, {"0": np.zeros(0)})


def no_leaves(directory: str) -> str:
    """A compact manifest without ``"leaves"``."""
    man = {"format": FORMAT, "version": VERSION}
    return compact_file(os.path.join(directory, "no_leaves.mjx"), man)


def _codebook(bits: Any = 1, drop: tuple[str, ...] = ()) -> tuple[dict, dict]:
    leaf = {
        "path": "w",
        "kind": "codebook",
        "shape": [8],
        "dtype": "float32",
        "clusters": 2,
        "bits": bits,
        "values": {"kind": "array", "shape": [2], "dtype": "float32", "data": "0"},
        "indices": {"codec": "packed", "bits": 1, "count": 8, "data": "1"},
        "sparse": None,
    }
    arrays = {"0": np.array([1.0, 2.0], np.float32), "1": np.array([0b10110010], np.uint8)}
    return {k: v for k, v in leaf.items() if k not in drop}, arrays


def codebook(directory: str) -> str:
    """A valid 8-entry, 2-cluster codebook (the reference for the two below)."""
    leaf, arrays = _codebook()
    return compact_file(os.path.join(directory, "codebook.mjx"), manifest([leaf]), arrays)


def codebook_without_bits(directory: str) -> str:
    """A codebook record without ``"bits"`` that decodes otherwise (so it reaches ``report``)."""
    leaf, arrays = _codebook(drop=("bits",))
    path = os.path.join(directory, "codebook_without_bits.mjx")
    return compact_file(path, manifest([leaf]), arrays)


def codebook_infinite_bits(directory: str) -> str:
    """A codebook record with ``"bits": Infinity`` (``int(inf)`` is an OverflowError)."""
    leaf, arrays = _codebook(bits=float("inf"))
    path = os.path.join(directory, "codebook_infinite_bits.mjx")
    return compact_file(path, manifest([leaf]), arrays)


def escaped_names(directory: str) -> str:
    """A valid artifact whose leaf path and metadata strings hold :data:`ESCAPES`."""
    leaf = _array(f"w{ESCAPES}", "0", [2])
    meta = {
        "model": f"small_cnn{ESCAPES}",
        "num_classes": f"10{ESCAPES}",
        "input_shape": [8],
        "activations": {"bits": 8, "ranges": {}},
    }
    man = manifest([leaf], meta)
    arrays = {"0": np.ones(2, np.float32)}
    return compact_file(os.path.join(directory, "escaped_names.mjx"), man, arrays)


# ---------------------------------------------------------------- models


MODEL_METADATA = {
    "model": "small_cnn",
    "num_classes": 10,
    "input_shape": [8, 8, 1],
    "preprocess": {"mean": 0.5, "std": 0.5},
    "activations": {"bits": 8, "ranges": {}},
}


def model_artifact(
    directory: str,
    name: str = "model.mjx",
    *,
    rename: dict[str, str] | None = None,
    metadata: dict | None = None,
) -> str:
    """A ``mixjax run``-like artifact of an untrained SmallCNN on 8x8x1 images (leaves stored
    verbatim, activation ranges for every layer), its leaves renamed by ``rename`` and its
    metadata updated with ``metadata``."""
    import jax  # only here: the other files need no JAX

    from mixjax import models

    meta = {**MODEL_METADATA, **(metadata or {})}
    model = models.create("small_cnn", 10)
    x = jax.ShapeDtypeStruct((1, 8, 8, 1), np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(0)
    leaves, arrays, layers = [], {}, {}
    for keypath, s in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        path = "/".join(k.key for k in keypath)
        if path.endswith("/kernel"):
            layers[path] = [-1.0, 1.0]
        arrays[str(len(arrays))] = (rng.normal(size=s.shape) * 0.1).astype(np.float32)
        leaves.append(_array((rename or {}).get(path, path), str(len(arrays) - 1), list(s.shape)))
    if "activations" not in (metadata or {}):
        meta["activations"] = {"bits": 8, "ranges": layers}
    return compact_file(os.path.join(directory, name), manifest(leaves, meta), arrays)


def renamed_leaf(directory: str) -> str:
    """A model artifact whose ``Dense_0/kernel`` is called ``Dense_9/kernel``."""
    return model_artifact(
        directory, "renamed_leaf.mjx", rename={"Dense_0/kernel": "Dense_9/kernel"}
    )


def wrong_num_classes(directory: str) -> str:
    """A model artifact of 10 classes whose metadata says 7."""
    return model_artifact(directory, "wrong_num_classes.mjx", metadata={"num_classes": 7})


STRUCTURE = (
    deep_json,
    huge_shape,
    huge_record_shape,
    no_leaves,
    codebook_without_bits,
    codebook_infinite_bits,
)
