"""The per-layer one-shot solvers (GPTQ, RTN, SparseGPT, Wanda, magnitude), checked against their
objectives on layers with known inputs and against float64 NumPy references of the same
recursions written another way: one row at a time, every later row updated at once (no lazy
blocks), with ``H^-1`` from ``np.linalg.inv`` and its upper factor from ``np.linalg.cholesky``.

The matrix view: ``W`` ``(K, O)``, rows = input features; the layer computes ``X @ W``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import prune, quant
from mixjax.calibrate import LayerStats, QuantSpec
from mixjax.prune import NM
from mixjax.quant.grids import expand_scale, quantize, quantize_dequantize

# ----------------------------------------------------------------------------------------------
# Layers with known inputs.


def layer(seed, k, o, n=None, *, correlated=True, dead=()):
    """Weights ``(K, O)`` float32 and the float32 gram of inputs ``X`` ``(N, K)`` drawn from a
    correlated Gaussian (a random mixing matrix, so ``X^T X`` is far from diagonal); the inputs
    in ``dead`` are always zero."""
    rng = np.random.default_rng(seed)
    n = 4 * k if n is None else n
    x = rng.normal(size=(n, k))
    if correlated:
        x = x @ (rng.normal(size=(k, k)) + 2.0 * np.eye(k)) + 0.5 * rng.normal(size=(n, 1))
    x[:, list(dead)] = 0.0
    w = rng.normal(size=(k, o)).astype(np.float32)
    return w, (x.T @ x).astype(np.float32)


def stats_of(gram):
    gram = jnp.asarray(gram)
    k = gram.shape[0]
    return LayerStats(gram, jnp.zeros(k), jnp.zeros(k), jnp.float32(1))


def error(w, new, gram):
    """``||X W - X W'||^2 = tr(dW^T H dW)`` in float64."""
    d = np.asarray(new, np.float64) - np.asarray(w, np.float64)
    return float(np.sum(d * (np.asarray(gram, np.float64) @ d)))


def codes(solution, spec):
    shape = solution.weight.shape
    s, z = expand_scale(solution.scale, shape), expand_scale(solution.zero_point, shape)
    return np.asarray(quantize(solution.weight, s, z, spec.grid))


def assert_on_grid(solution, spec, groups):
    k, o = solution.weight.shape
    assert solution.scale.shape == solution.zero_point.shape == (groups, o)
    assert solution.weight.dtype == jnp.float32
    shape = (k, o)
    again = quantize_dequantize(
        solution.weight,
        expand_scale(solution.scale, shape),
        expand_scale(solution.zero_point, shape),
        spec.grid,
    )
    np.testing.assert_array_equal(np.asarray(again), np.asarray(solution.weight))
    z = np.asarray(solution.zero_point)
    np.testing.assert_array_equal(z, np.round(z))


@functools.cache
def jitted(fn, **options):
    return jax.jit(functools.partial(fn, **options))


def gptq_jit(w, gram, spec, **options):
    return jitted(quant.gptq_solve, spec=spec, **options)(w, gram)


def rtn_jit(w, spec):
    return jitted(quant.rtn_solve, spec=spec)(w)


def sparsegpt_jit(w, gram, **options):
    return jitted(prune.sparsegpt_solve, **options)(w, gram)


GPTQ_OPTIONS = {"act_order": False, "damp": 0.01, "block_size": 16}
SPARSE_OPTIONS = {"block_size": 16, "damp": 0.01, "spec": None}

# ----------------------------------------------------------------------------------------------
# Float64 references, one row at a time.


