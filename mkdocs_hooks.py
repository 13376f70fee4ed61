"""MkDocs hooks for the mixjax site.

* Pages show the ``mixjax`` command's own ``--help`` text, so they never drift: a line
  ``<!-- mixjax-help: run -->`` becomes a code block holding the output of ``mixjax run --help``
  (``<!-- mixjax-help: -->`` for the top-level ``mixjax --help``).
* :class:`SphinxRoles`, a griffe extension (``mkdocs.yml``: mkdocstrings ``extensions``), renders
  the Sphinx roles and ``::`` literal-block markers the docstrings use as Markdown.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

import griffe

MARKER = re.compile(r"^<!-- mixjax-help:(?P<command>[ a-z]*)-->$", re.MULTILINE)
WIDTH = "100"  # argparse wraps help text at $COLUMNS


def _help(command: str) -> str:
    from mixjax import cli

    argv = [*command.split(), "--help"]
    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.build_parser().parse_args(argv)
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    text = out.getvalue().strip()
    if not text.startswith("usage:"):
        raise ValueError(f"mkdocs_hooks: `mixjax {' '.join(argv)}` printed no help: {text!r}")
    return f"```text\n$ mixjax {' '.join(argv)}\n{text}\n```"


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(lambda m: _help(m.group("command").strip()), markdown)


# :func:`name`, :class:`~pkg.mod.Name` (the ~ shows only the last component), :mod:`...`, ...
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc):`(?P<tilde>~?)(?P<target>[^`]+)`")
# A paragraph ending in "::" introduces an indented literal block, which Markdown renders as code
# too; Sphinx shows the "::" as ":". "Examples::" would become a Google section title, so it is
# reworded.
LITERAL_MARK = re.compile(r"(?m)(\S)::$")
EXAMPLES_MARK = re.compile(r"(?m)^(\s*)Examples::$")


def _role(match: re.Match) -> str:
    target = match.group("target")
    return f"`{target.rsplit('.', 1)[-1] if match.group('tilde') else target}`"


def markdown_docstring(text: str) -> str:
    text = EXAMPLES_MARK.sub(r"\1For example:", text)
    return LITERAL_MARK.sub(r"\1:", ROLE.sub(_role, text))


class SphinxRoles(griffe.Extension):
    """Rewrites every loaded docstring with :func:`markdown_docstring`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)
