"""A tiny decoder-only causal language model in nanoGPT's shape, in Flax linen and NNX.

Token ``Embed`` plus a learned position ``Embed``, ``layers`` pre-LN causal transformer blocks
(:class:`~mixjax.models.vit.TransformerBlock`: multi-head self-attention under a causal mask,
an MLP ``dim -> 4 * dim -> dim`` with GELU), a final ``LayerNorm`` and the logits. With
``tie_embeddings=True`` (the default, as GPT-2 and nanoGPT) the logits are the token
embedding's ``attend``, ``h @ embedding.T``, so there is no separate output kernel; with
``False`` they come from a bias-free ``Dense`` ``head``. Linear kernels and both embeddings
start from ``normal(0.02)``, the two kernels per block that write to the residual stream
(attention out, ``mlp_out``) from ``normal(0.02 / sqrt(2 * layers))``, as in nanoGPT.

The defaults, ``layers=4, heads=4, dim=128, context=64``, are nanoGPT's tiny-shakespeare
"baby GPT" proportions at 128 wide (its CPU run); with its 65-character vocabulary that is
809,856 parameters tied, 818,176 untied. Layer names, the same in both APIs (so a ``where=``
selects the same leaves in a linen ``params`` dict and in ``nnx.state(model, nnx.Param)``, and
linen weights load into an NNX model with ``nnx.update``)::

    token_embed/embedding (vocab_size, dim), pos_embed/embedding (context, dim),
    block{i}/ ln1, attn/{query,key,value,out}, ln2, mlp_in, mlp_out,
    final_ln, head/kernel (dim, vocab_size; untied only)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mixjax import _checks
from mixjax.models.spec import check_positive
from mixjax.models.vit import (
    NNXTransformerBlock,
    TransformerBlock,
    _check_transformer,
    _dropout_rngs,
)

__all__ = ["GPTTiny", "NNXGPTTiny"]

_STD = 0.02


def _check(owner: str, vocab_size: Any, context: Any, tie_embeddings: Any, **sizes: Any) -> None:
    check_positive(owner, "vocab_size", vocab_size)
    check_positive(owner, "context", context)
    _checks.boolean(f"mixjax.models.{owner}", "tie_embeddings", tie_embeddings)
    _check_transformer(owner, depth_name="layers", mlp_dim=4 * sizes["dim"], **sizes)


def _check_tokens(owner: str, tokens: jax.Array, context: int) -> None:
    shape, dtype = jnp.shape(tokens), jnp.result_type(tokens)
    if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"mixjax.models.{owner}: expected integer tokens (B, L), got {dtype} {shape}"
        )
    if shape[1] > context:
        raise ValueError(
            f"mixjax.models.{owner}: sequence length {shape[1]} exceeds context={context} "
            f"(tokens {shape})"
        )


def _inits(layers: int):
    """nanoGPT's initializers: ``(kernels and embeddings, residual-stream projections)``."""
    return nn.initializers.normal(_STD), nn.initializers.normal(_STD / math.sqrt(2 * layers))


# ----------------------------------------------------------------------------- linen