def ref_factor(w, gram, damp):
    h, w = np.array(gram, np.float64), np.array(w, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return w, np.linalg.cholesky(np.linalg.inv(h)).T  # upper U with U^T U = H^-1


def ref_grid(spec):
    qmax = 2 ** (spec.bits - 1) - 1
    return (-qmax if spec.narrow_range else -qmax - 1), qmax


def ref_qparams(rows, spec):
    qmin, qmax = ref_grid(spec)
    lo, hi = np.minimum(rows.min(0), 0.0), np.maximum(rows.max(0), 0.0)
    s = np.maximum(-lo, hi) / qmax if spec.symmetric else (hi - lo) / (qmax - qmin)
    s = np.where(s > 0, s, 1.0)
    z = np.zeros_like(s) if spec.symmetric else np.clip(qmin - np.round(lo / s), qmin, qmax)
    return s, z


def ref_quantize(x, s, z, spec):
    qmin, qmax = ref_grid(spec)
    q = np.clip(np.round(x / s) + z, qmin, qmax)
    return q, (q - z) * s


def ref_gptq(w, gram, spec, act_order, damp):
    """Returns the codes ``(K, O)`` (original row order) and the scales."""
    k = w.shape[0]
    g = spec.group_size
    perm = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(k)
    w, u = ref_factor(w[perm], gram[perm][:, perm], damp)
    static = ref_qparams(w[np.argsort(perm)].reshape(-1, g or k, w.shape[1]).swapaxes(0, 1), spec)
    scales, zeros = np.array(static[0]), np.array(static[1])
    codes = np.zeros_like(w)
    for i in range(k):
        if g is not None and not act_order and i % g == 0:
            scales[i // g], zeros[i // g] = ref_qparams(w[i : i + g], spec)
        group = (perm[i] // g) if g is not None else 0
        codes[i], q = ref_quantize(w[i], scales[group], zeros[group], spec)
        e = (w[i] - q) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], e)
    return codes[np.argsort(perm)], scales


def ref_sparsegpt(w, gram, sparsity, nm, block, damp, spec):
    """Returns the mask, the weights (float, dequantized with ``spec``) and the codes."""
    w, u = ref_factor(w, gram, damp)
    k, o = w.shape
    keep = np.ones((k, o), bool)
    out, codes = np.zeros_like(w), np.zeros_like(w)
    g = None if spec is None else spec.group_size
    if spec is not None and g is None:
        s, z = ref_qparams(w, spec)
    for i in range(k):
        if nm is None and i % block == 0:
            rows = np.arange(i, min(i + block, k))
            scores = w[rows] ** 2 / np.diag(u)[rows, None] ** 2
            count = int(round(sparsity * len(rows)))
            for c in range(o):
                keep[rows[np.argsort(scores[:, c], kind="stable")[:count]], c] = False
        if nm is not None and i % nm.m == 0:
            rows = np.arange(i, i + nm.m)
            scores = w[rows] ** 2 / np.diag(u)[rows, None] ** 2
            for c in range(o):
                keep[rows[np.argsort(-scores[:, c], kind="stable")[nm.n :]], c] = False
        if g is not None and i % g == 0:
            s, z = ref_qparams(w[i : i + g], spec)
        q = w[i]
        if spec is not None:
            codes[i], q = ref_quantize(w[i], s, z, spec)
        q = np.where(keep[i], q, 0.0)
        e = (w[i] - q) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], e)
        out[i] = q
    return keep, out, codes


def ref_keep(scores, sparsity, nm):
    k, o = scores.shape
    keep = np.ones((k, o), bool)
    for c in range(o):
        if nm is None:
            keep[np.argsort(scores[:, c], kind="stable")[: int(round(sparsity * k))], c] = False
        else:
            for start in range(0, k, nm.m):
                order = np.argsort(-scores[start : start + nm.m, c], kind="stable")
                keep[start + order[nm.n :], c] = False
    return keep


# ----------------------------------------------------------------------------------------------
# GPTQ and RTN.

GPTQ_CASES = [(b, g, a) for b in (3, 4) for g in (None, 32) for a in (False, True)]


