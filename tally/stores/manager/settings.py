"""Where the manager lives and the key that admits a client, resolved from the settings once, the
same way for the app, the CLI and gunicorn's hook: ``COUNTER_MANAGER_ADDRESS`` as an absolute Unix
socket path (default ``manager.sock`` in the instance folder) or a loopback ``host:port`` (any other
host refused unless ``COUNTER_MANAGER_ALLOW_REMOTE``), ``COUNTER_MANAGER_AUTHKEY`` as bytes (unset: read,
or generated once into a 0600 file), and the snapshot file as an absolute path.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping
from typing import Any

from ...errors import ConfigError
from ...keyfile import read_or_create

#: The default address: this Unix socket in the instance folder.
DEFAULT_SOCKET = "manager.sock"
#: The file the generated key is kept in, in the instance folder.
AUTHKEY_FILE = "manager_authkey"

# -- addresses and keys --------------------------------------------------------------------------------


def default_address(instance_path: str) -> str:
    return os.path.join(os.path.abspath(instance_path), DEFAULT_SOCKET)


def is_unix_address(address: str) -> bool:
    return address.startswith("/")


def socket_address(address: str) -> str | tuple[str, int]:
    """What ``socket.connect``/``bind`` take: the path of a Unix socket, or ``(host, port)``."""
    if is_unix_address(address):
        return address
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def socket_family(address: str) -> socket.AddressFamily:
    if is_unix_address(address):
        return socket.AF_UNIX
    return socket.AF_INET6 if address.startswith("[") else socket.AF_INET


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_address(value: Any, instance_path: str, allow_remote: bool) -> str:
    """``COUNTER_MANAGER_ADDRESS`` as an absolute socket path or ``host:port``.

    Unset: ``manager.sock`` in the instance folder.  ``host:port`` (``[::1]:port`` for IPv6) must be on
    loopback unless ``allow_remote``.  Anything else is a Unix socket path, relative ones under the
    instance folder.  Raises ``ConfigError``.
    """
    if value is None or value == "":
        return default_address(instance_path)
    if not isinstance(value, str):
        raise ConfigError(
            f"setting COUNTER_MANAGER_ADDRESS must be a socket path or host:port; got {value!r}"
        )
    host, colon, port = value.rpartition(":")
    if colon and port.isdigit() and host and "/" not in value:
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"setting COUNTER_MANAGER_ADDRESS: port {port} is out of range")
        bare = host.strip("[]")
        if not _is_loopback(bare) and not allow_remote:
            raise ConfigError(
                f"setting COUNTER_MANAGER_ADDRESS {value!r} is not a loopback address: the manager"
                " protocol is pickle, so whoever can connect and knows the key can run code in it; use"
                " a Unix socket or 127.0.0.1, or set"
                " COUNTER_MANAGER_ALLOW_REMOTE = true on a network you trust"
            )
        return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    return os.path.abspath(os.path.join(instance_path, value))


def load_authkey(value: Any, instance_path: str) -> bytes:
    """``COUNTER_MANAGER_AUTHKEY`` as bytes; unset: read, or create once, ``manager_authkey`` in the
    instance folder (mode 0600, written completely under a temporary name and linked into place, so
    that workers starting together all read the same whole key)."""
    if value:
        return value if isinstance(value, bytes) else str(value).encode()
    path = os.path.join(instance_path, AUTHKEY_FILE)
    key = read_or_create(path, lambda: secrets.token_hex(32)).encode()
    if len(key) < 32:
        raise ConfigError(
            f"COUNTER_MANAGER_AUTHKEY: {path} holds no usable key; delete it to have a new one generated"
        )
    return key


def manager_settings(config: Mapping[str, Any], instance_path: str) -> dict[str, Any]:
    """The manager store's resolved settings: absolute address, key bytes, absolute snapshot path."""
    snapshot = config.get("COUNTER_MANAGER_SNAPSHOT")
    return {
        "COUNTER_MANAGER_ADDRESS": resolve_address(
            config.get("COUNTER_MANAGER_ADDRESS"),
            instance_path,
            bool(config.get("COUNTER_MANAGER_ALLOW_REMOTE")),
        ),
        "COUNTER_MANAGER_AUTHKEY": load_authkey(config.get("COUNTER_MANAGER_AUTHKEY"), instance_path),
        "COUNTER_MANAGER_SNAPSHOT": (
            os.path.abspath(os.path.join(instance_path, os.fspath(snapshot))) if snapshot else None
        ),
    }
