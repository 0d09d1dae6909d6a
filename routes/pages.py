"""The hit-counter page of the original question, made correct: every visit takes the next number."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from flask import (
    Blueprint,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import BadRequest, Forbidden

from common import counters, shared

from .clients import DEMO_COUNTER, client_counters, client_id
from .race import MAX_REQUESTS

RECENT_VISITORS = "recent-visitors"
RECENT_LIMIT = 10

bp = Blueprint("pages", __name__)

HITS = "hits"


def remember(ids, me: str) -> list[str]:
    """The recent-visitors list with ``me`` first, at most RECENT_LIMIT long, each id once."""
    earlier = [i for i in ids if i != me] if isinstance(ids, list) else []
    return ([me] + earlier)[:RECENT_LIMIT]


@bp.get("/")
def index():
    visitor = counters.incr(HITS)
    flash(f"You are visitor number {visitor}.")
    mine = client_counters()
    me = hashlib.sha256(client_id().encode()).hexdigest()[:8]
    recent = shared.update(RECENT_VISITORS, lambda ids: remember(ids, me), default=[])
    response = make_response(
        render_template(
            "index.html",
            hits=visitor,
            mine=mine.get(DEMO_COUNTER),
            backend=counters.store.backend,
            recent=recent,
            me=me,
            csrf_token=csrf_token(),
            race_demo=current_app.config.get("RACE_DEMO", False),
            race_max=MAX_REQUESTS,
        )
    )
    response.headers["Cache-Control"] = "no-store"
    return response


def csrf_token() -> str:
    """This session's token for the page's forms (on top of the SameSite=Lax cookie)."""
    token = session.get("csrf")
    if not isinstance(token, str) or len(token) != 43:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf_token() -> None:
    sent = request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")


@bp.post("/")
def act():
    """The page's buttons (plain forms): change the caller's counter, then show the page again."""
    check_csrf_token()
    action = request.form.get("action")
    mine = client_counters()
    if action == "inc":
        mine.incr(DEMO_COUNTER)
    elif action == "dec":
        mine.decr(DEMO_COUNTER)
    elif action == "reset":
        mine.reset(DEMO_COUNTER)
    else:
        raise BadRequest("action must be inc, dec or reset")
    return redirect(url_for("pages.index"), code=303)


#: Sent with every response.  The page loads nothing from elsewhere and runs no inline script, so the
#: strictest policy costs nothing: its own scripts and styles only, never inside a frame.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; object-src 'none';"
        " base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


@bp.after_app_request
def security_headers(response):
    """Each header the view did not set (as ``headers.setdefault``, whose test for a missing header
    raises and builds a Werkzeug ``KeyError`` every time: four per response)."""
    headers = response.headers
    present = {name.lower() for name, _ in headers}
    for name, value in SECURITY_HEADERS.items():
        if name.lower() not in present:
            headers.add(name, value)
    return response
