"""Character-level text data: `text:FILE` splits, the vocabulary, encode/decode, LM windows."""

import doctest
import json
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from mixjax import data
from mixjax.data import text as text_module

SHAKESPEARE = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
)


def ceil_div(a, b):
    return -(-a // b)


def write(tmp_path, content, name="corpus.txt"):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return f"text:{path}"


def test_docstring_examples_run():
    result = doctest.testmod(text_module, raise_on_error=False)
    assert result.attempted >= 2 and result.failed == 0


def test_splits_are_the_first_90_and_the_last_10_percent(tmp_path):
    content = "".join(chr(ord("a") + i % 26) for i in range(1234))
    source = write(tmp_path, content)
    train, val = data.load_text(source, "train"), data.load_text(source, "val")
    boundary = 9 * 1234 // 10  # 1110, as nanoGPT's int(n * 0.9)
    assert boundary == int(1234 * 0.9)
    assert (len(train.tokens), len(val.tokens)) == (boundary, 1234 - boundary)
    assert data.decode(train.tokens, train.vocab) == content[:boundary]
    assert data.decode(val.tokens, val.vocab) == content[boundary:]
    assert train.tokens.dtype == val.tokens.dtype == np.int32
    assert (train.name, train.split, val.split) == (source, "train", "val")
    np.testing.assert_array_equal(data.load_text(source).tokens, train.tokens)  # the default


def test_vocab_is_the_sorted_characters_of_the_whole_file_and_json_storable(tmp_path):
    content = "zebra\n" * 9 + "ÉQ€😀\r\n"  # the last 10 % holds characters train lacks
    source = write(tmp_path, content)
    train, val = data.load_text(source, "train"), data.load_text(source, "val")
    assert train.vocab == val.vocab == "".join(sorted(set(content)))
    assert train.vocab == "\n\rQaberzÉ€😀"  # code-point order; \r\n is kept as two characters
    assert json.loads(json.dumps(train.vocab)) == train.vocab
    expected = [train.vocab.index(c) for c in content[len(train.tokens) :]]
    np.testing.assert_array_equal(val.tokens, expected)


def test_encode_decode_round_trip():
    vocab = "\n !,.?abcdefghijklmnopqrstuvwxyzé😀"
    message = "hello, world!\nare you there? oui, é 😀"
    ids = data.encode(message, vocab)
    assert ids.dtype == np.int32 and ids.shape == (len(message),)
    np.testing.assert_array_equal(ids, [vocab.index(c) for c in message])
    assert data.decode(ids, vocab) == message
    assert data.decode(jnp.asarray(ids), vocab) == message
    assert data.decode(ids.tolist(), vocab) == message
    assert data.decode([], vocab) == "" and data.encode("", vocab).shape == (0,)


def test_encode_and_decode_refuse_what_is_outside_the_vocabulary():
    with pytest.raises(
        ValueError, match=r"2 character\(s\) outside the vocabulary of 3, the first text\[1\]='x'"
    ):
        data.encode("axbx", "abc")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 3\).*got tokens\[2\]=3"):
        data.decode([0, 2, 3], "abc")
    with pytest.raises(ValueError, match=r"got tokens\[0\]=-1"):
        data.decode(np.array([-1]), "abc")
    with pytest.raises(TypeError, match="tokens must be integer token ids, got dtype float32"):
        data.decode(np.zeros(2, np.float32), "abc")
    with pytest.raises(ValueError, match=r"tokens must be 1-D \(N,\), got shape \(1, 2\)"):
        data.decode([[0, 1]], "abc")
    with pytest.raises(TypeError, match="mixjax.data.encode: text must be a str, got bytes"):
        data.encode(b"ab", "abc")
    with pytest.raises(ValueError, match=r"sorted order.*got vocab\[1\]='c' before vocab\[2\]='b'"):
        data.encode("a", "acb")
    with pytest.raises(ValueError, match=r"got vocab\[0\]='a' before vocab\[1\]='a'"):
        data.decode([0], "aab")
    with pytest.raises(ValueError, match="vocab must hold 1 to MAX_VOCAB=65536 characters, got 0"):
        data.decode([0], "")
    with pytest.raises(TypeError, match="vocab must be a str of characters, got list"):
        data.encode("a", ["a"])


