"""The fault harness of the PostgreSQL high-availability tests: a primary and a streaming standby
(``pg_basebackup -R``) on free loopback ports, with a ``tests.links.Link`` on each path that can fail:
the app to the primary, the app to the standby, and the standby to the primary (replication).

``url`` is the multi-host URL an app uses (both servers, through their links, read-write wanted);
``crash_primary`` is kill -9 of every process of the primary; ``promote`` does what a failover
manager does after it: promote the standby and clear ``synchronous_standby_names`` on it (a new
primary with no standby of its own would otherwise wait for one forever).  Every process is stopped
by pid in ``remove``.
"""

from __future__ import annotations

import time

import psycopg

from tests.links import Link
from tests.servers import HOST, Postgres, PostgresStandby


def configure(server: Postgres, **settings: str) -> None:
    with psycopg.connect(server.conninfo, autocommit=True, connect_timeout=2) as connection:
        for name, value in settings.items():
            connection.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        connection.execute("SELECT pg_reload_conf()")


class PostgresPair:
    def __init__(self, *, synchronous: bool) -> None:
        self.synchronous = synchronous
        self.primary = Postgres()
        self.standby: PostgresStandby | None = None
        self.links: list[Link] = []

    def start(self) -> PostgresPair:
        self.primary.start()
        self.replication = self._link(self.primary.address)
        self.standby = PostgresStandby(self.primary, via=self.replication.port).start()
        # After the base backup, so that the standby's own copy of the setting stays empty.
        configure(self.primary, synchronous_standby_names="*" if self.synchronous else "")
        self.wait_streaming()
        self.to_primary = self._link(self.primary.address)
        self.to_standby = self._link(self.standby.address)
        return self

    def _link(self, upstream: str) -> Link:
        link = Link(upstream).start()
        self.links.append(link)
        return link

    @property
    def url(self) -> str:
        return (
            f"postgresql+psycopg://postgres@/postgres?host={self.to_primary.address}"
            f"&host={self.to_standby.address}&target_session_attrs=read-write"
        )

    @property
    def primary_url(self) -> str:
        """The old primary alone, not through its link: a client the partition leaves beside it."""
        return f"postgresql+psycopg://postgres@{HOST}:{self.primary.port}/postgres"

    def wait_streaming(self, within: float = 20.0) -> None:
        wanted = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + within
        while True:
            with psycopg.connect(self.primary.conninfo, autocommit=True, connect_timeout=2) as connection:
                states = [row[0] for row in connection.execute("SELECT sync_state FROM pg_stat_replication")]
            if wanted in states:
                return
            assert time.monotonic() < deadline, f"the standby is not streaming ({wanted}): {states}"
            time.sleep(0.1)

    def isolate_primary(self) -> None:
        """A partition: the primary can reach neither the standby nor the app (through the links);
        it keeps running, and whatever still reaches it directly can still talk to it."""
        self.replication.cut()
        self.to_primary.cut()

    def crash_primary(self) -> None:
        """kill -9 of the primary; what it sent that was still in the replication link is lost."""
        self.primary.crash()
        self.replication.reset()

    def promote(self) -> None:
        assert self.standby is not None
        self.standby.promote()
        configure(self.standby, synchronous_standby_names="")

    def remove(self) -> None:
        for link in self.links:
            link.stop()
        if self.standby is not None:
            self.standby.remove()
        self.primary.remove()
