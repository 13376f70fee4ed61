"""Character-level text for language models: :func:`load_text` one split of a ``text:FILE``.

A text source is ``"text:FILE"``: a UTF-8 file, read whole into host memory (meant for corpora
of the tiny-shakespeare size, about 1 MB). Its characters are its tokens:

* the **vocabulary** is the sorted distinct characters of the *whole* file (code-point order), so
  both splits share it; it is a plain ``str``, stored with an artifact as a JSON string, and
  :func:`encode` / :func:`decode` map text to ``int32`` token ids (the index of each character in
  the vocabulary) and back, refusing characters or ids outside it. At most ``MAX_VOCAB``
  (65,536) distinct characters: a larger count is a binary or wrongly chosen file, not a
  character-level corpus (tiny-shakespeare has 65);
* the **splits** are ``"train"``, the first 90 % of the characters (``tokens[: 9 * n // 10]``,
  as nanoGPT's ``shakespeare_char`` does), and ``"val"``, the last 10 % (the rest);
* the bytes are decoded as they are: no newline translation (``\\r\\n`` is two characters),
  a byte-order mark is a character.

Batches are windows of ``context`` tokens with the next-token labels (the same window shifted by
one): :func:`lm_batches` at random starts for training, :func:`stacked_lm_batches` for
``steps_per_call``, and :func:`lm_eval_batches`, one deterministic pass over a split in which
every target counts exactly once (``"weight"``, the key the train and eval steps read).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from mixjax import _checks

__all__ = [
    "MAX_VOCAB",
    "TEXT_SPLITS",
    "TextDataset",
    "decode",
    "encode",
    "lm_batches",
    "lm_eval_batches",
    "load_text",
    "stacked_lm_batches",
]

TEXT_SPLITS = ("train", "val")
# The most distinct characters a text file may hold (token ids are int32; this bounds a model's
# embedding table and catches binary files decoded by chance).
MAX_VOCAB = 65_536

_LOAD = "mixjax.data.load_text"
_CODEC = "utf-32-le"  # one little-endian uint32 code point per character


class TextDataset(NamedTuple):
    """One split of a character-level text corpus, in host memory.

    Attributes:
        tokens: ``(N,)`` int32 token ids in ``0..len(vocab)-1``, in file order.
        vocab: the sorted distinct characters of the whole file (both splits share it);
            token id ``i`` is the character ``vocab[i]``.
        name: the ``source`` string given to :func:`load_text` (``"text:FILE"``).
        split: ``"train"`` or ``"val"``.
    """

    tokens: np.ndarray
    vocab: str
    name: str
    split: str


def load_text(source: str, split: str = "train") -> TextDataset:
    """Loads one split of a ``"text:FILE"`` corpus (see the module docstring).

    Example::

        train = mixjax.data.load_text("text:input.txt", "train")
        val = mixjax.data.load_text("text:input.txt", "val")   # same vocab
        model = mixjax.models.GPTTiny(vocab_size=len(train.vocab))

    Args:
        source: ``"text:FILE"``; ``~`` in ``FILE`` is expanded.
        split: ``"train"`` (the first 90 % of the characters) or ``"val"`` (the last 10 %).

    Returns:
        A :class:`TextDataset`: int32 tokens ``(N,)`` of the split and the file's vocabulary.

    Raises:
        TypeError: ``source`` or ``split`` not a string.
        ValueError: ``source`` not ``"text:FILE"``; an unknown split; an empty file; bytes that
            are not UTF-8 (the message gives the byte offset); more than ``MAX_VOCAB`` distinct
            characters; a file too short to give the split a character.
        FileNotFoundError: no file at ``FILE``.
    """
    if not isinstance(source, str):
        raise TypeError(f"{_LOAD}: source must be a str 'text:FILE', got {source!r}")
    if not isinstance(split, str):
        raise TypeError(f"{_LOAD}: split must be a str, got split={split!r}")
    scheme, colon, location = source.partition(":")
    if scheme != "text" or not colon or not location:
        raise ValueError(f"{_LOAD}: source must be 'text:FILE', got source={source!r}")
    _checks.choice(_LOAD, "split", split, TEXT_SPLITS)
    codes = _read_code_points(os.path.expanduser(location))
    where = f"{_LOAD}: {source!r}"
    if codes.size == 0:
        raise ValueError(f"{where}: the file is empty")
    alphabet, tokens = np.unique(codes, return_inverse=True)
    if alphabet.size > MAX_VOCAB:
        raise ValueError(
            f"{where}: the file holds {alphabet.size} distinct characters, more than "
            f"MAX_VOCAB={MAX_VOCAB}; a character-level corpus has far fewer"
        )
    n = codes.size
    boundary = 9 * n // 10
    part = slice(0, boundary) if split == "train" else slice(boundary, n)
    tokens = tokens.reshape(-1)[part].astype(np.int32)
    if tokens.size == 0:
        raise ValueError(
            f"{where}: the file holds {n} character(s), too few for a {split!r} split "
            f"(the first 90 % is 'train', the last 10 % 'val')"
        )
    vocab = alphabet.astype("<u4").tobytes().decode(_CODEC)
    return TextDataset(tokens, vocab, source, split)


def _read_code_points(path: str) -> np.ndarray:
    """The file's characters as uint32 code points; the error messages name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_LOAD}: text file {path!r} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{_LOAD}: text file {path!r} is not UTF-8: byte offset {err.start} "
            f"({data[err.start : err.start + 1]!r}): {err.reason}"
        ) from None
    return np.frombuffer(text.encode(_CODEC), dtype="<u4")


