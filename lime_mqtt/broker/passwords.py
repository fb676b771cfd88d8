"""Mosquitto 2.0's password file, written without ``mosquitto_passwd``.

One line per user, as ``mosquitto_passwd`` writes it (its ``output_new_password``:
``"%s:$%d$%d$%s$%s\\n"`` with hash type 7, the iterations, the salt and the hash):

    user:$7$101$<base64 salt>$<base64 hash>

Type 7 is PBKDF2-HMAC-SHA512; 101 iterations and a 12-byte salt are Mosquitto 2.0's
defaults (``PW_DEFAULT_ITERATIONS``, ``SALT_LEN``); the hash is the 64-byte digest, both
in standard base64 with padding. Passwords are random (``secrets.token_urlsafe``), so the
low iteration count costs nothing: there is no dictionary to try.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping

from lime_mqtt.core.errors import ConfigError

HASH_TYPE = 7  # pw_sha512_pbkdf2
ITERATIONS = 101
SALT_BYTES = 12
PASSWORD_BYTES = 24  # 32 URL-safe characters, 192 bits


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """``$7$101$<salt>$<hash>`` for ``password``, with a fresh random salt unless given."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"${HASH_TYPE}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash, computed the way Mosquitto checks it."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != str(HASH_TYPE):
        return False
    try:
        iterations = int(parts[2])
        salt, digest = base64.b64decode(parts[3], validate=True), base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(candidate, digest)


def check_username(username: str) -> None:
    """What Mosquitto accepts in a password file: no ':' and no control characters."""
    if not username or ":" in username or any(ord(c) < 0x20 or ord(c) == 0x7F for c in username):
        raise ConfigError(f"user name {username!r} cannot go in a Mosquitto password file (':' or a control character)")


def password_line(username: str, hashed: str) -> str:
    check_username(username)
    return f"{username}:{hashed}\n"


def parse_password_file(text: str) -> dict[str, str]:
    """User name -> hash, in file order; ConfigError for a line that is not ``user:hash``."""
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        username, sep, hashed = line.partition(":")
        if not sep or not username or not hashed:
            raise ConfigError(f"password file line {number} is not user:hash")
        entries[username] = hashed.strip()
    return entries


def format_password_file(entries: Mapping[str, str]) -> str:
    """The file's text for ``entries`` (user name -> hash)."""
    return "".join(password_line(username, hashed) for username, hashed in entries.items())
