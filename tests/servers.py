"""Real servers for tests and benchmarks: memcached, redis-server and gunicorn on free loopback ports.

Every process is started here, waited for until it answers, and stopped by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.args[0]} did not listen on {HOST}:{port} within {timeout}s")


def process_state(pid: int) -> str | None:
    """The state letter of a process (``Z``: exited, not yet reaped), ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _threads_running(pid: int) -> bool:
    """Whether any thread of ``pid`` is not stopped (a group stop reaches the threads one by one)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z"):
                    return True
        except (OSError, IndexError):
            continue
    return False


def wait_until_stopped(pids: list[int], timeout: float = 5.0) -> None:
    """Wait until every thread of every process of ``pids`` is stopped, or gone."""
    deadline = time.monotonic() + timeout
    while any(_threads_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} did not stop within {timeout} s")
        time.sleep(0.01)


def child_pids(parent: int) -> list[int]:
    """The live (not exited) child processes of ``parent``, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == parent and fields[0] != "Z":
                found.append(int(entry))
    return found


def stop_process(process: subprocess.Popen, timeout: float = 10.0, signum: int = signal.SIGTERM) -> None:
    if process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGCONT)
        os.kill(process.pid, signum)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    except ProcessLookupError:
        pass


class Server:
    """A server process on a free loopback port; ``start``/``stop``/``pause``/``resume`` by pid."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Server:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
        )
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def remove(self) -> None:
        """Stop for good, leaving nothing behind (``stop`` alone keeps data for a restart)."""
        self.stop()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its data and its port but answers nothing (a hung server).
        Returns once the kernel shows it stopped: a signal lands asynchronously, and on a busy machine
        a command sent right after kill() could still be served."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        wait_until_stopped([self.process.pid])

    def resume(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)


class Memcached(Server):
    """memcached with ``threads`` worker threads (the bench uses one, so that two client connections
    compared call by call are served alike, not by whichever thread each happened to land on), and
    with ``item_size``, items of at most that many bytes (its ``-I``; 1 MiB by default)."""

    def __init__(
        self, name: str = "memcached", port: int | None = None, threads: int = 2, item_size: int = 0
    ) -> None:
        super().__init__(name, port)
        self.threads = threads
        self.item_size = item_size

    def items(self, prefix: str = "") -> dict[str, dict[str, str]]:
        """The keys it holds that start with ``prefix``, with memcached's facts about each
        (``exp``: -1 for never; ``cas``: changed by every write), from ``lru_crawler metadump``."""
        with socket.create_connection((HOST, self.port), timeout=5) as sock:
            sock.sendall(b"lru_crawler metadump all\r\n")
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("memcached closed the connection during metadump")
                data += chunk
        found = {}
        for line in data.decode().splitlines():
            fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
            key = urllib.parse.unquote(fields.get("key", ""))
            if "key" in fields and key.startswith(prefix):
                found[key] = fields
        return found

    def command(self) -> list[str]:
        binary = shutil.which("memcached")
        if binary is None:
            raise RuntimeError("memcached is not installed: run `make test` (it installs it)")
        user = ["-u", "root"] if os.geteuid() == 0 else []
        return [
            binary,
            *user,
            "-l",
            HOST,
            "-p",
            str(self.port),
            "-U",
            "0",
            "-m",
            "64",
            "-t",
            str(self.threads),
            *(
                ["-I", str(self.item_size), "-o", f"slab_chunk_max={self.item_size // 2}"]
                if self.item_size
                else []
            ),
        ]


class Manager(Server):
    """A counter manager (``python -m tally.stores.manager``, COUNTER_STORE = "manager") on a Unix
    socket in a temporary directory of its own (``tcp``: on a free loopback port), with a key of its
    own and, with ``snapshot``, a snapshot file written every ``snapshot_interval`` s.  ``stop`` is
    SIGTERM (the final snapshot is written), ``crash`` SIGKILL; ``start`` again after either."""

    def __init__(self, *, tcp: bool = False, snapshot: bool = False, snapshot_interval: float = 1.0) -> None:
        super().__init__("manager")
        self.tcp = tcp
        self.directory = tempfile.mkdtemp(prefix="tally-manager-")
        self.socket_path = os.path.join(self.directory, "manager.sock")
        self.authkey = "k" + secrets.token_hex(32)  # a letter first: FLASK_* values parse as JSON
        self.snapshot = os.path.join(self.directory, "snapshot.json") if snapshot else None
        self.snapshot_interval = snapshot_interval

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}" if self.tcp else self.socket_path

    def settings(self) -> dict:
        return {
            "COUNTER_STORE": "manager",
            "COUNTER_MANAGER_ADDRESS": self.address,
            "COUNTER_MANAGER_AUTHKEY": self.authkey,
        }

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "tally.stores.manager", self.address]
        if self.snapshot:
            command += ["--snapshot", self.snapshot, "--snapshot-interval", str(self.snapshot_interval)]
        return command

    def start(self) -> Manager:
        from tally.stores.manager import answers

        with open(os.path.join(self.directory, "manager.log"), "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.PIPE, stdout=log, stderr=log, cwd=ROOT
            )
        assert self.process.stdin is not None
        self.process.stdin.write(self.authkey.encode().hex().encode() + b"\n")
        self.process.stdin.close()
        deadline = time.monotonic() + 15
        while not answers(self.address, timeout=0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the counter manager did not serve {self.address}: {self.log_text()}")
            time.sleep(0.02)
        return self

    def crash(self) -> None:
        """SIGKILL: no final snapshot, the socket file stays behind (stale)."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_text(self) -> str:
        with open(os.path.join(self.directory, "manager.log"), encoding="utf-8", errors="replace") as log:
            return log.read()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class Redis(Server):
    """redis-server with an AOF; ``appendfsync="always"`` (tests) keeps every acknowledged write
    across a kill, ``"everysec"`` (benchmarks) is Redis's usual production setting."""

    def __init__(self, port: int | None = None, appendfsync: str = "always") -> None:
        super().__init__("redis", port)
        self.appendfsync = appendfsync
        self.data_dir = tempfile.mkdtemp(prefix="tally-redis-")

    def remove(self) -> None:
        """Stop for good and delete the data directory (``stop`` keeps it, for a restart)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test` (it installs it)")
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--dir",
            self.data_dir,
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--protected-mode",
            "no",
        ]

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


class Gunicorn(Server):
    """gunicorn serving ``app`` with the project's gunicorn.conf.py (or plain flags for other apps)."""

    stop_signal = signal.SIGQUIT

    def __init__(
        self,
        env: dict[str, str],
        *,
        workers: int = 4,
        threads: int = 8,
        app: str = "app:app",
        use_project_config: bool = True,
        instance_path: str | None = None,
        worker_class: str | None = None,
    ) -> None:
        super().__init__("gunicorn")
        self.worker_class = worker_class  # None: gthread (sync with one thread); "gevent"
        self.env = env
        self.workers = workers
        self.threads = threads
        self.app = app
        self.use_project_config = use_project_config
        self._own_instance = instance_path is None  # made here, so removed here when stopped
        self.instance_path = instance_path or tempfile.mkdtemp(prefix="tally-instance-")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        base = [sys.executable, "-m", "gunicorn"]
        if self.use_project_config:
            return [*base, "-c", str(ROOT / "gunicorn.conf.py"), self.app]
        naive = [*base, "-c", str(ROOT / "tests" / "naive_gunicorn.conf.py"), self.app]
        return naive + (["--worker-class", self.worker_class] if self.worker_class else [])

    def start(self) -> Gunicorn:
        env = {
            **os.environ,
            "TALLY_BIND": self.address,
            "TALLY_WORKERS": str(self.workers),
            "TALLY_THREADS": str(self.threads),
            "TALLY_INSTANCE_PATH": self.instance_path,
            **({"TALLY_WORKER_CLASS": self.worker_class} if self.worker_class else {}),
            **self.env,
        }
        os.makedirs(self.instance_path, exist_ok=True)
        self.log_path = os.path.join(self.instance_path, f"gunicorn-{self.port}.log")
        with open(self.log_path, "ab") as log:
            # A session of its own: its workers form one process group, stopped together with it.
            self.process = subprocess.Popen(
                self.command(), cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True
            )
        wait_for_port(self.port, self.process, timeout=30)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/livez", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"gunicorn on {self.address} did not answer /livez")

    def stop(self) -> None:
        """SIGQUIT, gunicorn's quick shutdown: the workers exit at once instead of waiting up to
        graceful_timeout for idle keep-alive connections (10 s of a test's teardown, seen); the
        master still runs on_exit (the manager's final snapshot, the metrics directory).  Tests of
        the graceful stop send SIGTERM themselves."""
        if self.process is not None:
            stop_process(self.process, signum=self.stop_signal)
            with contextlib.suppress(ProcessLookupError):  # a worker that outlived its master (seen)
                os.killpg(self.process.pid, signal.SIGKILL)
        if self._own_instance:
            shutil.rmtree(self.instance_path, ignore_errors=True)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()


