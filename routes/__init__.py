"""Blueprints: pages (HTML), api (JSON counters), clients (per-client counters), health."""

from __future__ import annotations

from typing import cast

from flask import Flask, Request, current_app, request
from werkzeug.local import LocalProxy

#: The current app and request themselves (``RuntimeError`` outside a context, as the proxies raise),
#: for the paths every request takes: ``current_app.x`` and ``request.x`` go through the proxy's
#: ``__getattr__`` each time, a few Python calls that cost more than the attribute itself.
app_now = cast("LocalProxy[Flask]", current_app)._get_current_object
request_now = cast("LocalProxy[Request]", request)._get_current_object
