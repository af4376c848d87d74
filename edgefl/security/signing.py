"""Ed25519 implementations of the ``edgefl.auth`` seams.

* :class:`Ed25519Signer` (``EnvelopeSigner``): a device signs its UPDATE envelopes, the aggregator
  its MODEL_MANIFEST envelopes (``edgefl.protocol.envelope.sign_envelope`` does the framing).
* :class:`Ed25519ManifestVerifier` (``ManifestVerifier``): a device accepts a manifest only when
  one of the trusted aggregator keys signed it. Model chunks are not signed: the signed manifest
  carries the SHA-256 of every artifact, which the device checks after reassembly.
* :class:`KeyDirectoryAuthenticator` (``UpdateAuthenticator``): the aggregator checks that an
  update was signed by the key registered for ``header.device_id`` in a directory of
  ``<device_id>.pub`` PEM files, re-read when the directory changes.

Verification is ``Ed25519.verify(signature, signed)`` where ``signed`` is every byte of the
envelope before the signature (prefix with ``FLAG_SIGNED``, header, payload, key id); see
``docs/PROTOCOL.md``, "Signed envelopes". What a signature does *not* prove: freshness. Replays of
a genuine update are stopped by the aggregator's per-device sequence numbers, replays of an old
manifest by the device refusing a version lower than the one it holds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefl.errors import EdgeflError, ProtocolError, RejectReason, UpdateRejected
from edgefl.protocol.envelope import (
    MAX_PAYLOAD_LEN,
    Envelope,
    EnvelopeKind,
    decode_envelope,
    sign_envelope,
)
from edgefl.protocol.messages import CheckIn, SecAggSeedHeader, SecAggShareHeader, UpdateHeader
from edgefl.protocol.topics import validate_name

from .keys import KeyFileError, key_id, load_public_keys

__all__ = [
    "DEVICE_KEY_SUFFIX",
    "Ed25519ManifestVerifier",
    "Ed25519Signer",
    "KeyDirectoryAuthenticator",
    "KeyDirectoryStatistics",
    "verify_envelope",
]

log = logging.getLogger(__name__)

DEVICE_KEY_SUFFIX: Final = ".pub"
EnvelopeInput = bytes | bytearray | memoryview | Envelope


class Ed25519Signer:
    """Signs envelopes with one Ed25519 private key (``edgefl.auth.EnvelopeSigner``)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: Final = private_key.public_key()
        self.key_id_bytes: Final = key_id(self.public_key)

    @property
    def key_id(self) -> str:
        """16 lowercase hex digits: ``sha256(raw public key)[:8]``."""
        return self.key_id_bytes.hex()

    def sign(self, envelope: bytes) -> bytes:
        """The signed form of an unsigned envelope (``ProtocolError`` if it does not decode,
        ``ValueError`` if it is signed already)."""
        return sign_envelope(envelope, key_id=self.key_id_bytes, sign=self._key.sign)


def _decoded(envelope: EnvelopeInput, max_payload: int) -> Envelope:
    if isinstance(envelope, Envelope):
        return envelope
    return decode_envelope(envelope, max_payload=max_payload)


def verify_envelope(
    envelope: EnvelopeInput,
    keys: Mapping[bytes, Ed25519PublicKey],
    *,
    max_payload: int = MAX_PAYLOAD_LEN,
) -> Envelope:
    """Decode ``envelope`` and check its signature against ``keys`` (key id -> public key).

    Returns the decoded envelope. Raises ``ProtocolError(BAD_SIGNATURE)`` when it is unsigned,
    signed by a key not in ``keys``, or the signature does not verify; any decoding failure is
    raised with its own reason (``ProtocolError``).
    """
    env = _decoded(envelope, max_payload)
    sig = env.signature
    if sig is None:
        raise ProtocolError(RejectReason.BAD_SIGNATURE, "envelope is not signed")
    key = keys.get(sig.key_id)
    if key is None:
        raise ProtocolError(RejectReason.BAD_SIGNATURE, f"signed by unknown key {sig.key_id.hex()}")
    try:
        key.verify(sig.signature, sig.signed)
    except InvalidSignature:
        raise ProtocolError(
            RejectReason.BAD_SIGNATURE, f"signature by key {sig.key_id.hex()} does not verify"
        ) from None
    return env


