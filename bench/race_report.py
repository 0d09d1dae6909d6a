"""``make race-report``: the original question answered by experiment.

Serves each counter variant on free loopback ports, under gunicorn (4 workers x 8 threads) and under
``flask run --with-threads``, drives it with 100 clients x 30 POSTs (a new connection per request, so
requests spread over the workers), and prints one table.  The naive variants come from
tests/naive_app.py; the Tally rows are the real app on each store.  Every process started here is
stopped by its pid.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tally.loadcheck import run_load  # noqa: E402
from tests.servers import FlaskDevServer, Gunicorn, Memcached, Redis  # noqa: E402

CLIENTS, REQUESTS = 100, 30


def tally_env(store: str, memcached: Memcached, redis: Redis) -> dict[str, str]:
    env = {"FLASK_COUNTER_DIR": tempfile.mkdtemp(prefix="race-counters-")}
    if store == "filesystem":
        env["FLASK_CACHE_TYPE"] = "FileSystemCache"
    elif store == "memory":
        env["FLASK_CACHE_TYPE"] = "SimpleCache"
    elif store == "memcached":
        env["FLASK_CACHE_TYPE"] = "MemcachedCache"
        env["FLASK_CACHE_MEMCACHED_SERVERS"] = json.dumps([memcached.address])
        env["FLASK_COUNTER_KEY_PREFIX"] = f"race{time.monotonic_ns()}:"
    else:
        env["FLASK_CACHE_TYPE"] = "RedisCache"
        env["FLASK_CACHE_REDIS_URL"] = redis.url
        env["FLASK_COUNTER_KEY_PREFIX"] = f"race{time.monotonic_ns()}:"
    return env


def variants(memcached: Memcached, redis: Redis):
    """(label, app, env maker, route with {name}, uses the project's gunicorn config)"""

    def naive_fs() -> dict[str, str]:
        return {"NAIVE_CACHE_DIR": tempfile.mkdtemp(prefix="race-naive-")}

    def naive_mc() -> dict[str, str]:
        return {"NAIVE_MEMCACHED_SERVERS": memcached.address}

    naive = "naive_app:app"
    yield "global variable (the question's SomeObj)", naive, dict, "/global/{name}/incr", False
    yield "Flask-Caching get+set, filesystem", naive, naive_fs, "/cache-getset/{name}/incr", False
    yield "Flask-Caching cache.inc, filesystem", naive, naive_fs, "/cache-inc/{name}/incr", False
    yield "Flask-Caching get+set, memcached", naive, naive_mc, "/cache-getset/{name}/incr", False
    yield "Flask-Caching cache.inc, memcached", naive, naive_mc, "/cache-inc/{name}/incr", False
    for store in ("filesystem", "memcached", "redis", "memory"):

        def env(store: str = store) -> dict[str, str]:
            return tally_env(store, memcached, redis)

        yield f"Tally, {store}", "app:app", env, "/api/counters/{name}/incr", True


def measure(server_class, label, app, env, route, project, **options):
    server = server_class(env, app=app, use_project_config=project, **options)
    try:
        server.start()
        report = run_load(
            server.url + route, clients=CLIENTS, requests=REQUESTS, keepalive=False, deadline=120
        )
    finally:
        server.stop()
    start = 0
    return {
        "variant": label,
        "server": "gunicorn 4x8"
        if server_class is Gunicorn and server.workers == 4
        else ("gunicorn 1x8" if server_class is Gunicorn else "flask run --with-threads"),
        "ok": report.ok,
        "duplicates": report.duplicates,
        "gaps": report.gaps(start, start + report.sent),
        "per_second": report.per_second,
        "errors": sum(report.errors.values()) + report.sent - report.ok,
        "passed": report.passed(start),
    }


def main() -> int:
    began = time.monotonic()
    memcached, redis = Memcached("memcached").start(), Redis().start()
    rows = []
    try:
        for label, app, make_env, route, project in variants(memcached, redis):
            workers = 1 if label == "Tally, memory" else 4
            for server_class in (Gunicorn, FlaskDevServer):
                name = f"race{len(rows)}"  # a fresh counter for every run
                route_here = route.format(name=name)
                row = measure(
                    server_class, label, app, make_env(), route_here, project, workers=workers, threads=8
                )
                rows.append(row)
                print(f"  {row['variant']:<42} {row['server']:<26} done", file=sys.stderr)
    finally:
        memcached.stop()
        redis.remove()
    print(
        f"\n{CLIENTS} clients x {REQUESTS} POSTs each ({CLIENTS * REQUESTS} requests), "
        f"a new connection per request; {os.cpu_count()} cores; Python {sys.version.split()[0]}\n"
    )
    print("| variant | server | 200s | duplicates | gaps | req/s | verdict |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        verdict = "exact" if row["passed"] else "RACE" if row["duplicates"] else "wrong"
        print(
            f"| {row['variant']} | {row['server']} | {row['ok']} | {row['duplicates']} | "
            f"{row['gaps']} | {row['per_second']:.0f} | {verdict} |"
        )
    print(f"\n(measured in {time.monotonic() - began:.0f} s)")
    tally_rows = [row for row in rows if row["variant"].startswith("Tally")]
    return 0 if all(row["passed"] for row in tally_rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
