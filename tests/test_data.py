"""Tests for mixjax.data and mixjax.digits: sources, splits, file parsing, normalize, batching."""

import gzip
import itertools
import os
import re
import struct
import subprocess
import sys
import time
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mixjax import data
from mixjax.data import digits

# ---------------------------------------------------------------------------------------------
# The embedded digits, through our TFDS builder.


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def digit_splits(digits_dir):
    return {split: data.load("digits", split, data_dir=digits_dir) for split in data.SPLITS}


def _rows(images, labels):
    """Examples as sortable byte strings, so two datasets can be compared as multisets."""
    return sorted(img.tobytes() + bytes([lab]) for img, lab in zip(images, labels, strict=True))


def test_digits_shapes_dtypes_and_sizes(digit_splits):
    train, test = digit_splits["train"], digit_splits["test"]
    assert (len(train.labels), len(test.labels)) == (1438, 359)
    for ds in (train, test):
        assert ds.images.shape[1:] == (8, 8, 1) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32 and ds.labels.shape == (len(ds.images),)
        assert ds.num_classes == 10 and ds.name == "digits"
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert ds.images.max() == 255


def test_digits_split_is_a_stratified_partition_of_sklearn(digit_splits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
    train, test = digit_splits["train"], digit_splits["test"]
    both = np.concatenate([train.images, test.images]), np.concatenate([train.labels, test.labels])
    assert _rows(*both) == _rows(images, raw.target)
    counts = np.bincount(raw.target)
    np.testing.assert_array_equal(np.bincount(test.labels), np.round(0.2 * counts))


def test_digits_same_on_reload_and_on_a_fresh_preparation(digit_splits, digits_dir, tmp_path):
    again = data.load("digits", "test", data_dir=digits_dir)
    fresh = data.load("digits", "test", data_dir=str(tmp_path))
    for ds in (again, fresh):
        np.testing.assert_array_equal(ds.images, digit_splits["test"].images)
        np.testing.assert_array_equal(ds.labels, digit_splits["test"].labels)


def test_digits_split_indices_partition():
    labels = np.repeat(np.arange(3), [10, 5, 7])
    split = digits.split_indices(labels)
    np.testing.assert_array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(22))
    np.testing.assert_array_equal(np.bincount(labels[split["test"]]), [2, 1, 1])
    np.testing.assert_array_equal(digits.split_indices(labels)["test"], split["test"])


def test_digits_tfds_split_syntax(digits_dir, digit_splits):
    head = data.load("digits", "train[:10%]", data_dir=digits_dir)
    assert len(head.labels) == 144
    np.testing.assert_array_equal(head.images, digit_splits["train"].images[:144])


def test_digits_unknown_split(digits_dir):
    with pytest.raises(ValueError, match=r"mixjax.data.load: TFDS dataset 'digits'.*'valid'"):
        data.load("digits", "valid", data_dir=digits_dir)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXJAX_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("MIXJAX_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    assert data.default_data_dir() == "/cache/mixjax/tfds"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_data_dir() == os.path.expanduser("~/.cache/mixjax/tfds")


def test_default_data_dir_is_used(monkeypatch, digits_dir):
    monkeypatch.setenv("MIXJAX_DATA_DIR", digits_dir)
    assert len(data.load("digits", "test").labels) == 359


# ---------------------------------------------------------------------------------------------
# TFDS datasets by name: mocked catalogue entries and builders prepared in tmp_path.


def test_tfds_name_with_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        mnist = data.load("mnist", "test", data_dir=str(tmp_path))
        cifar = data.load("cifar10", data_dir=str(tmp_path))
    assert mnist.images.shape == (6, 28, 28, 1) and mnist.images.dtype == np.uint8
    assert cifar.images.shape == (6, 32, 32, 3)
    for ds in (mnist, cifar):
        assert ds.num_classes == 10 and ds.labels.dtype == np.int32
        assert 0 <= ds.labels.min() and ds.labels.max() < 10


def test_tfds_name_empty_split(tmp_path):
    with tfds.testing.mock_data(num_examples=0):
        with pytest.raises(ValueError, match="TFDS dataset 'mnist': the split is empty"):
            data.load("mnist", data_dir=str(tmp_path))


def _tiny_builder(image_shape=(4, 4), label="class", supervised=True):
    """A small builder class; ``label`` is "class" (ClassLabel) or "tensor" (plain int64)."""
    label_feature = (
        tfds.features.ClassLabel(num_classes=3)
        if label == "class"
        else tfds.features.Tensor(shape=(), dtype=np.int64)
    )

    class TinySet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            features = {
                "image": tfds.features.Tensor(shape=image_shape, dtype=np.uint8),
                "label": label_feature,
            }
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(features),
                supervised_keys=("image", "label") if supervised else None,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(7), "test": self._generate_examples(3)}

        def _generate_examples(self, n):
            for i in range(n):
                shape = tuple(i + 1 if d is None else d for d in image_shape)
                yield i, {"image": np.full(shape, i, np.uint8), "label": i % 3}

    return TinySet


