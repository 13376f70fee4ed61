"""Tests of mixjax.augment: each op against NumPy, per-example randomness, dtypes, chain fusion."""

import colorsys
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import augment
from mixjax.augment import mix as augment_mix

KEY = jax.random.key(0)
N, H, W, C = 8, 6, 5, 3


def images_u8(n=N, h=H, w=W, c=C, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8))


def images_f32(n=N, h=H, w=W, c=C, seed=0):
    return images_u8(n, h, w, c, seed).astype(jnp.float32) / 255.0


# NumPy references -------------------------------------------------------------------------


def np_sample(x, matrices, size, mode, fill=0.0):
    """Bilinear sampling of x (N, H, W, C) at in = M @ (row, col, 1), float64."""
    x = np.asarray(x, np.float64)
    n, h, w, _ = x.shape
    rows, cols = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    out = np.zeros((n, *size, x.shape[3]))
    for b in range(n):
        m = np.asarray(matrices[b], np.float64)
        y = m[0, 0] * rows + m[0, 1] * cols + m[0, 2]
        xx = m[1, 0] * rows + m[1, 1] * cols + m[1, 2]
        kw = {"constant_values": fill} if mode == "constant" else {}
        padded = np.pad(x[b], ((h, h), (w, w), (0, 0)), mode=mode, **kw)
        y0, x0 = np.floor(y).astype(int), np.floor(xx).astype(int)
        wy, wx = (y - y0)[..., None], (xx - x0)[..., None]
        get = lambda r, c, p=padded: p[np.clip(r + h, 0, 3 * h - 1), np.clip(c + w, 0, 3 * w - 1)]
        out[b] = (
            (1 - wy) * (1 - wx) * get(y0, x0)
            + (1 - wy) * wx * get(y0, x0 + 1)
            + wy * (1 - wx) * get(y0 + 1, x0)
            + wy * wx * get(y0 + 1, x0 + 1)
        )
    return out


def np_hsv_apply(x, fn):
    """Applies fn(h, s, v) -> (h, s, v) per pixel with colorsys; x float (N, H, W, 3)."""
    flat = np.asarray(x, np.float64).reshape(-1, 3)
    out = [colorsys.hsv_to_rgb(*fn(i, *colorsys.rgb_to_hsv(*p))) for i, p in enumerate(flat)]
    return np.asarray(out).reshape(x.shape)


def to_u8(values):
    return np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)


def assert_close_u8(actual, expected, atol=1):
    assert actual.dtype == jnp.uint8
    diff = np.abs(np.asarray(actual).astype(int) - np.asarray(expected).astype(int))
    assert diff.max() <= atol, (
        f"max |diff| {diff.max()} at {np.unravel_index(diff.argmax(), diff.shape)}"
    )


# API conventions --------------------------------------------------------------------------

DETERMINISTIC = [
    augment.flip_horizontal,
    augment.flip_vertical,
    augment.crop,
    augment.resized_crop,
    augment.rotate,
    augment.adjust_brightness,
    augment.adjust_contrast,
    augment.adjust_saturation,
    augment.adjust_hue,
    augment.cutout,
    augment.blend_pairs,
    augment.paste_pairs,
]


@pytest.mark.parametrize("fn", DETERMINISTIC, ids=lambda f: f.__name__)
def test_deterministic_signatures(fn):
    params = list(inspect.signature(fn).parameters.values())
    assert params[0].name == "images"
    for p in params[1:]:
        if p.default is not inspect.Parameter.empty:
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{fn.__name__}: {p.name}"


# Geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [images_u8, images_f32])
def test_flips_exact(harness, make):
    x = make()
    do = jnp.arange(N) % 3 == 0
    mask = np.asarray(do)[:, None, None, None]
    got_h = harness(augment.flip_horizontal)(x, do)
    got_v = harness(augment.flip_vertical)(x, do)
    assert got_h.dtype == x.dtype and got_v.dtype == x.dtype
    np.testing.assert_array_equal(got_h, np.where(mask, np.flip(x, 2), x))
    np.testing.assert_array_equal(got_v, np.where(mask, np.flip(x, 1), x))


