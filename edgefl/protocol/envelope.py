"""The versioned binary envelope that wraps every payload edgefl publishes.

Byte layout (all integers big-endian; ``docs/PROTOCOL.md``, "Envelope")::

    offset  size  field
    0       4     magic           b"EDFL"
    4       1     format version  u8, 1
    5       1     kind            u8, EnvelopeKind
    6       2     flags           u16, 0 or FLAG_SIGNED (bit 0); other bits are rejected
    8       4     header length   u32, H <= MAX_HEADER_LEN (64 KiB)
    12      4     payload length  u32, P
    16      H     header          compact JSON object, UTF-8
    16+H    P     payload         opaque bytes (codec body, model bytes, chunk data, or empty)
    16+H+P  T     trailer         only when FLAG_SIGNED: T = 72 = key id (8) + Ed25519 signature
                                  (64) over bytes [0, 16+H+P+8); absent (T = 0) otherwise
    16+H+P+T 4    checksum        u32, zlib.crc32 of bytes [0, 16+H+P+T)

The total size of an envelope is ``20 + H + P`` bytes (``OVERHEAD + H + P``), plus
``SIGNATURE_TRAILER_LEN`` (72) when signed.

Signing (``docs/PROTOCOL.md``, "Signed envelopes") is layered on top without any cryptography in
this module: :func:`sign_envelope` turns an unsigned envelope into a signed one given a key id and
a ``sign(bytes) -> 64 bytes`` callable, and :func:`decode_envelope` returns the trailer as
:attr:`Envelope.signature` (the exact bytes the signature covers included) without verifying it:
receivers without security simply ignore it; ``edgefl.security`` verifies it.

:func:`decode_envelope` checks, in this order, and raises the first failure as a
``ProtocolError``: at least 16 bytes (TRUNCATED), magic (BAD_MAGIC), version (BAD_VERSION), kind
(BAD_KIND), flags (BAD_HEADER), declared header/payload lengths against the limits (TOO_LARGE) and
against the actual length, trailer included (TRUNCATED when short, BAD_HEADER when there are
trailing bytes or FLAG_SIGNED is set on an envelope of exactly the unsigned length) — all
before the payload is touched — then the checksum (BAD_CHECKSUM) and finally that the header is
strict JSON (no NaN/Infinity, no duplicate keys, no integer beyond ``MAX_JSON_INT`` = 2**64 in
magnitude) whose top level is an object (BAD_HEADER). The
returned payload is a zero-copy ``memoryview`` slice of the input.

A zero-length MQTT payload on a retained topic is the deletion of the retained message, not an
envelope: receivers test for it before decoding (decoding it would raise TRUNCATED).
"""

from __future__ import annotations

import json
import math
import struct
import zlib

try:  # the same CRC-32 (zlib's polynomial) with SIMD folding: ~11 GB/s instead of ~2.3 GB/s
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - a platform without a zlib-ng wheel
    crc32 = zlib.crc32
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

from edgefl.errors import ProtocolError, RejectReason

__all__ = [
    "FLAG_SIGNED",
    "FORMAT_VERSION",
    "KEY_ID_LEN",
    "KNOWN_FLAGS",
    "MAGIC",
    "MAX_HEADER_LEN",
    "MAX_PAYLOAD_LEN",
    "OVERHEAD",
    "PREFIX_LEN",
    "SIGNATURE_LEN",
    "SIGNATURE_TRAILER_LEN",
    "Envelope",
    "EnvelopeKind",
    "EnvelopeSignature",
    "JSONObject",
    "decode_envelope",
    "encode_envelope",
    "encode_header",
    "peek_kind",
    "sign_envelope",
]

MAGIC: Final = b"EDFL"
FORMAT_VERSION: Final = 1
MAX_HEADER_LEN: Final = 64 * 1024
"""Largest header a version-1 receiver accepts (and a sender may produce)."""
MAX_PAYLOAD_LEN: Final = 2**32 - 1
"""Largest payload the u32 length field can describe; receivers set a much lower ``max_payload``."""

