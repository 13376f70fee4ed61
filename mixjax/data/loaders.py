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

Files are checked before their data is read (:mod:`mixjax.data.files`: IDX and ``.npy``
headers give each array's shape and dtype, which must fit the file's size and each other), so a
truncated, padded or decompression-bomb file is refused with little memory. Then the data is
checked before it trains: float pixels must be finite and labels must fit the number of classes
(see :func:`load`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import numpy as np

from mixjax import _checks
from mixjax.data.files import read_idx, read_idx_pair, read_npz_pair

__all__ = ["MAX_CLASSES", "SPLITS", "Dataset", "default_data_dir", "load", "read_idx"]

SPLITS = ("train", "test")
# The largest class count load infers from labels (max + 1); pass num_classes= to go beyond.
MAX_CLASSES = 100_000

_LOAD = "mixjax.data.load"
_IDX_PREFIX = {"train": "train", "test": "t10k"}


class Dataset(NamedTuple):
    """One split of an image-classification dataset, in host memory.

    Attributes:
        images: ``(N, H, W, C)`` uint8 pixels in ``0..255``, or finite float32 when the source
            stored floating-point pixels (npz / IDX files).
        labels: ``(N,)`` int32 class ids in ``0..num_classes-1``.
        num_classes: the number of classes: the label feature's for TFDS sources, else the
            ``num_classes`` given to :func:`load`, else ``max(labels) + 1`` over this split.
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
    num_classes: int | None = None,
) -> Dataset:
    """Loads one split of a dataset into host memory (sources: see the module docstring).

    The number of classes is *declared* (a TFDS ``ClassLabel``'s, or ``num_classes``) or
    *inferred* as ``n = max(labels) + 1``. Every label must lie in ``[0, num_classes)`` of a
    declared count. An inferred count is refused as implausible (a stray label, such as one
    ``5000`` in MNIST, would otherwise build a 5001-class model) when

    * ``n > MAX_CLASSES`` (100 000), or
    * fewer than half of the classes the examples could fill hold an example: with ``N``
      examples and ``u`` distinct labels, ``u < min(n, N) / 2``. A complete MNIST / CIFAR split
      passes (``u = n``), as does a small subset (20 examples of 10 classes, one class missing:
      ``9 >= 5``; 3 examples: ``3 >= 1.5``); 60 000 MNIST labels with one ``5000`` do not
      (``11 < 2500.5``).

    Pass ``num_classes=`` when sparse labels are intended.

    Args:
        source: ``"digits"``, a TFDS dataset name, ``"idx:DIR"`` or ``"npz:FILE"``.
        split: ``"train"`` or ``"test"``; TFDS sources also take TFDS split strings.
        data_dir: where TFDS sources are prepared and read; :func:`default_data_dir` if None.
        download: let TFDS download and prepare a named dataset missing from ``data_dir``
            (needs network). The default never touches the network and fails fast instead.
        num_classes: the number of classes, ``>= 1``; for TFDS sources it must equal the
            ``ClassLabel``'s. ``None``: the ``ClassLabel``'s, else inferred (see above).

    Returns:
        A :class:`Dataset` with images ``(N, H, W, C)`` (a channel axis is added to ``(N, H, W)``
        images) and int32 labels ``(N,)``.

    Raises:
        ValueError: unknown scheme or split; unknown or unusable TFDS dataset; corrupt,
            truncated or oversized files (checked from their headers before the data is read);
            images and labels that disagree in count, have the wrong rank or an empty axis;
            non-finite float pixels (the count and the first index); a label outside
            ``[0, num_classes)`` (the first index and value); an implausible inferred count.
        FileNotFoundError: a missing file or directory, or a TFDS dataset not prepared in
            ``data_dir`` (the message names both).
        TypeError: ``source`` not a string; pixels neither uint8 nor floating; labels not
            integer; ``num_classes`` not an integer.
    """
    if not isinstance(source, str) or not source:
        raise TypeError(f"{_LOAD}: source must be a non-empty str, got {source!r}")
    num_classes = _checks.integer(
        _LOAD, "num_classes", num_classes, 1, np.iinfo(np.int32).max, optional=True
    )
    scheme, colon, location = source.partition(":")
    if colon:
        if scheme == "text":
            raise ValueError(
                f"{_LOAD}: {source!r} is text, not an image dataset; read it with "
                "mixjax.data.load_text (token splits 'train' and 'val')"
            )
        if scheme not in ("idx", "npz"):
            raise ValueError(
                f"{_LOAD}: unknown source scheme {scheme!r} in {source!r}; expected "
                "'digits', a TFDS dataset name, 'idx:DIR' or 'npz:FILE'"
            )
        if split not in SPLITS:
            raise ValueError(f"{_LOAD}: {source!r} has splits {SPLITS}, got split={split!r}")
        read = _read_idx_split if scheme == "idx" else _read_npz_split
        images, labels = read(os.path.expanduser(location), split, source)
        declared = None if num_classes is None else (num_classes, "passed to load")
        return _dataset(source, images, labels, declared)
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    return _from_data_source(
        source, _tfds_data_source(source, split, data_dir, download), num_classes
    )


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
            f"{_LOAD}: no TFDS dataset {name!r}: it is neither in the TFDS catalogue "
            f"nor prepared in data_dir {data_dir!r}"
        ) from None
    except (NotImplementedError, AssertionError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"{_LOAD}: TFDS dataset {name!r} is not prepared in array_record format in "
            f"data_dir {data_dir!r}; prepare it there (file_format='array_record') or pass "
            f"download=True ({type(err).__name__}: {err})"
        ) from err
    except ValueError as err:
        raise ValueError(f"{_LOAD}: TFDS dataset {name!r}, split={split!r}: {err}") from err


def _from_data_source(name: str, source: Any, num_classes: int | None) -> Dataset:
    """Reads a whole TFDS random-access data source into a :class:`Dataset`."""
    import tensorflow_datasets as tfds

    info = source.dataset_info
    keys = info.supervised_keys
    if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
        raise ValueError(
            f"{_LOAD}: TFDS dataset {name!r} has supervised_keys={keys!r}; expected "
            "(image_key, label_key)"
        )
    image_key, label_key = keys
    label_feature = info.features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(
            f"{_LOAD}: TFDS dataset {name!r}: label feature {label_key!r} must be a "
            f"ClassLabel, got {type(label_feature).__name__}"
        )
    declared = int(label_feature.num_classes)
    if num_classes is not None and num_classes != declared:
        raise ValueError(
            f"{_LOAD}: TFDS dataset {name!r}: num_classes={num_classes} disagrees with its "
            f"ClassLabel's num_classes={declared}"
        )
    # One record at a time: TFDS's batched __getitems__ is not supported by tfds.testing mocks.
    examples = [source[i] for i in range(len(source))]
    if not examples:
        raise ValueError(f"{_LOAD}: TFDS dataset {name!r}: the split is empty")
    shapes = {np.shape(ex[image_key]) for ex in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"{_LOAD}: TFDS dataset {name!r}: images differ in shape "
            f"({sorted(shapes)[:4]}...); only fixed-shape images can be stacked"
        )
    images = np.stack([ex[image_key] for ex in examples])
    labels = np.array([ex[label_key] for ex in examples])
    return _dataset(name, images, labels, (declared, "from the TFDS ClassLabel"))


def _check_layout(where: str, images: Any, labels: Any) -> None:
    """Shape and dtype checks of images and labels, given as arrays or as ``.npy``/IDX headers
    (anything with ``shape`` and ``dtype``), so files are checked before their data is read."""
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) not in (3, 4):
        raise ValueError(f"{where}: images must be (N, H, W) or (N, H, W, C), got {shape}")
    if not (np.issubdtype(dtype, np.floating) or dtype == np.uint8):
        raise TypeError(f"{where}: images must be uint8 or floating, got {dtype.name}")
    label_shape = tuple(labels.shape)
    # Keras stores CIFAR labels as (N, 1).
    if not (len(label_shape) == 1 or (len(label_shape) == 2 and label_shape[1] == 1)):
        raise ValueError(f"{where}: labels must be (N,), got {label_shape}")
    if not np.issubdtype(np.dtype(labels.dtype), np.integer):
        raise TypeError(f"{where}: labels must be integers, got {np.dtype(labels.dtype).name}")
    if label_shape[0] != shape[0]:
        raise ValueError(
            f"{where}: {shape[0]} images but {label_shape[0]} labels; the counts must match"
        )
    if shape[0] == 0:
        raise ValueError(f"{where}: the split is empty")
    if 0 in shape[1:]:
        raise ValueError(f"{where}: images of shape {shape} are empty; H, W and C must be >= 1")


def _dataset(name: str, images: Any, labels: Any, declared: tuple[int, str] | None) -> Dataset:
    """Validates and canonicalizes images and labels (see :class:`Dataset` and :func:`load`).

    ``declared`` is ``(num_classes, where it comes from)``, or ``None`` to infer the count.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    where = f"{_LOAD}: {name!r}"
    _check_layout(where, images, labels)
    if images.ndim == 3:
        images = images[..., None]
    if labels.ndim == 2:
        labels = labels[:, 0]
    if images.dtype != np.uint8:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused
            images = images.astype(np.float32)
        finite = np.isfinite(images)
        if not finite.all():
            first = np.unravel_index(int(np.argmin(finite)), images.shape)
            raise ValueError(
                f"{where}: images hold {finite.size - int(finite.sum())} non-finite (NaN/Inf) "
                f"float32 pixel values, the first at images[{', '.join(map(str, first))}]; "
                "pixels must be finite"
            )
    num_classes = _num_classes(where, labels, declared)
    return Dataset(images, labels.astype(np.int32), num_classes, name)


def _num_classes(where: str, labels: np.ndarray, declared: tuple[int, str] | None) -> int:
    """The declared count, checked against the labels, or the inferred one, if plausible."""
    if declared is not None:
        count, origin = declared
        bad = (labels < 0) | (labels >= count)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{where}: labels must be in [0, {count}) (num_classes={count} {origin}), got "
                f"labels[{i}]={labels[i]}"
            )
        return count
    if (labels < 0).any():
        i = int(np.argmax(labels < 0))
        raise ValueError(f"{where}: labels must be >= 0, got labels[{i}]={labels[i]}")
    i = int(np.argmax(labels))
    count = int(labels[i]) + 1
    if count > MAX_CLASSES:
        raise ValueError(
            f"{where}: labels imply num_classes={count} (labels[{i}]={labels[i]}), more than "
            f"MAX_CLASSES={MAX_CLASSES}; pass num_classes= to load if that many is intended"
        )
    present = int(np.count_nonzero(np.bincount(labels.astype(np.int64), minlength=count)))
    if 2 * present < min(count, len(labels)):
        raise ValueError(
            f"{where}: labels imply num_classes={count} (labels[{i}]={labels[i]}), but "
            f"{count - present} of those classes have no example ({present} distinct labels "
            f"in {len(labels)} examples); pass num_classes= to load if that is intended"
        )
    return count


def _read_idx_split(directory: str, split: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{_LOAD}: IDX directory {directory!r} does not exist")
    paths = []
    for stem in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{_IDX_PREFIX[split]}-{stem}"
        candidates = [os.path.join(directory, name + ext) for ext in ("", ".gz")]
        found = [path for path in candidates if os.path.isfile(path)]
        if not found:
            raise FileNotFoundError(
                f"{_LOAD}: no {name} or {name}.gz in {directory!r} (split={split!r})"
            )
        paths.append(found[0])
    return read_idx_pair(*paths, functools.partial(_check_layout, f"{_LOAD}: {source!r}"))


def _read_npz_split(path: str, split: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    layouts = ((f"x_{split}", f"y_{split}"), ("images", "labels"))
    check = functools.partial(_check_layout, f"{_LOAD}: {source!r}")
    return read_npz_pair(_LOAD, path, layouts, check)
