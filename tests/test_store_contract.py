"""The store contract (``tests/store_contract.py``) on every test backend: one subclass each.

A new store (or a new server for one, a line in ``tests.conftest.VARIANTS``) gets the whole contract
by adding one subclass here; ``test_every_test_backend_has_a_contract_subclass`` fails until it does.
"""

from __future__ import annotations

import pytest

# The contract's asserts live outside a test module: have pytest rewrite them too, so that a failure
# shows the values compared (before the module is first imported).
pytest.register_assert_rewrite("tests.store_contract")

from tests.conftest import VARIANTS  # noqa: E402
from tests.store_contract import StoreContract  # noqa: E402


class TestFilesystem(StoreContract):
    backend = "filesystem"


class TestMemory(StoreContract):
    backend = "memory"


class TestMemcached(StoreContract):
    backend = "memcached"


class TestRedis(StoreContract):
    backend = "redis"


class TestRedisSentinel(StoreContract):
    backend = "redis-sentinel"


class TestRedisCluster(StoreContract):
    backend = "redis-cluster"


class TestSqlite(StoreContract):
    backend = "sqlite"


class TestPostgresql(StoreContract):
    backend = "postgresql"


class TestManager(StoreContract):
    backend = "manager"


def contract_subclasses() -> list[type[StoreContract]]:
    return [
        value
        for value in globals().values()
        if isinstance(value, type) and issubclass(value, StoreContract) and value is not StoreContract
    ]


def test_every_test_backend_has_a_contract_subclass():
    backends = [cls.backend for cls in contract_subclasses()]
    assert len(backends) == len(set(backends)), "two subclasses run one backend"
    assert set(backends) == set(VARIANTS)
