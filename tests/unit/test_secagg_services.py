"""The secure-aggregation services' message handling without a broker (``handle`` on an
in-process MemoryBroker transport): what the leader refuses before its role (signatures, the
replay rule, staleness), what the helper refuses, and what is counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefl.aggregator import AggregatorConfig, NormBoundSetting
from edgefl.aggregator.secagg_config import SecAggSettings
from edgefl.aggregator.secagg_helper import HelperService, helper_state_path
from edgefl.aggregator.secagg_leader import LeaderService, leader_state_path
from edgefl.aggregator.secagg_store import HelperStore, LeaderStore
from edgefl.errors import RejectReason, UpdateRejected
from edgefl.participation import ParticipationConfig
from edgefl.protocol.envelope import decode_envelope
from edgefl.protocol.messages import SecAggCoord, ServerMetrics, decode_message, encode_message
from edgefl.protocol.topics import (
    secagg_decision_topic,
    secagg_report_topic,
    secagg_seed_topic,
    secagg_share_topic,
    server_metrics_topic,
)
from edgefl.secagg import HelperConfig, HelperKeys, SecAggHelper, SecAggReason, SeedReport
from edgefl.secagg.wire import (
    ShareEnvelopes,
    UpdateMeta,
    build_share_envelopes,
    coord_partial,
    coord_refusal,
    coord_report,
    decision_from_coord,
)
from edgefl.security import (
    Ed25519Signer,
    generate_private_key,
    load_update_authenticator,
    write_public_key,
)
from edgefl.transport import InboundMessage, MemoryBroker, MemoryTransport

FLEET, MODEL = "svc", "digits-mlp"
KEYS = HelperKeys.generate()
SETTINGS = SecAggSettings(helper_key=Path("unused"))


def _config(state_dir: Path, keys_dir: Path | None = None, **fields: Any) -> AggregatorConfig:
    config = AggregatorConfig.build(
        broker_url="mqtt://127.0.0.1:1",
        fleet=FLEET,
        model=MODEL,
        state_dir=state_dir,
        buffer_size=3,
        norm_bound=NormBoundSetting.OFF,
        fsync=False,
        authenticator=None if keys_dir is None else load_update_authenticator(keys_dir),
    )
    return config.replace(**fields)


def _shares(
    device: str, seq: int, *, base: int = 0, signer: Ed25519Signer | None = None
) -> ShareEnvelopes:
    delta = np.full(2410, 0.001, np.float32)
    meta = UpdateMeta(FLEET, device, seq, base, 10, MODEL, time.time())
    return build_share_envelopes(
        delta,
        meta,
        SETTINGS.ring(3),
        KEYS.public_key,
        rng=np.random.default_rng(seq),
        signer=signer,
    )


@pytest.fixture
async def transport() -> AsyncIterator[MemoryTransport]:
    async with MemoryTransport(MemoryBroker(), "svc") as t:
        yield t


@contextlib.asynccontextmanager
async def _observed(topic: str) -> AsyncIterator[tuple[MemoryTransport, MemoryTransport]]:
    """A leader's transport, and an observer subscribed to ``topic``, on one memory broker."""
    broker = MemoryBroker()
    async with (
        MemoryTransport(broker, "leader") as transport,
        MemoryTransport(broker, "obs") as obs,
    ):
        await obs.subscribe(topic)
        yield transport, obs


def _leader(
    tmp_path: Path, transport: MemoryTransport, keys_dir: Path | None = None, **fields: Any
) -> LeaderService:
    config = _config(tmp_path / "leader", keys_dir, **fields)
    service = LeaderService(config, SETTINGS, KEYS.public_key)
    service._restore(LeaderStore(leader_state_path(tmp_path / "leader"), fsync=False))
    service._transport = transport
    return service


def _helper(
    tmp_path: Path, transport: MemoryTransport, keys_dir: Path | None = None
) -> HelperService:
    service = HelperService(_config(tmp_path / "helper", keys_dir), SETTINGS, KEYS)
    service._store = HelperStore(helper_state_path(tmp_path / "helper"), fsync=False)
    service._transport = transport
    return service