def _vocab_codes(fn: str, vocab: Any) -> np.ndarray:
    """``vocab``'s code points, checked to be a non-empty str of sorted distinct characters."""
    if not isinstance(vocab, str):
        raise TypeError(f"{fn}: vocab must be a str of characters, got {type(vocab).__name__}")
    codes = np.frombuffer(vocab.encode(_CODEC, "surrogatepass"), dtype="<u4")
    if not 1 <= codes.size <= MAX_VOCAB:
        raise ValueError(
            f"{fn}: vocab must hold 1 to MAX_VOCAB={MAX_VOCAB} characters, got {codes.size}"
        )
    unordered = np.flatnonzero(np.diff(codes.astype(np.int64)) <= 0)
    if unordered.size:
        i = int(unordered[0])
        raise ValueError(
            f"{fn}: vocab must be distinct characters in sorted order (as load_text builds it), "
            f"got vocab[{i}]={vocab[i]!r} before vocab[{i + 1}]={vocab[i + 1]!r}"
        )
    return codes


def encode(text: str, vocab: str) -> np.ndarray:
    """The token ids of ``text``: the index of each character in ``vocab``.

    >>> encode("abba", "ab")
    array([0, 1, 1, 0], dtype=int32)

    Args:
        text: the characters to encode.
        vocab: a :class:`TextDataset`'s ``vocab`` (sorted distinct characters).

    Returns:
        ``(len(text),)`` int32 token ids.

    Raises:
        TypeError: ``text`` or ``vocab`` not a str.
        ValueError: a malformed ``vocab``; a character of ``text`` not in ``vocab`` (the count,
            the first one and its index).
    """
    fn = "mixjax.data.encode"
    known = _vocab_codes(fn, vocab)
    if not isinstance(text, str):
        raise TypeError(f"{fn}: text must be a str, got {type(text).__name__}")
    codes = np.frombuffer(text.encode(_CODEC, "surrogatepass"), dtype="<u4")
    ids = np.minimum(np.searchsorted(known, codes), known.size - 1)
    unknown = known[ids] != codes
    if unknown.any():
        i = int(np.argmax(unknown))
        raise ValueError(
            f"{fn}: text holds {int(unknown.sum())} character(s) outside the vocabulary of "
            f"{known.size}, the first text[{i}]={text[i]!r}"
        )
    return ids.astype(np.int32)


