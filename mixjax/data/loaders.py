"""Image-classification datasets held in host memory: :func:`load` one split of a source.

:func:`load` reads one split of a dataset whole into NumPy arrays (meant for datasets of the
MNIST / CIFAR size, which fit in memory) from one of these sources:

* ``"digits"`` (the default): scikit-learn's 1797 8x8 handwritten digits, embedded, offline,
  served through the TFDS builder :class:`mixjax.data.digits.MixjaxDigits` (stratified 80/20 split:
  1438 train, 359 test; see :mod:`mixjax.data.digits`). Prepared into ``data_dir`` on first use.
* ``"<name>"``: any TFDS dataset with ``supervised_keys`` ``(image, label)`` and a ``ClassLabel``
  label, e.g. ``"mnist"``, read with ``tfds.data_source`` from its ``array_record`` files in
  ``data_dir``. Only with ``download=True`` does TFDS download and prepare it.
* ``"idx:DIR"``: MNIST-style IDX files in directory ``DIR``: ``train-images-idx3-ubyte`` and
  ``train-labels-idx1-ubyte`` for split ``"train"``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte`` for ``"test"``, each raw or gzip-compressed (name + ``.gz``).
* ``"npz:FILE"``: a NumPy ``.npz`` archive (read without pickle) holding either ``x_train``,
  ``y_train``, ``x_test``, ``y_test`` (the Keras ``mnist.npz`` layout), or ``images`` and
  ``labels``: one split per file, returned whatever ``split`` asks for.

TFDS sources (``digits`` and names) accept TFDS split strings (``"train[:10%]"``); ``idx:`` and
``npz:`` know ``"train"`` and ``"test"``. ``data_dir`` defaults to ``$MIXJAX_DATA_DIR``, else
``$XDG_CACHE_HOME/mixjax/tfds`` (``~/.cache/mixjax/tfds``); pass ``~/tensorflow_datasets`` to read
datasets TFDS prepared there in ``array_record`` format.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from typing import Any, NamedTuple

import numpy as np

__all__ = ["SPLITS", "Dataset", "default_data_dir", "load", "read_idx"]

SPLITS = ("train", "test")

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


class Dataset(NamedTuple):
    """One split of an image-classification dataset, in host memory.

    Attributes:
        images: ``(N, H, W, C)`` uint8 pixels in ``0..255``, or float32 when the source stored
            floating-point pixels (npz / IDX files).
        labels: ``(N,)`` int32 class ids in ``0..num_classes-1``.
        num_classes: the number of classes: the label feature's for TFDS sources, else
            ``max(labels) + 1`` over this split.
        name: the ``source`` string given to :func:`load`.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str


def default_data_dir() -> str:
    """``$MIXJAX_DATA_DIR``, else ``$XDG_CACHE_HOME/mixjax/tfds`` (``~/.cache/mixjax/tfds``)."""
    if os.environ.get("MIXJAX_DATA_DIR"):
        return os.environ["MIXJAX_DATA_DIR"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "mixjax", "tfds")


