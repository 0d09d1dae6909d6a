"""Tally as a Flask extension in an app that is not Tally's: defaults, checks, and the store chosen
from the app's own Flask-Caching setup, whatever the spelling and wherever the settings were given."""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import pytest
from flask import Flask
from flask_caching import Cache
from pymemcache.client.base import Client as RawMemcached

from tally import ConfigError, Counters, InvalidAmount, InvalidName, SharedValues
from tally.config import DEFAULTS


def new_app(tmp_path: Path, **config) -> Flask:
    app = Flask("someone_elses_app", instance_path=str(tmp_path / "instance"))
    app.config.update(config)
    return app


def test_a_minimal_app_gets_every_default(tmp_path):
    """The issue's report: CACHE_TYPE, Cache(app), Counters(app), then incr crashed on COUNTER_DIR."""
    app = new_app(tmp_path, CACHE_TYPE="FileSystemCache", CACHE_DIR=str(tmp_path / "page-cache"))
    Cache(app)
    counters = Counters(app)
    with app.app_context():
        assert [counters.incr("x") for _ in range(3)] == [1, 2, 3]
    assert all(key in app.config for key in DEFAULTS)
    assert (tmp_path / "instance" / "counters").is_dir()  # in the instance folder, not CACHE_DIR


def test_an_app_with_no_cache_settings_uses_the_embedded_filesystem_store(tmp_path):
    app = new_app(tmp_path)
    counters = Counters(app)
    with app.app_context():
        assert counters.incr("x") == 1
        assert counters.store.backend == "filesystem"


def test_the_apps_own_values_win_over_the_defaults(tmp_path):
    app = new_app(tmp_path, COUNTER_TIMEOUT=0.25, COUNTER_DIR=tmp_path / "mine")
    Counters(app)
    assert app.config["COUNTER_TIMEOUT"] == 0.25
    assert app.config["COUNTER_POOL_SIZE"] == DEFAULTS["COUNTER_POOL_SIZE"]
    assert app.extensions["tally"].directory == str(tmp_path / "mine")


@pytest.mark.parametrize(
    "spelling",
    [
        "filesystem",
        "FileSystemCache",
        "flask_caching.backends.FileSystemCache",
        "flask_caching.backends.filesystemcache.FileSystemCache",
    ],
)
def test_every_spelling_of_the_filesystem_backend_and_a_path(tmp_path, spelling):
    app = new_app(tmp_path, CACHE_TYPE=spelling, CACHE_DIR=Path(tmp_path / "cache"))
    counters = Counters(app)
    with app.app_context():
        assert counters.incr("x") == 1
        assert counters.store.backend == "filesystem"


@pytest.mark.parametrize(
    "spelling,backend",
    [("redis", "redis"), ("RedisCache", "redis"), ("flask_caching.backends.RedisCache", "redis")],
)
def test_every_spelling_of_redis(tmp_path, redis_server, spelling, backend):
    app = new_app(tmp_path, CACHE_TYPE=spelling, CACHE_REDIS_URL=redis_server.url)
    app.config["COUNTER_KEY_PREFIX"] = f"ext{uuid.uuid4().hex[:8]}:"
    counters = Counters(app)
    with app.app_context():
        assert counters.incr("x") == 1 and counters.store.backend == backend