def test_tfds_name_prepared_in_data_dir(tmp_path):
    _tiny_builder()(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    for split, n in (("train", 7), ("test", 3)):
        ds = data.load("tiny_set", split, data_dir=str(tmp_path))
        assert ds.images.shape == (n, 4, 4, 1) and ds.num_classes == 3 and ds.name == "tiny_set"
        order = np.argsort(ds.images[:, 0, 0, 0])
        expected = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1))
        np.testing.assert_array_equal(ds.images[order], expected)
        np.testing.assert_array_equal(ds.labels[order], np.arange(n) % 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"supervised": False}, r"supervised_keys=None; expected \(image_key, label_key\)"),
        ({"label": "tensor"}, "label feature 'label' must be a ClassLabel, got Tensor"),
        ({"image_shape": (None, 4)}, "images differ in shape"),
    ],
)
def test_tfds_unusable_dataset(tmp_path, kwargs, match):
    _tiny_builder(**kwargs)(
        data_dir=str(tmp_path), file_format="array_record"
    ).download_and_prepare()
    with pytest.raises(ValueError, match=match):
        data.load("tiny_set", data_dir=str(tmp_path))


def test_tfds_unknown_name_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"no TFDS dataset 'no_such_set_xyz'.*{tmp_path}"):
        data.load("no_such_set_xyz", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10


def test_tfds_unprepared_name_fails_fast_without_download(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=rf"'mnist' is not prepared .*{tmp_path}"):
        data.load("mnist", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 10
    assert not os.listdir(tmp_path)


def test_tfds_bad_split(tmp_path):
    _tiny_builder()(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    with pytest.raises(ValueError, match=r"'tiny_set', split='valid'.*Unknown split"):
        data.load("tiny_set", "valid", data_dir=str(tmp_path))


def test_tfds_num_classes_must_agree_with_the_class_label(tmp_path):
    _tiny_builder()(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert data.load("tiny_set", data_dir=str(tmp_path), num_classes=3).num_classes == 3
    with pytest.raises(
        ValueError, match="'tiny_set': num_classes=4 disagrees with its ClassLabel's num_classes=3"
    ):
        data.load("tiny_set", data_dir=str(tmp_path), num_classes=4)


@pytest.mark.parametrize(
    "value, error", [(0, ValueError), (2**31, ValueError), (3.0, TypeError), (True, TypeError)]
)
def test_bad_num_classes_argument(tmp_path, value, error):
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 3, 3), np.uint8), labels=[0, 1])
    with pytest.raises(error, match="mixjax.data.load: num_classes must be None or an integer"):
        data.load(f"npz:{tmp_path / 'a.npz'}", num_classes=value)


@pytest.mark.parametrize(
    "source, error, match",
    [
        ("foo:bar", ValueError, "unknown source scheme 'foo'"),
        (
            "text:a.txt",
            ValueError,
            "is text, not an image dataset; read it with mixjax.data.load_text",
        ),
        ("", TypeError, "source must be a non-empty str"),
        (3, TypeError, "source must be a non-empty str, got 3"),
    ],
)
def test_bad_source(source, error, match):
    with pytest.raises(error, match=match):
        data.load(source)


# ---------------------------------------------------------------------------------------------
# IDX files.

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
_IDX_CODES.update({np.float32: 0x0D, np.float64: 0x0E})


def _encode(array):
    """Our own IDX writer, built from the format description rather than from the reader."""
    array = np.asarray(array)
    header = bytes([0, 0, _IDX_CODES[array.dtype.type], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, compress=False):
    payload = _encode(array)
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)
    return str(path)


@pytest.mark.parametrize("dtype", list(_IDX_CODES))
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, compress):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    out = data.read_idx(write_idx(tmp_path / "a", array, compress))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def _write_mnist_like(directory, compress, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    arrays = {}
    ext = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
        labels = rng.integers(0, 4, n).astype(np.uint8)
        labels[0] = 3
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels, compress)
        arrays[prefix] = images, labels
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx(tmp_path, compress):
    arrays = _write_mnist_like(tmp_path, compress)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = data.load(f"idx:{tmp_path}", split)
        images, labels = arrays[prefix]
        np.testing.assert_array_equal(ds.images, images[..., None])
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
        assert ds.num_classes == 4 and ds.name == f"idx:{tmp_path}"


