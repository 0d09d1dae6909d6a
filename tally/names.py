"""Counter names: validated once, then safe as file names and as store keys."""

from __future__ import annotations

import hashlib
import re

from .errors import InvalidName

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CLIENT_ID_PATTERN = re.compile(r"[0-9a-f]{32}")

#: Keys of per-client counters start with this mark, which no validated name can start with, so a
#: shared counter can never collide with a per-client one and stores can tell the expiring ones apart.
CLIENT_MARK = "@"


#: Names already found valid in this process (plain ``str`` only: a subclass may compare equal to a
#: name it is not), so that a hot counter's name is a set look-up, not a pattern match, each time.
VALID_NAMES: set[str] = set()
#: At most this many names are remembered; past it, the others are matched each time.
VALID_NAMES_KEPT = 4096


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid counter name; raise ``InvalidName`` otherwise."""
    if type(name) is str and name in VALID_NAMES:
        return name
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise InvalidName(
            f"counter names are 1-64 characters of A-Z a-z 0-9 _ . - starting with a letter or digit;"
            f" got {shown}"
        )
    if type(name) is str and len(VALID_NAMES) < VALID_NAMES_KEPT:
        VALID_NAMES.add(name)
    return name


def client_key(client_id: str, name: str) -> str:
    """The store key of one client's counter ``name``: ``@<client id>.<name>``."""
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise InvalidName("client ids are 32 lowercase hex digits")
    return f"{CLIENT_MARK}{client_id}.{validate_name(name)}"


def hashed_key(mark: str, text: str) -> str:
    """A store key for any text (limits' keys, Flask-Session's ids): ``mark`` (which starts with
    ``@``, so no validated name collides) and 160 bits of the text's SHA-256."""
    return mark + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def is_client_key(key: str) -> bool:
    return key.startswith(CLIENT_MARK)
