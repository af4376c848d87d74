"""Mosquitto password files (``password_file``): the ``$7$`` PBKDF2-SHA512 format.

One line per user: ``<username>:$7$<iterations>$<base64 salt>$<base64 hash>`` where
``hash = PBKDF2-HMAC-SHA512(password, salt, iterations, 64 bytes)``, standard base64 with
padding, a 12-byte salt and 101 iterations by default (what ``mosquitto_passwd`` 2.0 writes;
Mosquitto reads the iteration count from the line). The iteration count hardly matters for
edgefl's generated passwords, which are 192-bit random tokens, not human choices.

:func:`set_password` uses ``mosquitto_passwd -b`` when it is installed (the reference writer)
and writes the line itself otherwise; both produce lines Mosquitto accepts (tested against the
broker). Updates are atomic (temp file + rename), so a broker reloading on SIGHUP never reads a
half-written file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_ITERATIONS",
    "generate_password",
    "hash_password",
    "read_password_file",
    "remove_user",
    "set_password",
    "verify_password",
    "write_password_file",
]

DEFAULT_ITERATIONS: Final = 101
SALT_LEN: Final = 12
HASH_LEN: Final = 64


def generate_password() -> str:
    """A random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def _check_username(username: str) -> None:
    if not username or ":" in username or "\n" in username or "\r" in username:
        raise ValueError(f"invalid MQTT username {username!r}")


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """The ``$7$...`` hash of ``password`` (without the ``username:`` prefix)."""
    if iterations < 1:
        raise ValueError("iterations must be >= 1")
    salt = secrets.token_bytes(SALT_LEN) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_LEN)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(hashed: str, password: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (False for any other or malformed format)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    iterations = int(parts[2])
    if not 1 <= iterations <= 10_000_000 or not expected:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(expected))
    return hmac.compare_digest(got, expected)


def read_password_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{username: hash}`` of a password file (empty when it does not exist); comments and
    blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        return {}
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep:
            raise ValueError(f"{path}: malformed line for {user!r}")
        entries[user] = hashed
    return entries


def write_password_file(path: str | os.PathLike[str], entries: dict[str, str]) -> None:
    """Write ``{username: hash}`` atomically with mode ``0600`` (owner: the broker's user)."""
    path = Path(path)
    for user in entries:
        _check_username(user)
    text = "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _mosquitto_passwd() -> str | None:
    return shutil.which("mosquitto_passwd") or shutil.which(
        "mosquitto_passwd", path="/usr/bin:/usr/local/bin:/opt/homebrew/bin"
    )


def set_password(
    path: str | os.PathLike[str],
    username: str,
    password: str,
    *,
    use_mosquitto_passwd: bool = True,
) -> str:
    """Add or replace ``username`` in the password file at ``path``; returns which writer was
    used (``"mosquitto_passwd"`` or ``"python"``).

    With ``use_mosquitto_passwd`` and the tool installed, ``mosquitto_passwd -b`` hashes the
    password on a copy of the file, which then replaces the original atomically. Note that
    ``-b`` puts the password on that process's command line, visible to local users for its
    lifetime; pass ``use_mosquitto_passwd=False`` on shared machines.
    """
    _check_username(username)
    path = Path(path)
    tool = _mosquitto_passwd() if use_mosquitto_passwd else None
    if tool is None:
        entries = read_password_file(path)
        entries[username] = hash_password(password)
        write_password_file(path, entries)
        return "python"
    path.parent.mkdir(parents=True, exist_ok=True)
    work = path.with_name(f".{path.name}.passwd")
    if path.exists():
        shutil.copyfile(path, work)
    else:
        work.touch()
    os.chmod(work, 0o600)
    try:
        subprocess.run(
            [tool, "-b", str(work), username, password],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
        os.replace(work, path)
    finally:
        work.unlink(missing_ok=True)
    return "mosquitto_passwd"


def remove_user(path: str | os.PathLike[str], username: str) -> bool:
    """Remove ``username`` from the password file; returns whether it was there."""
    entries = read_password_file(path)
    if entries.pop(username, None) is None:
        return False
    write_password_file(path, entries)
    return True
