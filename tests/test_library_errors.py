"""Tally's errors in an app that is not Tally's: answered with their status by the handler ``init_app``
registers (JSON, or HTML for a browser), unless the app has its own or turns it off; and clear
errors for the usual mistakes (a forgotten ``init_app``, a bad client id, no memcached servers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask, jsonify

from tally import Counters, InvalidAmount, InvalidName, NotSetUp, StoreUnavailable, TallyError
from tests.servers import free_port

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def seed_app(tmp_path: Path, *, own_handler: str = "", **config) -> tuple[Flask, Counters]:
    """The README's app: ``Counters(app)``, one route that counts, one that counts by name."""
    app = Flask("someone_elses_app", instance_path=str(tmp_path / "instance"))
    app.config.update(config)
    if own_handler == "before":

        @app.errorhandler(TallyError)
        def mine(error):
            return jsonify(mine=error.code), 418

    counters = Counters(app)
    if own_handler == "after":

        @app.errorhandler(StoreUnavailable)
        def mine_after(error):
            return jsonify(mine=error.code), 418

    @app.post("/hits")
    def hits():
        return jsonify(value=counters.incr("hits"))

    @app.post("/named/<name>")
    def named(name):
        return jsonify(value=counters.incr(name))

    return app, counters


def down(tmp_path: Path, **config) -> tuple[Flask, Counters]:
    url = f"redis://127.0.0.1:{free_port()}/0"
    return seed_app(tmp_path, CACHE_TYPE="RedisCache", CACHE_REDIS_URL=url, COUNTER_TIMEOUT=0.5, **config)


def test_an_unreachable_store_is_a_503_json_and_a_page_for_a_browser(tmp_path):
    app, _ = down(tmp_path)
    client = app.test_client()
    response = client.post("/hits")
    assert response.status_code == 503 and response.is_json
    assert response.get_json()["error"] == "store_unavailable"
    assert "127.0.0.1" not in response.get_data(as_text=True)  # no server named in a public answer
    page = client.post("/hits", headers={"Accept": BROWSER})
    assert page.status_code == 503 and page.mimetype == "text/html"
    assert "store unavailable" in page.get_data(as_text=True)
    assert client.post("/hits", headers={"Accept": "*/*"}).is_json  # curl's: JSON


def test_a_bad_name_is_a_400_json(tmp_path):
    app, _ = seed_app(tmp_path)
    response = app.test_client().post("/named/no%20spaces")
    assert response.status_code == 400 and response.get_json()["error"] == "invalid_name"
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("when", ["before", "after"])
def test_the_apps_own_handler_wins(tmp_path, when):
    app, _ = down(tmp_path, own_handler=when)
    response = app.test_client().post("/hits")
    assert response.status_code == 418 and response.get_json() == {"mine": "store_unavailable"}


def test_the_handler_can_be_turned_off(tmp_path):
    app, _ = down(tmp_path, COUNTER_ERROR_HANDLERS=False)
    assert app.test_client().post("/hits").status_code == 500  # Flask's own, for the app to handle


def test_a_forgotten_init_app_names_it(tmp_path):
    app = Flask("forgot", instance_path=str(tmp_path))
    counters = Counters()
    with app.app_context():
        for call in (lambda: counters.incr("x"), lambda: counters.decr("x"), lambda: counters.get("x")):
            with pytest.raises(NotSetUp, match=r"counters\.init_app\(app\)"):
                call()


def test_a_client_id_is_checked_at_once_and_a_session_gives_one(tmp_path):
    app, counters = seed_app(tmp_path, SECRET_KEY="s" * 40)
    with pytest.raises(InvalidName, match="token_hex"):
        counters.for_client("abc", lifetime=60)
    with pytest.raises(InvalidAmount, match="lifetime"):
        counters.for_client("0" * 32, lifetime=0)

    @app.post("/mine")
    def mine():
        return jsonify(value=counters.for_session().incr("clicks"))

    browser, other = app.test_client(), app.test_client()
    assert [browser.post("/mine").get_json()["value"] for _ in range(3)] == [1, 2, 3]
    assert other.post("/mine").get_json()["value"] == 1
    with browser.session_transaction() as session:
        assert len(session["tally_client_id"]) == 32


def test_memcached_with_no_servers_is_the_local_one_as_in_flask_caching(tmp_path):
    app, counters = seed_app(tmp_path, CACHE_TYPE="MemcachedCache")
    with app.app_context():
        assert counters.store.where() == "127.0.0.1:11211"


def test_a_missing_client_library_names_the_extra_to_install(tmp_path):
    """As in an environment without pymemcache (the import is made to fail, in a process of its own)."""
    import subprocess
    import sys

    probe = (
        "import sys; sys.modules['pymemcache'] = None\n"
        "import flask, tally\n"
        f"app = flask.Flask('x', instance_path={str(tmp_path)!r})\n"
        "app.config['CACHE_TYPE'] = 'MemcachedCache'\n"
        "try:\n    tally.Counters(app)\nexcept tally.ConfigError as error:\n    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "pymemcache" in out and "pip install 'flask-tally[memcached]'" in out, out


def test_the_cli_comes_with_the_extension(tmp_path):
    """``flask counters`` in an app that is not the demo: init_app adds it."""
    app, counters = seed_app(tmp_path)
    runner = app.test_cli_runner()
    listed = runner.invoke(args=["counters", "--help"]).output
    for command in ("get", "incr", "decr", "set", "reset", "init-db", "manager", "loadcheck"):
        assert f"  {command} " in listed, (command, listed)
    assert runner.invoke(args=["counters", "set", "apples", "-5"]).output == "-5\n"
    with app.app_context():
        assert counters.get("apples") == -5


def test_an_apps_own_counters_command_is_kept(tmp_path):
    import click

    app = Flask("mine", instance_path=str(tmp_path))

    @app.cli.command("counters")
    def own():
        click.echo("mine")

    Counters(app)
    assert app.test_cli_runner().invoke(args=["counters"]).output == "mine\n"
