"""Participation leases against a real Mosquitto, with a SIGKILLed aggregator.

The aggregator runs as a subprocess through its CLI (participation on), so a SIGKILL is a real
crash. What must hold (docs/AGGREGATOR.md, "Participation"): a lease is durable before its
LEASE message is published, so a device never holds a lease a restarted aggregator does not
know (no ``no_lease`` rejection ever); a lease's completion commits with its update, so a crash
between the grant and the commit neither loses the lease nor counts the update twice; and a
restart never holds more than ``C``.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from test_aggregator_crash import (
    FLEET,
    MODEL,
    delta,
    retained_server_state,
    start_aggregator,
    wait_applied,
)

from broker.launcher import MosquittoBroker
from edgefl.aggregator.updates import build_update_packets
from edgefl.codec import CodecConfig
from edgefl.protocol import ServerStatus, decode_message, encode_message
from edgefl.protocol.messages import CheckIn, Lease
from edgefl.protocol.topics import checkin_topic, lease_topic
from edgefl.transport import MqttConfig, MqttTransport

pytestmark = pytest.mark.integration

C = 3
LEASING = (
    "--buffer-size", "4", "--norm-bound", "off", "--metrics-interval", "0.5",
    "--max-batch", "64", "--concurrency", str(C), "--lease-s", "10", "--lease-grace", "1.0",
    "--flush-after", "1",
)  # fmt: skip
RECHECK_S = 2.0  # a device that got no lease checks in again (a restart forgets check-ins)


def db_leases(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT device, lease_id FROM leases ORDER BY lease_id")
        return [(str(d), int(i)) for d, i in rows.fetchall()]


def counters(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}


class Device:
    """A device's protocol side: check in until leased, then one update under the lease."""

    def __init__(self, url: str, index: int) -> None:
        self.name = f"dev-{index:02d}"
        self.index = index
        config = MqttConfig.from_url(url, client_id=f"lease-{self.name}", persistent_session=True)
        self.transport = MqttTransport(config)
        self.used: set[int] = set()
        self.leases: asyncio.Queue[Lease] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Device:
        await self.transport.__aenter__()
        await self.transport.subscribe(lease_topic(FLEET, self.name), qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.transport.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self.transport.messages():
            self.leases.put_nowait(decode_message(message.payload, Lease))

    async def check_in(self) -> None:
        msg = CheckIn(fleet=FLEET, device_id=self.name, at=time.time())
        await self.transport.publish(checkin_topic(FLEET, self.name), encode_message(msg), qos=1)

    async def lease(self, within: float = 60.0) -> Lease:
        """The next lease not used yet, checking in again every ``RECHECK_S``."""
        async with asyncio.timeout(within):
            while True:
                await self.check_in()
                try:
                    async with asyncio.timeout(RECHECK_S):
                        while (lease := await self.leases.get()).lease_id in self.used:
                            pass
                except TimeoutError:
                    continue
                self.used.add(lease.lease_id)
                return lease

    async def send(self, seq: int, lease: Lease) -> None:
        topic, packets = build_update_packets(
            fleet=FLEET, model=MODEL, device=self.name, seq=seq, base_version=0,
            delta=delta(self.index, seq), num_examples=10, codec=CodecConfig(),
            lease_id=lease.lease_id,
        )  # fmt: skip
        for p in packets:
            await self.transport.publish(topic, p, qos=1)

    async def run(self, count: int) -> None:
        for seq in range(1, count + 1):
            await self.send(seq, await self.lease())


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


async def restart(url: str, state_dir: Path) -> subprocess.Popen[str]:
    return await asyncio.to_thread(start_aggregator, url, state_dir, options=LEASING)


@pytest.mark.slow
async def test_a_sigkill_between_the_grant_and_the_commit_loses_no_lease_and_counts_once(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    db = state_dir / "state.sqlite"
    url = mosquitto.url
    procs = [await restart(url, state_dir)]
    seed = random.randrange(1 << 30)
    random.seed(seed)
    devices, per_device = 6, 6
    total = 1 + devices * per_device
    held_at_kills: list[int] = []
    try:
        # Arrange: one device holds a lease; Act: the aggregator dies before its update came
        async with Device(url, 99) as first:
            lease = await first.lease()
            kill(procs[-1])
            assert db_leases(db) == [(first.name, lease.lease_id)]  # durable before published
            await first.send(1, lease)  # waits in the aggregator's session at the broker
            procs.append(await restart(url, state_dir))
            assert wait_applied(db, 1, timeout=30) == 1
        # then several devices, the aggregator SIGKILLed twice at random moments
        fleet = [Device(url, i) for i in range(devices)]
        for d in fleet:
            await d.__aenter__()
        try:
            tasks = [asyncio.create_task(d.run(per_device)) for d in fleet]
            for target in (random.randint(4, 14), random.randint(18, 28)):
                await asyncio.to_thread(wait_applied, db, target, 60)
                await asyncio.sleep(random.uniform(0.0, 0.3))  # anywhere in a batch's life
                kill(procs[-1])
                held_at_kills.append(len(db_leases(db)))
                procs.append(await restart(url, state_dir))
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        finally:
            for d in fleet:
                await d.__aexit__(None, None, None)
        applied = wait_applied(db, total, timeout=60)
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()

    # Assert: every update counted once, none refused for its lease, never more than C held
    assert applied == total, seed
    rows = counters(db)
    rejected = {k: v for k, v in rows.items() if k.startswith("rejected:")}
    assert set(rejected) <= {"rejected:duplicate"}, (seed, rejected)
    assert all(n <= C for n in held_at_kills), (seed, held_at_kills)
    with sqlite3.connect(db) as conn:
        seen = conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
    assert seen == total
    state = await retained_server_state(url)
    assert state.status is ServerStatus.OFFLINE
    assert state.participation is not None
    assert state.participation.in_flight <= C