class FlaskDevServer(Gunicorn):
    """The same app under ``flask run --with-threads``: one process, a thread per request."""

    stop_signal = signal.SIGTERM  # SIGQUIT is gunicorn's; Python's default for it dumps core

    def command(self) -> list[str]:
        module = self.app.split(":")[0]
        return [
            sys.executable,
            "-m",
            "flask",
            "--app",
            module,
            "run",
            "--with-threads",
            "--host",
            HOST,
            "--port",
            str(self.port),
        ]

    def start(self) -> FlaskDevServer:
        if not self.use_project_config:  # the naive apps live in tests/
            self.env = {**self.env, "PYTHONPATH": str(ROOT / "tests")}
        return super().start()  # type: ignore[return-value]


class DevServer(Gunicorn):
    """The app under Werkzeug's own server, ``app.run(threaded=True)`` or ``app.run(processes=N)``
    (``model`` is "threaded" or "processes=N"), as the seed thread suggests."""

    stop_signal = signal.SIGTERM  # SIGQUIT is gunicorn's; Python's default for it dumps core

    def __init__(self, env: dict[str, str], model: str, **options) -> None:
        super().__init__(env, **options)
        paths = [str(ROOT)] if self.app == "app:app" else [str(ROOT), str(ROOT / "tests")]  # naive apps
        self.env = {**env, "PYTHONPATH": os.pathsep.join(paths)}
        self.model = model

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "tests" / "dev_server.py"), str(self.port), self.model, self.app]