def _share(device: str, seq: int, built: ShareEnvelopes) -> InboundMessage:
    return InboundMessage(secagg_share_topic(FLEET, device, seq), built.share)


def _seed(device: str, seq: int, built: ShareEnvelopes) -> InboundMessage:
    return InboundMessage(secagg_seed_topic(FLEET, device, seq), built.seed)


async def test_with_device_keys_only_shares_signed_by_their_device_count(
    tmp_path: Path, transport: MemoryTransport
) -> None:
    # Arrange: d0 has a registered key; d1 has none; a stranger signs as d0
    keys_dir = tmp_path / "device-keys"
    keys_dir.mkdir()
    d0, stranger = generate_private_key(), generate_private_key()
    write_public_key(keys_dir / "d0.pub", d0.public_key())
    leader = _leader(tmp_path, transport, keys_dir)
    helper = _helper(tmp_path, transport, keys_dir)
    good = _shares("d0", 1, signer=Ed25519Signer(d0))
    forged = _shares("d0", 2, signer=Ed25519Signer(stranger))
    unknown = _shares("d1", 1, signer=Ed25519Signer(stranger))

    # Act
    await leader.handle(_share("d0", 1, good))
    await leader.handle(_share("d0", 2, forged))
    await leader.handle(_share("d1", 1, unknown))
    await helper.handle(_seed("d0", 1, good))
    reasons = []
    for msg in (_seed("d0", 2, forged), _seed("d1", 1, unknown)):
        with pytest.raises(UpdateRejected) as info:
            await helper.handle(msg)
        reasons.append(info.value.reason)

    # Assert
    stats = leader.statistics()
    assert (stats["accepted"], stats["bad_signature"], stats["unknown_device"]) == (1, 1, 1)
    assert reasons == [RejectReason.BAD_SIGNATURE, RejectReason.UNKNOWN_DEVICE]
    assert helper.helper.statistics()["accepted"] == 1


async def test_the_leader_refuses_replays_and_stale_or_future_updates(
    tmp_path: Path, transport: MemoryTransport
) -> None:
    # Arrange
    leader = _leader(tmp_path, transport)
    first, old = _shares("d0", 5), _shares("d0", 4)
    future = _shares("d0", 6, base=1)

    # Act
    await leader.handle(_share("d0", 5, first))
    await leader.handle(_share("d0", 5, first))  # a redelivery: the role's duplicate
    await leader.handle(_share("d0", 4, old))  # below the device's highest: a replay
    await leader.handle(_share("d0", 6, future))  # trained on a version not published yet

    # Assert
    stats = leader.statistics()
    assert stats["accepted"] == 1
    assert stats["secagg_duplicate"] == 1
    assert stats["replay"] == 1
    assert stats["future_version"] == 1
    # durable: a restart knows the device's highest seq and the refusals
    store = LeaderStore(leader_state_path(tmp_path / "leader"), fsync=False)
    assert store.max_seqs() == {"d0": 5}
    assert store.refused() == {"replay": 1, "future_version": 1}


async def test_the_leader_flushes_a_partly_filled_buffer_after_flush_after(
    tmp_path: Path, transport: MemoryTransport
) -> None:
    # Arrange: K = 3, flush after 30 s; two complete updates
    flush = ParticipationConfig(flush_after_s=30.0)
    leader = _leader(tmp_path, transport, participation=flush)
    helper = await _two_updates(leader)
    arrived = min(p.arrived for p in leader.leader.snapshot().pending)

    # Act / Assert: not before 30 s, then a decision of the two
    await leader.tick(arrived + 29.0)
    assert leader.leader.open_decision is None
    await leader.tick(arrived + 30.0)
    decision = leader.leader.open_decision
    assert decision is not None
    assert set(decision.members) == {("d0", 1), ("d1", 1)}
    # the helper answers it, the leader steps: version 1 from two updates
    partial = helper.apply(decision)
    msg = encode_message(coord_partial(FLEET, partial, 0.0), partial.total)
    await leader.handle(InboundMessage(secagg_report_topic(FLEET), msg))
    assert leader.version == 1
    assert leader.statistics()["combined"] == 2


