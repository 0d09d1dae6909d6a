"""The library's shape: layers that go one way, and modules small enough to read.

``errors`` and ``names`` at the bottom, the stores above them, the extension above the stores; no
import circle in ``tally/``, counting imports made inside functions (which only hide a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TALLY = Path(__file__).resolve().parent.parent / "tally"
#: The longest a module of the library may grow.
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(TALLY.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(TALLY.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The tally modules ``name`` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            # ``from . import metrics`` imports the module, not the package's own names
            targets = submodules + ([base] if any(m not in known for m in submodules) else [])
        else:
            continue
        found.update(target for target in targets if target in known)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, set(known)) for name, path in known.items()}


def cycle_from(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    """An import path that leads from ``start`` back to it, if any."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for target in edges[node]:
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return None


def test_no_import_circle_in_the_library():
    edges = graph()
    circles = [path for name in edges if (path := cycle_from(name, edges))]
    assert not circles, circles[0]


@pytest.mark.parametrize("bottom", ["tally.errors", "tally.names"])
def test_the_bottom_layer_imports_nothing_above_it(bottom):
    assert graph()[bottom] <= {"tally.errors"}


def test_stores_and_metrics_do_not_import_the_layers_above_them():
    above = {"tally", "tally.config", "tally.extension", "tally.values", "tally.cli"}
    for name, targets in graph().items():
        if name.startswith("tally.stores") or name == "tally.metrics":
            assert not targets & above, (name, targets & above)


def test_no_module_of_the_library_is_over_600_lines():
    long = {
        name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