_GOOD = _encode(np.arange(12, dtype=np.uint8).reshape(3, 4))


@pytest.mark.parametrize(
    "payload, match",
    [
        (
            _GOOD[:-1],
            r"header says shape \(3, 4\) of uint8 \(24 bytes\), "
            r"but the file holds 23 bytes \(truncated\)",
        ),
        (_GOOD + b"\0", r"header says .* holds 25 bytes \(extra data\)"),
        (gzip.compress(_GOOD, mtime=0)[:-9], "corrupt or truncated gzip data"),
        (b"\x1f\x8b" + b"garbage" * 4, "corrupt or truncated gzip data"),
        (b"\x01\x00" + _GOOD[2:], "not an IDX file: magic number '01000802'"),
        (b"\0\0\x07\x02" + _GOOD[4:], "not an IDX file: magic number '00000702'"),
        (b"\0\0\x08\x00", "not an IDX file"),
        (b"\0\0", "not an IDX file"),
        (_GOOD[:9], "truncated header: 2 dims need 12 bytes"),
    ],
)
def test_read_idx_corrupt(tmp_path, payload, match):
    path = tmp_path / "bad-idx"
    path.write_bytes(payload)
    with pytest.raises(
        ValueError, match=rf"mixjax.data.read_idx: '{re.escape(str(path))}': {match}"
    ):
        data.read_idx(path)


def test_load_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX directory '.*nowhere' does not exist"):
        data.load(f"idx:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="no train-images-idx3-ubyte or .*gz in"):
        data.load(f"idx:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(FileNotFoundError, match="no train-labels-idx1-ubyte or"):
        data.load(f"idx:{tmp_path}")
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), compress=True)
    with pytest.raises(ValueError, match="4 images but 3 labels; the counts must match"):
        data.load(f"idx:{tmp_path}")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 4), np.uint8))
    with pytest.raises(
        ValueError, match=r"images must be \(N, H, W\) or \(N, H, W, C\), got \(3, 4\)"
    ):
        data.load(f"idx:{tmp_path}")
    with pytest.raises(ValueError, match=r"has splits \('train', 'test'\), got split='valid'"):
        data.load(f"idx:{tmp_path}", "valid")


# ---------------------------------------------------------------------------------------------
# npz files.


