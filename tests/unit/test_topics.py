"""Topic tree: validated names, builders, filters and the strict parser."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.topics import (
    MAX_INT,
    MAX_PARTITIONS,
    NAME_PATTERN,
    DeviceStateTopic,
    ModelArtifact,
    ModelChunkTopic,
    ModelManifestTopic,
    PartitionControl,
    PartitionControlTopic,
    ServerMetricsTopic,
    ServerStateTopic,
    ShardsLeaf,
    ShardStateTopic,
    ShardsTopic,
    TopicKind,
    UpdateTopic,
    all_fleet_filter,
    device_id,
    device_state_topic,
    device_states_filter,
    fleet_name,
    manifest_topic,
    model_chunk_topic,
    model_chunks_filter,
    parse_topic,
    partition_control_filter,
    partition_control_topic,
    server_metrics_topic,
    server_state_topic,
    shards_topic,
    shared_subscription,
    update_topic,
    updates_filter,
)

names = st.from_regex(NAME_PATTERN, fullmatch=True)
ints = st.integers(min_value=0, max_value=MAX_INT)

parsed_topics = st.one_of(
    st.builds(ModelManifestTopic, names),
    st.builds(ModelChunkTopic, names, ints, ints, st.sampled_from(ModelArtifact)),
    st.builds(UpdateTopic, names, names, ints),
    st.builds(DeviceStateTopic, names, names),
    st.builds(ServerStateTopic, names),
    st.builds(ServerMetricsTopic, names),
    # 1.3, the sharded tree
    st.builds(UpdateTopic, names, names, ints, st.integers(0, MAX_PARTITIONS - 1)),
    st.builds(ShardsTopic, names, st.sampled_from(ShardsLeaf)),
    st.builds(ShardStateTopic, names, names),
    st.builds(
        PartitionControlTopic,
        names,
        st.integers(0, MAX_PARTITIONS - 1),
        st.sampled_from(PartitionControl),
    ),
)

BAD_NAMES = ["", "a/b", "a+b", "#", "$SYS", "a b", "a\x00b", "-lead", ".lead", "x" * 65, "é", "a\n"]


def rejection(call: Callable[..., object], *args: object, **kwargs: object) -> RejectReason:
    """The reason of the ``ProtocolError`` that ``call(*args, **kwargs)`` raises (fails the test
    if it raises none)."""
    with pytest.raises(ProtocolError) as exc_info:
        call(*args, **kwargs)
    return exc_info.value.reason


@given(parsed_topics)
def test_build_then_parse_round_trips(topic: object) -> None:
    # Arrange
    text = topic.topic  # type: ignore[attr-defined]

    # Act
    from_str = parse_topic(text)
    from_bytes = parse_topic(text.encode("utf-8"))

    # Assert
    assert from_str == topic
    assert from_bytes == topic
    assert from_str.topic == text


def test_builders_produce_the_documented_tree() -> None:
    assert manifest_topic("f1") == "edgefl/v1/f1/model/manifest"
    assert model_chunk_topic("f1", 7, 3) == "edgefl/v1/f1/model/7/3"
    assert (
        model_chunk_topic("f1", 7, 3, artifact=ModelArtifact.ONNX) == "edgefl/v1/f1/model/7/onnx/3"
    )
    assert update_topic("f1", "pi-01", 42) == "edgefl/v1/f1/device/pi-01/update/42"
    assert device_state_topic("f1", "pi-01") == "edgefl/v1/f1/device/pi-01/state"
    assert server_state_topic("f1") == "edgefl/v1/f1/server/state"
    assert server_metrics_topic("f1") == "edgefl/v1/f1/server/metrics"


def test_parsed_topics_carry_their_kind() -> None:
    assert parse_topic("edgefl/v1/f/model/manifest").kind is TopicKind.MODEL_MANIFEST
    assert parse_topic("edgefl/v1/f/model/0/0").kind is TopicKind.MODEL_CHUNK
    assert parse_topic("edgefl/v1/f/device/d/update/0").kind is TopicKind.DEVICE_UPDATE
    assert parse_topic("edgefl/v1/f/device/d/state").kind is TopicKind.DEVICE_STATE
    assert parse_topic("edgefl/v1/f/server/state").kind is TopicKind.SERVER_STATE
    assert parse_topic("edgefl/v1/f/server/metrics").kind is TopicKind.SERVER_METRICS


def test_filters() -> None:
    assert updates_filter("f") == "edgefl/v1/f/device/+/update/+"
    assert updates_filter("f", device="d1") == "edgefl/v1/f/device/d1/update/+"
    assert device_states_filter("f") == "edgefl/v1/f/device/+/state"
    assert model_chunks_filter("f", 3) == "edgefl/v1/f/model/3/#"
    assert all_fleet_filter("f") == "edgefl/v1/f/#"
    assert (
        shared_subscription("aggregators", updates_filter("f"))
        == "$share/aggregators/edgefl/v1/f/device/+/update/+"
    )


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_rejected_by_validators_and_builders(bad: str) -> None:
    calls: tuple[Callable[[], object], ...] = (
        lambda: fleet_name(bad),
        lambda: device_id(bad),
        lambda: manifest_topic(bad),
        lambda: update_topic("f", bad, 1),
        lambda: shared_subscription(bad, "edgefl/v1/f/#"),
        lambda: UpdateTopic(bad, "d", 1),
        lambda: DeviceStateTopic("f", bad),
    )
    for call in calls:
        assert rejection(call) is RejectReason.BAD_NAME


@pytest.mark.parametrize("bad", [n for n in BAD_NAMES if n and "/" not in n])
def test_bad_names_in_topics_are_bad_name(bad: str) -> None:
    for topic in (f"edgefl/v1/{bad}/server/state", f"edgefl/v1/f/device/{bad}/state"):
        assert rejection(parse_topic, topic) is RejectReason.BAD_NAME


def test_non_names_are_rejected() -> None:
    assert rejection(fleet_name, 12) is RejectReason.BAD_NAME


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "edgefl",
        "edgefl/v1/f",
        "edgefl/v1/f/model",
        "edgefl/v1/f/model/manifest/x",
        "edgefl/v1/f/model/01/0",
        "edgefl/v1/f/model/1/00",
        "edgefl/v1/f/model/1/-1",
        "edgefl/v1/f/model/1/+",
        "edgefl/v1/f/model/1/#",
        "edgefl/v1/f/model/1/ 1",
        "edgefl/v1/f/model/1/\u0663",
        "edgefl/v1/f/model/1/pt/0",
        "edgefl/v1/f/model/1/onnx",
        f"edgefl/v1/f/model/{2**63}/0",
        "edgefl/v1/f/device/d/update",
        "edgefl/v1/f/device/d/update/1/0",
        "edgefl/v1/f/device/d/update/x",
        "edgefl/v1/f/device/d/state/x",
        "edgefl/v1/f/device/d",
        "edgefl/v1/f/server/state/",
        "edgefl/v1/f/server/other",
        "edgefl/v1/f/server",
        "edgefl/v1/f/other/state",
        "/edgefl/v1/f/server/state",
        "other/v1/f/server/state",
        "$share/g/edgefl/v1/f/server/state",
        "edgefl/v1/f/#",
        # 1.3
        "edgefl/v1/f/part/01/device/d/update/1",
        "edgefl/v1/f/part/-1/device/d/update/1",
        f"edgefl/v1/f/part/{2**16}/device/d/update/1",
        "edgefl/v1/f/part/1/device/d/state",
        "edgefl/v1/f/part/1/device/d/update",
        "edgefl/v1/f/part/1/update/1",
        "edgefl/v1/f/part/x/device/d/update/1",
        "edgefl/v1/f/shards",
        "edgefl/v1/f/shards/root",
        "edgefl/v1/f/shards/other",
        "edgefl/v1/f/shards/partial/s0",
        "edgefl/v1/f/shards/part/1/other",
        "edgefl/v1/f/shards/part/01/confirm",
        f"edgefl/v1/f/shards/part/{2**16}/confirm",
        "edgefl/v1/f/shards/part/1",
    ],
)
def test_malformed_topics_are_bad_topic(topic: str) -> None:
    assert rejection(parse_topic, topic) is RejectReason.BAD_TOPIC


def test_other_protocol_version_is_bad_version() -> None:
    assert rejection(parse_topic, "edgefl/v2/f/server/state") is RejectReason.BAD_VERSION


def test_expected_fleet() -> None:
    assert parse_topic("edgefl/v1/a/server/state", expected_fleet="a") == ServerStateTopic("a")
    assert (
        rejection(parse_topic, "edgefl/v1/b/server/state", expected_fleet="a")
        is RejectReason.UNKNOWN_FLEET
    )


@pytest.mark.parametrize(
    "raw", [b"edgefl/v1/\xff/server/state", b"edgefl/v1/f/server/\xc3", b"\xed\xa0\x80"]
)
def test_invalid_utf8_is_bad_topic(raw: bytes) -> None:
    assert rejection(parse_topic, raw) is RejectReason.BAD_TOPIC


def test_overlong_topic_is_bad_topic() -> None:
    assert rejection(parse_topic, b"edgefl/v1/f/" + b"a" * 70000) is RejectReason.BAD_TOPIC


def test_topic_values_validate_integers_too() -> None:
    with pytest.raises(ValueError, match="seq"):
        UpdateTopic("f", "d", -1)
    with pytest.raises(ValueError, match="ModelArtifact"):
        ModelChunkTopic("f", 1, 1, "pt")  # type: ignore[arg-type]


def test_builders_reject_out_of_range_integers() -> None:
    with pytest.raises(ValueError, match="seq"):
        update_topic("f", "d", -1)
    with pytest.raises(ValueError, match="version"):
        model_chunk_topic("f", 2**63, 0)
    with pytest.raises(ValueError, match="chunk index"):
        model_chunk_topic("f", 1, True)


def test_shared_subscription_needs_an_edgefl_filter() -> None:
    with pytest.raises(ValueError, match="edgefl"):
        shared_subscription("g", "other/#")


@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_arbitrary_input_only_raises_protocol_error(raw: str | bytes) -> None:
    reason = None
    try:
        parsed = parse_topic(raw)
    except ProtocolError as exc:
        reason = exc.reason
    else:
        text = raw if isinstance(raw, str) else raw.decode()
        assert parsed.topic == text
    assert reason in {None, RejectReason.BAD_TOPIC, RejectReason.BAD_NAME, RejectReason.BAD_VERSION}


@given(names, names, ints)
def test_mutated_update_topics_only_raise_protocol_error(fleet: str, dev: str, seq: int) -> None:
    # Arrange: an extra level, a wildcard, or a missing level never parses as an update
    base = update_topic(fleet, dev, seq)
    variants = [base + "/0", base.rsplit("/", 1)[0], base.replace(dev, "+", 1)]

    for variant in variants:
        # Act / Assert
        with pytest.raises(ProtocolError):
            parse_topic(variant)


# --------------------------------------------------------------------------- revision 1.3


def test_sharded_tree_builders_produce_the_documented_topics() -> None:
    assert (
        update_topic("f1", "pi-01", 42, partition=7) == "edgefl/v1/f1/part/7/device/pi-01/update/42"
    )
    assert updates_filter("f1", partition=7) == "edgefl/v1/f1/part/7/device/+/update/+"
    assert shards_topic("f1", ShardsLeaf.ASSIGNMENT) == "edgefl/v1/f1/shards/assignment"
    assert shards_topic("f1", ShardsLeaf.PARTIAL) == "edgefl/v1/f1/shards/partial"
    assert shards_topic("f1", ShardsLeaf.ROOT_STATUS) == "edgefl/v1/f1/shards/root/status"
    assert (
        partition_control_topic("f1", 3, PartitionControl.TAKEOVER)
        == "edgefl/v1/f1/shards/part/3/takeover"
    )
    assert (
        partition_control_filter("f1", PartitionControl.TAKEOVER)
        == "edgefl/v1/f1/shards/part/+/takeover"
    )


def test_a_partitioned_update_is_an_update_and_the_old_topic_still_parses() -> None:
    # Act
    partitioned = parse_topic("edgefl/v1/f/part/5/device/d/update/9")
    plain = parse_topic("edgefl/v1/f/device/d/update/9")

    # Assert: both are updates of (d, 9); only the partitioned one names a partition
    assert partitioned == UpdateTopic("f", "d", 9, partition=5)
    assert plain == UpdateTopic("f", "d", 9)
    assert partitioned.kind is plain.kind is TopicKind.DEVICE_UPDATE
    assert parse_topic("edgefl/v1/f/shards/part/5/confirm").kind is TopicKind.PARTITION_CONTROL
    assert parse_topic("edgefl/v1/f/shards/assignment").kind is TopicKind.SHARDS


def test_partition_numbers_are_bounded() -> None:
    with pytest.raises(ValueError, match="partition must be an int"):
        update_topic("f", "d", 1, partition=MAX_PARTITIONS)
    with pytest.raises(ValueError, match="partition must be an int"):
        UpdateTopic("f", "d", 1, partition=-1)
    with pytest.raises(ValueError, match="partition must be an int"):
        partition_control_topic("f", True, PartitionControl.CONFIRM)  # type: ignore[arg-type]
