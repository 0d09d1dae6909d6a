"""The sweep of a counter directory: expired per-client counters (``@...`` files), expired shared
values and temporary files left by a killed process, by one process of the host at a time."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable

from ...names import is_client_key
from .records import TEMP_PREFIX

#: The lock one process of the host holds while it sweeps.
SWEEP_LOCK = ".sweep.lock"


def sweep_directory(
    directory: str,
    remove_if_expired: Callable[[str, float], int],
    sweep_values: Callable[[float], int],
) -> int:
    """Under the directory's sweep lock (another process sweeping: skip, return 0), call
    ``remove_if_expired(name, now)`` for every per-client file, remove temporary files older than an
    hour, then ``sweep_values(now)``; return how many were removed."""
    lock_fd = os.open(os.path.join(directory, SWEEP_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        removed = 0
        now = time.time()
        with os.scandir(directory) as entries:
            for entry in entries:
                if is_client_key(entry.name):
                    removed += remove_if_expired(entry.name, now)
                elif entry.name.startswith(TEMP_PREFIX) and entry.stat().st_mtime < now - 3600:
                    os.unlink(entry.path)  # left by a process killed while creating a counter
        return removed + sweep_values(now)
    finally:
        os.close(lock_fd)
