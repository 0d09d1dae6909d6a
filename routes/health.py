"""``/healthz``: is the store reachable (what a load balancer probes); ``/livez``: is the process serving.

``/healthz`` tells anyone only ``status`` and ``backend``, with 200 or 503.  The details (latency, the
worker's pid, server addresses, directories, uptimes, evictions, the error) are for the operator: sent
only with ``Authorization: Bearer <TALLY_ADMIN_TOKEN or METRICS_TOKEN>``.
"""

from __future__ import annotations

import os

from flask import Blueprint, current_app, jsonify

from common import counters

from .limits import never_limited
from .metrics import bearer_token_matches

bp = Blueprint("health", __name__)


@bp.get("/healthz")
@never_limited
def healthz():
    report = counters.health()
    status = {"status": "ok" if report["reachable"] else "unavailable", "backend": report["backend"]}
    config = current_app.config
    if bearer_token_matches(config["TALLY_ADMIN_TOKEN"], config["METRICS_TOKEN"]):
        status = {**report, **status, "pid": os.getpid()}
    response = jsonify(status)
    response.status_code = 200 if report["reachable"] else 503
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/livez")
@never_limited
def livez():
    """Touches no store: the bare route benchmarks compare the counter route against."""
    return jsonify(status="ok")
