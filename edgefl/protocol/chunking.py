"""Split messages into packets under an MQTT size limit, and reassemble them (sans-IO).

A *chunk packet* is an ordinary envelope (``envelope.py``) of kind ``UPDATE_CHUNK`` or
``MODEL_CHUNK`` whose header is a :class:`ChunkHeader` and whose payload is one slice of the
message. Every packet, framing included, is at most ``max_packet`` bytes.

- Updates: :func:`packetize` publishes an encoded UPDATE envelope *as is* when it fits in one
  packet, otherwise as ``UPDATE_CHUNK`` packets whose slices concatenate to that envelope.
  :func:`depacketize` undoes this on the receiving side.
- Model artifacts (raw weight bytes, ONNX graphs): always ``MODEL_CHUNK`` packets, one per
  retained topic ``model/<version>/<index>``, even when a single chunk suffices. Their
  ``sha256``/``total_size``/``chunk_size``/``count`` equal the manifest's fields.

Chunk geometry is strict: chunk ``i`` carries bytes ``[i*chunk_size, min((i+1)*chunk_size,
total_size))`` and ``count == max(1, ceil(total_size / chunk_size))``; anything else is BAD_CHUNK.
The message id defaults to the first 16 bytes of the message's SHA-256, so a retransmission of the
same message (e.g. from a device's spool after a reconnect) merges with, or is recognised as, the
first copy.

:class:`Reassembler` is sans-IO: the caller passes ``now`` (a monotonic clock in seconds). It keys
partial messages by ``(source, kind, message_id)`` — ``source`` is chosen by the caller, normally
the sender's device id — so one sender cannot disturb another's messages. See the class docstring
for the memory bounds, TTL and completed-once rules.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from edgefl.errors import ProtocolError, RejectReason

from .envelope import (
    OVERHEAD,
    Envelope,
    EnvelopeKind,
    JSONObject,
    decode_envelope,
    encode_envelope,
    encode_header,
    peek_kind,
)

__all__ = [
    "CHUNK_KINDS",
    "DEFAULT_MAX_PACKET",
    "MIN_CHUNK_SIZE",
    "MIN_MAX_PACKET",
    "Chunk",
    "ChunkHeader",
    "ChunkedMessage",
    "CompletedMessage",
    "DroppedMessage",
    "OverflowPolicy",
    "Reassembler",
    "ReassemblyConfig",
    "ReassemblyStatistics",
    "chunk_count",
    "chunk_data_size",
    "decode_chunk",
    "depacketize",
    "packetize",
    "split_message",
]

DEFAULT_MAX_PACKET: Final = 256 * 1024
"""Default upper bound of one MQTT payload (packet), framing included: 262,144 bytes."""
MIN_MAX_PACKET: Final = 1024
"""Smallest ``max_packet`` accepted by the splitter (chunk framing needs about 200 bytes)."""
MIN_CHUNK_SIZE: Final = 512
"""Smallest ``chunk_size`` of a message with more than one chunk: bounds the per-chunk
bookkeeping a receiver holds relative to the data (no floods of 1-byte chunks)."""
MESSAGE_ID_LEN: Final = 16
CHUNK_KINDS: Final = frozenset({EnvelopeKind.UPDATE_CHUNK, EnvelopeKind.MODEL_CHUNK})
_MAX_INT: Final = 2**63 - 1
_HEX: Final = frozenset("0123456789abcdef")


def chunk_count(total_size: int, chunk_size: int) -> int:
    """Number of chunks of a ``total_size``-byte message: ``max(1, ceil(total / chunk_size))``."""
    return max(1, -(-total_size // chunk_size))


def _bad(detail: str) -> ProtocolError:
    return ProtocolError(RejectReason.BAD_CHUNK, detail)


def _hex_field(header: JSONObject, key: str, nbytes: int) -> bytes:
    value = header.get(key)
    if not isinstance(value, str) or len(value) != 2 * nbytes or not set(value) <= _HEX:
        raise _bad(f"{key} must be {2 * nbytes} lowercase hex digits")
    return bytes.fromhex(value)


def _int_field(header: JSONObject, key: str, minimum: int) -> int:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_INT:
        raise _bad(f"{key} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ChunkHeader:
    """Header of a chunk packet; the same for every chunk of a message except ``index``."""

    message_id: bytes  # 16 bytes
    index: int  # 0 <= index < count
    count: int  # == max(1, ceil(total_size / chunk_size))
    chunk_size: int  # >= 1 (>= MIN_CHUNK_SIZE when count > 1): data bytes of all but the last
    total_size: int  # >= 0: bytes of the whole message
    sha256: bytes  # 32 bytes: SHA-256 of the whole message

    def __post_init__(self) -> None:
        if len(self.message_id) != MESSAGE_ID_LEN or len(self.sha256) != 32:
            raise _bad("message_id must be 16 bytes and sha256 32 bytes")
        if not (self.chunk_size >= 1 and self.total_size >= 0 and 0 <= self.index < self.count):
            raise _bad(f"bad chunk geometry {self.index}/{self.count}")
        if self.count > 1 and self.chunk_size < MIN_CHUNK_SIZE:
            raise _bad(f"chunk_size {self.chunk_size} < {MIN_CHUNK_SIZE} in a multi-chunk message")
        if self.count != chunk_count(self.total_size, self.chunk_size):
            raise _bad(
                f"count {self.count} inconsistent with total_size {self.total_size}"
                f" and chunk_size {self.chunk_size}"
            )

    @property
    def data_length(self) -> int:
        """Exact number of data bytes chunk ``index`` carries."""
        return max(0, min(self.chunk_size, self.total_size - self.index * self.chunk_size))

    def same_message(self, other: ChunkHeader) -> bool:
        """True when both headers describe the same message (everything but ``index`` equal)."""
        return (self.message_id, self.count, self.chunk_size, self.total_size, self.sha256) == (
            other.message_id,
            other.count,
            other.chunk_size,
            other.total_size,
            other.sha256,
        )

    def to_header(self) -> JSONObject:
        return {
            "id": self.message_id.hex(),
            "index": self.index,
            "count": self.count,
            "chunk_size": self.chunk_size,
            "total_size": self.total_size,
            "sha256": self.sha256.hex(),
        }

    @classmethod
    def from_header(cls, header: JSONObject) -> ChunkHeader:
        """Validate a decoded header (extra keys are ignored); raises BAD_CHUNK."""
        return cls(
            message_id=_hex_field(header, "id", MESSAGE_ID_LEN),
            index=_int_field(header, "index", 0),
            count=_int_field(header, "count", 1),
            chunk_size=_int_field(header, "chunk_size", 1),
            total_size=_int_field(header, "total_size", 0),
            sha256=_hex_field(header, "sha256", 32),
        )


@dataclass(frozen=True)
class Chunk:
    """One decoded chunk packet. ``data`` is a view into the packet (no copy)."""

    kind: EnvelopeKind
    header: ChunkHeader
    data: memoryview


def decode_chunk(envelope: Envelope) -> Chunk:
    """Interpret a decoded envelope as a chunk; BAD_KIND if it is not a chunk kind, BAD_CHUNK if
    the header is invalid or the payload length does not match the geometry."""
    if envelope.kind not in CHUNK_KINDS:
        raise ProtocolError(RejectReason.BAD_KIND, f"{envelope.kind.name} is not a chunk kind")
    header = ChunkHeader.from_header(envelope.header)
    if len(envelope.payload) != header.data_length:
        raise _bad(
            f"chunk {header.index} has {len(envelope.payload)} B, expected {header.data_length}"
        )
    return Chunk(envelope.kind, header, envelope.payload)


# ---------------------------------------------------------------------------------------------
# splitting


def chunk_data_size(total_size: int, *, max_packet: int = DEFAULT_MAX_PACKET) -> int:
    """Largest ``chunk_size`` for which every chunk packet of a ``total_size``-byte message is at
    most ``max_packet`` bytes. Raises ``ValueError`` if ``max_packet < MIN_MAX_PACKET``."""
    if max_packet < MIN_MAX_PACKET:
        raise ValueError(f"max_packet {max_packet} < {MIN_MAX_PACKET}")
    # Upper bound of the header: every integer field is <= max(total_size, max_packet).
    big = max(total_size, max_packet)
    worst: JSONObject = {"id": "0" * 32, "sha256": "0" * 64}
    worst |= dict.fromkeys(("index", "count", "chunk_size", "total_size"), big)
    return max_packet - OVERHEAD - len(encode_header(worst))


@dataclass(frozen=True)
class ChunkedMessage:
    """The packets of one split message and its geometry (what a model manifest records)."""

    kind: EnvelopeKind
    message_id: bytes
    sha256: bytes
    total_size: int
    chunk_size: int
    packets: tuple[bytes, ...]

    @property
    def count(self) -> int:
        return len(self.packets)


def split_message(
    data: bytes | bytearray | memoryview,
    *,
    kind: EnvelopeKind = EnvelopeKind.UPDATE_CHUNK,
    max_packet: int = DEFAULT_MAX_PACKET,
    message_id: bytes | None = None,
) -> ChunkedMessage:
    """Split ``data`` into chunk packets of ``kind`` (always at least one packet), each at most
    ``max_packet`` bytes. ``message_id`` defaults to ``sha256(data)[:16]``."""
    if kind not in CHUNK_KINDS:
        raise ValueError(f"{kind!r} is not a chunk kind")
    view = memoryview(data).cast("B")
    digest = hashlib.sha256(view).digest()
    mid = digest[:MESSAGE_ID_LEN] if message_id is None else message_id
    if len(mid) != MESSAGE_ID_LEN:
        raise ValueError("message_id must be 16 bytes")
    total = len(view)
    size = chunk_data_size(total, max_packet=max_packet)
    count = chunk_count(total, size)
    packets = tuple(
        encode_envelope(
            kind,
            ChunkHeader(mid, i, count, size, total, digest).to_header(),
            view[i * size : (i + 1) * size],
        )
        for i in range(count)
    )
    return ChunkedMessage(kind, mid, digest, total, size, packets)


def packetize(
    message: bytes,
    *,
    max_packet: int = DEFAULT_MAX_PACKET,
    chunk_kind: EnvelopeKind = EnvelopeKind.UPDATE_CHUNK,
) -> list[bytes]:
    """MQTT payloads for one encoded envelope: ``[message]`` when it fits in ``max_packet``,
    otherwise its ``chunk_kind`` chunk packets in index order."""
    if peek_kind(message) in CHUNK_KINDS:
        raise ValueError("cannot packetize a chunk packet")
    if len(message) <= max_packet:
        return [message]
    return list(split_message(message, kind=chunk_kind, max_packet=max_packet).packets)


# ---------------------------------------------------------------------------------------------
# reassembly


class OverflowPolicy(StrEnum):
    """What the reassembler does when a new message does not fit its memory bounds."""

    EVICT_OLDEST = "evict_oldest"  # drop the least recently active partial message(s)
    REFUSE_NEW = "refuse_new"  # reject the new message's chunk with REASSEMBLY_FULL


@dataclass(frozen=True)
class ReassemblyConfig:
    """Bounds of a :class:`Reassembler`. ``max_message_size <= max_buffered_bytes``."""

    max_message_size: int = 64 * 1024 * 1024
    max_buffered_bytes: int = 128 * 1024 * 1024
    max_partials: int = 64
    max_partials_per_source: int = 4
    ttl: float = 60.0
    remember_completed: int = 4096
    overflow: OverflowPolicy = OverflowPolicy.EVICT_OLDEST
    max_pending_drops: int = 1024

    def __post_init__(self) -> None:
        if not 0 <= self.max_message_size <= self.max_buffered_bytes:
            raise ValueError("need 0 <= max_message_size <= max_buffered_bytes")
        if min(self.max_partials, self.max_partials_per_source, self.max_pending_drops) < 1:
            raise ValueError("partial and drop limits must be >= 1")
        if not self.ttl > 0 or self.remember_completed < 0:
            raise ValueError("ttl must be > 0 and remember_completed >= 0")


@dataclass(frozen=True)
class CompletedMessage:
    """A reassembled, digest-verified message, returned exactly once."""

    source: str
    kind: EnvelopeKind
    message_id: bytes
    data: bytes
    count: int


@dataclass(frozen=True)
class DroppedMessage:
    """An incomplete message the reassembler gave up (REASSEMBLY_EXPIRED or REASSEMBLY_FULL)."""

    source: str
    kind: EnvelopeKind
    message_id: bytes
    reason: RejectReason
    received_chunks: int
    count: int
    received_bytes: int


@dataclass(frozen=True)
class ReassemblyStatistics:
    """Counters since creation (``partials``/``bytes_*`` are current values)."""

    chunks: int = 0  # new chunks stored (not duplicates)
    completed: int = 0
    duplicates: int = 0  # identical repeat of a chunk of a partial message
    late_duplicates: int = 0  # chunk of a recently completed message (ignored)
    conflicts: int = 0  # CHUNK_CONFLICT raised
    expired: int = 0  # partials dropped after ttl without a new chunk
    evicted: int = 0  # partials dropped to make room (EVICT_OLDEST)
    refused: int = 0  # REASSEMBLY_FULL raised (REFUSE_NEW)
    too_large: int = 0  # TOO_LARGE raised (declared total_size > max_message_size)
    digest_failures: int = 0  # BAD_CHECKSUM raised on completion
    partials: int = 0
    bytes_buffered: int = 0  # data bytes held
    bytes_reserved: int = 0  # sum of declared total_size of partial messages


_Key = tuple[str, EnvelopeKind, bytes]


class _Partial:
    __slots__ = ("header", "last_seen", "pieces", "received")

    def __init__(self, header: ChunkHeader, now: float) -> None:
        self.header = header
        self.pieces: dict[int, bytes | memoryview] = {}
        self.received = 0
        self.last_seen = now


class Reassembler:
    """Bounded, expiring reassembly of chunk packets.

    Rules (``docs/PROTOCOL.md``, "Reassembly"):

    - Chunks may arrive in any order and any number of times. An identical repeat is counted as a
      duplicate and ignored; a chunk whose bytes or message geometry differ from what is already
      held for the same key raises CHUNK_CONFLICT (the first copy is kept).
    - When the last chunk arrives the message is joined, its SHA-256 verified (BAD_CHECKSUM and
      the partial is dropped on mismatch) and returned exactly once. Its key is remembered
      (``remember_completed`` keys, FIFO), and later chunks of it are counted as late duplicates.
    - A declared ``total_size`` above ``max_message_size`` raises TOO_LARGE before any buffering.
      Admitting a new multi-chunk message reserves its declared ``total_size``; the sum of
      reservations stays <= ``max_buffered_bytes``, the number of partials <= ``max_partials``
      and per source <= ``max_partials_per_source``. When a bound would be exceeded, partials idle
      for ``ttl`` are expired first; then ``EVICT_OLDEST`` drops the least recently active partials
      (of that source, for the per-source bound) and ``REFUSE_NEW`` raises REASSEMBLY_FULL.
    - A partial that receives no *new* chunk for ``ttl`` seconds expires (duplicates do not keep it
      alive). :meth:`expire` drops those and returns every message dropped since the previous call
      (expired and evicted, each with its reason; at most ``max_pending_drops`` are kept between
      calls, the oldest are discarded first). All counts, exact, are in :meth:`statistics`.
    """

    def __init__(self, config: ReassemblyConfig | None = None) -> None:
        self.config = config or ReassemblyConfig()
        self._partials: OrderedDict[_Key, _Partial] = OrderedDict()  # least recently active first
        self._completed: OrderedDict[_Key, None] = OrderedDict()
        self._dropped: deque[DroppedMessage] = deque(maxlen=self.config.max_pending_drops)
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "chunks",
                "completed",
                "duplicates",
                "late_duplicates",
                "conflicts",
                "expired",
                "evicted",
                "refused",
                "too_large",
                "digest_failures",
            ),
            0,
        )
        self._buffered = 0
        self._reserved = 0

    # -- public API ---------------------------------------------------------------------------

    def add(self, chunk: Chunk, *, source: str, now: float) -> CompletedMessage | None:
        """Add one chunk; return the completed message when this chunk completes it, else None.

        Raises ``ProtocolError`` with CHUNK_CONFLICT, TOO_LARGE, REASSEMBLY_FULL or BAD_CHECKSUM.
        """
        head = chunk.header
        if len(chunk.data) != head.data_length:
            raise _bad(f"chunk {head.index} has {len(chunk.data)} B, expected {head.data_length}")
        key: _Key = (source, chunk.kind, head.message_id)
        if key in self._completed:
            self._counts["late_duplicates"] += 1
            return None
        partial = self._partials.get(key)
        if partial is not None:
            return self._add_to(key, partial, chunk, now)
        if head.total_size > self.config.max_message_size:
            self._counts["too_large"] += 1
            raise ProtocolError(
                RejectReason.TOO_LARGE,
                f"message of {head.total_size} B > {self.config.max_message_size} B",
            )
        if head.count == 1:
            self._counts["chunks"] += 1
            return self._finish(key, head, [bytes(chunk.data)])
        self._make_room(source, head.total_size, now)
        partial = _Partial(head, now)
        self._partials[key] = partial
        self._reserved += head.total_size
        return self._add_to(key, partial, chunk, now)

    def expire(self, now: float) -> list[DroppedMessage]:
        """Drop partials idle for ``ttl`` seconds; return all drops since the previous call."""
        self._expire(now)
        dropped = list(self._dropped)
        self._dropped.clear()
        return dropped

    def statistics(self) -> ReassemblyStatistics:
        return ReassemblyStatistics(
            **self._counts,
            partials=len(self._partials),
            bytes_buffered=self._buffered,
            bytes_reserved=self._reserved,
        )

    # -- internals ----------------------------------------------------------------------------

    def _add_to(
        self, key: _Key, partial: _Partial, chunk: Chunk, now: float
    ) -> CompletedMessage | None:
        head = chunk.header
        if not head.same_message(partial.header):
            self._counts["conflicts"] += 1
            raise ProtocolError(RejectReason.CHUNK_CONFLICT, "chunk geometry differs for same id")
        held = partial.pieces.get(head.index)
        if held is not None:
            if held != chunk.data:
                self._counts["conflicts"] += 1
                raise ProtocolError(
                    RejectReason.CHUNK_CONFLICT, f"chunk {head.index} differs from earlier copy"
                )
            self._counts["duplicates"] += 1
            return None
        # a view of an immutable payload is kept as is (no copy); anything else is copied
        data = chunk.data
        piece = data if isinstance(data.obj, bytes) else bytes(data)
        partial.pieces[head.index] = piece
        partial.received += len(piece)
        partial.last_seen = now
        self._buffered += len(piece)
        self._counts["chunks"] += 1
        self._partials.move_to_end(key)
        if len(partial.pieces) < head.count:
            return None
        self._remove(key)
        return self._finish(key, head, [partial.pieces[i] for i in range(head.count)])

    def _finish(
        self, key: _Key, head: ChunkHeader, pieces: list[bytes | memoryview]
    ) -> CompletedMessage:
        data = bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
        if len(data) != head.total_size or hashlib.sha256(data).digest() != head.sha256:
            self._counts["digest_failures"] += 1
            raise ProtocolError(RejectReason.BAD_CHECKSUM, "reassembled message sha256 mismatch")
        self._counts["completed"] += 1
        if self.config.remember_completed:
            self._completed[key] = None
            if len(self._completed) > self.config.remember_completed:
                self._completed.popitem(last=False)
        return CompletedMessage(key[0], key[1], head.message_id, data, head.count)

    def _remove(self, key: _Key) -> _Partial:
        partial = self._partials.pop(key)
        self._buffered -= partial.received
        self._reserved -= partial.header.total_size
        return partial

    def _drop(self, key: _Key, reason: RejectReason) -> None:
        partial = self._remove(key)
        self._counts["expired" if reason is RejectReason.REASSEMBLY_EXPIRED else "evicted"] += 1
        self._dropped.append(
            DroppedMessage(
                key[0],
                key[1],
                key[2],
                reason,
                len(partial.pieces),
                partial.header.count,
                partial.received,
            )
        )

    def _expire(self, now: float) -> None:
        ttl = self.config.ttl
        # Entries are ordered by last activity, but ``now`` may jump; scan all, it is bounded.
        for key in [k for k, p in self._partials.items() if now - p.last_seen >= ttl]:
            self._drop(key, RejectReason.REASSEMBLY_EXPIRED)

    def _violations(self, source: str, size: int) -> tuple[bool, bool]:
        cfg = self.config
        per_source = sum(1 for k in self._partials if k[0] == source)
        global_full = (
            len(self._partials) >= cfg.max_partials
            or self._reserved + size > cfg.max_buffered_bytes
        )
        return global_full, per_source >= cfg.max_partials_per_source

    def _make_room(self, source: str, size: int, now: float) -> None:
        global_full, source_full = self._violations(source, size)
        if not (global_full or source_full):
            return
        self._expire(now)
        while True:
            global_full, source_full = self._violations(source, size)
            if not (global_full or source_full):
                return
            if self.config.overflow is OverflowPolicy.REFUSE_NEW:
                self._counts["refused"] += 1
                which = "per-source" if source_full else "global"
                raise ProtocolError(RejectReason.REASSEMBLY_FULL, f"{which} reassembly bound hit")
            victim = next(k for k in self._partials if not source_full or k[0] == source)
            self._drop(victim, RejectReason.REASSEMBLY_FULL)


# ---------------------------------------------------------------------------------------------
# receiving side of packetize


def depacketize(
    packet: bytes | bytearray | memoryview,
    *,
    reassembler: Reassembler,
    source: str,
    now: float,
    max_packet: int = DEFAULT_MAX_PACKET,
    message_kind: EnvelopeKind = EnvelopeKind.UPDATE,
    chunk_kind: EnvelopeKind = EnvelopeKind.UPDATE_CHUNK,
) -> Envelope | None:
    """Receive one MQTT payload produced by :func:`packetize`.

    Returns the decoded ``message_kind`` envelope when the packet is one, or when this chunk
    completes one; None while chunks are missing (or for duplicates). ``max_packet`` bounds the
    payload of a single packet and should be >= the largest ``max_packet`` any sender uses; the
    reassembled envelope is bounded by the reassembler's ``max_message_size``. Raises
    ``ProtocolError`` (BAD_KIND for any other kind, plus every envelope and chunk error).
    """
    outer = decode_envelope(packet, max_payload=max_packet)
    if outer.kind is message_kind:
        return outer
    if outer.kind is not chunk_kind:
        raise ProtocolError(RejectReason.BAD_KIND, f"unexpected {outer.kind.name} packet")
    done = reassembler.add(decode_chunk(outer), source=source, now=now)
    if done is None:
        return None
    inner = decode_envelope(done.data, max_payload=reassembler.config.max_message_size)
    if inner.kind is not message_kind:
        raise ProtocolError(RejectReason.BAD_KIND, f"chunks carried {inner.kind.name}")
    return inner