def test_random_flip_each_example_flipped_or_not():
    x = images_u8()
    out = np.asarray(jax.jit(augment.random_flip(horizontal=0.5, vertical=0.5))(KEY, x))
    kinds = set()
    for b in range(N):
        candidates = {
            (fh, fv): np.flip(np.flip(x[b], 1) if fh else x[b], 0)
            if fv
            else (np.flip(x[b], 1) if fh else x[b])
            for fh in (0, 1)
            for fv in (0, 1)
        }
        match = [k for k, v in candidates.items() if np.array_equal(out[b], v)]
        assert match, f"example {b} is not a flip of its input"
        kinds.add(match[0])
    assert len(kinds) > 1


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
@pytest.mark.parametrize("make", [images_u8, images_f32])
def test_crop_offsets_exact(harness, mode, make):
    x = make()
    pad, size = 3, (5, 7)
    offsets = np.stack([np.arange(N) % 7, (3 * np.arange(N)) % 5], axis=1)
    fn = lambda im, off: augment.crop(im, off, size, padding=pad, mode=mode, fill=0.2)
    got = harness(fn)(x, jnp.asarray(offsets))
    fill = 51 if x.dtype == jnp.uint8 else 0.2
    kw = {"constant_values": fill} if mode == "constant" else {}
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode, **kw)
    want = np.stack(
        [padded[b, r : r + size[0], c : c + size[1]] for b, (r, c) in enumerate(offsets)]
    )
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, want)


