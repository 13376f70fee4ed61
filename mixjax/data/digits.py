"""The embedded offline dataset: scikit-learn's handwritten digits as a TFDS builder.

scikit-learn ships the test set of the UCI "Optical Recognition of Handwritten Digits" data
(``sklearn.datasets.load_digits``): 1797 grey images of 8x8 pixels with values ``0..16``, classes
``0..9``. :class:`MixjaxDigits` serves them through TensorFlow Datasets, so they take the same
reading path as any TFDS dataset (``mixjax.data.load("digits")``) and need no network.

Features (``tfds.features.Tensor``, so preparing and reading need no TensorFlow):

* ``image``: ``(8, 8, 1)`` uint8, ``round(v * 255 / 16)`` of the original value ``v``, so
  ``0..16`` maps onto ``0..255``;
* ``label``: ``ClassLabel(num_classes=10)``, the digit.

Splits: a stratified 80/20 split drawn once with ``numpy.random.default_rng(SPLIT_SEED)``: within
each class, the examples are permuted and the first ``round(0.2 * class_count)`` go to ``test``.
That gives 1438 ``train`` and 359 ``test`` examples, the same on every machine. TFDS stores the
examples in an order fixed by a hash of their keys (the index in ``load_digits``), not in
``load_digits`` order.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["MixjaxDigits", "prepare", "scaled_digits", "split_indices"]

SPLIT_SEED = 0
TEST_FRACTION = 0.2
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """The stratified train/test split of the digits, as sorted indices into ``labels``.

    Args:
        labels: ``(N,)`` integer class ids.

    Returns:
        ``{"train": idx, "test": idx}``, disjoint ``int64`` index arrays covering ``0..N-1``.
    """
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test.append(members[: round(TEST_FRACTION * len(members))])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test)] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


def scaled_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as ``(images (N, 8, 8, 1) uint8 0..255, labels (N,) int64)``."""
    from sklearn.datasets import load_digits  # Only needed while preparing.

    raw = load_digits()
    images = np.round(raw.images * (255 / 16)).astype(np.uint8)[..., None]
    return images, raw.target.astype(np.int64)


class MixjaxDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder of scikit-learn's 8x8 handwritten digits (see the module docstring).

    Not registered in the TFDS catalogue (``tfds.builder("mixjax_digits")`` does not find the
    class); build it directly::

        builder = MixjaxDigits(data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare()
        source = builder.as_data_source(split="train")
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split of sklearn.datasets.load_digits, seed 0."}
    # TFDS looks for download checksums beside the builder's package; the data ships with
    # scikit-learn, so there are none, and the look-up fails for namespace or zipped packages.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships inside scikit-learn.
        images, labels = scaled_digits()
        return {
            split: self._generate_examples(images, labels, indices)
            for split, indices in split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare(data_dir: str) -> MixjaxDigits:
    """The digits builder with its data prepared in ``data_dir`` (written once, then reused)."""
    builder = MixjaxDigits(data_dir=data_dir, file_format="array_record")
    try:
        builder.download_and_prepare()
    except OSError:
        # Another process renamed its identical copy into place first, so TFDS failed to rename
        # ours over it: read theirs.
        builder = MixjaxDigits(data_dir=data_dir)
        if not builder.is_prepared():
            raise
    return builder
