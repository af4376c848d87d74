"""The monitor's fleet model: presence (session) rule, lost by Will and by staleness, cleared
retained messages, server state and metrics, updates seen, snapshot JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
import samples

from edgefl.errors import RejectReason
from edgefl.monitor.decode import (
    Cleared,
    DeviceStateSeen,
    ManifestSeen,
    MetricsSeen,
    ModelChunkSeen,
    ServerStateSeen,
    StateEncoding,
    Undecodable,
    UpdateSeen,
    decode_inbound,
)
from edgefl.monitor.model import FleetModel, FleetModelConfig
from edgefl.monitor.snapshot import LostReason
from edgefl.protocol.chunking import split_message
from edgefl.protocol.envelope import EnvelopeKind
from edgefl.protocol.messages import (
    DeviceState,
    ModelManifest,
    ServerMetrics,
    ServerState,
    UpdateHeader,
    encode_message,
)
from edgefl.protocol.topics import (
    DeviceStateTopic,
    ModelArtifact,
    device_state_topic,
    model_chunk_topic,
    update_topic,
)

FLEET = "lab"


def state(device: str, status: str, session: int, at: float = 1000.0, **kw: Any) -> DeviceState:
    return DeviceState(FLEET, device, status, session, at, **kw)  # type: ignore[arg-type]


def seen(s: DeviceState) -> DeviceStateSeen:
    return DeviceStateSeen(s, StateEncoding.ENVELOPE)


def manifest(version: int, created_at: float = 900.0) -> ModelManifest:
    return samples.fp32_manifest(10, fleet=FLEET, version=version, created_at=created_at)


def server(session: int, version: int, fill: int, at: float, **kw: Any) -> ServerState:
    return ServerState(
        fleet=FLEET,
        status=kw.pop("status", "online"),  # type: ignore[arg-type]
        session=session,
        version=version,
        buffer_fill=fill,
        buffer_size=5,
        applied=kw.pop("applied", 0),
        started_at=0.0,
        at=at,
        **kw,
    )


def metrics(version: int, at: float, accuracy: float | None = None, **kw: Any) -> ServerMetrics:
    return ServerMetrics(
        fleet=FLEET,
        at=at,
        version=version,
        buffer_fill=kw.pop("buffer_fill", 1),
        buffer_size=5,
        accuracy=accuracy,
        **kw,
    )


def model(stale_after: float | None = 60.0) -> FleetModel:
    return FleetModel(FLEET, FleetModelConfig(stale_after=stale_after))


# -- presence rule -----------------------------------------------------------------------------


def test_late_will_of_an_old_session_does_not_override_the_newer_state() -> None:
    m = model()
    m.apply(seen(state("pi", "online", 2, at=1000.0)), now=1000.0)
    m.apply(seen(state("pi", "lost", 1, at=990.0)), now=1001.0)  # old connection's Will

    d = m.snapshot(1002.0).device("pi")
    assert d is not None
    assert (d.status, d.session, d.lost_reason) == ("online", 2, None)
    assert m.snapshot(1002.0).monitor.superseded_states == 1


def test_equal_session_applies_in_arrival_order_and_a_will_turns_lost() -> None:
    m = model()
    m.apply(seen(state("pi", "training", 3)), now=1000.0)
    m.apply(seen(state("pi", "lost", 3)), now=1001.0)

    d = m.snapshot(1002.0).device("pi")
    assert d is not None
    assert (d.status, d.reported_status, d.lost_reason) == ("lost", "lost", LostReason.WILL)


def test_newer_session_replaces_a_lost_device() -> None:
    m = model()
    m.apply(seen(state("pi", "lost", 1)), now=1000.0)
    m.apply(seen(state("pi", "idle", 2, reasons=("on_battery",))), now=1001.0)

    d = m.snapshot(1001.0).device("pi")
    assert d is not None
    assert (d.status, d.reasons) == ("idle", ("on_battery",))


def test_session_memory_survives_clearing_the_retained_state() -> None:
    m = model()
    m.apply(seen(state("pi", "online", 5)), now=1000.0)
    m.apply(Cleared(DeviceStateTopic(FLEET, "pi")), now=1001.0)
    assert m.snapshot(1001.0).devices == ()

    m.apply(seen(state("pi", "lost", 4)), now=1002.0)  # a late Will after the clear
    assert m.snapshot(1002.0).devices == ()


# -- staleness ---------------------------------------------------------------------------------


def test_connected_device_without_sign_of_life_turns_lost_stale() -> None:
    m = model(stale_after=60.0)
    m.apply(seen(state("pi", "idle", 1, at=1000.0)), now=1000.0)

    assert m.snapshot(1060.0).device("pi").status == "idle"  # type: ignore[union-attr]
    d = m.snapshot(1061.0).device("pi")
    assert d is not None
    assert (d.status, d.reported_status, d.lost_reason) == ("lost", "idle", LostReason.STALE)
    assert d.last_seen_age_s == pytest.approx(61.0)


def test_offline_never_turns_lost_and_stale_timeout_can_be_disabled() -> None:
    m = model(stale_after=60.0)
    m.apply(seen(state("a", "offline", 1, at=0.0)), now=1000.0)
    assert m.snapshot(5000.0).device("a").status == "offline"  # type: ignore[union-attr]

    never = model(stale_after=None)
    never.apply(seen(state("b", "training", 1, at=0.0)), now=1000.0)
    assert never.snapshot(1e6).device("b").status == "training"  # type: ignore[union-attr]


def test_retained_state_is_no_sign_of_life_but_live_messages_are() -> None:
    m = model(stale_after=60.0)
    # a retained state produced long ago, received now: stale at once
    m.apply(seen(state("pi", "online", 1, at=100.0)), now=1000.0, retained=True)
    assert m.snapshot(1000.0).device("pi").lost_reason is LostReason.STALE  # type: ignore[union-attr]
    # a live update from the device is a sign of life
    m.apply(UpdateSeen("pi", 7), now=1010.0)
    d = m.snapshot(1020.0).device("pi")
    assert d is not None
    assert (d.status, d.last_seen, d.updates_seen) == ("online", 1010.0, 1)


# -- model, server, metrics, updates -----------------------------------------------------------


def test_model_staleness_of_devices_against_the_current_manifest() -> None:
    m = model()
    m.apply(ManifestSeen(manifest(7, created_at=900.0)), now=1000.0)
    m.apply(seen(state("a", "idle", 1, model_version=5)), now=1000.0)
    m.apply(seen(state("b", "idle", 1)), now=1000.0)

    snap = m.snapshot(1000.0)
    assert snap.device("a").model_staleness == 2  # type: ignore[union-attr]
    assert snap.device("b").model_staleness is None  # type: ignore[union-attr]
    assert snap.model is not None
    assert (snap.model.version, snap.model.age_s, snap.model.chunks_seen) == (7, 100.0, 0)


def test_model_chunks_seen_count_distinct_indices_of_the_current_version() -> None:
    m = model()
    m.apply(ManifestSeen(manifest(3)), now=1000.0)
    (packet,) = split_message(b"x" * 40, kind=EnvelopeKind.MODEL_CHUNK).packets
    obs = decode_inbound(model_chunk_topic(FLEET, 3, 0), packet, fleet=FLEET, now=1000.0)
    assert isinstance(obs, ModelChunkSeen)
    assert (obs.version, obs.artifact, obs.chunk.index) == (3, ModelArtifact.WEIGHTS, 0)
    m.apply(obs, now=1000.0)
    m.apply(obs, now=1000.0)  # duplicate
    assert m.snapshot(1000.0).model.chunks_seen == 1  # type: ignore[union-attr]


def test_server_state_follows_the_session_rule_and_metrics_the_arrival_order() -> None:
    m = model()
    m.apply(ServerStateSeen(server(2, version=4, fill=3, at=1000.0, applied=23)), now=1000.0)
    m.apply(ServerStateSeen(server(1, version=9, fill=0, at=999.0, status="lost")), now=1001.0)
    agg = m.snapshot(1001.0).aggregator
    assert (agg.status, agg.session, agg.version, agg.buffer_fill) == ("online", 2, 4, 3)

    rejected = {RejectReason.STALE.value: 2}
    later = metrics(5, at=1002.0, accuracy=0.5, buffer_fill=1, rejected=rejected)
    m.apply(MetricsSeen(later), now=1002.0)
    agg = m.snapshot(1002.0).aggregator
    # metrics are newer than the server state: version, fill and rejections come from them
    assert (agg.version, agg.buffer_fill, agg.rejected, agg.accuracy) == (5, 1, rejected, 0.5)
    assert agg.status == "online"


def test_accuracy_history_keeps_one_value_per_version_and_is_bounded() -> None:
    m = FleetModel(FLEET, FleetModelConfig(accuracy_history=3))
    for version, acc in [(1, 0.1), (2, 0.2), (2, 0.25), (3, 0.3), (4, 0.4)]:
        m.apply(MetricsSeen(metrics(version, at=1000.0 + version, accuracy=acc)), now=1000.0)
    history = m.snapshot(1010.0).aggregator.accuracy_history
    assert history == ((2, 0.25), (3, 0.3), (4, 0.4))


def test_updates_are_counted_once_per_seq_and_rate_over_a_minute() -> None:
    m = model()
    m.apply(seen(state("pi", "training", 1)), now=1000.0)
    header = UpdateHeader(FLEET, "pi", 1, 0, 10, "tiny", {}, 10, 1000.0)
    big = split_message(b"y" * 2000, max_packet=1024)
    assert big.count > 1
    m.apply(UpdateSeen("pi", 1, header=header), now=1000.0)
    for packet in big.packets:  # one chunked update, seq 2
        obs = decode_inbound(update_topic(FLEET, "pi", 2), packet, fleet=FLEET, now=1001.0)
        assert isinstance(obs, UpdateSeen)
        assert obs.chunk is not None
        m.apply(obs, now=1001.0)
    m.apply(UpdateSeen("other", 1, header=header), now=1002.0)  # a device without state yet

    snap = m.snapshot(1030.0)
    assert snap.device("pi").updates_seen == 2  # type: ignore[union-attr]
    # 3 updates over the 30 s the model has been watching (the window is at most 60 s)
    assert snap.aggregator.observed_updates_per_s == pytest.approx(3 / 30)
    assert m.snapshot(1100.0).aggregator.observed_updates_per_s == 0.0


def test_cleared_manifest_and_undecodable_messages_are_counted() -> None:
    m = model()
    m.apply(ManifestSeen(manifest(1)), now=1000.0)
    m.apply(decode_inbound(f"edgefl/v1/{FLEET}/model/manifest", b"", fleet=FLEET, now=0), now=1)
    m.apply(Undecodable(RejectReason.BAD_MAGIC, "x"), now=1000.0)
    m.apply(Undecodable(RejectReason.BAD_MAGIC, "y"), now=1000.0)
    snap = m.snapshot(1000.0)
    assert snap.model is None
    assert snap.monitor.rejected == {"bad_magic": 2}
    assert snap.monitor.by_kind == {"cleared": 1, "model_manifest": 1, "undecodable": 2}


def test_snapshot_is_json_serialisable_and_counts_statuses() -> None:
    m = model(stale_after=60.0)
    topic = device_state_topic(FLEET, "a")
    payload = encode_message(state("a", "training", 1, at=990.0, local_accuracy=0.75))
    m.apply(decode_inbound(topic, payload, fleet=FLEET, now=1000.0), now=1000.0)
    m.apply(seen(state("b", "lost", 1)), now=1000.0)
    m.apply(seen(state("c", "idle", 1, at=0.0)), now=1000.0, retained=True)
    m.apply(ServerStateSeen(server(1, version=2, fill=1, at=1000.0)), now=1000.0)

    snap = m.snapshot(1000.0)
    data = json.loads(json.dumps(snap.to_json(), allow_nan=False))
    assert data["counts"] == {"lost": 2, "training": 1}
    assert [d["device_id"] for d in data["devices"]] == ["a", "b", "c"]
    assert data["devices"][0]["local_accuracy"] == 0.75
    assert data["devices"][2]["lost_reason"] == "stale"
    assert data["aggregator"]["buffer_fill"] == 1
    assert data["aggregator"]["buffer_size"] == 5
    assert data["connection"] is None


def test_aggregator_json_keeps_its_flat_keys_in_the_documented_order() -> None:
    m = model()
    m.apply(ServerStateSeen(server(1, version=2, fill=1, at=1000.0)), now=1000.0)
    m.apply(MetricsSeen(metrics(2, at=1001.0)), now=1001.0)

    agg = m.snapshot(1001.0).to_json()["aggregator"]

    assert list(agg) == [
        "status", "session", "features", "version", "buffer_fill", "buffer_size", "applied",
        "received", "rejected", "updates_per_s", "bytes_per_s", "bytes_ingested", "staleness",
        "accuracy", "accuracy_history", "started_at", "state_at", "metrics_at",
        "observed_updates_per_s", "participation", "privacy",
    ]  # fmt: skip
    assert (agg["started_at"], agg["state_at"], agg["metrics_at"]) == (0.0, 1000.0, 1001.0)