def test_random_crop_is_a_crop_of_the_padded_image():
    x = images_u8()
    pad = 2
    out = np.asarray(jax.jit(augment.random_crop(padding=pad))(KEY, x))
    padded = np.pad(np.asarray(x), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    found = set()
    for b in range(N):
        hits = [
            (r, c)
            for r in range(2 * pad + 1)
            for c in range(2 * pad + 1)
            if np.array_equal(out[b], padded[b, r : r + H, c : c + W])
        ]
        assert hits, f"example {b} is not a crop of its padded image"
        found.add(hits[0])
    assert len(found) > 1


def test_resized_crop_matches_numpy_bilinear():
    x = images_f32(h=7, w=9)
    boxes = jnp.asarray([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 7.0, 9.0]] * (N // 2))
    size = (6, 4)
    got = jax.jit(lambda im, b: augment.resized_crop(im, b, size))(x, boxes)
    scale = np.asarray(boxes)[:, 2:] / np.asarray(size)
    offset = np.asarray(boxes)[:, :2] + 0.5 * scale - 0.5
    m = np.zeros((N, 2, 3))
    m[:, 0, 0], m[:, 1, 1], m[:, :, 2] = scale[:, 0], scale[:, 1], offset
    np.testing.assert_allclose(got, np_sample(x, m, size, "edge"), atol=1e-5)


def test_resized_crop_of_the_whole_image_is_the_identity():
    x = images_u8()
    np.testing.assert_array_equal(augment.resized_crop(x, jnp.asarray([0, 0, H, W]), (H, W)), x)


def test_random_resized_crop_full_scale_is_identity():
    x = images_u8()
    op = augment.random_resized_crop((H, W), scale=(1.0, 1.0), ratio=(W / H, W / H))
    assert_close_u8(jax.jit(op)(KEY, x), x, atol=0)
    out = jax.jit(augment.random_resized_crop((4, 3)))(KEY, x)
    assert out.shape == (N, 4, 3, C) and out.dtype == jnp.uint8


def test_rotate_90_is_rot90():
    x = images_f32(h=5, w=5)
    got = jax.jit(lambda im: augment.rotate(im, 90.0))(x)
    np.testing.assert_allclose(got, np.rot90(np.asarray(x), axes=(1, 2)), atol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_rotate_matches_numpy(harness, mode):
    x = images_f32()
    degrees = jnp.linspace(-30.0, 30.0, N)
    shifts = jnp.stack([jnp.linspace(-1.5, 1.5, N), jnp.linspace(2.0, -2.0, N)], axis=1)
    got = harness(lambda im, d, s: augment.rotate(im, d, shifts=s, mode=mode, fill=0.5))(
        x, degrees, shifts
    )
    t = np.deg2rad(np.asarray(degrees, np.float64))
    lin = np.stack([np.stack([np.cos(t), np.sin(t)], -1), np.stack([-np.sin(t), np.cos(t)], -1)], 1)
    centre = (np.asarray([H, W]) - 1) / 2
    offset = centre - np.einsum("nij,nj->ni", lin, centre + np.asarray(shifts))
    m = np.concatenate([lin, offset[:, :, None]], axis=2)
    np.testing.assert_allclose(got, np_sample(x, m, (H, W), mode, 0.5), atol=1e-4)


def test_random_affine_zero_range_is_identity():
    x = images_u8()
    assert_close_u8(augment.random_affine()(KEY, x), x, atol=0)


def test_batch_ops_compose_with_an_outer_vmap():
    x = jnp.stack([images_u8(seed=1), images_u8(seed=2)])  # (2, N, H, W, C): e.g. per device
    offsets = jnp.broadcast_to(jnp.asarray([1, 2]), (2, N, 2))
    got = jax.vmap(lambda im, off: augment.crop(im, off, (H, W), padding=2))(x, offsets)
    np.testing.assert_array_equal(got[1], augment.crop(x[1], offsets[1], (H, W), padding=2))
    delta = jnp.full((2, N), 0.1)
    got = jax.vmap(augment.adjust_brightness)(x, delta)
    np.testing.assert_array_equal(got[0], augment.adjust_brightness(x[0], delta[0]))


# Colour -----------------------------------------------------------------------------------


def test_brightness_formula(harness):
    delta = jnp.linspace(-0.5, 0.5, N)
    xf, xu = images_f32(), images_u8()
    d = np.asarray(delta)[:, None, None, None]
    got_f = harness(augment.adjust_brightness)(xf, delta)
    np.testing.assert_allclose(got_f, np.clip(np.asarray(xf) + d, 0, 1), atol=1e-6)
    got_u = harness(augment.adjust_brightness)(xu, delta)
    want_u = np.clip(np.asarray(xu).astype(int) + np.round(255 * d), 0, 255)
    assert got_u.dtype == jnp.uint8
    np.testing.assert_array_equal(got_u, want_u)


def test_contrast_formula(harness):
    factor = jnp.linspace(0.0, 2.0, N)
    x = images_f32()
    xn = np.asarray(x, np.float64)
    mean = xn.mean(axis=(1, 2), keepdims=True)
    want = np.clip((xn - mean) * np.asarray(factor)[:, None, None, None] + mean, 0, 1)
    np.testing.assert_allclose(harness(augment.adjust_contrast)(x, factor), want, atol=1e-6)
    assert_close_u8(harness(augment.adjust_contrast)(images_u8(), factor), to_u8(want))


def test_hsv_matches_colorsys_and_round_trips():
    x = images_f32(n=2, h=4, w=4)
    hsv = augment.rgb_to_hsv(x)
    want = np.asarray([colorsys.rgb_to_hsv(*p) for p in np.asarray(x).reshape(-1, 3)])
    np.testing.assert_allclose(np.asarray(hsv).reshape(-1, 3), want, atol=1e-6)
    np.testing.assert_allclose(augment.hsv_to_rgb(hsv), x, atol=1e-6)
    grey = jnp.full((1, 1, 1, 3), 0.4)
    np.testing.assert_allclose(augment.rgb_to_hsv(grey)[..., :2], 0.0)


def test_hue_and_saturation_match_colorsys():
    harness = jax.jit
    x = images_f32(n=4, h=3, w=3)
    delta = jnp.asarray([-0.3, 0.0, 0.1, 0.45])
    factor = jnp.asarray([0.0, 0.5, 1.0, 1.7])
    per_pixel = 9
    want_hue = np_hsv_apply(x, lambda i, h, s, v: ((h + delta[i // per_pixel]) % 1.0, s, v))
    want_sat = np_hsv_apply(x, lambda i, h, s, v: (h, min(1.0, s * factor[i // per_pixel]), v))
    np.testing.assert_allclose(harness(augment.adjust_hue)(x, delta), want_hue, atol=1e-5)
    np.testing.assert_allclose(harness(augment.adjust_saturation)(x, factor), want_sat, atol=1e-5)
    xu = (x * 255).round().astype(jnp.uint8)
    want_u = np_hsv_apply(xu / 255.0, lambda i, h, s, v: ((h + delta[i // per_pixel]) % 1.0, s, v))
    assert_close_u8(harness(augment.adjust_hue)(xu, delta), to_u8(want_u))


def test_hue_third_turn_maps_red_to_green():
    red = jnp.asarray([[[[1.0, 0.0, 0.0]]]])
    np.testing.assert_allclose(augment.adjust_hue(red, 1 / 3), [[[[0.0, 1.0, 0.0]]]], atol=1e-6)


# Cutout, mixing and labels ----------------------------------------------------------------


def test_cutout_box_exact(harness):
    x = images_u8()
    boxes = jnp.asarray([[1, 0, 4, 2]] * N)
    got = harness(lambda im, b: augment.cutout(im, b, fill=1.0))(x, boxes)
    want = np.asarray(x).copy()
    want[:, 1:4, 0:2] = 255
    np.testing.assert_array_equal(got, want)


def test_random_cutout_erases_a_clipped_box():
    x = images_u8() | 1  # no zero pixels, so erased pixels are exactly the zeros
    out = np.asarray(augment.random_cutout(3)(KEY, x))
    for b in range(N):
        rows, cols = np.nonzero((out[b] == 0).all(-1))
        assert 0 < rows.size <= 9
        assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # a full rectangle


def test_mixup_labels_match_pixel_weights():
    n = 6
    x = jnp.broadcast_to((jnp.arange(n, dtype=jnp.float32) / n)[:, None, None, None], (n, 4, 4, 3))
    labels = jnp.arange(n)
    out, soft = jax.jit(augment.mixup(0.4, num_classes=n))(KEY, x, labels)
    prev = np.roll(np.arange(n), 1)
    w = (np.asarray(out)[:, 0, 0, 0] - prev / n) / ((np.arange(n) - prev) / n)
    np.testing.assert_allclose(np.asarray(soft).sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(soft)[np.arange(n), np.arange(n)], w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(soft)[np.arange(n), prev], 1 - w, atol=1e-5)
    assert len(np.unique(np.round(w, 4))) > 1


def test_materialize_returns_its_input_exactly(harness):
    from mixjax.augment.base import materialize

    floats = images_f32().at[0, 0, 0, 0].set(jnp.nan)  # NaN first: the copy branch runs
    for x in (images_u8(), images_f32(), floats, -images_f32()):
        got = harness(materialize)(x)
        assert got.dtype == x.dtype
        np.testing.assert_array_equal(got, x)
    grad = jax.grad(lambda x: jnp.sum(materialize(x) * 3.0))(images_f32())
    np.testing.assert_array_equal(grad, np.full((N, H, W, C), 3.0, np.float32))


def test_pair_ops_keep_one_materialized_batch_in_the_compiled_program(monkeypatch):
    """The batch a geometric + colour chain produced is computed once, not once per read.

    XLA keeps the ``lax.cond`` of ``materialize`` in the optimized program (it would inline or
    drop a conditional with a foldable predicate or two identical branches, and then fuse the
    producers into both reads of the pair ops).
    """
    labels = jnp.arange(N) % 4
    produce = augment.chain(augment.random_crop(padding=1), augment.random_brightness(0.2))
    pairs = {
        "blend": lambda x, y: augment_mix.blend_pairs(x, y, jnp.linspace(0, 1, N), num_classes=4),
        "paste": lambda x, y: augment_mix.paste_pairs(
            x, y, jnp.asarray([1, 1, 4, 3]), num_classes=4
        ),
    }

    def conditionals(pair):
        fn = lambda k, x, y: pair(*produce(k, x, y))
        return (
            jax.jit(fn).lower(KEY, images_u8(), labels).compile().as_text().count(" conditional(")
        )

    for pair in pairs.values():
        kept = conditionals(pair)
        with monkeypatch.context() as patch:
            patch.setattr(augment_mix, "materialize", lambda x: x)
            assert kept == conditionals(pair) + 1


@pytest.mark.parametrize(
    "alpha, rounds",
    [(0.2, None), (1.0, 1), (2.5, None)],
    ids=["0.2", "1-fallback-half", "2.5-beta"],
)
def test_symmetric_beta_is_beta_distributed(alpha, rounds):
    """The CDF on a grid inside (0, 1) against SciPy's (float32 piles mass at exactly 0 and 1).

    ``rounds=1`` sends about 1 - Gamma(a+1)^2 / Gamma(2a+1) of the examples to the fallback.
    """
    import scipy.stats

    n = 40_000
    draw = jax.jit(lambda k: augment_mix.symmetric_beta(k, alpha, n, rounds=rounds))
    x = np.asarray(draw(KEY))
    assert x.shape == (n,) and x.dtype == np.float32
    assert np.all((x >= 0) & (x <= 1))
    grid = np.linspace(0.02, 0.98, 25)
    empirical = (x[:, None] <= grid).mean(axis=0)
    # 1.63 / sqrt(n) is the 1 % critical value of the Kolmogorov-Smirnov statistic.
    np.testing.assert_allclose(
        empirical, scipy.stats.beta(alpha, alpha).cdf(grid), atol=1.63 / np.sqrt(n)
    )
    np.testing.assert_array_equal(draw(KEY), x)


def test_symmetric_beta_eager_equals_jit():
    draw = lambda k: augment_mix.symmetric_beta(k, 0.5, 16, rounds=1)
    np.testing.assert_array_equal(draw(KEY), jax.jit(draw)(KEY))


def test_johnk_rounds_bound_the_miss_rate():
    for alpha in (0.05, 0.2, 0.5, 1.0):
        accept = np.exp(2 * math.lgamma(alpha + 1) - math.lgamma(2 * alpha + 1))
        rounds = augment_mix.johnk_rounds(alpha)
        assert (1 - accept) ** rounds <= 1e-6 < (1 - accept) ** (rounds - 1) or rounds == 1


def test_cutmix_labels_match_pixel_fraction_exactly():
    n = 8
    x = jnp.broadcast_to(jnp.arange(n, dtype=jnp.uint8)[:, None, None, None], (n, 7, 6, 3))
    out, soft = jax.jit(augment.cutmix(1.0, num_classes=n))(KEY, x, jnp.arange(n))
    out, soft = np.asarray(out), np.asarray(soft)
    prev = np.roll(np.arange(n), 1)
    own = (out == np.arange(n)[:, None, None, None]).mean(axis=(1, 2, 3))
    partner = (out == prev[:, None, None, None]).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(own + partner, 1.0)
    np.testing.assert_allclose(soft[np.arange(n), np.arange(n)], own, atol=1e-6)
    np.testing.assert_allclose(soft[np.arange(n), prev], partner, atol=1e-6)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
    assert len(np.unique(own)) > 1


def test_pairs_with_soft_labels(harness):
    soft = jax.nn.softmax(jax.random.normal(KEY, (N, 5)))
    w = jnp.linspace(0, 1, N)
    images, blended = harness(augment.blend_pairs)(images_f32(), soft, w)
    want = np.asarray(w)[:, None] * soft + (1 - np.asarray(w)[:, None]) * np.roll(soft, 1, 0)
    np.testing.assert_allclose(blended, want, atol=1e-6)
    x = np.asarray(images_f32())
    want_x = np.asarray(w)[:, None, None, None] * x
    want_x = want_x + (1 - np.asarray(w)[:, None, None, None]) * np.roll(x, 1, 0)
    np.testing.assert_allclose(images, want_x, atol=1e-6)
    boxes = jnp.asarray([[1, 1, 3, 4]] * N)
    pasted, mixed = harness(augment.paste_pairs)(images_f32(), soft, boxes)
    want_x = x.copy()
    want_x[:, 1:3, 1:4] = np.roll(x, 1, 0)[:, 1:3, 1:4]
    np.testing.assert_array_equal(pasted, want_x)
    own = 1 - 6 / (H * W)
    np.testing.assert_allclose(mixed, own * soft + (1 - own) * np.roll(soft, 1, 0), atol=1e-6)


def test_label_smoothing_formula():
    _, y = augment.label_smoothing(0.1, num_classes=4)(KEY, images_u8(), jnp.arange(N) % 4)
    want = 0.9 * np.eye(4)[np.arange(N) % 4] + 0.1 / 4
    np.testing.assert_allclose(y, want, atol=1e-7)
    np.testing.assert_allclose(augment.smooth_labels(jnp.asarray(want), 0.0), want, atol=1e-7)


# Randomness, dtypes -----------------------------------------------------------------------

RANDOM_OPS = {
    "flip": lambda: augment.random_flip(horizontal=0.5, vertical=0.5),
    "crop": lambda: augment.random_crop(padding=2, mode="reflect"),
    "resized_crop": lambda: augment.random_resized_crop((H, W)),
    "affine": lambda: augment.random_affine(degrees=20.0, translate=0.2),
    "brightness": lambda: augment.random_brightness(0.3),
    "contrast": lambda: augment.random_contrast(0.5, 1.5),
    "saturation": lambda: augment.random_saturation(0.2, 1.8),
    "hue": lambda: augment.random_hue(0.3),
    "cutout": lambda: augment.random_cutout(2),
}


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_random_op_draws_per_example_and_keeps_dtype(name):
    op = RANDOM_OPS[name]()
    x = jnp.broadcast_to(images_u8(n=1), (N, H, W, C))  # identical examples
    out = np.asarray(op(KEY, x))
    assert out.dtype == np.uint8
    assert len({out[b].tobytes() for b in range(N)}) > 1, "every example got the same draw"
    np.testing.assert_array_equal(op(KEY, x), out)
    assert not np.array_equal(op(jax.random.key(1), x), out)
    out_f = op(KEY, x.astype(jnp.float32) / 255.0)
    assert out_f.dtype == jnp.float32
    assert_close_u8(out, to_u8(np.asarray(out_f)), atol=1)


def test_bfloat16_images_keep_their_dtype():
    x = images_u8().astype(jnp.bfloat16) / 255
    assert augment.random_brightness()(KEY, x).dtype == jnp.bfloat16
    assert augment.random_crop(padding=1)(KEY, x).dtype == jnp.bfloat16


# Chain ------------------------------------------------------------------------------------


def sequential(ops, key, images, labels):
    for op, k in zip(ops, jax.random.split(key, len(ops)), strict=True):
        if isinstance(op, augment.LabelOp):
            images, labels = op(k, images, labels)
        else:
            images = op(k, images)
    return images, labels


@pytest.mark.parametrize(
    ("ops", "make"),
    [
        (
            lambda: (
                augment.random_flip(vertical=0.5),
                augment.random_crop(padding=2),
                augment.random_brightness(0.2),
            ),
            images_f32,
        ),
        (
            lambda: (
                augment.random_crop(padding=1, mode="reflect"),
                augment.random_flip(),
                augment.random_contrast(),
                augment.random_crop((4, 3), padding=0),
                augment.label_smoothing(0.1, num_classes=3),
            ),
            images_u8,
        ),
    ],
    ids=["flip-crop-brightness-f32", "crop-flip-contrast-crop-smoothing-u8"],
)
def test_chain_under_jit_equals_ops_in_sequence(ops, make):
    ops = ops()
    x, y = make(), jnp.arange(N) % 3
    got_x, got_y = jax.jit(augment.chain(*ops))(KEY, x, y)
    want_x, want_y = sequential(ops, KEY, x, y)
    assert got_x.dtype == x.dtype
    # Exact for uint8; float contrast may differ by an ulp between jit and eager.
    np.testing.assert_allclose(got_x, want_x, atol=0 if x.dtype == jnp.uint8 else 1e-6)
    np.testing.assert_allclose(got_y, want_y, atol=1e-7)


def test_chain_fuses_rotation_with_a_crop():
    crop = augment.random_crop((6, 6), padding=0)
    rot = augment.random_affine(degrees=25.0)
    ops = (augment.random_flip(), crop, rot)
    # A channel of ones marks, after the unfused ops, the pixels whose four bilinear neighbours
    # all lie inside the crop: there fused and unfused agree. Elsewhere the fused resample sees
    # the source around the crop where the sequence sees the fill.
    x = jnp.concatenate([images_f32(h=9, w=8), jnp.ones((N, 9, 8, 1))], axis=-1)
    fused, _ = jax.jit(augment.chain(*ops))(KEY, x, None)
    unfused, _ = jax.jit(lambda k, im: sequential(ops, k, im, None))(KEY, x)
    inside = unfused[..., 3:] > 1 - 1e-6
    assert inside.mean() > 0.5
    np.testing.assert_allclose(np.where(inside, fused, 0), np.where(inside, unfused, 0), atol=1e-5)


def test_chain_compiles_once():
    traces = []

    def fn(key, images, labels):
        traces.append(1)
        return augment.chain(augment.random_flip(), augment.random_crop(padding=2))(
            key, images, labels
        )

    jitted = jax.jit(fn)
    for seed in range(3):
        jitted(jax.random.key(seed), images_u8(), jnp.arange(N))
    assert len(traces) == 1


def test_chain_passes_labels_through_and_nests():
    x, y = images_u8(), jnp.arange(N)
    inner = augment.chain(augment.random_flip())
    out_x, out_y = augment.chain(inner, augment.random_brightness())(KEY, x, y)
    assert out_x.dtype == jnp.uint8
    np.testing.assert_array_equal(out_y, y)
    assert augment.chain()(KEY, x, None)[0] is x


# Bad input --------------------------------------------------------------------------------

BAD_FACTORIES = [
    (lambda: augment.random_flip(horizontal=1.5), ValueError, r"random_flip: horizontal must"),
    (lambda: augment.random_flip(vertical=-0.1), ValueError, r"random_flip: vertical must"),
    (lambda: augment.random_flip(horizontal="a"), TypeError, r"random_flip: horizontal must be"),
    (lambda: augment.random_crop(padding=-1), ValueError, r"random_crop: padding must be an int"),
    (lambda: augment.random_crop(mode="wrap"), ValueError, r"random_crop: mode must be one of"),
    (lambda: augment.random_crop(size=0), ValueError, r"random_crop: size must be a positive"),
    (lambda: augment.random_crop(fill=2.0), ValueError, r"random_crop: fill must be in"),
    (lambda: augment.random_resized_crop(8, scale=(0.0, 1.0)), ValueError, r"scale\[0\] must"),
    (lambda: augment.random_resized_crop(8, scale=(0.9, 0.5)), ValueError, r"low <= high"),
    (lambda: augment.random_resized_crop(8, ratio=1.0), TypeError, r"ratio must be a pair"),
    (lambda: augment.random_affine(degrees=200), ValueError, r"random_affine: degrees must"),
    (lambda: augment.random_affine(translate=1.0), ValueError, r"random_affine: translate"),
    (lambda: augment.random_affine(translate=(0.1,)), ValueError, r"translate must be a float"),
    (lambda: augment.random_brightness(1.5), ValueError, r"random_brightness: max_delta"),
    (lambda: augment.random_contrast(-1.0, 1.0), ValueError, r"random_contrast: lower must"),
    (lambda: augment.random_saturation(1.5, 0.5), ValueError, r"lower must be <= upper"),
    (lambda: augment.random_hue(0.6), ValueError, r"random_hue: max_delta must be in"),
    (lambda: augment.random_cutout(0), ValueError, r"random_cutout: size must be a positive"),
    (lambda: augment.mixup(0.0), ValueError, r"mixup: alpha must be > 0.0, got alpha=0.0"),
    (lambda: augment.mixup(-1.0), ValueError, r"mixup: alpha must be > 0.0"),
    (lambda: augment.cutmix(0.0), ValueError, r"cutmix: alpha must be > 0.0"),
    (lambda: augment.cutmix(1.0, num_classes=0), ValueError, r"cutmix: num_classes must"),
    (lambda: augment.label_smoothing(1.0), ValueError, r"label_smoothing: smoothing must"),
    (lambda: augment.chain(augment.random_flip(), len), TypeError, r"chain: argument 1 must"),
]


@pytest.mark.parametrize(("make", "error", "match"), BAD_FACTORIES)
def test_bad_options_fail_in_the_factory(make, error, match):
    with pytest.raises(error, match=match):
        make()


BAD_CALLS = [
    (
        lambda: augment.random_flip()(KEY, images_u8()[0]),
        ValueError,
        r"random_flip: images must be a 4-D NHWC batch \(N, H, W, C\), got shape \(6, 5, 3\)",
    ),
    (
        lambda: augment.random_brightness()(KEY, images_u8().astype(jnp.int32)),
        TypeError,
        r"random_brightness: images must be uint8 or floating point, got dtype int32",
    ),
    (
        lambda: augment.adjust_brightness([[1.0]], 0.1),
        TypeError,
        r"adjust_brightness: images must be an array",
    ),
    (
        lambda: augment.random_hue()(KEY, images_u8(c=1)),
        ValueError,
        r"random_hue: images must have 3 channels",
    ),
    (
        lambda: augment.random_crop(size=12, padding=2)(KEY, images_u8()),
        ValueError,
        r"random_crop: crop size \(12, 12\) is larger than the padded image \(10, 9\)",
    ),
    (
        lambda: augment.crop(images_u8(), (0, 0), (7, 3)),
        ValueError,
        r"crop: crop size \(7, 3\) is larger than the padded image \(6, 5\)",
    ),
    (
        lambda: augment.adjust_contrast(images_u8(), jnp.ones(3)),
        ValueError,
        r"adjust_contrast: factor must have shape \(8,\) \(one per example\) or \(\), got",
    ),
    (
        lambda: augment.rotate(images_u8(), 0.0, mode="wrap"),
        ValueError,
        r"rotate: mode must be one of",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_CALLS)
def test_bad_images_and_parameters(call, error, match):
    with pytest.raises(error, match=match):
        call()


MIX = augment.mixup(0.2, num_classes=4)
BAD_LABELS = [
    (jnp.zeros((N, 4, 1)), ValueError, r"mixup: labels must be integer class ids \(N,\) or"),
    (jnp.zeros(N), TypeError, r"mixup: labels of shape \(8,\) must be integer class ids"),
    (jnp.zeros((N, 4), jnp.int32), TypeError, r"must be a float distribution, got int32"),
    (jnp.zeros(N + 1, jnp.int32), ValueError, r"mixup: labels must have the batch size 8"),
    (-jnp.ones(N, jnp.int32), ValueError, r"mixup: labels must be non-negative, got min=-1"),
    (jnp.full(N, 4), ValueError, r"mixup: class ids must be < num_classes=4, got max=4"),
    (jnp.full((N, 4), 0.5), ValueError, r"must sum to 1 per example, got sum=2"),
    (jnp.full((N, 3), 1 / 3), ValueError, r"mixup: labels must have num_classes=4 columns"),
]


@pytest.mark.parametrize(("labels", "error", "match"), BAD_LABELS)
def test_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        MIX(KEY, images_f32(), labels)


def test_integer_labels_need_num_classes():
    with pytest.raises(ValueError, match=r"cutmix: integer labels \(8,\) need num_classes="):
        augment.cutmix()(KEY, images_u8(), jnp.arange(N))


def test_chain_checks_labels():
    with pytest.raises(ValueError, match=r"chain: labels are needed by mixjax.augment.mixup"):
        augment.chain(MIX)(KEY, images_u8(), None)
    with pytest.raises(TypeError, match=r"chain: labels of shape \(8,\) must be integer"):
        augment.chain(augment.random_flip())(KEY, images_u8(), jnp.zeros(N))
