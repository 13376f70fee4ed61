"""Data: image-classification datasets and character-level text in host memory, their
preprocessing and batching.

* :mod:`~mixjax.data.loaders`: :func:`load` (the embedded digits, TFDS names, ``idx:DIR``,
  ``npz:FILE``) into a :class:`Dataset`, checked before it trains;
* :mod:`~mixjax.data.files`: the IDX and ``.npz`` readers behind it, headers checked first
  (:func:`read_idx`);
* :mod:`~mixjax.data.preprocess`: :func:`normalize`;
* :mod:`~mixjax.data.batching`: :func:`batches`, :func:`stacked_batches`;
* :mod:`~mixjax.data.text`: :func:`load_text` (``text:FILE``, splits ``"train"`` / ``"val"``)
  into a :class:`TextDataset` with its character vocabulary, :func:`encode`, :func:`decode`,
  and next-token windows: :func:`lm_batches`, :func:`stacked_lm_batches`,
  :func:`lm_eval_batches`;
* :mod:`~mixjax.data.digits`: the embedded digits as a TFDS builder (imports TFDS; loaded only
  when the digits are).
"""

from mixjax.data.batching import batches, stacked_batches
from mixjax.data.files import read_idx
from mixjax.data.loaders import MAX_CLASSES, SPLITS, Dataset, default_data_dir, load
from mixjax.data.preprocess import normalize
from mixjax.data.text import (
    MAX_VOCAB,
    TEXT_SPLITS,
    TextDataset,
    decode,
    encode,
    lm_batches,
    lm_eval_batches,
    load_text,
    stacked_lm_batches,
)

__all__ = [
    "MAX_CLASSES",
    "MAX_VOCAB",
    "SPLITS",
    "TEXT_SPLITS",
    "Dataset",
    "TextDataset",
    "batches",
    "decode",
    "default_data_dir",
    "encode",
    "lm_batches",
    "lm_eval_batches",
    "load",
    "load_text",
    "normalize",
    "read_idx",
    "stacked_batches",
    "stacked_lm_batches",
]
