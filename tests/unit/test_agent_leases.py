"""The device agent under a leasing aggregator (protocol 1.2, PROTOCOL.md §4.7) on the in-process
MemoryBroker: check in, wait for a slot, train once per lease with the lease id in the update,
withdraw when ineligible or stopping, abort when the lease runs out, verify signed leases.

The test plays the aggregator's side of the protocol (its retained server state, and leases on
the device's lease topic); the agent, the protocol, the spool, the probes and torch training are
the real parts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path

import agent_helpers
from agent_helpers import (
    DEVICE,
    FLEET,
    MODEL,
    SPEC,
    GateTrainer,
    make_config,
    publish_model,
    server_state,
    signed_config,
)
from waiting import eventually

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig, ReceiptMode, SpoolConfig
from device_agent.release import model_release
from device_agent.trainer import Trainer
from edgefl.models.spec import init_weights_numpy
from edgefl.protocol.envelope import EnvelopeKind
from edgefl.protocol.messages import (
    FEATURE_LEASES,
    CheckIn,
    DeviceState,
    Lease,
    Participation,
    ServerStatus,
    decode_message,
    decode_update,
    encode_message,
)
from edgefl.protocol.topics import (
    checkin_topic,
    device_state_topic,
    lease_topic,
    server_state_topic,
)
from edgefl.security import (
    Ed25519ManifestVerifier,
    Ed25519Signer,
)
from edgefl.transport import InboundMessage, MemoryBroker
from firmware_sim.fake_sysfs import write_fake_sysfs

SETTINGS = Participation(concurrency=2, lease_s=60.0, checkin_ttl_s=120.0)


def leasing_broker(*, leases: bool = True) -> MemoryBroker:
    """A broker holding model v0 and the aggregator's retained server state, with or without
    the leases feature."""
    broker = MemoryBroker()
    features = (FEATURE_LEASES,) if leases else ()
    state = server_state(features, SETTINGS if leases else None)
    broker.publish(server_state_topic(FLEET), encode_message(state), 1, True)
    publish_model(broker, 0)
    return broker


def running(
    broker: MemoryBroker, config: AgentConfig, trainer: Trainer | None = None
) -> contextlib.AbstractAsyncContextManager[tuple[DeviceAgent, list[InboundMessage]]]:
    """A running agent, and what an observer sees on the device's topics (until it stopped)."""
    devices = f"edgefl/v1/{FLEET}/device/{DEVICE}/#"
    return agent_helpers.running(broker, config, devices, trainer=trainer)


def lease_envelope(
    lease_id: int, version: int = 0, ttl_s: float = 60.0, device: str = DEVICE
) -> bytes:
    lease = Lease(
        fleet=FLEET,
        device_id=device,
        at=time.time(),
        lease_id=lease_id,
        ttl_s=ttl_s,
        version=version,
    )
    return encode_message(lease)


def grant(broker: MemoryBroker, lease_id: int, version: int = 0, ttl_s: float = 60.0) -> None:
    broker.publish(lease_topic(FLEET, DEVICE), lease_envelope(lease_id, version, ttl_s), 1, False)


CHECKINS, UPDATES = checkin_topic(FLEET, DEVICE), f"device/{DEVICE}/update/"


def on(seen: list[InboundMessage], part: str) -> list[InboundMessage]:
    """The messages of ``seen`` whose topic contains ``part``."""
    return [m for m in seen if part in m.topic]


async def unplug_while_training(
    broker: MemoryBroker,
    agent: DeviceAgent,
    trainer: GateTrainer,
    seen: list[InboundMessage],
    fs: Path,
) -> None:
    """Check in, train under lease 3 (held in the gate), then unplug: the agent withdraws."""
    await eventually(lambda: len(on(seen, CHECKINS)) == 1)
    grant(broker, 3)
    await eventually(trainer.entered.is_set)
    write_fake_sysfs(fs, mains=False)
    agent.check_now()
    await eventually(lambda: len(on(seen, CHECKINS)) == 2)


