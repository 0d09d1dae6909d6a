"""The demo app's configuration: settings.toml, TALLY_SETTINGS, FLASK_* variables and the factory's
overrides, and the checks of the demo's own keys.  Tally's keys get their defaults and checks from
the library itself (``tally.config``), at ``counters.init_app``.  Every mistake is reported at
start-up, in one line."""

from __future__ import annotations

import os
import secrets
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask

from tally.config import ConfigError, backend_name, cache_settings, is_count, is_number
from tally.keyfile import read_or_create

__all__ = ["ConfigError", "ensure_secret_key", "load_settings", "refuse_weak_secret_key"]

ROOT = Path(__file__).resolve().parent
DEFAULT_SETTINGS = ROOT / "settings.toml"
SECRET_KEY_FILE = "secret_key"


#: key -> (check, what the check expects)
CHECKS: dict[str, tuple[Any, str]] = {
    "CACHE_DIR": (lambda v: isinstance(v, (str, os.PathLike)) and os.fspath(v) != "", "a directory path"),
    "CACHE_DEFAULT_TIMEOUT": (lambda v: is_number(v) and v >= 0, "a number of seconds >= 0"),
    "CACHE_THRESHOLD": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "CACHE_KEY_PREFIX": (lambda v: isinstance(v, str), "a string"),
    "TALLY_ADMIN_TOKEN": (lambda v: isinstance(v, str), "a string"),
    "METRICS_TOKEN": (lambda v: isinstance(v, str), "a string"),
    "SECRET_KEY": (lambda v: v is None or isinstance(v, (str, bytes)), "a string"),
    "PERMANENT_SESSION_LIFETIME": (
        lambda v: is_count(v) or isinstance(v, timedelta),
        "a whole number of seconds >= 1",
    ),
    "SESSION_COOKIE_SECURE": (lambda v: isinstance(v, bool), "true or false"),
    "MAX_CONTENT_LENGTH": (is_count, "a number of bytes >= 1"),
    "RATELIMIT_ENABLED": (lambda v: isinstance(v, bool), "true or false"),
    "RACE_DEMO": (lambda v: isinstance(v, bool), "true or false"),
    "RATELIMIT_DEFAULT": (lambda v: isinstance(v, str) and v != "", 'a limit such as "120 per minute"'),
}


def load_settings(app: Flask, overrides: dict[str, Any] | None = None) -> None:
    """settings.toml, then the file named by TALLY_SETTINGS, then FLASK_* variables, then overrides."""
    app.config.from_file(str(DEFAULT_SETTINGS), load=tomllib.load, text=False)
    extra = os.environ.get("TALLY_SETTINGS")
    if extra:
        try:
            app.config.from_file(os.path.abspath(extra), load=tomllib.load, text=False)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"TALLY_SETTINGS={extra}: {error}") from error
    app.config.from_prefixed_env()
    if overrides:
        app.config.update(overrides)
    check_settings(app.config)
    # Flask-Caching 2 knows its backends by class name only; the demo also takes the short names of
    # Flask-Caching 1 (the seed's "filesystem"), so every spelling Tally accepts works for both.
    app.config["CACHE_TYPE"] = backend_name(app.config.get("CACHE_TYPE"))
    if app.config["CACHE_TYPE"] == "RedisClusterCache" and app.config.get("CACHE_REDIS_CLUSTER"):
        # Flask-Caching prefers CACHE_REDIS_URL to the node list; settings.toml's default single-server
        # URL would otherwise take the page cache (and only it) off the cluster.
        app.config.pop("CACHE_REDIS_URL", None)
    cache_settings(app.config)  # Flask-Caching's keys, checked before Flask-Caching reads them
    app.config["CACHE_DIR"] = os.path.abspath(os.path.join(app.instance_path, app.config["CACHE_DIR"]))
    if isinstance(app.config["PERMANENT_SESSION_LIFETIME"], int):
        app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=app.config["PERMANENT_SESSION_LIFETIME"])


def check_settings(config: dict[str, Any]) -> None:
    for key, (check, expected) in CHECKS.items():
        value = config.get(key)
        if not check(value):
            raise ConfigError(f"setting {key} must be {expected}; got {value!r}")


def ensure_secret_key(app: Flask) -> None:
    """Keep SECRET_KEY from config; else read, or create once, a key file in the instance folder.

    Created with an exclusive link of a complete file, so workers starting together all read the
    same key and none reads a half-written one.
    """
    if app.config.get("SECRET_KEY"):
        return
    path = os.path.join(app.instance_path, SECRET_KEY_FILE)
    key = read_or_create(path, lambda: secrets.token_urlsafe(48))
    if len(key) < 32:
        raise ConfigError(f"{path} holds no usable key; delete it to have a new one generated")
    app.config["SECRET_KEY"] = key


#: Keys seen in tutorials and templates; anyone can sign sessions with them.
WEAK_SECRET_KEYS = {
    "dev",
    "development",
    "secret",
    "secret-key",
    "secret_key",
    "secretkey",
    "changeme",
    "change-me",
    "change_me",
    "your-secret-key",
    "default",
    "test",
    "testing",
    "key",
    "password",
}


def refuse_weak_secret_key(app: Flask) -> None:
    """Outside debug and testing, a known or short SECRET_KEY stops the app at start-up."""
    if app.debug or app.testing:
        return
    key = app.config["SECRET_KEY"]
    text = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
    if text.strip().lower() in WEAK_SECRET_KEYS or len(text) < 16:
        raise ConfigError(
            "SECRET_KEY is a well-known or short value (under 16 characters): anyone could forge"
            " sessions; set a long random one, or leave it empty to have one generated"
        )


def rate_limit_storage(config: dict[str, Any]) -> str:
    """Flask-Limiter's storage: RATELIMIT_STORAGE_URI if set, else ``tally://``, the counters' own
    store (``tally.ratelimits``), whichever it is: each hit one atomic step, so a limit holds
    across every worker and host that shares the store."""
    return config.get("RATELIMIT_STORAGE_URI") or "tally://"


def rate_limit_storage_options(uri: str, timeout: float) -> dict[str, Any]:
    """Client options for a limit storage on a server: the counters' timeout and no hidden retries,
    so that a limit check on a hung server gives up as soon as a counter step would."""
    if uri.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        if uri.startswith("redis+sentinel://"):  # limits read from the primary, as counters do
            options["use_replicas"] = False
            options["sentinel_kwargs"] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        return options
    if uri.startswith("memcached://"):
        return {"connect_timeout": timeout, "timeout": timeout}
    return {}
