"""Data: image-classification datasets in host memory, their preprocessing and batching.

* :mod:`~mixjax.data.loaders`: :func:`load` (the embedded digits, TFDS names, ``idx:DIR``,
  ``npz:FILE``) into a :class:`Dataset`;
* :mod:`~mixjax.data.preprocess`: :func:`normalize`;
* :mod:`~mixjax.data.batching`: :func:`batches`, :func:`stacked_batches`;
* :mod:`~mixjax.data.digits`: the embedded digits as a TFDS builder (imports TFDS; loaded only
  when the digits are).
"""

from mixjax.data.batching import batches, stacked_batches
from mixjax.data.loaders import SPLITS, Dataset, default_data_dir, load, read_idx
from mixjax.data.preprocess import normalize

__all__ = [
    "SPLITS",
    "Dataset",
    "batches",
    "default_data_dir",
    "load",
    "normalize",
    "read_idx",
    "stacked_batches",
]
