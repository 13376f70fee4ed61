"""mixjax.calibrate: the statistics of every layer's inputs, checked against inputs computed by
hand (the layer's true input, reshaped to the matrix view's rows) and, for convolutions, against
the energy of the convolution's own output."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixjax import calibrate
from mixjax import layout as layout_lib
from mixjax.layout import Layout


def rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape)


def capture(fn, params, batches, paths):
    layouts = layout_lib.learn(fn, params, *calibrate.as_args(batches[0]))
    return calibrate.capture(fn, params, batches, layouts=layouts, paths=paths)


def close(a, b, tol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


class Attention(nn.Module):
    """DenseGeneral projections as linen's attention writes them."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 3), name="q")(x)  # (B, L, heads, head_dim)
        k = nn.DenseGeneral((2, 3), name="k")(x)
        return nn.DenseGeneral(5, axis=(-2, -1), name="o")(jax.nn.tanh(q * k))


def test_dense_general_inputs_in_the_leafs_row_order():
    model, x = Attention(), rand(0, (3, 4, 6))
    params = model.init(jax.random.key(1), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    batches = [x, x[:2] * 2.0]
    stats = capture(fn, params, batches, ["q/kernel", "k/kernel", "o/kernel"])

    def hidden(x):
        q = jnp.einsum("bld,dnh->blnh", x, params["q"]["kernel"]) + params["q"]["bias"]
        k = jnp.einsum("bld,dnh->blnh", x, params["k"]["kernel"]) + params["k"]["bias"]
        return jax.nn.tanh(q * k).reshape(-1, 6)  # rows (heads, head_dim), the leaf's order

    xs = np.concatenate([np.asarray(b).reshape(-1, 6) for b in batches])
    hs = np.concatenate([np.asarray(hidden(b)) for b in batches])
    close(stats["q/kernel"].gram, xs.T @ xs)
    close(stats["k/kernel"].gram, xs.T @ xs)
    close(stats["o/kernel"].gram, hs.T @ hs)
    close(stats["o/kernel"].abs_sum, np.abs(hs).sum(0))
    close(stats["o/kernel"].absmax, np.abs(hs).max(0))
    assert float(stats["o/kernel"].count) == 3 * 4 + 2 * 4


def test_streaming_equals_one_batch_of_everything():
    model, x = Attention(), rand(0, (4, 3, 6))
    params = model.init(jax.random.key(1), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    parts = capture(fn, params, [x[:1], x[1:3], x[3:]], ["o/kernel"])["o/kernel"]
    whole = capture(fn, params, [x], ["o/kernel"])["o/kernel"]
    for a, b in zip(parts, whole, strict=True):
        close(a, b)


def test_a_transposed_and_a_reshaped_kernel_map_back_to_their_rows():
    """The matmul operand is the leaf transposed (w.T) or reshaped: the rows come from the
    leaf's own axes, not from the operand's."""
    w_t, w_r = rand(1, (5, 4)), rand(2, (2, 3, 5))  # (out, in) and (in1, in2, out)

    def fn(p, x, y):
        return x @ p["t"].T + y.reshape(y.shape[0], 6) @ p["r"].reshape(6, 5)

    x, y = rand(3, (7, 4)), rand(4, (7, 2, 3))
    params = {"t": w_t, "r": w_r}
    stats = capture(fn, params, [(x, y)], ["t", "r"])
    close(stats["t"].gram, x.T @ x)
    ys = y.reshape(7, 6)
    close(stats["r"].gram, ys.T @ ys)


def test_a_kernel_used_twice_sums_both_uses():
    w = rand(1, (4, 4))
    fn = lambda p, x: jax.nn.relu(x @ p["w"]) @ p["w"]  # noqa: E731
    x = rand(2, (5, 4))
    h = jax.nn.relu(x @ w)
    stats = capture(fn, {"w": w}, [x], ["w"])["w"]
    close(stats.gram, x.T @ x + h.T @ h)
    assert float(stats.count) == 10


@pytest.mark.parametrize(
    "numbers,kernel_shape,strides,padding,dilation",
    [
        (("NHWC", "HWIO", "NHWC"), (3, 3, 2, 4), (1, 1), "SAME", (1, 1)),
        (("NCHW", "OIHW", "NCHW"), (4, 2, 3, 2), (2, 1), [(1, 0), (2, 1)], (2, 1)),
    ],
)
def test_conv_patches_reproduce_the_convolutions_output(
    numbers, kernel_shape, strides, padding, dilation
):
    """For any kernel W', sum(conv(x, W')^2) = tr(M^T G M), M the matrix view of W': the
    captured Gram matrix is that of the im2col patches, in the view's row order."""
    x = rand(0, (2, 7, 7, 2) if numbers[0] == "NHWC" else (2, 2, 7, 7))

    def conv(w, x):
        return jax.lax.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=numbers
        )

    fn = lambda p, x: conv(p["w"], x)  # noqa: E731
    params = {"w": rand(1, kernel_shape)}
    layouts = layout_lib.learn(fn, params, x)
    stats = calibrate.capture(fn, params, [x], layouts=layouts, paths=["w"])["w"]
    view = calibrate.matrix_layout("t", "w", params["w"], layouts["w"])
    for seed in range(3):
        other = rand(10 + seed, kernel_shape)
        m = layout_lib.to_matrix(other, view)
        energy = jnp.sum(conv(other, x) ** 2)
        close(jnp.sum(m * (stats.gram @ m)), energy, tol=1e-3)
    out = conv(params["w"], x)
    assert float(stats.count) == out.size // kernel_shape[numbers[1].index("O")]


class GQA(nnx.Module):
    """nnx.Einsum projections, grouped-query attention, NNX modules that take rngs."""

    def __init__(self, rngs):
        self.q = nnx.Einsum("BTD,NDH->BTNH", (4, 6, 2), rngs=rngs)
        self.kv = nnx.Einsum("BSD,CKDH->CBSKH", (2, 2, 6, 2), rngs=rngs)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (4, 2, 6), rngs=rngs)

    def __call__(self, x):
        q = self.q(x)
        k, v = (jnp.repeat(t, 2, axis=2) for t in self.kv(x))
        w = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k))
        return self.o(jnp.einsum("BNTS,BSNH->BTNH", w, v))


