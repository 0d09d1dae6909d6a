"""``flask --app app counters get|incr|decr|set|reset NAME``: the helper from the command line."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from common import counters
from tally import TallyError

counters_cli = AppGroup("counters", help="Read and change shared counters.")


def _run(operation, *args) -> None:
    try:
        click.echo(operation(*args))
    except TallyError as error:
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
