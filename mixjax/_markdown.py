"""Markdown tables: the one writer behind every table mixjax prints (sparsity, artifact sizes).

Cells are written as text with ``|`` escaped and non-printable characters (newlines, ANSI
escape sequences) shown as Python escapes, so a leaf name can never break a row or forge one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["cell", "table"]


def cell(value: Any) -> str:
    """``value`` as one table cell: ``str(value)``, ``|`` escaped, non-printables as escapes."""
    text = str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text.replace("|", "\\|"))


def table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table.

    Args:
      columns: ``(title, align)`` per column, ``align`` ``"<"`` (left) or ``">"`` (right).
      rows: one sequence of cell values per row, as many as there are columns.

    Returns:
      The header, the alignment row and one line per row, joined by newlines.

    Raises:
      ValueError: an unknown ``align`` or a row of the wrong length.
    """
    rules = {"<": "---", ">": "---:"}
    if any(align not in rules for _, align in columns):
        raise ValueError(f"mixjax._markdown.table: align must be '<' or '>', got {columns}")
    lines = [
        "| " + " | ".join(cell(title) for title, _ in columns) + " |",
        "|" + "|".join(rules[align] for _, align in columns) + "|",
    ]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(
                f"mixjax._markdown.table: a row of {len(row)} cells for {len(columns)} columns"
            )
        lines.append("|" + "|".join(f" {c} " if c else " " for c in map(cell, row)) + "|")
    return "\n".join(lines)
