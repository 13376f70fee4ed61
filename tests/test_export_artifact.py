"""Tests of mixjax.export.artifact and .records: exact round trips, packing, file safety, errors."""

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixjax
from mixjax import core, export, prune, quant, share
from mixjax.export import bitpack, kinds, records


def make_params(seed=0, n_in=64, n_hidden=32):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    return {
        "Dense_0": {"kernel": f(n_in, n_hidden), "bias": f(n_hidden)},
        "Conv_0": {"kernel": f(3, 3, 2, 5) * 0.1, "bias": f(5)},
        "Dense_1": {"kernel": f(n_hidden, 10)},
    }


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


TRANSFORMS = {
    "int8": lambda: quant.fake_quant(8),
    "int4": lambda: quant.fake_quant(4),
    "int2-asym": lambda: quant.fake_quant(2, symmetric=False, narrow_range=False),
    "int5-tensor": lambda: quant.fake_quant(5, per_channel=False, scale="minmax"),
    "int12": lambda: quant.fake_quant(12),
    "int16-asym": lambda: quant.fake_quant(16, symmetric=False),
    "lsq4": lambda: quant.lsq(4),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_round_trip_is_exact_against_eager_and_jit_views(name, tmp_path):
    params = make_params()
    t = TRANSFORMS[name]()
    state = t.init(params)
    artifact = export.compress(params, t, state)
    assert_trees_equal(artifact.params(), t.apply(params, state))
    assert_trees_equal(artifact.params(), jax.jit(t.apply)(params, state))
    path = export.save(artifact, tmp_path / "model.mjx")
    assert os.path.getsize(path) == artifact.nbytes
    loaded = export.load(path)
    assert_trees_equal(loaded.params(), artifact.params())
    assert loaded.params()["Dense_0"]["kernel"].shape == (64, 32)  # nested dicts from paths
    assert_trees_equal(loaded.params(like=params), artifact.params())
    assert loaded.to_bytes() == artifact.to_bytes()
    kinds = {leaf["path"]: leaf["kind"] for leaf in loaded.leaves}
    assert kinds["Dense_0/kernel"] == "int" and kinds["Dense_0/bias"] == "array"


def test_int4_is_packed_two_per_byte_and_int8_holds_the_int8_tensor():
    params = make_params()
    for bits in (4, 8):
        t = quant.fake_quant(bits)
        state = t.init(params)
        artifact = export.compress(params, t, state)
        record = artifact.record("Dense_0/kernel")
        assert record["bits"] == bits and record["signed"] and record["zero_point"] is None
        assert artifact.arrays[record["codes"]].dtype == np.uint8
        assert artifact.arrays[record["codes"]].size == 64 * 32 * bits // 8
        decoded = records.decode_int(record, artifact.arrays)
        assert decoded.q.dtype == np.int8 and decoded.q.shape == (64, 32)
        scale = np.asarray(state.scale["Dense_0"]["kernel"])
        expected = np.round(np.asarray(params["Dense_0"]["kernel"]) / scale)
        np.testing.assert_array_equal(decoded.q, expected)
        assert np.abs(decoded.q).max() == 2 ** (bits - 1) - 1
    if bits == 8:
        np.testing.assert_array_equal(
            artifact.arrays[record["codes"]].view(np.int8), decoded.q.reshape(-1)
        )


def test_sizes_follow_the_bit_width():
    params = make_params(n_in=256, n_hidden=128)
    n = sum(x.size for x in jax.tree.leaves(params))
    floats = export.compress(params, core.identity(), core.identity().init(params)).nbytes
    sizes = {}
    for bits in (8, 4, 2):
        t = quant.fake_quant(bits)
        sizes[bits] = export.compress(params, t, t.init(params)).nbytes
    assert floats > 4 * n
    assert sizes[8] < n + 6000 and sizes[4] < n / 2 + 6000 and sizes[2] < n / 4 + 6000
    assert sizes[2] < sizes[4] < sizes[8] < floats / 3.5


def test_chain_after_pruning_keeps_exact_zeros():
    params = make_params()
    masks = jax.tree.map(
        lambda x: jnp.asarray(np.random.default_rng(1).uniform(size=x.shape) > 0.6, x.dtype), params
    )
    prune = core.ParamTransform(
        init=lambda p: masks,
        apply=lambda p, m: jax.tree.map(lambda x, k: x * k, p, m),
        update=lambda p, m, step, **extra: m,
    )
    t = core.chain(prune, quant.fake_quant(4, symmetric=False))
    state = t.init(params)
    artifact = export.compress(params, t, state)
    restored = artifact.params()
    assert_trees_equal(restored, t.apply(params, state))
    for v, m in zip(jax.tree.leaves(restored), jax.tree.leaves(masks), strict=True):
        assert np.all(v[np.asarray(m) == 0] == 0)


def test_nnx_state_and_non_float_leaves():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.Dense_0 = nnx.Linear(6, 4, rngs=rngs)

    model = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    nnx.update(
        model,
        {
            "Dense_0": {
                "kernel": rng.normal(size=(6, 4)).astype(np.float32),
                "bias": np.ones(4, np.float32),
            }
        },
    )
    _, state = nnx.split(model, nnx.Param)
    t = quant.fake_quant(8)
    artifact = export.compress(state, t, t.init(state))
    restored = artifact.params()
    assert type(restored) is type(state)
    assert_trees_equal(restored, t.apply(state, t.init(state)))
    tree = {"w": jnp.ones((3, 3), jnp.bfloat16) * 1.5, "step": jnp.arange(3, dtype=jnp.int32)}
    raw = export.compress(tree, core.identity(), ())
    assert_trees_equal(raw.params(), tree)


def test_errors_of_compress():
    params = make_params()
    t = quant.fake_quant(8)
    state = t.init(params)
    with pytest.raises(TypeError, match="compress: transform must be a ParamTransform, got tuple"):
        export.compress(params, (t.init, t.apply), state)
    stretch = core.ParamTransform(
        lambda p: (), lambda p, s: jax.tree.map(lambda x: x * 1.37, p), lambda p, s, step, **e: s
    )
    chained = core.chain(t, stretch)
    with pytest.raises(
        ValueError, match=r"leaf 'Conv_0/kernel' \(3, 3, 2, 5\) float32 is not on the integer grid"
    ):
        export.compress(params, chained, chained.init(params))
    bad = jax.tree.map(lambda x: x, params)
    bad["Dense_1"]["kernel"] = bad["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(
        ValueError, match=r"compress: leaf 'Dense_1/kernel' \(32, 10\) float32 holds NaN/Inf"
    ):
        export.compress(bad, t, state)


# ---------------------------------------------------------------- files


@pytest.fixture
def saved(tmp_path):
    params = make_params()
    t = quant.fake_quant(4)
    artifact = export.compress(params, t, t.init(params))
    return artifact, export.save(artifact, tmp_path / "a.mjx")


def read_members(path):
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def write_members(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def reseal(manifest):
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return {**body, "sha256": hashlib.sha256(canonical).hexdigest()}


def test_truncated_and_garbage_files(saved, tmp_path):
    _, path = saved
    blob = open(path, "rb").read()
    for i, data in enumerate([blob[: len(blob) // 2], b"", b"not a zip at all" * 10]):
        bad = tmp_path / f"bad{i}.mjx"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=rf"load: '{bad}': truncated or corrupted file"):
            export.load(bad)
    with pytest.raises(FileNotFoundError, match="missing.mjx"):
        export.load(tmp_path / "missing.mjx")


def test_flipped_byte_is_caught_by_the_zip_crc(saved, tmp_path):
    _, path = saved
    blob = bytearray(open(path, "rb").read())
    member = read_members(path)["arrays/1.npy"]
    at = bytes(blob).find(member) + len(member) - 3
    blob[at] ^= 0xFF
    bad = tmp_path / "flipped.mjx"
    bad.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"load: '{bad}': array '1' is corrupted \(Bad CRC-32"):
        export.load(bad)


def test_tampered_manifest_and_arrays_fail_their_checksums(saved, tmp_path):
    _, path = saved
    members = read_members(path)
    manifest = json.loads(members["manifest.json"])
    manifest["leaves"][1]["bits"] = 3
    bad = tmp_path / "manifest.mjx"
    write_members(bad, {**members, "manifest.json": json.dumps(manifest)})
    with pytest.raises(ValueError, match=rf"load: '{bad}': manifest checksum mismatch"):
        export.load(bad)
    array = np.load(io.BytesIO(members["arrays/1.npy"]))
    buf = io.BytesIO()
    np.save(buf, array[::-1].copy())
    bad = tmp_path / "array.mjx"
    write_members(bad, {**members, "arrays/1.npy": buf.getvalue()})
    with pytest.raises(ValueError, match=rf"load: '{bad}': array '1' checksum mismatch"):
        export.load(bad)


def resealed(tmp_path, saved, edit, name):
    _, path = saved
    members = read_members(path)
    manifest = json.loads(members["manifest.json"])
    extra = edit(manifest) or {}
    out = tmp_path / name
    write_members(out, {**members, **extra, "manifest.json": json.dumps(reseal(manifest))})
    return out


def test_consistent_but_invalid_contents(saved, tmp_path):
    def version(m):
        m["version"] = 2

    def fmt(m):
        m["format"] = "something.else"

    def kind(m):
        m["leaves"][1]["kind"] = "huffman"

    def bits(m):
        m["leaves"][1]["bits"] = 3  # codes no longer have the right size

    def pickled(m):
        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        m["arrays"]["1"] = hashlib.sha256(buf.getvalue()).hexdigest()
        return {"arrays/1.npy": buf.getvalue()}

    cases = [
        (version, r"format version 2; this mixjax reads 1"),
        (fmt, r"not a mixjax artifact \(format 'something.else'\)"),
        (kind, r"leaf 'Conv_0/kernel': unknown kind 'huffman'"),
        (bits, r"leaf 'Conv_0/kernel': .*need a 1-D array of"),
        (pickled, r"array '1' is not a plain .npy array \(dtype object\)"),
    ]
    for i, (edit, match) in enumerate(cases):
        bad = resealed(tmp_path, saved, edit, f"case{i}.mjx")
        with pytest.raises(ValueError, match=rf"load: '{bad}': {match}"):
            export.load(bad)


def test_save_is_atomic(saved, monkeypatch):
    artifact, path = saved
    before = open(path, "rb").read()
    other = export.compress(make_params(1), core.identity(), ())

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export.save(other, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert os.listdir(os.path.dirname(path)) == ["a.mjx"]
    export.save(other, path)
    assert_trees_equal(export.load(path).params(like=make_params(1)), make_params(1))


# ---------------------------------------------------------------- records


def test_every_kind_decodes_in_a_fresh_process_that_imports_only_the_reader(tmp_path):
    """Decoding never depends on what else was imported: the kinds are a static table."""
    params = {
        "Dense_0": {"kernel": jnp.asarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))}
    }
    t = mixjax.chain(prune.magnitude(0.5), share.cluster(4), quant.fake_quant(8, per_channel=False))
    artifact = export.compress(params, t, t.init(params))
    dense = export.compress({"w": np.arange(6, dtype=np.float32)}, mixjax.identity(), ())
    sparse = export.compress({"w": np.array([0, 0, 0, 0, 0, 3], np.float32)}, mixjax.identity(), ())
    paths = [export.save(a, tmp_path / f"{i}.mjx") for i, a in enumerate((artifact, dense, sparse))]
    kinds_found = {r["kind"] for a in (artifact, dense, sparse) for r in a.leaves}
    assert kinds_found == {"codebook", "array", "sparse"}
    code = (
        "import sys; from mixjax.export.artifact import load\n"
        "for p in sys.argv[1:]: print(sorted(load(p).params().items())[0][0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Dense_0", "w", "w"]
    assert set(kinds.DECODERS) == {"array", "int", "codebook", "sparse"}


def test_record_errors():
    arrays = {"0": np.zeros(2, np.uint8), "1": np.ones((1, 4), np.float32)}
    good = {
        "kind": "int",
        "shape": [4, 4],
        "dtype": "float32",
        "bits": 1,
        "signed": False,
        "codes": "0",
        "scale": "1",
        "zero_point": None,
    }
    assert kinds.decode(good, arrays).shape == (4, 4)
    # (1, 4) against (2, 8): one scale per group of 2 consecutive entries of axis 1.
    arrays["2"] = np.array([0b10110001, 0b11111111], np.uint8)
    arrays["3"] = np.array([[1, 2, 3, 4]], np.float32)
    grouped = kinds.decode({**good, "shape": [2, 8], "codes": "2", "scale": "3"}, arrays)
    q = bitpack.unpack_bits(arrays["2"], 1, 16).reshape(2, 8)
    np.testing.assert_array_equal(grouped, q * np.repeat(arrays["3"], 2, axis=1))
    cases = [
        (
            {"kind": "zstd"},
            r"unknown kind 'zstd' \(known here: \['array', 'codebook', 'int', 'sparse'\]",
        ),
        ({"shape": [4, -1]}, r"bad shape \[4, -1\]"),
        ({"dtype": "float99"}, "bad dtype 'float99'"),
        ({"dtype": "(2,f4"}, r"bad dtype '\(2,f4'"),  # NumPy parses it as Python
        ({"dtype": "O"}, "bad dtype 'O'"),
        ({"dtype": ["f4"]}, r"bad dtype \['f4'\]"),
        ({"shape": [2**32, 2**32]}, r"bad shape \[4294967296, 4294967296\] \(more than 1099"),
        ({"shape": [1] * 33}, r"\(33 axes, more than 32\)"),
        ({"codes": ["0"]}, r"field 'codes' names array \['0'\], which the artifact does not"),
        ({"bits": 17}, "bad bits=17"),
        ({"scale": "9"}, "field 'scale' names array '9', which the artifact does not hold"),
        ({"shape": [4, 5]}, r"20 codes of 1 bits need a 1-D array of 3 bytes, got shape \(2,\)"),
        ({"shape": [4, 3]}, r"scale \(1, 4\) does not block-broadcast against shape \(4, 3\)"),
        ({"shape": [2, 6]}, r"scale \(1, 4\) does not block-broadcast against shape \(2, 6\)"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            kinds.decode({**good, **change}, arrays)