_PREFIX = struct.Struct(">4sBBHII")
_CRC = struct.Struct(">I")
PREFIX_LEN: Final = _PREFIX.size  # 16
OVERHEAD: Final = PREFIX_LEN + _CRC.size  # 20: fixed bytes around header and payload

FLAG_SIGNED: Final = 0x0001
"""Flags bit 0: a signature trailer follows the payload (PROTOCOL.md, "Signed envelopes")."""
KNOWN_FLAGS: Final = FLAG_SIGNED
"""Every flags bit a version-1 receiver understands; any other bit is BAD_HEADER."""
KEY_ID_LEN: Final = 8
"""Bytes of the signer's key id: the first 8 bytes of SHA-256 over the raw 32-byte public key."""
SIGNATURE_LEN: Final = 64
"""Bytes of an Ed25519 signature."""
SIGNATURE_TRAILER_LEN: Final = KEY_ID_LEN + SIGNATURE_LEN  # 72

JSONObject = dict[str, Any]
"""A decoded JSON object (the envelope header)."""


class EnvelopeKind(IntEnum):
    """What an envelope carries. Values are on the wire and never reused."""

    UPDATE = 1  # header UpdateHeader, payload codec body
    UPDATE_CHUNK = 2  # header ChunkHeader, payload a slice of an UPDATE envelope
    MODEL_MANIFEST = 3  # header ModelManifest, empty payload
    MODEL_CHUNK = 4  # header ChunkHeader, payload a slice of a model artifact
    DEVICE_STATE = 5  # header DeviceState, empty payload
    SERVER_STATE = 6  # header ServerState, empty payload
    METRICS = 7  # header ServerMetrics, empty payload
    RECEIPT = 8  # header Receipt, empty payload (protocol 1.1, PROTOCOL.md "Receipts")
    CHECKIN = 9  # header CheckIn, empty payload (protocol 1.2, PROTOCOL.md "Participation")
    LEASE = 10  # header Lease, empty payload (protocol 1.2)
    # secure aggregation (protocol 1.3, PROTOCOL.md "Secure aggregation")
    SECAGG_SHARE = 11  # header SecAggShareHeader, payload the masked share (b/8 bytes per param)
    SECAGG_SEED = 12  # header SecAggSeedHeader, payload the sealed seed (80 bytes)
    SECAGG_COORD = 13  # header SecAggCoord, payload a helper's partial sum (or empty)


_KINDS: Final = frozenset(int(k) for k in EnvelopeKind)