def test_counters_follow_config_given_only_to_cache_init_app(tmp_path, memcached_server):
    """The seed's layout: Cache() and Counters(cache) at import, settings passed to cache.init_app."""
    cache = Cache()
    counters = Counters(cache)
    app = new_app(tmp_path, COUNTER_KEY_PREFIX=f"seed{uuid.uuid4().hex[:8]}:")
    cache.init_app(
        app, config={"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [memcached_server.address]}
    )
    counters.init_app(app)
    with app.app_context():
        assert counters.store.backend == "memcached"
        assert counters.incr("seen") == 1
    raw = RawMemcached(("127.0.0.1", memcached_server.port))
    assert raw.get(app.config["COUNTER_KEY_PREFIX"] + "seen") is not None  # on that very server


def test_counters_follow_a_redis_cache_set_up_with_init_app_config(tmp_path, redis_server):
    import redis

    cache = Cache()
    counters = Counters(cache)
    url = redis_server.url.replace("/0", "/5")
    app = new_app(tmp_path, COUNTER_KEY_PREFIX=f"seed{uuid.uuid4().hex[:8]}:")
    cache.init_app(app, config={"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": url})
    counters.init_app(app)
    with app.app_context():
        assert counters.incr("seen") == 1
    assert redis.Redis.from_url(url).get(app.config["COUNTER_KEY_PREFIX"] + "seen") is not None


class LooksValid(str):
    """A str that equals, and hashes like, a name already checked: never taken for it."""

    def __eq__(self, other: object) -> bool:
        return True

    def __hash__(self) -> int:
        return hash("known")


@pytest.mark.parametrize(
    "name",
    ["", "-x", "a/b", "../known", "x" * 65, "known\n", LooksValid("../../etc/passwd"), 5, None, b"known"],
)
def test_a_bad_name_is_refused_even_once_good_ones_are_remembered(tmp_path, name):
    """incr, decr and get remember the names they checked (plain str only) and check amounts inline:
    whatever was refused before still is, before any step, and the counter is unchanged."""
    app = new_app(tmp_path)
    counters = Counters(app)
    with app.app_context():
        assert counters.incr("known") == 1  # checked, then remembered
        for call in (counters.incr, counters.decr, counters.get):
            with pytest.raises(InvalidName):
                call(name)
        assert counters.get("known") == 1


@pytest.mark.parametrize("by", [0, -1, 2**63, True, False, 1.0, "1", None])
def test_a_bad_amount_is_refused_by_incr_and_decr(tmp_path, by):
    app = new_app(tmp_path)
    counters = Counters(app)
    with app.app_context():
        for call in (counters.incr, counters.decr):
            with pytest.raises(InvalidAmount):
                call("known", by)
        assert counters.get("known") == 0
        assert counters.incr("known", 2**63 - 1) == 2**63 - 1 and counters.decr("known", 2**63 - 1) == 0


def test_counters_outside_an_app_context_raise_as_current_app_does(tmp_path):
    counters = Counters(new_app(tmp_path))
    for call in (lambda: counters.incr("x"), lambda: counters.decr("x"), lambda: counters.get("x")):
        with pytest.raises(RuntimeError, match="application context"):
            call()


def test_shared_values_alone_set_up_the_store(tmp_path):
    app = new_app(tmp_path, CACHE_TYPE="SimpleCache")
    shared = SharedValues(app)
    with app.app_context():
        assert shared.update("v", lambda n: n + 1, default=0) == 1
        assert app.extensions["tally"].backend == "memory"


def test_counters_and_shared_values_share_one_store(tmp_path):
    cache = Cache()
    counters, shared = Counters(cache), SharedValues(cache)
    app = new_app(tmp_path)
    cache.init_app(app, config={"CACHE_TYPE": "SimpleCache"})
    counters.init_app(app)
    shared.init_app(app)
    with app.app_context():
        assert counters.store is shared.store


@pytest.mark.parametrize("cache_type", ["NullCache", "null", "UWSGICache", "SASLMemcachedCache", "Nope"])
def test_a_backend_tally_cannot_make_atomic_is_refused_naming_the_supported_ones(tmp_path, cache_type):
    app = new_app(tmp_path, CACHE_TYPE=cache_type)
    from tally.config import supported_cache_types

    supported = ", ".join(supported_cache_types())
    assert "FileSystemCache" in supported and "RedisCache" in supported
    with pytest.raises(ConfigError, match=f"{cache_type}.*{supported}"):
        Counters(app)


def test_a_null_cache_given_as_the_cache_is_refused(tmp_path):
    cache = Cache()
    app = new_app(tmp_path)
    with warnings.catch_warnings():  # Flask-Caching warns of NullCache since 2.3.1's successor
        warnings.simplefilter("ignore")
        cache.init_app(app, config={"CACHE_TYPE": "NullCache"})
    with pytest.raises(ConfigError, match="NullCache.*stores nothing"):
        Counters(cache).init_app(app)


def test_counters_of_a_cache_that_was_not_set_up_say_what_to_call(tmp_path):
    with pytest.raises(ConfigError, match=r"cache.init_app\(app\) before counters.init_app"):
        Counters(Cache()).init_app(new_app(tmp_path))


@pytest.mark.parametrize(
    "key,bad",
    [("COUNTER_TIMEOUT", 0), ("COUNTER_FSYNC", "yes"), ("COUNTER_POOL_SIZE", 1.5), ("COUNTER_DIR", "")],
)
def test_a_bad_value_fails_at_init_app_naming_the_key(tmp_path, key, bad):
    with pytest.raises(ConfigError, match=key):
        Counters(new_app(tmp_path, **{key: bad}))


def test_counters_never_share_cache_dir(tmp_path):
    same = tmp_path / "both"
    with pytest.raises(ConfigError, match="COUNTER_DIR"):
        Counters(new_app(tmp_path, CACHE_TYPE="FileSystemCache", CACHE_DIR=same, COUNTER_DIR=same))
    with pytest.raises(ConfigError, match="COUNTER_DIR"):  # nor hold it: their sweep owns the directory
        Counters(new_app(tmp_path, CACHE_TYPE="FileSystemCache", CACHE_DIR=same / "c", COUNTER_DIR=same))


def test_memcached_servers_given_as_one_string_are_refused(tmp_path):
    """Flask-Caching would take the string for a client object and fail at the first request."""
    app = new_app(tmp_path, CACHE_TYPE="MemcachedCache", CACHE_MEMCACHED_SERVERS="127.0.0.1:11211")
    with pytest.raises(ConfigError, match="CACHE_MEMCACHED_SERVERS"):
        Counters(app)


def test_every_registered_store_is_tested():
    """Each store in the registry is run by the tests (tests/conftest.py VARIANTS), and none is
    missing its client library here: a store added without tests, or one whose module fails to
    import, would otherwise drop out of every parametrised test without a word."""
    from tally.stores import MISSING, REGISTRY
    from tests.conftest import VARIANTS

    assert MISSING == {}
    assert set(VARIANTS.values()) == set(REGISTRY)
