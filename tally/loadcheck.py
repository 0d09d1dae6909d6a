"""Drive a counter route with many concurrent clients and check every returned value.

The experiment behind the original question: N clients each send M increments; with a correct counter
the values returned are exactly start+1 ... start+N*M, each once.  Used by the tests, the benchmarks,
``flask counters loadcheck`` and, without Flask, ``python -m tally.loadcheck URL``.  Bounded in
requests and time; it stops by itself.

``check`` (both commands) exits 0 when the route is correct under the load, 1 when it found a race
(a number handed out twice, or out of range, or missing where no failed request explains it), and 2
when it could not test (most requests failed, were refused, answered 404, or had no JSON ``value``),
saying which.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import secrets
import sys
import threading
import time
import urllib.request
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


# -- the command: flask counters loadcheck / python -m tally.loadcheck -----------------------------------

#: The route a base URL (no path) is tested on: the demo's and the library's JSON counter route.
DEFAULT_PATH = "/api/counters/{name}/incr"
CORRECT, RACE, NOT_TESTED = 0, 1, 2


class BadArgument(ValueError):
    """An argument ``check`` cannot use; the message names it."""


def target(url: str, path: str | None, name: str) -> tuple[str, str]:
    """``(base, route)``: a URL with a path tests that path (``/hits``); a base URL tests ``path``
    (default ``DEFAULT_PATH``), ``{name}`` replaced by ``name``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadArgument("URL: give a URL such as http://127.0.0.1:8000 or http://127.0.0.1:8000/hits")
    base = f"{parts.scheme}://{parts.netloc}"
    if parts.path not in ("", "/"):
        if path is not None:
            raise BadArgument("--path: the URL already has a path; give one or the other")
        return base, parts.path + (f"?{parts.query}" if parts.query else "")
    route = path if path is not None else DEFAULT_PATH
    if not route.startswith("/"):
        raise BadArgument("--path: must start with /")
    return base, route.replace("{name}", name)


def _start_value(base_url: str, route: str, timeout: float) -> int | None:
    """The counter's value before the run, read with GET on the route without its /incr."""
    if not route.endswith("/incr"):
        return None
    try:
        with urllib.request.urlopen(base_url + route.removesuffix("/incr"), timeout=timeout) as reply:
            value = json.loads(reply.read()).get("value")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def verdict(report: LoadReport, start: int) -> tuple[int, str]:
    """The exit code and the words for ``report``, the run having started at ``start``."""
    failed = report.sent - len(report.values)
    if report.sent == 0 or len(report.values) * 2 < report.sent:
        if report.statuses.get(404):
            why = "the route answered 404: is the URL's path the counter's route?"
        elif report.ok and not report.values:
            why = "the route answered 200 without a JSON integer 'value'"
        elif not report.statuses:
            why = "no request got an answer (refused, timed out or cut)"
        else:
            why = "most requests failed"
        return NOT_TESTED, f"NOT TESTED: {why} ({len(report.values)} of {report.sent} gave a value)"
    summary = report.summary(start)
    if summary["duplicates"]:
        return RACE, f"FAILED: a race: {summary['duplicates']} numbers were handed out twice"
    if summary["out_of_range"]:
        return RACE, (
            f"FAILED: {summary['out_of_range']} values lie outside {start + 1} .. {start + report.sent}"
            " (a race, another writer, or a wrong --start)"
        )
    gaps = report.gaps(start, start + report.sent)
    if gaps > failed:
        return RACE, f"FAILED: {gaps} numbers are missing, more than the {failed} failed requests"
    if failed:
        return NOT_TESTED, (
            f"NOT TESTED in full: {failed} of {report.sent} requests failed; the other values are"
            " unique and in range"
        )
    return CORRECT, "OK: every value unique, no gap"


def check(
    url: str,
    *,
    clients: int = 100,
    requests: int = 50,
    path: str | None = None,
    name: str | None = None,
    timeout: float = 10.0,
    deadline: float = 300.0,
    keepalive: bool = False,
    start: int | None = None,
) -> int:
    """Run the load, print the report to stdout (progress to stderr on a terminal) and return the
    exit code (``CORRECT``, ``RACE`` or ``NOT_TESTED``).  Raises ``BadArgument``."""
    if not 1 <= clients <= 1000:
        raise BadArgument("--clients: between 1 and 1000")
    if not 1 <= requests <= 100_000:
        raise BadArgument("--requests: between 1 and 100000")
    if not 0.1 <= timeout <= 300:
        raise BadArgument("--timeout: between 0.1 and 300 seconds")
    if not 1 <= deadline <= 3600:
        raise BadArgument("--deadline: between 1 and 3600 seconds")
    base, route = target(url, path, name or f"loadcheck-{secrets.token_hex(4)}")
    total = clients * requests
    if start is None:
        start = _start_value(base, route, timeout)
    done = [0]
    lock = threading.Lock()

    def count_one() -> None:
        with lock:
            done[0] += 1

    stop = threading.Event()
    progress = sys.stderr.isatty()
    if progress:

        def show_progress() -> None:
            while not stop.wait(0.2):
                filled = 30 * done[0] // total
                print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done[0]}/{total}", end="", file=sys.stderr)

        threading.Thread(target=show_progress, daemon=True).start()
    print(f"{clients} clients x {requests} POST {base}{route}", file=sys.stderr)
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
    if progress:
        print(file=sys.stderr)
    inferred = start is None
    if start is None:
        start = min(report.values) - 1 if report.values else 0
    summary = report.summary(start)
    statuses = ", ".join(f"{code}: {count}" for code, count in report.statuses.items()) or "none"
    errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(report.errors.items())) or "none"
    code, words = verdict(report, start)
    for label, value in (
        ("responses", f"{summary['sent']} sent; {statuses}"),
        ("errors", errors),
        ("start value", f"{start}{' (inferred from the lowest value)' if inferred else ''}"),
        ("distinct values", f"{summary['distinct']} of {len(report.values)}"),
        ("duplicates", summary["duplicates"]),
        ("gaps", f"{summary['gaps']} (of {start + 1} .. {start + report.sent})"),
        ("out of range", summary["out_of_range"]),
        ("throughput", f"{summary['per_second']} req/s"),
        ("latency", f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms"),
        ("verdict", words),
    ):
        print(f"{label:<16} {value}")
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m tally.loadcheck URL [options]``: the same check as ``flask counters loadcheck``."""
    parser = argparse.ArgumentParser(
        prog="python -m tally.loadcheck",
        description="Drive a counter route with concurrent clients; check every value came back once."
        " Exit 0: correct; 1: a race was found; 2: it could not test.",
    )
    parser.add_argument("url", help="http://host:port (tests --path) or http://host:port/route")
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients (default 100)")
    parser.add_argument("--requests", type=int, default=50, help="requests per client (default 50)")
    parser.add_argument("--path", default=None, help=f"route for a base URL (default {DEFAULT_PATH})")
    parser.add_argument("--name", default=None, help="counter name (default a fresh loadcheck-... name)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds one request may take")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds after which none starts")
    parser.add_argument("--keepalive", action="store_true", help="one connection per client")
    parser.add_argument("--start", type=int, default=None, help="the value before the run")
    args = parser.parse_args(argv)
    try:
        return check(
            args.url,
            clients=args.clients,
            requests=args.requests,
            path=args.path,
            name=args.name,
            timeout=args.timeout,
            deadline=args.deadline,
            keepalive=args.keepalive,
            start=args.start,
        )
    except BadArgument as error:
        parser.error(str(error))
        return NOT_TESTED  # parser.error exits; for the type checker


if __name__ == "__main__":
    raise SystemExit(main())