def check_ins(seen: list[InboundMessage]) -> list[CheckIn]:
    return [decode_message(m.payload, CheckIn) for m in seen]


def device_state(broker: MemoryBroker) -> DeviceState:
    return decode_message(broker.retained()[device_state_topic(FLEET, DEVICE)], DeviceState)


async def test_checks_in_waits_for_a_slot_and_trains_once_per_lease(tmp_path: Path) -> None:
    broker = leasing_broker()
    async with running(broker, make_config(tmp_path)) as (agent, seen):
        # Act 1: the agent checks in and waits; it does not train without a lease
        await eventually(lambda: len(on(seen, CHECKINS)) == 1)
        await eventually(lambda: device_state(broker).waiting_for_slot is True)
        await asyncio.sleep(0.5)
        assert agent.statistics().training.started == 0
        assert "slot" in agent._status_line()  # systemd's status says so too
        # Act 2: two leases on the same version, one after the other
        grant(broker, 5)
        await eventually(lambda: agent.statistics().updates_sent == 1)
        await eventually(lambda: len(on(seen, CHECKINS)) == 2)  # again after the training
        grant(broker, 6)
        await eventually(lambda: agent.statistics().updates_sent == 2)
        await eventually(lambda: len(on(seen, CHECKINS)) == 3)

    # Assert
    sent = check_ins(on(seen, CHECKINS))
    assert [(c.available, c.model_version) for c in sent] == [(True, 0)] * 3 + [(False, 0)]
    (h1, body1), (h2, body2) = (decode_update(m.payload) for m in on(seen, UPDATES))
    assert [(h.seq, h.base_version, h.lease_id) for h in (h1, h2)] == [(0, 0, 5), (1, 0, 6)]
    assert bytes(body1) != bytes(body2)  # two leases, two seeds: two different trainings
    stats = agent.statistics()
    assert stats.training.completed == 2
    assert stats.participation.leases_received == 2
    assert stats.participation.withdrawals == 1  # at the stop


async def test_without_the_leases_feature_the_agent_trains_per_version_and_never_checks_in(
    tmp_path: Path,
) -> None:
    broker = leasing_broker(leases=False)  # a protocol 1.1 aggregator
    async with running(broker, make_config(tmp_path)) as (agent, seen):
        await eventually(lambda: agent.statistics().updates_sent == 1)
    assert on(seen, CHECKINS) == []
    assert agent.statistics().participation.leases is False
    assert device_state(broker).waiting_for_slot is None


async def test_a_lease_for_a_newer_version_waits_for_that_model(tmp_path: Path) -> None:
    broker = leasing_broker()
    async with running(broker, make_config(tmp_path)) as (agent, seen):
        await eventually(lambda: agent.statistics().participation.check_ins == 1)
        # Act: a lease for v1 while the device holds v0
        grant(broker, 9, version=1)
        await eventually(lambda: agent.statistics().participation.lease_id == 9)
        await asyncio.sleep(0.5)
        assert agent.statistics().training.started == 0
        publish_model(broker, 1, seed=1)
        await eventually(lambda: agent.statistics().updates_sent == 1)
    header, _ = decode_update(on(seen, UPDATES)[0].payload)
    assert (header.base_version, header.lease_id) == (1, 9)


