"""The monitor's central DP view: ε at δ, z, C, the participation cap and the participation
distribution from the retained server state, in the snapshot, its JSON, the text and the log."""

from __future__ import annotations

import dataclasses
import json

import pytest
from agent_helpers import FLEET, server_state
from samples import central_privacy

from edgefl.monitor.decode import ServerStateSeen
from edgefl.monitor.model import FleetModel
from edgefl.monitor.modes import dump_json
from edgefl.monitor.privacy import compact_histogram, privacy_view
from edgefl.monitor.render import aggregator_lines, snapshot_text
from edgefl.monitor.summary import summarize
from edgefl.protocol.messages import CentralPrivacy, ServerState

PRIVACY = central_privacy()


def server(privacy: CentralPrivacy | None) -> ServerState:
    return dataclasses.replace(server_state((), None), privacy=privacy)


def test_snapshot_carries_epsilon_noise_clip_cap_and_the_participation_distribution() -> None:
    # Arrange
    model = FleetModel(FLEET)
    # Act
    model.apply(ServerStateSeen(server(PRIVACY)), now=100.0)
    snap = model.snapshot(101.0)
    # Assert
    view = snap.aggregator.privacy
    assert view is not None
    assert (view.epsilon, view.delta) == (3.21, 1e-5)
    assert (view.noise_multiplier, view.clip_norm) == (1.1, 0.3)
    assert (view.participation_cap, view.participation_max, view.devices) == (4, 4, 10)
    assert view.participation_histogram == {1: 4, 2: 3, 3: 2, 4: 1}
    # 10 devices: the 5th is at k=2 (p50), the 9th at k=3 (p90); mean (4+6+6+4)/10 = 2.0
    assert (view.p50, view.p90, view.mean) == (2, 3, 2.0)
    assert view.at_cap == 1
    assert view.budget_used == 1.0
    out = json.loads(dump_json(snap.to_json()))
    dp = out["aggregator"]["privacy"]
    assert dp["epsilon"] == 3.21
    assert dp["noise_multiplier"] == 1.1
    assert dp["participation_histogram"] == {"1": 4, "2": 3, "3": 2, "4": 1}
    assert (dp["p50"], dp["p90"], dp["at_cap"]) == (2, 3, 1)


def test_text_shows_the_privacy_lines() -> None:
    model = FleetModel(FLEET)
    model.apply(ServerStateSeen(server(PRIVACY)), now=100.0)
    snap = model.snapshot(101.0)

    lines = aggregator_lines(snap.aggregator)

    assert "privacy  ε 3.21 at δ 1e-05 (rdp), z 1.1, C 0.3" in lines
    assert "dp cap   max 4/4 flushes per device (100%), 1 at cap" in lines
    assert lines[lines.index("k:dev    10 devices: p50 2, p90 3, mean 2.0") + 1] == (
        "         1:4 2:3 3:2 4:1"
    )
    assert "privacy  ε 3.21" in snapshot_text(snap)


def test_no_participation_yet_is_said_so() -> None:
    fresh = dataclasses.replace(
        PRIVACY, epsilon=0.0, participation_max=0, devices=0, participation_histogram={}
    )
    view = privacy_view(server(fresh))
    assert view is not None
    assert (view.p50, view.p90, view.mean, view.at_cap) == (None, None, None, 0)
    model = FleetModel(FLEET)
    model.apply(ServerStateSeen(server(fresh)), now=100.0)
    assert "k:dev    no participations yet" in aggregator_lines(model.snapshot(101.0).aggregator)


def test_no_privacy_view_while_dp_is_off() -> None:
    model = FleetModel(FLEET)
    model.apply(ServerStateSeen(server(None)), now=100.0)
    snap = model.snapshot(101.0)
    assert snap.aggregator.privacy is None
    assert snap.to_json()["aggregator"]["privacy"] is None
    assert not any(line.startswith("privacy") for line in aggregator_lines(snap.aggregator))
    assert "ε=" not in summarize(ServerStateSeen(server(None)), b"")


def test_a_newer_server_state_replaces_the_privacy_figures() -> None:
    model = FleetModel(FLEET)
    model.apply(ServerStateSeen(server(PRIVACY)), now=100.0)
    later = dataclasses.replace(server(dataclasses.replace(PRIVACY, epsilon=5.5)), at=3.0)
    model.apply(ServerStateSeen(later), now=101.0)
    view = model.snapshot(102.0).aggregator.privacy
    assert view is not None
    assert view.epsilon == 5.5


def test_topic_log_line_names_epsilon_and_the_cap() -> None:
    assert "ε=3.21@δ=1e-05 dp_max=4/4" in summarize(ServerStateSeen(server(PRIVACY)), b"")


@pytest.mark.parametrize(
    ("histogram", "bins", "expected"),
    [
        ({}, 8, []),
        ({2: 3, 1: 4, 5: 0}, 8, [(1, 1, 4), (2, 2, 3)]),
        # 10 distinct counts 1..10 into 3 ranges of width 4: 1-4, 5-8, 9-10
        ({k: 1 for k in range(1, 11)}, 3, [(1, 4, 4), (5, 8, 4), (9, 10, 2)]),
        # ranges start at the smallest count; an empty range is left out
        ({3: 2, 4: 1, 5: 1, 40: 7}, 2, [(3, 21, 4), (22, 40, 7)]),
        ({3: 2, 4: 1, 5: 1, 40: 7}, 3, [(3, 15, 4), (29, 40, 7)]),
    ],
)
def test_compact_histogram(
    histogram: dict[int, int], bins: int, expected: list[tuple[int, int, int]]
) -> None:
    assert compact_histogram(histogram, bins) == expected


def test_compact_histogram_needs_a_bin() -> None:
    with pytest.raises(ValueError, match="bins"):
        compact_histogram({1: 1}, 0)