def test_load_npz_keras_layout(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (9, 5, 5), dtype=np.uint8),
        "y_train": rng.integers(0, 3, 9).astype(np.uint8),
        "x_test": rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8),
        "y_test": np.array([[0], [5], [1], [2]], np.int64),  # Keras CIFAR: (N, 1).
    }
    np.savez(tmp_path / "k.npz", **arrays)
    train = data.load(f"npz:{tmp_path / 'k.npz'}")
    test = data.load(f"npz:{tmp_path / 'k.npz'}", "test")
    np.testing.assert_array_equal(train.images, arrays["x_train"][..., None])
    np.testing.assert_array_equal(train.labels, arrays["y_train"])
    np.testing.assert_array_equal(test.images, arrays["x_test"])
    np.testing.assert_array_equal(test.labels, [0, 5, 1, 2])
    assert test.labels.dtype == np.int32 and test.num_classes == 6


def test_load_npz_single_split_layout_with_float_images(tmp_path):
    images = np.linspace(0, 1, 3 * 4 * 4, dtype=np.float64).reshape(3, 4, 4)
    np.savez_compressed(tmp_path / "s.npz", images=images, labels=np.array([2, 0, 1]))
    for split in data.SPLITS:
        ds = data.load(f"npz:{tmp_path / 's.npz'}", split)
        assert ds.images.dtype == np.float32 and ds.images.shape == (3, 4, 4, 1)
        np.testing.assert_allclose(ds.images[..., 0], images, rtol=1e-7)
        np.testing.assert_array_equal(ds.labels, [2, 0, 1])


@pytest.mark.parametrize(
    "arrays, error, match",
    [
        (
            {"x_train": np.zeros((2, 3, 3))},
            ValueError,
            r"has arrays \['x_train'\]; expected x_train",
        ),
        ({"images": np.zeros((2, 3, 3), np.int16), "labels": [0, 1]}, TypeError, "uint8 or float"),
        ({"images": np.zeros((2, 3, 3)), "labels": [0.0, 1.0]}, TypeError, "labels must be integ"),
        ({"images": np.zeros((2, 3, 3)), "labels": [0, -1]}, ValueError, "labels must be >= 0"),
        (
            {"images": np.zeros((2, 3, 3)), "labels": np.zeros((2, 2), int)},
            ValueError,
            "be \\(N,\\)",
        ),
        ({"images": np.zeros((0, 3, 3)), "labels": np.zeros(0, int)}, ValueError, "split is empty"),
        ({"images": np.array([None, 1]), "labels": [0, 1]}, ValueError, "pickle"),
    ],
)
def test_load_npz_errors(tmp_path, arrays, error, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(error, match=match):
        data.load(f"npz:{tmp_path / 'bad.npz'}")


def test_load_npz_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="npz file '.*missing.npz' does not exist"):
        data.load(f"npz:{tmp_path / 'missing.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="'.*junk.npz' is not a readable .npz file"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="holds a single array, not an .npz archive"):
        data.load(f"npz:{tmp_path / 'one.npy'}")
    with pytest.raises(ValueError, match="got split='validation'"):
        data.load(f"npz:{tmp_path / 'one.npy'}", "validation")


def _npz(tmp_path, images, labels, name="d.npz"):
    np.savez(tmp_path / name, images=images, labels=labels)
    return f"npz:{tmp_path / name}"


def test_load_npz_truncated_or_corrupt_archive_names_the_file(tmp_path):
    rng = np.random.default_rng(2)
    source = _npz(tmp_path, rng.integers(0, 256, (50, 8, 8), np.uint8), np.arange(50) % 10)
    whole = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"'.*cut.npz' is not a readable .npz file \(BadZip"):
        data.load(f"npz:{tmp_path / 'cut.npz'}")
    flipped = bytearray(whole)
    flipped[1000] ^= 0xFF  # inside the stored pixels of images.npy: a CRC mismatch
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"'.*crc.npz' is not a readable .npz file .*CRC"):
        data.load(f"npz:{tmp_path / 'crc.npz'}")
    assert data.load(source).images.shape == (50, 8, 8, 1)