async def test_ineligible_withdraws_and_aborts_the_training_under_the_lease(
    tmp_path: Path,
) -> None:
    # Arrange: training under lease 3, held in the gate
    broker, trainer = leasing_broker(), GateTrainer()
    async with running(broker, make_config(tmp_path), trainer) as (agent, seen):
        # Act: unplugged mid-training
        await unplug_while_training(broker, agent, trainer, seen, tmp_path / "fs")
        await eventually(lambda: agent.statistics().training.aborted.get("ineligible") == 1, 10)
        # ... and a lease the aggregator granted before it saw the withdrawal (which released
        # it) comes late: an update under it would be refused, so it is not taken
        grant(broker, 8)
        await eventually(lambda: agent.statistics().participation.leases_ignored != {})
        await asyncio.sleep(0.3)
        stats = agent.statistics()
    # Assert: one check-in, one withdrawal, nothing after (idle and ineligible: nothing to say)
    assert [c.available for c in check_ins(on(seen, CHECKINS))] == [True, False]
    assert stats.updates_sent == 0
    assert stats.participation.presence == "idle"
    assert stats.participation.leases_ignored == {"withdrawn": 1}
    assert stats.participation.lease_id is None
    assert device_state(broker).waiting_for_slot is False


async def test_a_training_that_outlives_its_lease_is_aborted_and_the_device_checks_in_again(
    tmp_path: Path,
) -> None:
    # Arrange: the gate stays closed, so the training would run for ever
    broker, trainer = leasing_broker(), GateTrainer()
    async with running(broker, make_config(tmp_path), trainer) as (agent, seen):
        await eventually(lambda: len(on(seen, CHECKINS)) == 1)
        # Act: a one-second lease
        grant(broker, 4, ttl_s=1.0)
        await eventually(lambda: agent.statistics().training.aborted.get("lease_expired") == 1)
        await eventually(lambda: len(on(seen, CHECKINS)) == 2)
    assert on(seen, UPDATES) == []
    assert [c.available for c in check_ins(on(seen, CHECKINS))] == [True, True, False]


async def test_leases_must_be_signed_by_the_aggregator_and_check_ins_are_signed(
    tmp_path: Path,
) -> None:
    # Arrange: key pairs; the model is signed by the aggregator
    cfg, keys = signed_config(tmp_path)
    aggregator_key, device_key, stranger_key = keys.aggregator, keys.device, keys.stranger
    broker = leasing_broker()
    signed = model_release(
        FLEET, 1, MODEL, init_weights_numpy(SPEC, 0), signer=Ed25519Signer(aggregator_key)
    )
    for topic, payload in signed.messages:
        broker.publish(topic, payload, 1, True)
    topic = lease_topic(FLEET, DEVICE)
    async with running(broker, cfg) as (agent, seen):
        await eventually(lambda: len(on(seen, CHECKINS)) == 1)
        # Act: an unsigned and a forged lease, then a genuine one
        broker.publish(topic, lease_envelope(1), 1, False)
        broker.publish(topic, Ed25519Signer(stranger_key).sign(lease_envelope(2)), 1, False)
        await eventually(lambda: agent.statistics().rejected.get("bad_signature") == 2)
        assert agent.statistics().training.started == 0
        broker.publish(topic, Ed25519Signer(aggregator_key).sign(lease_envelope(3)), 1, False)
        await eventually(lambda: agent.statistics().updates_sent == 1)
    # Assert: the update is under lease 3; the check-ins carry the device's signature
    header, _ = decode_update(on(seen, UPDATES)[0].payload)
    assert header.lease_id == 3
    device_verifier = Ed25519ManifestVerifier(
        [device_key.public_key()], kinds=(EnvelopeKind.CHECKIN,)
    )
    for message in on(seen, CHECKINS):
        device_verifier.verify(message.payload)  # raises unless signed by the device key


async def test_a_lease_naming_another_device_is_refused(tmp_path: Path) -> None:
    broker = leasing_broker()
    async with running(broker, make_config(tmp_path)) as (agent, _):
        await eventually(lambda: agent.statistics().participation.check_ins == 1)
        # Act: on this device's topic, but the header names another device
        broker.publish(lease_topic(FLEET, DEVICE), lease_envelope(1, device="pi-2"), 1, False)
        await eventually(lambda: sum(agent.statistics().rejected.values()) == 1)
        await asyncio.sleep(0.3)
        stats = agent.statistics()
    assert stats.training.started == 0
    assert stats.participation.leases_received == 0


