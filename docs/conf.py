"""Sphinx configuration of Tally's documentation: Markdown pages (MyST) and the API from docstrings.

Build with ``make docs`` (or ``python -m sphinx -W --keep-going -b html docs docs/_build/html``);
every warning is an error.  Only the library, ``tally``, is imported: the demo app at the repository
root (``app.py``, ``common.py``, ``routes/``, ``settings.py``, ...) never is, and the build fails if
anything imports it.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # `tally` from this checkout, installed or not

project = "Tally"
release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# `[text](config.md#counter_timeout)`: anchors for headings down to ###, as GitHub makes them.
myst_heading_anchors = 3

# The docstrings are reST with double backticks; members are chosen page by page (api.md).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "alabaster"
html_title = f"Tally {release}"
html_theme_options = {"description": "Shared counters for Flask", "fixed_sidebar": True}


#: The demo's packages; its modules are the ``*.py`` files at the root (app.py, common.py, ...).
DEMO_PACKAGES = ("routes", "tests", "bench")


def _demo_modules() -> list[str]:
    """Modules loaded from the checkout outside ``tally/``: the demo app, which must not be imported."""
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        where = Path(path).resolve()
        if where.parent == ROOT or any(ROOT / part in where.parents for part in DEMO_PACKAGES):
            found.append(name)
    return sorted(found)


def _refuse_demo_imports(app, exception) -> None:
    if exception is None and (found := _demo_modules()):
        from sphinx.util import logging

        logging.getLogger(__name__).warning(
            "the docs build imported the demo app's modules %s; document only `tally`", ", ".join(found)
        )


def setup(app):
    app.connect("build-finished", _refuse_demo_imports)
