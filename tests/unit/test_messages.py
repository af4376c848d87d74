"""Typed message headers: round trips, validation, envelopes and topic consistency."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol import messages
from edgefl.protocol.chunking import (
    Reassembler,
    chunk_count,
    decode_chunk,
    depacketize,
    packetize,
    split_message,
)
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope, encode_envelope
from edgefl.protocol.topics import (
    NAME_PATTERN,
    ModelArtifact,
    ModelChunkTopic,
    TopicKind,
    parse_topic,
    update_topic,
)

# -- strategies --------------------------------------------------------------------------------

names = st.from_regex(NAME_PATTERN, fullmatch=True)
counts = st.integers(min_value=0, max_value=2**63 - 1)
times = st.floats(min_value=0, max_value=4e9, allow_nan=False)
fractions = st.floats(min_value=0, max_value=1)
short_text = st.text(
    st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=20
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), short_text)
json_obj = st.dictionaries(short_text, json_leaf, max_size=4)
tensors = st.builds(
    messages.TensorSpec,
    short_text,
    st.lists(st.integers(0, 50), max_size=3).map(tuple),
    st.sampled_from(sorted(messages.TENSOR_DTYPES)),
)
layouts = st.lists(tensors, max_size=4).map(tuple)


@st.composite
def update_headers(draw: st.DrawFn) -> messages.UpdateHeader:
    layout = draw(layouts)
    return messages.UpdateHeader(
        fleet=draw(names),
        device_id=draw(names),
        seq=draw(counts),
        base_version=draw(counts),
        num_examples=draw(counts),
        model=draw(names),
        codec=draw(json_obj),
        num_params=messages.layout_num_params(layout) if layout else draw(counts),
        created_at=draw(times),
        layout=layout,
        metrics=draw(st.dictionaries(short_text, st.floats(allow_nan=False, allow_infinity=False))),
    )


sha_hex = st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def artifacts(draw: st.DrawFn, size: int | None = None) -> messages.ArtifactInfo:
    size = draw(st.integers(0, 10**9)) if size is None else size
    chunk = draw(st.integers(1, 2**20))
    return messages.ArtifactInfo(draw(sha_hex), size, chunk, chunk_count(size, chunk))


@st.composite
def manifests(draw: st.DrawFn) -> messages.ModelManifest:
    layout = draw(layouts)
    num_params = messages.layout_num_params(layout) if layout else draw(st.integers(0, 10**8))
    fmt = draw(st.sampled_from(messages.ModelFormat))
    main = draw(artifacts(4 * num_params if fmt is messages.ModelFormat.FP32_FLAT else None))
    hints = draw(
        st.none()
        | st.builds(
            messages.TrainingHints,
            st.none() | st.integers(1, 100),
            st.none() | st.integers(1, 4096),
            st.none() | st.floats(min_value=1e-9, max_value=10),
            st.none() | json_obj,
        )
    )
    return messages.ModelManifest(
        fleet=draw(names),
        version=draw(counts),
        model=draw(names),
        format=fmt,
        **dataclasses.asdict(main),  # the main artifact: sha256, size, chunk_size, num_chunks
        num_params=num_params,
        created_at=draw(times),
        layout=layout,
        hints=hints,
        onnx=draw(st.none() | artifacts()),
    )


device_states = st.builds(
    messages.DeviceState,
    fleet=names,
    device_id=names,
    status=st.sampled_from(messages.DeviceStatus),
    session=counts,
    at=times,
    model_version=st.none() | counts,
    reasons=st.lists(short_text, max_size=4).map(tuple),
    updates_sent=counts,
    local_accuracy=st.none() | fractions,
    profile=st.none() | names,
)


@st.composite
def server_states(draw: st.DrawFn) -> messages.ServerState:
    size = draw(st.integers(1, 1000))
    return messages.ServerState(
        fleet=draw(names),
        status=draw(st.sampled_from(messages.ServerStatus)),
        session=draw(counts),
        version=draw(counts),
        buffer_fill=draw(st.integers(0, size)),
        buffer_size=size,
        applied=draw(counts),
        started_at=draw(times),
        at=draw(times),
        rejected=draw(st.dictionaries(st.sampled_from(RejectReason).map(str), counts)),
    )


@st.composite
def server_metrics(draw: st.DrawFn) -> messages.ServerMetrics:
    size = draw(st.integers(1, 1000))
    rates = st.floats(min_value=0, max_value=1e12)
    return messages.ServerMetrics(
        fleet=draw(names),
        at=draw(times),
        version=draw(counts),
        buffer_fill=draw(st.integers(0, size)),
        buffer_size=size,
        received=draw(counts),
        applied=draw(counts),
        updates_per_s=draw(rates),
        bytes_ingested=draw(counts),
        bytes_per_s=draw(rates),
        staleness=draw(st.dictionaries(st.integers(0, 10_000), counts, max_size=8)),
        rejected=draw(st.dictionaries(short_text, counts, max_size=4)),
        accuracy=draw(st.none() | fractions),
        extra=draw(json_obj),
    )


any_message = st.one_of(
    update_headers(), manifests(), device_states, server_states(), server_metrics()
)


def make_update(**overrides: Any) -> messages.UpdateHeader:
    fields: dict[str, Any] = {
        "fleet": "f",
        "device_id": "d1",
        "seq": 3,
        "base_version": 7,
        "num_examples": 32,
        "model": "mnist1d-cnn",
        "codec": {"quantization": "int8", "block_size": 4096},
        "num_params": 90,
        "created_at": 1.7e9,
        "layout": (messages.TensorSpec("w", (8, 10)), messages.TensorSpec("b", (10,))),
        "metrics": {"loss": 0.25},
    }
    return messages.UpdateHeader(**{**fields, **overrides})


def bad_header_reason(fn: Any) -> RejectReason:
    with pytest.raises(ProtocolError) as exc_info:
        fn()
    return exc_info.value.reason


# -- round trips -------------------------------------------------------------------------------


@given(any_message)
def test_header_round_trip(msg: Any) -> None:
    assert type(msg).from_header(msg.to_header()) == msg


@given(any_message)
def test_envelope_round_trip(msg: Any) -> None:
    # Act
    data = messages.encode_message(msg)
    decoded = messages.decode_message(data, type(msg))

    # Assert
    assert decoded == msg
    assert decode_envelope(data, max_payload=0).kind is type(msg).KIND


@given(update_headers(), st.binary(max_size=512))
def test_update_round_trip_with_body(header: messages.UpdateHeader, body: bytes) -> None:
    # Act
    decoded, payload = messages.decode_update(messages.encode_message(header, body))

    # Assert
    assert decoded == header
    assert bytes(payload) == body


def test_state_payloads_are_header_only_json() -> None:
    # Arrange
    state = messages.DeviceState(
        "f", "d1", messages.DeviceStatus.TRAINING, session=4, at=1.0, model_version=2
    )

    # Act
    data = messages.encode_message(state)

    # Assert: 16-byte prefix, JSON, 4-byte checksum; nothing else
    assert data[16:-4].decode() == (
        '{"at":1.0,"device_id":"d1","fleet":"f","model_version":2,"reasons":[],'
        '"session":4,"status":"training","updates_sent":0}'
    )


def test_unknown_header_keys_are_ignored_and_optional_ones_default() -> None:
    header = {"fleet": "f", "device_id": "d", "status": "idle", "session": 1, "at": 5, "new": 1}
    state = messages.DeviceState.from_header(header)
    assert state == messages.DeviceState("f", "d", messages.DeviceStatus.IDLE, 1, 5.0)
    assert isinstance(state.at, float)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"fleet": "a/b"},
        {"device_id": ""},
        {"seq": -1},
        {"seq": True},
        {"seq": 1.0},
        {"seq": "1"},
        {"base_version": 2**63},
        {"num_examples": None},
        {"model": "has space"},
        {"codec": []},
        {"codec": {1: "x"}},
        {"num_params": 91},
        {"created_at": math.nan},
        {"created_at": -1.0},
        {"created_at": "now"},
        {"layout": "w"},
        {"layout": ({"name": "w", "shape": [-1], "dtype": "float32"},)},
        {"layout": ({"name": "w", "shape": [90], "dtype": "complex64"},)},
        {"layout": ({"name": "w", "shape": [90], "dtype": ["float32"]},)},
        {"layout": ({"name": "", "shape": [90], "dtype": "float32"},)},
        {"layout": ({"shape": [90]},)},
        {"metrics": {"loss": math.inf}},
        {"metrics": {"loss": "low"}},
    ],
)
def test_invalid_update_fields_are_bad_header(overrides: dict[str, Any]) -> None:
    assert bad_header_reason(lambda: make_update(**overrides)) is RejectReason.BAD_HEADER


def test_layout_dicts_are_accepted_and_normalised() -> None:
    update = make_update(layout=[{"name": "w", "shape": [90], "dtype": "float32"}])
    assert update.layout == (messages.TensorSpec("w", (90,)),)
    assert messages.layout_sha256(update.layout) == messages.layout_sha256(
        [messages.TensorSpec("w", (90,), "float32")]
    )
    assert messages.layout_sha256(update.layout) != messages.layout_sha256(
        [messages.TensorSpec("w", (9, 10))]
    )


def test_missing_required_field_is_bad_header() -> None:
    header = make_update().to_header()
    del header["seq"]
    with pytest.raises(ProtocolError, match="seq: missing") as exc_info:
        messages.UpdateHeader.from_header(header)
    assert exc_info.value.reason is RejectReason.BAD_HEADER


def _manifest(**overrides: Any) -> messages.ModelManifest:
    fields: dict[str, Any] = {
        "fleet": "f",
        "version": 3,
        "model": "m",
        "format": "fp32-flat",
        "sha256": "ab" * 32,
        "size": 400,
        "chunk_size": 150,
        "num_chunks": 3,
        "num_params": 100,
        "created_at": 1.0,
    }
    return messages.ModelManifest(**{**fields, **overrides})


@pytest.mark.parametrize(
    "overrides",
    [
        {"format": "pickle"},
        {"sha256": "AB" * 32},
        {"sha256": "ab" * 31},
        {"num_chunks": 4},
        {"chunk_size": 0},
        {"size": 404},  # fp32-flat: 4 bytes per parameter
        {"hints": {"lr": 0}},
        {"hints": {"local_epochs": 0}},
        {"hints": [1]},
        {"onnx": {"sha256": "ab" * 32, "size": 10}},
    ],
)
def test_invalid_manifest_fields_are_bad_header(overrides: dict[str, Any]) -> None:
    assert bad_header_reason(lambda: _manifest(**overrides)) is RejectReason.BAD_HEADER


@pytest.mark.parametrize(
    ("cls", "header"),
    [
        (
            messages.DeviceState,
            {"fleet": "f", "device_id": "d", "status": "asleep", "session": 1, "at": 0},
        ),
        (
            messages.DeviceState,
            {"fleet": "f", "device_id": "d", "status": "idle", "session": -1, "at": 0},
        ),
        (
            messages.DeviceState,
            {"fleet": "f", "device_id": "d", "status": "idle", "session": 1, "at": 0,
             "local_accuracy": 1.5},
        ),
        (
            messages.DeviceState,
            {"fleet": "f", "device_id": "d", "status": "idle", "session": 1, "at": 0,
             "reasons": "hot"},
        ),
        (
            messages.ServerState,
            {"fleet": "f", "status": "online", "session": 0, "version": 0, "buffer_fill": 6,
             "buffer_size": 5, "applied": 0, "started_at": 0, "at": 0},
        ),
        (
            messages.ServerState,
            {"fleet": "f", "status": "online", "session": 0, "version": 0, "buffer_fill": 0,
             "buffer_size": 5, "applied": 0, "started_at": 0, "at": 0, "rejected": {"stale": -1}},
        ),
        (
            messages.ServerMetrics,
            {"fleet": "f", "at": 0, "version": 0, "buffer_fill": 0, "buffer_size": 1,
             "staleness": {"01": 3}},
        ),
        (
            messages.ServerMetrics,
            {"fleet": "f", "at": 0, "version": 0, "buffer_fill": 0, "buffer_size": 1,
             "updates_per_s": -1.0},
        ),
    ],
)  # fmt: skip
def test_invalid_state_and_metrics_headers(cls: Any, header: dict[str, Any]) -> None:
    assert bad_header_reason(lambda: cls.from_header(header)) is RejectReason.BAD_HEADER


# -- envelopes ---------------------------------------------------------------------------------


def test_decode_message_rejects_the_wrong_kind() -> None:
    data = messages.encode_message(
        messages.DeviceState("f", "d", messages.DeviceStatus.IDLE, 1, 0.0)
    )
    assert (
        bad_header_reason(lambda: messages.decode_message(data, messages.ServerState))
        is RejectReason.BAD_KIND
    )


def test_header_only_kinds_reject_payloads() -> None:
    state = messages.DeviceState("f", "d", messages.DeviceStatus.IDLE, 1, 0.0)
    data = encode_envelope(EnvelopeKind.DEVICE_STATE, state.to_header(), b"x")
    reason = bad_header_reason(
        lambda: messages.decode_message(data, messages.DeviceState, max_payload=10)
    )
    assert reason is RejectReason.BAD_HEADER
    with pytest.raises(ValueError, match="no payload"):
        messages.encode_message(state, b"x")


def test_decode_update_bounds_the_body() -> None:
    data = messages.encode_message(make_update(), b"x" * 100)
    assert (
        bad_header_reason(lambda: messages.decode_update(data, max_payload=99))
        is RejectReason.TOO_LARGE
    )


def test_message_types_cover_every_non_chunk_kind() -> None:
    assert set(messages.MESSAGE_TYPES) == set(EnvelopeKind) - {
        EnvelopeKind.UPDATE_CHUNK,
        EnvelopeKind.MODEL_CHUNK,
    }
    assert set(messages.TOPIC_ENVELOPE_KINDS) == set(TopicKind)


# -- topics and presence -----------------------------------------------------------------------


def test_update_must_match_its_topic() -> None:
    # Arrange
    update = make_update()
    data = messages.encode_message(update, b"body")
    right = parse_topic(update_topic("f", "d1", 3))
    wrong_seq = parse_topic(update_topic("f", "d1", 4))
    wrong_device = parse_topic(update_topic("f", "d2", 3))

    # Act / Assert
    assert messages.decode_update(data, topic=right)[0] == update
    for topic in (wrong_seq, wrong_device):
        assert bad_header_reason(lambda t=topic: messages.decode_update(data, topic=t)) is (
            RejectReason.BAD_HEADER
        )


def test_message_on_the_wrong_kind_of_topic_is_bad_kind() -> None:
    state = messages.DeviceState("f", "d1", messages.DeviceStatus.IDLE, 1, 0.0)
    topic = parse_topic(update_topic("f", "d1", 1))
    assert bad_header_reason(lambda: messages.check_topic(state, topic)) is RejectReason.BAD_KIND
    messages.check_topic(state, parse_topic("edgefl/v1/f/device/d1/state"))
    mismatch = parse_topic("edgefl/v1/g/device/d1/state")
    assert (
        bad_header_reason(lambda: messages.check_topic(state, mismatch)) is RejectReason.BAD_HEADER
    )


def test_presence_rule_ignores_wills_of_older_sessions() -> None:
    # Arrange: session 5 connected, then the Will of session 4 arrives late
    online = messages.DeviceState("f", "d", messages.DeviceStatus.ONLINE, session=5, at=100.0)
    late_will = messages.DeviceState("f", "d", messages.DeviceStatus.LOST, session=4, at=50.0)
    own_will = messages.DeviceState("f", "d", messages.DeviceStatus.LOST, session=5, at=100.0)

    # Act / Assert
    assert online.supersedes(None)
    assert not late_will.supersedes(online)
    assert own_will.supersedes(online)


# -- model chunks against the manifest ---------------------------------------------------------


def test_model_chunks_are_checked_against_the_manifest() -> None:
    # Arrange: a 100-parameter fp32 model in 1 KiB packets, plus an ONNX artifact
    weights = bytes(range(256)) + bytes(144)
    onnx = b"onnx-graph" * 50
    w = split_message(weights, kind=EnvelopeKind.MODEL_CHUNK, max_packet=1024)
    o = split_message(onnx, kind=EnvelopeKind.MODEL_CHUNK, max_packet=1024)
    manifest = _manifest(
        sha256=hashlib.sha256(weights).hexdigest(),
        size=w.total_size,
        chunk_size=w.chunk_size,
        num_chunks=w.count,
        onnx=messages.ArtifactInfo(o.sha256.hex(), o.total_size, o.chunk_size, o.count),
    )
    manifest = messages.decode_message(messages.encode_message(manifest), messages.ModelManifest)

    def chunk(packets: tuple[bytes, ...], i: int) -> Any:
        return decode_chunk(decode_envelope(packets[i], max_payload=1024))

    # Act / Assert: matching chunks pass
    for i in range(w.count):
        manifest.check_chunk(chunk(w.packets, i), ModelChunkTopic("f", 3, i))
    for i in range(o.count):
        manifest.check_chunk(chunk(o.packets, i), ModelChunkTopic("f", 3, i, ModelArtifact.ONNX))

    # and mismatches are BAD_CHUNK: wrong version, wrong index, wrong artifact
    for topic in (
        ModelChunkTopic("f", 4, 0),
        ModelChunkTopic("f", 3, 1),
        ModelChunkTopic("f", 3, 0, ModelArtifact.ONNX),
    ):
        reason = bad_header_reason(lambda t=topic: manifest.check_chunk(chunk(w.packets, 0), t))
        assert reason is RejectReason.BAD_CHUNK


def test_manifest_without_onnx_has_no_onnx_artifact() -> None:
    reason = bad_header_reason(lambda: _manifest().artifact(ModelArtifact.ONNX))
    assert reason is RejectReason.BAD_HEADER


def test_chunked_update_end_to_end() -> None:
    # Arrange: a device encodes a 50 kB update and publishes it in 4 KiB packets, twice (QoS1)
    header = make_update()
    body = bytes(range(256)) * 200
    topic = update_topic("f", "d1", 3)
    packets = packetize(messages.encode_message(header, body), max_packet=4096)
    r = Reassembler()

    # Act: the aggregator sees the packets reversed and duplicated
    results = []
    for packet in list(reversed(packets)) + packets:
        env = depacketize(packet, reassembler=r, source="d1", now=0.0, max_packet=4096)
        if env is not None:
            results.append(
                messages.message_from_envelope(env, messages.UpdateHeader, topic=parse_topic(topic))
            )
            assert bytes(env.payload) == body

    # Assert: exactly one update, equal to what was sent
    assert len(packets) > 1
    assert results == [header]


def test_decode_message_defaults_allow_update_bodies() -> None:
    data = messages.encode_message(make_update(), b"x" * 1000)
    assert messages.decode_message(data, messages.UpdateHeader) == make_update()