def postgres_binary(name: str) -> str:
    """initdb / postgres from PATH, else Debian's versioned directory (not on PATH there)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed: run `make test` (it installs it)")
    return str(candidates[-1])


class Postgres(Server):
    """A PostgreSQL cluster of its own in a temporary directory, on a free loopback port, trust
    authentication on loopback.  initdb and postgres refuse to run as root: as root they run as the
    ``postgres`` user.  ``stop`` is a fast shutdown of the postmaster by pid; ``crash`` kills it and
    every backend with SIGKILL (a power cut, as far as the server can tell); ``start`` again recovers."""

    def __init__(self) -> None:
        super().__init__("postgres")
        self.user = "postgres" if os.geteuid() == 0 else None
        self.data_dir = tempfile.mkdtemp(prefix="tally-postgres-")
        if self.user:
            shutil.chown(self.data_dir, self.user)
        subprocess.run(
            [postgres_binary("initdb"), "-D", self.data_dir, "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.user,
            cwd="/",
        )

    def command(self) -> list[str]:
        return [
            postgres_binary("postgres"),
            "-D",
            self.data_dir,
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={self.data_dir}",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=32MB",
            # The tests crash the server, never the machine: commits are written to the OS at once
            # (they survive kill -9) but not fsynced, which a shared CI disk makes slow and uneven.
            "-c",
            "fsync=off",
        ]

    def start(self) -> Postgres:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user=self.user, cwd="/"
        )
        wait_for_port(self.port, self.process, timeout=30)
        self.wait_accepting()
        return self

    def wait_accepting(self, timeout: float = 30.0) -> None:
        """The port opens before the server takes queries (and after a crash it recovers first)."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.conninfo, connect_timeout=2) as connection:
                    connection.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _all_pids(self) -> list[int]:
        assert self.process is not None
        return [self.process.pid, *child_pids(self.process.pid)]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            os.kill(self.process.pid, signal.SIGINT)  # fast shutdown: no waiting for clients
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.crash()

    def crash(self) -> None:
        """SIGKILL the postmaster and its backends; committed transactions survive in the WAL."""
        assert self.process is not None
        for pid in self._all_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=15)

    def pause(self) -> None:
        pids = self._all_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        wait_until_stopped(pids)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            for pid in self._all_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    @property
    def conninfo(self) -> str:
        return f"host={HOST} port={self.port} user=postgres dbname=postgres"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/postgres"


class PostgresStandby(Postgres):
    """A streaming standby of ``primary``, made by ``pg_basebackup -R`` on a free loopback port of
    its own; ``promote`` makes it a primary (``pg_promote``).  Stopped and removed by pid, as every
    Postgres here."""

    def __init__(self, primary: Postgres, via: int | None = None) -> None:
        """``via``: the port the standby reaches the primary at (a ``tests.links.Link``), else its own.
        No initdb: the base backup is the data directory."""
        Server.__init__(self, "postgres")
        self.user = primary.user
        self.data_dir = tempfile.mkdtemp(prefix="tally-postgres-standby-")
        if self.user:
            shutil.chown(self.data_dir, self.user)
        subprocess.run(
            [
                postgres_binary("pg_basebackup"),
                "-h",
                HOST,
                "-p",
                str(via or primary.port),
                "-U",
                "postgres",
                "-D",
                self.data_dir,
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=self.user,
            cwd="/",
            timeout=60,
        )

    def promote(self) -> None:
        import psycopg

        with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=2) as connection:
            connection.execute("SELECT pg_promote(wait => true, wait_seconds => 30)")
