"""Tests of the codebook record kind, the compact container and the size table."""

import hashlib
import pathlib
import re
import struct
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import core, export, prune, quant, share
from mixjax.export import bitpack, codebook, huffman, kinds, records

PRUNE = prune.magnitude(0.9)
CLUSTER = share.cluster(16)
QUANT = quant.fake_quant(8, per_channel=False)


def make_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {
        "Dense_0": {
            "kernel": jax.random.normal(k[0], (64, 48)),
            "bias": jax.random.normal(k[1], (48,)),
        },
        # Same size as Dense_0's kernel: one k-means program clusters both.
        "Dense_1": {"kernel": jax.random.normal(k[2], (48, 64))},
    }


def assert_trees_identical(a, b):
    """Equal dtypes and bit patterns (so -0.0 differs from +0.0, which ``==`` does not see)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


CHAINS = {
    "prune+cluster": lambda: core.chain(PRUNE, CLUSTER),
    "prune+cluster+quant": lambda: core.chain(PRUNE, CLUSTER, QUANT),
    "cluster+quant": lambda: core.chain(CLUSTER, QUANT),
    "prune+quant": lambda: core.chain(PRUNE, QUANT),
    "cluster": lambda: CLUSTER,
    "prune": lambda: PRUNE,
}


@pytest.mark.parametrize("name", CHAINS)
def test_round_trip_equals_the_training_view(name, harness, tmp_path):
    params = make_params()
    t = CHAINS[name]()
    state = t.init(params)
    view = harness(t.apply)(params, state)
    # compress encodes the jitted view bit for bit; eager may sign its zeros differently.
    jitted = jax.jit(t.apply)(params, state)
    for a, b in zip(jax.tree.leaves(view), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)
    for container in export.CONTAINERS:
        artifact = export.compress(params, t, state, container=container)
        assert_trees_identical(artifact.params(), jitted)
        path = export.save(artifact, tmp_path / f"{container}.mjx")
        assert open(path, "rb").read() == artifact.to_bytes()
        assert len(artifact.to_bytes()) == artifact.nbytes
        loaded = export.load(path)
        assert loaded.container == container
        assert_trees_identical(loaded.params(like=params), jitted)
    kinds = {leaf["path"]: leaf["kind"] for leaf in loaded.leaves}
    # Pruned-only kernels keep 10% distinct floats: stored sparse.
    kernel = "sparse" if name == "prune" else "codebook"
    assert kinds["Dense_0/kernel"] == kinds["Dense_1/kernel"] == kernel
    assert kinds["Dense_0/bias"] == "array"  # neither pruned, clustered nor quantized


def test_quantized_codebook_is_stored_as_ints():
    params = make_params()
    t = core.chain(PRUNE, CLUSTER, QUANT)
    state = t.init(params)
    record = export.compress(params, t, state).record("Dense_0/kernel")
    values = record["values"]
    view = np.asarray(t.apply(params, state)["Dense_0"]["kernel"])
    k = np.unique(view).size
    assert 2 <= k <= 16 and record["clusters"] == k
    assert values["kind"] == "int" and values["shape"] == [k] and values["bits"] <= 8
    scale = np.asarray(state[2].scale["Dense_0"]["kernel"]).reshape(())
    expected_q = np.round(np.unique(view) / scale)
    q = records.decode_int(values, export.compress(params, t, state).arrays).q
    np.testing.assert_array_equal(np.sort(q.astype(np.float64)), np.sort(expected_q))


def test_quantized_leaves_stay_int_unless_they_have_fewer_values_than_codes():
    """Integer inference runs "int" records; a codebook only where its indices are narrower."""
    params = make_params()
    t = quant.fake_quant(5, per_channel=False)
    artifact = export.compress(params, t, t.init(params))
    for i in (0, 1):
        record = artifact.record(f"Dense_{i}/kernel")
        assert record["kind"] == "int" and record["bits"] == 5  # 31 codes: 5-bit indices too
    t = core.chain(PRUNE, QUANT)  # 90% zeros: ~120 of the 255 int8 codes in use
    state = t.init(params)
    record = export.compress(params, t, state).record("Dense_0/kernel")
    distinct = np.unique(np.asarray(t.apply(params, state)["Dense_0"]["kernel"])).size
    assert distinct <= 128 and record["kind"] == "codebook" and record["bits"] == 7


def test_sparse_clustered_leaf_is_smaller_than_int8():
    rng = np.random.default_rng(0)
    n = 100_000
    values = rng.normal(size=15).astype(np.float32)
    leaf = np.where(rng.uniform(size=n) < 0.9, 0, values[rng.integers(0, 15, n)]).astype(np.float32)
    record, stored = _encode(leaf)
    assert record["kind"] == "codebook" and record["clusters"] == 16 and record["bits"] == 4
    assert record["sparse"] is not None
    assert records.record_nbytes(record, stored) < n // 4  # int8 would take n bytes
    np.testing.assert_array_equal(kinds.decode(record, stored), leaf)


def _encode(leaf, encoder=None):
    stored = {}

    def store(array):
        stored[str(len(stored))] = np.asarray(array)
        return str(len(stored) - 1)

    return codebook.encode_codebook("w", leaf, encoder, store), stored


def test_codebook_values_stay_on_the_leafs_integer_grid():
    """Per-tensor grids give (K,) int values, per-channel ones (K, C) ints on each channel's
    scale; a group-wise grid gives no codebook (the leaf stays "int")."""
    rng = np.random.default_rng(4)
    q = rng.choice([-3, 0, 1, 2], size=(32, 4)).astype(np.float32)
    for scale, shape in [(np.float32(0.5), [4]), (np.float32([[0.5, 0.25, 1, 2]]), [4, 4])]:
        leaf = q * scale
        record, stored = _encode(leaf, records.int_encoder(scale, fn_name="test"))
        assert record["values"]["kind"] == "int" and record["values"]["shape"] == shape
        assert record.get("axis") == (0 if len(shape) == 2 else None)
        np.testing.assert_array_equal(kinds.decode(record, stored), leaf)
    grouped = np.float32([[0.5], [0.25]] * 2).reshape(4, 1)  # groups of 8 rows
    leaf = q * np.repeat(grouped, 8, axis=0)
    assert _encode(leaf, records.int_encoder(grouped, fn_name="test"))[0] is None


def test_huffman_is_used_only_when_it_helps():
    rng = np.random.default_rng(1)
    values = np.linspace(-1, 1, 16, dtype=np.float32) + 0.5
    skewed = values[np.minimum(rng.geometric(0.5, 4096) - 1, 15)]
    record, stored = _encode(skewed)
    assert record["sparse"] is None and record["indices"]["codec"] == "huffman"
    # A geometric(1/2) source costs ~2 bits per index against 4 packed.
    assert stored[record["indices"]["stream"]].nbytes < 4096 * 4 / 8 * 0.6
    np.testing.assert_array_equal(kinds.decode(record, stored), skewed)
    uniform = values[np.arange(4096) % 16]
    record, stored = _encode(uniform)
    assert record["indices"]["codec"] == "packed" and record["indices"]["bits"] == 4
    assert stored[record["indices"]["data"]].nbytes == 4096 * 4 // 8
    np.testing.assert_array_equal(kinds.decode(record, stored), uniform)


def test_relative_positions_and_their_huffman_round_trip():
    rng = np.random.default_rng(2)
    leaf = np.zeros(20_000, np.float32)
    leaf[rng.choice(20_000, 600, replace=False)] = rng.choice([-0.5, 0.25, 1.0], 600)
    record, stored = _encode(leaf.reshape(100, 200))
    assert record["sparse"]["codec"] == "relative"
    assert record["bits"] == 2 and record["clusters"] == 4
    np.testing.assert_array_equal(kinds.decode(record, stored), leaf.reshape(100, 200))


def test_signed_zeros_nan_bfloat16_and_skipped_leaves():
    leaf = np.array([0.0, -0.0, 1.5, np.nan, 0.0, 1.5], np.float32)
    record, stored = _encode(leaf)
    out = kinds.decode(record, stored)
    np.testing.assert_array_equal(out.view(np.uint32), leaf.view(np.uint32))
    half = np.asarray(jnp.array([[0, 1, 2], [0, 0, 2]], jnp.bfloat16))
    record, stored = _encode(half)
    out = kinds.decode(record, stored)
    assert out.dtype == half.dtype
    np.testing.assert_array_equal(out.view(np.uint16), half.view(np.uint16))
    many = np.arange(257, dtype=np.float32)
    assert _encode(many)[0] is None  # more than MAX_CLUSTERS distinct values
    assert _encode(np.arange(4, dtype=np.int32))[0] is None
    assert _encode(np.zeros((0, 3), np.float32))[0] is None


def _encode_sparse(leaf):
    stored = {}

    def store(array):
        stored[str(len(stored))] = np.asarray(array)
        return str(len(stored) - 1)

    return codebook.encode_sparse("w", leaf, None, store), stored


def test_sparse_float_leaves():
    rng = np.random.default_rng(3)
    leaf = rng.normal(size=(300, 100)).astype(np.float32)
    leaf[rng.uniform(size=leaf.shape) < 0.9] = 0.0
    leaf[0, :3] = [-0.0, np.nan, np.inf]
    record, stored = _encode_sparse(leaf)
    assert record["kind"] == "sparse" and record["values"]["kind"] == "array"
    out = kinds.decode(record, stored)
    np.testing.assert_array_equal(out.view(np.uint32), leaf.view(np.uint32))
    entries = stored[record["values"]["data"]]
    assert entries.size >= np.count_nonzero(leaf.view(np.uint32))  # fillers hold +0.0
    assert records.record_nbytes(record, stored) < leaf.nbytes * 0.2
    half = np.asarray(jnp.array([[0, 1.5, 0, 0], [0, 0, -2, 0]], jnp.bfloat16))
    record, stored = _encode_sparse(half)
    out = kinds.decode(record, stored)
    assert out.dtype == half.dtype
    np.testing.assert_array_equal(out.view(np.uint16), half.view(np.uint16))
    assert _encode_sparse(np.ones(5, np.float32))[0] is None  # no zeros
    assert _encode_sparse(np.zeros(5, np.int32))[0] is None
    grid = records.int_encoder(np.float32(0.5), fn_name="test")
    assert codebook.encode_sparse("w", np.zeros(5, np.float32), grid, None) is None
    bad = {**record, "dtype": "float32"}
    with pytest.raises(ValueError, match="the stored entries must be 1-D float32, got bfloat16"):
        kinds.decode(bad, stored)


def test_table_contents():
    params = make_params()
    t = core.chain(PRUNE, CLUSTER, QUANT)
    artifact = export.compress(params, t, t.init(params), container="compact")
    table = export.table(artifact)
    rows = {r.path: r for r in table.rows}
    kernel = rows["Dense_0/kernel"]
    view = np.asarray(t.apply(params, t.init(params))["Dense_0"]["kernel"])
    assert kernel.shape == (64, 48) and kernel.kind == "codebook"
    assert kernel.sparsity == pytest.approx(np.mean(view == 0))
    assert kernel.clusters == np.unique(view).size and 8 < kernel.clusters <= 16
    assert kernel.bits == 4
    assert kernel.bytes_before == 64 * 48 * 4
    record = artifact.record("Dense_0/kernel")
    assert kernel.bytes_after == records.record_nbytes(record, artifact.arrays)
    assert kernel.ratio == pytest.approx(kernel.bytes_before / kernel.bytes_after)
    bias = rows["Dense_0/bias"]
    assert bias.kind == "array" and bias.clusters is None and bias.bits == 32
    assert table.file_bytes == artifact.nbytes
    assert "| Dense_0/kernel | 64x48 | codebook |" in table.markdown
    assert "**file** (compact)" in table.markdown
    # The compact file holds the arrays plus a small deflated manifest.
    weights = sum(r.bytes_after for r in table.rows)
    assert weights < artifact.nbytes < weights + 800


@pytest.fixture
def compact_file(tmp_path):
    params = make_params()
    t = core.chain(PRUNE, CLUSTER)
    artifact = export.compress(params, t, t.init(params), container="compact")
    return pathlib.Path(export.save(artifact, tmp_path / "c.mjx"))


def _rewrite(path, body, name):
    out = path.parent / name
    out.write_bytes(body + hashlib.sha256(body).digest())
    return out


def test_corrupt_truncated_and_tampered_compact_files(compact_file):
    blob = open(compact_file, "rb").read()
    cases = {
        "truncated": blob[: len(blob) // 2],
        "short": blob[:6],
        "flipped": blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:],
    }
    for name, data in cases.items():
        bad = compact_file.parent / f"{name}.mjx"
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=rf"load: '{bad}': checksum mismatch"):
            export.load(bad)
    body = blob[:-32]
    (size,) = struct.unpack_from("<I", body, 4)
    manifest = zlib.decompress(body[8 : 8 + size])

    def with_manifest(text, extra=b""):
        head = zlib.compress(text)
        return struct.pack("<I", len(head)) + head + body[8 + size :] + extra

    resealed = {
        "garbled": (b"MJXA" + struct.pack("<I", 4) + b"abcd", "corrupted manifest"),
        "extra": (b"MJXA" + with_manifest(manifest, b"\0"), "1 bytes follow the last array"),
        "version": (
            b"MJXA" + with_manifest(manifest.replace(b'"version":1', b'"version":9')),
            "format version 9; this mixjax reads 1",
        ),
        "dtype": (
            b"MJXA" + with_manifest(manifest.replace(b'"|u1"', b'"|O"', 1)),
            "bad array entry",
        ),
        "kind": (
            b"MJXA" + with_manifest(manifest.replace(b'"codebook"', b'"zstd"', 1)),
            "unknown kind 'zstd'",
        ),
        "clusters": (
            b"MJXA" + with_manifest(re.sub(rb'"clusters":\d+', b'"clusters":2', manifest, count=1)),
            r"the codebook values must have shape \(2,\)",
        ),
        "short_data": (b"MJXA" + with_manifest(manifest)[:-10], "runs past the end of the data"),
    }
    for name, (body_bytes, match) in resealed.items():
        bad = _rewrite(compact_file, body_bytes, f"{name}.mjx")
        with pytest.raises(ValueError, match=rf"load: '{bad}': .*{match}"):
            export.load(bad)


def test_tampered_zip_codebook_record_is_rejected(tmp_path):
    params = make_params()
    t = core.chain(PRUNE, CLUSTER)
    artifact = export.compress(params, t, t.init(params))
    leaves = list(artifact.leaves)
    record = dict(leaves[1])
    record["indices"] = {**record["indices"], "codec": "lz4"}
    leaves[1] = record
    bad = export.save(export.Artifact(tuple(leaves), artifact.arrays), tmp_path / "z.mjx")
    with pytest.raises(ValueError, match=rf"load: '{bad}': leaf '.*': unknown stream codec"):
        export.load(bad)


def test_decode_errors():
    leaf = np.array([0.0, 0.5, 0.5, 1.0] * 8, np.float32)
    record, stored = _encode(leaf)
    cases = [
        ({"clusters": 0}, "bad clusters=0"),
        ({"values": None}, "a record must be a dict, got None"),
        ({"indices": 7}, "bad index stream 7"),
        ({"indices": {**record["indices"], "count": -1}}, "bad packed stream"),
        ({"sparse": 3}, "bad sparse field 3"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            kinds.decode({**record, **change}, stored)
    big = {**record, "indices": {"codec": "packed", "bits": 2, "count": 32, "data": "x"}}
    stored["x"] = bitpack.pack_bits(np.full(32, 3, np.uint8), 2)
    with pytest.raises(ValueError, match="index 3 past the 3 codebook values"):
        kinds.decode(big, stored)
    stored["y"] = bitpack.pack_bits(np.zeros(5, np.uint8), 2)
    few = {**record, "indices": {"codec": "packed", "bits": 2, "count": 5, "data": "y"}}
    with pytest.raises(ValueError, match="5 indices for 32 entries"):
        kinds.decode(few, stored)
    sparse_leaf = np.zeros(2000, np.float32)
    sparse_leaf[::50] = 1.0
    record, stored = _encode(sparse_leaf)
    assert record["sparse"] is not None
    bad = {**record, "sparse": {**record["sparse"], "codec": "relative", "gap_bits": 0}}
    with pytest.raises(ValueError, match="bad gap_bits=0"):
        kinds.decode(bad, stored)
    assert huffman.MAX_SYMBOLS >= codebook.MAX_CLUSTERS


def test_compress_rejects_an_unknown_container():
    params = make_params()
    with pytest.raises(
        ValueError, match=r"compress: container must be one of .* got container='tar'"
    ):
        export.compress(params, core.identity(), (), container="tar")
