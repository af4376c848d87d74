"""Decoding what the monitor receives: envelopes, the plain JSON device state, deletions,
$SYS values and rejections by reason; broker statistics; clear-retained selection."""

from __future__ import annotations

import json

import pytest

from edgefl.errors import RejectReason
from edgefl.monitor.broker_stats import BrokerStats
from edgefl.monitor.clear import check_target, select_topics
from edgefl.monitor.decode import (
    BrokerStat,
    Cleared,
    DeviceStateSeen,
    ServerStateSeen,
    StateEncoding,
    TreeSeen,
    Undecodable,
    UpdateSeen,
    decode_inbound,
)
from edgefl.monitor.model import FleetModel
from edgefl.monitor.summary import summarize
from edgefl.protocol.messages import DeviceState, ServerState, UpdateHeader, encode_message
from edgefl.protocol.topics import (
    DeviceStateTopic,
    PartitionControl,
    ShardsLeaf,
    ShardsTopic,
    device_state_topic,
    partition_control_topic,
    server_state_topic,
    shards_topic,
    update_topic,
)
from edgefl.sharding.assignment import Assignment

FLEET = "lab"
STATE_TOPIC = device_state_topic(FLEET, "pi-7")


def decode(topic: str, payload: bytes, now: float = 1234.5) -> object:
    return decode_inbound(topic, payload, fleet=FLEET, now=now)


def test_device_state_envelope() -> None:
    msg = DeviceState(FLEET, "pi-7", "training", 4, 100.0, model_version=3)  # type: ignore[arg-type]
    obs = decode(STATE_TOPIC, encode_message(msg))
    assert obs == DeviceStateSeen(msg, StateEncoding.ENVELOPE)


def test_plain_json_state_takes_fleet_device_and_time_from_the_topic() -> None:
    payload = b'{"status": "idle", "session": 2, "reasons": ["metered"], "extra_key": 1}'
    obs = decode(STATE_TOPIC, payload, now=1234.5)
    assert isinstance(obs, DeviceStateSeen)
    assert obs.encoding is StateEncoding.JSON
    s = obs.state
    assert (s.fleet, s.device_id, s.status, s.session, s.at) == (FLEET, "pi-7", "idle", 2, 1234.5)
    assert s.reasons == ("metered",)


def test_plain_json_state_keeps_its_own_time() -> None:
    obs = decode(STATE_TOPIC, b' {"status": "online", "session": 1, "at": 99.5}')
    assert isinstance(obs, DeviceStateSeen)
    assert obs.state.at == 99.5


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"status": "dancing", "session": 1}', RejectReason.BAD_HEADER),  # unknown status
        (b'{"status": "online"}', RejectReason.BAD_HEADER),  # session missing
        (b'{"status": "online", "session": -1}', RejectReason.BAD_HEADER),
        (b'{"status": "online", "session": 1, "device_id": "other"}', RejectReason.BAD_HEADER),
        (b'{"status": "online", "session": 1, "at": NaN}', RejectReason.BAD_HEADER),
        (b'{"status": "online", "session": 1, "local_accuracy": 2}', RejectReason.BAD_HEADER),
        (b"{not json", RejectReason.BAD_HEADER),
        (b"[1, 2, 3, 4, 5, 6, 7, 8]", RejectReason.BAD_MAGIC),  # neither JSON object nor envelope
        (b"{" + b" " * 70_000 + b"}", RejectReason.TOO_LARGE),
        (b"online and well, thanks", RejectReason.BAD_MAGIC),
        (b"EDF", RejectReason.TRUNCATED),
    ],
)
def test_bad_device_states_are_rejected_with_a_reason(payload: bytes, reason: RejectReason) -> None:
    obs = decode(STATE_TOPIC, payload)
    assert isinstance(obs, Undecodable)
    assert obs.reason is reason


def test_envelope_of_the_wrong_kind_or_device_is_rejected() -> None:
    server = ServerState(FLEET, "online", 1, 0, 0, 1, 0, 0.0, 0.0)  # type: ignore[arg-type]
    wrong_kind = decode(STATE_TOPIC, encode_message(server))
    assert isinstance(wrong_kind, Undecodable)
    assert wrong_kind.reason is RejectReason.BAD_KIND
    other = DeviceState(FLEET, "pi-8", "online", 1, 0.0)  # type: ignore[arg-type]
    wrong_device = decode(STATE_TOPIC, encode_message(other))
    assert isinstance(wrong_device, Undecodable)
    assert wrong_device.reason is RejectReason.BAD_HEADER
    assert isinstance(decode(server_state_topic(FLEET), encode_message(server)), ServerStateSeen)


def test_topics_outside_the_fleet_and_unknown_topics() -> None:
    other_fleet = decode(device_state_topic("other", "pi"), b"{}")
    assert isinstance(other_fleet, Undecodable)
    assert other_fleet.reason is RejectReason.UNKNOWN_FLEET
    unknown = decode(f"edgefl/v1/{FLEET}/something/else", b"x")
    assert isinstance(unknown, Undecodable)
    assert unknown.reason is RejectReason.BAD_TOPIC


def test_empty_payload_is_a_deletion_not_truncated() -> None:
    assert decode(STATE_TOPIC, b"") == Cleared(DeviceStateTopic(FLEET, "pi-7"))