def decode(tokens: Any, vocab: str) -> str:
    """The text of ``tokens``: the character ``vocab[i]`` for each id ``i``.

    >>> decode([0, 1, 1, 0], "ab")
    'abba'

    Args:
        tokens: ``(N,)`` integer token ids (a list, NumPy or JAX array).
        vocab: a :class:`TextDataset`'s ``vocab``.

    Returns:
        A str of ``N`` characters.

    Raises:
        TypeError: ``tokens`` not integers; ``vocab`` not a str.
        ValueError: a malformed ``vocab``; ``tokens`` not 1-D; an id outside
            ``[0, len(vocab))`` (the first index and value).
    """
    fn = "mixjax.data.decode"
    known = _vocab_codes(fn, vocab)
    ids = np.asarray(tokens)
    if ids.size == 0:
        ids = ids.astype(np.int32)
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{fn}: tokens must be integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 1:
        raise ValueError(f"{fn}: tokens must be 1-D (N,), got shape {ids.shape}")
    bad = (ids < 0) | (ids >= known.size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{fn}: token ids must be in [0, {known.size}) (the vocabulary's size), got "
            f"tokens[{i}]={ids[i]}"
        )
    return known[ids].tobytes().decode(_CODEC, "surrogatepass")


def _check_windows(fn: str, dataset: Any, batch_size: Any, context: Any) -> None:
    fn = f"mixjax.data.{fn}"
    _checks.instance(fn, "dataset", dataset, TextDataset, "a TextDataset (from load_text)")
    _checks.integer(fn, "batch_size", batch_size, 1)
    _checks.integer(fn, "context", context, 1)
    n = len(dataset.tokens)
    if n < context + 1:
        raise ValueError(
            f"{fn}: the {dataset.split!r} split of {dataset.name!r} holds {n} tokens, too few "
            f"for one window of context + 1 = {context + 1}; context must be at most {n - 1} "
            "for this file, or the file longer"
        )


def _per_epoch(n: int, batch_size: int, context: int) -> int:
    return max(1, (n - 1) // (batch_size * context))


def lm_batches(
    dataset: TextDataset,
    batch_size: int,
    context: int,
    *,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Random windows of ``dataset`` with their next-token labels, for training.

    Batch ``i`` takes ``batch_size`` window starts from
    ``np.random.default_rng([seed, i]).integers(0, N - context, batch_size)``: the same batches
    for the same ``seed`` on every run, each a function of ``(seed, i)`` only. A window starting
    at ``s`` is ``tokens[s : s + context]`` and its label ``tokens[s + 1 : s + context + 1]``,
    so every window lies inside the split. An epoch is ``max(1, (N - 1) // (batch_size *
    context))`` batches: about as many targets as the split holds. Arguments are checked when
    ``lm_batches`` is called.

    Args:
        dataset: from :func:`load_text`.
        batch_size: windows per batch, >= 1.
        context: tokens per window, >= 1; the split must hold ``context + 1``.
        seed: int >= 0 for the window starts.
        epochs: number of epochs, >= 1; ``None`` (the default) repeats forever.

    Yields:
        ``{"tokens": (B, L) int32, "label": (B, L) int32}`` NumPy arrays, ``label[:, :-1] ==
        tokens[:, 1:]``.

    Raises:
        ValueError: ``batch_size``, ``context``, ``seed`` or ``epochs`` out of range; a split
            shorter than ``context + 1`` tokens (the message names the file and the split).
        TypeError: ``dataset`` is not a :class:`TextDataset`; a non-integer argument.
    """
    _check_windows("lm_batches", dataset, batch_size, context)
    _checks.integer("mixjax.data.lm_batches", "seed", seed, 0)
    _checks.integer("mixjax.data.lm_batches", "epochs", epochs, 1, optional=True)
    return _window_stream(dataset, batch_size, context, seed, epochs)


def _window_stream(dataset, batch_size, context, seed, epochs):
    tokens = dataset.tokens
    n = len(tokens)
    span = np.arange(context + 1)
    total = None if epochs is None else epochs * _per_epoch(n, batch_size, context)
    for i in itertools.count() if total is None else range(total):
        starts = np.random.default_rng([seed, i]).integers(0, n - context, batch_size)
        windows = tokens[starts[:, None] + span]
        yield {"tokens": windows[:, :-1], "label": windows[:, 1:]}


def stacked_lm_batches(
    dataset: TextDataset,
    batch_size: int,
    context: int,
    steps: int,
    *,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``steps`` consecutive batches of :func:`lm_batches` stacked on a new leading axis.

    For running ``steps`` training steps per dispatch (``steps_per_call``): group ``g`` holds
    batches ``g * steps`` to ``g * steps + steps - 1`` of ``lm_batches(dataset, batch_size,
    context, seed=seed, epochs=epochs)``; a last incomplete group is dropped.

    Yields:
        ``{"tokens": (steps, B, L) int32, "label": (steps, B, L) int32}`` NumPy arrays.

    Raises:
        ValueError: as :func:`lm_batches`; ``steps < 1``; fewer than ``steps`` batches in all
            epochs.
        TypeError: as :func:`lm_batches`.
    """
    fn = "mixjax.data.stacked_lm_batches"
    _check_windows("stacked_lm_batches", dataset, batch_size, context)
    _checks.integer(fn, "seed", seed, 0)
    _checks.integer(fn, "epochs", epochs, 1, optional=True)
    _checks.integer(fn, "steps", steps, 1)
    if epochs is not None:
        total = epochs * _per_epoch(len(dataset.tokens), batch_size, context)
        if total < steps:
            raise ValueError(
                f"{fn}: steps={steps} exceeds the {total} batches of batch_size={batch_size} "
                f"and context={context} in {epochs} epoch(s) of the {dataset.split!r} split "
                f"of {dataset.name!r}"
            )
    return _stack(_window_stream(dataset, batch_size, context, seed, epochs), steps)


def _stack(stream, steps):
    while len(group := list(itertools.islice(stream, steps))) == steps:
        yield {key: np.stack([batch[key] for batch in group]) for key in group[0]}


def lm_eval_batches(
    dataset: TextDataset, batch_size: int, context: int
) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over ``dataset`` in which every target counts exactly once.

    The split's ``N - 1`` targets (every token but the first) are cut into consecutive,
    non-overlapping windows of ``context``: window ``j`` has tokens ``tokens[j*L : j*L + L]``
    and labels ``tokens[j*L + 1 : j*L + L + 1]``. When ``L`` does not divide ``N - 1``, the last
    window is moved back to end at the split's end (full context, no padding token) and its
    targets already counted get weight 0. Windows are grouped ``batch_size`` at a time; the last
    batch is filled with windows of weight 0, so every batch has the same shape and a jitted
    eval step compiles once. The mean loss over the split is ``sum(loss * weights) /
    sum(weights)``, and ``sum(weights)`` over the pass is ``N - 1``.

    Args:
        dataset: from :func:`load_text` (usually the ``"val"`` split).
        batch_size: windows per batch, >= 1.
        context: tokens per window, >= 1; the split must hold ``context + 1``.

    Yields:
        ``{"tokens": (B, L) int32, "label": (B, L) int32, "weight": (B, L) float32}`` NumPy
        arrays; weights are 1 on targets counted here, 0 on the others.

    Raises:
        ValueError: ``batch_size`` or ``context`` < 1; a split shorter than ``context + 1``.
        TypeError: ``dataset`` is not a :class:`TextDataset`; a non-integer argument.
    """
    _check_windows("lm_eval_batches", dataset, batch_size, context)
    return _eval_stream(dataset.tokens, batch_size, context)


def _eval_stream(tokens, batch_size, context):
    targets = len(tokens) - 1
    count = -(-targets // context)  # windows, the last one possibly partial
    # Window j counts the targets at token positions j*L + 1 .. j*L + L (the last one: up to
    # the end); a label at column k of a window starting at s is the token at s + k + 1.
    own = np.arange(count) * context
    starts = own.copy()
    starts[-1] = min(starts[-1], targets - context)  # end-aligned, full context
    span = np.arange(context + 1)
    for b in range(0, count, batch_size):
        index = np.arange(b, b + batch_size)
        real = index < count
        index = np.where(real, index, 0)
        windows = tokens[starts[index][:, None] + span]
        weights = (starts[index][:, None] + span[:-1] >= own[index][:, None]) & real[:, None]
        yield {
            "tokens": windows[:, :-1],
            "label": windows[:, 1:],
            "weight": weights.astype(np.float32),
        }
