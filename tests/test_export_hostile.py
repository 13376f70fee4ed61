"""Hostile artifacts (:mod:`crafted`, valid checksums): the reader trusts no declared size.

Every bomb is loaded in one child process whose address space is capped at what it uses after
importing ``mixjax.export`` plus 512 MiB: each must be a ``ValueError`` naming the file, never a
``MemoryError``, and genuine artifacts must still load there, bit for bit. The malformed files
are loaded here: one clear ``ValueError`` each, and through the ``mixjax`` command, one line
``mixjax: error: ...`` naming the file, exit status 2; metadata is printed escaped.
"""

import dataclasses
import hashlib
import json
import re
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib

import crafted
import numpy as np
import pytest

import mixjax
from mixjax import export, prune, quant, select, share
from mixjax.app import evaluate

HEADROOM = 512 << 20
_CHILD = r"""
import hashlib, json, resource, sys
from mixjax.export import load
from mixjax.select import leaves_with_paths

def vm_size():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

soft, hard = resource.getrlimit(resource.RLIMIT_AS)
limit = vm_size() + int(sys.argv[1])
infinite = hard == resource.RLIM_INFINITY
resource.setrlimit(resource.RLIMIT_AS, (limit if infinite else min(limit, hard), hard))
for path in sys.argv[2:]:
    try:
        digest = hashlib.sha256()
        for p, leaf in leaves_with_paths(load(path).params()):
            digest.update(p.encode() + leaf.dtype.str.encode() + leaf.tobytes())
        print(json.dumps({"path": path, "ok": digest.hexdigest()}), flush=True)
    except BaseException as err:  # MemoryError above all: reported, not fatal
        print(json.dumps({"path": path, "error": type(err).__name__, "message": str(err)[:1000]}))
"""
BOMB_MESSAGES = {
    "sparse_bomb": r"leaf 'w': .*0 entries of 8-bit gaps cannot reach the 8589934592 entries",
    "bitmask_bomb": r"leaf 'w': .*mask: .*8589934592 codes of 1 bits need .* 1073741824 bytes",
    "huffman_bomb": r"leaf 'w': .*2147483648 symbols cannot fit in 8 bits",
    "manifest_bomb": r"the manifest inflates to more than \d+ bytes \(64x its \d+ compressed",
    "deflated_member": r"member 'arrays/0.npy' is compressed or encrypted \(method 8\)",
}
STRUCTURE_MESSAGES = {
    "deep_json": r"corrupted manifest \(JSON nested too deeply\)",
    "huge_shape": r"bad array entry .*\(more than 1099511627776 \(2\*\*40\) elements\)",
    "huge_record_shape": r"leaf 'w': bad shape \[4294967296, 4294967296\] \(more than",
    "no_leaves": r"'leaves' must be a list of records, got NoneType",
    "codebook_without_bits": r"leaf 'w': bad bits=None for 2 clusters \(1 expected\)",
    "codebook_infinite_bits": r"leaf 'w': bad bits=inf for 2 clusters",
}


def _digest(artifact):
    digest = hashlib.sha256()
    for p, leaf in select.leaves_with_paths(artifact.params()):
        leaf = np.asarray(leaf)
        digest.update(p.encode() + leaf.dtype.str.encode() + leaf.tobytes())
    return digest.hexdigest()


def _load_error(path):
    return rf"^mixjax\.export\.load: {re.escape(repr(str(path)))}: "


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """Saved artifacts of a pruned + clustered + quantized MLP (both containers) and of a very
    sparse vector (relative positions with trailing fillers), with their params' digests."""
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    params = {
        "Dense_0": {"kernel": f(16, 32), "bias": f(32)},
        "Dense_1": {"kernel": f(32, 10), "bias": f(10)},
    }
    t = mixjax.chain(
        prune.magnitude(0.8, where=".*kernel"),
        share.cluster(4, init="linear", max_iterations=3, where=".*kernel"),
        quant.fake_quant(8, per_channel=False),
    )
    state = t.init(params)
    vector = np.zeros(1 << 16, np.float32)  # 300 distinct entries, then a run of 62k zeros
    vector[rng.choice(3000, 300, replace=False)] = rng.normal(size=300)
    directory = tmp_path_factory.mktemp("genuine")
    made = {
        "mlp_zip": export.compress(params, t, state),
        "mlp_compact": export.compress(params, t, state, container="compact"),
        "sparse": export.compress({"w": vector}, mixjax.identity(), (), container="compact"),
    }
    record = made["sparse"].record("w")
    assert record["kind"] == "sparse" and record["sparse"]["codec"] == "relative"
    assert record["sparse"]["num_entries"] > 300 + 62_000 // 256  # the trailing fillers
    assert {r["kind"] for r in made["mlp_zip"].leaves} >= {"codebook"}
    return {export.save(a, directory / f"{name}.mjx"): _digest(a) for name, a in made.items()}


