"""Two additive shares of one encoded update: a masked vector for the leader, a sealed seed for
the helper.

Device side, for the ring vector ``x`` of :func:`edgefl.secagg.ring.encode`::

    seed  = os.urandom(32)                                  fresh for every update
    m     = ChaCha20(key=seed, nonce=0^16) keystream, read as P little-endian b-bit words
    y     = x - m  mod 2^b                                  the leader's share (uniform)
    sealed = eph_pub || ChaCha20Poly1305(k).encrypt(0^12, seed, AD)     the helper's share
    k     = HKDF-SHA256(X25519(eph, helper_pub), salt=None,
                        info="edgefl-secagg/1 seal" || eph_pub || helper_pub)

``AD`` (:meth:`ShareContext.associated_data`) binds the fleet, device id, seq, model, number of
parameters and ring width: a sealed seed opens only under the update it was made for, so it
cannot be replayed under another device, seq or model. The key is fresh per message (a new
ephemeral key each time), so the fixed AEAD nonce is never reused under one key.

``x = y + m mod 2^b``. The leader alone holds ``y``, which is ``x`` plus a one-time pad from a
256-bit key: uniform whatever ``x`` is. The helper alone holds the seed: uniform and independent
of ``x``. A broker eavesdropper who has ``y`` and ``sealed`` needs the helper's X25519 private key
to recover the seed. Numbers: 80 bytes of sealed seed (32 + 32 + 16) per update.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Final

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgefl.secagg.errors import SecAggError, SecAggReason
from edgefl.secagg.ring import RingArray, RingSpec

__all__ = [
    "SEALED_SIZE",
    "SEED_SIZE",
    "HelperKeys",
    "ShareContext",
    "Shares",
    "expand_mask",
    "load_helper_public_key",
    "make_shares",
    "open_seed",
    "seal_seed",
]

SEED_SIZE: Final = 32
_KEY_SIZE: Final = 32
_TAG_SIZE: Final = 16
SEALED_SIZE: Final = _KEY_SIZE + SEED_SIZE + _TAG_SIZE
_MASK_NONCE: Final = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter + 12-byte nonce
_AEAD_NONCE: Final = bytes(12)
_INFO: Final = b"edgefl-secagg/1 seal"
_AD_TAG: Final = "edgefl-secagg/1"


@dataclass(frozen=True, slots=True)
class ShareContext:
    """What a sealed seed is bound to (its associated data)."""

    fleet: str
    device_id: str
    seq: int
    model: str
    num_params: int
    bits: int

    @property
    def key(self) -> tuple[str, int]:
        """``(device_id, seq)``: the update's identity in membership decisions."""
        return (self.device_id, self.seq)

    def associated_data(self) -> bytes:
        """Canonical JSON (sorted keys, compact) of every field plus a protocol tag."""
        fields = {
            "bits": self.bits,
            "device_id": self.device_id,
            "fleet": self.fleet,
            "model": self.model,
            "num_params": self.num_params,
            "protocol": _AD_TAG,
            "seq": self.seq,
        }
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class HelperKeys:
    """The helper's X25519 identity: generate at provisioning, load from PEM, publish the public
    key to devices (in their bundle). PEM bytes only; writing files is the caller's job
    (``0600`` for the private key, as for the Ed25519 keys)."""

    private_key: X25519PrivateKey

    @classmethod
    def generate(cls) -> HelperKeys:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, data: bytes) -> HelperKeys:
        """From an unencrypted PKCS#8 PEM; ``ValueError`` when it is not an X25519 key."""
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, X25519PrivateKey):
            raise ValueError(f"not an X25519 private key ({type(key).__name__})")
        return cls(key)

    @property
    def public_key(self) -> X25519PublicKey:
        return self.private_key.public_key()

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def load_helper_public_key(data: bytes) -> X25519PublicKey:
    """The helper's public key from SubjectPublicKeyInfo PEM; ``ValueError`` otherwise."""
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, X25519PublicKey):
        raise ValueError(f"not an X25519 public key ({type(key).__name__})")
    return key


def expand_mask(seed: bytes, spec: RingSpec, num_params: int) -> RingArray:
    """``m``: the ChaCha20 keystream of ``seed`` (nonce 0) as ``num_params`` ring words."""
    if len(seed) != SEED_SIZE:
        raise ValueError(f"seed must be {SEED_SIZE} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _MASK_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(spec.bytes_per_share(num_params)))
    return np.frombuffer(stream, dtype=spec.dtype)


def _seal_key(shared: bytes, eph_pub: bytes, helper_pub: bytes) -> ChaCha20Poly1305:
    kdf = HKDF(
        algorithm=hashes.SHA256(), length=_KEY_SIZE, salt=None, info=_INFO + eph_pub + helper_pub
    )
    return ChaCha20Poly1305(kdf.derive(shared))


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal_seed(seed: bytes, helper_public: X25519PublicKey, context: ShareContext) -> bytes:
    """``eph_pub || AEAD(seed)``, :data:`SEALED_SIZE` bytes, openable only by the helper."""
    ephemeral = X25519PrivateKey.generate()
    eph_pub, helper_pub = _raw(ephemeral.public_key()), _raw(helper_public)
    aead = _seal_key(ephemeral.exchange(helper_public), eph_pub, helper_pub)
    return eph_pub + aead.encrypt(_AEAD_NONCE, seed, context.associated_data())


def open_seed(sealed: bytes, keys: HelperKeys, context: ShareContext) -> bytes:
    """The seed of a sealed share; ``SecAggError(BAD_SEAL)`` for a wrong size, a wrong key, a
    tampered ciphertext or another context."""
    if len(sealed) != SEALED_SIZE:
        raise SecAggError(SecAggReason.BAD_SEAL, f"sealed seed has {len(sealed)} B")
    eph_pub = bytes(sealed[:_KEY_SIZE])
    try:
        shared = keys.private_key.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError:  # an all-zero (low-order) shared secret
        raise SecAggError(SecAggReason.BAD_SEAL, "degenerate ephemeral key") from None
    aead = _seal_key(shared, eph_pub, _raw(keys.public_key))
    try:
        return aead.decrypt(_AEAD_NONCE, bytes(sealed[_KEY_SIZE:]), context.associated_data())
    except InvalidTag:
        raise SecAggError(SecAggReason.BAD_SEAL, "sealed seed does not open") from None


@dataclass(frozen=True, slots=True)
class Shares:
    """The two shares of one update: ``masked`` (leader, ``b/8 · P`` bytes), ``sealed`` (helper)."""

    masked: bytes
    sealed: bytes


def make_shares(
    encoded: RingArray,
    spec: RingSpec,
    helper_public: X25519PublicKey,
    context: ShareContext,
    *,
    seed: bytes | None = None,
) -> Shares:
    """Split the ring vector ``encoded`` into two shares. ``seed`` defaults to ``os.urandom(32)``;
    pass one only in tests (a reused seed reveals the difference of two updates)."""
    if encoded.dtype != spec.dtype or encoded.shape != (context.num_params,):
        raise ValueError(f"encoded must be {spec.dtype}[{context.num_params}]")
    if context.bits != spec.bits:
        raise ValueError("context.bits differs from the ring")
    seed = os.urandom(SEED_SIZE) if seed is None else seed
    masked = encoded - expand_mask(seed, spec, context.num_params)  # wraps mod 2^b
    return Shares(masked=masked.tobytes(), sealed=seal_seed(seed, helper_public, context))
