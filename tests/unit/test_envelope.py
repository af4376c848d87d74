"""Envelope: byte layout, round trips, and a typed error for every kind of malformed input."""

from __future__ import annotations

import contextlib
import struct
import zlib
from typing import Any

import fuzzing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.envelope import (
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_LEN,
    OVERHEAD,
    PREFIX_LEN,
    EnvelopeKind,
    decode_envelope,
    encode_envelope,
    peek_kind,
)

LIMIT = 1 << 20

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = fuzzing.json_values(json_scalars, max_leaves=12)
headers = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


def raw_envelope(
    header: bytes = b"{}",
    payload: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = FORMAT_VERSION,
    kind: int = EnvelopeKind.UPDATE,
    flags: int = 0,
    header_len: int | None = None,
    payload_len: int | None = None,
    crc: int | None = None,
) -> bytes:
    """Hand-built envelope with any field overridden (checksum recomputed unless given)."""
    head_len = len(header) if header_len is None else header_len
    body_len = len(payload) if payload_len is None else payload_len
    prefix = struct.pack(">4sBBHII", magic, version, kind, flags, head_len, body_len)
    body = prefix + header + payload
    return body + struct.pack(">I", zlib.crc32(body) if crc is None else crc)


def reason(data: bytes | bytearray | memoryview, max_payload: int = LIMIT) -> RejectReason:
    with pytest.raises(ProtocolError) as exc_info:
        decode_envelope(data, max_payload=max_payload)
    return exc_info.value.reason


@given(st.sampled_from(EnvelopeKind), headers, st.binary(max_size=2048))
def test_round_trip(kind: EnvelopeKind, header: dict[str, Any], payload: bytes) -> None:
    # Act
    data = encode_envelope(kind, header, payload)
    env = decode_envelope(data, max_payload=len(payload))

    # Assert
    assert env.kind is kind
    assert env.header == header
    assert bytes(env.payload) == payload
    assert env.flags == 0


def test_byte_layout_is_as_documented() -> None:
    # Arrange
    header, payload = {"b": 1, "a": "é"}, b"\x00\x01\x02"

    # Act
    data = encode_envelope(EnvelopeKind.METRICS, header, payload)

    # Assert
    head = '{"a":"é","b":1}'.encode()
    assert data[:4] == b"EDFL"
    assert data[4] == 1
    assert data[5] == int(EnvelopeKind.METRICS) == 7
    assert data[6:8] == b"\x00\x00"
    assert struct.unpack(">II", data[8:16]) == (len(head), len(payload))
    assert data[16 : 16 + len(head)] == head
    assert data[16 + len(head) : -4] == payload
    assert struct.unpack(">I", data[-4:])[0] == zlib.crc32(data[:-4])
    assert len(data) == OVERHEAD + len(head) + len(payload)
    assert PREFIX_LEN == 16
    assert OVERHEAD == 20


def test_encoding_is_deterministic_regardless_of_key_order() -> None:
    assert encode_envelope(EnvelopeKind.UPDATE, {"a": 1, "b": 2}, b"x") == encode_envelope(
        EnvelopeKind.UPDATE, {"b": 2, "a": 1}, b"x"
    )


def test_payload_is_a_zero_copy_readonly_view() -> None:
    # Arrange
    data = encode_envelope(EnvelopeKind.UPDATE, {}, b"p" * 1000)

    # Act
    env = decode_envelope(data, max_payload=1000)

    # Assert
    assert env.payload.obj is data
    assert env.payload.readonly


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(wrap: Any) -> None:
    data = encode_envelope(EnvelopeKind.UPDATE, {"k": 1}, b"abc")
    env = decode_envelope(wrap(data), max_payload=3)
    assert bytes(env.payload) == b"abc"


def test_truncated_at_every_prefix_length() -> None:
    # Arrange
    data = encode_envelope(EnvelopeKind.UPDATE, {"device": "d1", "seq": 3}, bytes(range(64)))

    for cut in range(len(data)):
        # Act / Assert
        assert reason(data[:cut]) is RejectReason.TRUNCATED, cut


def test_wrong_magic() -> None:
    assert reason(raw_envelope(magic=b"EDFX")) is RejectReason.BAD_MAGIC


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version: int) -> None:
    assert reason(raw_envelope(version=version)) is RejectReason.BAD_VERSION


