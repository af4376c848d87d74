"""Server-controlled participation end to end: 200 real device agents (in-process, each with its
own MQTT connection, as the live simulator's workers run them) against a real Mosquitto and the
real aggregator granting at most ``C = 10`` leases.

The agents train with the real trainer (torch, digits MLP) wrapped in an *observer*: it counts
the trainings running at once and records the lease each one ran under (it changes nothing).
A second observer follows the LEASE messages on the broker. Checked:

* in-flight trainings never exceed ``C`` plus the documented lease slack (PROTOCOL.md §4.7:
  a lease that ended by expiry or withdrawal frees its slot while its training may still be
  stopping; each such lease adds at most one);
* every training that finished ran under a lease the aggregator granted to that device;
* the aggregator refused no update for want of a lease, and the fleet made progress.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_helpers import digits_dataset
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.agent import DeviceAgent
from device_agent.config import (
    AgentConfig,
    BrokerConfig,
    DataConfig,
    DataKind,
    ProbeConfig,
    SpoolConfig,
    TrainingLimits,
)
from device_agent.eligibility import EligibilityPolicy, MeteredSource
from device_agent.trainer import TorchTrainer, Trainer, TrainJob, TrainResult
from edgefl.aggregator import Aggregator, AggregatorConfig
from edgefl.participation import ParticipationConfig
from edgefl.protocol.messages import Lease, decode_message
from edgefl.transport import MqttConfig, MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET, MODEL = "leasefarm", "digits-mlp"
DEVICES, C, K, UPDATES = 200, 10, 5, 40
DATA = digits_dataset()


@dataclass(frozen=True)
class Finished:
    device: str
    lease_id: int | None


class TrainingObserver:
    """Shared by the wrappers of every agent: trainings running now, their peak, and the
    lease of every training that finished with a result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.finished: list[Finished] = []

    def wrap(self, agent: DeviceAgent, inner: Trainer) -> Trainer:
        return _ObservedTrainer(self, agent, inner)

    def enter(self) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)

    def leave(self, finished: Finished | None) -> None:
        with self._lock:
            self.running -= 1
            if finished is not None:
                self.finished.append(finished)


class _ObservedTrainer:
    """The real trainer of one agent, observed (see :class:`TrainingObserver`)."""

    def __init__(self, observer: TrainingObserver, agent: DeviceAgent, inner: Trainer) -> None:
        self._observer, self._agent, self._inner = observer, agent, inner

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        lease = self._agent.training_lease
        self._observer.enter()
        result = None
        try:
            result = self._inner.train(job, should_stop)
            return result
        finally:
            device = self._agent.config.device_id
            lease_id = None if lease is None else lease.lease_id
            self._observer.leave(None if result is None else Finished(device, lease_id))


class LeaseWatcher:
    """Every LEASE message on the broker, over its own MQTT connection: (device, lease id)."""

    def __init__(self, url: str) -> None:
        self.granted: set[tuple[str, int]] = set()
        self._transport = MqttTransport(MqttConfig.from_url(url, client_id="lease-watcher"))

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[LeaseWatcher]:
        async with self._transport:
            await self._transport.subscribe(f"edgefl/v1/{FLEET}/device/+/lease", qos=1)

            async def pump() -> None:
                async for message in self._transport.messages():
                    lease = decode_message(message.payload, Lease)
                    self.granted.add((lease.device_id, lease.lease_id))

            task = asyncio.create_task(pump())
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def agent_config(tmp: Path, url: str, n: int) -> AgentConfig:
    device = f"dev-{n:03d}"
    return AgentConfig(
        broker=BrokerConfig(url, keepalive=60, reconnect_max_s=2.0),
        fleet=FLEET,
        device_id=device,
        data=DataConfig(kind=DataKind.NPZ, path=tmp / "unused.npz"),
        training=TrainingLimits(max_threads=1, nice=0, max_epochs=1, holdout_fraction=0.0),
        eligibility=EligibilityPolicy(),
        probes=ProbeConfig(
            root=tmp / "fs", metered=MeteredSource.NO, throttle=False, interval_s=5.0
        ),
        spool=SpoolConfig(durable=False),
        state_dir=tmp / "devices" / device,
    )


async def test_200_agents_never_train_more_than_c_at_once_and_only_under_leases(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: the aggregator with C = 10, K = 5; 200 eligible agents on one event loop
    write_fake_sysfs(tmp_path / "fs")
    participation = ParticipationConfig(concurrency=C, lease_s=60.0, checkin_ttl_s=60.0)
    config = AggregatorConfig.build(
        mosquitto.url, FLEET, MODEL, tmp_path / "aggregator", fsync=False
    )
    config = config.replace(buffer_size=K, participation=participation)
    aggregator = Aggregator(config)
    observer = TrainingObserver()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=2 * C)
    agents = []
    for n in range(DEVICES):
        agent = DeviceAgent(
            agent_config(tmp_path, mosquitto.url, n), dataset=DATA, executor=executor
        )
        agent._work.trainer = observer.wrap(agent, TorchTrainer())
        agents.append(agent)
    ready = asyncio.Event()
    aggregator_task = asyncio.create_task(aggregator.run(ready))
    await asyncio.wait_for(ready.wait(), 30)

    # Act: run until the aggregator applied UPDATES updates
    async with LeaseWatcher(mosquitto.url).watching() as leases:
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            await eventually(lambda: aggregator.statistics().applied >= UPDATES, 50)
        finally:
            stats = aggregator.statistics()  # before the stop's withdrawals
            for agent in agents:
                agent.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            aggregator.stop()
            await aggregator_task
            executor.shutdown(wait=True)

    # Assert
    assert stats.participation is not None
    ended = stats.participation.ended
    slack = ended.get("expired", 0) + ended.get("released", 0)
    assert 1 <= observer.peak <= C + slack, (observer.peak, dict(ended))
    assert len(observer.finished) >= UPDATES
    unleased = [f for f in observer.finished if (f.device, f.lease_id) not in leases.granted]
    assert unleased == []
    assert stats.rejected.get("no_lease", 0) == 0
    assert len({f.device for f in observer.finished}) > C  # the leases went round the fleet
