"""Gunicorn settings for Tally, from the environment: TALLY_BIND, TALLY_WORKERS, TALLY_THREADS,
TALLY_WORKER_CLASS (gevent) and TALLY_WORKER_CONNECTIONS."""

import faulthandler
import os
import shutil
import signal

bind = os.environ.get("TALLY_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("TALLY_WORKERS", "4"))
threads = int(os.environ.get("TALLY_THREADS", "8"))
worker_class = os.environ.get("TALLY_WORKER_CLASS") or ("gthread" if threads > 1 else "sync")
# TALLY_WORKER_CLASS=gevent: each worker serves up to worker_connections requests at once, one greenlet
# each (TALLY_THREADS is ignored).  On a network store at most COUNTER_POOL_SIZE of them talk to it at a
# time; the others wait for a connection, so thousands of admitted requests would only queue (or 503).
worker_connections = int(os.environ.get("TALLY_WORKER_CONNECTIONS", "100"))
keepalive = 5
timeout = 30
graceful_timeout = int(os.environ.get("TALLY_GRACEFUL_TIMEOUT", "10"))
accesslog = os.environ.get("TALLY_ACCESS_LOG") or None
# gunicorn >= 27 opens a control socket at one fixed path per user; Tally does not use it, and two
# instances on one host (tests, blue/green) would fight over it.  Older versions ignore this name.
control_socket_disable = True


#: prometheus_client's multiprocess files live in <instance>/metrics/<master pid>/.
METRICS_DIRECTORY = "metrics"


def _metrics_directory() -> str:
    """An empty directory of this master for the workers' metric files, set as PROMETHEUS_MULTIPROC_DIR.

    One per master (two gunicorns on one instance folder must not wipe or sum each other's files);
    the directories of masters that no longer run are removed.  A PROMETHEUS_MULTIPROC_DIR set by the
    operator is used as it is, its files removed.  Must run before the app is imported:
    prometheus_client picks its multiprocess mode at import.
    """
    instance = os.environ.get("TALLY_INSTANCE_PATH") or os.path.join(os.path.dirname(__file__), "instance")
    base = os.path.join(os.path.abspath(instance), METRICS_DIRECTORY)
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given and os.path.dirname(os.path.abspath(given)) != base:  # not one of ours (a re-exec's)
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                os.unlink(os.path.join(given, name))
        return given
    os.makedirs(base, exist_ok=True)
    for name in os.listdir(base):
        if name.isdigit() and not _running(int(name)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    directory = os.path.join(base, str(os.getpid()))
    shutil.rmtree(directory, ignore_errors=True)  # a pid reused from an earlier run
    os.makedirs(directory)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # inherited by every worker
    return directory


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def _patch_for_gevent(server) -> None:
    """Under a gevent worker (TALLY_WORKER_CLASS=gevent or -k gevent), patch the standard library in
    the master before the app is imported: the workers are forked from it, so every lock, queue and
    socket class the app and its stores create is then gevent's.  gunicorn patches only in the worker,
    after the import: there, 20 memcached calls of 0.2 s each took 4 s (one at a time, the hub
    blocked) and PostgreSQL calls hung until the client gave up (psycopg picks its wait function at
    import); patched here, 0.25 s and 0.23 s."""
    if "gevent" in server.cfg.worker_class_str.lower():
        from gevent import monkey

        monkey.patch_all()


def on_starting(server):
    """Build the app in the master before any worker starts.

    A bad setting stops gunicorn here with one clear line, and the memory store is refused under
    several workers (each would count on its own).  Workers are forked from this master and reuse the
    app (as with --preload); stores open connections and file descriptors lazily, per process.
    First, the metrics directory: /metrics then sums every worker's figures.
    """
    _patch_for_gevent(server)
    _metrics_directory()
    from settings import ConfigError

    try:
        import app
    except ConfigError as error:
        raise SystemExit(f"tally: bad configuration: {error}") from None
    store = app.app.extensions["tally"]
    if not store.multi_process and server.cfg.workers > 1:
        from tally.stores import REGISTRY

        shared = ", ".join(name for name, cls in REGISTRY.items() if cls.multi_process)
        raise SystemExit(
            f"tally: the {store.backend} store keeps counters inside one process, but gunicorn is"
            f" set to {server.cfg.workers} workers; use TALLY_WORKERS=1 or a shared store ({shared})"
        )
    _start_counter_manager(server, app.app)


#: The counter manager this master started (COUNTER_STORE = "manager"), stopped by on_exit.
_counter_manager = None


def _start_counter_manager(server, flask_app):
    """COUNTER_STORE = "manager" at the default address (the instance folder's socket) with nothing
    listening there: start the manager as this master's child, before any worker forks.  A manager
    started otherwise (`flask --app app counters manager`, another address) is used as it is."""
    global _counter_manager
    settings = flask_app.extensions["tally.settings"]
    if settings["STORE"] != "manager":
        return
    from tally.stores import manager

    address = settings["COUNTER_MANAGER_ADDRESS"]
    if address != manager.default_address(flask_app.instance_path) or manager.answers(address):
        return
    _counter_manager = manager.spawn_server(
        address,
        settings["COUNTER_MANAGER_AUTHKEY"],
        snapshot=settings["COUNTER_MANAGER_SNAPSHOT"],
        snapshot_interval=settings["COUNTER_MANAGER_SNAPSHOT_INTERVAL"],
    )
    if _counter_manager is not None:
        server.log.info("Started counter manager at %s (pid %s)", address, _counter_manager.pid)


def child_exit(server, worker):
    """A worker ended (in the master): its live gauges leave /metrics; its counters stay counted."""
    from tally import metrics

    metrics.process_exited(worker.pid)


def on_exit(server):
    """The master stops: its metrics directory goes with it (the next start begins from zero), and the
    counter manager it started stops by pid (after the workers; it writes its snapshot if it has one)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(directory) == str(os.getpid()):
        shutil.rmtree(directory, ignore_errors=True)
    if _counter_manager is not None:
        from tally.stores.manager import stop_server

        stop_server(_counter_manager)


def post_fork(server, worker):
    """The single worker of a memory store becomes the one process that counts (the master built the
    store and never counts; a worker forked from it would otherwise be refused)."""
    import app
    from tally.stores.base import ForkAdoption

    store = app.app.extensions["tally"]
    if isinstance(store, ForkAdoption):
        store.adopt()


def post_worker_init(worker):
    """On SIGTERM a worker exits within graceful_timeout, whatever its threads are doing.

    gunicorn's own graceful stop lets in-flight requests finish for graceful_timeout, but then the
    interpreter's exit joins every request thread, so one thread stuck in a call that never returns
    would keep the worker alive for good (and orphaned, once the master has gone).  A C-level
    watchdog (faulthandler: it needs no GIL and no Python thread to run) dumps every thread's stack to
    the log, naming where it was stuck, and ends the process at the deadline.
    """
    graceful_stop = signal.getsignal(signal.SIGTERM)
    deadline = max(1.0, float(worker.cfg.graceful_timeout))

    def stop_within_deadline(signum, frame):
        faulthandler.dump_traceback_later(deadline, exit=True)
        graceful_stop(signum, frame)

    signal.signal(signal.SIGTERM, stop_within_deadline)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn set it: no EINTR in active requests
