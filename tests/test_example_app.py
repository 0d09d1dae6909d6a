"""Tally in someone else's Flask app, installed from the built wheel into a fresh virtual environment.

The wheel holds the library `tally` and nothing else at the top level; the example app
(tests/example_app: `common.py` with `cache = Cache()` and `counters = Counters(cache)`,
`cache.init_app(app, config={...})`, no Tally setting at all) runs from a copy outside the checkout
under gunicorn 4x8, and 100 clients x 20 increments get exactly 1..2000 on every shared store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tally.loadcheck import run_load
from tests.servers import ROOT, Gunicorn, free_port
from tests.test_ratelimits import post_concurrently

# The wheel built and installed, then the example app served: what it answers, no timing.
pytestmark = [pytest.mark.slow, pytest.mark.light]

EXAMPLE = ROOT / "tests" / "example_app"
DEMO_MODULES = ("app", "common", "settings", "commands", "sessions", "routes")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the files git knows: an in-tree build would leave build/ in the checkout
    and could pack a stale file from an earlier build."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    source = tmp_path_factory.mktemp("source")
    for name in (path.decode() for path in listed if path):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    build = [*UV, "build", "-q", "--wheel", "--build-constraints", running_versions(source), "-o", out]
    subprocess.run([*build, source], check=True, env={**os.environ, "TMPDIR": str(out.parent)})
    (built,) = out.glob("flask_tally-*.whl")
    return built


#: uv, from the running environment (the lock puts it there): it installs in seconds what pip takes
#: most of a minute for.
UV = [sys.executable, "-m", "uv"]


def running_versions(folder: Path) -> Path:
    """A constraints file of every distribution installed here: the fresh venv gets the versions the
    suite runs on (the lock in make test, the newest or the oldest in test-latest and test-oldest),
    never what was released this morning."""
    from importlib.metadata import distributions

    pinned = sorted(f"{d.metadata['Name']}=={d.version}" for d in distributions())
    path = folder / "running-versions.txt"
    path.write_text("\n".join(pinned) + "\n")
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh virtual environment with only the wheel, its memcached, redis and limits extras,
    gunicorn and Flask-Limiter."""
    home = tmp_path_factory.mktemp("venv")
    subprocess.run([*UV, "venv", "-q", "--python", sys.executable, home], check=True)
    install = [*UV, "pip", "install", "-q", "--python", home / "bin" / "python"]
    constraints = ["-c", running_versions(home.parent)]
    wanted = [f"{wheel}[memcached,redis,limits]", "gunicorn", "flask-limiter"]
    subprocess.run([*install, *constraints, *wanted], check=True)
    return home


def test_the_wheel_holds_the_library_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"tally", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert "tally/py.typed" in names
    assert "tally/stores/memcached_client.py" in names
    assert not any(name.split("/")[-1] in ("settings.toml", "index.html") for name in names)


def test_installing_the_wheel_adds_no_demo_module(venv, tmp_path):
    probe = "import importlib.util, tally; print(tally.__file__); " + "; ".join(
        f"print({name!r}, importlib.util.find_spec({name!r}) is not None)" for name in DEMO_MODULES
    )
    out = subprocess.run(
        [venv / "bin" / "python", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0].startswith(str(venv))  # the installed library, not the checkout
    assert all(line.endswith("False") for line in out[1:]), out


@pytest.fixture
def example_dir(tmp_path) -> Path:
    """A copy of the example app outside the checkout, so that only the installed `tally` is found."""
    target = tmp_path / "example"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("__pycache__", "instance"))
    return target


class ExampleServer(Gunicorn):
    def __init__(self, venv: Path, directory: Path, env: dict[str, str]) -> None:
        super().__init__(env, instance_path=str(directory / "instance"))
        self.venv = venv
        self.directory = directory

    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "gunicorn"), "-c", "gunicorn.conf.py", "app:app"]

    def start(self) -> ExampleServer:
        self.env = {**self.env, "EXAMPLE_BIND": self.address, "PYTHONPATH": ""}
        os.makedirs(self.instance_path, exist_ok=True)
        self.log_path = os.path.join(self.instance_path, "gunicorn.log")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.directory, env=user_environment(self.env), stdout=log, stderr=log
            )
        from tests.servers import wait_for_port

        wait_for_port(self.port, self.process, timeout=30)
        self.wait_ready()
        return self


