"""A tiny Vision Transformer (Dosovitskiy et al. 2021) and its pre-LN block, in linen and NNX.

The image is cut into ``patch_size x patch_size`` patches by a ``Conv`` with
``kernel = stride = patch_size`` (VALID padding), which is the same linear map as reshaping the
patches and applying a ``Dense``, written as Flax users write it (and as a conv kernel
``(p, p, C, dim)``, which compression transforms treat as any other conv). Learned position
embeddings ``(1, num_patches, dim)`` are added, then ``depth`` pre-LN transformer blocks
(:class:`TransformerBlock`), a final ``LayerNorm``, a mean over the patch tokens and a ``Dense``
head. Mean pooling rather than a class token: one token fewer, no extra parameter that is
neither a kernel nor a table, and as accurate for small ViTs (Beyer et al. 2022, "Better plain
ViT baselines").

The "tiny" defaults, sized for a 2-core CPU, are ``dim=128, depth=4, heads=4, mlp_dim=256``;
DeiT-Ti is ``ViTTiny(patch_size=16, dim=192, depth=12, heads=3, mlp_dim=768)``. Layer names,
the same in both APIs (so a ``where=`` selects the same leaves in a linen ``params`` dict and in
``nnx.state(model, nnx.Param)``, and linen weights load into an NNX model with
``nnx.update``)::

    patch_embed, pos_embedding,
    block{i}/ ln1, attn/{query,key,value,out}, ln2, mlp_in, mlp_out,
    final_ln, head

The attention projections are ``DenseGeneral`` (linen) / ``LinearGeneral`` (NNX) kernels:
query, key and value ``(dim, heads, dim // heads)``, out ``(heads, dim // heads, dim)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mixjax import _checks
from mixjax.models.spec import check_positive

__all__ = ["NNXTransformerBlock", "NNXViTTiny", "TransformerBlock", "ViTTiny"]

Initializer = Callable[..., jax.Array]
_DEFAULT_INIT = nn.initializers.lecun_normal()
_POS_INIT = nn.initializers.normal(0.02)


def _check_transformer(
    owner: str, *, dim: Any, depth: Any, heads: Any, mlp_dim: Any, dropout: Any, depth_name: str
) -> None:
    """The checks every transformer here shares; ``owner`` (the model) names the messages."""
    for name, value in ((depth_name, depth), ("heads", heads), ("dim", dim), ("mlp_dim", mlp_dim)):
        check_positive(owner, name, value)
    if dim % heads:
        raise ValueError(
            f"mixjax.models.{owner}: dim must be divisible by heads, got dim={dim}, heads={heads}"
        )
    _checks.real(f"mixjax.models.{owner}", "dropout", dropout, 0.0, 1.0, high_open=True)


def _dropout_rngs(rngs: nnx.Rngs, dropout: float) -> nnx.Rngs:
    """Initializer randomness and, where ``dropout > 0``, a stream tagged ``"dropout"``.

    The dropout streams are seeded from ``rngs.dropout`` (which falls back to the default
    stream) but always tagged ``"dropout"``, so ``nnx.reseed(model, dropout=key)`` (what
    :func:`mixjax.train.nnx_apply` does each training step) reseeds them even for a model built
    with ``nnx.Rngs(0)``.
    """
    if dropout == 0:
        return rngs
    return nnx.Rngs(params=rngs.params(), dropout=rngs.dropout())


# ----------------------------------------------------------------------------- linen


class TransformerBlock(nn.Module):
    """A linen pre-LN transformer block on ``(N, L, dim)`` tokens, returned the same shape::

        x = x + dropout(attn(ln1(x)))                       # causal mask where causal=True
        x = x + dropout(mlp_out(gelu(mlp_in(ln2(x)))))

    ``attn`` is ``nn.MultiHeadDotProductAttention`` (its attention weights dropped out at
    ``dropout`` too); ``mlp_in`` is ``Dense(mlp_dim)``, ``mlp_out`` ``Dense(dim)``. In
    training (``train=True``) dropout draws from the ``"dropout"`` RNG collection.

    Attributes:
        heads: attention heads (``dim`` must divide by it).
        mlp_dim: hidden width of the MLP.
        dropout: dropout rate, in ``[0, 1)``.
        causal: mask attention to earlier positions (a decoder block).
        kernel_init: initializer of the query/key/value and ``mlp_in`` kernels.
        out_init: initializer of the kernels that write to the residual stream (attention
            out, ``mlp_out``).
    """

    heads: int
    mlp_dim: int
    dropout: float = 0.0
    causal: bool = False
    kernel_init: Initializer = _DEFAULT_INIT
    out_init: Initializer = _DEFAULT_INIT

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        mask = nn.make_causal_mask(x[..., 0]) if self.causal else None
        y = nn.LayerNorm(name="ln1")(x)
        y = nn.MultiHeadDotProductAttention(
            self.heads,
            dropout_rate=self.dropout,
            deterministic=not train,
            kernel_init=self.kernel_init,
            out_kernel_init=self.out_init,
            name="attn",
        )(y, mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=self.kernel_init, name="mlp_in")(y))
        y = nn.Dense(dim, kernel_init=self.out_init, name="mlp_out")(y)
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


def _tokens_shape(owner: str, shape: Sequence[int], patch_size: int) -> int:
    """The number of patches of ``(H, W, C)`` images, or the error naming both sides."""
    height, width, _ = shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"mixjax.models.{owner}: image sides must be divisible by patch_size, got image "
            f"(H, W, C)={tuple(shape)} and patch_size={patch_size}"
        )
    return (height // patch_size) * (width // patch_size)


class ViTTiny(nn.Module):
    """A tiny ViT in linen (see the module docstring for the layers and the defaults).

    Input ``(N, H, W, C)`` float32 images with ``H`` and ``W`` divisible by ``patch_size``
    (8x8 digits with patch 2 or 4, 28x28 with patch 4 or 7); output ``(N, num_classes)``
    float32 logits. The position embedding's shape comes from the images at ``init``, so apply
    the model to images of the size it was initialized on. ``__call__(x, *, train=False)``:
    with ``train=True`` and ``dropout > 0``, dropout draws from the ``"dropout"`` RNG
    collection (:func:`mixjax.train.linen_apply` with ``train_kwarg="train"``).

    Attributes:
        num_classes: output logits.
        patch_size: side of the square patches.
        dim: token width.
        depth: transformer blocks.
        heads: attention heads (``dim`` must divide by it).
        mlp_dim: hidden width of each block's MLP.
        dropout: rate of the attention, residual and embedding dropout, in ``[0, 1)``.

    Raises:
        TypeError / ValueError: at construction, a size that is not an integer ``>= 1``,
            ``dim`` not divisible by ``heads``, ``dropout`` outside ``[0, 1)``; at ``init``,
            input that is not ``(N, H, W, C)`` or an image side not divisible by
            ``patch_size``.
    """

    num_classes: int = 10
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0

    def __post_init__(self):
        check_positive("ViTTiny", "num_classes", self.num_classes)
        check_positive("ViTTiny", "patch_size", self.patch_size)
        _check_transformer(
            "ViTTiny",
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            depth_name="depth",
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"mixjax.models.ViTTiny: expected images (N, H, W, C), got shape {jnp.shape(x)}"
            )
        tokens = _tokens_shape("ViTTiny", x.shape[1:], self.patch_size)
        p = self.patch_size
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        x = x.reshape((x.shape[0], tokens, self.dim))
        x = x + self.param("pos_embedding", _POS_INIT, (1, tokens, self.dim))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.depth):
            block = TransformerBlock(self.heads, self.mlp_dim, self.dropout, name=f"block{i}")
            x = block(x, train=train)
        x = nn.LayerNorm(name="final_ln")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


# ----------------------------------------------------------------------------- NNX


class NNXTransformerBlock(nnx.Module):
    """The NNX :class:`TransformerBlock` on ``(N, L, dim)`` tokens, layers named the same.

    ``attn`` is ``nnx.MultiHeadAttention``. Dropout follows the module's mode (``.train()``,
    NNX's default for a new module, or ``.eval()``) and draws from the ``"dropout"`` streams.

    Args:
        dim: token width.
        heads: attention heads (``dim`` must divide by it).
        mlp_dim: hidden width of the MLP.
        dropout: dropout rate, in ``[0, 1)``.
        causal: mask attention to earlier positions (a decoder block).
        kernel_init: initializer of the query/key/value and ``mlp_in`` kernels.
        out_init: initializer of the attention out and ``mlp_out`` kernels.
        rngs: initializer (and, where ``dropout > 0``, dropout) randomness.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        dropout: float = 0.0,
        causal: bool = False,
        kernel_init: Initializer = _DEFAULT_INIT,
        out_init: Initializer = _DEFAULT_INIT,
        rngs: nnx.Rngs,
    ):
        self.causal = causal
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            heads,
            dim,
            dropout_rate=dropout,
            deterministic=False,
            decode=False,
            kernel_init=kernel_init,
            out_kernel_init=out_init,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, mlp_dim, kernel_init=kernel_init, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, kernel_init=out_init, rngs=rngs)
        drop_rngs = rngs if dropout > 0 else None
        self.attn_drop = nnx.Dropout(dropout, rngs=drop_rngs)
        self.mlp_drop = nnx.Dropout(dropout, rngs=drop_rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        mask = nnx.make_causal_mask(x[..., 0]) if self.causal else None
        x = x + self.attn_drop(self.attn(self.ln1(x), mask=mask))
        y = self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))
        return x + self.mlp_drop(y)


