"""``/metrics``: Prometheus text of every worker; and the count of HTTP requests by endpoint and status.

Access: with ``METRICS_TOKEN`` set, only ``Authorization: Bearer <METRICS_TOKEN>`` (401 otherwise).
Without it, only a request that comes straight from this host: remote address 127.0.0.1 or ::1 and no
forwarding header (403 otherwise), because a reverse proxy on the same host makes every public client's
connection come from loopback.  A proxy that forwards without any such header still does: set a token.
"""

from __future__ import annotations

import hmac
import ipaddress

from flask import Blueprint, Response, current_app, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, Unauthorized
from werkzeug.exceptions import NotImplemented as NotInstalled

from tally import metrics as tally_metrics

from . import request_now
from .limits import never_limited

bp = Blueprint("metrics", __name__)

LOOPBACK = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
#: Headers a proxy adds to say whom it forwards for (nginx's X-Real-IP included).
FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def bearer_token_matches(*tokens: str) -> bool:
    """Whether the request's ``Authorization: Bearer`` token is one of ``tokens`` (empty ones never
    match), compared in constant time."""
    scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    offered_bytes = offered.strip().encode()
    return any(token and hmac.compare_digest(offered_bytes, token.encode()) for token in tokens)


def direct_from_loopback() -> bool:
    """The connection comes from 127.0.0.1 or ::1 (also as ::ffff:127.0.0.1, how a dual-stack socket
    shows an IPv4 loopback peer) and carries no forwarding header."""
    if any(header in request.headers for header in FORWARDING_HEADERS):
        return False
    try:
        address = ipaddress.ip_address(request.environ.get("REMOTE_ADDR") or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address in LOOPBACK


@bp.get("/metrics")
@never_limited
def scrape():
    token = current_app.config["METRICS_TOKEN"]
    if token:
        if not bearer_token_matches(token):
            raise Unauthorized(
                "send Authorization: Bearer <METRICS_TOKEN>",
                www_authenticate=WWWAuthenticate("bearer", {"realm": "tally-metrics"}),
            )
    elif not direct_from_loopback():
        raise Forbidden(
            "without METRICS_TOKEN, /metrics answers only requests made directly from this host"
            " (127.0.0.1 or ::1, no Forwarded, X-Forwarded-For or X-Real-IP header); set METRICS_TOKEN"
            " to scrape from elsewhere"
        )
    if not tally_metrics.ENABLED:
        raise NotInstalled("metrics need prometheus_client: pip install prometheus_client")
    body, content_type = tally_metrics.exposition()
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


@bp.after_app_request
def count_request(response: Response) -> Response:
    """Every answer of the app, errors included, by endpoint name (never the raw path) and status."""
    tally_metrics.http_request(request_now().endpoint, response.status_code)
    return response
