"""``python -m tally.stores.manager ADDRESS [--snapshot FILE] [--snapshot-interval S] [--parent PID]``:
serve a new counter table at ``ADDRESS`` until SIGTERM or SIGINT (``server.main``); the key is read as
hex from the first line of stdin, never from argv."""

from __future__ import annotations

from .server import main

if __name__ == "__main__":
    main()
