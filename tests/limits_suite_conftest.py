"""limits' own storage tests, run against ``tally://``: this file becomes the ``conftest.py`` of the
tests unpacked from limits' sdist (``tests/test_limits_suite.py`` puts it there, in place of limits'
own, which starts its servers with Docker).  It replaces only the storage parametrisation: every test
that limits runs on each of its storages (``uri, args, fixture``, and ``expected_instance`` in
``TestConcreteStorages``) runs on one ``tally://`` storage instead, on the store that
``TALLY_SUITE_SETTINGS`` (JSON, the app's config) names; each test gets a fresh key prefix and
folder, as limits' fixtures flush their servers.  limits' asyncio tests are left out: ``tally://`` is
a synchronous storage.
"""

from __future__ import annotations

import inspect
import json
import os
import uuid

import flask
import pytest

import tally
from tally.ratelimits import TallyStorage

#: Tests that limits' interface lets a storage decline, and why tally:// does.
DECLINED = {
    "test_storage_reset": "reset() is optional in limits' interface; tally:// cannot list its limit keys"
}

SETTINGS = json.loads(os.environ.get("TALLY_SUITE_SETTINGS", "{}"))
VARIANT = os.environ.get("TALLY_SUITE_VARIANT", "")
#: The options each test gives ``storage_from_string("tally://", **ARGS)``: the counters of the
#: test's own app, set by ``fresh_store`` before the test runs.
ARGS: dict[str, object] = {}


def _is_storage_parametrisation(mark: pytest.Mark) -> bool:
    return mark.name == "parametrize" and "uri" in str(mark.args[0])


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    if "uri" not in metafunc.fixturenames:
        return
    for node in (metafunc.definition, metafunc.definition.parent):
        node.own_markers[:] = [mark for mark in node.own_markers if not _is_storage_parametrisation(mark)]
    if "expected_instance" in metafunc.fixturenames:
        names, values = "uri, args, expected_instance, fixture", ("tally://", ARGS, TallyStorage, None)
    else:
        names, values = "uri, args, fixture", ("tally://", ARGS, None)
    metafunc.parametrize(names, [pytest.param(*values, id=f"tally-{VARIANT}")])


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in DECLINED:
            item.add_marker(pytest.mark.skip(reason=DECLINED[item.originalname]))
    asynchronous = [item for item in items if inspect.iscoroutinefunction(getattr(item, "obj", None))]
    if asynchronous:
        config.hook.pytest_deselected(items=asynchronous)
        items[:] = [item for item in items if item not in asynchronous]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """A test limits itself marks ``flaky`` (``max_runs``, 2 by default: its own CI reruns them) runs
    again when it fails, up to that many runs; every other test must pass the first time.  The ones
    marked time a sleep's end to 30 ms, which a loaded 2-core machine overshoots now and then."""
    from _pytest.runner import runtestprotocol

    mark = item.get_closest_marker("flaky")
    if mark is None:
        return None
    runs = mark.kwargs.get("max_runs", 2)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for run in range(1, runs + 1):
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        if all(not report.failed for report in reports) or run == runs:
            break
        print(f"\nRERUN {item.nodeid}: limits marks it flaky (run {run} of {runs} failed)")
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.fixture(autouse=True)
def fresh_store(tmp_path):
    """A new app on the store for each test, under a key prefix (and folder) of its own."""
    app = flask.Flask("limits-suite", instance_path=str(tmp_path / "instance"))
    app.config.update(SETTINGS)
    app.config["COUNTER_KEY_PREFIX"] = f"ls{uuid.uuid4().hex[:12]}:"
    if "COUNTER_DIR" in SETTINGS:
        app.config["COUNTER_DIR"] = str(tmp_path / "counters")
        app.config["CACHE_DIR"] = str(tmp_path / "cache")
    ARGS["counters"] = tally.Counters(app)
    yield
    app.extensions["tally"].close()
