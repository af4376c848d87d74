"""Ed25519 key files: generation, PEM reading and writing, key ids.

Private keys are PKCS#8 PEM files without a passphrase (a daemon has to read them unattended;
protect them with file permissions, ``0600``, owned by the service user). Public keys are
SubjectPublicKeyInfo PEM files; a public key file may hold several keys (one PEM block each),
which is how a device's key is rotated without a flag day: add the new key, let the device switch,
remove the old one.

The key id of a public key is the first ``KEY_ID_LEN`` (8) bytes of SHA-256 over its raw 32-byte
encoding; it travels in every signed envelope and is shown as 16 lowercase hex digits.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefl.protocol.envelope import KEY_ID_LEN

__all__ = [
    "KeyFileError",
    "generate_private_key",
    "key_id",
    "load_private_key",
    "load_public_keys",
    "private_key_pem",
    "public_key_pem",
    "write_private_key",
    "write_public_key",
]

_PEM_BLOCK = re.compile(rb"-----BEGIN PUBLIC KEY-----\r?\n.*?-----END PUBLIC KEY-----", re.DOTALL)
MAX_KEY_FILE = 64 * 1024
"""Key files larger than this are refused (a key file is a few hundred bytes)."""


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, too large or not an Ed25519 key of the right kind."""


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def key_id(public_key: Ed25519PublicKey) -> bytes:
    """``sha256(raw public key)[:8]``: the id that identifies the key in signed envelopes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:KEY_ID_LEN]


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE:
            raise KeyFileError(f"{path}: {size} B is too large for a key file")
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS#8, unencrypted) file; ``KeyFileError`` otherwise."""
    path = Path(path)
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_keys(path: str | os.PathLike[str]) -> tuple[Ed25519PublicKey, ...]:
    """Every Ed25519 public key in a PEM file (at least one); ``KeyFileError`` otherwise."""
    path = Path(path)
    data = _read(path)
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        raise KeyFileError(f"{path}: no PEM public key")
    keys = []
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: bad PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: not an Ed25519 key ({type(key).__name__})")
        keys.append(key)
    return tuple(keys)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_private_key(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> None:
    """Write a private key as PEM with mode ``0600`` (atomically: temp file then rename)."""
    _write(Path(path), private_key_pem(key), 0o600)


def write_public_key(path: str | os.PathLike[str], key: Ed25519PublicKey) -> None:
    """Write a public key as PEM with mode ``0644`` (atomically)."""
    _write(Path(path), public_key_pem(key), 0o644)
