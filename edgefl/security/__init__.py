"""Security for edgefl: Ed25519-signed envelopes, key loading, and fleet provisioning.

The services (aggregator, device agent) depend only on the protocols in ``edgefl.auth`` and call
the three loaders below when security is configured; without it they never import this package
(nor ``cryptography``).

* :func:`load_signer` — a device's or the aggregator's private key (PEM) -> ``EnvelopeSigner``.
* :func:`load_manifest_verifier` — the aggregator's public key (PEM) -> ``ManifestVerifier``.
* :func:`load_update_authenticator` — a directory of ``<device_id>.pub`` PEM files ->
  ``UpdateAuthenticator`` (re-read when the directory changes).

Provisioning (CA, broker certificate, MQTT passwords, ACL, key pairs, device bundles) lives in
:mod:`edgefl.security.provision`, its command line in :mod:`edgefl.provision_cli`
(``provision_app``). The wire format of signatures is ``docs/PROTOCOL.md``, "Signed envelopes";
the deployment walk-through and threat model are ``docs/SECURITY.md``.
"""

from __future__ import annotations

import os

from .keys import (
    KeyFileError,
    generate_private_key,
    key_id,
    load_private_key,
    load_public_keys,
    write_private_key,
    write_public_key,
)
from .signing import (
    Ed25519ManifestVerifier,
    Ed25519Signer,
    KeyDirectoryAuthenticator,
    KeyDirectoryStatistics,
    verify_envelope,
)

__all__ = [
    "Ed25519ManifestVerifier",
    "Ed25519Signer",
    "KeyDirectoryAuthenticator",
    "KeyDirectoryStatistics",
    "KeyFileError",
    "generate_private_key",
    "key_id",
    "load_manifest_verifier",
    "load_private_key",
    "load_public_keys",
    "load_signer",
    "load_update_authenticator",
    "verify_envelope",
    "write_private_key",
    "write_public_key",
]


def load_signer(path: str | os.PathLike[str]) -> Ed25519Signer:
    """An ``EnvelopeSigner`` from an Ed25519 private key PEM file (``KeyFileError`` if bad)."""
    return Ed25519Signer(load_private_key(path))


def load_manifest_verifier(path: str | os.PathLike[str]) -> Ed25519ManifestVerifier:
    """A ``ManifestVerifier`` trusting the Ed25519 public key(s) in a PEM file (the aggregator's;
    two PEM blocks during a key rotation). ``KeyFileError`` if the file is bad."""
    return Ed25519ManifestVerifier(load_public_keys(path))


def load_update_authenticator(keys_dir: str | os.PathLike[str]) -> KeyDirectoryAuthenticator:
    """An ``UpdateAuthenticator`` over a directory of ``<device_id>.pub`` PEM files, re-read when
    the directory changes (or on ``reload()``). ``KeyFileError`` if it is not a directory."""
    return KeyDirectoryAuthenticator(keys_dir)