def test_nnx_einsum_rows_follow_the_equation():
    graphdef, state = nnx.split(GQA(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    x = rand(1, (2, 3, 6))
    stats = capture(fn, state, [x], ["q/kernel", "kv/kernel", "o/kernel"])
    xs = x.reshape(-1, 6)
    close(stats["q/kernel"].gram, xs.T @ xs)
    close(stats["kv/kernel"].gram, xs.T @ xs)
    model = nnx.merge(graphdef, state)
    q = model.q(x)
    k, v = (jnp.repeat(t, 2, axis=2) for t in model.kv(x))
    w = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k))
    h = jnp.einsum("BNTS,BSNH->BTNH", w, v).reshape(-1, 8)  # rows (N, H): the kernel's order
    close(stats["o/kernel"].gram, h.T @ h)


def test_sites_in_evaluation_order():
    model, x = Attention(), rand(0, (1, 2, 6))
    params = model.init(jax.random.key(1), x)["params"]
    found, hidden = calibrate.sites(lambda p, x: model.apply({"params": p}, x), params, [x])
    assert [s.name for s in found] == ["q/kernel", "k/kernel", "o/kernel"]
    assert hidden == {}


def test_errors_name_the_leaf():
    model, x = Attention(), rand(0, (1, 2, 6))
    params = model.init(jax.random.key(1), x)["params"]
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    layouts = layout_lib.learn(fn, params, x)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate.capture(fn, params, [], layouts=layouts, paths=["q/kernel"])
    with pytest.raises(ValueError, match=r"'q/bias' \(2, 3\).*no matmul or convolution consumes"):
        calibrate.capture(fn, params, [x], layouts=layouts, paths=["q/bias"])
    with pytest.raises(ValueError, match="the model rejects its input"):
        calibrate.capture(fn, params, [rand(0, (1, 2, 5))], layouts=layouts, paths=["q/kernel"])

    def scanned(p, x):  # the kernel reaches its matmul inside a scan only
        return jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, None, length=2)[0]

    w = {"w": rand(1, (6, 6))}
    with pytest.raises(ValueError, match=r"no calibration input reaches leaf 'w' \(6, 6\).*scan"):
        calibrate.capture(
            scanned, w, [x[0]], layouts={"w": Layout("dense", (0,), (1,))}, paths=["w"]
        )

    def depthwise(p, x):
        return jax.lax.conv_general_dilated(
            x,
            p["w"],
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
        )

    dw, img = {"w": rand(1, (3, 3, 1, 2))}, rand(2, (1, 5, 5, 2))
    with pytest.raises(ValueError, match=r"'w' \(3, 3, 1, 2\) float32: site 'w' is a grouped"):
        capture(depthwise, dw, [img], ["w"])
