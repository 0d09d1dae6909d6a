"""Drive a counter route with many concurrent clients and check every returned value.

The experiment behind the original question: N clients each send M increments; with a correct counter
the values returned are exactly start+1 ... start+N*M, each once.  Used by the tests, the benchmarks and
``flask counters loadcheck``.  Bounded in requests and time; it stops by itself.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadReport:
    """What the clients got back.  ``values`` holds the value of every 200 response."""

    sent: int = 0
    values: list[int] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def duplicates(self) -> int:
        return len(self.values) - len(set(self.values))

    def gaps(self, start: int = 0, end: int | None = None) -> int:
        """How many numbers of start+1 .. end (default start+ok) no response returned."""
        end = start + self.ok if end is None else end
        seen = set(self.values)
        return sum(1 for n in range(start + 1, end + 1) if n not in seen)

    def exact(self, start: int = 0) -> bool:
        """True when the values are exactly start+1 .. start+sent, each once."""
        return sorted(self.values) == list(range(start + 1, start + self.sent + 1))

    @property
    def per_second(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def out_of_range(self, start: int = 0) -> int:
        """Values no correct counter could have returned: outside start+1 .. start+sent."""
        return sum(1 for v in self.values if not start + 1 <= v <= start + self.sent)

    def passed(self, start: int = 0) -> bool:
        """Every request answered 200 and the values are exactly start+1 .. start+sent."""
        return self.ok == self.sent > 0 and self.exact(start)

    def summary(self, start: int = 0) -> dict[str, object]:
        return {
            "sent": self.sent,
            "statuses": dict(sorted(self.statuses.items())),
            "errors": dict(sorted(self.errors.items())),
            "distinct": len(set(self.values)),
            "duplicates": self.duplicates,
            "gaps": self.gaps(start, start + self.sent),
            "out_of_range": self.out_of_range(start),
            "per_second": round(self.per_second, 1),
            "p50_ms": round(self.percentile(0.50) * 1000, 2),
            "p99_ms": round(self.percentile(0.99) * 1000, 2),
            "passed": self.passed(start),
        }


def run_load(
    url: str,
    *,
    clients: int = 100,
    requests: int = 30,
    method: str = "POST",
    timeout: float = 10.0,
    deadline: float = 120.0,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    keepalive: bool = True,
    body_for: Callable[[int, int], bytes] | None = None,
    on_response: Callable[[], None] | None = None,
    integer_values: bool = True,
) -> LoadReport:
    """Send ``clients`` x ``requests`` requests to ``url`` from ``clients`` threads.

    With ``keepalive`` each client keeps one connection (so one server process serves it); without,
    every request opens a new connection, which spreads a client's requests over all the worker
    processes.  ``body_for(client, request)`` gives each request its own JSON body.  Each request
    waits at most ``timeout`` s; no request starts after ``deadline`` s.  ``on_response`` is called
    (from the client threads) after every request, for a progress display.  With
    ``integer_values`` false the responses' values are not collected (routes that return other JSON).
    A ``url`` without a host raises ``ValueError``.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if not host:  # each client thread would die at its first connection, and the report be empty
        raise ValueError(f"run_load needs an absolute URL with a host; got {url!r}")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    report = LoadReport()
    lock = threading.Lock()
    start_gate = threading.Barrier(clients)
    stop_at = time.monotonic() + deadline
    has_body = body is not None or body_for is not None
    send_headers = (
        {"Content-Type": "application/json", **(headers or {})} if has_body else dict(headers or {})
    )
    if not keepalive:
        send_headers["Connection"] = "close"

    def client(number: int) -> None:
        connection = connection_class(host, parts.port, timeout=timeout)
        values: list[int] = []
        statuses: Counter[int] = Counter()
        errors: Counter[str] = Counter()
        latencies: list[float] = []
        sent = 0
        with contextlib.suppress(threading.BrokenBarrierError):
            start_gate.wait(timeout=timeout)
        for index in range(requests):
            if time.monotonic() > stop_at:
                break
            sent += 1
            began = time.perf_counter()
            try:
                payload_out = body_for(number, index) if body_for else body
                connection.request(method, path, body=payload_out, headers=send_headers)
                response = connection.getresponse()
                payload = response.read()
                statuses[response.status] += 1
                if response.status == 200 and integer_values:
                    value = json.loads(payload)["value"]
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise ValueError("the response's value is not an integer")
                    values.append(value)
                if not keepalive or response.getheader("Connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException, ValueError, KeyError) as error:
                errors[type(error).__name__] += 1
                connection.close()
                connection = connection_class(host, parts.port, timeout=timeout)
            latencies.append(time.perf_counter() - began)
            if on_response is not None:
                on_response()
        connection.close()
        with lock:
            report.sent += sent
            report.values.extend(values)
            report.statuses.update(statuses)
            report.errors.update(errors)
            report.latencies.extend(latencies)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=deadline + timeout + 5)
    report.seconds = time.perf_counter() - began
    return report