@pytest.mark.parametrize("kind", [0, 14, 99, 255])
def test_unknown_kind(kind: int) -> None:
    assert reason(raw_envelope(kind=kind)) is RejectReason.BAD_KIND


def test_checks_run_in_documented_order() -> None:
    assert reason(raw_envelope(magic=b"XXXX", version=9, kind=0)) is RejectReason.BAD_MAGIC
    assert reason(raw_envelope(version=9, kind=0)) is RejectReason.BAD_VERSION
    assert reason(raw_envelope(kind=0, payload_len=2**32 - 1)) is RejectReason.BAD_KIND
    assert reason(raw_envelope(payload_len=2**32 - 1, crc=0)) is RejectReason.TOO_LARGE
    assert reason(raw_envelope(b"[1]", crc=0)) is RejectReason.BAD_CHECKSUM


def test_unknown_flags_are_rejected() -> None:
    assert reason(raw_envelope(flags=1)) is RejectReason.BAD_HEADER


def test_huge_declared_sizes_are_rejected_before_reading() -> None:
    # Declared lengths far beyond the data and the limits: rejected from the 16-byte prefix alone.
    assert reason(raw_envelope(payload_len=2**32 - 1)[:16]) is RejectReason.TOO_LARGE
    assert reason(raw_envelope(header_len=2**32 - 1)[:16]) is RejectReason.TOO_LARGE
    assert reason(raw_envelope(header_len=MAX_HEADER_LEN + 1)) is RejectReason.TOO_LARGE
    assert reason(raw_envelope(payload=b"x" * 11), max_payload=10) is RejectReason.TOO_LARGE


def test_declared_length_beyond_data_is_truncated() -> None:
    assert reason(raw_envelope(payload=b"abc", payload_len=4)) is RejectReason.TRUNCATED


def test_trailing_bytes_are_rejected() -> None:
    assert reason(raw_envelope() + b"\x00") is RejectReason.BAD_HEADER


def test_every_single_bit_flip_is_detected() -> None:
    # Arrange
    data = encode_envelope(EnvelopeKind.UPDATE, {"a": 1}, b"payload")

    for i in range(len(data)):
        corrupted = bytearray(data)
        corrupted[i] ^= 0x10

        # Act / Assert: any field may be hit first, but the result is always a typed error
        assert isinstance(reason(corrupted), RejectReason)
    for i in range(PREFIX_LEN, len(data)):  # header, payload and crc bytes: checksum catches it
        corrupted = bytearray(data)
        corrupted[i] ^= 0x01
        assert reason(corrupted) is RejectReason.BAD_CHECKSUM


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"null",
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 1e999}',
        b'{"a": 1, "a": 2}',
        b'{"a": "\xff"}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_header_must_be_a_strict_json_object(header: bytes) -> None:
    assert reason(raw_envelope(header)) is RejectReason.BAD_HEADER


@pytest.mark.parametrize(
    "header", [{"a": float("nan")}, {"a": object()}, {"a": "x" * MAX_HEADER_LEN}, {"a": "\ud800"}]
)
def test_unencodable_headers(header: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as exc_info:
        encode_envelope(EnvelopeKind.UPDATE, header, b"")
    assert exc_info.value.reason is RejectReason.BAD_HEADER


@given(st.binary(max_size=256))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    # Anything but a ProtocolError (IndexError, struct.error, MemoryError, ...) fails the test.
    with contextlib.suppress(ProtocolError):
        decode_envelope(data, max_payload=LIMIT)


@given(st.binary(min_size=4, max_size=64))
def test_random_bytes_after_a_valid_prefix(tail: bytes) -> None:
    data = struct.pack(">4sBBH", MAGIC, 1, 1, 0) + tail
    # Anything but a ProtocolError (IndexError, struct.error, MemoryError, ...) fails the test.
    with contextlib.suppress(ProtocolError):
        decode_envelope(data, max_payload=LIMIT)


def test_peek_kind() -> None:
    data = encode_envelope(EnvelopeKind.DEVICE_STATE, {}, b"")
    assert peek_kind(data) is EnvelopeKind.DEVICE_STATE
    with pytest.raises(ProtocolError) as exc_info:
        peek_kind(data[:10])
    assert exc_info.value.reason is RejectReason.TRUNCATED
