"""Tally's errors as responses in any app that uses the extension: a ``TallyError`` raised by a view
answers with its own status (503 for ``StoreUnavailable``, 409, 400, ...), never a bare HTML 500.

``init_app`` registers ``answer_tally_error`` for ``TallyError`` unless ``COUNTER_ERROR_HANDLERS`` is
false, and never over a handler the app registered itself: one registered before ``init_app`` is
kept, and one registered after (or for a subclass, such as ``StoreUnavailable``) is found first by
Flask.  The body names what happened and what to do, never a server, a path or a URL
(``TallyError.public_detail``); the full message goes to the app's log.
"""

from __future__ import annotations

from html import escape

from flask import Flask, Response, current_app, jsonify, request

from . import metrics
from .errors import StoreUnavailable, TallyError


def wants_html() -> bool:
    """Whether the client asked for a page (a browser's ``Accept: text/html``) rather than JSON."""
    accept = request.accept_mimetypes  # no Accept header, or */*: both 1, so JSON
    return accept["text/html"] > accept["application/json"]


def error_response(status: int, code: str, detail: str) -> Response:
    """``{"error": code, "detail": detail}`` with ``status``, or a small HTML page for a browser;
    never cached."""
    if wants_html():
        title = escape(code.replace("_", " "))
        page = (
            f"<!doctype html><html lang=en><meta charset=utf-8><title>{status} {title}</title>"
            f"<h1>{status} {title}</h1><p>{escape(detail)}</p></html>\n"
        )
        response = Response(page, status=status, mimetype="text/html")
    else:
        response = jsonify(error=code, detail=detail)
        response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


def answer_tally_error(error: TallyError) -> Response:
    """The response for ``error``.  An unreachable store is logged once when the outage starts and
    once when it ends (``tally.metrics``), however many requests fail in between; the store's other
    faults (a damaged record, a misconfiguration) are logged each time."""
    store = current_app.extensions.get("tally")
    if isinstance(error, StoreUnavailable) and store is not None:
        metrics.store_unavailable(store, error)
    elif error.public_message is not None:
        current_app.logger.error("%s: %s", error.code, error)
    return error_response(error.status, error.code, error.public_detail())


def register_error_handler(app: Flask) -> None:
    """``answer_tally_error`` for ``TallyError``, unless the app has its own for it already."""
    if not app.config.get("COUNTER_ERROR_HANDLERS", True):
        return
    if TallyError in app.error_handler_spec.get(None, {}).get(None, {}):
        return  # the app's own, registered before init_app: it wins
    app.register_error_handler(TallyError, answer_tally_error)