def _key_map(keys: Iterable[Ed25519PublicKey]) -> dict[bytes, Ed25519PublicKey]:
    return {key_id(k): k for k in keys}


class Ed25519ManifestVerifier:
    """Device side (``edgefl.auth.ManifestVerifier``): trusts manifests signed by one of
    ``trusted_keys`` (normally the aggregator's key; two during a key rotation).

    ``kinds`` are the envelope kinds it accepts (MODEL_MANIFEST by default), so a validly signed
    envelope of another kind cannot pass as a manifest.
    """

    def __init__(
        self,
        trusted_keys: Iterable[Ed25519PublicKey],
        *,
        kinds: Iterable[EnvelopeKind] = (EnvelopeKind.MODEL_MANIFEST,),
        max_payload: int = 0,
    ) -> None:
        self._keys = _key_map(trusted_keys)
        if not self._keys:
            raise ValueError("at least one trusted key is needed")
        self._kinds = frozenset(kinds)
        self._max_payload = max_payload

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(k.hex() for k in self._keys)

    def verify(self, envelope: EnvelopeInput) -> None:
        """Return when ``envelope`` is a manifest signed by a trusted key; otherwise raise
        ``ProtocolError(BAD_SIGNATURE)`` (a malformed envelope too, its reason in the detail)."""
        try:
            env = verify_envelope(envelope, self._keys, max_payload=self._max_payload)
        except ProtocolError as exc:
            if exc.reason is RejectReason.BAD_SIGNATURE:
                raise
            raise ProtocolError(
                RejectReason.BAD_SIGNATURE, f"not a valid envelope ({exc})"
            ) from None
        if env.kind not in self._kinds:
            raise ProtocolError(
                RejectReason.BAD_SIGNATURE, f"a signed {env.kind.name} is not a manifest"
            )


@dataclass(frozen=True)
class KeyDirectoryStatistics:
    """State of a :class:`KeyDirectoryAuthenticator`'s key directory."""

    devices: int  # devices with at least one usable key
    keys: int
    loads: int  # directory scans so far
    bad_files: Mapping[str, str]  # file name -> problem, for files that were skipped


