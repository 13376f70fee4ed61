"""The per-leaf size table of an artifact: :func:`table`."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from mixjax import _markdown
from mixjax.export import kinds, records
from mixjax.export.artifact import Artifact

__all__ = ["LeafRow", "Table", "row_dict", "table"]


class LeafRow(NamedTuple):
    """One row of :func:`table`.

    Attributes:
      path: the leaf's path.
      shape: its shape.
      kind: its record kind (``"codebook"``, ``"int"``, ``"array"``, ...).
      sparsity: fraction of exact zeros in the decoded leaf.
      clusters: distinct values of a ``"codebook"`` record, else ``None``.
      bits: bits per stored code (codebook index, integer code, or array element).
      huffman: whether any of its streams is Huffman-coded.
      bytes_before: float32 bytes of the leaf (4 per element).
      bytes_after: bytes of the record's arrays (file container overhead excluded).
    """

    path: str
    shape: tuple[int, ...]
    kind: str
    sparsity: float
    clusters: int | None
    bits: int
    huffman: bool
    bytes_before: int
    bytes_after: int

    @property
    def ratio(self) -> float:
        """``bytes_before / bytes_after``."""
        return self.bytes_before / max(self.bytes_after, 1)


class Table(NamedTuple):
    """Per-leaf sizes of an artifact.

    Attributes:
      rows: one :class:`LeafRow` per leaf.
      file_bytes: the artifact's ``nbytes`` (the whole file).
      markdown: the rows and a total line as a markdown table.
    """

    rows: tuple[LeafRow, ...]
    file_bytes: int
    markdown: str


def _uses_huffman(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("codec") == "huffman" or any(_uses_huffman(v) for v in node.values())
    return False


def _bits(record: records.Record, leaf: np.ndarray, arrays: Any) -> int:
    """Bits per stored code, from the fields the record's decoder checked."""
    if record["kind"] in ("int", "codebook"):
        return int(record["bits"])
    if record["kind"] == "array":
        return 8 * records.field(record, "data", arrays).dtype.itemsize
    return 8 * leaf.dtype.itemsize


def table(artifact: Artifact) -> Table:
    """Per-leaf sizes of an :class:`~mixjax.export.Artifact` (any record kinds).

    Returns:
      A :class:`Table`: per leaf its shape, kind, sparsity, clusters, bits, bytes before
      (float32) and after (its arrays), ratio; then the totals of the weights alone and of the
      whole file (with container overhead: manifest, headers, checksums).

    Raises:
      ValueError: a record that does not decode (never for an artifact :func:`load` read).
    """
    rows = []
    for record in artifact.leaves:
        leaf = kinds.decode(record, artifact.arrays)  # validates every field read below
        rows.append(
            LeafRow(
                record["path"],
                tuple(leaf.shape),
                record["kind"],
                float(np.mean(leaf == 0)) if leaf.size else 0.0,
                record["clusters"] if record["kind"] == "codebook" else None,
                _bits(record, leaf, artifact.arrays),
                _uses_huffman(record),
                4 * leaf.size,
                records.record_nbytes(record, artifact.arrays),
            )
        )
    before = sum(r.bytes_before for r in rows)
    after = sum(r.bytes_after for r in rows)
    columns = [
        ("leaf", "<"),
        ("shape", "<"),
        ("kind", "<"),
        ("sparsity", ">"),
        ("clusters", ">"),
        ("bits", ">"),
        ("huffman", "<"),
        ("f32 B", ">"),
        ("bytes", ">"),
        ("ratio", ">"),
    ]
    lines = [
        (
            r.path,
            "x".join(map(str, r.shape)) or "()",
            r.kind,
            f"{r.sparsity:.1%}",
            r.clusters or "-",
            r.bits,
            "yes" if r.huffman else "no",
            r.bytes_before,
            r.bytes_after,
            f"{r.ratio:.1f}x",
        )
        for r in rows
    ]
    blank = ("",) * 6
    lines.append(("**weights**", *blank, before, after, f"{before / max(after, 1):.1f}x"))
    lines.append(
        (
            f"**file** ({artifact.container})",
            *blank,
            before,
            artifact.nbytes,
            f"{before / artifact.nbytes:.1f}x",
        )
    )
    return Table(tuple(rows), artifact.nbytes, _markdown.table(columns, lines))


def row_dict(row: LeafRow) -> dict[str, Any]:
    """A :class:`LeafRow` as a JSON-able dict (``report.json``, ``mixjax report --json``)."""
    return {**row._asdict(), "shape": list(row.shape)}
