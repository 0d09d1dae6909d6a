"""Reading a request's optional JSON object body, strictly: anything unexpected is a 4xx."""

from __future__ import annotations

import json
from typing import Any

from flask import request
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from . import app_now, request_now


def read_body() -> bytes:
    """The request body, refused with 413 past MAX_CONTENT_LENGTH whether or not it was chunked.

    Werkzeug refuses a declared Content-Length over the limit, but a chunked body (no length, the
    server dechunks it: ``wsgi.input_terminated``) it cuts at the limit without a word, and acting on
    a truncated body would be wrong.  So such a body is read here, one byte past the limit.

    The common case of the counter routes, no body at all, is decided from the environ alone, without
    building Werkzeug's headers: with no declared length, either the stream is not terminated (an empty
    body, as Werkzeug reads it) or it is read directly, as gunicorn's (terminated on every request) is.
    """
    environ = request_now().environ
    if environ.get("CONTENT_LENGTH") is not None:  # declared: parsed as Werkzeug does (bad: 0)
        if request.content_length == 0:
            return b""
        if request.content_length is not None or "wsgi.input_terminated" not in environ:
            return request.get_data(cache=True)  # the declared length, checked against the limit
    elif "wsgi.input_terminated" not in environ:
        return b""
    limit = app_now().config["MAX_CONTENT_LENGTH"]
    data = environ["wsgi.input"].read(limit + 1)
    if len(data) > limit:
        raise RequestEntityTooLarge(f"the body is over {limit} bytes")
    return data


def json_object(allowed: set[str]) -> dict[str, Any]:
    """The body as a JSON object with only ``allowed`` keys; ``{}`` when the body is empty."""
    raw = read_body()
    if not raw.strip():
        return {}
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("send the body as Content-Type: application/json")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise BadRequest(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return body
