"""Chunking: packets under the size limit, bit-exact reassembly, bounded and expiring buffers."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.chunking import (
    DEFAULT_MAX_PACKET,
    MIN_CHUNK_SIZE,
    MIN_MAX_PACKET,
    Chunk,
    ChunkHeader,
    OverflowPolicy,
    Reassembler,
    ReassemblyConfig,
    chunk_count,
    chunk_data_size,
    decode_chunk,
    depacketize,
    packetize,
    split_message,
)
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope, encode_envelope


def chunks_of(
    data: bytes, max_packet: int = MIN_MAX_PACKET, kind: EnvelopeKind = EnvelopeKind.UPDATE_CHUNK
) -> list[Chunk]:
    packets = split_message(data, kind=kind, max_packet=max_packet).packets
    return [decode_chunk(decode_envelope(p, max_payload=max_packet)) for p in packets]


def feed(
    r: Reassembler, chunks: list[Chunk], *, source: str = "d", now: float = 0.0
) -> list[bytes]:
    done = [r.add(c, source=source, now=now) for c in chunks]
    return [m.data for m in done if m is not None]


def error_reason(exc_info: pytest.ExceptionInfo[ProtocolError]) -> RejectReason:
    return exc_info.value.reason


# -- splitting ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=20_000),
    max_packet=st.integers(min_value=MIN_MAX_PACKET, max_value=4096),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_shuffle_duplicate_reassemble_is_bit_exact(
    data: bytes, max_packet: int, seed: int
) -> None:
    # Arrange: every packet at least once, some twice, in random order
    rng = random.Random(seed)
    packets = list(split_message(data, max_packet=max_packet).packets)
    wire = packets + rng.sample(packets, k=rng.randint(0, len(packets)))
    rng.shuffle(wire)
    r = Reassembler()

    # Act
    done = []
    for packet in wire:
        chunk = decode_chunk(decode_envelope(packet, max_payload=max_packet))
        result = r.add(chunk, source="dev", now=0.0)
        if result is not None:
            done.append(result)

    # Assert
    assert [m.data for m in done] == [data]
    stats = r.statistics()
    assert stats.completed == 1
    assert stats.chunks == len(packets)
    assert stats.duplicates + stats.late_duplicates == len(wire) - len(packets)
    assert (stats.partials, stats.bytes_buffered, stats.bytes_reserved) == (0, 0, 0)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=300_000),
    max_packet=st.integers(min_value=MIN_MAX_PACKET, max_value=2**20),
)
def test_every_packet_fits_the_limit(size: int, max_packet: int) -> None:
    # Act
    message = split_message(bytes(size), max_packet=max_packet)

    # Assert
    assert all(len(p) <= max_packet for p in message.packets)
    assert message.count == max(1, -(-size // message.chunk_size))
    assert message.total_size == size


def test_full_packets_come_close_to_the_limit() -> None:
    # Act
    message = split_message(bytes(10**6), max_packet=DEFAULT_MAX_PACKET)

    # Assert: all but the last packet are within a few bytes (digits of the index) of the limit
    assert message.count == 4
    assert message.chunk_size == chunk_data_size(10**6, max_packet=DEFAULT_MAX_PACKET)
    assert all(
        DEFAULT_MAX_PACKET - 16 <= len(p) <= DEFAULT_MAX_PACKET for p in message.packets[:-1]
    )


def test_overhead_is_small_at_the_default_limit() -> None:
    # Arrange
    data = random.Random(1).randbytes(3 * 2**20)

    # Act
    packets = split_message(data).packets

    # Assert: per-packet framing well under 3 % of 256 KiB
    overhead = sum(len(p) for p in packets) - len(data)
    assert overhead / len(data) < 0.001
    assert chunk_data_size(len(data)) >= 0.99 * DEFAULT_MAX_PACKET


def test_limit_below_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="max_packet"):
        split_message(b"abc", max_packet=MIN_MAX_PACKET - 1)


def test_empty_message_is_one_empty_chunk() -> None:
    # Act
    (chunk,) = chunks_of(b"")

    # Assert
    assert (chunk.header.count, chunk.header.total_size, len(chunk.data)) == (1, 0, 0)
    assert feed(Reassembler(), [chunk]) == [b""]


def test_message_id_defaults_to_digest_prefix() -> None:
    message = split_message(b"hello")
    assert message.sha256 == hashlib.sha256(b"hello").digest()
    assert message.message_id == message.sha256[:16]
    custom = split_message(b"hello", message_id=b"\x01" * 16)
    assert custom.message_id == b"\x01" * 16


def test_split_rejects_non_chunk_kinds_and_bad_ids() -> None:
    with pytest.raises(ValueError, match="chunk kind"):
        split_message(b"x", kind=EnvelopeKind.UPDATE)
    with pytest.raises(ValueError, match="16 bytes"):
        split_message(b"x", message_id=b"short")


# -- packetize / depacketize -------------------------------------------------------------------


def test_small_message_is_sent_as_is() -> None:
    # Arrange
    message = encode_envelope(EnvelopeKind.UPDATE, {"seq": 1}, b"body")

    # Act
    packets = packetize(message)
    env = depacketize(packets[0], reassembler=Reassembler(), source="d", now=0.0)

    # Assert
    assert packets == [message]
    assert env is not None
    assert bytes(env.payload) == b"body"


def test_large_message_travels_as_chunks() -> None:
    # Arrange
    body = random.Random(2).randbytes(10_000)
    message = encode_envelope(EnvelopeKind.UPDATE, {"seq": 1}, body)
    r = Reassembler()

    # Act
    packets = packetize(message, max_packet=2048)
    results = [depacketize(p, reassembler=r, source="d", now=0.0, max_packet=2048) for p in packets]

    # Assert
    assert len(packets) > 1
    assert all(len(p) <= 2048 for p in packets)
    assert results[:-1] == [None] * (len(packets) - 1)
    final = results[-1]
    assert final is not None
    assert final.kind is EnvelopeKind.UPDATE
    assert bytes(final.payload) == body


def test_depacketize_rejects_other_kinds() -> None:
    # Arrange
    state = encode_envelope(EnvelopeKind.DEVICE_STATE, {}, b"")
    wrapped = split_message(state, max_packet=MIN_MAX_PACKET).packets[0]

    # Act / Assert: neither a bare DEVICE_STATE nor chunks carrying one pass as an update
    for packet in (state, wrapped):
        with pytest.raises(ProtocolError) as exc_info:
            depacketize(packet, reassembler=Reassembler(), source="d", now=0.0)
        assert error_reason(exc_info) is RejectReason.BAD_KIND


def test_packetize_refuses_chunk_packets() -> None:
    packet = split_message(b"x").packets[0]
    with pytest.raises(ValueError, match="chunk"):
        packetize(packet)


# -- chunk validation --------------------------------------------------------------------------


def test_decode_chunk_requires_a_chunk_kind() -> None:
    env = decode_envelope(encode_envelope(EnvelopeKind.UPDATE, {}, b""), max_payload=0)
    with pytest.raises(ProtocolError) as exc_info:
        decode_chunk(env)
    assert error_reason(exc_info) is RejectReason.BAD_KIND


def _header(**overrides: object) -> dict[str, object]:
    good = ChunkHeader(b"\x00" * 16, 0, 2, 600, 900, b"\x11" * 32).to_header()
    return {**good, **overrides}


FULL = b"x" * 600


@pytest.mark.parametrize(
    ("overrides", "payload"),
    [
        ({}, FULL[:-1]),  # data shorter than chunk_size
        ({"index": 1}, FULL),  # last chunk must be 300 bytes
        ({"index": 2}, b""),  # index >= count
        ({"index": -1}, b""),
        ({"index": True}, FULL),
        ({"count": 3}, FULL),  # inconsistent with sizes
        ({"chunk_size": 0}, b""),
        ({"chunk_size": 10, "total_size": 15}, b"x" * 10),  # multi-chunk below MIN_CHUNK_SIZE
        ({"total_size": "900"}, FULL),
        ({"id": "00"}, FULL),
        ({"id": "G" * 32}, FULL),
        ({"sha256": "AB" * 32}, FULL),
        ({"sha256": None}, FULL),
    ],
)
def test_invalid_chunk_headers_are_bad_chunk(overrides: dict[str, object], payload: bytes) -> None:
    # Arrange
    packet = encode_envelope(EnvelopeKind.UPDATE_CHUNK, _header(**overrides), payload)
    env = decode_envelope(packet, max_payload=1000)

    # Act / Assert
    with pytest.raises(ProtocolError) as exc_info:
        decode_chunk(env)
    assert error_reason(exc_info) is RejectReason.BAD_CHUNK


def test_valid_hand_built_header_decodes() -> None:
    env = decode_envelope(
        encode_envelope(EnvelopeKind.UPDATE_CHUNK, _header(extra="ignored"), FULL),
        max_payload=1000,
    )
    assert decode_chunk(env).header.index == 0


# -- reassembler -------------------------------------------------------------------------------


def test_completed_message_is_returned_exactly_once() -> None:
    # Arrange
    chunks = chunks_of(bytes(5000))
    r = Reassembler()

    # Act
    first = feed(r, chunks)
    again = feed(r, chunks)

    # Assert
    assert first == [bytes(5000)]
    assert again == []
    assert r.statistics().late_duplicates == len(chunks)


def test_sources_are_independent() -> None:
    chunks = chunks_of(bytes(3000))
    r = Reassembler()
    assert feed(r, chunks, source="a") == [bytes(3000)]
    assert feed(r, chunks, source="b") == [bytes(3000)]


def test_conflicting_duplicate_raises_and_keeps_the_first_copy() -> None:
    # Arrange
    data = random.Random(3).randbytes(4000)
    chunks = chunks_of(data)
    forged = Chunk(chunks[0].kind, chunks[0].header, memoryview(bytes(len(chunks[0].data))))
    r = Reassembler()
    r.add(chunks[0], source="d", now=0.0)

    # Act
    with pytest.raises(ProtocolError) as exc_info:
        r.add(forged, source="d", now=0.0)

    # Assert
    assert error_reason(exc_info) is RejectReason.CHUNK_CONFLICT
    assert feed(r, chunks[1:]) == [data]
    assert r.statistics().conflicts == 1


def test_conflicting_geometry_for_the_same_id_raises() -> None:
    # Arrange: same message id, different total size
    mid = b"\x07" * 16
    a = split_message(bytes(3000), max_packet=MIN_MAX_PACKET, message_id=mid).packets
    b = split_message(bytes(3500), max_packet=MIN_MAX_PACKET, message_id=mid).packets
    r = Reassembler()
    r.add(decode_chunk(decode_envelope(a[0], max_payload=4096)), source="d", now=0.0)

    # Act / Assert
    with pytest.raises(ProtocolError) as exc_info:
        r.add(decode_chunk(decode_envelope(b[1], max_payload=4096)), source="d", now=0.0)
    assert error_reason(exc_info) is RejectReason.CHUNK_CONFLICT


def test_digest_mismatch_is_bad_checksum() -> None:
    # Arrange: two chunks whose header digest is not the digest of their data
    head = ChunkHeader(b"\x01" * 16, 0, 2, 512, 1024, hashlib.sha256(b"other").digest())
    chunks = [
        Chunk(EnvelopeKind.UPDATE_CHUNK, head, memoryview(bytes(512))),
        Chunk(
            EnvelopeKind.UPDATE_CHUNK,
            ChunkHeader(**{**vars(head), "index": 1}),
            memoryview(bytes(512)),
        ),
    ]
    r = Reassembler()
    r.add(chunks[0], source="d", now=0.0)

    # Act / Assert
    with pytest.raises(ProtocolError) as exc_info:
        r.add(chunks[1], source="d", now=0.0)
    assert error_reason(exc_info) is RejectReason.BAD_CHECKSUM
    assert r.statistics().digest_failures == 1
    assert r.statistics().partials == 0


def test_oversized_declaration_is_rejected_without_buffering() -> None:
    # Arrange: a 1 TiB message announced by a 1 KiB chunk
    head = ChunkHeader(b"\x02" * 16, 0, chunk_count(2**40, 1024), 1024, 2**40, b"\x00" * 32)
    r = Reassembler(ReassemblyConfig(max_message_size=2**20, max_buffered_bytes=2**21))

    # Act / Assert
    with pytest.raises(ProtocolError) as exc_info:
        r.add(Chunk(EnvelopeKind.UPDATE_CHUNK, head, memoryview(bytes(1024))), source="d", now=0.0)
    assert error_reason(exc_info) is RejectReason.TOO_LARGE
    assert r.statistics().bytes_reserved == 0


def test_partial_expires_after_ttl_and_duplicates_do_not_keep_it_alive() -> None:
    # Arrange
    chunks = chunks_of(bytes(3000))
    r = Reassembler(ReassemblyConfig(ttl=10.0))
    r.add(chunks[0], source="d", now=0.0)
    r.add(chunks[0], source="d", now=9.0)  # duplicate: no refresh

    # Act
    early = r.expire(9.9)
    dropped = r.expire(10.0)

    # Assert
    assert early == []
    assert len(dropped) == 1
    assert dropped[0].reason is RejectReason.REASSEMBLY_EXPIRED
    assert (dropped[0].received_chunks, dropped[0].count) == (1, len(chunks))
    stats = r.statistics()
    assert (stats.expired, stats.partials, stats.bytes_buffered) == (1, 0, 0)


def test_new_chunks_keep_a_partial_alive() -> None:
    chunks = chunks_of(bytes(5000))
    r = Reassembler(ReassemblyConfig(ttl=10.0))
    for i, chunk in enumerate(chunks[:-1]):
        r.add(chunk, source="d", now=8.0 * i)
        assert r.expire(8.0 * i + 5) == []
    assert r.add(chunks[-1], source="d", now=8.0 * len(chunks)) is not None


def _messages(n: int, size: int = 3000) -> list[list[Chunk]]:
    return [chunks_of(i.to_bytes(4, "big") * (size // 4)) for i in range(n)]


def test_max_partials_evicts_least_recently_active() -> None:
    # Arrange
    msgs = _messages(3)
    r = Reassembler(ReassemblyConfig(max_partials=2, max_partials_per_source=10))
    r.add(msgs[0][0], source="a", now=0.0)
    r.add(msgs[1][0], source="b", now=1.0)
    r.add(msgs[0][1], source="a", now=2.0)  # message 0 is now the most recently active

    # Act
    r.add(msgs[2][0], source="c", now=3.0)

    # Assert
    dropped = r.expire(3.0)
    assert [(d.source, d.reason) for d in dropped] == [("b", RejectReason.REASSEMBLY_FULL)]
    assert r.statistics().evicted == 1
    assert r.statistics().partials == 2


def test_refuse_new_policy_raises_reassembly_full() -> None:
    # Arrange
    msgs = _messages(2)
    r = Reassembler(ReassemblyConfig(max_partials=1, overflow=OverflowPolicy.REFUSE_NEW))
    r.add(msgs[0][0], source="a", now=0.0)

    # Act / Assert
    with pytest.raises(ProtocolError) as exc_info:
        r.add(msgs[1][0], source="b", now=1.0)
    assert error_reason(exc_info) is RejectReason.REASSEMBLY_FULL
    assert r.statistics().refused == 1
    assert feed(r, msgs[0][1:], source="a") == [bytes(3000)]  # the held message is unharmed


def test_refuse_new_still_expires_idle_partials_first() -> None:
    msgs = _messages(2)
    r = Reassembler(ReassemblyConfig(max_partials=1, overflow=OverflowPolicy.REFUSE_NEW, ttl=5.0))
    r.add(msgs[0][0], source="a", now=0.0)
    assert r.add(msgs[1][0], source="b", now=6.0) is None
    assert [d.reason for d in r.expire(6.0)] == [RejectReason.REASSEMBLY_EXPIRED]


def test_buffered_bytes_bound_reserves_declared_sizes() -> None:
    # Arrange: room for two 3000-byte messages, not three
    msgs = _messages(3)
    r = Reassembler(ReassemblyConfig(max_message_size=6000, max_buffered_bytes=6000))
    r.add(msgs[0][0], source="a", now=0.0)
    r.add(msgs[1][0], source="b", now=1.0)
    assert r.statistics().bytes_reserved == 6000

    # Act
    r.add(msgs[2][0], source="c", now=2.0)

    # Assert
    assert [d.source for d in r.expire(2.0)] == ["a"]
    stats = r.statistics()
    assert stats.bytes_reserved == 6000
    assert stats.bytes_buffered == sum(len(m[0].data) for m in msgs[1:])


def test_per_source_bound_evicts_only_that_source() -> None:
    msgs = _messages(3)
    r = Reassembler(ReassemblyConfig(max_partials_per_source=1))
    r.add(msgs[0][0], source="a", now=0.0)
    r.add(msgs[1][0], source="b", now=1.0)
    r.add(msgs[2][0], source="b", now=2.0)
    assert [d.source for d in r.expire(2.0)] == ["b"]
    assert r.statistics().partials == 2


def test_remembered_completions_are_bounded() -> None:
    # Arrange
    msgs = _messages(3)
    r = Reassembler(ReassemblyConfig(remember_completed=1))
    for m in msgs[:2]:
        feed(r, m)

    # Act: the oldest completion was forgotten, so its chunks start a new partial
    late = r.add(msgs[0][0], source="d", now=0.0)
    late_recent = r.add(msgs[1][0], source="d", now=0.0)

    # Assert
    assert late is None
    assert late_recent is None
    stats = r.statistics()
    assert (stats.partials, stats.late_duplicates) == (1, 1)


def test_statistics_start_at_zero() -> None:
    stats = Reassembler().statistics()
    assert all(v == 0 for v in vars(stats).values())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_message_size": 10, "max_buffered_bytes": 5},
        {"max_partials": 0},
        {"ttl": 0.0},
        {"remember_completed": -1},
    ],
)
def test_invalid_config(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        ReassemblyConfig(**kwargs)  # type: ignore[arg-type]


def test_smallest_packets_still_carry_min_chunk_size() -> None:
    assert chunk_data_size(2**63 - 1, max_packet=MIN_MAX_PACKET) >= MIN_CHUNK_SIZE


def test_hand_built_chunk_with_wrong_data_length_is_bad_chunk() -> None:
    head = ChunkHeader(b"\x03" * 16, 0, 2, 512, 1000, b"\x00" * 32)
    with pytest.raises(ProtocolError) as exc_info:
        Reassembler().add(
            Chunk(EnvelopeKind.UPDATE_CHUNK, head, memoryview(bytes(100))), source="d", now=0.0
        )
    assert error_reason(exc_info) is RejectReason.BAD_CHUNK