class NNXViTTiny(nnx.Module):
    """A tiny ViT in NNX for images of ``image_shape``, layers named as in :class:`ViTTiny`.

    Calling it maps ``(N, *image_shape)`` float32 images to ``(N, num_classes)`` float32 logits.
    Dropout follows the module's mode (``.train()``, NNX's default for a new model, or
    ``.eval()``). Its dropout streams are seeded from ``rngs.dropout`` (the default stream
    where ``rngs`` has none) and tagged ``"dropout"``, so ``nnx.reseed(model, dropout=key)``, what
    :func:`mixjax.train.nnx_apply` does each training step, reseeds them.

    Args:
        image_shape: ``(H, W, C)`` of the input images; ``H`` and ``W`` divisible by
            ``patch_size``.
        num_classes: output logits.
        patch_size: side of the square patches.
        dim: token width.
        depth: transformer blocks.
        heads: attention heads (``dim`` must divide by it).
        mlp_dim: hidden width of each block's MLP.
        dropout: rate of the attention, residual and embedding dropout, in ``[0, 1)``.
        rngs: initializer (and dropout) randomness (``nnx.Rngs(0)``).

    Raises:
        TypeError / ValueError: ``image_shape`` not three integers ``>= 1``, an image side not
            divisible by ``patch_size``, a size that is not an integer ``>= 1``, ``dim`` not
            divisible by ``heads``, ``dropout`` outside ``[0, 1)``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int = 10,
        *,
        patch_size: int = 4,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_dim: int = 256,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        owner = "NNXViTTiny"
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(
                f"mixjax.models.{owner}: image_shape must be (H, W, C), got {image_shape}"
            )
        for side in image_shape:
            check_positive(owner, "image_shape entries", side)
        check_positive(owner, "num_classes", num_classes)
        check_positive(owner, "patch_size", patch_size)
        _check_transformer(
            owner,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dropout=dropout,
            depth_name="depth",
        )
        tokens = _tokens_shape(owner, image_shape, patch_size)
        rngs = _dropout_rngs(rngs, dropout)
        self.image_shape = image_shape
        self.patch_size = patch_size
        self.depth = depth
        p = patch_size
        self.patch_embed = nnx.Conv(
            image_shape[-1], dim, (p, p), strides=(p, p), padding="VALID", rngs=rngs
        )
        self.pos_embedding = nnx.Param(_POS_INIT(rngs.params(), (1, tokens, dim)))
        self.embed_drop = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        for i in range(depth):
            block = NNXTransformerBlock(dim, heads, mlp_dim, dropout=dropout, rngs=rngs)
            setattr(self, f"block{i}", block)
        self.final_ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if tuple(jnp.shape(x)[1:]) != self.image_shape or jnp.ndim(x) != 4:
            raise ValueError(
                f"mixjax.models.NNXViTTiny: expected images (N, *{self.image_shape}), got "
                f"shape {jnp.shape(x)}"
            )
        x = self.patch_embed(x)
        x = x.reshape((x.shape[0], -1, x.shape[-1])) + self.pos_embedding[...]
        x = self.embed_drop(x)
        for i in range(self.depth):
            x = getattr(self, f"block{i}")(x)
        return self.head(jnp.mean(self.final_ln(x), axis=1))
