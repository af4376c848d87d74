"""The protocol's fast paths: CRC-32 as zlib computes it, reassembly from reused buffers."""

from __future__ import annotations

import zlib

from hypothesis import given
from hypothesis import strategies as st

from edgefl.protocol import Reassembler, ReassemblyConfig, decode_chunk, decode_envelope
from edgefl.protocol.chunking import split_message
from edgefl.protocol.envelope import EnvelopeKind, crc32


@given(st.binary(max_size=4096), st.integers(min_value=0, max_value=2**32 - 1))
def test_crc32_is_zlibs(data: bytes, start: int) -> None:
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, start) == zlib.crc32(data, start)


def test_reassembly_copies_chunks_of_mutable_buffers() -> None:
    # Arrange: a message in 3 chunks whose packets live in reused (mutable) buffers
    message = bytes(range(256)) * 40
    packets = split_message(message, kind=EnvelopeKind.UPDATE_CHUNK, max_packet=4096).packets
    assert len(packets) >= 3
    reassembler = Reassembler(ReassemblyConfig(max_message_size=1 << 20))
    done = None

    # Act: each packet is decoded from a bytearray that is overwritten right after
    for packet_bytes in packets:
        buffer = bytearray(packet_bytes)
        chunk = decode_chunk(decode_envelope(buffer, max_payload=1 << 20))
        done = reassembler.add(chunk, source="d", now=0.0) or done
        buffer[:] = bytes(len(buffer))

    # Assert
    assert done is not None
    assert done.data == message