@pytest.mark.parametrize("bits,group,act_order", GPTQ_CASES)
def test_gptq_error_below_rtn_on_correlated_inputs(bits, group, act_order):
    w, gram = layer(0, 64, 24)
    spec = QuantSpec(bits, group, False, False)
    got = gptq_jit(w, gram, spec, act_order=act_order, damp=0.01, block_size=128)
    rtn = rtn_jit(w, spec)
    assert error(w, got.weight, gram) < 0.75 * error(w, rtn.weight, gram)
    assert_on_grid(got, spec, 1 if group is None else 64 // group)


@pytest.mark.parametrize("group,act_order", [(None, False), (32, False), (32, True)])
def test_gptq_equals_rtn_when_the_gram_is_diagonal(group, act_order):
    w, _ = layer(1, 64, 24)
    gram = np.diag(np.random.default_rng(1).uniform(0.5, 3.0, 64)).astype(np.float32)
    spec = QuantSpec(3, group, False, False)
    got = gptq_jit(w, gram, spec, act_order=act_order, damp=0.01, block_size=128)
    rtn = rtn_jit(w, spec)
    for a, b in zip(got, rtn, strict=True):
        if b is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rtn_is_fake_quant_with_the_same_grid():
    w, _ = layer(2, 64, 8)
    spec = QuantSpec(4, 16, False, False)
    got = quant.rtn_solve(w, spec)
    fq = quant.fake_quant(4, symmetric=False, group_size=16, narrow_range=False)
    state = fq.init({"w": jnp.asarray(w)})
    np.testing.assert_array_equal(
        np.asarray(got.weight), np.asarray(fq.apply({"w": jnp.asarray(w)}, state)["w"])
    )
    assert_on_grid(got, spec, 4)


# A code that lands within float32 rounding of a rounding boundary may differ between float32
# and float64 (it flips by one); each flip changes the error fed back by one step, so later rows
# drift a little and a later code or mask choice may flip too. On these layers none is seen
# (ten seeds, every case: codes and masks equal, weights within 2e-6, scales within 4e-7); one
# percent, off by one, is left for other platforms' float32 (GPU Cholesky and matmuls).
MAX_FLIPS = 0.01


def assert_codes_close(got, want):
    diff = np.abs(got - want)
    assert diff.max() <= 1, diff.max()
    assert np.mean(diff > 0) <= MAX_FLIPS, np.mean(diff > 0)


@pytest.mark.parametrize(
    "spec,act_order,k,block",
    [
        (QuantSpec(4, 16, False, False), False, 64, 16),  # groups inside lazy blocks
        (QuantSpec(4, 16, False, False), False, 64, 8),  # block widened to the group
        (QuantSpec(3, 16, True, True), True, 64, 16),  # static groups in act order
        (QuantSpec(4, None, False, False), False, 48, 32),  # a padded last block
    ],
)
def test_gptq_matches_the_float64_row_recursion(spec, act_order, k, block):
    w, gram = layer(3, k, 16)
    got = gptq_jit(w, gram, spec, act_order=act_order, damp=0.01, block_size=block)
    want_codes, want_scales = ref_gptq(w, gram, spec, act_order, 0.01)
    assert_codes_close(codes(got, spec), want_codes)
    np.testing.assert_allclose(np.asarray(got.scale), want_scales, rtol=1e-4)


def test_gptq_act_order_processes_rows_by_decreasing_energy():
    # With act_order, the row with the largest diag(H) is quantized first: plain rounding.
    w, gram = layer(4, 32, 8)
    spec = QuantSpec(4, None, False, False)
    got = gptq_jit(w, gram, spec, act_order=True, damp=0.01, block_size=8)
    first = int(np.argmax(np.diag(gram)))
    rtn = rtn_jit(w, spec)
    np.testing.assert_array_equal(np.asarray(got.weight)[first], np.asarray(rtn.weight)[first])


# ----------------------------------------------------------------------------------------------
# SparseGPT.

SPARSE_CASES = [
    (0.5, None, None, 64, 16),
    (None, NM(2, 4), None, 64, 16),
    (0.5, None, QuantSpec(4, 16, False, False), 64, 16),
    (None, NM(2, 4), QuantSpec(4, None, True, False), 64, 16),
    (0.3, None, None, 40, 16),  # a last block of 8 rows: round(0.3 * 8) = 2 pruned there
]


@pytest.mark.parametrize("sparsity,nm,spec,k,block", SPARSE_CASES)
def test_sparsegpt_matches_the_float64_row_recursion(sparsity, nm, spec, k, block):
    w, gram = layer(5, k, 12)
    options = {"sparsity": sparsity, "nm": nm, "block_size": block, "damp": 0.01, "spec": spec}
    got = sparsegpt_jit(w, gram, **options)
    keep, weight, want_codes = ref_sparsegpt(w, gram, sparsity, nm, block, 0.01, spec)
    mask = np.asarray(got.mask)
    if spec is None:
        np.testing.assert_array_equal(mask, keep)
        np.testing.assert_allclose(np.asarray(got.weight), weight, rtol=1e-4, atol=1e-4)
    else:  # code flips change later scores a little: a mask choice may flip with them
        assert np.mean(mask != keep) <= MAX_FLIPS
        assert_codes_close(
            np.where(mask & keep, codes(got, spec), 0), np.where(keep, want_codes, 0)
        )
    np.testing.assert_array_equal(np.asarray(got.weight)[~mask], 0.0)


@pytest.mark.parametrize("pattern", [0.5, NM(2, 4)])
def test_sparsegpt_error_below_magnitude_with_exact_masks(pattern):
    k, o, block = 64, 12, 16
    w, gram = layer(6, k, o)
    sparsity, nm = (pattern, None) if isinstance(pattern, float) else (None, pattern)
    got = sparsegpt_jit(w, gram, sparsity=sparsity, nm=nm, block_size=block, damp=0.01, spec=None)
    magnitude = prune.layer_magnitude(pattern).solve(jnp.asarray(w), None)
    assert error(w, got.weight, gram) < 0.75 * error(w, magnitude.weight, gram)
    mask = np.asarray(got.mask)
    if nm is None:  # exactly half of every column of every block
        np.testing.assert_array_equal(mask.reshape(k // block, block, o).sum(1), block // 2)
    else:  # exactly 2 of every 4 rows of every column
        np.testing.assert_array_equal(mask.reshape(k // 4, 4, o).sum(1), 2)
    np.testing.assert_array_equal(np.asarray(got.weight)[~mask], 0.0)
    assert np.all(np.asarray(got.weight)[mask] != 0.0)


def test_sparsegpt_joint_quantization_on_the_grid():
    w, gram = layer(7, 64, 12)
    spec = QuantSpec(4, 32, False, False)
    method = prune.sparsegpt(NM(2, 4), bits=4, group_size=32, block_size=16)
    assert method.quant == spec and method.prunes and method.uses_inputs
    got = jax.jit(method.solve)(jnp.asarray(w), stats_of(gram))
    assert_on_grid(got, spec, 2)
    mask = np.asarray(got.mask)
    np.testing.assert_array_equal(np.asarray(got.weight)[~mask], 0.0)
    np.testing.assert_array_equal(mask.reshape(16, 4, 12).sum(1), 2)
    # Far below magnitude pruning rounded to the same grid. (Not always below SparseGPT's
    # pruning rounded afterwards: on a layer this small, pruning's error feedback moves later
    # rows out of the range their group's scale was fixed from, at the group's first row.)
    magnitude = prune.layer_magnitude(NM(2, 4)).solve(jnp.asarray(w), None)
    rounded = quant.rtn_solve(magnitude.weight, spec).weight
    assert error(w, got.weight, gram) < 0.75 * error(w, rounded, gram)


# ----------------------------------------------------------------------------------------------
# Wanda and magnitude.


@pytest.mark.parametrize("pattern", [0.5, 0.3, NM(2, 4), NM(1, 4)])
def test_wanda_prunes_by_weight_times_input_norm(pattern):
    w, gram = layer(8, 32, 10)
    got = prune.wanda(pattern).solve(jnp.asarray(w), stats_of(gram))
    sparsity, nm = (pattern, None) if isinstance(pattern, float) else (None, pattern)
    norms = np.sqrt(np.diag(gram.astype(np.float64)))
    keep = ref_keep(np.abs(w) * norms[:, None], sparsity, nm)
    np.testing.assert_array_equal(np.asarray(got.mask), keep)
    np.testing.assert_array_equal(np.asarray(got.weight), np.where(keep, w, 0.0))
    assert got.scale is None and got.zero_point is None
    if nm is None:  # the same count in every column
        np.testing.assert_array_equal(keep.sum(0), 32 - round(sparsity * 32))


def test_wanda_and_magnitude_share_the_selection():
    w, gram = layer(9, 32, 10)
    ones = np.eye(32, dtype=np.float32)  # all inputs of norm 1: Wanda's score is |W|
    wanda = prune.wanda_solve(jnp.asarray(w), stats_of(ones), sparsity=0.5, nm=None)
    magnitude = prune.layer_magnitude(0.5)
    assert magnitude.name == "magnitude" and not magnitude.uses_inputs
    got = magnitude.solve(jnp.asarray(w), None)
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(wanda.mask))
    np.testing.assert_array_equal(np.asarray(got.mask), ref_keep(np.abs(w), 0.5, None))


def test_ties_are_broken_in_row_order_with_exact_counts():
    w = np.ones((8, 3), np.float32)
    got = prune.layer_magnitude(0.25).solve(jnp.asarray(w), None)
    np.testing.assert_array_equal(np.asarray(got.mask).sum(0), 6)
    np.testing.assert_array_equal(np.asarray(got.mask)[:2], False)
    got = prune.layer_magnitude(NM(2, 4)).solve(jnp.asarray(w), None)
    np.testing.assert_array_equal(np.asarray(got.mask)[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])


# ----------------------------------------------------------------------------------------------
# Dead inputs, jit, compilation.


def test_dead_inputs_give_finite_results():
    w, gram = layer(10, 32, 8, dead=(0, 5, 6, 31))
    zero = np.zeros_like(gram)
    spec = QuantSpec(3, 8, False, False)
    for g in (gram, zero):
        for act_order in (False, True):
            got = gptq_jit(w, g, spec, act_order=act_order, damp=0.01, block_size=16)
            assert np.all(np.isfinite(np.asarray(got.weight)))
            assert np.all(np.isfinite(np.asarray(got.scale)))
            np.testing.assert_array_equal(np.asarray(got.weight)[[0, 5, 6, 31]], 0.0)
        for nm, sparsity in ((None, 0.5), (NM(2, 4), None)):
            got = sparsegpt_jit(w, g, sparsity=sparsity, nm=nm, **{**SPARSE_OPTIONS, "spec": spec})
            assert np.all(np.isfinite(np.asarray(got.weight)))
        got = prune.wanda_solve(jnp.asarray(w), stats_of(g), sparsity=0.5, nm=None)
        assert np.all(np.isfinite(np.asarray(got.weight)))
    # With no input at all, every row is dead: all weights are zero.
    got = gptq_jit(w, zero, spec, act_order=False, damp=0.01, block_size=16)
    np.testing.assert_array_equal(np.asarray(got.weight), 0.0)


def test_jit_and_eager_agree_bitwise():
    w, gram = layer(11, 32, 8)
    spec = QuantSpec(3, 8, False, False)
    cases = [
        (quant.gptq_solve, {"spec": spec, "act_order": False, "damp": 0.01, "block_size": 16}),
        (prune.sparsegpt_solve, {"spec": spec, "sparsity": 0.5, "nm": None, **SPARSE_OPTIONS}),
    ]
    for solve, options in cases:
        eager = solve(jnp.asarray(w), gram, **options)
        for a, b in zip(eager, jitted(solve, **options)(w, gram), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "method",
    [
        quant.gptq(3, group_size=8, block_size=16),
        prune.sparsegpt(0.5, block_size=16),
        prune.wanda(NM(2, 4)),
    ],
    ids=["gptq", "sparsegpt", "wanda"],
)
def test_a_method_compiles_once_per_layer_shape(method):
    traces = []

    def solve(w, stats):
        traces.append(w.shape)
        return method.solve(w, stats)

    solve = jax.jit(solve)
    for seed in (12, 13):
        w, gram = layer(seed, 32, 8)
        solve(jnp.asarray(w), stats_of(gram))
    assert traces == [(32, 8)]


def test_factories():
    method = quant.gptq(3, group_size=32, act_order=True, symmetric=True)
    assert method.name == "gptq" and method.quant == QuantSpec(3, 32, True, False)
    assert not method.prunes and method.uses_inputs
    method = quant.rtn(4)
    assert method.name == "rtn" and not method.uses_inputs
    w, _ = layer(14, 32, 4)
    np.testing.assert_array_equal(
        np.asarray(method.solve(jnp.asarray(w), None).weight),
        np.asarray(quant.rtn_solve(w, QuantSpec(4, None, False, False)).weight),
    )
    method = prune.sparsegpt(0.5)
    assert method.quant is None and method.prunes
    assert prune.wanda(0.5).uses_inputs


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: quant.gptq(1), ValueError, r"mixjax.quant.gptq: bits must be .* got bits=1"),
        (lambda: quant.gptq(9), ValueError, r"mixjax.quant.gptq: bits .*\[2, 8\].* got bits=9"),
        (lambda: quant.rtn(4.0), TypeError, r"mixjax.quant.rtn: bits must be an integer"),
        (lambda: quant.gptq(group_size=0), ValueError, r"group_size must be .* >= 1"),
        (lambda: quant.gptq(damp=0.0), ValueError, r"mixjax.quant.gptq: damp must be > 0"),
        (lambda: quant.gptq(block_size=0), ValueError, r"block_size must be an integer >= 1"),
        (lambda: quant.gptq(act_order=1), TypeError, r"act_order must be a bool"),
        (lambda: prune.sparsegpt(1.0), ValueError, r"sparsegpt: sparsity must be in \[0.0, 1.0\)"),
        (lambda: prune.wanda(-0.1), ValueError, r"mixjax.prune.wanda: sparsity must be in"),
        (lambda: prune.wanda("2:4"), TypeError, r"fraction in \[0, 1\) or mixjax.prune.NM"),
        (lambda: prune.layer_magnitude(NM(3, 2)), ValueError, r"needs 1 <= n <= m"),
        (lambda: prune.sparsegpt(bits=1), ValueError, r"sparsegpt: bits must be"),
        (lambda: prune.sparsegpt(group_size=32), ValueError, r"group_size=32 .* needs bits="),
    ],
)
def test_factories_reject_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_solvers_reject_layers_that_do_not_fit():
    w, gram = layer(15, 48, 4)
    stats = stats_of(gram)
    message = r"gptq_solve: group_size=32 does not divide the layer's 48 input rows"
    with pytest.raises(ValueError, match=message):  # at trace time, under jit
        jax.jit(quant.gptq(4, group_size=32).solve)(jnp.asarray(w), stats)
    with pytest.raises(ValueError, match=r"rtn_solve: group_size=32 does not divide .* 48"):
        quant.rtn(4, group_size=32).solve(jnp.asarray(w), None)
    with pytest.raises(ValueError, match=r"sparsegpt_solve: group_size=32 does not divide"):
        prune.sparsegpt(0.5, bits=4, group_size=32).solve(jnp.asarray(w), stats)
    w6, gram6 = layer(15, 6, 4)
    with pytest.raises(ValueError, match=r"sparsegpt_solve: N:M 2:4 needs the layer's 6 input"):
        prune.sparsegpt(NM(2, 4)).solve(jnp.asarray(w6), stats_of(gram6))
    with pytest.raises(ValueError, match=r"wanda_solve: N:M 2:4 needs .* \(6, 4\)"):
        prune.wanda(NM(2, 4)).solve(jnp.asarray(w6), stats_of(gram6))
    with pytest.raises(
        ValueError, match=r"gram matrix must be \(K, K\) = \(48, 48\) .* got \(6, 6\)"
    ):
        quant.gptq_solve(w, gram6, QuantSpec(4, None, False, False), **GPTQ_OPTIONS)
    with pytest.raises(ValueError, match=r"exactly one of sparsity= and nm="):
        prune.sparsegpt_solve(w, gram, sparsity=0.5, nm=NM(2, 4), **SPARSE_OPTIONS)
    with pytest.raises(ValueError, match=r"sparsegpt_solve: sparsity must be in"):
        prune.sparsegpt_solve(w, gram, sparsity=1.5, nm=None, **SPARSE_OPTIONS)
