"""Fuzz: chunk decoding and bounded reassembly under hostile packet sequences.

Random interleavings of genuine chunks (duplicated, reordered, from several sources) with forged
ones (edited headers, edited data, random bytes) go through ``depacketize`` into one small
``Reassembler``. After every packet: only ``EdgeflError``s were raised, the reassembler's memory
stayed within its bounds, and anything it completed is exactly one of the genuine messages.
Long run: ``HYPOTHESIS_PROFILE=fuzz-long`` (docs/SECURITY.md, "Fuzzing").
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any

from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from edgefl.errors import EdgeflError, RejectReason
from edgefl.protocol.chunking import (
    ChunkHeader,
    OverflowPolicy,
    Reassembler,
    ReassemblyConfig,
    decode_chunk,
    depacketize,
    split_message,
)
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope, encode_envelope

FUZZ = fuzz_settings(120)
MAX_PACKET = 1024


def _messages() -> list[bytes]:
    """Genuine UPDATE envelopes of 1 to 5 chunks at max_packet=1024."""
    return [
        encode_envelope(EnvelopeKind.UPDATE, {"n": i}, bytes([i]) * size)
        for i, size in enumerate((10, 700, 1500, 2500, 3900))
    ]


GENUINE = _messages()
PACKETS = [
    list(split_message(m, kind=EnvelopeKind.UPDATE_CHUNK, max_packet=MAX_PACKET).packets)
    for m in GENUINE
]


def _reframe(kind: int, header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header).encode()
    body = struct.pack(">4sBBHII", b"EDFL", 1, kind, 0, len(text), len(data)) + text + data
    return body + struct.pack(">I", zlib.crc32(body))


@st.composite
def packet(draw: st.DrawFn) -> tuple[str, bytes]:
    source = draw(st.sampled_from(["dev-1", "dev-2", "dev-3"]))
    m = draw(st.integers(0, len(PACKETS) - 1))
    genuine = draw(st.sampled_from(PACKETS[m]))
    choice = draw(st.integers(0, 9))
    if choice < 6:
        return source, genuine
    env = decode_envelope(genuine, max_payload=MAX_PACKET)
    header = dict(env.header)
    data = bytes(env.payload)
    if choice == 6:  # edit a header field
        key = draw(st.sampled_from(["id", "index", "count", "chunk_size", "total_size", "sha256"]))
        header[key] = draw(
            st.one_of(
                st.integers(-5, 2**64),
                st.sampled_from([0, 1, 512, 4096, 2**31, 2**63 - 1, 64 * 1024 * 1024 + 1]),
                st.text(max_size=70),
                st.sampled_from(["0" * 32, "f" * 64, hashlib.sha256(b"x").hexdigest()]),
                st.none(),
            )
        )
    elif choice == 7:  # edit the data
        data = draw(st.binary(max_size=len(data) + 2))
    elif choice == 8:  # random kind / random header object
        header = draw(st.dictionaries(st.text(max_size=10), st.integers(), max_size=6))
        return source, _reframe(draw(st.integers(0, 9)), header, data)
    else:  # raw garbage
        return source, draw(st.binary(max_size=200))
    return source, _reframe(EnvelopeKind.UPDATE_CHUNK, header, data)


@FUZZ
@given(
    packets=st.lists(packet(), max_size=60),
    clock=st.lists(st.floats(0, 3), min_size=60, max_size=60),
    refuse=st.booleans(),
)
def test_reassembly_stays_bounded_and_never_invents_messages(
    packets: list[tuple[str, bytes]], clock: list[float], refuse: bool
) -> None:
    config = ReassemblyConfig(
        max_message_size=4096,
        max_buffered_bytes=6000,
        max_partials=3,
        max_partials_per_source=2,
        ttl=5.0,
        remember_completed=8,
        overflow=OverflowPolicy.REFUSE_NEW if refuse else OverflowPolicy.EVICT_OLDEST,
    )
    reasm = Reassembler(config)
    now = 0.0
    for (source, data), tick in zip(packets, clock, strict=False):
        now += tick
        try:
            env = depacketize(
                data, reassembler=reasm, source=source, now=now, max_packet=MAX_PACKET
            )
        except EdgeflError as exc:  # typed rejection: fine; any other exception fails the test
            env, reason = None, exc.reason
            event(f"rejected: {reason.value}")
        if env is not None:
            assert env.raw is not None
            if bytes(env.raw) == data:  # an unchunked UPDATE packet passes through as it is
                event("single-packet update")
            else:  # reassembled: must be exactly one of the genuine messages
                assert bytes(env.raw) in GENUINE
                event("completed a message")
        for dropped in reasm.expire(now):
            assert dropped.reason in (RejectReason.REASSEMBLY_EXPIRED, RejectReason.REASSEMBLY_FULL)
        stats = reasm.statistics()
        assert stats.bytes_buffered <= stats.bytes_reserved <= config.max_buffered_bytes
        assert stats.partials <= config.max_partials


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["id", "index", "count", "chunk_size", "total_size", "sha256", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=70)),
    )
)
def test_chunk_header_from_arbitrary_objects(header: dict[str, Any]) -> None:
    reason = None
    try:
        ChunkHeader.from_header(header)
    except EdgeflError as exc:
        reason = exc.reason
    assert reason in (None, RejectReason.BAD_CHUNK)


@FUZZ
@given(
    id_=st.text(max_size=40),
    index=st.integers(-1, 2**64),
    count=st.integers(-1, 2**64),
    chunk_size=st.integers(-1, 2**64),
    total_size=st.integers(-1, 2**64),
    data=st.binary(max_size=600),
)
def test_chunk_geometry(
    id_: str, index: int, count: int, chunk_size: int, total_size: int, data: bytes
) -> None:
    header = {
        "id": id_ if len(id_) % 2 else "ab" * 16,
        "index": index,
        "count": count,
        "chunk_size": chunk_size,
        "total_size": total_size,
        "sha256": "cd" * 32,
    }
    reason = None
    try:
        env = decode_envelope(_reframe(EnvelopeKind.MODEL_CHUNK, header, data), max_payload=2048)
        chunk = decode_chunk(env)
    except EdgeflError as exc:
        reason = exc.reason
    if reason is not None:
        assert reason in (RejectReason.BAD_CHUNK, RejectReason.BAD_HEADER)
        return
    assert len(chunk.data) == chunk.header.data_length
    assert 0 <= chunk.header.index < chunk.header.count
