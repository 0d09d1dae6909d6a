"""``make race-report``: the original question answered by experiment, on every server model of the
seed thread.

Serves each counter variant on free loopback ports under five servers: gunicorn gthread (4 workers x 8
threads), gunicorn gevent (4 workers, TALLY_WORKER_CLASS=gevent), ``flask run --with-threads``,
``app.run(threaded=True)`` and ``app.run(processes=4)`` (Werkzeug's forking server: a fork per request);
drives it with 100 clients x 30 POSTs (a new connection per request, so requests spread over the
workers), and prints one table.  The naive variants come from tests/naive_app.py; the Tally rows are
the real app on each store (the manager store's row when the registry has it).  The
memory store runs with one gunicorn worker; a fork per request is refused by it, shown as "refused".
``--quick``: 30 clients x 20 POSTs.  Every process started here is stopped by its pid.  With
matplotlib (the ``charts`` extra) it also draws the duplicates per variant and server into
docs/race-report.png.
"""

from __future__ import annotations

import argparse
import http.client
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
from tally.loadcheck import LoadReport, run_load  # noqa: E402
from tally.stores import REGISTRY  # noqa: E402
from tests.redis_topologies import MASTER_NAME, ClusterTopology, SentinelTopology  # noqa: E402
from tests.servers import DevServer, FlaskDevServer, Gunicorn, Memcached, Postgres, Redis  # noqa: E402

CLIENTS, REQUESTS = 100, 30
QUICK_CLIENTS, QUICK_REQUESTS = 30, 20
CHART = ROOT / "docs" / "race-report.png"
#: The server models of the seed thread, in the table's order.
SERVERS = (
    "gunicorn gthread",
    "gunicorn gevent",
    "flask run --with-threads",
    "app.run(threaded=True)",
    "app.run(processes=4)",
)
HAVE_MANAGER = "manager" in REGISTRY  # the registry of stores lists it
#: The Redis topologies' settings (FLASK_ names without the prefix), filled in by main() once started.
TOPOLOGIES: dict[str, dict[str, str]] = {}


def tally_env(store: str, memcached: Memcached, redis: Redis, postgres: Postgres, manager) -> dict[str, str]:
    env = {"FLASK_COUNTER_DIR": tempfile.mkdtemp(prefix="race-counters-")}
    if store == "manager":
        env["FLASK_CACHE_TYPE"] = "FileSystemCache"
        env["FLASK_COUNTER_KEY_PREFIX"] = f"race{time.monotonic_ns()}:"
        for key, value in manager.settings().items():
            env[f"FLASK_{key}"] = value if isinstance(value, str) else json.dumps(value)
    elif store in ("sqlite", "postgresql"):
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
    elif store in TOPOLOGIES:
        env.update({f"FLASK_{key}": value for key, value in TOPOLOGIES[store].items()})
        env["FLASK_COUNTER_KEY_PREFIX"] = f"race{time.monotonic_ns()}:"
    else:
        env["FLASK_CACHE_TYPE"] = "RedisCache"
        env["FLASK_CACHE_REDIS_URL"] = redis.url
        env["FLASK_COUNTER_KEY_PREFIX"] = f"race{time.monotonic_ns()}:"
    return env


def variants(memcached: Memcached, redis: Redis, postgres: Postgres, manager):
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
    stores = ["filesystem", "memcached", "redis", *TOPOLOGIES, "sqlite", "postgresql", "memory"]
    if manager is not None:
        stores.insert(-1, "manager")
    for store in stores:

        def env(store: str = store) -> dict[str, str]:
            return tally_env(store, memcached, redis, postgres, manager)

        yield f"Tally, {store}", "app:app", env, "/api/counters/{name}/incr", True


