"""The library's annotations hold: ``mypy --strict tally`` finds nothing (the wheel ships ``py.typed``,
so apps type-check against them).  The settings are pyproject's ``[tool.mypy]``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_mypy_strict_finds_nothing_in_the_library():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "tally"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mypy --strict tally:\n{result.stdout}{result.stderr}"
