"""The monitor and protocol 1.1: receipts, spool fields, server features, clamped device times."""

from __future__ import annotations

import numpy as np

from edgefl.aggregator.updates import build_update_envelope
from edgefl.errors import RejectReason
from edgefl.monitor.decode import DeviceStateSeen, ReceiptSeen, UpdateSeen, decode_inbound
from edgefl.monitor.model import FleetModel
from edgefl.monitor.summary import summarize
from edgefl.protocol.messages import (
    FEATURE_RECEIPTS,
    MAX_CLOCK_AHEAD,
    DeviceState,
    Receipt,
    ServerState,
    encode_message,
)
from edgefl.protocol.receipts import CommitOutcome, ReceiptBook
from edgefl.protocol.topics import (
    device_state_topic,
    receipt_topic,
    server_state_topic,
    update_topic,
)

FLEET = "lab"
NOW = 1_700_000_000.0


def decode(topic: str, payload: bytes) -> object:
    return decode_inbound(topic, payload, fleet=FLEET, now=NOW)


def test_a_receipt_is_decoded_not_counted_as_a_bad_topic() -> None:
    # Arrange
    book = ReceiptBook(FLEET)
    outcomes = [
        CommitOutcome("pi-1", 0),
        CommitOutcome("pi-1", 1),
        CommitOutcome("pi-1", 5, RejectReason.SEQ_JUMP),
    ]
    ((topic, payload),) = book.receipts(outcomes, now=NOW)
    model = FleetModel(FLEET)

    # Act
    obs = decode(topic, payload)
    model.apply(obs, now=NOW)  # type: ignore[arg-type]
    state = DeviceState(FLEET, "pi-1", "online", 1, NOW, spool_depth=3, awaiting_receipt=2)  # type: ignore[arg-type]
    model.apply(decode(device_state_topic(FLEET, "pi-1"), encode_message(state)), now=NOW)  # type: ignore[arg-type]
    snap = model.snapshot(NOW)

    # Assert
    assert isinstance(obs, ReceiptSeen)
    assert obs.receipt.through == 1
    assert summarize(obs, payload) == "receipt pi-1 through=1 committed=0-1 rejected=5:seq_jump"
    assert snap.monitor.rejected == {}
    (device,) = snap.devices
    assert (device.spool_depth, device.awaiting_receipt, device.receipt_through) == (3, 2, 1)


def test_device_spool_fields_and_server_features_are_shown() -> None:
    state = DeviceState(FLEET, "pi-1", "online", 1, NOW, spool_depth=4, awaiting_receipt=1)  # type: ignore[arg-type]
    payload = encode_message(state)
    server = ServerState(
        FLEET,
        "online",
        1,
        0,
        0,
        10,
        0,
        NOW,
        NOW,
        features=(FEATURE_RECEIPTS,),  # type: ignore[arg-type]
    )
    server_payload = encode_message(server)
    model = FleetModel(FLEET)

    device_obs = decode(device_state_topic(FLEET, "pi-1"), payload)
    server_obs = decode(server_state_topic(FLEET), server_payload)
    model.apply(server_obs, now=NOW)  # type: ignore[arg-type]

    assert "spool=4 awaiting_receipt=1" in summarize(device_obs, payload)  # type: ignore[arg-type]
    assert summarize(server_obs, server_payload).endswith("features=receipts")  # type: ignore[arg-type]
    assert model.snapshot(NOW).aggregator.features == (FEATURE_RECEIPTS,)


def test_device_times_are_clamped_to_the_receive_time_plus_a_day() -> None:
    # a device without a real-time clock claims the year 2100 (the header's own bound)
    state = DeviceState(FLEET, "pi-1", "online", 1, 1e300)  # type: ignore[arg-type]
    envelope = build_update_envelope(
        fleet=FLEET,
        model="digits-mlp",
        device="pi-1",
        seq=0,
        base_version=0,
        delta=np.zeros(2410, np.float32),
        created_at=1e300,
    )

    state_obs = decode(device_state_topic(FLEET, "pi-1"), encode_message(state))
    json_obs = decode(
        device_state_topic(FLEET, "pi-1"), b'{"status": "online", "session": 1, "at": 4e9}'
    )
    update_obs = decode(update_topic(FLEET, "pi-1", 0), envelope)

    assert isinstance(state_obs, DeviceStateSeen)
    assert state_obs.state.at == NOW + MAX_CLOCK_AHEAD
    assert isinstance(json_obs, DeviceStateSeen)
    assert json_obs.state.at == NOW + MAX_CLOCK_AHEAD
    assert isinstance(update_obs, UpdateSeen)
    assert update_obs.header is not None
    assert update_obs.header.created_at == NOW + MAX_CLOCK_AHEAD
    early = decode(
        device_state_topic(FLEET, "pi-1"), b'{"status": "online", "session": 1, "at": 12.0}'
    )
    assert isinstance(early, DeviceStateSeen)
    assert early.state.at == 12.0  # a Pi before NTP: in range, kept


def test_receipt_kind_is_counted_as_receipt() -> None:
    payload = encode_message(Receipt(FLEET, "pi-2", NOW, through=3, committed=((3, 3),)))
    model = FleetModel(FLEET)
    model.apply(decode(receipt_topic(FLEET, "pi-2"), payload), now=NOW)  # type: ignore[arg-type]
    assert model.snapshot(NOW).monitor.by_kind == {"receipt": 1}
