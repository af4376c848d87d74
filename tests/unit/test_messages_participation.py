"""Protocol 1.2 participation messages: CHECKIN, LEASE and the new optional fields."""

from __future__ import annotations

import pytest
import samples

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.messages import (
    CheckIn,
    DeviceState,
    DeviceStatus,
    Lease,
    Participation,
    ServerState,
    decode_message,
    encode_message,
)
from edgefl.protocol.topics import (
    CheckInTopic,
    LeaseTopic,
    TopicKind,
    checkin_topic,
    checkins_filter,
    lease_topic,
    parse_topic,
)


def test_checkin_and_lease_topics_round_trip() -> None:
    assert checkin_topic("f", "d1") == "edgefl/v1/f/device/d1/checkin"
    assert lease_topic("f", "d1") == "edgefl/v1/f/device/d1/lease"
    assert checkins_filter("f") == "edgefl/v1/f/device/+/checkin"
    assert parse_topic("edgefl/v1/f/device/d1/checkin") == CheckInTopic("f", "d1")
    assert parse_topic("edgefl/v1/f/device/d1/lease").kind is TopicKind.DEVICE_LEASE


@pytest.mark.parametrize(
    ("msg", "topic"),
    [
        (CheckIn("f", "d1", at=5.0, available=True, model_version=3), CheckInTopic("f", "d1")),
        (CheckIn("f", "d1", at=5.0, available=False), CheckInTopic("f", "d1")),
        (Lease("f", "d1", at=5.0, lease_id=7, ttl_s=60.0, version=3), LeaseTopic("f", "d1")),
    ],
)
def test_participation_messages_round_trip_on_their_topic(
    msg: CheckIn | Lease, topic: CheckInTopic | LeaseTopic
) -> None:
    assert decode_message(encode_message(msg), type(msg), topic=topic) == msg


def test_a_lease_on_another_device_s_topic_is_refused() -> None:
    lease = Lease("f", "d1", at=5.0, lease_id=7, ttl_s=60.0, version=3)

    with pytest.raises(ProtocolError) as err:
        decode_message(encode_message(lease), Lease, topic=LeaseTopic("f", "d2"))

    assert err.value.reason is RejectReason.BAD_HEADER


@pytest.mark.parametrize(
    "header",
    [
        {"fleet": "f", "device_id": "d", "at": 1.0, "lease_id": 0, "ttl_s": 60.0, "version": 0},
        {"fleet": "f", "device_id": "d", "at": 1.0, "lease_id": 1, "ttl_s": 0.5, "version": 0},
        {"fleet": "f", "device_id": "d", "at": 1.0, "lease_id": 1, "ttl_s": 60.0},
    ],
)
def test_bad_leases_are_bad_headers(header: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as err:
        Lease.from_header(header)
    assert err.value.reason is RejectReason.BAD_HEADER


def test_checkin_available_must_be_a_boolean() -> None:
    with pytest.raises(ProtocolError, match="available"):
        CheckIn.from_header({"fleet": "f", "device_id": "d", "at": 1.0, "available": 1})


def test_server_state_carries_participation_and_old_states_parse_without_it() -> None:
    part = Participation(concurrency=10, lease_s=300.0, checkin_ttl_s=900.0, in_flight=4)
    state = samples.server_state(fleet="f", features=("leases",), participation=part)

    back = decode_message(encode_message(state), ServerState)
    old = ServerState.from_header(
        {k: v for k, v in state.to_header().items() if k != "participation"}
    )

    assert back.participation == part
    assert old.participation is None


def test_device_state_says_waiting_for_slot_only_when_waiting() -> None:
    idle = DeviceState("f", "d", DeviceStatus.IDLE, 1, 1.0)
    waiting = DeviceState("f", "d", DeviceStatus.IDLE, 1, 1.0, waiting_for_slot=True)

    assert "waiting_for_slot" not in idle.to_header()
    assert decode_message(encode_message(waiting), DeviceState).waiting_for_slot is True