def test_load_npz_member_larger_than_its_header(tmp_path):
    path = tmp_path / "padded.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("images.npy", "w") as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (3, 4, 4)}
            np.lib.format.write_array_header_1_0(f, header)
            f.write(bytes(48 + 1000))
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(3))
    with pytest.raises(
        ValueError,
        match=r"member 'images.npy': its header says shape \(3, 4, 4\) of uint8 "
        r"\(176 bytes\), but it holds 1176 bytes",
    ):
        data.load(f"npz:{path}")


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((3, 0, 4), np.uint8), [0, 1, 2], r"images of shape \(3, 0, 4\) are empty"),
        (np.zeros((2, 3, 3), np.complex64), [0, 1], "images must be uint8 or floating"),
        (np.zeros((2, 3, 3), np.uint8), np.array([True, False]), "labels must be integers"),
    ],
)
def test_load_refuses_degenerate_arrays(tmp_path, images, labels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        data.load(_npz(tmp_path, images, labels))


@pytest.mark.parametrize("compress", [False, True])
def test_idx_zero_size_or_impossible_header(tmp_path, compress):
    zero = b"\0\0\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (0, 28, 28))
    path = write_idx(tmp_path / "zero", np.zeros(0, np.uint8), compress)
    with open(path, "wb") as f:
        f.write(gzip.compress(zero) if compress else zero)
    with pytest.raises(ValueError, match=r"header says shape \(0, 28, 28\); every size must be"):
        data.read_idx(path)


def test_idx_gzip_header_larger_than_deflate_can_inflate(tmp_path):
    head = b"\0\0\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (60000, 28, 28))
    path = tmp_path / "small.gz"
    path.write_bytes(gzip.compress(head + bytes(100)))
    size = path.stat().st_size
    with pytest.raises(
        ValueError, match=rf"\(47040016 bytes\), more than a {size}-byte gzip file can hold"
    ):
        data.read_idx(path)


# ---------------------------------------------------------------------------------------------
# Data checked before it trains: finite pixels, labels that fit the number of classes.


def test_float_images_must_be_finite(tmp_path):
    images = np.zeros((4, 3, 3), np.float32)
    images[1, 2, 0] = np.nan
    images[3, 0, 1] = -np.inf
    with pytest.raises(
        ValueError,
        match=r"'npz:.*': images hold 2 non-finite \(NaN/Inf\) float32 pixel values, "
        r"the first at images\[1, 2, 0, 0\]",
    ):
        data.load(_npz(tmp_path, images, [0, 1, 2, 3]))
    huge = np.full((2, 3, 3), 1e300)  # finite in float64, inf in float32
    with pytest.raises(ValueError, match=r"images hold 18 non-finite .* images\[0, 0, 0, 0\]"):
        data.load(_npz(tmp_path, huge, [0, 1]))
    write_idx(tmp_path / "train-images-idx3-ubyte", np.full((2, 2, 2), np.nan, np.float32))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1], np.uint8))
    with pytest.raises(ValueError, match=r"'idx:.*': images hold 8 non-finite"):
        data.load(f"idx:{tmp_path}")


def _labels_dataset(tmp_path, labels, **kwargs):
    labels = np.asarray(labels)
    return data.load(_npz(tmp_path, np.zeros((len(labels), 2, 2), np.uint8), labels), **kwargs)


@pytest.mark.parametrize(
    "labels, num_classes",
    [
        (np.r_[np.arange(10), np.arange(10)], 10),  # a full split
        (np.r_[0, 1, 2, 3, 5, 6, 7, 8, 9, np.arange(11) % 4], 10),  # 20 examples, class 4 missing
        ([9, 1, 4], 10),  # a tiny subset: 3 examples can fill at most 3 classes
        ([7, 2, 9, 0, 3], 10),  # 5 examples: 5 of 10 classes filled, the boundary
        (np.zeros(5, int), 1),
    ],
)
def test_plausible_inferred_class_counts_load(tmp_path, labels, num_classes):
    assert _labels_dataset(tmp_path, labels).num_classes == num_classes


