"""mixjax.quant.awq: AWQ's per-input-feature scales and clipping search, against its objective
on layers with known inputs, against a float64 NumPy reference of the same search written another
way (a loop over candidates, the groups one by one), and end to end: the result is what
fake_quant, the training step, export and integer inference take, exactly."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mixjax import export, layout, oneshot, quant, train
from mixjax.calibrate import LayerStats, QuantSpec
from mixjax.export import records
from mixjax.quant.grids import expand_scale, quantize

OPTIONS = {"grid_points": 20, "clip": True, "max_shrink": 0.5, "clip_points": 20}


def outlier_layer(seed, k=64, o=24, n=512, outliers=0.1, size=20.0):
    """Weights ``(K, O)``, inputs ``X`` ``(N, K)`` float64 with a few channels ``size`` times
    larger than the rest (the activation outliers AWQ protects), and their stats."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k)) * np.where(rng.random(k) < outliers, size, 1.0)
    w = rng.normal(size=(k, o)).astype(np.float32)
    return w, x, stats(x)


def stats(x):
    x32 = np.asarray(x, np.float32)
    return LayerStats(
        jnp.asarray(x32.T @ x32),
        jnp.asarray(np.abs(x32).sum(0)),
        jnp.asarray(np.abs(x32).max(0)),
        jnp.float32(len(x32)),
    )


def output_error(w, new, x):
    """``||X W - X W'||^2`` in float64."""
    return float(np.sum((np.asarray(x, np.float64) @ (np.asarray(new, np.float64) - w)) ** 2))


# ----------------------------------------------------------------------------------------------
# Float64 reference: candidates in a Python loop, one group at a time.