class KeyDirectoryAuthenticator:
    """Aggregator side (``edgefl.auth.UpdateAuthenticator``) over a directory of public keys.

    The directory holds one ``<device_id>.pub`` PEM file per device (several PEM blocks for a
    rotation); other files are ignored, and unreadable or invalid ones are skipped and reported
    in :meth:`statistics` (one bad file never disables the other devices). The directory is
    re-read when its modification time changes (checked at most every ``check_interval``
    seconds; provisioning and revocation replace or delete files, which changes it) and on
    :meth:`reload`. Thread-safe.

    :meth:`authenticate` raises ``UpdateRejected``: ``UNKNOWN_DEVICE`` when no key is registered
    for ``header.device_id``, ``BAD_SIGNATURE`` when the envelope is not a signed UPDATE, was
    signed by another key, belongs to another header, or does not verify.
    """

    def __init__(
        self,
        keys_dir: str | os.PathLike[str],
        *,
        check_interval: float = 1.0,
        max_payload: int = MAX_PAYLOAD_LEN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys_dir = Path(keys_dir)
        if not self.keys_dir.is_dir():
            raise KeyFileError(f"{self.keys_dir}: not a directory")
        self._check_interval = check_interval
        self._max_payload = max_payload
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, dict[bytes, Ed25519PublicKey]] = {}
        self._bad: dict[str, str] = {}
        self._loads = 0
        self._mtime: int | None = None
        self._checked_at = -float("inf")
        self.reload()

    def reload(self) -> None:
        """Re-read every key file now."""
        keys: dict[str, dict[bytes, Ed25519PublicKey]] = {}
        bad: dict[str, str] = {}
        mtime = self._dir_mtime()
        try:
            entries = sorted(self.keys_dir.iterdir())
        except OSError as exc:
            log.error("cannot list device key directory %s: %s", self.keys_dir, exc)
            entries = []
        for path in entries:
            if not path.name.endswith(DEVICE_KEY_SUFFIX) or path.name.startswith("."):
                continue
            device = path.name[: -len(DEVICE_KEY_SUFFIX)]
            try:
                validate_name(device, "device_id")
                keys[device] = _key_map(load_public_keys(path))
            except (EdgeflError, KeyFileError) as exc:
                bad[path.name] = str(exc)
                log.warning("skipping device key file %s: %s", path, exc)
        with self._lock:
            self._keys, self._bad, self._mtime = keys, bad, mtime
            self._loads += 1
            self._checked_at = self._clock()

    def statistics(self) -> KeyDirectoryStatistics:
        with self._lock:
            return KeyDirectoryStatistics(
                devices=len(self._keys),
                keys=sum(len(k) for k in self._keys.values()),
                loads=self._loads,
                bad_files=dict(self._bad),
            )

    def device_keys(self, device_id: str) -> tuple[str, ...]:
        """Hex key ids registered for ``device_id`` (empty when unknown)."""
        self._maybe_reload()
        with self._lock:
            return tuple(k.hex() for k in self._keys.get(device_id, {}))

    def authenticate(self, header: UpdateHeader, envelope: EnvelopeInput) -> None:
        """See the class docstring; never raises anything but ``UpdateRejected``."""
        fields = ("device_id", "fleet", "seq", "base_version")
        self._verify_device(header, fields, envelope, EnvelopeKind.UPDATE)

    def authenticate_checkin(self, checkin: CheckIn, envelope: EnvelopeInput) -> None:
        """The same check for a CHECKIN (participation, PROTOCOL.md §4.7): signed by the key of
        ``checkin.device_id``; never raises anything but ``UpdateRejected``."""
        fields = ("device_id", "fleet")  # the rest is read from the verified bytes themselves
        self._verify_device(checkin, fields, envelope, EnvelopeKind.CHECKIN)

    def authenticate_share(
        self, header: SecAggShareHeader | SecAggSeedHeader, envelope: EnvelopeInput
    ) -> None:
        """The same check for one share of secure aggregation (protocol 1.3): a SECAGG_SHARE or
        SECAGG_SEED envelope signed by ``header.device_id``'s key, for the same update."""
        fields = ("device_id", "fleet", "seq")
        self._verify_device(header, fields, envelope, header.KIND)

    def _verify_device(
        self,
        message: UpdateHeader | CheckIn | SecAggShareHeader | SecAggSeedHeader,
        fields: tuple[str, ...],
        envelope: EnvelopeInput,
        kind: EnvelopeKind,
    ) -> None:
        """``envelope`` is a ``kind`` envelope signed by ``message.device_id``'s key whose
        signed header agrees with ``message`` on ``fields``."""
        self._maybe_reload()
        with self._lock:
            keys = self._keys.get(message.device_id)
        if keys is None:
            raise UpdateRejected(
                RejectReason.UNKNOWN_DEVICE, f"no key registered for device {message.device_id!r}"
            )
        try:
            env = verify_envelope(envelope, keys, max_payload=self._max_payload)
        except ProtocolError as exc:
            raise UpdateRejected(RejectReason.BAD_SIGNATURE, exc.detail) from None
        if env.kind is not kind:
            raise UpdateRejected(
                RejectReason.BAD_SIGNATURE, f"signed {env.kind.name}, not {kind.name}"
            )
        signed = env.header
        if tuple(signed.get(f) for f in fields) != tuple(getattr(message, f) for f in fields):
            raise UpdateRejected(
                RejectReason.BAD_SIGNATURE, "the signed envelope carries a different header"
            )

    def _dir_mtime(self) -> int | None:
        try:
            return self.keys_dir.stat().st_mtime_ns
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        now = self._clock()
        with self._lock:
            if now - self._checked_at < self._check_interval:
                return
            self._checked_at = now
            known = self._mtime
        if self._dir_mtime() != known:
            self.reload()
