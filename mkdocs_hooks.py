"""MkDocs hooks for the mixjax site.

* Pages show the ``mixjax`` command's own ``--help`` text, so they never drift: a line
  ``<!-- mixjax-help: run -->`` becomes a code block holding the output of ``mixjax run --help``
  (``<!-- mixjax-help: -->`` for the top-level ``mixjax --help``).
* ``<!-- mixjax-api-index -->`` becomes the table of every public name (the ``__all__`` of
  ``mixjax`` and of each family) with the module that defines it (:func:`api_index`).
* :class:`SphinxRoles`, a griffe extension (``mkdocs.yml``: mkdocstrings ``extensions``), renders
  the Sphinx roles and ``::`` literal-block markers the docstrings use as Markdown.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import types
from typing import Any

import griffe

MARKER = re.compile(r"^<!-- mixjax-help:(?P<command>[ a-z]*)-->$", re.MULTILINE)
WIDTH = "100"  # argparse wraps help text at $COLUMNS


def _help(command: str) -> str:
    from mixjax.app import cli

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


API_INDEX = "<!-- mixjax-api-index -->"


def _home(obj: Any, default: str) -> str:
    """The module that defines ``obj`` (itself for a module), else ``default``."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module = getattr(obj, "__module__", None)
    return module if isinstance(module, str) and module.startswith("mixjax") else default


def api_index() -> str:
    """A markdown table: each public name of ``mixjax`` and of its families, and its module."""
    import mixjax

    rows = []
    packages = [mixjax] + [
        getattr(mixjax, name)
        for name in mixjax.__all__
        if isinstance(getattr(mixjax, name), types.ModuleType)
    ]
    for package in packages:
        for name in package.__all__:
            obj = getattr(package, name)
            if isinstance(obj, types.ModuleType):
                kind = "family" if package is mixjax else "module"
                rows.append((f"{package.__name__}.{name}", f"{obj.__name__} ({kind})"))
                continue
            rows.append((f"{package.__name__}.{name}", _home(obj, package.__name__)))
    lines = ["| name | defined in |", "|---|---|"]
    lines += [f"| `{name}` | `{home}` |" for name, home in rows]
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs) -> str:
    if API_INDEX in markdown:
        markdown = markdown.replace(API_INDEX, api_index())
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