def ref_round(w, spec, shrink=None):
    """Round to nearest per group of ``spec.group_size`` rows (``shrink`` ``(G, O)``: each
    group's range times its factor): ``(values, scales (G, O))``."""
    qmax = 2 ** (spec.bits - 1) - 1
    qmin = -qmax if spec.narrow_range else -qmax - 1
    g = spec.group_size or len(w)
    out, scales = np.empty_like(w), []
    for i in range(len(w) // g):
        rows = w[i * g : (i + 1) * g]
        c = 1.0 if shrink is None else shrink[i]
        lo, hi = np.minimum(rows.min(0) * c, 0.0), np.maximum(rows.max(0) * c, 0.0)
        s = np.maximum(-lo, hi) / qmax if spec.symmetric else (hi - lo) / (qmax - qmin)
        s = np.where(s > 0, s, 1.0)
        z = 0.0 if spec.symmetric else np.clip(qmin - np.round(lo / s), qmin, qmax)
        out[i * g : (i + 1) * g] = (np.clip(np.round(rows / s) + z, qmin, qmax) - z) * s
        scales.append(s)
    return out, np.array(scales)


def ref_factors(x, alpha):
    m = np.abs(x).mean(0)
    s = np.maximum(m / m.max(), 1e-4) ** alpha
    return np.sqrt(s.max() * s.min()) / s


def ref_awq(w, x, spec, grid_points, clip, max_shrink, clip_points):
    """``(weights, factors)`` by the module docstring's rules, in float64."""
    w, x = np.asarray(w, np.float64), np.asarray(x, np.float64)
    errors = []
    for i in range(grid_points):
        a = ref_factors(x, i / grid_points)
        errors.append(output_error(w, ref_round(w / a[:, None], spec)[0] * a[:, None], x))
    a = ref_factors(x, int(np.argmin(errors)) / grid_points)
    scaled, xs = w / a[:, None], x * a
    plain = ref_round(scaled, spec)[0]
    if not clip:
        return plain * a[:, None], a
    g = spec.group_size or len(w)
    groups = len(w) // g
    best = np.ones((groups, w.shape[1]))
    best_error = np.full((groups, w.shape[1]), np.inf)
    for c in np.linspace(1.0, max_shrink, clip_points):
        values = ref_round(scaled, spec, np.full((groups, w.shape[1]), c))[0]
        for i in range(groups):
            part = slice(i * g, (i + 1) * g)
            e = np.sum((xs[:, part] @ (values[part] - scaled[part])) ** 2, axis=0)
            better = e < best_error[i]
            best[i, better], best_error[i, better] = c, e[better]
    clipped = ref_round(scaled, spec, best)[0]
    keep = np.sum((xs @ (clipped - scaled)) ** 2, 0) < np.sum((xs @ (plain - scaled)) ** 2, 0)
    return np.where(keep[None], clipped, plain) * a[:, None], a


# ----------------------------------------------------------------------------------------------
# The objective.


@pytest.mark.parametrize(("bits", "group"), [(4, 16), (3, 16), (4, None)])
def test_awq_beats_rounding_on_outlier_inputs(bits, group):
    w, x, st = outlier_layer(0)
    spec = QuantSpec(bits, group, False, False)
    rtn = output_error(w, quant.rtn_solve(w, spec).weight, x)
    scaled = quant.awq_solve(w, st, spec, **{**OPTIONS, "clip": False})
    full = quant.awq_solve(w, st, spec, **OPTIONS)
    assert output_error(w, scaled.weight, x) < 0.6 * rtn
    assert output_error(w, full.weight, x) <= output_error(w, scaled.weight, x) * (1 + 1e-5)
    assert full.input_scale.shape == (64,) and bool(jnp.all(full.input_scale > 0))


def test_one_grid_point_without_clipping_is_round_to_nearest():
    w, _, st = outlier_layer(1)
    spec = QuantSpec(4, 16, True, True)
    got = quant.awq_solve(w, st, spec, **{**OPTIONS, "grid_points": 1, "clip": False})
    want = quant.rtn_solve(w, spec)
    np.testing.assert_array_equal(got.input_scale, np.ones(64, np.float32))
    np.testing.assert_array_equal(got.weight, want.weight)
    np.testing.assert_array_equal(got.scale, want.scale)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize(("symmetric", "group"), [(False, 16), (True, None)])
def test_equals_the_float64_reference(clip, symmetric, group):
    w, x, st = outlier_layer(2, k=32, o=12, n=256)
    spec = QuantSpec(3, group, symmetric, False)
    options = {**OPTIONS, "grid_points": 8, "clip_points": 6, "clip": clip}
    got = jax.jit(lambda w, st: quant.awq_solve(w, st, spec, **options))(w, st)
    want, factors = ref_awq(w, x, spec, **options)
    np.testing.assert_allclose(got.input_scale, factors, rtol=1e-5)  # the same alpha
    # Float32 and float64 may round a value on a half-way boundary (or tie two shrink factors)
    # differently; nearly all values agree, and the objective does to float32 precision.
    same = np.isclose(np.asarray(got.weight), want, rtol=1e-5, atol=1e-6)
    assert same.mean() > 0.97, same.mean()
    np.testing.assert_allclose(output_error(w, got.weight, x), output_error(w, want, x), rtol=2e-2)


def test_result_is_on_the_grid_with_its_factors():
    w, _, st = outlier_layer(3)
    spec = QuantSpec(4, 16, False, False)
    s = quant.awq_solve(w, st, spec, **OPTIONS)
    a = np.asarray(s.input_scale)[:, None]
    scale = expand_scale(s.scale, w.shape)
    zero = expand_scale(s.zero_point, w.shape)
    q = np.asarray(quantize(s.weight / a, scale, zero, spec.grid))
    assert q.min() >= -8 and q.max() <= 7
    back = (q - np.asarray(zero)).astype(np.float32) * np.asarray(scale) * a.astype(np.float32)
    np.testing.assert_array_equal(back, np.asarray(s.weight))


def test_dead_inputs_stay_finite():
    w, x, _ = outlier_layer(4)
    x[:, :5] = 0.0
    s = quant.awq_solve(w, stats(x), QuantSpec(4, 16, False, False), **OPTIONS)
    assert bool(jnp.all(jnp.isfinite(s.weight))) and bool(jnp.all(jnp.isfinite(s.input_scale)))


# ----------------------------------------------------------------------------------------------
# Whole models: the transform, the training step, export and integer inference.


class Attention(nn.Module):
    """DenseGeneral projections and an MLP, as users write them."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 8), name="q")(x)
        v = nn.DenseGeneral((2, 8), name="v")(x)
        w = jax.nn.softmax(jnp.einsum("blnh,bmnh->bnlm", q, q) / 3.0)
        x = x + nn.DenseGeneral(16, axis=(-2, -1), name="o")(jnp.einsum("bnlm,bmnh->blnh", w, v))
        return nn.Dense(4, name="head")(jax.nn.gelu(nn.Dense(32, name="up")(x)).mean(1))


def leaves_equal(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.fixture(scope="module")
def attention():
    model = Attention()
    scale = jnp.where(jnp.arange(16) % 5 == 0, 8.0, 1.0)  # outlier channels
    x = jax.random.normal(jax.random.key(0), (8, 6, 16)) * scale
    params = model.init(jax.random.key(1), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return fn, params, [x[:4], x[4:]]


def test_whole_model_is_exact_through_transform_export_and_integer_path(attention, tmp_path):
    fn, params, batches = attention
    result = oneshot.compress(quant.awq(4, group_size=8), fn, params, batches)
    assert leaves_equal(result.transform.apply(result.params, result.state), result.params)
    factors = result.state.input_scale
    assert factors["o"]["kernel"].shape == (2, 8, 1)  # (heads, head_dim, embed): contraction
    assert factors["q"]["kernel"].shape == (16, 1, 1)
    artifact = export.compress(result.params, result.transform, result.state)
    record = artifact.record("up/kernel")
    assert record["bits"] == 4 and record["input_scale"] is not None
    assert leaves_equal(artifact.params(), result.params)
    export.save(artifact, str(tmp_path / "m.mjx"))
    assert leaves_equal(export.load(str(tmp_path / "m.mjx")).params(), result.params)
    int_model = export.integer_model(fn, artifact, batches[0])
    assert all("AWQ" in row.why for row in int_model.table)
    out = export.integer_apply(int_model, fn, artifact.params(), batches[0])
    np.testing.assert_allclose(out, fn(result.params, batches[0]), rtol=1e-5, atol=1e-5)


def test_awq_beats_rounding_end_to_end(attention):
    fn, params, batches = attention
    x = jnp.concatenate(batches)
    dense = fn(params, x)
    err = {}
    for method in (quant.awq(3, group_size=8), quant.rtn(3, group_size=8)):
        result = oneshot.compress(method, fn, params, batches)
        err[method.name] = float(jnp.mean((fn(result.params, x) - dense) ** 2))
    assert err["awq"] < err["rtn"], err


def test_fine_tuning_keeps_the_grid(attention):
    fn, params, batches = attention
    result = oneshot.compress(quant.awq(4, group_size=8), fn, params, batches)
    tx = optax.adam(1e-3)
    state = train.init_train_state(
        result.params, tx, key=jax.random.key(0), transform=result.transform
    )
    assert leaves_equal(state.transform_state, result.state)  # init keeps the one-shot state
    loss = lambda logits, labels: jnp.mean((logits - labels) ** 2)  # noqa: E731
    step = train.make_train_step(
        train.linen_apply(Attention()), tx, transform=result.transform, loss=loss
    )
    x = jnp.concatenate(batches)
    for _ in range(3):
        state, _ = step(state, {"image": x, "label": jnp.ones((8, 4))})
    view = result.transform.apply(state.params, state.transform_state)
    assert not leaves_equal(view, result.params)  # it trained
    artifact = export.compress(state.params, result.transform, state.transform_state)
    assert leaves_equal(artifact.params(), view)  # and stayed on the same grid, exactly


def test_nnx_linear_model():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 32, rngs=rngs)
            self.out = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.up(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    x = jax.random.normal(jax.random.key(2), (32, 16)) * jnp.linspace(0.1, 5.0, 16)
    result = oneshot.compress(quant.awq(4, group_size=8), fn, state, [x])
    assert [r.path for r in result.layers] == ["up/kernel", "out/kernel"]
    assert leaves_equal(result.transform.apply(result.params, result.state), result.params)


# ----------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid_points": 0}, "grid_points"),
        ({"max_shrink": 0.0}, "max_shrink"),
        ({"max_shrink": 1.5}, "max_shrink"),
        ({"clip_points": 0}, "clip_points"),
        ({"bits": 9}, "bits"),
        ({"clip": "yes"}, "clip"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        quant.awq(**{"bits": 4, **kwargs})


def test_group_size_that_does_not_divide_is_named(attention):
    fn, params, batches = attention
    with pytest.raises(ValueError, match="group_size=5 does not divide"):
        oneshot.compress(quant.awq(4, group_size=5), fn, params, batches)


def test_bad_input_scales_are_rejected(attention):
    fn, params, batches = attention
    result = oneshot.compress(quant.awq(4, group_size=8), fn, params, batches)
    factors = result.state.input_scale
    layouts = layout.learn(fn, params, batches[0])
    for bad, match in [
        (jnp.ones((16, 2, 1)), r"input scale of shape \(16, 2, 1\)"),
        (-jnp.ones((16, 1, 1)), "finite and positive"),
    ]:
        broken = {**factors, "q": {**factors["q"], "kernel": bad}}
        state = result.state._replace(input_scale=broken)
        with pytest.raises(ValueError, match=match):
            quant.fake_quant(4, group_size=8, layouts=layouts, scales=state).init(result.params)


def test_damaged_input_scale_record_is_an_error(attention):
    fn, params, batches = attention
    result = oneshot.compress(quant.awq(4, group_size=8), fn, params, batches)
    artifact = export.compress(result.params, result.transform, result.state)
    record = artifact.record("up/kernel")
    arrays = dict(artifact.arrays)
    arrays[record["input_scale"]] = np.zeros_like(arrays[record["input_scale"]])
    with pytest.raises(ValueError, match="input_scale holds values that are not finite"):
        records.decode_int(record, arrays)
