"""``make race-report``: the original question answered by experiment.

Serves each counter variant on free loopback ports, under gunicorn (4 workers x 8 threads) and under
``flask run --with-threads``, drives it with 100 clients x 30 POSTs (a new connection per request, so
requests spread over the workers), and prints one table.  The naive variants come from
tests/naive_app.py; the Tally rows are the real app on each store.  Every process started here is
stopped by its pid.  With matplotlib (the ``charts`` extra) it also draws the duplicates per variant and
server into docs/race-report.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import machine  # noqa: E402
from tally.loadcheck import run_load  # noqa: E402
from tests.servers import FlaskDevServer, Gunicorn, Memcached, Postgres, Redis  # noqa: E402

CLIENTS, REQUESTS = 100, 30
CHART = ROOT / "docs" / "race-report.png"


def tally_env(store: str, memcached: Memcached, redis: Redis, postgres: Postgres) -> dict[str, str]:
    env = {"FLASK_COUNTER_DIR": tempfile.mkdtemp(prefix="race-counters-")}
    if store in ("sqlite", "postgresql"):
        env["FLASK_CACHE_TYPE"] = "FileSystemCache"
        env["FLASK_COUNTER_STORE"] = "sql"
        env["FLASK_COUNTER_KEY_PREFIX"] = f"race{time.monotonic_ns()}:"
        env["FLASK_SQLALCHEMY_DATABASE_URI"] = (
            f"sqlite:///{tempfile.mkdtemp(prefix='race-sql-')}/tally.db"
            if store == "sqlite"
            else postgres.url
        )
    elif store == "filesystem":
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


def variants(memcached: Memcached, redis: Redis, postgres: Postgres):
    """(label, app, env maker, route with {name}, uses the project's gunicorn config)"""

    def naive_sqlite() -> dict[str, str]:
        return {"NAIVE_DATABASE_URL": f"sqlite:///{tempfile.mkdtemp(prefix='race-naive-sql-')}/naive.db"}

    def naive_postgresql() -> dict[str, str]:
        return {"NAIVE_DATABASE_URL": postgres.url}

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
    yield "SELECT then UPDATE, SQLite", naive, naive_sqlite, "/naive-sql/{name}/incr", False
    yield "SELECT then UPDATE, PostgreSQL", naive, naive_postgresql, "/naive-sql/{name}/incr", False
    for store in ("filesystem", "memcached", "redis", "sqlite", "postgresql", "memory"):

        def env(store: str = store) -> dict[str, str]:
            return tally_env(store, memcached, redis, postgres)

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


def write_chart(rows: list[dict], path: Path) -> None:
    """Duplicates per variant, one bar per server, as a PNG readable in a narrow column (640 px wide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(row["variant"] for row in rows))
    servers = ["gunicorn", "flask run --with-threads"]
    colours = {"gunicorn": "#c0392b", "flask run --with-threads": "#e69f00"}
    figure, axes = plt.subplots(figsize=(6.4, 0.62 * len(variants) + 1.9), dpi=100)
    height = 0.38
    for offset, server in enumerate(servers):
        for index, variant in enumerate(variants):
            row = next(
                r for r in rows if r["variant"] == variant and r["server"].startswith(server.split()[0])
            )
            y = index + (offset - 0.5) * height
            axes.barh(y, row["duplicates"], height=height, color=colours[server])
            verdict = "0, exact" if row["passed"] else f"{row['duplicates']:,}"
            colour = "#1e7b34" if row["passed"] else "black"
            axes.text(row["duplicates"] + 30, y, verdict, va="center", fontsize=8, color=colour)
    axes.set_yticks(range(len(variants)), [textwrap.fill(v, 26) for v in variants], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, CLIENTS * REQUESTS * 1.12)
    axes.set_xlabel(f"duplicate values handed out (of {CLIENTS * REQUESTS:,} increments)", fontsize=9)
    axes.tick_params(axis="x", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in servers]
    labels = ["gunicorn 4 workers x 8 threads (memory: 1x8)", "flask run --with-threads"]
    axes.legend(handles, labels, fontsize=8, loc="lower right")
    axes.set_title(
        f"Counters that hand out the same number twice\n{CLIENTS} clients x {REQUESTS} POSTs; {machine()}",
        fontsize=9,
    )
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=CHART, help=f"PNG to write (default {CHART})")
    args = parser.parse_args()
    began = time.monotonic()
    memcached, redis, postgres = Memcached("memcached").start(), Redis().start(), Postgres().start()
    rows = []
    try:
        for label, app, make_env, route, project in variants(memcached, redis, postgres):
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
        postgres.remove()
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
    try:
        write_chart(rows, args.chart)
        print(f"chart: {args.chart}", file=sys.stderr)
    except ImportError:
        print("no chart: matplotlib is not installed (pip install -e '.[charts]')", file=sys.stderr)
    tally_rows = [row for row in rows if row["variant"].startswith("Tally")]
    return 0 if all(row["passed"] for row in tally_rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