def _report(report: SeedReport) -> bytes:
    return encode_message(coord_report(FLEET, report, 0.0))


async def _two_updates(leader: LeaderService) -> SecAggHelper:
    """Devices d0 and d1 send update 1: each share to the leader, each seed to a helper (K = 3)
    whose report reaches the leader. Returns the helper."""
    helper = SecAggHelper(HelperConfig(SETTINGS.ring(3), 2410, FLEET, MODEL), KEYS)
    for i in range(2):
        built = _shares(f"d{i}", 1)
        await leader.handle(_share(f"d{i}", 1, built))
        sealed = bytes(decode_envelope(built.seed, max_payload=1024).payload)
        report = helper.receive_sealed((f"d{i}", 1), sealed, 0.0)
        assert report is not None
        await leader.handle(InboundMessage(secagg_report_topic(FLEET), _report(report)))
    return helper


async def test_an_unanswered_decision_is_published_again(tmp_path: Path) -> None:
    # Arrange: a leader whose decision went out; an observer of the decision topic
    async with _observed(secagg_decision_topic(FLEET)) as (transport, obs):
        flush = ParticipationConfig(flush_after_s=1.0)
        leader = _leader(tmp_path, transport, participation=flush)
        await _two_updates(leader)
        await leader.tick(time.time() + 2.0)  # flushed: the decision is published

        # Act: no partial came; 30 s later the tick publishes it again
        await leader.tick(time.time() + 3.0)
        leader._announced.decision_at -= 30.0
        await leader.tick(time.time() + 4.0)

        # Assert
        got = []
        async with asyncio.timeout(2):
            async for message in obs.messages():
                got.append(decode_message(message.payload, SecAggCoord))
                if len(got) == 2:
                    break
    assert decision_from_coord(got[0]) == decision_from_coord(got[1])
    assert got[0].buffer_id == 0


async def test_a_refusal_without_missing_seeds_excludes_the_buffer_instead_of_looping(
    tmp_path: Path, transport: MemoryTransport
) -> None:
    # Arrange: a flushed decision of two updates
    leader = _leader(tmp_path, transport, participation=ParticipationConfig(flush_after_s=1.0))
    await _two_updates(leader)
    await leader.tick(time.time() + 2.0)
    assert leader.leader.open_decision is not None

    # Act: a helper with min_members = 3 refuses it
    refusal = coord_refusal(FLEET, 0, SecAggReason.BAD_DECISION, 0.0)
    await leader.handle(InboundMessage(secagg_report_topic(FLEET), encode_message(refusal)))

    # Assert: no new decision of the same members; both excluded, counted
    stats = leader.statistics()
    assert leader.leader.open_decision is None
    assert (stats["complete"], stats["pending"]) == (0, 0)
    assert stats["secagg_bad_decision"] == 1
    assert stats["secagg_missing_helper_share"] == 2


async def test_the_leader_publishes_metrics(tmp_path: Path) -> None:
    async with _observed(server_metrics_topic(FLEET)) as (transport, obs):
        leader = _leader(tmp_path, transport, metrics_interval_s=0.01)
        await leader.handle(_share("d0", 1, _shares("d0", 1)))
        await leader.handle(_share("d0", 0, _shares("d0", 0)))  # a replay
        await asyncio.sleep(0.02)
        await leader.tick(time.time())
        async with asyncio.timeout(2):
            message = await anext(aiter(obs.messages()))
    metrics = decode_message(message.payload, ServerMetrics)
    assert (metrics.received, metrics.applied, metrics.version) == (2, 0, 0)
    assert metrics.rejected == {"replay": 1}
    assert metrics.extra["secagg_pending"] == 1
