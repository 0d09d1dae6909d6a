"""A secret kept in a file of the instance folder, created once and shared by every process."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable


def read_or_create(path: str, make: Callable[[], str]) -> str:
    """The text in ``path``; when the file is missing, ``make()`` is written there first.

    The new file is written completely under a temporary name (mode 0600) and linked into place, so
    processes starting together (gunicorn workers) all read the same whole value, never a half-written
    one, and the first link wins."""
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(make())
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)
    with open(path, encoding="ascii") as file:
        return file.read().strip()
