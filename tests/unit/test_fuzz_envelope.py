"""Fuzz: envelope, message headers, signatures and topic names never fail untyped.

Every input either decodes or raises an ``EdgeflError`` carrying a ``RejectReason``; any other
exception fails the test. The default run is bounded for CI (a few seconds per property); a
long run: ``HYPOTHESIS_PROFILE=fuzz-long .venv/bin/pytest tests/unit/test_fuzz_*.py``
(docs/SECURITY.md, "Fuzzing").
"""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from functools import partial
from typing import Any

import fuzzing
import samples
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from edgefl.errors import EdgeflError, ProtocolError, RejectReason
from edgefl.protocol import messages
from edgefl.protocol.envelope import (
    FLAG_SIGNED,
    FORMAT_VERSION,
    MAGIC,
    EnvelopeKind,
    decode_envelope,
    encode_envelope,
)
from edgefl.protocol.topics import parse_topic
from edgefl.security import Ed25519ManifestVerifier, Ed25519Signer, generate_private_key

FUZZ = fuzz_settings(250)

SIGNER = Ed25519Signer(generate_private_key())
VERIFIER = Ed25519ManifestVerifier([SIGNER.public_key])
MESSAGE_TYPES = (
    messages.UpdateHeader,
    messages.ModelManifest,
    messages.DeviceState,
    messages.ServerState,
    messages.ServerMetrics,
)


def typed(call: Callable[[], Any]) -> Any:
    """Run ``call``; an EdgeflError must carry a RejectReason, anything else propagates."""
    try:
        return call()
    except EdgeflError as exc:
        error = exc
    if not isinstance(error.reason, RejectReason):
        raise AssertionError(f"untyped reason {error.reason!r}")
    return error


def _valid_messages() -> list[bytes]:
    layout = (messages.TensorSpec("w", (2, 2)), messages.TensorSpec("b", (4,)))
    update = samples.update_header(
        device_id="dev-1",
        seq=7,
        base_version=3,
        num_examples=40,
        model="mnist1d-cnn",
        codec={"format": 1, "quantization": "int8"},
        num_params=8,
        layout=layout,
        metrics={"loss": 0.25},
    )
    manifest = samples.fp32_manifest(
        8,
        version=4,
        model="mnist1d-cnn",
        layout=layout,
        hints=messages.TrainingHints(local_epochs=1, batch_size=32, lr=0.1),
    )
    state = messages.DeviceState(
        fleet="lab",
        device_id="dev-1",
        status=messages.DeviceStatus.TRAINING,
        session=2,
        at=1.7e9,
        model_version=4,
        reasons=("on_battery",),
    )
    server = samples.server_state(
        version=4, buffer_fill=1, applied=9, started_at=1.7e9, at=1.7e9, rejected={"stale": 2}
    )
    metrics = messages.ServerMetrics(
        fleet="lab",
        at=1.7e9,
        version=4,
        buffer_fill=1,
        buffer_size=5,
        staleness={0: 3, 2: 1},
        rejected={"bad_codec": 1},
        accuracy=0.5,
    )
    plain = [
        messages.encode_message(update, bytes(range(64))),
        messages.encode_message(manifest),
        messages.encode_message(state),
        messages.encode_message(server),
        messages.encode_message(metrics),
    ]
    return plain + [SIGNER.sign(p) for p in plain]


VALID = _valid_messages()


def _fix_crc(data: bytearray) -> bytes:
    if len(data) >= 20:
        struct.pack_into(">I", data, len(data) - 4, zlib.crc32(data[:-4]))
    return bytes(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with 1-4 random edits, CRC usually recomputed so edits reach the JSON."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "length"]))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
        elif op == "length" and len(data) >= 16:
            offset = draw(st.sampled_from([6, 8, 12]))
            if offset == 6:
                struct.pack_into(">H", data, 6, draw(st.integers(0, 0xFFFF)))
            else:
                value = draw(st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 300)))
                struct.pack_into(">I", data, offset, value)
    if draw(st.booleans()):
        return _fix_crc(data)
    return bytes(data)


def _decode_all(data: bytes) -> None:
    typed(lambda: decode_envelope(data, max_payload=1 << 16))
    typed(lambda: messages.decode_update(data, max_payload=1 << 16))
    for cls in MESSAGE_TYPES:
        typed(lambda cls=cls: messages.decode_message(data, cls))  # type: ignore[misc]


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    _decode_all(data)


