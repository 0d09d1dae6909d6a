"""Deliberately naive shared counters, to show that the race tests do catch a race.

Never used by the app: only the tests serve this module (``gunicorn naive_app:app``).
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
cache = Cache(
    app,
    config={
        "CACHE_TYPE": "FileSystemCache",
        "CACHE_DIR": os.environ.get("NAIVE_CACHE_DIR") or tempfile.mkdtemp(prefix="naive-cache-"),
    },
)


@app.post("/global/<name>/incr")
def global_incr(name):
    return jsonify(value=global_obj.query())


@app.post("/cache-inc/<name>/incr")
def cache_inc(name):
    """Flask-Caching's own increment on the filesystem backend: a get, then a set."""
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


@app.get("/livez")
def livez():
    return jsonify(status="ok")
