"""``flask --app app counters get|incr|decr|set|reset NAME``: the helper from the command line;
``flask --app app counters loadcheck URL``: the race experiment against any deployment."""

from __future__ import annotations

import json
import secrets
import sys
import threading
import urllib.request
from urllib.parse import urlsplit

import click
from flask import current_app
from flask.cli import AppGroup

from common import counters
from tally import ConfigError, TallyError
from tally.loadcheck import run_load
from tally.stores.base import SchemaSupport

counters_cli = AppGroup("counters", help="Read and change shared counters.")


def _run(operation, *args) -> None:
    try:
        click.echo(operation(*args))
    except TallyError as error:
        raise click.ClickException(str(error)) from error


@counters_cli.command("init-db")
def init_db_command() -> None:
    """Create the sql store's tables (COUNTER_STORE = "sql"), if they are missing."""
    store = current_app.extensions["tally"]
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

    from tally.extension import SETTINGS_KEY
    from tally.stores import manager

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
    _run(counters.get, name)


@counters_cli.command("incr")
@click.argument("name")
@click.option("--by", default=1, show_default=True, type=int)
def incr_command(name: str, by: int) -> None:
    """Add --by to NAME and print the new value."""
    _run(counters.incr, name, by)


@counters_cli.command("decr")
@click.argument("name")
@click.option("--by", default=1, show_default=True, type=int)
def decr_command(name: str, by: int) -> None:
    """Subtract --by from NAME and print the new value."""
    _run(counters.decr, name, by)


@counters_cli.command("set")
@click.argument("name")
@click.argument("value", type=int)
def set_command(name: str, value: int) -> None:
    """Replace the value of NAME."""
    _run(counters.set, name, value)


@counters_cli.command("reset")
@click.argument("name")
def reset_command(name: str) -> None:
    """Delete NAME so that it reads 0; prints whether it existed."""
    _run(counters.reset, name)


def _start_value(base_url: str, path: str, timeout: float) -> int | None:
    """The counter's value before the run, read with GET on the route without its /incr."""
    if not path.endswith("/incr"):
        return None
    try:
        with urllib.request.urlopen(base_url + path.removesuffix("/incr"), timeout=timeout) as reply:
            value = json.loads(reply.read()).get("value")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@counters_cli.command("loadcheck")
@click.argument("url")
@click.option("--clients", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--requests", default=50, show_default=True, type=click.IntRange(1, 100_000), help="Requests per client."
)
@click.option(
    "--path",
    default="/api/counters/{name}/incr",
    show_default=True,
    help="The route to POST; {name} is replaced by --name.",
)
@click.option("--name", default=None, help="Counter name [default: a fresh loadcheck-... name].")
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 300),
    help="Seconds one request may take.",
)
@click.option(
    "--deadline",
    default=300.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds after which no new request starts.",
)
@click.option(
    "--keepalive/--new-connections",
    default=False,
    show_default=True,
    help="Keep one connection per client, or open one per request (the default: it spreads every"
    " client over the server's worker processes; kept-alive connections may all land on one).",
)
@click.option(
    "--start",
    type=int,
    default=None,
    help="The counter's value before the run [default: read with GET, else inferred].",
)
def loadcheck_command(url, clients, requests, path, name, timeout, deadline, keepalive, start):
    """Drive URL's counter route with concurrent clients; check every value came back once.

    Exits 0 only when every request answered 200 with a value, every value is unique and they
    cover start+1 .. start+N without a gap.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter("give a base URL such as http://127.0.0.1:8000", param_hint="URL")
    if not path.startswith("/"):
        raise click.BadParameter("must start with /", param_hint="--path")
    base = f"{parts.scheme}://{parts.netloc}"
    name = name or f"loadcheck-{secrets.token_hex(4)}"
    route = path.replace("{name}", name)
    total = clients * requests
    if start is None:
        start = _start_value(base, route, timeout)
    done = [0]
    lock = threading.Lock()

    def count_one() -> None:
        with lock:
            done[0] += 1

    stop = threading.Event()
    if sys.stderr.isatty():

        def show_progress() -> None:
            while not stop.wait(0.2):
                width = 30
                filled = width * done[0] // total
                click.echo(
                    f"\r[{'#' * filled}{'.' * (width - filled)}] {done[0]}/{total}", err=True, nl=False
                )

        threading.Thread(target=show_progress, daemon=True).start()
    click.echo(f"{clients} clients x {requests} POST {base}{route}", err=True)
    report = run_load(
        base + route,
        clients=clients,
        requests=requests,
        timeout=timeout,
        deadline=deadline,
        keepalive=keepalive,
        on_response=count_one,
    )
    stop.set()
    if sys.stderr.isatty():
        click.echo("", err=True)
    inferred = start is None
    if inferred:
        start = min(report.values) - 1 if report.values else 0
    summary = report.summary(start)
    statuses = ", ".join(f"{code}: {count}" for code, count in summary["statuses"].items()) or "none"
    errors = ", ".join(f"{kind}: {count}" for kind, count in summary["errors"].items()) or "none"
    click.echo(f"responses        {summary['sent']} sent; {statuses}")
    click.echo(f"errors           {errors}")
    click.echo(f"start value      {start}{' (inferred from the lowest value)' if inferred else ''}")
    click.echo(f"distinct values  {summary['distinct']} of {len(report.values)}")
    click.echo(f"duplicates       {summary['duplicates']}")
    click.echo(f"gaps             {summary['gaps']} (of {start + 1} .. {start + summary['sent']})")
    click.echo(f"out of range     {summary['out_of_range']}")
    click.echo(f"throughput       {summary['per_second']} req/s")
    click.echo(f"latency          p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms")
    if summary["passed"]:
        click.echo("verdict          OK: every value unique, no gap")
        return
    click.echo("verdict          FAILED: the counter is not correct under this load")
    raise SystemExit(1)