@FUZZ
@given(
    kind=st.integers(0, 255),
    flags=st.sampled_from([0, FLAG_SIGNED, 2, 0xFFFF]),
    header=st.one_of(
        st.binary(max_size=300),  # anything, incl. invalid UTF-8
        st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    ),
    payload=st.binary(max_size=300),
    trailer=st.binary(max_size=80),
)
def test_well_framed_garbage(
    kind: int, flags: int, header: bytes, payload: bytes, trailer: bytes
) -> None:
    prefix = struct.pack(">4sBBHII", MAGIC, FORMAT_VERSION, kind, flags, len(header), len(payload))
    body = prefix + header + payload + trailer
    _decode_all(body + struct.pack(">I", zlib.crc32(body)))


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, 2**64, 2**64 + 1, -(2**64) - 1, 10**309, -(10**400)]),  # valid JSON
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = fuzzing.json_values(json_scalars, max_leaves=16)
FIELD_NAMES = sorted(
    {f for cls in MESSAGE_TYPES for f in cls.__dataclass_fields__}
    | {"shape", "dtype", "name", "local_epochs", "lr", "onnx"}
)


@FUZZ
@given(
    base=st.sampled_from(VALID[:5]),
    edits=st.dictionaries(st.sampled_from(FIELD_NAMES), json_values, min_size=1, max_size=4),
)
def test_valid_headers_with_hostile_field_values(base: bytes, edits: dict[str, Any]) -> None:
    env = decode_envelope(base, max_payload=1 << 16)
    header = dict(env.header) | edits
    text = json.dumps(header).encode()
    prefix = struct.pack(
        ">4sBBHII", MAGIC, FORMAT_VERSION, env.kind, 0, len(text), len(env.payload)
    )
    body = prefix + text + bytes(env.payload)
    data = body + struct.pack(">I", zlib.crc32(body))
    _decode_all(data)


@FUZZ
@given(mutated())
def test_mutated_valid_messages(data: bytes) -> None:
    _decode_all(data)


@FUZZ
@given(mutated())
def test_no_mutation_of_a_signed_manifest_verifies(data: bytes) -> None:
    signed_manifest = VALID[6]
    result = typed(lambda: VERIFIER.verify(data))
    if data == signed_manifest:
        assert result is None
    elif result is None:
        # Only a re-framing that leaves every signed byte intact may pass.
        env = decode_envelope(data, max_payload=0)
        assert env.signature is not None
        assert bytes(env.signature.signed) == bytes(
            decode_envelope(signed_manifest, max_payload=0).signature.signed  # type: ignore[union-attr]
        )
    else:
        assert result.reason is RejectReason.BAD_SIGNATURE


def test_huge_json_integers_are_bad_header_not_overflow() -> None:
    # Found by test_valid_headers_with_hostile_field_values: float(10**400) raised OverflowError.
    text = json.dumps({"fleet": "lab", "at": 10**400, "version": 1, "buffer_fill": 0}).encode()
    body = struct.pack(">4sBBHII", MAGIC, 1, EnvelopeKind.METRICS, 0, len(text), 0) + text
    data = body + struct.pack(">I", zlib.crc32(body))
    result = typed(lambda: messages.decode_message(data, messages.ServerMetrics))
    assert isinstance(result, ProtocolError)
    assert result.reason is RejectReason.BAD_HEADER
    ok = encode_envelope(EnvelopeKind.METRICS, {"n": 2**64, "m": -(2**64)})
    assert decode_envelope(ok, max_payload=0).header == {"n": 2**64, "m": -(2**64)}


def test_huge_declared_lengths_allocate_nothing() -> None:
    tracemalloc.start()
    try:
        for head_len, body_len in [(2**32 - 1, 0), (10, 2**32 - 1), (65536, 2**31)]:
            for flags in (0, FLAG_SIGNED):
                data = struct.pack(">4sBBHII", MAGIC, 1, 1, flags, head_len, body_len) + b"{}"
                result = typed(partial(decode_envelope, data, max_payload=2**32 - 1))
                assert isinstance(result, ProtocolError)
                assert result.reason in (RejectReason.TOO_LARGE, RejectReason.TRUNCATED)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300),
        st.lists(
            st.sampled_from(
                [
                    "edgefl",
                    "v1",
                    "v2",
                    "lab",
                    "model",
                    "manifest",
                    "device",
                    "dev-1",
                    "update",
                    "state",
                    "server",
                    "metrics",
                    "onnx",
                    "0",
                    "01",
                    "7",
                    "-1",
                    "+",
                    "#",
                    "",
                    "$share",
                    "\x00",
                    "é",
                    "9" * 25,
                    "a" * 65,
                ]
            ),
            max_size=8,
        ).map("/".join),
        st.lists(st.binary(max_size=6), max_size=7).map(lambda p: b"edgefl/v1/" + b"/".join(p)),
    )
)
def test_topics(topic: str | bytes) -> None:
    result = typed(lambda: parse_topic(topic))
    if not isinstance(result, EdgeflError):
        text = topic.decode() if isinstance(topic, bytes) else topic
        assert result.topic == text
    typed(lambda: parse_topic(topic, expected_fleet="lab"))
