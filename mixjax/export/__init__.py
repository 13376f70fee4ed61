"""Export: compressed artifacts (packed integers, codebooks, sparse positions, Huffman) and
integer inference.

* :mod:`~mixjax.export.artifact`: :func:`compress`, :func:`save`, :func:`load` and the
  :class:`Artifact` container (zip or compact; checksummed, no pickle), read by
  :mod:`~mixjax.export.reading`, which checks every declared size against the bytes present
  before it allocates or inflates anything;
* :mod:`~mixjax.export.records`, :mod:`~mixjax.export.codebook`, :mod:`~mixjax.export.kinds`:
  the record of each leaf (``"array"``, ``"int"``, ``"codebook"``, ``"sparse"``) and the table of
  kinds;
* :mod:`~mixjax.export.huffman`, :mod:`~mixjax.export.positions`,
  :mod:`~mixjax.export.bitpack` (with :mod:`~mixjax.export.encoding`): Huffman and
  sparse-position coding, bit packing;
* :mod:`~mixjax.export.report`: :func:`table`, what each leaf costs;
* :mod:`~mixjax.export.integer` and :mod:`~mixjax.export.integer_run`: :func:`integer_model` and
  :func:`integer_apply`, every matmul,
  convolution and lookup of a model's integer weights (linen or NNX) as int8 x int8 -> int32,
  dequantized integer weights or integer table lookups, with the per-site :func:`integer_table`;
  :mod:`~mixjax.export.integer_choice`: which sites run int8, chosen by timing the model.
"""

from mixjax.export.artifact import CONTAINERS, Artifact, compress, load, save
from mixjax.export.integer import (
    InputQuant,
    IntModel,
    IntSite,
    IntWeight,
    SiteRow,
    integer_model,
    integer_table,
)
from mixjax.export.integer_run import integer_apply
from mixjax.export.report import LeafRow, Table, table

__all__ = [
    "CONTAINERS",
    "Artifact",
    "InputQuant",
    "IntModel",
    "IntSite",
    "IntWeight",
    "LeafRow",
    "SiteRow",
    "Table",
    "compress",
    "integer_apply",
    "integer_model",
    "integer_table",
    "load",
    "save",
    "table",
]
