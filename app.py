"""The application factory, and ``app`` for ``gunicorn app:app`` and ``flask --app app``."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

import common
from routes import api, clients, errors, health, leaderboard, metrics, pages, race, shared
from routes.limits import init_limits
from sessions import init_sessions
from settings import ensure_secret_key, load_settings, refuse_weak_secret_key


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings.toml, TALLY_SETTINGS, FLASK_* environment, then ``overrides``.

    Raises ``settings.ConfigError`` (one line naming the key) for any bad setting, before serving.
    The instance folder is TALLY_INSTANCE_PATH when set, else ./instance beside this file.
    """
    app = Flask(__name__, instance_path=os.environ.get("TALLY_INSTANCE_PATH") or None)
    # A path with "//" (say /api/counters/a//incr) is a 404, not a 308 redirect to the merged path
    # that a client would follow with its POST: malformed requests get a 4xx and change nothing.
    app.url_map.merge_slashes = False
    os.makedirs(app.instance_path, exist_ok=True)
    load_settings(app, overrides)
    ensure_secret_key(app)
    refuse_weak_secret_key(app)
    common.cache.init_app(app)
    common.counters.init_app(app)  # Tally's defaults and checks, on the store `cache` was set up with
    common.shared.init_app(app)
    init_limits(app)  # off unless RATELIMIT_ENABLED; storage follows the counter store (settings.py)
    init_sessions(app)
    errors.register(app)
    blueprints = (pages.bp, api.bp, clients.bp, shared.bp, health.bp, leaderboard.bp, metrics.bp, race.bp)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app


app = create_app()
