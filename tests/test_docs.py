"""Consistency of docs/ with the package: every public module has an API page, every example a
section. (The site itself is built by `.ci/run` with `mkdocs build --strict`.)"""

import pathlib
import re
import types

import mixjax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_public_module_has_an_api_page():
    public = {n for n in mixjax.__all__ if isinstance(getattr(mixjax, n), types.ModuleType)}
    pages = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"^::: mixjax\.(\w+)$", pages, re.MULTILINE))
    assert public - documented == set()


def test_every_api_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {f"api/{p.name}" for p in (DOCS / "api").glob("*.md")}
    assert {p for p in pages if p not in nav} == set()


def test_every_example_is_on_the_examples_page():
    page = (DOCS / "examples.md").read_text()
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert {s for s in scripts if f'--8<-- "examples/{s}"' not in page} == set()
