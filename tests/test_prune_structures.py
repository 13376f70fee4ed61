"""Sparsity structures and exact selection (:mod:`mixjax.prune.structures`, ``.selection``).

Every kernel is checked against a NumPy reference written another way (loops, ``np.repeat``,
a stable argsort, a closed-form ERK solution), eagerly and under ``jax.jit`` (and ``jax.vmap``
where the function maps arrays to arrays).
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.prune import NM, Block, Channel, Unstructured, selection, structures

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# unit_scores / expand.


def block_means(scores, bh, bw):
    """Mean of every (bh, bw) tile of the last two axes, by explicit loops."""
    *lead, rows, cols = scores.shape
    out = np.zeros((*lead, rows // bh, cols // bw), np.float64)
    for i in range(rows // bh):
        for j in range(cols // bw):
            tile = scores[..., i * bh : (i + 1) * bh, j * bw : (j + 1) * bw]
            out[..., i, j] = tile.mean(axis=(-2, -1))
    return out


@pytest.mark.parametrize(
    ("shape", "block"), [((6, 4), (2, 2)), ((4, 6), (4, 3)), ((2, 3, 4, 6), (2, 3))]
)
def test_block_unit_scores_and_expand_match_numpy(array_harness, shape, block):
    scores = RNG.random(shape).astype(np.float32)
    structure = Block(block)
    units = np.asarray(array_harness(lambda s: structures.unit_scores(structure, s))(scores))
    expected = block_means(scores, *block)
    assert units.shape == expected.shape
    np.testing.assert_allclose(units, expected, rtol=1e-6)
    unit_mask = units > np.median(units)
    expand = array_harness(lambda u: structures.expand(structure, u, shape))
    mask = np.asarray(expand(jnp.asarray(unit_mask)))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(
        mask, np.repeat(np.repeat(unit_mask, block[0], axis=-2), block[1], axis=-1)
    )
    # Round trip: the unit scores of an expanded 0/1 mask are the unit mask itself.
    back = structures.unit_scores(structure, jnp.asarray(mask, jnp.float32))
    np.testing.assert_array_equal(np.asarray(back), unit_mask.astype(np.float32))


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 2, 4)])
def test_channel_unit_scores_and_expand_match_numpy(array_harness, shape):
    scores = RNG.random(shape).astype(np.float32)
    units = np.asarray(array_harness(lambda s: structures.unit_scores(Channel(), s))(scores))
    out = shape[-1]
    assert units.shape == (out,)
    np.testing.assert_allclose(units, [scores[..., c].mean() for c in range(out)], rtol=1e-6)
    unit_mask = np.arange(out) % 2 == 0
    expand = array_harness(lambda u: structures.expand(Channel(), u, shape))
    mask = np.asarray(expand(jnp.asarray(unit_mask)))
    assert mask.shape == shape
    for c in range(out):  # a whole output channel is kept or pruned
        assert mask[..., c].all() == unit_mask[c] and mask[..., c].any() == unit_mask[c]
    back = structures.unit_scores(Channel(), jnp.asarray(mask, jnp.float32))
    np.testing.assert_array_equal(np.asarray(back), unit_mask.astype(np.float32))


def test_unstructured_units_are_the_weights(array_harness):
    scores = RNG.random((3, 4)).astype(np.float32)
    units = array_harness(lambda s: structures.unit_scores(Unstructured(), s))(scores)
    np.testing.assert_array_equal(units, scores)
    expand = array_harness(lambda u: structures.expand(Unstructured(), u, (3, 4)))
    np.testing.assert_array_equal(expand(jnp.asarray(scores > 0.5)), scores > 0.5)
    assert structures.UNSTRUCTURED == Unstructured()


# ----------------------------------------------------------------------------------------------
# N:M.


def nm_reference(scores, m, keep):
    """Per group of ``m`` along axis -2: the ``keep`` highest, ties to the earlier position."""
    moved = np.moveaxis(scores, -2, -1)  # (..., out, in)
    mask = np.zeros(moved.shape, bool)
    for index in np.ndindex(moved.shape[:-1]):
        for g in range(0, moved.shape[-1], m):
            group = moved[index][g : g + m]
            for i in sorted(range(m), key=lambda i: (-group[i], i))[:keep]:
                mask[index][g + i] = True
    return np.moveaxis(mask, -1, -2)


@pytest.mark.parametrize(
    ("shape", "m", "keep"),
    [((8, 3), 4, 2), ((8, 3), 4, 4), ((8, 3), 4, 0), ((8, 3), 2, 1), ((2, 2, 6, 2), 3, 1),
     ((2, 2, 6, 2), 2, 1)],
)  # fmt: skip
def test_nm_mask_matches_numpy(array_harness, shape, m, keep):
    # Few distinct values: many ties, which go to the earlier position.
    scores = RNG.integers(0, 3, size=shape).astype(np.float32)
    mask = np.asarray(array_harness(lambda s: structures.nm_mask(s, m, keep))(scores))
    assert mask.shape == shape and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, nm_reference(scores, m, keep))
    groups = np.moveaxis(mask, -2, -1).reshape(-1, m)
    np.testing.assert_array_equal(groups.sum(axis=1), keep)


def test_nm_mask_takes_a_traced_keep(harness):
    scores = np.float32([[4.0], [1.0], [3.0], [2.0]])
    run = harness(lambda s, keep: structures.nm_mask(s, 4, keep))
    masks = [np.asarray(run(scores, jnp.int32(keep))).ravel().tolist() for keep in range(5)]
    assert masks == [
        [False, False, False, False],
        [True, False, False, False],
        [True, False, True, False],
        [True, False, True, True],
        [True, True, True, True],
    ]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 3), (1, 1), (3, 8), (2, 22), (1, 23)])
def test_nm_keep_on_a_ramp(harness, n, m):
    ramp = [Fraction(i, 4 * m) for i in range(4 * m)]  # 0, 1/(4m), ..., just below 1
    expected = [max(n, m - int(s * m)) for s in ramp]  # exact rational floor(s * m)
    run = harness(lambda s: structures.nm_keep(s, NM(n, m)))
    got = np.asarray(run(jnp.asarray([float(s) for s in ramp], jnp.float32)))
    assert got.dtype == np.int32
    assert got.tolist() == expected


def test_nm_keep_passes_through_every_pattern_of_a_ramp():
    keeps = [int(structures.nm_keep(jnp.float32(s), NM(2, 4))) for s in (0.0, 0.25, 0.5, 0.9)]
    assert keeps == [4, 3, 2, 2]  # 4:4, 3:4, 2:4, never fewer than n
    # s * m counts as the integer it stands for where float32 rounds it below:
    # float32(13 / 22) * 22 is 12.999999, and 13 of the 22 weights go.
    assert float(jnp.float32(13 / 22) * 22) < 13
    assert int(structures.nm_keep(jnp.float32(13 / 22), NM(1, 22))) == 9


# ----------------------------------------------------------------------------------------------
# check_leaf / check_structure.


@pytest.mark.parametrize(
    ("structure", "shape", "rule"),
    [
        (NM(2, 4), (6, 4), r"N:M 2:4 needs the input axis \(axis 0, size 6\) divisible by 4"),
        (
            NM(2, 4),
            (3, 3, 6, 8),
            r"N:M 2:4 needs the input axis \(axis 2, size 6\) divisible by 4",
        ),
        (NM(1, 2), (8,), r"N:M sparsity needs a kernel with ndim >= 2"),
        (Block((2, 3)), (4, 4), r"block \(2, 3\) does not tile the last two axes \(4, 4\)"),
        (Block((2, 2)), (4,), r"block sparsity needs a kernel with ndim >= 2"),
        (Channel(), (4,), r"channel pruning needs a kernel with ndim >= 2"),
    ],
)
def test_check_leaf_errors(structure, shape, rule):
    shown = str(shape).replace("(", r"\(").replace(")", r"\)")
    match = rf"^mixjax\.prune\.magnitude: leaf 'Dense_0/kernel' {shown} float32: {rule}$"
    with pytest.raises(ValueError, match=match):
        structures.check_leaf(
            "mixjax.prune.magnitude", structure, "Dense_0/kernel", jnp.zeros(shape)
        )


@pytest.mark.parametrize(
    ("structure", "shape"),
    [(NM(2, 4), (8, 3)), (NM(2, 4), (3, 3, 4, 5)), (Block((2, 3)), (4, 6)),
     (Block((1, 1)), (3, 3, 5, 7)), (Channel(), (5, 2)), (Unstructured(), (7,))],
)  # fmt: skip
def test_check_leaf_accepts_fitting_leaves(structure, shape):
    assert structures.check_leaf("fn", structure, "k", jnp.zeros(shape)) is None


@pytest.mark.parametrize(
    ("structure", "scope", "error", "match"),
    [
        ("nm", "uniform", TypeError, r"^fn: structure must be Unstructured\(\), NM\(n, m\), "
         r"Block\(\(bh, bw\)\) or Channel\(\), got 'nm'$"),
        ((2, 4), "uniform", TypeError, r"^fn: structure must be .*, got \(2, 4\)$"),
        (NM(2.0, 4), "uniform", TypeError, r"^fn: NM\(n, m\) needs integers, got NM\(2\.0, 4\)$"),
        (NM(True, 4), "uniform", TypeError, r"^fn: NM\(n, m\) needs integers, got NM\(True, 4\)$"),
        (NM(0, 4), "uniform", ValueError, r"^fn: NM\(n, m\) needs 1 <= n <= m, got NM\(0, 4\)$"),
        (NM(5, 4), "uniform", ValueError, r"^fn: NM\(n, m\) needs 1 <= n <= m, got NM\(5, 4\)$"),
        (NM(2, 4), "global", ValueError, r"^fn: N:M sparsity is per group of 4; it needs "
         r"scope='uniform', got scope='global'$"),
        (Block((2,)), "uniform", ValueError,
         r"^fn: Block\(shape\) needs two positive integers, got \(2,\)$"),
        (Block((2, 0)), "uniform", ValueError, r"^fn: Block\(shape\) .*, got \(2, 0\)$"),
        (Block((2.0, 2)), "uniform", ValueError, r"^fn: Block\(shape\) .*, got \(2\.0, 2\)$"),
        (Block(3), "uniform", ValueError, r"^fn: Block\(shape\) .*, got 3$"),
    ],
)  # fmt: skip
def test_check_structure_errors(structure, scope, error, match):
    with pytest.raises(error, match=match):
        structures.check_structure("fn", structure, scope)


@pytest.mark.parametrize(
    ("structure", "scope"),
    [(Unstructured(), "global"), (NM(2, 4), "uniform"), (NM(4, 4), "uniform"),
     (Block((2, 3)), "erk"), (Block([1, 1]), "uniform"), (Channel(), "global")],
)  # fmt: skip
def test_check_structure_accepts_well_formed(structure, scope):
    assert structures.check_structure("fn", structure, scope) is None


# ----------------------------------------------------------------------------------------------
# selection.smallest / units_to_prune.


def smallest_reference(arrays, k):
    """The k smallest entries across the arrays (NaN as +inf), ties by position: stable sort."""
    flat = np.concatenate([np.where(np.isnan(a), np.inf, a) for a in arrays])
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(flat, kind="stable")[:k]] = True
    return np.split(chosen, np.cumsum([a.size for a in arrays])[:-1])


def score_cases():
    """Triples of flat score arrays of one set of shapes (so eager ops compile once each)."""
    spread = [
        np.float32([0.5, 0.0, 0.25, 0.5, 0.75, 0.0, 0.25]),  # ties, zeros
        RNG.random(5).astype(np.float32),
        # adjacent floats (same high bits), -0.0 (sign bit set) tied with 0.0, tiny, huge, +inf
        np.float32([1.0, np.nextafter(np.float32(1), np.float32(2)), -0.0, 1e-30, 3e38, np.inf]),
    ]
    ties = [np.full(n, 0.5, np.float32) for n in (7, 5, 6)]  # all equal: by position only
    nans = [  # NaN counts as +inf: after every number, tied with inf by position
        np.float32([np.nan, 0.3, np.inf, 0.3, 0.0, np.nan, 2.0]),
        np.float32([0.1, np.nan, 2.0, 0.3, 0.0]),
        np.float32([np.inf, 5.0, np.nan, 0.2, 0.3, 0.3]),
    ]
    return {"spread": spread, "ties": ties, "nans": nans}


@pytest.mark.parametrize("case", ["spread", "ties", "nans"])
def test_smallest_marks_exactly_k_like_a_stable_sort(harness, case):
    arrays = score_cases()[case]
    run = harness(selection.smallest)
    total = sum(a.size for a in arrays)
    # k = 0 and k = all included; eagerly (every op compiled on its own) a few k only.
    ks = (0, 1, 5, 12, total - 1, total) if harness is jax.jit else (0, 5, total)
    for k in ks:
        got = run([jnp.asarray(a) for a in arrays], jnp.int32(k))
        expected = smallest_reference(arrays, k)
        assert len(got) == len(arrays)
        for g, e, a in zip(got, expected, arrays, strict=True):
            assert g.shape == a.shape and g.dtype == jnp.bool_
            np.testing.assert_array_equal(np.asarray(g), e, err_msg=f"{case}, k={k}")
        assert sum(int(np.sum(g)) for g in got) == k


@pytest.mark.parametrize(
    ("sparsity", "units", "expected"),
    [(0.0, 10, 0), (0.5, 5, 2), (0.5, 7, 4), (0.9, 10, 9), (1.5, 4, 4), (-0.5, 4, 0), (0.3, 0, 0)],
)
def test_units_to_prune(harness, sparsity, units, expected):
    # round() is half to even (2.5 -> 2, 3.5 -> 4), then clipped to [0, units].
    got = harness(lambda s: selection.units_to_prune(s, units))(jnp.float32(sparsity))
    assert got.dtype == jnp.int32 and int(got) == expected


# ----------------------------------------------------------------------------------------------
# erk_sparsities.


def erk_reference(sparsity, shapes):
    """ERK densities in closed form: cap the densest leaves at 1 until none exceeds it."""
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes], np.float64)
    dense = np.zeros(len(shapes), bool)
    while not dense.all():
        budget = (1 - sparsity) * sizes.sum() - sizes[dense].sum()
        eps = budget / (raw[~dense] * sizes[~dense]).sum()
        newly = ~dense & (eps * raw >= 1)
        if not newly.any():
            return 1 - np.where(dense, 1.0, eps * raw), dense
        dense |= newly
    return np.zeros(len(shapes)), dense


@pytest.mark.parametrize(
    ("sparsity", "shapes", "capped"),
    [
        (0.9, [(3, 2), (64, 32), (32, 8), (3, 3, 8, 16)], [True, False, False, False]),
        (0.5, [(10, 10), (20, 10)], [False, False]),
        (0.9, [(2, 2), (4, 3), (100, 100)], [True, True, False]),
        (0.99, [(2, 2), (4, 3), (100, 100)], [False, False, False]),
    ],
)
def test_erk_sparsities(harness, sparsity, shapes, capped):
    run = harness(lambda s: selection.erk_sparsities(s, shapes))
    got = np.array([float(s) for s in run(jnp.float32(sparsity))])
    expected, dense = erk_reference(sparsity, shapes)
    assert dense.tolist() == capped
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # The size-weighted mean sparsity is the target; capped leaves stay exactly dense.
    sizes = np.array([np.prod(s) for s in shapes], np.float64)
    assert np.sum(got * sizes) / sizes.sum() == pytest.approx(sparsity, abs=1e-5)
    assert np.all(got[dense] == 0.0)
    assert np.all(((got > 0) & (got < 1)) | dense)
    # The uncapped leaves share one eps: their densities are proportional to sum/prod(shape).
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes])
    eps = (1 - got[~dense]) / raw[~dense]
    np.testing.assert_allclose(eps, eps[0], rtol=1e-4)


def test_erk_sparsity_zero_keeps_every_leaf_dense(harness):
    got = harness(lambda s: selection.erk_sparsities(s, [(5, 4), (6, 6)]))(jnp.float32(0.0))
    np.testing.assert_allclose([float(s) for s in got], [0.0, 0.0], atol=1e-6)
