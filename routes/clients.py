"""Per-client counters: one set per browser session, shared by none, atomic like every counter.

The session (Flask's signed cookie) holds only a random client id; the counters live in the
counter store under that id, so two tabs or two workers updating one client never lose an update.
They expire PERMANENT_SESSION_LIFETIME after their last use (read or write), as the session does.
"""

from __future__ import annotations

import secrets

from flask import Blueprint, current_app, session

from common import counters
from tally import ClientCounters
from tally.names import CLIENT_ID_PATTERN

from .api import counter_response
from .body import json_object
from .limits import never_limited

bp = Blueprint("clients", __name__)

DEMO_COUNTER = "counter"


def client_id() -> str:
    """The caller's random id, kept in the signed session (given on first use)."""
    cid = session.get("cid")
    if not isinstance(cid, str) or not CLIENT_ID_PATTERN.fullmatch(cid):
        cid = session["cid"] = secrets.token_hex(16)
    session.permanent = True
    return cid


def client_counters() -> ClientCounters:
    """The caller's counters, which expire with the session (PERMANENT_SESSION_LIFETIME)."""
    lifetime = int(current_app.permanent_session_lifetime.total_seconds())
    return counters.for_client(client_id(), lifetime)


def _text(value: int):
    return (
        f"counter is {value}",
        200,
        {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"},
    )


@bp.route("/inc", methods=["GET", "POST"])
def inc():
    return _text(client_counters().incr(DEMO_COUNTER))


@bp.route("/dec", methods=["GET", "POST"])
def dec():
    return _text(client_counters().decr(DEMO_COUNTER))


@bp.route("/reset", methods=["GET", "POST"])
def reset():
    client_counters().reset(DEMO_COUNTER)
    return _text(0)


@bp.get("/api/me/counters/<name>")
@never_limited
def me_read(name: str):
    return counter_response(name, client_counters().get(name))


@bp.post("/api/me/counters/<name>/incr")
def me_incr(name: str):
    return counter_response(name, client_counters().incr(name, json_object({"by"}).get("by", 1)))


@bp.post("/api/me/counters/<name>/decr")
def me_decr(name: str):
    return counter_response(name, client_counters().decr(name, json_object({"by"}).get("by", 1)))


@bp.delete("/api/me/counters/<name>")
def me_reset(name: str):
    client_counters().reset(name)
    return counter_response(name, 0)