def make_server(model: str, env: dict[str, str], app: str, project: bool, workers: int) -> Gunicorn:
    options = {"app": app, "use_project_config": project}
    if model == "gunicorn gthread":
        return Gunicorn(env, workers=workers, threads=8, **options)
    if model == "gunicorn gevent":
        return Gunicorn(env, workers=workers, worker_class="gevent", **options)
    if model == "flask run --with-threads":
        return FlaskDevServer(env, **options)
    return DevServer(env, "threaded" if model == "app.run(threaded=True)" else "processes=4", app=app)


def server_label(model: str, workers: int) -> str:
    if model == "gunicorn gthread":
        return f"gunicorn gthread {workers}x8"
    if model == "gunicorn gevent":
        return f"gunicorn gevent {workers}x100"
    return model


def refusal(server: Gunicorn, route: str) -> str | None:
    """The error code of one more POST when it is a refusal (``store_not_shared``), else ``None``."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("POST", route, headers={"Connection": "close"})
        response = connection.getresponse()
        error = json.loads(response.read()).get("error")
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    return error if error == "store_not_shared" else None


def verdict(report: LoadReport, refused: bool) -> str:
    """exact; RACE (a value handed out twice); refused (the memory store in a fork); "no duplicate,
    N x 503" (the store did not answer within COUNTER_TIMEOUT: a refusal, never a wrong value); wrong."""
    if report.passed(0):
        return "exact"
    if report.duplicates:
        return "RACE"
    if refused:
        return "refused"
    unavailable = report.statuses.get(503, 0)
    if unavailable and report.ok + unavailable == report.sent and not report.out_of_range(0):
        return f"no duplicate, {unavailable} x 503"
    return "wrong"


def measure(model, label, app, env, route, project, *, workers, clients, requests):
    server = make_server(model, env, app, project, workers)
    try:
        server.start()
        report = run_load(
            server.url + route, clients=clients, requests=requests, keepalive=False, deadline=120
        )
        refused = report.ok == 0 and set(report.statuses) == {500} and refusal(server, route) is not None
    finally:
        server.stop()
    return {
        "variant": label,
        "model": model,
        "server": server_label(model, workers),
        "sent": report.sent,
        "ok": report.ok,
        "duplicates": report.duplicates,
        "gaps": report.gaps(0, report.sent),
        "per_second": report.per_second,
        "errors": sum(report.errors.values()) + report.sent - report.ok,
        "passed": report.passed(0),
        "verdict": verdict(report, refused),
    }


