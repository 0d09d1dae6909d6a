"""Redis topologies for tests and benchmarks, on free loopback ports, every process stopped by its pid:

- ``SentinelTopology``: one primary, two replicas, three sentinels (``redis-server --sentinel``), with
  a one-second ``down-after-milliseconds`` so that a failover completes in seconds; with
  ``partitionable`` the replicas, the sentinels and the clients that ask them reach the primary
  through ``primary_link`` (a ``tests.links.Link``), which a test can cut;
- ``ClusterTopology``: three primaries and three replicas, built by ``redis-cli --cluster create``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from tests.links import Link
from tests.servers import HOST, ROOT, free_port, stop_process, wait_for_port, wait_until_stopped

MASTER_NAME = "tally"


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 40000)
        if _port_is_free(port) and _port_is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make test` (it installs it)")
    return binary


def command(port: int, *args: str, timeout: float = 5.0) -> bytes:
    """One command to a server on loopback, answered in RESP (what ``redis-cli`` prints is parsed
    by the callers that need it)."""
    result = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return result.stdout


def wait_until(check, what: str, timeout: float = 30.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise RuntimeError(f"{what} did not happen within {timeout}s")


class RedisNode:
    """One redis-server (a primary, a replica, a cluster node or a sentinel) in its own directory."""

    def __init__(self, directory: str, port: int, *args: str, sentinel_config: str | None = None):
        self.port = port
        self.directory = os.path.join(directory, str(port))
        os.makedirs(self.directory, exist_ok=True)
        self.args = list(args)
        self.sentinel_config = sentinel_config
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> RedisNode:
        if self.sentinel_config is not None:
            config = os.path.join(self.directory, "sentinel.conf")
            if not os.path.exists(config):  # a sentinel rewrites its file; keep it across restarts
                with open(config, "w") as file:
                    file.write(self.sentinel_config)
            argv = [redis_binary(), config, "--sentinel"]
        else:
            argv = [redis_binary()]
        argv += ["--port", str(self.port), "--bind", HOST, "--protected-mode", "no", "--dir", self.directory]
        argv += ["--save", "", *self.args]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        wait_for_port(self.port, self.process)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def kill(self) -> None:
        """SIGKILL: a crash; whatever was not yet replicated or written is gone."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)
        wait_until_stopped([self.process.pid])

    def resume(self) -> None:
        if self.alive():
            os.kill(self.process.pid, signal.SIGCONT)

    def info(self, section: str = "replication") -> dict[str, str]:
        text = command(self.port, "INFO", section).decode(errors="replace")
        return dict(
            line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#")
        )


class SentinelTopology:
    """A primary, two replicas and three sentinels watching them as ``MASTER_NAME`` (quorum 2)."""

    def __init__(
        self, *, down_after_ms: int = 1000, failover_timeout_ms: int = 3000, partitionable: bool = False
    ) -> None:
        self.directory = tempfile.mkdtemp(prefix="tally-sentinel-")
        node_args = ("--appendonly", "yes", "--appendfsync", "everysec")
        self.primary = RedisNode(self.directory, free_port(), *node_args)
        self.primary_link = Link(self.primary.address) if partitionable else None
        # The address everyone but the tests reaches the primary at (and the sentinels name).
        self._aliases = {self.primary_link.address: self.primary.address} if self.primary_link else {}
        reached_at = str(self.primary_link.port if self.primary_link else self.primary.port)
        self.replicas = [
            RedisNode(self.directory, free_port(), *node_args, "--replicaof", HOST, reached_at)
            for _ in range(2)
        ]
        config = (
            f"sentinel monitor {MASTER_NAME} {HOST} {reached_at} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 2\n"
        )
        self.sentinels = [RedisNode(self.directory, free_port(), sentinel_config=config) for _ in range(3)]

    @property
    def data_nodes(self) -> list[RedisNode]:
        return [self.primary, *self.replicas]

    @property
    def sentinel_addresses(self) -> list[list]:
        return [[HOST, node.port] for node in self.sentinels]

    def start(self) -> SentinelTopology:
        if self.primary_link is not None:
            self.primary_link.start()
        for node in self.data_nodes:
            node.start()
        wait_until(
            lambda: (
                self.primary.info().get("connected_slaves") == "2"
                and all(r.info().get("master_link_status") == "up" for r in self.replicas)
            ),
            "replication of both replicas",
        )
        for node in self.sentinels:
            node.start()
        wait_until(self.sentinels_agree, "three sentinels knowing each other and both replicas")
        return self

    def sentinels_agree(self) -> bool:
        for node in self.sentinels:
            text = command(node.port, "SENTINEL", "MASTER", MASTER_NAME).decode(errors="replace").split()
            facts = dict(zip(text[::2], text[1::2], strict=False))
            if facts.get("num-slaves") != "2" or facts.get("num-other-sentinels") != "2":
                return False
        return True

    def master_address(self) -> str | None:
        """What the sentinels now name as the primary (``host:port``), by majority."""
        seen = []
        for node in self.sentinels:
            if node.alive():
                reply = command(node.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME).split()
                if len(reply) == 2:
                    address = f"{reply[0].decode()}:{reply[1].decode()}"
                    seen.append(self._aliases.get(address, address))
        return max(set(seen), key=seen.count) if seen else None

    def current_primary(self) -> RedisNode:
        address = self.master_address()
        for node in self.data_nodes:
            if node.address == address:
                return node
        raise RuntimeError(f"the sentinels name {address}, which is none of the data nodes")

    def wait_for_promotion(self, old: RedisNode, timeout: float = 30.0) -> RedisNode:
        """Wait until the sentinels name a primary other than ``old`` and it accepts writes."""

        def promoted() -> bool:
            address = self.master_address()
            if address is None or address == old.address:
                return False
            node = next(n for n in self.data_nodes if n.address == address)
            return node.info().get("role") == "master"

        wait_until(promoted, "a failover to a new primary", timeout=timeout)
        return self.current_primary()

    def remove(self) -> None:
        if self.primary_link is not None:
            self.primary_link.stop()
        for node in [*self.sentinels, *self.data_nodes]:
            node.resume()
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


