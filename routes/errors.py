"""One error shape for every failure: ``{"error": "...", "detail": "..."}`` with its status (a small
HTML page for a browser), Tally's errors answered by the library's own handler (``tally.handlers``)."""

from __future__ import annotations

from flask import Flask
from werkzeug.exceptions import HTTPException, InternalServerError

from tally import TallyError
from tally.handlers import answer_tally_error, error_response


def handle_http_exception(exc: HTTPException):
    if isinstance(exc, InternalServerError) and isinstance(exc.original_exception, TallyError):
        # Raised outside the view (opening or saving a server-side session): Flask hands it here
        # wrapped as a 500; it is answered like the same error raised in a view.
        return answer_tally_error(exc.original_exception)
    response = error_response(exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or "")
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def register(app: Flask) -> None:
    """HTTP errors in the same shape as Tally's, whose handler ``counters.init_app`` registered."""
    app.register_error_handler(HTTPException, handle_http_exception)
