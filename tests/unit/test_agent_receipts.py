"""The device agent with receipts (protocol 1.1) on the in-process MemoryBroker, with a fake
aggregator that publishes receipts: an update stays spooled until its receipt, is resent after
the timeout when none comes (and at once after a restart), is dropped on a rejection, and
``auto`` follows the aggregator's retained server state."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from agent_helpers import collect, factory
from receipt_helpers import (
    DEVICE,
    FLEET,
    dataset,
    receipts_config,
    spool_updates,
)
from waiting import eventually

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig, ReceiptMode, SecurityConfig
from device_agent.spool import UpdateSpool
from edgefl.protocol.messages import (
    FEATURE_RECEIPTS,
    DeviceState,
    Receipt,
    ServerState,
    ServerStatus,
    decode_message,
    encode_message,
)
from edgefl.protocol.topics import (
    device_state_topic,
    receipt_topic,
    server_state_topic,
    updates_filter,
)
from edgefl.security import (
    Ed25519Signer,
    generate_private_key,
    write_public_key,
)
from edgefl.transport import MemoryBroker

DATA = dataset()


def publish_receipt(
    broker: MemoryBroker, receipt: Receipt, signer: Ed25519Signer | None = None
) -> None:
    payload = encode_message(receipt, signer=signer)
    broker.publish(receipt_topic(FLEET, DEVICE), payload, 1, True)


def server_state(features: tuple[str, ...]) -> bytes:
    state = ServerState(
        fleet=FLEET, status=ServerStatus.ONLINE, session=1, version=0, buffer_fill=0,
        buffer_size=1, applied=0, started_at=0.0, at=0.0, features=features,
    )  # fmt: skip
    return encode_message(state)


def running_agent(cfg: AgentConfig, broker: MemoryBroker) -> tuple[DeviceAgent, asyncio.Task[None]]:
    """An agent on ``broker``, and the task running it."""
    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(broker))
    return agent, asyncio.create_task(agent.run())


def seqs_of(messages: list) -> list[int]:  # type: ignore[type-arg]
    return [int(m.topic.rsplit("/", 1)[1]) for m in messages]


async def test_update_stays_until_its_receipt_and_is_resent_after_the_timeout(
    tmp_path: Path,
) -> None:
    # Arrange: one spooled update, receipts on, a 0.2 s receipt timeout
    cfg = receipts_config(tmp_path)
    spool_updates(tmp_path, 1)
    broker = MemoryBroker()
    updates, stop_observer = await collect(broker, updates_filter(FLEET))
    agent, run = running_agent(cfg, broker)

    # Act 1: delivered to the broker, but no receipt yet
    await eventually(lambda: agent.statistics().delivery.awaiting_receipt == 1)
    assert agent.statistics().spool_depth == 1
    assert agent.statistics().updates_sent == 1
    # Act 2: no receipt comes: it is sent again
    await eventually(lambda: seqs_of(updates) == [0, 0], what="a resend after the timeout")
    assert updates[0].payload == updates[1].payload
    await eventually(lambda: agent.statistics().delivery.resends >= 1)
    # Act 3: the aggregator's receipt names it
    publish_receipt(broker, Receipt(FLEET, DEVICE, 1.0, through=0, committed=((0, 0),)))
    await eventually(lambda: agent.statistics().spool_depth == 0)
    sent_before = len(updates)
    await eventually(lambda: agent.statistics().delivery.receipted == 1)
    stats = agent.statistics()
    agent.stop()
    await run
    await stop_observer()

    # Assert: deleted from disk too, no resend once receipted, and the device state showed it
    assert stats.delivery.awaiting_receipt == 0
    assert stats.delivery.receipts is True
    assert len(updates) == sent_before
    assert list((tmp_path / "state/spool").glob("u-*")) == []
    state = decode_message(broker.retained()[device_state_topic(FLEET, DEVICE)], DeviceState)
    assert (state.spool_depth, state.awaiting_receipt) == (0, 0)


async def test_rejection_receipt_drops_the_update_and_stops_resends(tmp_path: Path) -> None:
    # Arrange: two spooled updates
    cfg = receipts_config(tmp_path)
    spool_updates(tmp_path, 2)
    broker = MemoryBroker()
    agent, run = running_agent(cfg, broker)
    await eventually(lambda: agent.statistics().delivery.awaiting_receipt == 2)

    # Act: seq 0 refused as stale, seq 1 committed
    publish_receipt(
        broker, Receipt(FLEET, DEVICE, 1.0, through=1, committed=((1, 1),), rejected={0: "stale"})
    )
    await eventually(lambda: agent.statistics().spool_depth == 0)
    stats = agent.statistics()
    agent.stop()
    await run

    # Assert
    assert stats.delivery.receipt_rejected == {"stale": 1}
    assert stats.delivery.receipted == 1
    assert stats.delivery.awaiting_receipt == 0
    with UpdateSpool(tmp_path / "state/spool") as spool:
        assert len(spool) == 0


async def test_awaiting_update_survives_a_restart_and_is_resent_at_once(tmp_path: Path) -> None:
    # Arrange: a long timeout, so only the restart can cause the second send
    cfg = receipts_config(tmp_path, timeout_s=3600.0)
    spool_updates(tmp_path, 1)
    broker = MemoryBroker()
    updates, stop_observer = await collect(broker, updates_filter(FLEET))
    first, run = running_agent(cfg, broker)
    await eventually(lambda: first.statistics().delivery.awaiting_receipt == 1)
    first.stop()
    await run
    with UpdateSpool(tmp_path / "state/spool") as spool:
        assert [(m.seq, m.attempts) for m in spool.awaiting()] == [(0, 1)]

    # Act: restart
    second, run = running_agent(cfg, broker)
    await eventually(lambda: len(updates) == 2, what="the resend after the restart")
    await eventually(lambda: second.statistics().delivery.awaiting_receipt == 1)
    publish_receipt(broker, Receipt(FLEET, DEVICE, 1.0, through=0, committed=((0, 0),)))
    await eventually(lambda: second.statistics().spool_depth == 0)
    second.stop()
    await run
    await stop_observer()

    # Assert: the same update twice, and a resend does not count as a new delivery
    assert seqs_of(updates) == [0, 0]
    assert second.statistics().updates_sent == 0
    assert second.statistics().delivery.resends == 1


async def test_auto_mode_follows_the_aggregators_retained_server_state(tmp_path: Path) -> None:
    # Arrange: an aggregator with receipts holds the retained server state
    cfg = receipts_config(tmp_path, ReceiptMode.AUTO)
    spool_updates(tmp_path, 1)
    broker = MemoryBroker()
    broker.publish(server_state_topic(FLEET), server_state((FEATURE_RECEIPTS,)), 1, True)
    agent, run = running_agent(cfg, broker)

    # Act 1: the update waits for its receipt
    await eventually(lambda: agent.statistics().delivery.awaiting_receipt == 1)
    assert agent.statistics().delivery.receipts is True
    assert agent.statistics().spool_depth == 1
    # Act 2: an aggregator without receipts (protocol 1.0) takes over: the broker's PUBACK
    # counts again, as it did before receipts, so what awaits a receipt is deleted
    broker.publish(server_state_topic(FLEET), server_state(()), 1, True)
    await eventually(lambda: agent.statistics().spool_depth == 0)
    stats = agent.statistics()
    agent.stop()
    await run

    # Assert
    assert stats.delivery.receipts is False
    assert stats.delivery.awaiting_receipt == 0
    assert stats.updates_sent == 1


async def test_receipts_must_be_signed_by_the_aggregator_when_signing_is_on(
    tmp_path: Path,
) -> None:
    # Arrange
    aggregator_key, stranger_key = generate_private_key(), generate_private_key()
    write_public_key(tmp_path / "aggregator.pub", aggregator_key.public_key())
    cfg = dataclasses.replace(
        receipts_config(tmp_path),
        security=SecurityConfig(aggregator_public_key_file=tmp_path / "aggregator.pub"),
    )
    spool_updates(tmp_path, 1)
    broker = MemoryBroker()
    agent, run = running_agent(cfg, broker)
    await eventually(lambda: agent.statistics().delivery.awaiting_receipt == 1)
    receipt = Receipt(FLEET, DEVICE, 1.0, through=0, committed=((0, 0),))

    # Act 1: unsigned and forged receipts are refused, the update stays
    publish_receipt(broker, receipt)
    publish_receipt(broker, receipt, Ed25519Signer(stranger_key))
    await eventually(lambda: agent.statistics().rejected.get("bad_signature") == 2)
    assert agent.statistics().spool_depth == 1
    # Act 2: the aggregator's signed receipt settles it
    publish_receipt(broker, receipt, Ed25519Signer(aggregator_key))
    await eventually(lambda: agent.statistics().spool_depth == 0)
    agent.stop()
    await run
    assert agent.statistics().delivery.receipted == 1