def write_chart(rows: list[dict], path: Path) -> None:
    """Duplicates per variant, one bar per server, as a PNG readable in a narrow column (640 px wide)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(row["variant"] for row in rows))
    servers = [model for model in SERVERS if any(row["model"] == model for row in rows)]
    palette = ["#c0392b", "#8e44ad", "#e69f00", "#2e86c1", "#16a085"]
    colours = dict(zip(servers, palette, strict=False))
    sent = max(row["sent"] for row in rows)
    figure, axes = plt.subplots(figsize=(6.4, 0.18 * len(servers) * len(variants) + 1.8), dpi=100)
    height = 0.8 / len(servers)
    for offset, server in enumerate(servers):
        for index, variant in enumerate(variants):
            row = next((r for r in rows if r["variant"] == variant and r["model"] == server), None)
            if row is None:
                continue
            y = index + (offset - (len(servers) - 1) / 2) * height
            axes.barh(y, row["duplicates"], height=height, color=colours[server])
            text = {"exact": "0, exact", "refused": "refused"}.get(row["verdict"], f"{row['duplicates']:,}")
            colour = "#1e7b34" if row["verdict"] in ("exact", "refused") else "black"
            axes.text(row["duplicates"] + sent * 0.01, y, text, va="center", fontsize=6, color=colour)
    axes.set_yticks(range(len(variants)), [textwrap.fill(v, 26) for v in variants], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, sent * 1.15)
    axes.set_xlabel(f"duplicate values handed out (of {sent:,} increments)", fontsize=9)
    axes.tick_params(axis="x", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[s]) for s in servers]
    legend = {
        "gunicorn gthread": "gunicorn 4x8 gthread (memory: 1x8)",
        "gunicorn gevent": "gunicorn 4 gevent (memory: 1)",
    }
    labels = [legend.get(s, s) for s in servers]
    axes.legend(handles, labels, fontsize=7, loc="lower right")
    clients, requests = rows[0]["clients"], rows[0]["requests"]
    axes.set_title(
        f"Counters that hand out the same number twice\n{clients} clients x {requests} POSTs; {machine()}",
        fontsize=9,
    )
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def start_manager():
    """A counter manager for the "Tally, manager" rows, or ``None`` when this checkout has none."""
    if not HAVE_MANAGER:
        return None
    from tests.servers import Manager

    return Manager().start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chart", type=Path, default=CHART, help=f"PNG to write (default {CHART})")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_CLIENTS} clients x {QUICK_REQUESTS} POSTs, no chart"
    )
    parser.add_argument("--only", default="", help="only the variants whose label contains this text")
    args = parser.parse_args()
    clients, requests = (QUICK_CLIENTS, QUICK_REQUESTS) if args.quick else (CLIENTS, REQUESTS)
    began = time.monotonic()
    memcached, redis, postgres = Memcached("memcached").start(), Redis().start(), Postgres().start()
    manager = sentinel = cluster = None
    rows = []
    try:
        manager = start_manager()
        if not args.only or "redis-" in args.only or args.only == "Tally":
            sentinel, cluster = SentinelTopology().start(), ClusterTopology().start()
            TOPOLOGIES["redis-sentinel"] = {
                "CACHE_TYPE": "RedisSentinelCache",
                "CACHE_REDIS_SENTINELS": json.dumps(sentinel.sentinel_addresses),
                "CACHE_REDIS_SENTINEL_MASTER": MASTER_NAME,
                "COUNTER_MIN_REPLICAS": "1",
            }
            TOPOLOGIES["redis-cluster"] = {
                "CACHE_TYPE": "RedisClusterCache",
                "CACHE_REDIS_CLUSTER": cluster.startup_nodes,
            }
        for label, app, make_env, route, project in variants(memcached, redis, postgres, manager):
            if args.only not in label:
                continue
            workers = 1 if label == "Tally, memory" else 4
            for model in SERVERS:
                name = f"race{len(rows)}"  # a fresh counter for every run
                row = measure(
                    model,
                    label,
                    app,
                    make_env(),
                    route.format(name=name),
                    project,
                    workers=workers,
                    clients=clients,
                    requests=requests,
                )
                row.update(clients=clients, requests=requests)
                rows.append(row)
                print(f"  {row['variant']:<42} {row['server']:<26} {row['verdict']}", file=sys.stderr)
    finally:
        memcached.stop()
        redis.remove()
        postgres.remove()
        if manager is not None:
            manager.remove()
        for topology in (sentinel, cluster):
            if topology is not None:
                topology.remove()
    print(
        f"\n{clients} clients x {requests} POSTs each ({clients * requests} requests), "
        f"a new connection per request; {os.cpu_count()} cores; Python {sys.version.split()[0]}"
        + ("" if HAVE_MANAGER else "; no manager store in this checkout")
        + "\n"
    )
    print("| variant | server | 200s | duplicates | gaps | req/s | verdict |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print(
            f"| {row['variant']} | {row['server']} | {row['ok']} | {row['duplicates']} | "
            f"{row['gaps']} | {row['per_second']:.0f} | {row['verdict']} |"
        )
    print(f"\n(measured in {time.monotonic() - began:.0f} s)")
    if not args.quick and not args.only:
        try:
            write_chart(rows, args.chart)
            print(f"chart: {args.chart}", file=sys.stderr)
        except ImportError:
            print("no chart: matplotlib is not installed (pip install -e '.[charts]')", file=sys.stderr)
    # Tally is exact everywhere it runs; the memory store may only refuse (a fork per request).
    tally_rows = [row for row in rows if row["variant"].startswith("Tally")]
    return 0 if all(row["verdict"] in ("exact", "refused") for row in tally_rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
