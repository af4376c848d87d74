"""Receipts against a real Mosquitto killed with a backlog of acknowledged updates (issue 15).

A consumer standing in for the aggregator's ingest (a persistent session that records each
``(device, seq)`` once and publishes the :class:`ReceiptBook`'s receipts after recording) is
paused while a real agent publishes its spool; Mosquitto acknowledges every update, then is
SIGKILLed before it wrote them to disk. With receipts, the agent still holds them, resends them
after reconnecting, and every update is recorded exactly once; its spool ends empty.
(tests/integration/test_aggregator_receipts_broker_kill.py runs the same scenario with the real
aggregator.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import pytest
from receipt_helpers import DEVICE, FLEET, spooled_agent
from waiting import eventually

from broker.launcher import MosquittoBroker
from edgefl.errors import RejectReason
from edgefl.protocol.messages import decode_update
from edgefl.protocol.receipts import CommitOutcome, ReceiptBook
from edgefl.protocol.topics import updates_filter
from edgefl.transport import MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

N = 20


def consumer_config(url: str) -> MqttConfig:
    return MqttConfig.from_url(
        url,
        client_id="receipt-aggregator",
        persistent_session=True,
        manual_ack=True,
        start_timeout=10.0,
        reconnect_min_delay=0.2,
    )


async def consume(url: str, book: ReceiptBook, recorded: Counter[tuple[str, int]]) -> None:
    """Record each update once, then publish its receipt, then acknowledge it."""
    async with MqttTransport(consumer_config(url)) as transport:
        await transport.subscribe(updates_filter(FLEET), qos=1)
        async for message in transport.messages():
            header, _ = decode_update(message.payload)
            key = (header.device_id, header.seq)
            outcome = CommitOutcome(*key, RejectReason.DUPLICATE if key in recorded else None)
            recorded[key] += 0 if key in recorded else 1
            for topic, payload in book.receipts([outcome], now=time.time()):
                await transport.publish(topic, payload, qos=1, retain=True)
            await transport.ack(message)


async def test_broker_sigkill_with_a_backlog_loses_no_acknowledged_update(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    # Arrange: the consumer's persistent subscription exists and is on disk; then it pauses
    async with MqttTransport(consumer_config(mosquitto.url)) as transport:
        await transport.subscribe(updates_filter(FLEET), qos=1)
    mosquitto.save()
    agent = spooled_agent(tmp_path, mosquitto.url, N)
    run = asyncio.create_task(agent.run())
    await eventually(lambda: agent.statistics().updates_sent == N, 60)  # all PUBACKed

    # Act: the broker dies before writing its queue, comes back; the consumer resumes
    mosquitto.kill()
    mosquitto.start()
    book, recorded = ReceiptBook(FLEET), Counter[tuple[str, int]]()
    consumer = asyncio.create_task(consume(mosquitto.url, book, recorded))
    try:
        await eventually(lambda: agent.statistics().spool_depth == 0, 60)
    finally:
        agent.stop()
        await run
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer

    # Assert: every update recorded exactly once, and the agent knows it
    assert sorted(recorded) == [(DEVICE, seq) for seq in range(N)]
    assert set(recorded.values()) == {1}
    stats = agent.statistics()
    assert stats.delivery.receipted == N
    assert stats.delivery.resends >= 1  # the kill lost acknowledged updates: they were sent again
