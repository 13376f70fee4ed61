"""Per-example coordinate maps (warps), their composition, and the one resample that applies them.

Every geometric op (flip, crop, resized crop, rotation/translation) is a map from output pixel
coordinates ``(row, col)`` to input coordinates, one affine map per example:

    input (row, col) = matrices[n] @ (out_row, out_col, 1),   matrices: (N, 2, 3) float32

Pixel ``(r, c)`` has its centre at coordinate ``(r, c)``. Composing ops composes their maps,
so a run of geometric ops costs one resample of the source image: :func:`compose` and
:func:`resample` are what :func:`~mixjax.augment_chain.chain` uses to fuse them.

Two resampling paths:

* **exact** (flips, crops and integer shifts: axis-aligned maps with scale ``+-1`` and integer
  offsets): a pure copy of pixels, done as one gather of contiguous row segments from the
  source padded by the maps' static ``reach``;
* **bilinear** (everything else), computed in float32 and cast back to the input dtype
  (``uint8``: rounded half to even and clipped to 0..255).

Samples that land outside the input frame are filled by ``mode``: ``"constant"`` (the value
``fill``, in ``[0, 1]`` units), ``"edge"`` (nearest edge pixel) or ``"reflect"`` (mirrored about
the edge pixel, NumPy's ``np.pad(mode="reflect")``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mixjax.augment.base import Array, check_images, expand, fill_value

__all__ = [
    "GeometricOp",
    "Warp",
    "compatible",
    "compose",
    "diagonal_matrices",
    "resample",
]


class Warp(NamedTuple):
    """One coordinate map per example, and how to sample it.

    Attributes:
      matrices: ``(N, 2, 3)`` float32; input ``(row, col) = matrices[n] @ (row, col, 1)`` of the
        output pixel.
      size: static ``(height, width)`` of the output.
      exact: static; every map is axis-aligned with scale ``+-1`` and integer offsets, so the
        resample is a copy of pixels.
      reach: static; for exact maps, how many pixels outside the input frame a sample may land
        (the padding the copy needs). Unused by bilinear maps.
      mirrors: static; whether an exact map may reverse the column order.
      mode: static; how out-of-frame samples are filled: ``"constant"``, ``"edge"``,
        ``"reflect"``, or ``None`` for maps that never leave the frame (flips).
      fill: static; the constant fill in ``[0, 1]`` units (``mode="constant"``).
    """

    matrices: Array
    size: tuple[int, int]
    exact: bool
    reach: int = 0
    mirrors: bool = False
    mode: str | None = None
    fill: float = 0.0


@dataclasses.dataclass(frozen=True)
class GeometricOp:
    """A random geometric op: ``op(key, images) -> images``, fusable by ``chain``.

    Attributes:
      name: the public factory's name, for messages.
      sample: ``(key, batch_size, (height, width)) -> Warp``, the per-example maps for a batch
        whose frame is ``(height, width)``; raises ``ValueError`` for frames the op cannot take.
    """

    name: str
    sample: Callable[[Array, int, tuple[int, int]], Warp]

    def __call__(self, key: Array, images: Array) -> Array:
        check_images(self.name, images)
        n, h, w, _ = images.shape
        return resample(images, self.sample(key, n, (h, w)))


def compatible(first: Warp, second: Warp) -> bool:
    """Whether ``second`` can be fused after ``first``: their fills do not disagree."""
    if first.mode is None or second.mode is None:
        return True
    return (first.mode, first.fill) == (second.mode, second.fill)


def compose(first: Warp, second: Warp) -> Warp:
    """The warp of applying ``first``, then ``second`` (on ``first``'s output frame).

    The composed map samples the source once, so content ``first`` moved out of its frame is
    still there for ``second``: identical to applying them in turn when at most one of them
    reaches outside its frame and at most one interpolates.
    """
    a1, b1 = first.matrices[:, :, :2], first.matrices[:, :, 2:]
    a2, b2 = second.matrices[:, :, :2], second.matrices[:, :, 2:]
    matrices = jnp.concatenate([a1 @ a2, a1 @ b2 + b1], axis=2)
    mode, fill = (first.mode, first.fill) if first.mode is not None else (second.mode, second.fill)
    return Warp(
        matrices=matrices,
        size=second.size,
        exact=first.exact and second.exact,
        reach=first.reach + second.reach,
        mirrors=first.mirrors or second.mirrors,
        mode=mode,
        fill=fill,
    )


def diagonal_matrices(scale: Array, offset: Array) -> Array:
    """``(N, 2, 3)`` axis-aligned maps ``in = scale * out + offset`` from ``(N, 2)`` arrays."""
    zeros = jnp.zeros_like(scale[:, 0])
    rows = jnp.stack([scale[:, 0], zeros, offset[:, 0]], axis=1)
    cols = jnp.stack([zeros, scale[:, 1], offset[:, 1]], axis=1)
    return jnp.stack([rows, cols], axis=1).astype(jnp.float32)


def resample(images: Array, warp: Warp) -> Array:
    """Samples ``images`` ``(N, H, W, C)`` at ``warp``'s maps: ``(N, *warp.size, C)``, same dtype.

    Dispatches to the exact copy or the bilinear path (see the module docstring).
    """
    if warp.exact:
        return _copy(images, warp)
    return _bilinear(images, warp)


def _reflect(index: Array, size: int) -> Array:
    if size == 1:
        return jnp.zeros_like(index)
    period = 2 * (size - 1)
    index = jnp.remainder(index, period)
    return jnp.where(index >= size, period - index, index)


def _fold(index: Array, size: int, mode: str | None) -> tuple[Array, Array | None]:
    """In-frame indices for ``mode``, and (``"constant"`` only) which samples were in frame."""
    if mode == "reflect":
        return _reflect(index, size), None
    inside = (index >= 0) & (index < size)
    index = jnp.clip(index, 0, size - 1)
    return index, (inside if mode == "constant" else None)


def _pad(images: Array, widths: tuple, mode: str, fill: float) -> Array:
    if mode == "constant":
        return jnp.pad(images, widths, constant_values=fill_value(fill, images.dtype))
    return jnp.pad(images, widths, mode=mode)


def _copy(images: Array, warp: Warp) -> Array:
    n, h, w, c = images.shape
    out_h, out_w = warp.size
    m = jnp.round(warp.matrices).astype(jnp.int32)
    row_sign, row_offset = m[:, 0, 0], m[:, 0, 2]
    col_sign, col_offset = m[:, 1, 1], m[:, 1, 2]
    reach = warp.reach if warp.mode is not None else 0

    # Rows are gathered one by one, so any row map (reflect, vertical flip) is an index map;
    # constant fill points out-of-frame rows at one extra fill row below the image.
    rows = row_sign[:, None] * jnp.arange(out_h) + row_offset[:, None]
    rows, inside = _fold(rows, h, warp.mode)
    extra_row = int(inside is not None and reach > 0)
    if extra_row:
        rows = jnp.where(inside, rows, h)

    # Columns are one contiguous segment of the source (mirrored where the map reverses
    # columns) padded by `reach` on both sides; the pad is symmetric, so the order of mirroring
    # and padding does not change the result, only what XLA fuses. Measured on XLA:CPU
    # (benchmarks/augment.py): for uint8 a padded batch written once and mirrored inside the
    # gather is faster; for wider dtypes, mirroring first lets the pad fuse into the gather.
    def mirror(a):
        return jnp.where(expand(col_sign < 0), a[:, :, ::-1], a) if warp.mirrors else a

    def pad(a):
        widths = ((0, 0), (0, extra_row), (reach, reach), (0, 0))
        return _pad(a, widths, warp.mode, warp.fill) if reach else a

    src = mirror(pad(images)) if images.dtype.itemsize == 1 else pad(mirror(images))
    start = jnp.where(col_sign > 0, col_offset + reach, w + reach - 1 - col_offset)

    starts = jnp.stack(
        [
            jnp.broadcast_to(jnp.arange(n)[:, None], (n, out_h)),
            rows,
            jnp.broadcast_to(start[:, None], (n, out_h)),
        ],
        axis=-1,
    )
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(2, 3), collapsed_slice_dims=(0, 1), start_index_map=(0, 1, 2)
    )
    return jax.lax.gather(src, starts, dims, (1, 1, out_w, c), mode="clip")


def _fold_coordinate(v: Array, size: int, mode: str | None) -> Array:
    """Coordinates where ``mode`` finds the sample, in the frame padded by one pixel."""
    if mode == "constant":
        # One pixel of fill around the frame: anything beyond it samples the fill.
        return jnp.clip(v, -1.0, size) + 1.0
    if mode == "reflect" and size > 1:
        # Reflecting the coordinate equals bilinear sampling of the reflect-padded image.
        period = 2.0 * (size - 1)
        v = jnp.remainder(v, period)
        return jnp.where(v > size - 1, period - v, v) + 1.0
    return jnp.clip(v, 0.0, size - 1.0) + 1.0


def _bilinear(images: Array, warp: Warp) -> Array:
    n, h, w, c = images.shape
    out_h, out_w = warp.size
    m = warp.matrices
    i = jnp.arange(out_h, dtype=jnp.float32)[None, :, None]
    j = jnp.arange(out_w, dtype=jnp.float32)[None, None, :]
    y = m[:, 0, 0, None, None] * i + m[:, 0, 1, None, None] * j + m[:, 0, 2, None, None]
    x = m[:, 1, 0, None, None] * i + m[:, 1, 1, None, None] * j + m[:, 1, 2, None, None]
    y, x = _fold_coordinate(y, h, warp.mode), _fold_coordinate(x, w, warp.mode)

    mode = "constant" if warp.mode == "constant" else "edge"
    src = _pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode, warp.fill)
    # One gather of each sample's 2x2 neighbourhood; the clip keeps it inside the padded frame
    # (a weight of 1 on its far corner covers samples on the last row or column).
    y0 = jnp.clip(jnp.floor(y), 0, h)
    x0 = jnp.clip(jnp.floor(x), 0, w)
    wy, wx = (y - y0)[..., None, None], (x - x0)[..., None]
    starts = jnp.stack(
        [
            jnp.broadcast_to(jnp.arange(n)[:, None, None], y.shape),
            y0.astype(jnp.int32),
            x0.astype(jnp.int32),
        ],
        axis=-1,
    )
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(3, 4, 5), collapsed_slice_dims=(0,), start_index_map=(0, 1, 2)
    )
    patches = jax.lax.gather(src, starts, dims, (1, 2, 2, c), mode="clip").astype(jnp.float32)
    rows = patches[..., 0, :, :] * (1.0 - wy) + patches[..., 1, :, :] * wy
    total = rows[..., 0, :] * (1.0 - wx) + rows[..., 1, :] * wx
    if images.dtype == jnp.uint8:
        return jnp.clip(jnp.round(total), 0, 255).astype(jnp.uint8)
    return total.astype(images.dtype)
