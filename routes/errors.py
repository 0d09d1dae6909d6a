"""One JSON error shape for every failure: ``{"error": "...", "detail": "..."}`` with its status."""

from __future__ import annotations

from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException, InternalServerError

from tally import StoreUnavailable, TallyError
from tally import metrics as tally_metrics


def _json_error(status: int, error: str, detail: str):
    response = jsonify(error=error, detail=detail)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


def handle_http_exception(exc: HTTPException):
    if isinstance(exc, InternalServerError) and isinstance(exc.original_exception, TallyError):
        # Raised outside the view (opening or saving a server-side session): Flask hands it here
        # wrapped as a 500; it is answered like the same error raised in a view.
        return handle_tally_error(exc.original_exception)
    response = _json_error(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or "")
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def handle_tally_error(exc: TallyError):
    """The body says what happened and what to do (``public_detail``); the message, which may name a
    server, a path or a URL, goes to the log only."""
    if isinstance(exc, StoreUnavailable):
        # One line when the store becomes unreachable, one when it is back (per worker), however many
        # requests fail in between; raised outside a counter step too (a server-side session).
        tally_metrics.store_unavailable(current_app.extensions["tally"], exc)
    elif exc.public_message is not None:  # the store's fault (corrupt record, misconfiguration)
        current_app.logger.error("%s: %s", exc.code, exc)
    return _json_error(exc.status, exc.code, exc.public_detail())


def register(app: Flask) -> None:
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(TallyError, handle_tally_error)
