"""Authentication seams between the transport-facing services and ``edgefl.security``.

The aggregator and the device agent depend only on these protocols; ``edgefl.security`` provides
the Ed25519 implementations (and the loaders that build them from key files), so neither service
imports ``cryptography`` unless security is configured.

Signing is envelope-level: a signer turns a complete encoded envelope into a signed envelope whose
signature covers every byte of the unsigned one. The chunking layer then splits the signed bytes,
so a receiver verifies after reassembly, before decoding the payload.
"""

from __future__ import annotations

from typing import Protocol

from edgefl.protocol.messages import UpdateHeader


class EnvelopeSigner(Protocol):
    """Signs encoded envelopes with one private key (a device's, or the aggregator's)."""

    @property
    def key_id(self) -> str:
        """A short, stable identifier of the public key (for logs and rotation)."""
        ...

    def sign(self, envelope: bytes) -> bytes:
        """Return the signed form of ``envelope``; the result still decodes as an envelope."""
        ...


class UpdateAuthenticator(Protocol):
    """Aggregator side: decides whether an update really comes from the device it names."""

    def authenticate(self, header: UpdateHeader, envelope: bytes) -> None:
        """Return when ``envelope`` carries a valid signature by ``header.device_id``'s key.

        Raises ``UpdateRejected`` with ``UNKNOWN_DEVICE`` (no registered key) or
        ``BAD_SIGNATURE`` (unsigned, malformed or not matching); never raises anything else.
        """
        ...


class ManifestVerifier(Protocol):
    """Device side: accepts a model manifest only when the aggregator's key signed it."""

    def verify(self, envelope: bytes) -> None:
        """Return when ``envelope`` is signed by the trusted aggregator key.

        Raises ``ProtocolError`` with ``BAD_SIGNATURE`` otherwise.
        """
        ...
