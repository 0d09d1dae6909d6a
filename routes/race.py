"""The seed's question answered on the page: a deliberately naive global-variable counter beside
Tally's, for the page's "Will this happen to me?" section (``RACE_DEMO``; off unless enabled, as
``make run`` does).

THE NAIVE ROUTE IS THE WRONG WAY, kept here to show it: each gunicorn worker process has its own
``_naive_count``, so under several workers the same numbers are handed out again and again.  Both
routes answer ``Connection: close``, so that the browser's next request may reach another worker,
as requests from many users would.  Both are writes: limited like every write when rate limits are
on, and the page sends at most ``MAX_REQUESTS`` per run.
"""

from __future__ import annotations

import os

from flask import Blueprint, abort, current_app, jsonify

from common import counters

bp = Blueprint("race", __name__)

#: The most requests the page sends to each route in one run.
MAX_REQUESTS = 200
#: The Tally counter the page's race uses.
RACE_COUNTER = "race-demo"

_naive_count = 0  # the question's global variable: one per worker process, updated without a lock


def _enabled() -> None:
    if not current_app.config.get("RACE_DEMO"):
        abort(404)


def _answer(value: int):
    response = jsonify(value=value, pid=os.getpid())
    response.headers["Connection"] = "close"
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/race/naive/incr")
def naive_incr():
    """A global variable read, incremented and written back (the wrong way)."""
    _enabled()
    global _naive_count
    value = _naive_count + 1
    _naive_count = value
    return _answer(value)


@bp.post("/race/tally/incr")
def tally_incr():
    """The same, with Tally: one atomic step of the shared store."""
    _enabled()
    return _answer(counters.incr(RACE_COUNTER))
