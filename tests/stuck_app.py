"""A WSGI app with one request that never returns (``/stuck``), served under Tally's gunicorn.conf.py
to test that a worker still exits on SIGTERM within graceful_timeout."""

import threading

from flask import Flask

app = Flask(__name__)
never = threading.Event()


@app.get("/livez")
def livez():
    return {"status": "ok"}


@app.get("/stuck")
def stuck():
    never.wait()  # a thread blocked for good, as in a client library call that never returns
    return {"status": "unreachable"}
