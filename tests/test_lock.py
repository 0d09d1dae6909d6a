"""The lock in requirements/: it satisfies every range of pyproject.toml, run.txt agrees with
dev.txt, and (``make test`` sets ``TALLY_LOCK``) the running environment holds exactly the lock, so a
release upstream cannot change what the suite tests."""

from __future__ import annotations

import importlib.metadata
import os
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(lock: Path) -> dict[str, str]:
    """``{name: version}`` of the lock's lines that apply to this interpreter (a universal lock may
    pin one distribution twice, for different Pythons)."""
    pinned = {}
    for line in lock.read_text().splitlines():
        if not line or line[0] in " #-":
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate():
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pinned[canonicalize_name(requirement.name)] = specifier.version
    return pinned


def ranges() -> list[tuple[str, Requirement]]:
    """Every requirement of the library and of each extra, with the extra it comes from."""
    found = [("", Requirement(text)) for text in PROJECT["dependencies"]]
    for extra, texts in PROJECT["optional-dependencies"].items():
        found += [(extra, Requirement(text)) for text in texts]
    return found


def test_the_lock_satisfies_every_range_of_pyproject():
    locked = pins(ROOT / "requirements" / "dev.txt")
    problems = []
    for extra, requirement in ranges():
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        version = locked.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement} ({extra or 'the library'}) is not in the lock")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement} ({extra or 'the library'}): the lock has {version}")
    assert problems == [], "run `make lock`:\n" + "\n".join(problems)


def test_the_run_lock_pins_what_the_dev_lock_pins():
    dev = pins(ROOT / "requirements" / "dev.txt")
    run = pins(ROOT / "requirements" / "run.txt")
    assert {name: (version, dev.get(name)) for name, version in run.items() if dev.get(name) != version} == {}


@pytest.mark.skipif("TALLY_LOCK" not in os.environ, reason="make test sets TALLY_LOCK, test-latest does not")
def test_the_environment_holds_exactly_the_lock():
    locked = pins(ROOT / os.environ["TALLY_LOCK"])
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist.version for dist in importlib.metadata.distributions()
    }
    installed.pop("flask-tally")
    differ = {
        name: (installed.get(name), locked.get(name))
        for name in installed.keys() | locked.keys()
        if installed.get(name) != locked.get(name)
    }
    assert differ == {}, f"installed, locked: {differ}"