@pytest.mark.parametrize(
    "labels, match",
    [
        (
            np.r_[np.arange(2000) % 10, 5000],
            r"labels imply num_classes=5001 \(labels\[2000\]=5000\), but 4990 of those classes "
            r"have no example \(11 distinct labels in 2001 examples\); pass num_classes=",
        ),
        (
            np.r_[np.arange(20) % 10, 2**31 - 1],
            r"labels imply num_classes=2147483648 \(labels\[20\]=2147483647\), more than "
            r"MAX_CLASSES=100000; pass num_classes=",
        ),
        (
            np.array([2**40, 0]),
            r"labels imply num_classes=1099511627777 \(labels\[0\]=1099511627776\)",
        ),
        (
            [9, 9, 9],
            r"labels imply num_classes=10 \(labels\[0\]=9\), but 9 of those classes have no",
        ),
        ([0, -1], r"labels must be >= 0, got labels\[1\]=-1"),
    ],
)
def test_implausible_inferred_class_counts_are_refused(tmp_path, labels, match):
    with pytest.raises(ValueError, match=rf"mixjax.data.load: 'npz:.*d.npz': {match}"):
        _labels_dataset(tmp_path, labels)


def test_declared_num_classes_is_checked_against_every_label(tmp_path):
    sparse = np.r_[np.arange(2000) % 10, 5000]
    ds = _labels_dataset(tmp_path, sparse, num_classes=5001)
    assert ds.num_classes == 5001 and ds.labels[-1] == 5000
    assert _labels_dataset(tmp_path, [0, 1], num_classes=10).num_classes == 10
    for labels, bad in (([0, 3, 1, 7], "labels[1]=3"), ([2, -1], "labels[1]=-1")):
        with pytest.raises(
            ValueError,
            match=rf"'npz:.*': labels must be in \[0, 3\) \(num_classes=3 passed to load\), "
            rf"got {re.escape(bad)}",
        ):
            _labels_dataset(tmp_path, labels, num_classes=3)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 2, 2), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 255], np.uint8))
    with pytest.raises(ValueError, match=r"'idx:.*': labels must be in \[0, 10\) .*=255"):
        data.load(f"idx:{tmp_path}", "test", num_classes=10)


# ---------------------------------------------------------------------------------------------
# Decompression bombs: 1 GiB of zeros in about 1 MB, read in a subprocess whose address space is
# capped at 512 MiB above what it holds after imports, so a reader that inflates them fails.

_ZERO_MIB = bytes(1 << 20)
_NEEDS_PROC = pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="reads VmSize from /proc (Linux)"
)
_BOUNDED = """
import resource, sys
from mixjax import data
status = open("/proc/self/status").read()
vm_kb = int(status.split("VmSize:")[1].split()[0])
limit = vm_kb * 1024 + (512 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for call in sys.argv[1:]:
    try:
        eval(call)
        print("loaded")
    except ValueError as err:
        print("ValueError:", err)
"""


