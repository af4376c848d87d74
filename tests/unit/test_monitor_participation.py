"""The monitor's participation view (protocol 1.2): in-flight leases against C, candidates,
devices waiting for a slot, and the staleness distribution against C / K."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from agent_helpers import FLEET, server_state

from edgefl.monitor.decode import DeviceStateSeen, MetricsSeen, ServerStateSeen, StateEncoding
from edgefl.monitor.model import FleetModel
from edgefl.monitor.participation import staleness_summary
from edgefl.monitor.render import aggregator_lines, device_cells
from edgefl.monitor.snapshot import StalenessSummary
from edgefl.monitor.summary import summarize
from edgefl.protocol.messages import DeviceState, Participation, ServerMetrics, ServerState


def server(participation: Participation | None) -> ServerState:
    features = ("leases",) if participation is not None else ()
    return dataclasses.replace(server_state(features, participation), buffer_size=5)


def metrics(staleness: dict[int, int], at: float = 101.0) -> ServerMetrics:
    return ServerMetrics(
        fleet=FLEET, at=at, version=7, buffer_fill=2, buffer_size=5, staleness=staleness
    )


def device(name: str, **kw: Any) -> DeviceStateSeen:
    state = DeviceState(FLEET, name, "idle", 1, 100.0, **kw)  # type: ignore[arg-type]
    return DeviceStateSeen(state, StateEncoding.ENVELOPE)


@pytest.mark.parametrize(
    ("histogram", "expected"),
    [
        ({}, None),
        ({0: 0}, None),
        ({3: 1}, StalenessSummary(count=1, mean=3.0, p90=3, max=3)),
        # 10 updates: τ 0 ×5, 1 ×3, 2 ×1, 9 ×1 -> mean 1.4; 90 % (9 updates) reached at τ 2
        ({0: 5, 1: 3, 2: 1, 9: 1}, StalenessSummary(count=10, mean=1.4, p90=2, max=9)),
    ],
)
def test_staleness_summary(histogram: dict[int, int], expected: StalenessSummary | None) -> None:
    assert staleness_summary(histogram) == expected


def test_snapshot_shows_leases_against_c_waiting_devices_and_staleness_against_c_over_k() -> None:
    # Arrange: C = 10, K = 5 (C/K = 2); 3 devices, 2 of them waiting for a slot
    model = FleetModel(FLEET)
    p = Participation(concurrency=10, lease_s=60.0, checkin_ttl_s=120.0, in_flight=8, candidates=2)
    # Act
    model.apply(ServerStateSeen(server(p)), now=100.0)
    model.apply(MetricsSeen(metrics({0: 5, 1: 3, 2: 1, 9: 1})), now=101.0)
    model.apply(device("a", waiting_for_slot=True), now=101.0)
    model.apply(device("b", waiting_for_slot=True), now=101.0)
    model.apply(device("c", waiting_for_slot=False), now=101.0)
    snap = model.snapshot(102.0)
    # Assert
    view = snap.aggregator.participation
    assert view is not None
    assert (view.concurrency, view.in_flight, view.candidates) == (10, 8, 2)
    assert view.waiting_for_slot == 2
    assert view.staleness_target == 2.0
    assert view.staleness == StalenessSummary(count=10, mean=1.4, p90=2, max=9)
    lines = aggregator_lines(snap.aggregator)
    assert "leases   8/10 in flight, 2 checked in, 2 waiting" in lines
    assert "τ vs C/K mean 1.4, p90 2, max 9 (C/K 2.0)" in lines
    assert device_cells(snap.devices[0])["why"] == "waiting for slot"
    assert device_cells(snap.devices[2])["why"] == "-"
    out = json.loads(json.dumps(snap.to_json()))
    assert out["aggregator"]["participation"]["in_flight"] == 8
    assert out["devices"][0]["waiting_for_slot"] is True


def test_no_participation_view_without_leases() -> None:
    model = FleetModel(FLEET)
    model.apply(ServerStateSeen(server(None)), now=100.0)
    model.apply(device("a"), now=100.0)
    snap = model.snapshot(101.0)
    assert snap.aggregator.participation is None
    assert not any(line.startswith("leases") for line in aggregator_lines(snap.aggregator))
    assert snap.devices[0].waiting_for_slot is None


def test_topic_log_lines_name_leases_and_waiting_devices() -> None:
    p = Participation(concurrency=10, lease_s=60.0, checkin_ttl_s=120.0, in_flight=3, candidates=4)
    assert "leases=3/10 candidates=4" in summarize(ServerStateSeen(server(p)), b"")
    assert "waiting_for_slot" in summarize(device("a", waiting_for_slot=True), b"")
    assert "waiting_for_slot" not in summarize(device("a", waiting_for_slot=False), b"")
