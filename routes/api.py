"""JSON API of shared counters: ``/api/counters/<name>``."""

from __future__ import annotations

import json

from flask import Blueprint
from werkzeug.exceptions import BadRequest

from common import counters

from . import app_now
from .auth import admin_required
from .body import json_object
from .limits import never_limited

bp = Blueprint("api", __name__, url_prefix="/api")
#: One compact encoder for every counter response (``json.dumps`` with ``separators`` builds a new
#: encoder per call).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def counter_response(name: str, value: int):
    """``{"name": ..., "value": ...}``, never cached (``Cache-Control: no-store``).  Built directly,
    not with ``jsonify``: it is the hot path of every counter route; the content type is given whole
    (no mimetype lookup) and the one extra header is set on the finished response."""
    response = app_now().response_class(
        _encode({"name": name, "value": value}) + "\n", content_type="application/json"
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/counters/<name>")
@never_limited
def read(name: str):
    return counter_response(name, counters.get(name))


@bp.post("/counters/<name>/incr")
def incr(name: str):
    return counter_response(name, counters.incr(name, json_object({"by"}).get("by", 1)))


@bp.post("/counters/<name>/decr")
def decr(name: str):
    return counter_response(name, counters.decr(name, json_object({"by"}).get("by", 1)))


@bp.put("/counters/<name>")
@admin_required
def replace(name: str):
    body = json_object({"value"})
    if "value" not in body:
        raise BadRequest('send {"value": <integer>}')
    return counter_response(name, counters.set(name, body["value"]))


@bp.delete("/counters/<name>")
@admin_required
def reset(name: str):
    counters.reset(name)
    return counter_response(name, 0)