@pytest.fixture
def corpus(tmp_path):
    # random letters: a window of 16 almost surely occurs once, so it can be found again
    content = "".join(np.random.default_rng(0).choice(list("abcdefghijklmnopqrstuvwxyz"), 1000))
    return data.load_text(write(tmp_path, content), "train")


def test_lm_batches_label_is_tokens_shifted_by_one(corpus):
    batches = data.lm_batches(corpus, 8, 16, seed=3)
    for batch in [next(batches) for _ in range(5)]:
        assert set(batch) == {"tokens", "label"}
        assert batch["tokens"].shape == batch["label"].shape == (8, 16)
        assert batch["tokens"].dtype == batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"][:, :-1], batch["tokens"][:, 1:])
        # each row is a contiguous window of the split: find it, check the label's last token
        for row, label in zip(batch["tokens"], batch["label"], strict=True):
            starts = [
                s
                for s in range(len(corpus.tokens) - 16)
                if (corpus.tokens[s : s + 16] == row).all()
            ]
            assert len(starts) == 1 and corpus.tokens[starts[0] + 16] == label[-1]


def test_lm_batches_follow_their_seed(corpus):
    tokens, n, span = corpus.tokens, len(corpus.tokens), np.arange(9)
    first = [next(data.lm_batches(corpus, 4, 8, seed=s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(first[0]["tokens"], first[1]["tokens"])
    assert not np.array_equal(first[0]["tokens"], first[2]["tokens"])
    stream = data.lm_batches(corpus, 4, 8, seed=5)
    for i in range(3):  # batch i is a function of (seed, i): NumPy's reference, by hand
        starts = np.random.default_rng([5, i]).integers(0, n - 8, 4)
        window = tokens[starts[:, None] + span]
        batch = next(stream)
        np.testing.assert_array_equal(batch["tokens"], window[:, :-1])
        np.testing.assert_array_equal(batch["label"], window[:, 1:])


def test_lm_batches_epochs_count_and_infinite_default(corpus):
    n = len(corpus.tokens)  # 900 tokens, 899 targets
    assert len(list(data.lm_batches(corpus, 4, 10, epochs=2))) == 2 * (899 // 40)
    assert len(list(data.lm_batches(corpus, 64, 64, epochs=1))) == 1  # at least one batch per epoch
    stream = data.lm_batches(corpus, 4, 10)
    assert len([next(stream) for _ in range(500)]) == 500 > 899 // 40
    assert n == 900


def test_windows_never_cross_into_the_other_split(tmp_path):
    # train uses only lower-case letters, val only digits: any straddling window would mix them
    content = "".join(chr(ord("a") + i % 26) for i in range(900)) + "0123456789" * 10
    source = write(tmp_path, content)
    train, val = data.load_text(source, "train"), data.load_text(source, "val")
    digits = {train.vocab.index(d) for d in "0123456789"}
    assert len(train.tokens) == 900 and not digits & set(train.tokens.tolist())
    for batch in data.lm_batches(train, 32, 50, seed=0, epochs=20):
        assert not digits & (set(np.unique(batch["tokens"])) | set(np.unique(batch["label"])))
    for batch in data.lm_batches(val, 32, 50, seed=0, epochs=20):
        assert set(np.unique(batch["tokens"])) | set(np.unique(batch["label"])) <= digits
    for batch in data.lm_eval_batches(val, 3, 7):
        assert set(np.unique(batch["tokens"])) | set(np.unique(batch["label"])) <= digits


def test_windows_reach_both_ends_of_the_split(tmp_path):
    source = write(tmp_path, "abcdefghij" * 9 + "0123456789")
    val = data.load_text(source, "val")  # 10 tokens, context 4: starts 0..5
    seen = set()
    for batch in data.lm_batches(val, 16, 4, seed=0, epochs=20):
        seen |= set(batch["tokens"][:, 0].tolist())
    assert seen == set(val.tokens[:6].tolist())


def test_stacked_lm_batches_are_consecutive_batches(corpus):
    flat = list(data.lm_batches(corpus, 4, 8, seed=2, epochs=3))
    stacked = list(data.stacked_lm_batches(corpus, 4, 8, 5, seed=2, epochs=3))
    assert len(flat) == 3 * (899 // 32) == 84 and len(stacked) == 84 // 5
    for g, group in enumerate(stacked):
        assert group["tokens"].shape == group["label"].shape == (5, 4, 8)
        assert group["tokens"].dtype == np.int32
        for k in range(5):
            np.testing.assert_array_equal(group["tokens"][k], flat[5 * g + k]["tokens"])
            np.testing.assert_array_equal(group["label"][k], flat[5 * g + k]["label"])
    infinite = data.stacked_lm_batches(corpus, 4, 8, 5, seed=2)
    np.testing.assert_array_equal(next(infinite)["tokens"], stacked[0]["tokens"])
    with pytest.raises(ValueError, match=r"steps=100 exceeds the 28 batches of batch_size=4"):
        data.stacked_lm_batches(corpus, 4, 8, 100, epochs=1)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got steps=0"):
        data.stacked_lm_batches(corpus, 4, 8, 0)


@pytest.mark.parametrize(("n", "batch_size", "context"), [(101, 4, 10), (97, 4, 10), (11, 1, 10)])
def test_eval_pass_counts_every_target_of_the_split_once(tmp_path, n, batch_size, context):
    rng = np.random.default_rng(0)
    content = "".join(rng.choice(list("abcdefgh"), size=10 * n))
    val = data.load_text(write(tmp_path, content), "val")
    assert len(val.tokens) == n
    counted = np.zeros(n, np.int64)  # by token position of the target
    batches = list(data.lm_eval_batches(val, batch_size, context))
    assert len(batches) == ceil_div(ceil_div(n - 1, context), batch_size)
    for batch in batches:
        assert set(batch) == {"tokens", "label", "weight"}
        assert batch["tokens"].shape == batch["weight"].shape == (batch_size, context)
        assert batch["weight"].dtype == np.float32
        assert set(np.unique(batch["weight"])) <= {0.0, 1.0}
        np.testing.assert_array_equal(batch["label"][:, :-1], batch["tokens"][:, 1:])
        for row, label, weight in zip(
            batch["tokens"], batch["label"], batch["weight"], strict=True
        ):
            if not weight.any():
                continue
            (start,) = [s for s in range(n - context) if (val.tokens[s : s + context] == row).all()]
            np.testing.assert_array_equal(label, val.tokens[start + 1 : start + context + 1])
            counted[start + 1 : start + context + 1] += weight.astype(np.int64)
    np.testing.assert_array_equal(counted, [0] + [1] * (n - 1))


def test_eval_batches_are_deterministic(corpus):
    first, second = (
        list(data.lm_eval_batches(corpus, 5, 12)),
        list(data.lm_eval_batches(corpus, 5, 12)),
    )
    assert len(first) == len(second) == ceil_div(ceil_div(899, 12), 5)
    for a, b in zip(first, second, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # non-overlapping windows in file order
    np.testing.assert_array_equal(first[0]["tokens"][1], corpus.tokens[12:24])
    assert sum(float(b["weight"].sum()) for b in first) == 899


def test_load_text_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(
        FileNotFoundError, match=rf"load_text: text file '{re.escape(str(missing))}' does not exist"
    ):
        data.load_text(f"text:{missing}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_text(f"text:{tmp_path}")  # a directory
    empty = write(tmp_path, b"", "empty.txt")
    with pytest.raises(ValueError, match=rf"'{re.escape(empty)}': the file is empty"):
        data.load_text(empty)
    # a 2-byte character first: the offset counts bytes (5), not characters (4)
    latin = write(tmp_path, "écaf".encode() + "é au lait".encode("latin-1"), "latin.txt")
    with pytest.raises(ValueError, match=r"latin.txt' is not UTF-8: byte offset 5 \(b'\\xe9'\)"):
        data.load_text(latin)
    tiny = write(tmp_path, "a", "tiny.txt")  # 9 * 1 // 10 = 0 training characters
    assert len(data.load_text(tiny, "val").tokens) == 1
    with pytest.raises(
        ValueError, match=r"tiny.txt': the file holds 1 character\(s\), too few for a 'train'"
    ):
        data.load_text(tiny, "train")


def test_load_text_refuses_a_vocabulary_above_max_vocab(tmp_path):
    content = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 20_000))
    content += "".join(chr(c) for c in range(0x20000, 0x20000 + data.MAX_VOCAB - 20_000 + 1))
    source = write(tmp_path, content, "wide.txt")
    with pytest.raises(
        ValueError,
        match=r"wide.txt': the file holds 65537 distinct characters, more than MAX_VOCAB=65536",
    ):
        data.load_text(source, "val")
    exactly = write(tmp_path, content[:-1], "exact.txt")
    assert len(data.load_text(exactly, "val").vocab) == data.MAX_VOCAB


def test_load_text_refuses_bad_sources_and_splits(tmp_path):
    source = write(tmp_path, "abcdefghij" * 3)
    with pytest.raises(ValueError, match=r"source must be 'text:FILE', got source='npz:x'"):
        data.load_text("npz:x")
    with pytest.raises(ValueError, match=r"source must be 'text:FILE', got source='text:'"):
        data.load_text("text:")
    with pytest.raises(TypeError, match="source must be a str 'text:FILE', got 3"):
        data.load_text(3)
    with pytest.raises(
        ValueError, match=r"split must be one of \('train', 'val'\), got split='test'"
    ):
        data.load_text(source, "test")
    with pytest.raises(TypeError, match="split must be a str"):
        data.load_text(source, None)


def test_batching_refuses_a_split_too_short_for_one_window(tmp_path):
    source = write(tmp_path, "abcdefghij" * 9 + "0123456789", "short.txt")
    val = data.load_text(source, "val")  # 10 tokens
    assert next(data.lm_batches(val, 2, 9))["tokens"].shape == (2, 9)  # 9 + 1 fits
    for fn in (data.lm_batches, data.lm_eval_batches):
        with pytest.raises(
            ValueError,
            match=r"the 'val' split of 'text:.*short.txt' holds 10 tokens, too few for one "
            r"window of context \+ 1 = 11",
        ):
            fn(val, 2, 10)
    with pytest.raises(ValueError, match=r"holds 10 tokens, too few"):
        data.stacked_lm_batches(val, 2, 10, 1)


@pytest.mark.parametrize("fn", ["lm_batches", "stacked_lm_batches", "lm_eval_batches"])
def test_batching_refuses_bad_arguments(corpus, fn):
    make = getattr(data, fn)
    extra = (1,) if fn == "stacked_lm_batches" else ()
    name = f"mixjax.data.{fn}"
    with pytest.raises(
        ValueError, match=rf"{name}: batch_size must be an integer >= 1, got batch_size=0"
    ):
        make(corpus, 0, 8, *extra)
    with pytest.raises(
        ValueError, match=rf"{name}: context must be an integer >= 1, got context=-1"
    ):
        make(corpus, 2, -1, *extra)
    with pytest.raises(
        TypeError, match=rf"{name}: context must be an integer >= 1, got context=8.0"
    ):
        make(corpus, 2, 8.0, *extra)
    with pytest.raises(
        TypeError, match=rf"{name}: batch_size must be an integer >= 1, got batch_size=True"
    ):
        make(corpus, True, 8, *extra)
    with pytest.raises(
        TypeError, match=rf"{name}: dataset must be a TextDataset \(from load_text\), got Dataset"
    ):
        make(
            data.Dataset(np.zeros((1, 1, 1, 1), np.uint8), np.zeros(1, np.int32), 1, "x"),
            2,
            8,
            *extra,
        )
    if fn != "lm_eval_batches":
        with pytest.raises(ValueError, match=rf"{name}: seed must be an integer >= 0, got seed=-1"):
            make(corpus, 2, 8, *extra, seed=-1)
        with pytest.raises(
            ValueError, match=rf"{name}: epochs must be None or an integer >= 1, got epochs=0"
        ):
            make(corpus, 2, 8, *extra, epochs=0)


@pytest.mark.slow
def test_tiny_shakespeare_has_65_characters_and_a_90_10_split():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not there")
    source = f"text:{SHAKESPEARE}"
    train, val = data.load_text(source, "train"), data.load_text(source, "val")
    assert len(train.vocab) == 65 and train.vocab == val.vocab
    n = len(train.tokens) + len(val.tokens)
    assert (n, len(train.tokens), len(val.tokens)) == (1_115_394, 1_003_854, 111_540)
    assert data.decode(train.tokens[:14], train.vocab) == "First Citizen:"
