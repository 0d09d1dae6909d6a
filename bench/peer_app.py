"""What ``make bench`` compares Tally's counter route with, served by gunicorn with an empty config.

- ``peer_app:bare``: a bare Flask view, ``jsonify(name=name, value=1)``, touching no store: the upper
  bound of any counter route in Flask.
- ``peer_app:app``: the three-line Flask-Caching view a user would write instead of Tally,
  ``cache.cache.inc(name)``, on the backend that PEER_CACHE_TYPE names (``RedisCache`` with
  PEER_REDIS_URL: an atomic ``INCRBY``; ``MemcachedCache`` with PEER_MEMCACHED_SERVERS: cachelib's
  increment, which is not atomic there).

Never used by the app or the tests; the routes are the same path as Tally's, so one wrk command line
drives either side.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify

bare = Flask("bare")


@bare.post("/api/counters/<name>/incr")
def bare_incr(name: str):
    return jsonify(name=name, value=1)


@bare.get("/livez")
def bare_livez():
    return jsonify(status="ok")


app = Flask("peer")

if os.environ.get("PEER_CACHE_TYPE"):
    from flask_caching import Cache

    config = {"CACHE_TYPE": os.environ["PEER_CACHE_TYPE"], "CACHE_KEY_PREFIX": "peer:"}
    if os.environ.get("PEER_REDIS_URL"):
        config["CACHE_REDIS_URL"] = os.environ["PEER_REDIS_URL"]
    if os.environ.get("PEER_MEMCACHED_SERVERS"):
        config["CACHE_MEMCACHED_SERVERS"] = os.environ["PEER_MEMCACHED_SERVERS"].split(",")
    cache = Cache(app, config=config)

    @app.post("/api/counters/<name>/incr")
    def peer_incr(name: str):
        return jsonify(name=name, value=cache.cache.inc(name))


@app.get("/livez")
def peer_livez():
    return jsonify(status="ok")
