"""``/healthz``: is the store reachable, and how fast; ``/livez``: is the process serving at all."""

from __future__ import annotations

import os

from flask import Blueprint, jsonify

from common import counters

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    report = counters.health()
    report["status"] = "ok" if report["reachable"] else "unavailable"
    report["pid"] = os.getpid()
    response = jsonify(report)
    response.status_code = 200 if report["reachable"] else 503
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/livez")
def livez():
    """Touches no store: the bare route benchmarks compare the counter route against."""
    return jsonify(status="ok")
