"""Clustering then quantization keeps the codebook: in ``chain(prune, cluster, fake_quant)`` the
quantizer scales on the clustering's blocks (``ParamTransform.shares`` / ``adapt``), so each
clustered kernel keeps <= K values (per output channel when clustered per channel), all on its
integer grid, and export stores a codebook of integers that integer inference can re-encode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixjax
from mixjax import export, prune, quant, share
from mixjax.core import EmptyState, ParamTransform
from mixjax.export import kinds, records

K = 16
PRUNE = prune.magnitude(0.5)  # one instance: its compiled programs are reused across tests
KERNELS = {"Conv_0": (3, 3, 8, 16), "Dense_0": (64, 32)}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        name: {
            "kernel": jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32),
        }
        for name, shape in KERNELS.items()
    }


def groups(w, per_channel):
    """The clustering's groups of a kernel: its output channels (last axis) or all of it."""
    w = np.asarray(w)
    return list(w.reshape(-1, w.shape[-1]).T) if per_channel else [w.reshape(-1)]


def the_chain(per_channel, quantizer=None):
    return mixjax.chain(
        PRUNE, share.cluster(K, per_channel=per_channel), quantizer or quant.fake_quant(8)
    )


def assert_on_grid(w, scale, qmax):
    """Every entry is ``q * scale`` for an integer ``|q| <= qmax`` (scale expanded per entry)."""
    s = np.broadcast_to(quant.expand_scale(np.asarray(scale), w.shape), w.shape)
    q = np.round(w / s)
    np.testing.assert_array_equal((q * s).astype(np.float32), w)
    assert np.abs(q).max() <= qmax


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_clustered_kernel_keeps_at_most_k_values_on_the_integer_grid(per_channel, harness):
    params = make_params()
    t = the_chain(per_channel)
    state = t.init(params)
    view = harness(t.apply)(params, state)
    for name, shape in KERNELS.items():
        w = np.asarray(view[name]["kernel"])
        scale = state[2].scale[name]["kernel"]
        # The state's scale for a clustered leaf: () per tensor, per channel per channel.
        assert scale.shape == (((1,) * (len(shape) - 1) + shape[-1:]) if per_channel else ())
        assert max(np.unique(g).size for g in groups(w, per_channel)) <= K
        assert_on_grid(w, scale, 127)
        np.testing.assert_array_equal(view[name]["bias"], params[name]["bias"])  # not selected
    if not per_channel:  # without the adaptation, per-channel scales re-round the codebook
        clustered = mixjax.chain(PRUNE, share.cluster(K)).apply(params, state[:2])
        plain = quant.fake_quant(8)
        again = plain.apply(clustered, plain.init(clustered))
        assert np.unique(np.asarray(again["Dense_0"]["kernel"])).size > 2 * K


@pytest.mark.parametrize("per_channel", [False, True])
def test_update_keeps_the_codebook_inside_jit(per_channel):
    params = make_params(1)
    t = the_chain(per_channel)
    state = jax.jit(t.init)(params)
    moved = jax.tree.map(lambda x: x * 1.5, params)
    new = jax.jit(t.update)(moved, state, 0)
    assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, state)
    view = jax.jit(t.apply)(moved, new)
    for name in KERNELS:
        w = np.asarray(view[name]["kernel"])
        assert max(np.unique(g).size for g in groups(w, per_channel)) <= K
        assert_on_grid(w, new[2].scale[name]["kernel"], 127)


def test_lsq_and_group_wise_scales_coarsen_to_the_clusters():
    params = make_params(2)
    for per_channel in (False, True):
        t = the_chain(per_channel, quant.lsq(8))
        state = t.init(params)
        dense = state[2].scale["Dense_0"]["kernel"]
        assert dense.shape == ((1, 32) if per_channel else ())
        w = np.asarray(t.apply(params, state)["Dense_0"]["kernel"])
        assert max(np.unique(g).size for g in groups(w, per_channel)) <= K
    # Groups of 16 inputs (scales (4, 32)) coarsen to the per-channel clusters' (1, 32).
    t = the_chain(True, quant.fake_quant(8, group_size=16, where="Dense_0/kernel"))
    state = t.init(params)
    assert state[2].scale["Dense_0"]["kernel"].shape == (1, 32)
    assert state[2].scale["Conv_0"]["kernel"] is None