def test_bombs_are_refused_before_any_large_allocation(tmp_path, genuine):
    bombs = {fn.__name__: fn(str(tmp_path)) for fn in crafted.BOMBS}
    paths = [*bombs.values(), *genuine]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(HEADROOM), *paths],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["path"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert sorted(results) == sorted(paths)
    for name, path in bombs.items():
        result = results[path]
        assert result.get("error") == "ValueError", (name, result)
        assert re.match(_load_error(path) + BOMB_MESSAGES[name], result["message"]), result
    for path, digest in genuine.items():
        assert results[path].get("ok") == digest, results[path]


@pytest.mark.parametrize("name", sorted(STRUCTURE_MESSAGES))
def test_malformed_files_are_one_clear_error(tmp_path, name):
    path = getattr(crafted, name)(str(tmp_path))
    with pytest.raises(ValueError, match=_load_error(path) + STRUCTURE_MESSAGES[name]) as info:
        export.load(path)
    assert "\n" not in str(info.value)


def test_the_reference_codebook_and_model_load(tmp_path):
    artifact = export.load(crafted.codebook(str(tmp_path)))
    np.testing.assert_array_equal(artifact.params()["w"], [1, 2, 1, 1, 2, 2, 1, 2])
    assert export.table(artifact).rows[0].bits == 1
    model = export.load(crafted.model_artifact(str(tmp_path)))
    with pytest.warns(UserWarning, match="these run in float"):  # stored verbatim
        assert set(evaluate.forwards(model)) == {"float", "compressed", "integer"}


# ---------------------------------------------------------------- containers


def _zip(path, entries):
    """A zip of ``(name, data, compress_type)`` entries, written by zipfile (CRCs valid)."""
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": wanted here
        for name, data, method in entries:
            info = zipfile.ZipInfo(name, crafted.ZIP_DATE)
            info.compress_type = method
            zf.writestr(info, data)
    return str(path)


def _members(tmp_path):
    """The members of a valid one-array zip artifact."""
    path = crafted.zip_file(
        str(tmp_path / "ok.mjx"),
        crafted.manifest([crafted._array("w", "0", [3])]),
        {"0": np.arange(3, dtype=np.float32)},
    )
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _resealed_npy(members, npy):
    man = json.loads(members["manifest.json"])
    man.pop("sha256")
    man["arrays"]["0"] = hashlib.sha256(npy).hexdigest()
    text = json.dumps({**man, "sha256": hashlib.sha256(crafted._canonical(man)).hexdigest()})
    return text.encode()


def test_zip_members_are_checked(tmp_path):
    members = _members(tmp_path)
    stored, deflated = zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED
    npy = members["arrays/0.npy"]
    fortran = npy.replace(b"'fortran_order': False", b"'fortran_order': True ")
    longer = npy.replace(b"(3,)", b"(4,)")
    cases = {
        "twice": (
            [*((n, d, stored) for n, d in members.items()), ("arrays/0.npy", b"", stored)],
            r"member 'arrays/0.npy' appears twice",
        ),
        "extra": (
            [*((n, d, stored) for n, d in members.items()), ("evil.sh", b"x", stored)],
            r"unexpected member 'evil.sh'",
        ),
        "deflated": (
            [(n, d, deflated) for n, d in members.items()],
            r"member 'manifest.json' is compressed or encrypted \(method 8\)",
        ),
        "fortran": (
            [
                ("manifest.json", _resealed_npy(members, fortran), stored),
                ("arrays/0.npy", fortran, stored),
            ],
            r"array '0' is not a plain .npy array \(dtype float32, Fortran order\)",
        ),
        "count": (
            [
                ("manifest.json", _resealed_npy(members, longer), stored),
                ("arrays/0.npy", longer, stored),
            ],
            r"array '0': its header declares \(4,\) float32 \(16 bytes\), the member holds 12",
        ),
    }
    for name, (entries, match) in cases.items():
        path = _zip(tmp_path / f"{name}.mjx", entries)
        with pytest.raises(ValueError, match=_load_error(path) + match):
            export.load(path)


def test_zip_declared_sizes_must_be_in_the_file(tmp_path):
    path = crafted.zip_file(str(tmp_path / "a.mjx"), crafted.manifest([]), {})
    blob = bytearray(open(path, "rb").read())
    central = blob.rindex(b"PK\x01\x02")
    struct.pack_into("<2L", blob, central + 20, 1 << 31, 1 << 31)  # compressed, uncompressed
    bad = tmp_path / "sizes.mjx"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=_load_error(bad) + r"member 'manifest.json' declares"):
        export.load(bad)


def _compact_with_head(path, head):
    with open(path, "wb") as f:
        f.write(crafted.compact_bytes(head))
    return str(path)


