"""A Flask app written the way the seed's answer is, with Tally added: no Tally settings at all.

EXAMPLE_STORE picks the cache: "filesystem" (EXAMPLE_CACHE_DIR, given as a ``Path``), "memcached"
(EXAMPLE_MEMCACHED, "host:port"), "redis" (EXAMPLE_REDIS_URL); "seed-spelling" is the seed's own
``"filesystem"`` in ``app.config`` with ``Counters(app)`` and no Flask-Caching (which, from version 2
on, no longer knows that spelling).  With EXAMPLE_LIMIT (e.g. "20 per minute"), ``POST /limited`` is
limited by Flask-Limiter on ``tally://``, the README's lines: the counters' own store.
"""

import os
from pathlib import Path

from flask import Flask, jsonify

from common import cache, counters
from tally import Counters


def cache_config() -> dict:
    store = os.environ["EXAMPLE_STORE"]
    if store == "filesystem":
        return {"CACHE_TYPE": "FileSystemCache", "CACHE_DIR": Path(os.environ["EXAMPLE_CACHE_DIR"])}
    if store == "memcached":
        return {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [os.environ["EXAMPLE_MEMCACHED"]]}
    return {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": os.environ["EXAMPLE_REDIS_URL"]}


def create_app() -> Flask:
    app = Flask(__name__)
    if os.environ["EXAMPLE_STORE"] == "seed-spelling":
        app.config.update(CACHE_TYPE="filesystem", CACHE_DIR=Path(os.environ["EXAMPLE_CACHE_DIR"]))
        app.extensions["example_counters"] = Counters(app)
    else:
        cache.init_app(app, config=cache_config())
        counters.init_app(app)
        app.extensions["example_counters"] = counters

    @app.post("/hits")
    def hit():
        return jsonify(value=app.extensions["example_counters"].incr("hits"))

    @app.post("/named/<name>")
    def named(name):
        return jsonify(value=app.extensions["example_counters"].incr(name))

    if os.environ.get("EXAMPLE_LIMIT"):
        from flask_limiter import Limiter
        from flask_limiter.util import get_remote_address

        limiter = Limiter(
            get_remote_address,
            app=app,
            storage_uri="tally://",
            storage_options={"counters": app.extensions["example_counters"]},
        )

        @app.post("/limited")
        @limiter.limit(os.environ["EXAMPLE_LIMIT"])
        def limited():
            return jsonify(value=app.extensions["example_counters"].incr("limited"))

    @app.get("/livez")
    def livez():
        return jsonify(status="ok")

    return app


app = create_app()