async def test_a_waiting_device_fetches_a_new_model_only_when_a_lease_asks_for_it(
    tmp_path: Path,
) -> None:
    broker = leasing_broker()
    async with running(broker, make_config(tmp_path)) as (agent, seen):
        await eventually(lambda: agent.statistics().participation.check_ins == 1)
        # Act 1: v1 is published while the device waits for a slot: it keeps v0
        publish_model(broker, 1, seed=1)
        await asyncio.sleep(0.5)
        waiting = agent.statistics()
        # Act 2: a lease for v1
        grant(broker, 2, version=1)
        await eventually(lambda: agent.statistics().updates_sent == 1)
    # Assert
    assert (waiting.model_version, waiting.manifests_accepted) == (0, 1)
    assert agent.statistics().model_version == 1
    header, _ = decode_update(on(seen, UPDATES)[0].payload)
    assert (header.base_version, header.lease_id) == (1, 2)


async def test_a_restarted_agent_remembers_that_the_aggregator_requires_leases(
    tmp_path: Path,
) -> None:
    # Arrange: a first run fetched v0 and checked in, but got no lease
    config = make_config(tmp_path)
    async with running(leasing_broker(), config) as (agent, _):
        await eventually(lambda: agent.statistics().participation.check_ins == 1)
    # Act: restarted where the aggregator's retained state has not arrived (yet): only v0
    broker = MemoryBroker()
    publish_model(broker, 0)
    async with running(broker, config) as (agent, seen):
        await eventually(lambda: agent.statistics().connections == 1)
        await asyncio.sleep(1.0)
        stats = agent.statistics()
    # Assert: it holds v0, never trained on it, and still waits for a lease
    assert stats.model_version == 0
    assert stats.training.started == 0
    assert stats.participation.leases is True
    assert on(seen, UPDATES) == []


async def test_a_waiting_device_checks_in_afresh_with_a_restarted_aggregator(
    tmp_path: Path,
) -> None:
    broker = leasing_broker()
    async with running(broker, make_config(tmp_path)) as (agent, seen):
        await eventually(lambda: len(on(seen, CHECKINS)) == 1)
        # Act: the aggregator dies (its Last Will: lost, without the participation settings);
        # the device keeps waiting for a lease, it does not fall back to training per version
        will = server_state((FEATURE_LEASES,), None)
        will = dataclasses.replace(will, status=ServerStatus.LOST)
        broker.publish(server_state_topic(FLEET), encode_message(will), 1, True)
        await asyncio.sleep(0.5)
        during_outage = agent.statistics()
        # ... and comes back (a new session): its check-ins were in memory, and a lease it
        # granted just before it died may never have been published
        state = server_state((FEATURE_LEASES,), SETTINGS, session=2)
        broker.publish(server_state_topic(FLEET), encode_message(state), 1, True)
        await eventually(lambda: len(on(seen, CHECKINS)) == 3)
        # ... and the same session again (a republished state) changes nothing
        broker.publish(server_state_topic(FLEET), encode_message(state), 1, True)
        await asyncio.sleep(0.3)
    # Assert: withdraw (releases such a lease), check in again; then the stop's withdrawal
    assert [c.available for c in check_ins(on(seen, CHECKINS))] == [True, False, True, False]
    assert during_outage.participation.leases is True
    assert during_outage.training.started == 0


