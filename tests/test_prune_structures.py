"""Tests of mixjax.prune.structures and mixjax.prune.selection against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.prune import selection, structures
from mixjax.prune.structures import NM, Block, Channel, Unstructured


def scores(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random(shape), jnp.float32)


def test_block_units_are_block_means_and_expand_back(array_harness):
    x = scores((2, 4, 6))
    units = array_harness(lambda s: structures.unit_scores(Block((2, 3)), s))(x)
    ref = np.asarray(x).reshape(2, 2, 2, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(units, ref, rtol=1e-6)
    mask = np.asarray(units) > 0.5
    full = structures.expand(Block((2, 3)), jnp.asarray(mask), x.shape)
    np.testing.assert_array_equal(full, np.repeat(np.repeat(mask, 2, axis=1), 3, axis=2))


def test_channel_units_are_output_means_and_expand_over_inputs(array_harness):
    x = scores((3, 3, 2, 5))
    units = array_harness(lambda s: structures.unit_scores(Channel(), s))(x)
    np.testing.assert_allclose(units, np.asarray(x).reshape(-1, 5).mean(axis=0), rtol=1e-6)
    keep = jnp.asarray([True, False, True, True, False])
    np.testing.assert_array_equal(
        structures.expand(Channel(), keep, x.shape), np.broadcast_to(keep, x.shape)
    )
    assert structures.unit_scores(Unstructured(), x) is x


def nm_reference(s, m, keep):
    """Per group of m along axis -2: keep the `keep` highest, ties to the earlier position."""
    s = np.asarray(s)
    out = np.zeros(s.shape, bool)
    rows, cols = s.shape[-2:]
    for idx in np.ndindex(*s.shape[:-2], rows // m, cols):
        *lead, g, c = idx
        group = s[(*lead, slice(g * m, (g + 1) * m), c)]
        order = sorted(range(m), key=lambda i: (-group[i], i))[:keep]
        for i in order:
            out[(*lead, g * m + i, c)] = True
    return out


@pytest.mark.parametrize("m, keep", [(4, 2), (4, 1), (8, 3), (2, 2)])
def test_nm_mask_equals_the_reference(array_harness, m, keep):
    s = jnp.round(scores((2, 8, 3)) * 4) / 4  # ties
    got = array_harness(lambda x: structures.nm_mask(x, m, jnp.int32(keep)))(s)
    np.testing.assert_array_equal(got, nm_reference(s, m, keep))
    assert np.all(np.asarray(got).reshape(2, 8 // m, m, 3).sum(axis=2) == keep)


def test_nm_keep_along_a_ramp():
    ramp = [float(v) for v in np.linspace(0.0, 0.75, 7)]
    kept = [int(structures.nm_keep(jnp.float32(v), NM(1, 4))) for v in ramp]
    assert kept == [4, 4, 3, 3, 2, 2, 1]
    assert int(structures.nm_keep(jnp.float32(0.9), NM(2, 4))) == 2  # never fewer than n


@pytest.mark.parametrize(
    "structure, shape, match",
    [
        (NM(2, 4), (6, 3), r"f: leaf 'w' \(6, 3\) float32: N:M 2:4 needs the input axis \(axis 0,"),
        (NM(2, 4), (8,), r"N:M sparsity needs a kernel with ndim >= 2"),
        (Block((2, 2)), (3, 4), r"block \(2, 2\) does not tile the last two axes \(3, 4\)"),
        (Channel(), (4,), r"channel pruning needs a kernel with ndim >= 2"),
    ],
)
def test_check_leaf_errors(structure, shape, match):
    with pytest.raises(ValueError, match=match):
        structures.check_leaf("f", structure, "w", jnp.zeros(shape))


@pytest.mark.parametrize(
    "structure, scope, error, match",
    [
        ("nm_2,4", "uniform", TypeError, r"f: structure must be Unstructured\(\), NM\(n, m\)"),
        (NM(3, 2), "uniform", ValueError, r"NM\(n, m\) needs 1 <= n <= m, got NM\(3, 2\)"),
        (NM(2.0, 4), "uniform", TypeError, r"NM\(n, m\) needs integers"),
        (NM(2, 4), "global", ValueError, r"it needs scope='uniform', got scope='global'"),
        (Block((0, 2)), "uniform", ValueError, r"Block\(shape\) needs two positive integers"),
    ],
)
def test_check_structure_errors(structure, scope, error, match):
    with pytest.raises(error, match=match):
        structures.check_structure("f", structure, scope)


def smallest_reference(arrays, k):
    flat = np.concatenate([np.where(np.isnan(a), np.inf, np.maximum(a, 0)).ravel() for a in arrays])
    marked = np.zeros(flat.size, bool)
    marked[np.argsort(flat, kind="stable")[:k]] = True
    return np.split(marked, np.cumsum([a.size for a in arrays])[:-1])


@pytest.mark.parametrize("k", [0, 1, 7, 25, 40])
def test_smallest_marks_exactly_k_like_a_stable_sort(harness, k):
    rng = np.random.default_rng(3)
    a = np.round(rng.random(24) * 5).astype(np.float32)  # many ties
    b = rng.random(16).astype(np.float32)
    b[[2, 9]] = np.nan  # NaN scores count as +inf
    got = harness(lambda x, y, kk: selection.smallest([x, y], kk))(
        jnp.asarray(a), jnp.asarray(b), jnp.int32(k)
    )
    for g, want in zip(got, smallest_reference([a, b], k), strict=True):
        np.testing.assert_array_equal(g, want)
    assert sum(int(np.sum(g)) for g in got) == k


def test_units_to_prune_rounds_and_clips():
    units = [int(selection.units_to_prune(jnp.float32(s), 10)) for s in (0.0, 0.26, 0.5, 1.2)]
    assert units == [0, 3, 5, 10]


def test_erk_sparsities_hit_the_target_and_cap_density():
    shapes = [(784, 300), (300, 100), (100, 10), (3, 3, 1, 4)]
    got = np.array([float(s) for s in selection.erk_sparsities(jnp.float32(0.9), shapes)])
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    np.testing.assert_allclose(np.sum((1 - got) * sizes) / sizes.sum(), 0.1, atol=1e-4)
    assert got[-1] == 0.0  # the small conv would be denser than dense: kept dense
    assert np.all(np.diff(got[:3]) < 0)  # larger layers are pruned harder
    jitted = jax.jit(lambda s: jnp.stack(selection.erk_sparsities(s, shapes)))(jnp.float32(0.9))
    np.testing.assert_allclose(jitted, got, rtol=1e-6)
