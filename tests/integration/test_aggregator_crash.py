"""Crash safety against a real Mosquitto: SIGKILLed aggregator, restarted broker, embedded broker.

The aggregator runs as a subprocess through its CLI (``python -m edgefl.aggregator.cli``), so a
SIGKILL is a real crash: whatever was not committed to SQLite is gone, and the broker redelivers
every update the dead process had not acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fleet_parts import kill_survivors, start_aggregator_process

from broker.launcher import MosquittoBroker, ThreadedEmbeddedBroker
from edgefl.aggregator import Aggregator, AggregatorConfig, NormBoundSetting
from edgefl.aggregator.updates import build_update_packets
from edgefl.codec import CodecConfig
from edgefl.protocol import ServerState, ServerStatus, decode_message, server_state_topic
from edgefl.transport import MqttConfig, MqttTransport

FLEET = "crash"
MODEL = "digits-mlp"
NUM_PARAMS = 2410

pytestmark = pytest.mark.integration


RAW_UPDATES = (
    "--buffer-size", "7", "--norm-bound", "off", "--metrics-interval", "0.5",
    "--max-batch", "64", "--no-participation",  # raw updates, no leases
)  # fmt: skip


def start_aggregator(
    url: str, state_dir: Path, *, importtime: bool = False, options: Sequence[str] = RAW_UPDATES
) -> subprocess.Popen[str]:
    args = [
        "--broker", url, "--fleet", FLEET, "--model", MODEL, "--state-dir", str(state_dir),
        *options,
    ]  # fmt: skip
    return start_aggregator_process(
        args, state_dir, python=["-X", "importtime"] if importtime else ()
    )


def delta(device: int, seq: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * device + seq)
    return (rng.standard_normal(NUM_PARAMS) * 0.01).astype(np.float32)


async def publisher(url: str, device: int, count: int, pause: float) -> None:
    """Odd devices send every update as 1 KiB chunks, so kills also hit half-reassembled ones."""
    name = f"dev-{device:02d}"
    config = MqttConfig.from_url(url, client_id=f"pub-{name}", persistent_session=True)
    async with MqttTransport(config) as transport:
        for seq in range(1, count + 1):
            topic, packets = build_update_packets(
                fleet=FLEET, model=MODEL, device=name, seq=seq, base_version=0,
                delta=delta(device, seq), num_examples=10 + seq, codec=CodecConfig(),
                max_packet=1024 if device % 2 else 256 * 1024,
            )  # fmt: skip
            assert len(packets) == (4 if device % 2 else 1)
            for p in packets:
                await transport.publish(topic, p, qos=1)
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))


async def retained_server_state(url: str) -> ServerState:
    async with MqttTransport(MqttConfig.from_url(url)) as transport:
        await transport.subscribe(server_state_topic(FLEET), qos=1)
        async with asyncio.timeout(10):
            async for message in transport.messages():
                return decode_message(message.payload, ServerState)
    raise AssertionError("no server state")


async def until_applied(agg: Aggregator, n: int, limit: float = 30.0) -> None:
    async with asyncio.timeout(limit):
        while agg.statistics().applied < n:  # noqa: ASYNC110  (polling the service's counters)
            await asyncio.sleep(0.05)


def wait_applied(db: Path, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    applied = -1
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT value FROM counters WHERE name = 'applied'").fetchone()
        applied = 0 if row is None else int(row[0])
        if applied >= expected:
            return applied
        time.sleep(0.2)
    return applied


@pytest.mark.slow
async def test_sigkilled_aggregator_counts_every_update_exactly_once(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    devices, per_device = 20, 15
    total = devices * per_device
    state_dir = tmp_path / "state"
    db = state_dir / "state.sqlite"
    seed = int(os.environ.get("EDGEFL_CRASH_SEED", "20261201"))
    random.seed(seed)
    first = start_aggregator(mosquitto.url, state_dir, importtime=True)
    procs = [first]
    applied_at_kill: list[int] = []

    try:
        tasks = [
            asyncio.create_task(publisher(mosquitto.url, d, per_device, 0.3))
            for d in range(devices)
        ]
        # two SIGKILLs at random points of the run, each followed by a restart
        for target in (random.randint(30, 120), random.randint(160, 250)):
            await asyncio.to_thread(wait_applied, db, target, 60)
            await asyncio.sleep(random.uniform(0.0, 0.2))  # anywhere in a batch's life
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait()
            applied_at_kill.append(wait_applied(db, 0, timeout=1))
            procs.append(await asyncio.to_thread(start_aggregator, mosquitto.url, state_dir))
        await asyncio.gather(*tasks)
        applied = wait_applied(db, total, timeout=60)
        final = procs[-1]
        final.send_signal(signal.SIGTERM)
        assert final.wait(timeout=30) == 0
    finally:
        kill_survivors(procs)
    assert applied == total
    # the kills hit a running ingest: some updates were in, most were still to come
    assert all(0 < n < total for n in applied_at_kill), (seed, applied_at_kill)
    importtime = Path(first.stderr_path).read_text()  # type: ignore[attr-defined]
    assert "edgefl.aggregator.service" in importtime
    assert not [line for line in importtime.splitlines() if line.rstrip().endswith("| torch")]

    with sqlite3.connect(db) as conn:
        seen = conn.execute("SELECT device, seq FROM seen").fetchall()
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
        version, generation = conn.execute("SELECT version, generation FROM model").fetchone()
        buffered = conn.execute(
            "SELECT COUNT(*) FROM buffer WHERE generation = ?", (generation,)
        ).fetchone()[0]
        session = conn.execute("SELECT value FROM meta WHERE key = 'session'").fetchone()[0]
    expected = {(f"dev-{d:02d}", s) for d in range(devices) for s in range(1, per_device + 1)}
    assert len(seen) == total
    assert set(seen) == expected
    assert counters["applied"] == total
    assert (version, buffered) == (total // 7, total % 7)
    assert int(session) == 3
    rejected = {k: v for k, v in counters.items() if k.startswith("rejected:")}
    assert set(rejected) <= {"rejected:duplicate"}  # committed but not yet acked at the kill
    assert counters["received"] == total + sum(rejected.values())

    state = await retained_server_state(mosquitto.url)
    assert state.status is ServerStatus.OFFLINE
    assert (state.applied, state.version, state.session) == (total, total // 7, 3)


async def test_aggregator_survives_a_broker_restart(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    config = AggregatorConfig.build(
        broker_url=mosquitto.url, fleet=FLEET, model=MODEL, state_dir=tmp_path / "state",
        buffer_size=5, norm_bound=NormBoundSetting.OFF, metrics_interval_s=0.5,
    )  # fmt: skip
    devices, per_device = 4, 10

    agg = Aggregator(config)
    ready = asyncio.Event()
    task = asyncio.create_task(agg.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    pubs = [
        asyncio.create_task(publisher(mosquitto.url, d, per_device, 0.1)) for d in range(devices)
    ]
    await until_applied(agg, 8)
    applied_before = agg.statistics().applied
    await asyncio.to_thread(mosquitto.restart)
    await asyncio.gather(*pubs)
    await until_applied(agg, devices * per_device)
    s = agg.statistics()
    assert s.link.connected
    assert s.link.reconnects >= 1
    assert 8 <= applied_before < devices * per_device
    agg.stop()
    await asyncio.wait_for(task, 15)
    assert s.applied == devices * per_device
    assert s.version == devices * per_device // 5
    assert set(s.rejected) <= {"duplicate"}


async def test_aggregator_runs_on_the_embedded_broker(
    embedded_broker: ThreadedEmbeddedBroker, tmp_path: Path
) -> None:
    config = AggregatorConfig.build(
        broker_url=embedded_broker.url, fleet=FLEET, model=MODEL, state_dir=tmp_path / "s",
        buffer_size=3, norm_bound=NormBoundSetting.OFF,
    )  # fmt: skip

    agg = Aggregator(config)
    ready = asyncio.Event()
    task = asyncio.create_task(agg.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    await asyncio.gather(*(publisher(embedded_broker.url, d, 2, 0.05) for d in range(3)))
    await until_applied(agg, 6)
    agg.stop()
    await asyncio.wait_for(task, 15)
    assert agg.statistics().version == 2


async def test_restart_drains_a_backlog_larger_than_the_receive_window(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Updates queued at the broker while the aggregator was down exceed its inbound window:
    the transport pauses reading, and start-up (SUBACK, PUBACKs of version 0) must not wait on
    a socket nobody reads."""
    config = AggregatorConfig.build(
        broker_url=mosquitto.url, fleet=FLEET, model=MODEL, state_dir=tmp_path / "state",
        buffer_size=10, norm_bound=NormBoundSetting.OFF, max_inflight_bytes=64 * 1024,
    )  # fmt: skip
    assert config.inflight_window() == 32
    devices, per_device = 10, 20

    first = Aggregator(config)
    ready = asyncio.Event()
    task = asyncio.create_task(first.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    first.stop()
    await asyncio.wait_for(task, 15)
    await asyncio.gather(*(publisher(mosquitto.url, d, per_device, 0.0) for d in range(devices)))
    agg = Aggregator(config)
    ready = asyncio.Event()
    task = asyncio.create_task(agg.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    await until_applied(agg, devices * per_device)
    agg.stop()
    await asyncio.wait_for(task, 15)
    assert agg.statistics().version == devices * per_device // 10