@dataclass(frozen=True)
class EnvelopeSignature:
    """The signature trailer of a signed envelope, as decoded (not verified).

    ``signed`` is a read-only view of the bytes the signature covers: the whole envelope from
    the magic up to and including ``key_id`` (``[0, 16 + H + P + 8)``), i.e. everything but the
    signature itself and the checksum. The prefix inside it carries ``FLAG_SIGNED``, so a
    signature can never be reused on the unsigned form of the envelope or vice versa.
    """

    key_id: bytes  # KEY_ID_LEN bytes
    signature: bytes  # SIGNATURE_LEN bytes
    signed: memoryview


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope. ``payload`` is a read-only view into the decoded buffer (no copy).

    ``signature`` is the decoded (unverified) trailer of a signed envelope, None when unsigned.
    ``raw`` is a read-only view of the whole envelope as received (what an
    ``UpdateAuthenticator`` needs after reassembly), None only for envelopes built by hand.
    """

    kind: EnvelopeKind
    header: JSONObject
    payload: memoryview
    flags: int = 0
    signature: EnvelopeSignature | None = None
    raw: memoryview | None = None

    @property
    def signed(self) -> bool:
        """Whether the envelope carries a signature trailer (verified or not)."""
        return self.signature is not None


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in header")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text[:20]} in header")
    return value


MAX_JSON_INT: Final = 2**64
"""Largest magnitude of a JSON integer in a header; beyond it the header is BAD_HEADER (no field
takes one, and converting a bigger one to float would overflow)."""


def _bounded_int(text: str) -> int:
    value = int(text) if len(text) <= 22 else MAX_JSON_INT + 1
    if abs(value) > MAX_JSON_INT:
        raise ValueError(f"integer {text[:24]}... out of range in header")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JSONObject:
    obj: JSONObject = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate header key {key!r}")
        obj[key] = value
    return obj


# one decoder for every header: json.loads(..., hooks) builds a new one per call (~6 us)
_HEADER_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
    parse_int=_bounded_int,
)


def encode_header(header: Mapping[str, Any]) -> bytes:
    """Canonical header bytes: compact, key-sorted, UTF-8 JSON without NaN/Infinity.

    Raises ``ProtocolError(BAD_HEADER)`` if the header is not JSON-serialisable or longer than
    ``MAX_HEADER_LEN``.
    """
    try:
        text = json.dumps(
            dict(header), separators=(",", ":"), sort_keys=True, allow_nan=False, ensure_ascii=False
        )
        raw = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(RejectReason.BAD_HEADER, f"header not encodable: {exc}") from None
    if len(raw) > MAX_HEADER_LEN:
        raise ProtocolError(RejectReason.BAD_HEADER, f"header {len(raw)} B > {MAX_HEADER_LEN} B")
    return raw


def encode_envelope(
    kind: EnvelopeKind, header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b""
) -> bytes:
    """Serialise one envelope. Raises ``ProtocolError`` (BAD_HEADER, TOO_LARGE) on bad input."""
    kind = EnvelopeKind(kind)
    head = encode_header(header)
    body = _byte_view(payload)
    if len(body) > MAX_PAYLOAD_LEN:
        raise ProtocolError(RejectReason.TOO_LARGE, f"payload {len(body)} B > u32")
    out = bytearray(OVERHEAD + len(head) + len(body))
    _PREFIX.pack_into(out, 0, MAGIC, FORMAT_VERSION, kind, 0, len(head), len(body))
    end_head = PREFIX_LEN + len(head)
    end_body = end_head + len(body)
    out[PREFIX_LEN:end_head] = head
    out[end_head:end_body] = body
    _CRC.pack_into(out, end_body, crc32(memoryview(out)[:end_body]))
    return bytes(out)


def peek_kind(data: bytes | bytearray | memoryview) -> EnvelopeKind:
    """The kind of an envelope after checking only its prefix (length, magic, version, kind).

    Cheap routing aid; it does not verify lengths or the checksum — call :func:`decode_envelope`.
    """
    return _check_prefix(_byte_view(data))[0]


def _check_prefix(view: memoryview) -> tuple[EnvelopeKind, int, int, int]:
    if len(view) < PREFIX_LEN:
        raise ProtocolError(RejectReason.TRUNCATED, f"{len(view)} B < {PREFIX_LEN} B prefix")
    magic, version, kind, flags, head_len, body_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise ProtocolError(RejectReason.BAD_MAGIC, f"magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise ProtocolError(RejectReason.BAD_VERSION, f"format version {version}")
    if kind not in _KINDS:
        raise ProtocolError(RejectReason.BAD_KIND, f"envelope kind {kind}")
    return EnvelopeKind(kind), flags, head_len, body_len


def decode_envelope(
    data: bytes | bytearray | memoryview, *, max_payload: int, max_header: int = MAX_HEADER_LEN
) -> Envelope:
    """Decode and verify one envelope (see the module docstring for the order of checks).

    ``max_payload`` bounds the declared payload length (TOO_LARGE beyond it) and is checked
    before anything is allocated or checksummed. No copy of the payload is made.
    """
    view = _byte_view(data)
    kind, flags, head_len, body_len = _check_prefix(view)
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(RejectReason.BAD_HEADER, f"unknown flags {flags:#06x}")
    if head_len > max_header:
        raise ProtocolError(RejectReason.TOO_LARGE, f"header {head_len} B > {max_header} B")
    if body_len > max_payload:
        raise ProtocolError(RejectReason.TOO_LARGE, f"payload {body_len} B > {max_payload} B")
    end_head = PREFIX_LEN + head_len
    end_body = end_head + body_len
    end_trailer = end_body + (SIGNATURE_TRAILER_LEN if flags & FLAG_SIGNED else 0)
    total = end_trailer + _CRC.size
    if end_trailer != end_body and len(view) == end_body + _CRC.size:
        raise ProtocolError(RejectReason.BAD_HEADER, "FLAG_SIGNED set but no signature trailer")
    if len(view) < total:
        raise ProtocolError(RejectReason.TRUNCATED, f"{len(view)} B < declared {total} B")
    if len(view) > total:
        raise ProtocolError(RejectReason.BAD_HEADER, f"{len(view) - total} trailing bytes")
    (crc,) = _CRC.unpack_from(view, end_trailer)
    if crc32(view[:end_trailer]) != crc:
        raise ProtocolError(RejectReason.BAD_CHECKSUM, "crc32 mismatch")
    try:
        header = _HEADER_DECODER.decode(str(view[PREFIX_LEN:end_head], "utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError included
        raise ProtocolError(RejectReason.BAD_HEADER, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(RejectReason.BAD_HEADER, "header is not a JSON object")
    signature = None
    if flags & FLAG_SIGNED:
        end_key = end_body + KEY_ID_LEN
        signature = EnvelopeSignature(
            key_id=bytes(view[end_body:end_key]),
            signature=bytes(view[end_key:end_trailer]),
            signed=view[:end_key].toreadonly(),
        )
    readonly = view.toreadonly()
    return Envelope(kind, header, readonly[end_head:end_body], flags, signature, readonly[:total])


def sign_envelope(
    envelope: bytes | bytearray | memoryview,
    *,
    key_id: bytes,
    sign: Callable[[bytes], bytes],
) -> bytes:
    """The signed form of a valid unsigned ``envelope`` (``docs/PROTOCOL.md``, "Signed
    envelopes").

    Sets ``FLAG_SIGNED`` in the prefix, appends ``key_id`` (``KEY_ID_LEN`` bytes), then
    ``sign(prefix + header + payload + key_id)`` (``SIGNATURE_LEN`` bytes) and a new CRC-32 over
    everything before it. Header and payload bytes are unchanged. Raises ``ProtocolError`` if
    ``envelope`` does not decode, and ``ValueError`` if it is already signed or ``key_id`` /
    the signature have the wrong length.
    """
    if len(key_id) != KEY_ID_LEN:
        raise ValueError(f"key id must be {KEY_ID_LEN} bytes")
    view = _byte_view(envelope)
    decoded = decode_envelope(view, max_payload=MAX_PAYLOAD_LEN)
    if decoded.signed:
        raise ValueError("envelope is already signed")
    end_body = len(view) - _CRC.size
    out = bytearray(len(view) + SIGNATURE_TRAILER_LEN)
    out[:end_body] = view[:end_body]
    struct.pack_into(">H", out, 6, decoded.flags | FLAG_SIGNED)
    end_key = end_body + KEY_ID_LEN
    out[end_body:end_key] = key_id
    signature = sign(bytes(out[:end_key]))
    if len(signature) != SIGNATURE_LEN:
        raise ValueError(f"signature must be {SIGNATURE_LEN} bytes, got {len(signature)}")
    end_trailer = end_key + SIGNATURE_LEN
    out[end_key:end_trailer] = signature
    _CRC.pack_into(out, end_trailer, crc32(memoryview(out)[:end_trailer]))
    return bytes(out)