async def test_with_an_update_on_its_way_a_restarted_aggregator_gets_a_check_in_only(
    tmp_path: Path,
) -> None:
    # Arrange: receipts on, and no aggregator here to send one: the update stays pending, and
    # the aggregator holds lease 5 for it
    config = dataclasses.replace(
        make_config(tmp_path), spool=SpoolConfig(receipts=ReceiptMode.ON, receipt_timeout_s=60)
    )
    broker = leasing_broker()
    async with running(broker, config) as (agent, seen):
        await eventually(lambda: len(on(seen, CHECKINS)) == 1)
        grant(broker, 5)
        await eventually(lambda: agent.statistics().delivery.awaiting_receipt == 1)
        await eventually(lambda: len(on(seen, CHECKINS)) == 2)
        # Act: the aggregator restarted
        state = server_state((FEATURE_LEASES,), SETTINGS, session=2)
        broker.publish(server_state_topic(FLEET), encode_message(state), 1, True)
        await eventually(lambda: len(on(seen, CHECKINS)) == 3)
        await asyncio.sleep(0.3)
    # Assert: checked in again, no withdrawal (it would release lease 5 before its update)
    assert [c.available for c in check_ins(on(seen, CHECKINS))] == [True, True, True, False]


async def test_an_update_finished_after_the_withdrawal_released_its_lease_is_dropped(
    tmp_path: Path,
) -> None:
    # Arrange: a training thread that cannot poll should_stop while it waits
    broker, trainer = leasing_broker(), GateTrainer(polls=False)
    async with running(broker, make_config(tmp_path), trainer) as (agent, seen):
        # Act: unplugged (the withdrawal releases lease 3), then the training returns anyway
        await unplug_while_training(broker, agent, trainer, seen, tmp_path / "fs")
        trainer.gate.set()
        await eventually(lambda: agent.statistics().training.aborted.get("ineligible") == 1)
        await asyncio.sleep(0.3)
        stats = agent.statistics()
    # Assert: nothing spooled or sent for it (the aggregator would refuse it: no_lease)
    assert on(seen, UPDATES) == []
    assert (stats.training.completed, stats.spool_depth) == (0, 0)


async def test_a_new_agent_waits_for_the_aggregators_state_before_it_trains(
    tmp_path: Path,
) -> None:
    # Arrange: the aggregator's first manifest is there, its retained state not yet
    broker = MemoryBroker()
    publish_model(broker, 0)
    async with running(broker, make_config(tmp_path)) as (agent, seen):
        await eventually(lambda: agent.statistics().model_version == 0)
        # Act: the state (leases) comes half a second later
        await asyncio.sleep(0.5)
        state = server_state((FEATURE_LEASES,), SETTINGS)
        broker.publish(server_state_topic(FLEET), encode_message(state), 1, True)
        await eventually(lambda: len(on(seen, CHECKINS)) == 1)
        stats = agent.statistics()
    # Assert: it checked in instead of training an update the aggregator would refuse
    assert stats.training.started == 0
    assert on(seen, UPDATES) == []


async def test_a_device_whose_local_dp_budget_is_spent_stops_checking_in(
    tmp_path: Path,
) -> None:
    # Arrange: local DP with room for exactly one update (Laplace, epsilon 1, budget 1)
    from device_agent.config import PrivacyConfig

    cfg = dataclasses.replace(
        make_config(tmp_path), privacy=PrivacyConfig(dp="local:laplace,eps=1,C=1,budget=1")
    )
    broker = leasing_broker()
    async with running(broker, cfg) as (agent, seen):
        # Act: one lease is used; the budget is spent; a second lease comes all the same
        await eventually(lambda: len(on(seen, CHECKINS)) == 1)
        grant(broker, 5)
        await eventually(lambda: agent.statistics().updates_sent == 1)
        await eventually(lambda: device_state(broker).local_budget_exhausted is True)
        grant(broker, 6)
        await eventually(lambda: _leases_seen(agent) == 2)

    # Assert: it checked in as available only before its one update, then withdrew; the
    # second lease trained nothing
    sent = check_ins(on(seen, CHECKINS))
    assert [c.available for c in sent] == [True, False]
    stats = agent.statistics()
    assert (stats.training.started, len(on(seen, UPDATES))) == (1, 1)
    assert "privacy_budget_spent" in device_state(broker).reasons


def _leases_seen(agent: DeviceAgent) -> int:
    p = agent.statistics().participation
    return p.leases_received + sum(p.leases_ignored.values())
