"""What a C memcached client (pylibmc) does under gunicorn's gevent worker, next to Tally's pymemcache.

pylibmc waits for memcached inside C, where gevent cannot switch: while one greenlet waits for its
reply, every other greenlet of the worker waits too.  Flask-Caching's MemcachedCache uses it (cachelib:
``inc`` is a ``get`` then a ``set``, two round trips); Tally's counters use pymemcache, whose sockets
gevent patches.  Measured here, one worker each, 100 keep-alive clients x ``--requests`` POSTs, on
memcached over loopback and through a proxy that adds ``--delay`` ms per round trip (memcached on
another host), under the gevent worker and under gthread (1 worker x 8 threads) for reference:

- ``cache.inc`` (pylibmc, get+set): tests/naive_app.py ``/cache-inc/<name>/incr``;
- ``pylibmc incr``: tests/naive_app.py ``/raw/<name>/incr`` (one round trip, like Tally's);
- Tally: ``/api/counters/<name>/incr`` on COUNTER_STORE memcached.

Rows of one round are measured back to back; the machine is shared, so read the ratios of a round,
not the absolute figures.  Bounded: every run stops after its requests or 60 s.  Every process started
here is stopped by its pid.  Usage: ``.venv/bin/python bench/gevent_pylibmc.py [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tally.loadcheck import run_load  # noqa: E402
from tests.links import Link  # noqa: E402
from tests.servers import HOST, Gunicorn, Memcached  # noqa: E402

CLIENTS = 100
ROUTES = {
    "Flask-Caching cache.inc (pylibmc)": ("naive_app:app", "/cache-inc/{name}/incr"),
    "pylibmc incr": ("naive_app:app", "/raw/{name}/incr"),
    "Tally (pymemcache)": ("app:app", "/api/counters/{name}/incr"),
}


def create_key(address: str, key: str) -> None:
    """``/raw`` increments an existing key only: set it to 0 first."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"set {key} 0 0 1\r\n0\r\n".encode())
        assert sock.recv(64).startswith(b"STORED")


def serve(label: str, address: str, worker: str) -> Gunicorn:
    app, _ = ROUTES[label]
    worker_class = "gevent" if worker == "gevent" else None
    if app == "naive_app:app":
        env = {"NAIVE_MEMCACHED_SERVERS": address}
        return Gunicorn(
            env, workers=1, threads=8, app=app, use_project_config=False, worker_class=worker_class
        )
    env = {
        "FLASK_CACHE_TYPE": "MemcachedCache",
        "FLASK_CACHE_MEMCACHED_SERVERS": json.dumps([address]),
        "FLASK_COUNTER_KEY_PREFIX": f"g{time.monotonic_ns()}:",
        "FLASK_COUNTER_TIMEOUT": "2",  # the hub-blocking rows queue for long; time is not what fails here
    }
    return Gunicorn(env, workers=1, threads=8, worker_class=worker_class)


def measure(label: str, address: str, worker: str, requests: int) -> dict:
    server = serve(label, address, worker)
    name = f"b{time.monotonic_ns()}"
    try:
        server.start()
        if label == "pylibmc incr":
            create_key(address, name)
        url = server.url + ROUTES[label][1].format(name=name)
        run_load(url, clients=CLIENTS, requests=2, keepalive=True, deadline=30, timeout=30)  # connections
        report = run_load(url, clients=CLIENTS, requests=requests, keepalive=True, deadline=60, timeout=30)
    finally:
        server.stop()
    return {
        "ok": report.ok,
        "sent": report.sent,
        "per_second": report.per_second,
        "p50_ms": report.percentile(0.5) * 1000,
        "p99_ms": report.percentile(0.99) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=20, help="POSTs per client (default 20)")
    parser.add_argument("--delay", type=float, default=2.0, help="added ms per round trip (default 2)")
    args = parser.parse_args()
    memcached = Memcached("memcached").start()
    proxy = Link(memcached.address, args.delay / 1000).start()
    results: dict[tuple[str, str, str], list[dict]] = {}
    began = time.monotonic()
    try:
        for _ in range(args.rounds):
            for where, address in (("loopback", memcached.address), (f"+{args.delay:g} ms", proxy.address)):
                for worker in ("gevent", "gthread"):
                    for label in ROUTES:
                        row = measure(label, address, worker, args.requests)
                        results.setdefault((where, worker, label), []).append(row)
                        print(
                            f"  {where:<9} {worker:<8} {label:<34} {row['per_second']:7.0f}/s",
                            file=sys.stderr,
                        )
    finally:
        proxy.stop()
        memcached.stop()
    print(
        f"\n1 worker; {CLIENTS} keep-alive clients x {args.requests} POSTs; median of {args.rounds} rounds;"
        f" {os.cpu_count()} cores, shared machine; memcached on {HOST}\n"
    )
    print("| memcached | worker | route | 200s | req/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for (where, worker, label), rows in results.items():

        def median(field: str, rows: list[dict] = rows) -> float:
            return statistics.median(row[field] for row in rows)

        ok = f"{sum(r['ok'] for r in rows)}/{sum(r['sent'] for r in rows)}"
        print(
            f"| {where} | {worker} | {label} | {ok} | {median('per_second'):.0f} | "
            f"{median('p50_ms'):.1f} | {median('p99_ms'):.1f} |"
        )
    print(f"\n(measured in {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
