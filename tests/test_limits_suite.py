"""limits' own tests of its storages pass on ``tally://``, on every store.

The tests come from the sdist of the limits release installed here (the lock's, in ``make test``),
downloaded from PyPI at test time and checked against the index's SHA-256; nothing of them is kept
in this repository.  Taken: ``tests/test_strategy.py`` (the three strategies),
``tests/test_storage.py::TestConcreteStorages`` and ``tests/integration/test_concurrency.py``.
``tests/limits_suite_conftest.py`` replaces only their storage parametrisation (and their
``pytest.ini``'s plugin options: coverage, asyncio).  Each store's run is a pytest process of its
own, all started together: the tests mostly wait for windows to pass.

Skipped by limits' own rules, and why that is right for ``tally://``:
``test_storage_reset`` (``reset()`` is optional in limits' interface: a store cannot list its limit
keys apart from everything else, as limits' memcached storage cannot).
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import IN_PROCESS_TIMEOUT, VARIANTS
from tests.limits_suite_conftest import DECLINED

HERE = Path(__file__).resolve().parent
SIMPLE_INDEX = "https://pypi.org/simple/limits/"
SUITE = (
    "tests/test_strategy.py",
    "tests/test_storage.py::TestConcreteStorages",
    "tests/integration/test_concurrency.py",
)
RUN_TIMEOUT = 300


def download_sdist(version: str) -> bytes:
    """limits' sdist of ``version`` from PyPI's simple index (JSON form), its SHA-256 checked."""
    request = urllib.request.Request(SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        files = json.load(answer)["files"]
    (entry,) = [file for file in files if file["filename"] == f"limits-{version}.tar.gz"]
    with urllib.request.urlopen(entry["url"], timeout=120) as answer:
        data = answer.read()
    assert hashlib.sha256(data).hexdigest() == entry["hashes"]["sha256"], "limits' sdist fails its hash"
    return data


@pytest.fixture(scope="module")
def limits_tests(tmp_path_factory) -> Path:
    """The unpacked sdist, its conftest replaced by ours and its pytest.ini kept but for plugins."""
    version = importlib.metadata.version("limits")
    root = tmp_path_factory.mktemp("limits-sdist")
    with tarfile.open(fileobj=io.BytesIO(download_sdist(version))) as archive:
        archive.extractall(root, filter="data")
    source = root / f"limits-{version}"
    if not all((source / "tests" / name).exists() for name in ("utils.py", "test_strategy.py")):
        pytest.skip(f"the sdist of limits {version} ships no whole test suite (5.0.0's, for one)")
    (source / "tests" / "conftest.py").write_text((HERE / "limits_suite_conftest.py").read_text())
    markers, warnings = limits_pytest_settings(source)
    markers += ["flaky: limits' own mark: run again on failure, up to max_runs", "asyncio: left out here"]
    ini = configparser.ConfigParser(interpolation=None)
    ini["pytest"] = {"markers": "\n".join(markers), "filterwarnings": "\n".join(warnings)}
    with open(source / "pytest.ini", "w") as out:  # over pyproject.toml's, where a release keeps it
        ini.write(out)
    return source


def limits_pytest_settings(source: Path) -> tuple[list[str], list[str]]:
    """The markers and warning filters of limits' own pytest settings (pytest.ini, setup.cfg or
    pyproject.toml, as the release keeps them); the rest (coverage, asyncio, reruns: plugins not
    installed here) is left."""
    options: dict = {}
    for name, section in (("pytest.ini", "pytest"), ("setup.cfg", "tool:pytest")):
        ini = configparser.ConfigParser(interpolation=None)
        ini.read(source / name)
        if ini.has_section(section):
            options = {
                key: [line for line in value.splitlines() if line] for key, value in ini[section].items()
            }
            break
    else:
        pyproject = tomllib.loads((source / "pyproject.toml").read_text())
        options = pyproject.get("tool", {}).get("pytest", {}).get("ini_options", {})
    return list(options.get("markers", [])), list(options.get("filterwarnings", []))


def start_run(source: Path, variant: str, settings: dict, basetemp: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "TALLY_SUITE_VARIANT": variant,
        "TALLY_SUITE_SETTINGS": json.dumps(settings),
        "PYTHONPATH": str(source),
    }
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "-rfEs"]
    shipped = [part for part in SUITE if (source / part.split("::")[0]).exists()]  # older sdists ship fewer
    command += [f"--basetemp={basetemp}", *shipped]
    return subprocess.Popen(
        command,
        cwd=source,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ahead_of_the_load,
    )


def ahead_of_the_load() -> None:
    """A higher priority for the suite's processes, where the user may set one (root): limits' tests
    give a few steps 100 ms at a window's edge, and on two cores shared with the load tests a process
    at the default priority can wait longer than that for a core.  They sleep most of the time, so
    the priority costs the load tests nothing measurable."""
    if os.geteuid() == 0:
        os.nice(-10)


def outcome(output: str) -> tuple[dict[str, int], list[str]]:
    """The counts of pytest's closing line, and the names of the tests it skipped."""
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", output)}
    skipped = re.findall(r"^SKIPPED \[\d+\] (\S+?):\d+: (.*)$", output, re.MULTILINE)
    return counts, [f"{where}: {why}" for where, why in skipped]


#: make stress runs the suite this many rounds (make test: 1), each on fresh keys.
STRESS_ROUNDS = int(os.environ.get("TALLY_STRESS_ROUNDS", "1"))


# limits' tests time windows to 10-200 ms: with the load tests, one at a time (not marked light).
@pytest.mark.slow
@pytest.mark.parametrize("round_", range(STRESS_ROUNDS))
def test_limits_own_storage_tests_pass_on_every_store(limits_tests, store_settings, tmp_path, round_):
    # Every server up first; the in-process tests' timeout: a step beside other tests may pass 0.5 s.
    settings = {
        variant: {**store_settings(variant), "COUNTER_TIMEOUT": IN_PROCESS_TIMEOUT} for variant in VARIANTS
    }
    runs: dict[str, subprocess.Popen] = {}
    try:
        for variant in VARIANTS:
            runs[variant] = start_run(limits_tests, variant, settings[variant], tmp_path / variant)
        problems = [problem for variant, run in runs.items() if (problem := judge(variant, run))]
    finally:
        for run in runs.values():
            run.kill()
            run.wait()
    assert problems == [], "\n\n".join(problems)


def judge(variant: str, run: subprocess.Popen) -> str | None:
    """What is wrong with one store's run: no result in time, a failure, or a skip not declared."""
    try:
        output, _ = run.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"{variant}: no result within {RUN_TIMEOUT} s"
    counts, skipped = outcome(output)
    unexpected = [line for line in skipped if not any(reason in line for reason in DECLINED.values())]
    if run.returncode != 0 or counts.get("passed", 0) < 15 or unexpected:  # test_strategy.py alone: 18
        return f"{variant}: exit {run.returncode}, {counts}\n{output[-6000:]}"
    return None
