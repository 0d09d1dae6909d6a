"""``flask counters ...`` in any app that uses the extension (``init_app`` adds the group):
get, incr, decr, set, reset, init-db, manager and loadcheck."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup

from .errors import ConfigError, TallyError
from .extension import SET_UP_HOOKS, SETTINGS_KEY, Counters
from .loadcheck import BadArgument, check
from .stores.base import SchemaSupport

counters_cli = AppGroup("counters", help="Read and change shared counters; check a counter route under load.")

#: Any Counters works on the app the command runs in: the store is found through current_app.
_counters = Counters()

#: Negative numbers as arguments (``set apples -5``), not options.
NUMBERS = {"ignore_unknown_options": True}


def _run(operation: Callable[..., Any], *args: Any) -> None:
    try:
        click.echo(operation(*args))
    except TallyError as error:
        raise click.ClickException(str(error)) from error


@counters_cli.command("init-db")
def init_db_command() -> None:
    """Create the sql store's tables (COUNTER_STORE = "sql"), if they are missing."""
    store = _counters.store
    if not isinstance(store, SchemaSupport):
        raise click.ClickException(f"the {store.backend} store has no tables to create")
    try:
        store.create_schema()
    except TallyError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"tables ready in {store.where()}")


@counters_cli.command("manager")
def manager_command() -> None:
    """Serve the manager store (COUNTER_STORE = "manager") in the foreground until Ctrl-C or SIGTERM,
    at COUNTER_MANAGER_ADDRESS with COUNTER_MANAGER_AUTHKEY, saving COUNTER_MANAGER_SNAPSHOT if set."""
    import logging

    from .stores import manager

    settings = current_app.extensions[SETTINGS_KEY]
    if settings["STORE"] != "manager":
        raise click.ClickException(
            f'COUNTER_STORE is not "manager": this app uses the {settings["STORE"]} store'
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        manager.serve(
            settings["COUNTER_MANAGER_ADDRESS"],
            settings["COUNTER_MANAGER_AUTHKEY"],
            snapshot=settings["COUNTER_MANAGER_SNAPSHOT"],
            snapshot_interval=settings["COUNTER_MANAGER_SNAPSHOT_INTERVAL"],
        )
    except (manager.ManagerRunning, ConfigError, OSError) as error:
        raise click.ClickException(str(error)) from error


@counters_cli.command("get")
@click.argument("name")
def get_command(name: str) -> None:
    """Print the value of NAME (0 when missing)."""
    _run(_counters.get, name)


@counters_cli.command("incr")
@click.argument("name")
@click.option("--by", default=1, show_default=True, type=int)
def incr_command(name: str, by: int) -> None:
    """Add --by to NAME and print the new value."""
    _run(_counters.incr, name, by)


@counters_cli.command("decr")
@click.argument("name")
@click.option("--by", default=1, show_default=True, type=int)
def decr_command(name: str, by: int) -> None:
    """Subtract --by from NAME and print the new value."""
    _run(_counters.decr, name, by)


@counters_cli.command("set", context_settings=NUMBERS)
@click.argument("name")
@click.argument("value", type=int)
def set_command(name: str, value: int) -> None:
    """Replace the value of NAME (VALUE may be negative: set apples -5)."""
    _run(_counters.set, name, value)


@counters_cli.command("reset")
@click.argument("name")
def reset_command(name: str) -> None:
    """Delete NAME so that it reads 0; prints whether it existed."""
    _run(_counters.reset, name)


@counters_cli.command("loadcheck", context_settings=NUMBERS)
@click.argument("url")
@click.option("--clients", default=100, show_default=True, type=int, help="Concurrent clients (1-1000).")
@click.option("--requests", default=50, show_default=True, type=int, help="Requests per client.")
@click.option(
    "--path", default=None, help="The route to POST for a base URL [default: /api/counters/{name}/incr]."
)
@click.option("--name", default=None, help="Counter name [default: a fresh loadcheck-... name].")
@click.option("--timeout", default=10.0, show_default=True, type=float, help="Seconds one request may take.")
@click.option(
    "--deadline", default=300.0, show_default=True, type=float, help="Seconds after which none starts."
)
@click.option(
    "--keepalive/--new-connections",
    default=False,
    show_default=True,
    help="Keep one connection per client, or open one per request (the default: it spreads every"
    " client over the server's worker processes; kept-alive connections may all land on one).",
)
@click.option("--start", type=int, default=None, help="The value before the run [default: read with GET].")
def loadcheck_command(**options: Any) -> None:
    """Drive URL with concurrent POSTs and check every value came back once.  URL is a base
    (http://127.0.0.1:8000: --path is tested) or a route (http://127.0.0.1:8000/hits).

    Exits 0 when the route is correct under the load, 1 when a race was found, 2 when it could not
    test (most requests failed, were refused, answered 404, or had no JSON value).
    """
    try:
        code = check(options.pop("url"), **options)
    except BadArgument as error:
        raise click.UsageError(str(error)) from error
    if code:
        raise SystemExit(code)


def register_commands(app: Flask) -> None:
    """Add ``flask counters`` to ``app`` unless it has a ``counters`` command of its own."""
    if "counters" not in app.cli.commands:
        app.cli.add_command(counters_cli)


SET_UP_HOOKS.append(register_commands)