class ClusterTopology:
    """Three primaries and three replicas (one each), a one-second ``cluster-node-timeout``."""

    def __init__(self, *, node_timeout_ms: int = 1000) -> None:
        self.directory = tempfile.mkdtemp(prefix="tally-cluster-")
        self.nodes = [
            RedisNode(
                self.directory,
                free_cluster_port(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            )
            for _ in range(6)
        ]

    @property
    def startup_nodes(self) -> str:
        """``CACHE_REDIS_CLUSTER``: every node, as Flask-Caching spells it."""
        return ",".join(node.address for node in self.nodes)

    def start(self) -> ClusterTopology:
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes)]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-2000:]!r}")
        wait_until(self.healthy, "cluster_state:ok on every node with three primaries and three replicas")
        return self

    def healthy(self) -> bool:
        live = [node for node in self.nodes if node.alive()]
        for node in live:
            if node.info("cluster").get("cluster_enabled") != "1":
                return False
            text = command(node.port, "CLUSTER", "INFO").decode(errors="replace")
            if "cluster_state:ok" not in text:
                return False
        roles = [node.info().get("role") for node in live]
        return roles.count("master") == 3 and all(
            node.info().get("master_link_status") == "up"
            for node in live
            if node.info().get("role") == "slave"
        )

    def primaries(self) -> list[RedisNode]:
        return [node for node in self.nodes if node.alive() and node.info().get("role") == "master"]

    def replicas_of(self, primary: RedisNode) -> list[RedisNode]:
        return [
            node
            for node in self.nodes
            if node.alive()
            and node.info().get("role") == "slave"
            and node.info().get("master_port") == str(primary.port)
        ]

    def owner_of(self, key: str) -> RedisNode:
        """The primary that holds ``key``'s slot now."""
        slot = int(command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key).strip() or -1)
        for node in self.primaries():
            reply = command(node.port, "CLUSTER", "COUNTKEYSINSLOT", str(slot))
            if reply.strip().isdigit() and self._owns(node, slot):
                return node
        raise RuntimeError(f"no primary owns slot {slot}")

    def _owns(self, node: RedisNode, slot: int) -> bool:
        text = command(node.port, "CLUSTER", "NODES").decode(errors="replace")
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 8 and "myself" in fields[2]:
                for part in fields[8:]:
                    low, _, high = part.partition("-")
                    if low.isdigit() and int(low) <= slot <= int(high or low):
                        return True
        return False

    def wait_for_promotion(self, old: RedisNode, timeout: float = 30.0) -> None:
        def promoted() -> bool:
            live = [n for n in self.nodes if n.alive()]
            masters = [n for n in live if n.info().get("role") == "master"]
            return len(masters) == 3 and all(
                "cluster_state:ok" in command(n.port, "CLUSTER", "INFO").decode(errors="replace")
                for n in live
            )

        wait_until(promoted, f"a replica of {old.address} promoted and the cluster ok", timeout=timeout)

    def remove(self) -> None:
        for node in self.nodes:
            node.resume()
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