def test_update_header_is_decoded_without_opening_the_body() -> None:
    header = UpdateHeader(FLEET, "pi-7", 3, 1, 32, "tiny", {"quantization": "int8"}, 10, 5.0)
    obs = decode(update_topic(FLEET, "pi-7", 3), encode_message(header, b"\x00" * 100))
    assert obs == UpdateSeen("pi-7", 3, header=header)
    mismatch = decode(update_topic(FLEET, "pi-7", 4), encode_message(header, b""))
    assert isinstance(mismatch, Undecodable)
    assert mismatch.reason is RejectReason.BAD_HEADER


def test_sys_values_are_text_bounded() -> None:
    assert decode("$SYS/broker/clients/connected", b"12") == BrokerStat(
        "broker/clients/connected", "12"
    )
    long = decode("$SYS/broker/x", b"a" * 5000)
    assert isinstance(long, BrokerStat)
    assert len(long.value) == 256


# -- $SYS fold ---------------------------------------------------------------------------------


def test_broker_stats_from_sys_values() -> None:
    stats = BrokerStats()
    assert not stats.view().available
    stats.add("broker/version", "mosquitto version 2.0.11", now=10.0)
    stats.add("broker/clients/connected", "7", now=10.0)
    stats.add("broker/publish/messages/dropped", "3", now=10.0)
    stats.add("broker/uptime", "120 seconds", now=10.0)
    stats.add("broker/messages/received", "100", now=10.0)
    stats.add("broker/messages/received", "160", now=12.0)  # 60 in 2 s
    stats.add("broker/load/bytes/sent/1min", "600.0", now=12.0)  # per minute
    assert stats.add("broker/heap/current", "1", now=12.0) is False

    view = stats.view()
    assert view.available
    assert (view.version, view.clients, view.dropped_publishes, view.uptime_s) == (
        "mosquitto version 2.0.11",
        7,
        3,
        120,
    )
    assert view.messages_in_per_s == pytest.approx(30.0)
    assert view.bytes_out_per_s == pytest.approx(10.0)
    assert view.messages_out_per_s is None


def test_broker_stats_prefer_the_brokers_one_minute_average() -> None:
    stats = BrokerStats()
    stats.add("broker/messages/received", "0", now=0.0)
    stats.add("broker/messages/received", "100", now=1.0)
    stats.add("broker/load/messages/received/1min", "120", now=1.0)
    assert stats.view().messages_in_per_s == pytest.approx(2.0)


# -- clear-retained selection ------------------------------------------------------------------


def test_clear_targets_are_lost_or_a_filter_inside_the_fleet() -> None:
    assert check_target("lost", FLEET) == "lost"
    assert check_target(f"edgefl/v1/{FLEET}/device/+/state", FLEET).endswith("/state")
    for bad in ("#", "$SYS/#", "edgefl/v1/other/#", f"edgefl/v1/{FLEET}/dev#"):
        with pytest.raises(ValueError, match=r"."):
            check_target(bad, FLEET)


def test_select_topics_for_lost_devices_and_for_a_filter() -> None:
    m = FleetModel(FLEET)
    for device, status in (("a", "lost"), ("b", "online"), ("c", "lost")):
        payload = json.dumps({"status": status, "session": 1}).encode()
        m.apply(decode(device_state_topic(FLEET, device), payload, now=100.0), now=100.0)
    snap = m.snapshot(100.0)
    retained = {f"edgefl/v1/{FLEET}/model/manifest", f"edgefl/v1/{FLEET}/model/1/0"}

    assert select_topics("lost", snap, retained) == [
        device_state_topic(FLEET, "a"),
        device_state_topic(FLEET, "c"),
    ]
    assert select_topics(f"edgefl/v1/{FLEET}/model/#", snap, retained) == sorted(retained)
    assert len(select_topics(f"edgefl/v1/{FLEET}/#", snap, retained)) == 5


def test_a_sharded_trees_traffic_is_seen_as_such_never_as_a_rejection() -> None:
    # Arrange: what a root and its shards publish under shards/ (revision 1.3): JSON and EDFP
    # bytes, not envelopes; and a device's update on its partition topic
    assignment = Assignment.initial(2, ["s0"]).to_json()
    tree = [
        (shards_topic(FLEET, ShardsLeaf.ASSIGNMENT), assignment),
        (shards_topic(FLEET, ShardsLeaf.ROOT_STATUS), b'{"version": 0}'),
        (shards_topic(FLEET, ShardsLeaf.PARTIAL), b"EDFP\x01" + b"\x00" * 40),
        (partition_control_topic(FLEET, 1, PartitionControl.TAKEOVER), b'{"epoch": 0}'),
        (shards_topic(FLEET, ShardsLeaf.ASSIGNMENT), b""),  # a cleared retained assignment
    ]
    header = UpdateHeader(FLEET, "pi-7", 3, 1, 32, "tiny", {"quantization": "int8"}, 10, 5.0)
    update = (update_topic(FLEET, "pi-7", 3, partition=1), encode_message(header, b"\x00" * 8))
    model = FleetModel(FLEET)

    # Act
    observations = [decode(topic, payload) for topic, payload in [*tree, update]]
    for obs in observations:
        model.apply(obs, now=1000.0)  # type: ignore[arg-type]

    # Assert: the tree's messages are counted by kind, none as a rejection; the update is one
    assert [type(obs) for obs in observations] == [TreeSeen] * len(tree) + [UpdateSeen]
    first = observations[0]
    assert isinstance(first, TreeSeen)
    assert first == TreeSeen(ShardsTopic(FLEET, ShardsLeaf.ASSIGNMENT), len(assignment))
    counters = model.snapshot(1000.0).monitor
    assert counters.rejected == {}
    assert counters.by_kind == {"shards": len(tree), "update": 1}
    assert summarize(first, assignment).startswith("shards assignment ")