def test_compact_manifest_stream_is_bounded_and_exact(tmp_path):
    text = crafted._canonical(crafted.manifest([], arrays=[]))
    spaced = text[:-1] + b" " * (1 << 20) + b"}"  # 1 MiB from ~1 KB: past 64x + 64 KiB
    cases = {
        "ratio": (zlib.compress(spaced, 9), r"the manifest inflates to more than \d+ bytes"),
        "trailing": (zlib.compress(text) + b"junk", r"4 bytes follow the manifest's zlib stream"),
        "truncated": (zlib.compress(text)[:-6], r"corrupted manifest \(its zlib stream is trunc"),
        "duplicate": (
            zlib.compress(text[:-1] + b',"leaves":[]}'),
            r"corrupted manifest \(key 'leaves' appears twice in an object\)",
        ),
        "deep": (
            zlib.compress(text[:-1] + b',"x":' + b"[" * 40 + b"]" * 40 + b"}"),
            r"corrupted manifest \(JSON nested more than 32 deep\)",
        ),
    }
    for name, (head, match) in cases.items():
        path = _compact_with_head(tmp_path / f"{name}.mjx", head)
        with pytest.raises(ValueError, match=_load_error(path) + match):
            export.load(path)
    blob = bytearray(crafted.compact_bytes(zlib.compress(text)))
    struct.pack_into("<I", blob, 4, 1 << 30)
    body = bytes(blob[:-32])
    path = tmp_path / "n.mjx"
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(ValueError, match=r"the manifest's 1073741824 bytes run past the end"):
        export.load(path)


def test_manifest_structure_is_checked(tmp_path):
    arr = crafted._array
    data = {"0": np.ones(2, np.float32)}
    cases = {
        "leaf_not_record": ([["w"]], r"leaf 0 is not a record \(a JSON object\): \['w'\]"),
        "no_path": ([{"kind": "array"}], r"leaf 0 has no path \(a non-empty string\), got None"),
        "no_kind": ([{"path": "w", "kind": 3}], r"leaf 'w' has no kind \(a string\), got 3"),
        "twice": ([arr("w", "0", [2]), arr("w", "0", [2])], r"leaf 'w' appears twice"),
        "under": ([arr("a", "0", [2]), arr("a/b", "0", [2])], r"leaf 'a/b' lies under another"),
        "over": ([arr("a/b", "0", [2]), arr("a", "0", [2])], r"leaf 'a' has leaves under it"),
    }
    for name, (leaves, match) in cases.items():
        path = crafted.compact_file(str(tmp_path / f"{name}.mjx"), crafted.manifest(leaves), data)
        with pytest.raises(ValueError, match=_load_error(path) + match):
            export.load(path)
    entries = {
        "entry": ([["0", "<f4"]], r"bad array entry \['0', '<f4'\] \(expected \[name, dtype, s"),
        "dtype": ([["0", "O", [1]]], r"bad array entry \['0', 'O', \[1\]\] \(dtype object\)"),
        "listed": ([["0", "<f4", [0]], ["0", "<f4", [0]]], r"array '0' is listed twice"),
        "arrays": ({"0": "<f4"}, r"'arrays' must be a list of \[name, dtype, shape\], got"),
    }
    for name, (arrays, match) in entries.items():
        man = crafted.manifest([], arrays=arrays)
        path = crafted.compact_file(str(tmp_path / f"{name}.mjx"), man)
        with pytest.raises(ValueError, match=_load_error(path) + match):
            export.load(path)


def test_integer_model_reads_any_scale_layout_and_names_a_damaged_leaf():
    rng = np.random.default_rng(0)
    params = {"Dense_0": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)}}
    fn = lambda p, x: x @ p["Dense_0"]["kernel"]  # noqa: E731
    x = np.ones((2, 4), np.float32)
    t = quant.fake_quant(8)
    artifact = export.compress(params, t, t.init(params))
    act = quant.activation_quant(8)
    act_state = {"Dense_0/kernel": quant.ObserverState(np.float32(-1), np.float32(1), np.int32(1))}
    int_model = export.integer_model(fn, artifact, x, act=act, act_state=act_state)
    assert int_model.weights["Dense_0/kernel"].codes.shape == (4, 3)
    assert int_model.table[0].way == "int8 x int8 -> int32"
    record = artifact.record("Dense_0/kernel")
    # A scale per input feature is a valid grid, but not one the int8 matmul can factor out.
    per_input = {**artifact.arrays, record["scale"]: np.arange(1, 5, dtype=np.float32)[:, None]}
    int_model = export.integer_model(
        fn, dataclasses.replace(artifact, arrays=per_input), x, act=act, act_state=act_state
    )
    assert int_model.table[0][3:] == (
        "int8 weights dequantized",
        "its scales vary along the contraction (group-wise)",
    )
    negative = {**artifact.arrays, record["scale"]: -artifact.arrays[record["scale"]]}
    with pytest.raises(
        ValueError,
        match=r"^mixjax\.export\.integer_model: leaf 'Dense_0/kernel' has scales that are not "
        r"finite and positive \(shape \(1, 3\)\)",
    ):
        export.integer_model(
            fn, dataclasses.replace(artifact, arrays=negative), x, act=act, act_state=act_state
        )
