"""What a test run left behind: processes started with its TMPDIR, and files in its folder."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def _marked(tmpdir: str) -> list[int]:
    """Processes (other than this one) whose environment holds ``TMPDIR=tmpdir``: every server,
    gunicorn, browser and worker the run started inherits it."""
    mark = f"TMPDIR={tmpdir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def leftover_processes(tmpdir: str, grace: float = 5.0) -> list[str]:
    """The processes still running after ``grace`` seconds (a server may take a moment to exit after
    its stop), each described, then killed."""
    deadline = time.monotonic() + grace
    while (pids := _marked(tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    described = []
    for pid in pids:
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            described.append(f"process {pid}: {command.strip()}")
            os.kill(pid, signal.SIGKILL)
    return described


def leftover_files(tmpdir: str, keep: set[str]) -> list[str]:
    """The entries of the run's folder but those in ``keep``."""
    paths = (os.path.join(tmpdir, name) for name in os.listdir(tmpdir))
    return sorted(f"file {path}" for path in paths if path not in keep)
