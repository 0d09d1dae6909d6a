"""Loading and checking the app's configuration: every mistake is reported at start-up, in one line."""

from __future__ import annotations

import os
import secrets
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask

from tally.stores import BACKENDS

ROOT = Path(__file__).resolve().parent
DEFAULT_SETTINGS = ROOT / "settings.toml"
SECRET_KEY_FILE = "secret_key"


class ConfigError(ValueError):
    """A setting has the wrong type or value; the message names the key and what it expects."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _server_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


#: key -> (check, what the check expects)
CHECKS: dict[str, tuple[Any, str]] = {
    "CACHE_TYPE": (lambda v: v in BACKENDS, f"one of {', '.join(BACKENDS)}"),
    "CACHE_DIR": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "CACHE_DEFAULT_TIMEOUT": (lambda v: _number(v) and v >= 0, "a number of seconds >= 0"),
    "CACHE_THRESHOLD": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "CACHE_KEY_PREFIX": (lambda v: isinstance(v, str), "a string"),
    "CACHE_MEMCACHED_SERVERS": (_server_list, 'a non-empty list of "host:port" strings'),
    "CACHE_REDIS_URL": (
        lambda v: isinstance(v, str) and v.startswith(("redis://", "rediss://", "unix://")),
        "a redis:// URL",
    ),
    "COUNTER_DIR": (lambda v: isinstance(v, str) and v != "", "a directory path"),
    "COUNTER_FSYNC": (lambda v: isinstance(v, bool), "true or false"),
    "COUNTER_SWEEP_INTERVAL": (_positive, "a number of seconds > 0"),
    "COUNTER_KEY_PREFIX": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "COUNTER_TIMEOUT": (_positive, "a number of seconds > 0"),
    "COUNTER_POOL_SIZE": (_count, "an integer >= 1"),
    "TALLY_ADMIN_TOKEN": (lambda v: isinstance(v, str), "a string"),
    "SECRET_KEY": (lambda v: v is None or isinstance(v, (str, bytes)), "a string"),
    "PERMANENT_SESSION_LIFETIME": (
        lambda v: _count(v) or isinstance(v, timedelta),
        "a whole number of seconds >= 1",
    ),
    "SESSION_COOKIE_SECURE": (lambda v: isinstance(v, bool), "true or false"),
    "MAX_CONTENT_LENGTH": (_count, "a number of bytes >= 1"),
    "RATELIMIT_ENABLED": (lambda v: isinstance(v, bool), "true or false"),
    "RATELIMIT_DEFAULT": (lambda v: isinstance(v, str) and v != "", 'a limit such as "120 per minute"'),
    "VALUE_MAX_BYTES": (lambda v: _count(v) and v <= 1_000_000, "a number of bytes from 1 to 1000000"),
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
    app.config["RATELIMIT_STORAGE_URI"] = rate_limit_storage(app.config)
    app.config.setdefault(
        "RATELIMIT_STORAGE_OPTIONS",
        rate_limit_storage_options(app.config["RATELIMIT_STORAGE_URI"], app.config["COUNTER_TIMEOUT"]),
    )
    for key in ("CACHE_DIR", "COUNTER_DIR"):
        app.config[key] = os.path.abspath(os.path.join(app.instance_path, app.config[key]))
    if app.config["COUNTER_DIR"] == app.config["CACHE_DIR"]:
        raise ConfigError("COUNTER_DIR must not be CACHE_DIR: cachelib deletes files it did not write")
    if isinstance(app.config["PERMANENT_SESSION_LIFETIME"], int):
        app.config["PERMANENT_SESSION_LIFETIME"] = timedelta(seconds=app.config["PERMANENT_SESSION_LIFETIME"])


def check_settings(config: dict[str, Any]) -> None:
    for key, (check, expected) in CHECKS.items():
        value = config.get(key)
        if not check(value):
            raise ConfigError(f"setting {key} must be {expected}; got {value!r}")
    counter_prefix, cache_prefix = config["COUNTER_KEY_PREFIX"], config["CACHE_KEY_PREFIX"]
    if counter_prefix.startswith(cache_prefix) or cache_prefix.startswith(counter_prefix):
        # cachelib's RedisCache.clear() deletes every key starting with CACHE_KEY_PREFIX.
        raise ConfigError(
            f"COUNTER_KEY_PREFIX {counter_prefix!r} and CACHE_KEY_PREFIX {cache_prefix!r} must not"
            " be prefixes of each other, or clearing the page cache would delete counters"
        )


def ensure_secret_key(app: Flask) -> None:
    """Keep SECRET_KEY from config; else read, or create once, a key file in the instance folder.

    Created with an exclusive link of a complete file, so workers starting together all read the
    same key and none reads a half-written one.
    """
    if app.config.get("SECRET_KEY"):
        return
    path = os.path.join(app.instance_path, SECRET_KEY_FILE)
    try:
        with open(path, encoding="ascii") as file:
            key = file.read().strip()
    except FileNotFoundError:
        temp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secrets.token_urlsafe(48))
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
        with open(path, encoding="ascii") as file:
            key = file.read().strip()
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
    """Flask-Limiter's storage: RATELIMIT_STORAGE_URI if set, else the counter store's servers, so
    that limits hold across workers and hosts; memory:// (per worker) for the filesystem and memory."""
    if config.get("RATELIMIT_STORAGE_URI"):
        return config["RATELIMIT_STORAGE_URI"]
    if config["CACHE_TYPE"] == "RedisCache":
        return config["CACHE_REDIS_URL"]
    if config["CACHE_TYPE"] == "MemcachedCache":
        return "memcached://" + ",".join(config["CACHE_MEMCACHED_SERVERS"])
    return "memory://"


def rate_limit_storage_options(uri: str, timeout: float) -> dict[str, Any]:
    """Client options for a limit storage on a server: the counters' timeout and no hidden retries,
    so that a limit check on a hung server gives up as soon as a counter step would."""
    if uri.startswith(("redis://", "rediss://", "unix://")):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)}
    if uri.startswith("memcached://"):
        return {"connect_timeout": timeout, "timeout": timeout}
    return {}
