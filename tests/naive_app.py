"""Deliberately naive shared counters, to show that the race checks do catch a race.

Never used by the app: only the tests and ``make race-report`` serve this module
(``gunicorn naive_app:app`` or ``flask --app naive_app run --with-threads``).  The cache backend is
the filesystem, or memcached when NAIVE_MEMCACHED_SERVERS (a comma-separated list) is set.
"""

import os
import tempfile

from flask import Flask, jsonify, request
from flask_caching import Cache


class SomeObj:
    """The original question's global object."""

    def __init__(self, param):
        self.param = param

    def query(self):
        self.param += 1
        return self.param


global_obj = SomeObj(0)

app = Flask(__name__)
if os.environ.get("NAIVE_MEMCACHED_SERVERS"):
    cache_config = {
        "CACHE_TYPE": "MemcachedCache",
        "CACHE_MEMCACHED_SERVERS": os.environ["NAIVE_MEMCACHED_SERVERS"].split(","),
        "CACHE_KEY_PREFIX": "naive:",
    }
else:
    cache_config = {
        "CACHE_TYPE": "FileSystemCache",
        # Under the server's instance folder (tests/servers.py removes it), never a stray temp dir.
        "CACHE_DIR": os.environ.get("NAIVE_CACHE_DIR")
        or os.path.join(os.environ.get("TALLY_INSTANCE_PATH") or tempfile.gettempdir(), "naive-cache"),
    }
cache = Cache(app, config=cache_config)


@app.post("/global/<name>/incr")
def global_incr(name):
    return jsonify(value=global_obj.query())


@app.post("/cache-getset/<name>/incr")
def cache_getset(name):
    """What most answers suggest: read the value from the cache, add one, write it back."""
    value = (cache.get(name) or 0) + 1
    cache.set(name, value, timeout=0)
    return jsonify(value=value)


@app.post("/cache-inc/<name>/incr")
def cache_inc(name):
    """Flask-Caching's own increment: on the filesystem and memcached backends, a get then a set."""
    return jsonify(value=cache.cache.inc(name))


@app.post("/naive-set/<key>/add")
def naive_set_add(key):
    """A shared set through cache.get then cache.set: concurrent adds overwrite each other."""
    members = set(cache.get(key) or [])
    members.add(request.get_json()["member"])
    cache.set(key, sorted(members), timeout=0)
    return jsonify(value=len(members))


@app.get("/naive-set/<key>")
def naive_set_read(key):
    return jsonify(value=cache.get(key) or [])


if os.environ.get("NAIVE_REDIS_URL"):
    import redis

    raw_redis = redis.Redis.from_url(os.environ["NAIVE_REDIS_URL"])

    @app.post("/raw/<name>/incr")
    def raw_redis_incr(name):
        """The raw client in a bare view (no validation, no error mapping): what Tally's route is
        measured against in ``make bench``."""
        return jsonify(value=raw_redis.incrby(name, 1))

elif os.environ.get("NAIVE_MEMCACHED_SERVERS"):
    import pylibmc

    raw_pool = pylibmc.ThreadMappedPool(
        pylibmc.Client(cache_config["CACHE_MEMCACHED_SERVERS"], behaviors={"tcp_nodelay": True})
    )

    @app.post("/raw/<name>/incr")
    def raw_memcached_incr(name):
        """The raw client in a bare view: memcached's own incr (the bench creates the key first)."""
        with raw_pool.reserve() as client:
            return jsonify(value=client.incr(name, 1))


if os.environ.get("NAIVE_DATABASE_URL"):
    from sqlalchemy import create_engine, text

    engine = create_engine(os.environ["NAIVE_DATABASE_URL"], pool_size=16, max_overflow=0)
    with engine.begin() as setup:
        setup.execute(
            text("CREATE TABLE IF NOT EXISTS naive_counters (name VARCHAR(64) PRIMARY KEY, value BIGINT)")
        )

    @app.post("/naive-sql/<name>/incr")
    def naive_sql_incr(name):
        """SELECT the value, add one in Python, UPDATE it: what a first database answer writes.  Two
        requests that read the same value both write value + 1 (read committed: no lock is held)."""
        with engine.begin() as connection:
            found = connection.execute(text("SELECT value FROM naive_counters WHERE name = :n"), {"n": name})
            current = found.scalar()
            if current is None:
                connection.execute(
                    text(
                        "INSERT INTO naive_counters (name, value) VALUES (:n, 0)"
                        " ON CONFLICT (name) DO NOTHING"
                    ),
                    {"n": name},
                )
                current = 0
            value = current + 1
            connection.execute(
                text("UPDATE naive_counters SET value = :v WHERE name = :n"), {"v": value, "n": name}
            )
        return jsonify(value=value)


@app.get("/livez")
def livez():
    return jsonify(status="ok")