class GPTTiny(nn.Module):
    """A tiny causal LM in linen (see the module docstring for the layers and the defaults).

    Input ``(B, L)`` integer token ids in ``[0, vocab_size)`` with ``L <= context``; output
    ``(B, L, vocab_size)`` float32 next-token logits, position ``t`` seeing tokens ``0..t``
    only. ``__call__(tokens, *, train=False)``: with ``train=True`` and ``dropout > 0``, dropout
    draws from the ``"dropout"`` RNG collection (:func:`mixjax.train.linen_apply` with
    ``train_kwarg="train"``).

    Attributes:
        vocab_size: the number of token ids (65 for tiny-shakespeare's characters).
        context: the longest sequence, the rows of the position embedding.
        layers: transformer blocks.
        heads: attention heads (``dim`` must divide by it).
        dim: token width; the MLPs are ``4 * dim`` wide.
        dropout: rate of the embedding, attention and residual dropout, in ``[0, 1)``.
        tie_embeddings: logits from the token embedding (``True``) or from a ``Dense`` head.

    Raises:
        TypeError / ValueError: at construction, a size that is not an integer ``>= 1``,
            ``dim`` not divisible by ``heads``, ``dropout`` outside ``[0, 1)``, a non-bool
            ``tie_embeddings``; at the call, tokens that are not ``(B, L)`` integers or longer
            than ``context``.
    """

    vocab_size: int
    context: int = 64
    layers: int = 4
    heads: int = 4
    dim: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self):
        _check(
            "GPTTiny",
            self.vocab_size,
            self.context,
            self.tie_embeddings,
            dim=self.dim,
            depth=self.layers,
            heads=self.heads,
            dropout=self.dropout,
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        _check_tokens("GPTTiny", tokens, self.context)
        init, out_init = _inits(self.layers)
        token_embed = nn.Embed(self.vocab_size, self.dim, embedding_init=init, name="token_embed")
        pos_embed = nn.Embed(self.context, self.dim, embedding_init=init, name="pos_embed")
        x = token_embed(tokens) + pos_embed(jnp.arange(tokens.shape[1]))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.layers):
            block = TransformerBlock(
                self.heads,
                4 * self.dim,
                self.dropout,
                causal=True,
                kernel_init=init,
                out_init=out_init,
                name=f"block{i}",
            )
            x = block(x, train=train)
        x = nn.LayerNorm(name="final_ln")(x)
        if self.tie_embeddings:
            return token_embed.attend(x)
        return nn.Dense(self.vocab_size, use_bias=False, kernel_init=init, name="head")(x)


# ----------------------------------------------------------------------------- NNX


class NNXGPTTiny(nnx.Module):
    """A tiny causal LM in NNX, layers named as in :class:`GPTTiny`.

    Calling it maps ``(B, L)`` integer token ids (``L <= context``) to ``(B, L, vocab_size)``
    float32 next-token logits. Dropout (``nnx.Dropout`` and the attention's, where
    ``dropout > 0``) follows the module's mode (``.train()``, NNX's default for a new model, or
    ``.eval()``); its streams are seeded from ``rngs.dropout`` (the default stream where
    ``rngs`` has none) and tagged ``"dropout"``, so ``nnx.reseed(model, dropout=key)``, what
    :func:`mixjax.train.nnx_apply` does each training step, reseeds them.

    Args:
        vocab_size: the number of token ids.
        context: the longest sequence.
        layers: transformer blocks.
        heads: attention heads (``dim`` must divide by it).
        dim: token width; the MLPs are ``4 * dim`` wide.
        dropout: rate of the embedding, attention and residual dropout, in ``[0, 1)``.
        tie_embeddings: logits from the token embedding (``True``) or from a ``Linear`` head.
        rngs: initializer (and dropout) randomness (``nnx.Rngs(0)``).

    Raises:
        TypeError / ValueError: as :class:`GPTTiny` (at construction; tokens at the call).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        context: int = 64,
        layers: int = 4,
        heads: int = 4,
        dim: int = 128,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        rngs: nnx.Rngs,
    ):
        _check(
            "NNXGPTTiny",
            vocab_size,
            context,
            tie_embeddings,
            dim=dim,
            depth=layers,
            heads=heads,
            dropout=dropout,
        )
        rngs = _dropout_rngs(rngs, dropout)
        init, out_init = _inits(layers)
        self.context = context
        self.layers = layers
        self.token_embed = nnx.Embed(vocab_size, dim, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Embed(context, dim, embedding_init=init, rngs=rngs)
        self.embed_drop = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        for i in range(layers):
            block = NNXTransformerBlock(
                dim,
                heads,
                4 * dim,
                dropout=dropout,
                causal=True,
                kernel_init=init,
                out_init=out_init,
                rngs=rngs,
            )
            setattr(self, f"block{i}", block)
        self.final_ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = (
            None
            if tie_embeddings
            else nnx.Linear(dim, vocab_size, use_bias=False, kernel_init=init, rngs=rngs)
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        _check_tokens("NNXGPTTiny", tokens, self.context)
        x = self.token_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))
        x = self.embed_drop(x)
        for i in range(self.layers):
            x = getattr(self, f"block{i}")(x)
        x = self.final_ln(x)
        return self.token_embed.attend(x) if self.head is None else self.head(x)
