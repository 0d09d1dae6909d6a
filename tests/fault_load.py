"""Load for the fault tests (a failover, a partition): clients that send one request per
connection (so that the requests reach every worker process) to a counter's ``/incr`` route until
stopped, keeping each answer with the time its request was sent, so that a test can tell a value
acknowledged before a fault from one acknowledged after it.  Every loop is bounded in time.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from contextlib import closing


def post(url: str) -> tuple[int, int | None]:
    """One POST on a connection of its own (so that the requests reach every worker process): the
    status, and the value of a 200."""
    parts = urllib.parse.urlsplit(url)
    with closing(http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)) as connection:
        try:
            connection.request("POST", parts.path)
            response = connection.getresponse()
            body = response.read()
        except OSError:
            return 0, None
    return response.status, (json.loads(body)["value"] if response.status == 200 else None)


class Load:
    """Clients incrementing one counter on each of ``urls`` until ``stop``.  Each answer is kept with
    the time its request was sent; ``mark(event)`` notes when something happened, so that a value can
    be told to come from a request sent before or after it."""

    def __init__(self, urls: dict[str, str], clients: int = 6) -> None:
        self.urls = urls
        self.answers: dict[str, list[tuple[float, int, int | None, float]]] = {label: [] for label in urls}
        self.events: dict[str, float] = {}
        self.final: dict[str, int] = {}  # the counter's value once service came back (serve_again)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._drive, args=(label,), daemon=True)
            for label, url in urls.items()
            for _ in range(clients)
        ]

    def __enter__(self) -> Load:
        """Once every url answered a 200 (a first request connects and may create the schema, which
        is not what a test times), the clients start."""
        for label in self.urls:
            deadline = time.monotonic() + 30
            while post(self.urls[label])[0] != 200:
                assert time.monotonic() < deadline, f"{label}: no 200 within 30 s of the start"
                time.sleep(0.1)
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def mark(self, event: str) -> None:
        self.events[event] = time.monotonic()

    def ask(self, label: str) -> int:
        sent = time.monotonic()
        status, value = post(self.urls[label])
        self.answers[label].append((sent, status, value, time.monotonic() - sent))  # list.append: atomic
        return status

    def _drive(self, label: str) -> None:
        ends_by = time.monotonic() + 120  # bounded, whatever happens to the servers
        while not self._stop.is_set() and time.monotonic() < ends_by:
            self.ask(label)

    def values(self, label: str, sent_after: float = 0.0) -> list[int]:
        return [v for sent, _, v, _ in self.answers[label] if v is not None and sent >= sent_after]

    def statuses(self, label: str) -> dict[int, int]:
        counted: dict[int, int] = {}
        for _, status, _, _ in self.answers[label]:
            counted[status] = counted.get(status, 0) + 1
        return counted

    def statuses_sent(self, label: str, after: float, before: float) -> dict[int, int]:
        """The statuses of the requests sent between two times."""
        counted: dict[int, int] = {}
        for sent, status, _, _ in self.answers[label]:
            if after <= sent < before:
                counted[status] = counted.get(status, 0) + 1
        return counted

    def statuses_answered_before(self, label: str, moment: float) -> dict[int, int]:
        counted: dict[int, int] = {}
        for sent, status, _, took in self.answers[label]:
            if sent + took < moment:
                counted[status] = counted.get(status, 0) + 1
        return counted

    def slowest(self, label: str) -> float:
        return max(took for *_, took in self.answers[label])


def serve_again(load: Load, label: str, within: float = 30.0) -> None:
    """Ask until the server answers a 200 (service comes back by itself; marked "<label> serves
    again"), then 100 more (for 20 s at most); then read the counter's value."""
    deadline = time.monotonic() + within
    while load.ask(label) != 200:
        assert time.monotonic() < deadline, f"{label}: no 200 within {within} s"
        time.sleep(0.2)
    load.mark(f"{label} serves again")
    ends_by = time.monotonic() + 20
    for _ in range(100):
        if time.monotonic() > ends_by:
            break
        load.ask(label)
    load.final[label] = final_value(load.urls[label])


def repeats(values: list[int]) -> int:
    return len(values) - len(set(values))


def final_value(url: str) -> int:
    """The counter's value as the app reads it now (``url`` is its /incr route)."""
    with urllib.request.urlopen(url.removesuffix("/incr"), timeout=10) as response:
        return int(json.loads(response.read())["value"])


def summary(load: Load, label: str) -> str:
    values = load.values(label)
    return (
        f"{label}: {len(values)} acknowledged, {repeats(values)} handed out twice,"
        f" statuses {dict(sorted(load.statuses(label).items()))}, slowest {load.slowest(label):.2f} s"
    )


def lost(load: Load, served_by: str) -> int:
    """Acknowledged steps that the counter's final value (read by ``serve_again`` from
    ``served_by``) does not account for: a lost step's number is either handed out again as the
    counter climbs past it (a repeat) or lies above where the counter ended."""
    values = [value for label in load.answers for value in load.values(label)]
    return repeats(values) + sum(1 for value in set(values) if value > load.final[served_by])
