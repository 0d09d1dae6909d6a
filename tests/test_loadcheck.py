"""``flask counters loadcheck``: it passes a correct counter, catches a racy one, and says why."""

from __future__ import annotations

import pytest

from tests.conftest import settings_env
from tests.servers import free_port

# The checker's verdicts: exact counts, duplicates (more likely beside other load, not less), exit codes.
pytestmark = [pytest.mark.slow, pytest.mark.light]


def loadcheck(runner, *args: str):
    return runner.invoke(args=["counters", "loadcheck", *args])


@pytest.fixture
def cli(make_app, store_settings):
    return make_app(store_settings("filesystem")).test_cli_runner()


@pytest.fixture
def small_server(serve, store_settings):
    """Tally on the filesystem store under gunicorn, 2 workers x 4 threads."""
    return serve(settings_env(store_settings("filesystem")), workers=2, threads=4)


def test_a_correct_counter_passes_with_exit_0(cli, serve, store_settings):
    server = serve(settings_env(store_settings("filesystem")), workers=4, threads=8)
    result = loadcheck(cli, server.url, "--clients", "40", "--requests", "25", "--name", "checked")
    assert result.exit_code == 0, result.output
    assert "duplicates       0" in result.output
    assert "gaps             0 (of 1 .. 1000)" in result.output
    assert "verdict          OK" in result.output


def test_the_start_value_is_read_first(cli, small_server):
    assert (
        loadcheck(cli, small_server.url, "--clients", "5", "--requests", "4", "--name", "again").exit_code
        == 0
    )
    result = loadcheck(cli, small_server.url, "--clients", "5", "--requests", "4", "--name", "again")
    assert result.exit_code == 0, result.output
    assert "start value      20\n" in result.output
    assert "gaps             0 (of 21 .. 40)" in result.output


def test_a_global_variable_fails_with_duplicates_and_exit_1(cli, serve):
    server = serve({}, workers=4, threads=8, app="naive_app:app", use_project_config=False)
    result = loadcheck(
        cli, server.url, "--path", "/global/{name}/incr", "--clients", "50", "--requests", "20"
    )
    assert result.exit_code == 1
    duplicates = int(result.output.split("duplicates")[1].split()[0])
    assert duplicates > 0
    assert "FAILED" in result.output


def test_a_closed_port_is_not_a_race_but_could_not_test_with_exit_2(cli):
    url = f"http://127.0.0.1:{free_port()}"
    result = loadcheck(cli, url, "--clients", "3", "--requests", "2", "--timeout", "2")
    assert result.exit_code == 2, result.output
    assert "ConnectionRefusedError: 6" in result.output
    assert "responses        6 sent; none" in result.output
    assert "NOT TESTED: no request got an answer" in result.output and "FAILED" not in result.output


def test_a_wrong_route_is_not_tested_with_exit_2(cli, small_server):
    result = loadcheck(cli, small_server.url + "/no/such/route", "--clients", "2", "--requests", "2")
    assert result.exit_code == 2, result.output
    assert "answered 404" in result.output


def test_a_url_with_a_path_tests_that_path(cli, small_server):
    result = loadcheck(cli, small_server.url + "/api/counters/mine/incr", "--clients", "4", "--requests", "5")
    assert result.exit_code == 0, result.output
    assert "gaps             0 (of 1 .. 20)" in result.output
    with __import__("urllib.request").request.urlopen(small_server.url + "/api/counters/mine") as reply:
        assert __import__("json").load(reply)["value"] == 20  # that route's counter, not a loadcheck-... one
    both = loadcheck(cli, small_server.url + "/api/counters/mine/incr", "--path", "/x")
    assert both.exit_code == 2 and "give one or the other" in both.output


def test_python_m_tally_loadcheck_works_without_flask(small_server):
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tally.loadcheck",
            small_server.url + "/api/counters/m/incr",
            "--clients",
            "3",
            "--requests",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict          OK" in done.stdout
    helped = subprocess.run(
        [sys.executable, "-m", "tally.loadcheck", "--help"], capture_output=True, text=True
    )
    assert (
        helped.returncode == 0
        and "Exit 0: correct; 1: a race was found; 2: it could not test" in helped.stdout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["ftp://example"], "give a URL such as http://127.0.0.1:8000"),
        (["127.0.0.1:8000"], "give a URL"),
        (["http://127.0.0.1:1", "--path", "no-slash"], "must start with /"),
        (["http://127.0.0.1:1", "--clients", "0"], "--clients"),
        (["http://127.0.0.1:1", "--requests", "-5"], "--requests"),
        (["http://127.0.0.1:1", "--timeout", "0"], "--timeout"),
    ],
)
def test_bad_arguments_get_a_clear_message(cli, args, message):
    result = loadcheck(cli, *args)
    assert result.exit_code == 2
    assert message in result.output


def test_values_outside_the_expected_range_are_reported(cli, small_server):
    """A counter that starts from another value than the one given (here: told 100, it is at 0)."""
    result = loadcheck(cli, small_server.url, "--clients", "4", "--requests", "5", "--start", "100")
    assert result.exit_code == 1, result.output
    assert "out of range     20" in result.output
    assert "gaps             20 (of 101 .. 120)" in result.output
    assert "FAILED" in result.output


def test_the_deadline_stops_the_run_and_what_was_sent_is_checked(cli, small_server):
    result = loadcheck(cli, small_server.url, "--clients", "4", "--requests", "100000", "--deadline", "1")
    assert result.exit_code == 0, result.output
    sent = int(result.output.split("responses")[1].split()[0])
    assert 0 < sent < 400_000
    assert f"gaps             0 (of 1 .. {sent})" in result.output
    assert "latency          p50 " in result.output and " ms, p99 " in result.output