def load(
    source: str = "digits",
    split: str = "train",
    *,
    data_dir: str | None = None,
    download: bool = False,
) -> Dataset:
    """Loads one split of a dataset into host memory (sources: see the module docstring).

    Args:
        source: ``"digits"``, a TFDS dataset name, ``"idx:DIR"`` or ``"npz:FILE"``.
        split: ``"train"`` or ``"test"``; TFDS sources also take TFDS split strings.
        data_dir: where TFDS sources are prepared and read; :func:`default_data_dir` if None.
        download: let TFDS download and prepare a named dataset missing from ``data_dir``
            (needs network). The default never touches the network and fails fast instead.

    Returns:
        A :class:`Dataset` with images ``(N, H, W, C)`` (a channel axis is added to ``(N, H, W)``
        images) and int32 labels ``(N,)``.

    Raises:
        ValueError: unknown scheme or split; unknown or unusable TFDS dataset; corrupt files;
            images and labels that disagree in count or have the wrong rank.
        FileNotFoundError: a missing file or directory, or a TFDS dataset not prepared in
            ``data_dir`` (the message names both).
        TypeError: ``source`` not a string; pixels neither uint8 nor floating; labels not integer.
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"mixjax.data.load: source must be a non-empty str, got {source!r}")
    scheme, colon, location = source.partition(":")
    if colon:
        if scheme not in ("idx", "npz"):
            raise ValueError(
                f"mixjax.data.load: unknown source scheme {scheme!r} in {source!r}; expected "
                "'digits', a TFDS dataset name, 'idx:DIR' or 'npz:FILE'"
            )
        if split not in SPLITS:
            raise ValueError(
                f"mixjax.data.load: {source!r} has splits {SPLITS}, got split={split!r}"
            )
        read = _read_idx_split if scheme == "idx" else _read_npz_split
        images, labels = read(os.path.expanduser(location), split)
        return _dataset(source, images, labels, None)
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    return _from_data_source(source, _tfds_data_source(source, split, data_dir, download))


def _tfds_data_source(name: str, split: str, data_dir: str, download: bool) -> Any:
    # TFDS takes half a second to import: only pay for it when a TFDS source is loaded.
    import tensorflow_datasets as tfds

    from mixjax.data import digits

    try:
        if name == "digits":
            return digits.prepare(data_dir).as_data_source(split=split)
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.registered.DatasetNotFoundError:
        # TFDS's own message lists its whole catalogue; keep ours readable.
        raise ValueError(
            f"mixjax.data.load: no TFDS dataset {name!r}: it is neither in the TFDS catalogue "
            f"nor prepared in data_dir {data_dir!r}"
        ) from None
    except (NotImplementedError, AssertionError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"mixjax.data.load: TFDS dataset {name!r} is not prepared in array_record format in "
            f"data_dir {data_dir!r}; prepare it there (file_format='array_record') or pass "
            f"download=True ({type(err).__name__}: {err})"
        ) from err
    except ValueError as err:
        raise ValueError(
            f"mixjax.data.load: TFDS dataset {name!r}, split={split!r}: {err}"
        ) from err


def _from_data_source(name: str, source: Any) -> Dataset:
    """Reads a whole TFDS random-access data source into a :class:`Dataset`."""
    import tensorflow_datasets as tfds

    info = source.dataset_info
    keys = info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise ValueError(
            f"mixjax.data.load: TFDS dataset {name!r} has supervised_keys={keys!r}; expected "
            "(image_key, label_key)"
        )
    image_key, label_key = keys
    label_feature = info.features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(
            f"mixjax.data.load: TFDS dataset {name!r}: label feature {label_key!r} must be a "
            f"ClassLabel, got {type(label_feature).__name__}"
        )
    # One record at a time: TFDS's batched __getitems__ is not supported by tfds.testing mocks.
    examples = [source[i] for i in range(len(source))]
    if not examples:
        raise ValueError(f"mixjax.data.load: TFDS dataset {name!r}: the split is empty")
    shapes = {np.shape(ex[image_key]) for ex in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"mixjax.data.load: TFDS dataset {name!r}: images differ in shape "
            f"({sorted(shapes)[:4]}...); only fixed-shape images can be stacked"
        )
    images = np.stack([ex[image_key] for ex in examples])
    labels = np.array([ex[label_key] for ex in examples])
    return _dataset(name, images, labels, label_feature.num_classes)


def _dataset(name: str, images: Any, labels: Any, num_classes: int | None) -> Dataset:
    """Validates and canonicalizes images and labels (see :class:`Dataset`)."""
    images, labels = np.asarray(images), np.asarray(labels)
    where = f"mixjax.data.load: {name!r}"
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be (N, H, W) or (N, H, W, C), got {images.shape}")
    if np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
    elif images.dtype != np.uint8:
        raise TypeError(f"{where}: images must be uint8 or floating, got {images.dtype}")
    if labels.ndim == 2 and labels.shape[1] == 1:  # Keras stores CIFAR labels as (N, 1).
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must be (N,), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{where}: labels must be integers, got {labels.dtype}")
    if len(labels) != len(images):
        raise ValueError(
            f"{where}: {len(images)} images but {len(labels)} labels; the counts must match"
        )
    if len(labels) == 0:
        raise ValueError(f"{where}: the split is empty")
    if labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got min {labels.min()}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    return Dataset(images, labels.astype(np.int32), int(num_classes), name)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (the MNIST format), raw or gzip-compressed (detected by content).

    The format: two zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions ``d``, then
    ``d`` big-endian uint32 sizes and the big-endian data in C order.

    Returns:
        The array, in native byte order, with the shape the header gives.

    Raises:
        ValueError: corrupt gzip data, a bad magic number or type code, or a data size that
            disagrees with the header (a truncated file); the message names the file.
    """
    with open(path, "rb") as f:
        raw = f.read()
    where = f"mixjax.data.read_idx: {os.fspath(path)!r}"
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{where}: corrupt or truncated gzip data ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"{where}: not an IDX file: magic number {raw[:4].hex()!r}, expected 0000 then a "
            f"type code in {[f'{c:02x}' for c in _IDX_DTYPES]} and a dimension count >= 1"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{where}: truncated header: {ndim} dims need {header} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{where}: header says shape {shape} of {dtype.name} ({expected} bytes), but the "
            f"file holds {len(raw)} bytes ({'truncated' if len(raw) < expected else 'extra data'})"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _read_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"mixjax.data.load: IDX directory {directory!r} does not exist")
    arrays = []
    for stem in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{_IDX_PREFIX[split]}-{stem}"
        candidates = [os.path.join(directory, name + ext) for ext in ("", ".gz")]
        found = [path for path in candidates if os.path.isfile(path)]
        if not found:
            raise FileNotFoundError(
                f"mixjax.data.load: no {name} or {name}.gz in {directory!r} (split={split!r})"
            )
        arrays.append(read_idx(found[0]))
    return arrays[0], arrays[1]


def _read_npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mixjax.data.load: npz file {path!r} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"mixjax.data.load: {path!r} is not a readable .npz file: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"mixjax.data.load: {path!r} holds a single array, not an .npz archive")
    with archive:
        keys = set(archive.files)
        for image_key, label_key in ((f"x_{split}", f"y_{split}"), ("images", "labels")):
            if {image_key, label_key} <= keys:
                try:
                    return archive[image_key], archive[label_key]
                except ValueError as err:  # Object arrays need pickle, which is refused.
                    raise ValueError(f"mixjax.data.load: {path!r}: {err}") from None
    raise ValueError(
        f"mixjax.data.load: {path!r} has arrays {sorted(keys)}; expected x_{split} and "
        f"y_{split} (Keras layout) or images and labels"
    )