def _run_bounded(*calls):
    done = subprocess.run(
        [sys.executable, "-c", _BOUNDED, *calls], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def _idx_head(dtype_code, shape):
    return bytes([0, 0, dtype_code, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)


def _write_gzip_zeros(path, head, zero_mib):
    """A gzip file of ``head`` then ``zero_mib`` MiB of zeros, built fast: a full flush resets
    deflate's state, so one compressed MiB of zeros can be repeated as is."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    chunk = comp.compress(_ZERO_MIB) + comp.flush(zlib.Z_FULL_FLUSH)
    assert comp.compress(_ZERO_MIB) + comp.flush(zlib.Z_FULL_FLUSH) == chunk
    crc = zlib.crc32(head)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\0\0\0\0\x02\xff" + first)
        for _ in range(zero_mib):
            f.write(chunk)
            crc = zlib.crc32(_ZERO_MIB, crc)
        f.write(comp.flush())
        f.write(struct.pack("<II", crc, (len(head) + (zero_mib << 20)) & 0xFFFFFFFF))
    return str(path)


def test_gzip_zeros_helper_writes_valid_gzip(tmp_path):
    path = _write_gzip_zeros(tmp_path / "z.gz", b"head", 3)
    with gzip.open(path) as f:
        assert f.read() == b"head" + bytes(3 << 20)


@_NEEDS_PROC
def test_idx_gzip_bombs_are_refused_with_bounded_memory(tmp_path):
    # A header that understates its data: 12 pixels announced, 1 GiB follows.
    small = _write_gzip_zeros(tmp_path / "small.gz", _idx_head(0x08, (3, 4)), 1024)
    # A header that tells the truth about 1 GiB of images, with 3 labels: counts disagree.
    _write_gzip_zeros(
        tmp_path / "train-images-idx3-ubyte.gz", _idx_head(0x08, (1024, 1024, 1024)), 1024
    )
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    assert os.path.getsize(small) < 2 << 20
    out = _run_bounded(f"data.read_idx({small!r})", f"data.load('idx:{tmp_path}')")
    assert re.fullmatch(
        r"ValueError: .*small.gz': header says shape \(3, 4\) of uint8 \(24 bytes\), but the "
        r"decompressed data holds more than 24 bytes \(extra data\)",
        out[0],
    ), out
    assert re.fullmatch(r"ValueError: .*1024 images but 3 labels; the counts must match", out[1])


@_NEEDS_PROC
def test_npz_bombs_are_refused_with_bounded_memory(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("images.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (1024, 1024, 1024)}
            np.lib.format.write_array_header_1_0(f, header)
            for _ in range(1024):
                f.write(_ZERO_MIB)
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(3))
    assert os.path.getsize(path) < 8 << 20
    out = _run_bounded(f"data.load('npz:{path}')")
    assert re.fullmatch(r"ValueError: .*1024 images but 3 labels; the counts must match", out[0])


# ---------------------------------------------------------------------------------------------
# normalize.


def test_normalize_uint8_and_float(harness):
    pixels = np.arange(0, 256, 15, dtype=np.uint8).reshape(1, 3, 2, 3)
    fn = harness(lambda x: data.normalize(x, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0)))
    expected = (pixels.astype(np.float64) / 255 - [0.1, 0.2, 0.3]) / [0.5, 0.25, 2.0]
    for x in (jnp.asarray(pixels), jnp.asarray(pixels / 255, jnp.bfloat16)):
        out = fn(x)
        assert isinstance(out, jax.Array) and out.dtype == jnp.float32 and out.shape == x.shape
        tol = 1e-6 if x.dtype == jnp.uint8 else 2e-2
        np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)


def test_normalize_numpy_stays_numpy_with_default_range():
    pixels = np.array([0, 51, 255], np.uint8)
    out = data.normalize(pixels)
    assert type(out) is np.ndarray and out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, -0.6, 1.0], rtol=1e-6)


@pytest.mark.parametrize(
    "images, kwargs, error, match",
    [
        (np.zeros(3, np.uint8), {"std": 0.0}, ValueError, r"std > 0, got mean=0.5, std=0.0"),
        (np.zeros(3, np.uint8), {"mean": [[0.5]]}, ValueError, "per-channel"),
        (np.zeros(3, np.int32), {}, TypeError, "uint8 or floating array, got int32"),
        ([0, 1], {}, TypeError, "uint8 or floating array, got None"),
    ],
)
def test_normalize_errors(images, kwargs, error, match):
    with pytest.raises(error, match=f"mixjax.data.normalize: .*{match}"):
        data.normalize(images, **kwargs)


# ---------------------------------------------------------------------------------------------
# batches and stacked_batches.


def _indexed(n=10):
    """A dataset whose label is each example's index, and whose pixel repeats it."""
    ids = np.arange(n, dtype=np.int32)
    return data.Dataset(
        np.broadcast_to(ids[:, None, None, None], (n, 2, 2, 1)).astype(np.uint8), ids, n, "ids"
    )


def test_batches_shapes_and_each_example_once_per_epoch():
    ds = _indexed(10)
    out = list(data.batches(ds, 3, epochs=2))
    assert len(out) == 6
    for batch in out:
        assert batch["image"].shape == (3, 2, 2, 1) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["label"])
    for epoch in (out[:3], out[3:]):
        seen = np.concatenate([b["label"] for b in epoch])
        assert len(set(seen.tolist())) == 9  # 10 % 3 = 1 example dropped per epoch.
    last = list(data.batches(ds, 3, drop_remainder=False))
    assert [len(b["label"]) for b in last] == [3, 3, 3, 1]
    np.testing.assert_array_equal(
        np.sort(np.concatenate([b["label"] for b in last])), np.arange(10)
    )


def test_batches_order_is_seeded_and_reshuffled_each_epoch():
    ds = _indexed(50)
    labels = lambda it: np.concatenate([b["label"] for b in it])
    first = labels(data.batches(ds, 10, seed=3, epochs=2))
    np.testing.assert_array_equal(first, labels(data.batches(ds, 10, seed=3, epochs=2)))
    np.testing.assert_array_equal(first[:50], np.random.default_rng([3, 0]).permutation(50))
    assert not np.array_equal(first[:50], first[50:])
    assert not np.array_equal(first, labels(data.batches(ds, 10, seed=4, epochs=2)))
    np.testing.assert_array_equal(labels(data.batches(ds, 10, shuffle=False)), np.arange(50))


def test_batches_forever():
    ds = _indexed(4)
    out = list(itertools.islice(data.batches(ds, 2, epochs=None), 7))
    assert len(out) == 7
    np.testing.assert_array_equal(
        np.sort(np.concatenate([b["label"] for b in out[4:6]])), np.arange(4)
    )


@pytest.mark.parametrize(
    "dataset, kwargs, error, match",
    [
        (
            _indexed(),
            {"batch_size": 0},
            ValueError,
            "batch_size must be an integer >= 1, got batch_size=0",
        ),
        (
            _indexed(),
            {"batch_size": True},
            TypeError,
            "batch_size must be an integer >= 1, got batch_size=True",
        ),
        (
            _indexed(),
            {"batch_size": 2.0},
            TypeError,
            "batch_size must be an integer >= 1, got batch_size=2.0",
        ),
        (
            _indexed(),
            {"batch_size": 11},
            ValueError,
            "batch_size=11 exceeds the 10 examples of 'ids'",
        ),
        (_indexed(), {"batch_size": 2, "seed": -1}, ValueError, "seed must be an integer >= 0"),
        (_indexed(), {"batch_size": 2, "epochs": 0}, ValueError, "epochs must be an integer >= 1"),
        (
            (np.zeros(3), np.zeros(3)),
            {"batch_size": 1},
            TypeError,
            "dataset must be a Dataset, got tuple",
        ),
    ],
)
def test_batches_errors_are_eager(dataset, kwargs, error, match):
    with pytest.raises(error, match=f"mixjax.data.batches: {match}"):
        data.batches(dataset, **kwargs)  # No next(): checked at the call.


def test_batches_larger_than_dataset_without_drop():
    out = list(data.batches(_indexed(4), 9, drop_remainder=False))
    assert [len(b["label"]) for b in out] == [4]


def test_stacked_batches_match_batches():
    ds = _indexed(10)
    stacked = list(data.stacked_batches(ds, 3, 2, seed=5, epochs=2))
    flat = list(data.batches(ds, 3, seed=5, epochs=2))
    assert len(stacked) == 3
    for i, group in enumerate(stacked):
        assert group["image"].shape == (2, 3, 2, 2, 1) and group["label"].shape == (2, 3)
        for k in range(2):
            np.testing.assert_array_equal(group["label"][k], flat[2 * i + k]["label"])
            np.testing.assert_array_equal(group["image"][k], flat[2 * i + k]["image"])
    forever = data.stacked_batches(ds, 3, 4, epochs=None)
    assert len(list(itertools.islice(forever, 5))) == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "stacked_batches: steps must be an integer >= 1, got steps=0"),
        ({"steps": 4}, "stacked_batches: steps=4 exceeds the 3 batches of batch_size=3 in 1 epoch"),
    ],
)
def test_stacked_batches_errors(kwargs, match):
    with pytest.raises(ValueError, match=f"mixjax.data.{match}"):
        data.stacked_batches(_indexed(10), 3, **kwargs)
