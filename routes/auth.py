"""Admin access: ``Authorization: Bearer <TALLY_ADMIN_TOKEN>``, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import current_app, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Forbidden, Unauthorized


def admin_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """403 when no admin token is configured (admin routes are off), 401 for a missing or wrong one."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = current_app.config["TALLY_ADMIN_TOKEN"]
        if not token:
            raise Forbidden("admin operations are disabled: set TALLY_ADMIN_TOKEN to enable them")
        scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), token.encode()):
            raise Unauthorized(
                "send Authorization: Bearer <TALLY_ADMIN_TOKEN>",
                www_authenticate=WWWAuthenticate("bearer", {"realm": "tally"}),
            )
        return view(*args, **kwargs)

    return wrapped