@pytest.mark.parametrize("store", ["filesystem", "memcached", "redis", "seed-spelling"])
def test_the_example_app_counts_exactly_under_gunicorn(venv, example_dir, store, request, tmp_path):
    env = {"EXAMPLE_STORE": store, "EXAMPLE_CACHE_DIR": str(tmp_path / "page-cache")}
    if store == "memcached":
        env["EXAMPLE_MEMCACHED"] = request.getfixturevalue("memcached_server").address
    if store == "redis":
        env["EXAMPLE_REDIS_URL"] = request.getfixturevalue("redis_server").url.replace("/0", "/3")
    server = ExampleServer(venv, example_dir, env)
    try:
        server.start()
        report = run_load(f"{server.url}/hits", clients=100, requests=20, keepalive=False)
    finally:
        server.stop()
    assert report.errors == {} and report.ok == 2000, (
        report.statuses,
        report.errors,
        server.log_text()[-2000:],
    )
    assert report.exact(start=0)
    if store in ("filesystem", "seed-spelling"):
        # the counters live in the instance folder, never in CACHE_DIR, which cachelib prunes
        assert (example_dir / "instance" / "counters").is_dir()


@pytest.mark.parametrize("store", ["filesystem", "redis"])
def test_the_example_apps_limit_holds_across_its_workers(venv, example_dir, store, request, tmp_path):
    """The README's Flask-Limiter lines on ``tally://``, from the wheel, under gunicorn 4x8: 120
    concurrent POSTs against "20 per minute" give exactly 20 x 200 and 100 x 429."""
    env = {
        "EXAMPLE_STORE": store,
        "EXAMPLE_CACHE_DIR": str(tmp_path / "page-cache"),
        "EXAMPLE_LIMIT": "20 per minute",
    }
    if store == "redis":
        env["EXAMPLE_REDIS_URL"] = request.getfixturevalue("redis_server").url.replace("/0", "/4")
    server = ExampleServer(venv, example_dir, env)
    try:
        server.start()
        statuses = post_concurrently(f"{server.url}/limited", 120)
    finally:
        server.stop()
    assert (statuses.count(200), statuses.count(429)) == (20, 100), (statuses, server.log_text()[-2000:])


def user_environment(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without the checkout's settings (FLASK_*, TALLY_*, PYTHONPATH), as
    a user's shell would have it, with ``env`` on top."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "TALLY_"))}
    return {**kept, "PYTHONPATH": "", **env}


def in_venv(venv: Path, directory: Path, program: str, *args: str, env: dict[str, str], timeout: float = 120):
    """``program`` of the venv (python, flask) run with ``args`` in ``directory``, output captured."""
    return subprocess.run(
        [venv / "bin" / program, *args],
        cwd=directory,
        env=user_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_in_venv(venv: Path, directory: Path, code: str, env: dict[str, str]) -> str:
    done = in_venv(venv, directory, "python", "-c", code, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_example_app_answers_tallys_errors_itself(venv, example_dir, tmp_path):
    """From the wheel, in an app with no error handler of its own: the store down is a 503 JSON, a
    bad name a 400 JSON, and a forgotten init_app says to call it."""
    env = {"EXAMPLE_STORE": "redis", "EXAMPLE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    code = (
        "import json; from app import app\n"
        "client = app.test_client()\n"
        "for path in ('/hits', '/named/bad%20name'):\n"
        "    response = client.post(path)\n"
        "    print(response.status_code, response.mimetype, response.get_json()['error'])\n"
        "from forgot import app as forgot\n"
        "forgot.testing = True  # the exception itself, not Flask's 500 page\n"
        "try:\n"
        "    forgot.test_client().post('/hits')\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    lines = run_in_venv(venv, example_dir, code, env).splitlines()
    assert lines[0] == "503 application/json store_unavailable", lines
    assert lines[1] == "400 application/json invalid_name", lines
    assert lines[2].startswith("NotSetUp ") and "counters.init_app(app)" in lines[2], lines


def test_the_cli_and_the_load_checker_come_with_the_wheel(venv, example_dir, tmp_path):
    env = {"EXAMPLE_STORE": "filesystem", "EXAMPLE_CACHE_DIR": str(tmp_path / "page-cache")}
    listed = in_venv(venv, example_dir, "flask", "--app", "app", "counters", "--help", env=env, timeout=60)
    assert listed.returncode == 0 and "loadcheck" in listed.stdout, listed.stdout + listed.stderr
    closed_port = f"http://127.0.0.1:{free_port()}/hits"
    load = ("--clients", "2", "--requests", "2", "--timeout", "2")
    closed = in_venv(
        venv, tmp_path, "python", "-m", "tally.loadcheck", closed_port, *load, env=env, timeout=60
    )
    assert closed.returncode == 2 and "NOT TESTED" in closed.stdout, closed.stdout + closed.stderr
    server = ExampleServer(venv, example_dir, env)
    try:
        server.start()
        load = ("--clients", "10", "--requests", "10")
        checked = in_venv(
            venv,
            example_dir,
            "flask",
            "--app",
            "app",
            "counters",
            "loadcheck",
            f"{server.url}/hits",
            *load,
            env=env,
        )
    finally:
        server.stop()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"POST {server.url}/hits" in checked.stderr  # the route given, not /api/counters/...
    assert "gaps             0 (of 1 .. 100)" in checked.stdout