def test_nested_chains_share_too_and_a_foreign_state_is_refused():
    params = make_params(3)
    flat, nested = (
        the_chain(False),
        mixjax.chain(mixjax.chain(PRUNE, share.cluster(K)), quant.fake_quant(8)),
    )
    a, b = flat.init(params), nested.init(params)
    np.testing.assert_array_equal(a[2].scale["Dense_0"]["kernel"], b[1].scale["Dense_0"]["kernel"])
    np.testing.assert_array_equal(
        flat.apply(params, a)["Dense_0"]["kernel"], nested.apply(params, b)["Dense_0"]["kernel"]
    )
    standalone = quant.fake_quant(8).init(params)  # per-channel scales: not this chain's
    with pytest.raises(
        ValueError,
        match=r"fake_quant: leaf 'Conv_0/kernel' \(3, 3, 8, 16\) float32: state scale has shape "
        r"\(1, 1, 1, 16\), expected \(\) ",
    ):
        flat.apply(params, (*a[:2], standalone))


def test_chain_adapts_each_transform_to_what_those_before_it_share():
    seen = []

    def producer(blocks):
        return ParamTransform(
            lambda p: EmptyState(),
            lambda p, s: p,
            lambda p, s, step, **e: s,
            shares=lambda p, s: {"w": blocks},
        )

    def consumer(shared=None):
        # Records what it was adapted to each time chain builds it, at trace time.
        seen.append(shared)
        return ParamTransform(
            lambda p: EmptyState(),
            lambda p, s: p,
            lambda p, s, step, **e: s,
            due=lambda step: jnp.asarray(step) % 2 == 0,  # traced: update inside lax.cond
            adapt=consumer,
        )

    passthrough = mixjax.identity()  # no shares: passes on what it receives
    t = mixjax.chain(producer(()), passthrough, consumer(), producer((1, 4)), consumer())
    seen.clear()
    params = {"w": jnp.ones((3, 4))}
    state = t.init(params)
    # The later producer's blocks replace the earlier ones for the consumer after it.
    assert seen[-2:] == [{"w": ()}, {"w": (1, 4)}]
    assert all(s in ({"w": ()}, {"w": (1, 4)}) for s in seen)
    seen.clear()
    jax.jit(t.update)(params, state, jnp.asarray(0))
    assert seen and all(s in ({"w": ()}, {"w": (1, 4)}) for s in seen)
    assert t.shares(params, state) == {"w": (1, 4)}


# ---------------------------------------------------------------- export


def re_encode(record, arrays):
    """What integer inference does with a codebook of ints: the kernel on the values' grid."""
    grid = records.decode_int(record["values"], arrays)
    kernel = kinds.decode(record, arrays)
    own = {}

    def store(array):
        own[str(len(own))] = np.asarray(array)
        return str(len(own) - 1)

    encoded = records.int_encoder(grid.scale, grid.zero_point, fn_name="test")("k", kernel, store)
    return kernel, records.decode_int(encoded, own), records.decode_int_values(encoded, own)


@pytest.mark.parametrize("per_channel", [False, True])
def test_export_stores_a_codebook_of_ints_that_integer_inference_re_encodes(per_channel, tmp_path):
    params = make_params(4)
    t = the_chain(per_channel)
    state = t.init(params)
    view = jax.device_get(jax.jit(t.apply)(params, state))
    artifact = export.compress(params, t, state)
    loaded = export.load(export.save(artifact, tmp_path / "c.mjx"))
    for restored in (artifact.params(), loaded.params(like=params)):
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(view), strict=True):
            np.testing.assert_array_equal(a, b)
    for name, shape in KERNELS.items():
        record = artifact.record(f"{name}/kernel")
        assert record["kind"] == "codebook" and record["values"]["kind"] == "int"
        assert record["clusters"] <= K and record["bits"] == 4
        if per_channel:  # each channel's values on its own scale: (K, 1, 1, 16), (K, 32)
            assert record["axis"] == 0
            middle = [1] * (len(shape) - 2)
            assert record["values"]["shape"] == [record["clusters"], *middle, shape[-1]]
        else:
            assert "axis" not in record and record["values"]["shape"] == [record["clusters"]]
        kernel, codes, values = re_encode(record, artifact.arrays)
        np.testing.assert_array_equal(values, kernel)
        scale = np.asarray(state[2].scale[name]["kernel"])
        np.testing.assert_array_equal(codes.q, np.round(kernel / scale))
        assert codes.scale.size == (shape[-1] if per_channel else 1)
        # 4-bit indices and the values: fewer bytes than the int8 codes alone.
        assert records.record_nbytes(record, artifact.arrays) < np.prod(shape)


def test_per_channel_codebook_decode_errors():
    params = make_params(5)
    t = the_chain(True)
    artifact = export.compress(params, t, t.init(params))
    record = artifact.record("Dense_0/kernel")
    for change in ({"axis": 1}, {"axis": 2}, {"axis": "0"}, {"clusters": record["clusters"] - 1}):
        bad = {**record, **change}
        bits = max(1, (bad["clusters"] - 1).bit_length())
        with pytest.raises(ValueError, match=r"per-channel codebook values of shape \(\d+, 32\)"):
            kinds.decode({**bad, "bits": bits}, artifact.arrays)
