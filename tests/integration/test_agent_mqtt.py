"""The device agent in-process against a real Mosquitto and the real aggregator.

* the agent follows the aggregator's model (FedBuff K=1: its own update makes the next version),
  keeps the ONNX export, and onnxruntime on it matches torch;
* eligibility over a fake sysfs tree drives the published state (on battery, too hot, throttled,
  under-voltage, busy, metered per NetworkManager, outside the time window, and back), and a
  training interrupted by unplugging publishes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import agent_files
import fleet_parts
import numpy as np
import pytest
from sklearn.datasets import load_digits
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.dataset import LocalDataset
from device_agent.eligibility import (
    ClockProbe,
    EligibilityPolicy,
    MeteredSource,
    TimeWindow,
    default_probes,
    run_command,
)
from device_agent.model_store import ModelStore
from device_agent.predict import LocalModel
from device_agent.snapshots import ProbeSnapshotSource
from device_agent.trainer import TorchTrainer, TrainJob, TrainResult
from edgefl.aggregator import Aggregator
from edgefl.protocol.messages import DeviceState, DeviceStatus, decode_message
from edgefl.protocol.topics import device_state_topic
from edgefl.transport import MqttConfig, MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = pytest.mark.integration

FLEET, DEVICE, MODEL = "orchard", "pi-7", "digits-mlp"


write_tree = functools.partial(write_fake_sysfs, throttled=0)
"""Fake /proc and /sys: 2 CPUs, AC adapter + battery, a thermal zone, the Pi firmware file
(reporting no throttling unless ``throttled`` says otherwise)."""


def aggregator(tmp: Path, url: str, **settings: Any) -> Aggregator:
    return fleet_parts.aggregator(tmp, url, fleet=FLEET, model=MODEL, **settings)


def agent_config(tmp: Path, url: str) -> AgentConfig:
    return agent_files.agent_config(tmp, url, fleet=FLEET, device=DEVICE, state_dir=tmp / "agent")


def dataset() -> LocalDataset:
    d = load_digits()
    x = (d.data[:250] / 16.0).astype(np.float32)
    return LocalDataset.split(x, d.target[:250].astype(np.int64), 0.2, seed=5)


class StateWatcher:
    """Follows the agent's retained state topic over its own MQTT connection."""

    def __init__(self, url: str) -> None:
        self.states: list[DeviceState] = []
        self._transport = MqttTransport(MqttConfig.from_url(url, client_id="watcher"))
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StateWatcher:
        await self._transport.__aenter__()
        await self._transport.subscribe(device_state_topic(FLEET, DEVICE))

        async def pump() -> None:
            async for message in self._transport.messages():
                if message.payload:
                    self.states.append(decode_message(message.payload, DeviceState))

        self._task = asyncio.create_task(pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._transport.close()
        if self._task is not None:
            await self._task

    def latest(self) -> DeviceState | None:
        return self.states[-1] if self.states else None

    def status(self) -> str | None:
        state = self.latest()
        return None if state is None else state.status.value

    def reasons(self) -> tuple[str, ...] | None:
        state = self.latest()
        return None if state is None else state.reasons


async def test_agent_follows_aggregator_model_and_onnx_inference_matches_torch(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: FedBuff with K=1, ONNX published with every version
    write_tree(tmp_path / "fs")
    agg = aggregator(tmp_path, mosquitto.url, buffer_size=1, publish_onnx=True)
    agent = DeviceAgent(agent_config(tmp_path, mosquitto.url), dataset=dataset())

    ready = asyncio.Event()
    agg_task = asyncio.create_task(agg.run(ready))
    await asyncio.wait_for(ready.wait(), 30)
    agent_task = asyncio.create_task(agent.run())
    # Act: the agent trains on v0, its update makes v1, the agent picks v1 up
    await eventually(lambda: (agent.statistics().model_version or 0) >= 1, 60)
    agent.stop()
    await agent_task
    agg.stop()
    await agg_task

    # Assert
    assert agg.statistics().applied >= 1
    held = ModelStore(tmp_path / "agent/model").load()
    assert held is not None
    assert held.version >= 1
    assert held.onnx is not None
    local = LocalModel(tmp_path / "agent")
    x = dataset().x_test[:20]
    import torch

    from edgefl.models.spec import get_model_spec
    from edgefl.models.torch_models import build_module, load_flat

    module = build_module(get_model_spec(MODEL))
    load_flat(module, held.weights.copy())
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(local.logits(x), expected, atol=1e-5)
    assert local.predict(x).labels.tolist() == expected.argmax(axis=1).tolist()
    assert agent.statistics().rejected == {}


class GateTrainer:
    """Holds every training until the gate opens (polling should_stop, per the contract)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.inner = TorchTrainer()

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        while not self.gate.wait(0.02):
            if should_stop():
                return None
        return self.inner.train(job, should_stop)


@dataclasses.dataclass
class ProbedDevice:
    """A fake device: sysfs tree ``fs``, a stand-in ``nmcli`` program (run as a real
    subprocess by the probe) printing what ``metered`` holds, and a settable clock."""

    fs: Path
    metered: Path
    nmcli: Path
    now: datetime

    @classmethod
    def create(cls, root: Path) -> ProbedDevice:
        fs, metered, nmcli = root / "fs", root / "metered", root / "nmcli"
        write_tree(fs, mains=False)
        metered.write_text("no")
        nmcli.write_text(f"#!/bin/sh\necho GENERAL.METERED:$(cat {metered})\n")
        nmcli.chmod(0o755)
        return cls(fs, metered, nmcli, datetime(2026, 1, 5, 23, 0).astimezone())

    def snapshots(self, cfg: AgentConfig) -> ProbeSnapshotSource:
        probes = default_probes(
            self.fs,
            metered=MeteredSource.NETWORKMANAGER,
            runner=lambda argv, timeout: run_command([str(self.nmcli), *argv[1:]], timeout),
            clock=ClockProbe(now=lambda: self.now),
        )
        return ProbeSnapshotSource(cfg.probes, probes=probes)


async def walk_every_ineligibility_reason(
    agent: DeviceAgent, device: ProbedDevice, watch: StateWatcher
) -> dict[str, tuple[str, ...] | None]:
    """Make the device ineligible for each reason in turn; the reasons its state published."""
    seen: dict[str, tuple[str, ...] | None] = {}

    async def expect(name: str, reasons: tuple[str, ...], **tree: object) -> None:
        write_tree(device.fs, **tree)  # type: ignore[arg-type]
        agent.check_now()
        await eventually(lambda: watch.reasons() == reasons, 10)
        seen[name] = watch.reasons()

    await expect("battery", ("on_battery",), mains=False)
    await expect("hot", ("too_hot",), temp_c=85.0)
    await expect("throttled", ("throttled",), throttled=0x4)
    await expect("under_voltage", ("under_voltage",), throttled=0x1)
    await expect("busy", ("busy",), load=1.9)
    device.metered.write_text("yes")
    await expect("metered", ("metered",))
    device.metered.write_text("no")
    device.now = datetime(2026, 1, 5, 12, 0).astimezone()
    await expect("outside_window", ("outside_window",))
    device.now = datetime(2026, 1, 6, 1, 30).astimezone()
    return seen


async def unplug_mid_training(
    agent: DeviceAgent, device: ProbedDevice, watch: StateWatcher
) -> None:
    """Eligible -> training starts -> unplugged: the training is aborted."""
    write_tree(device.fs)
    agent.check_now()
    await eventually(lambda: agent.statistics().status is DeviceStatus.TRAINING, 10)
    await eventually(lambda: watch.status() == "training")
    write_tree(device.fs, mains=False)
    agent.check_now()
    await eventually(lambda: agent.statistics().training.aborted.get("ineligible") == 1, 10)


async def test_eligibility_over_fake_sysfs_and_abort_mid_training_publishes_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: NetworkManager and the clock are real probes over fakes, window 22:00-06:00
    device = ProbedDevice.create(tmp_path)
    agg = aggregator(tmp_path, mosquitto.url, buffer_size=10)
    trainer = GateTrainer()
    cfg = dataclasses.replace(
        agent_config(tmp_path, mosquitto.url),
        eligibility=EligibilityPolicy(windows=(TimeWindow("22:00-06:00"),)),
    )
    agent = DeviceAgent(cfg, trainer=trainer, dataset=dataset(), snapshots=device.snapshots(cfg))

    async def scenario(watch: StateWatcher) -> dict[str, tuple[str, ...] | None]:
        seen = await walk_every_ineligibility_reason(agent, device, watch)
        # Act
        await unplug_mid_training(agent, device, watch)
        await asyncio.sleep(1.0)  # anything published would reach the aggregator by now
        seen["after_abort_received"] = (str(agg.statistics().received),)
        # ... plugged in again: the retried training is delivered
        trainer.gate.set()
        write_tree(device.fs)
        agent.check_now()
        await eventually(lambda: agg.statistics().applied == 1, 60)
        return seen

    ready = asyncio.Event()
    agg_task = asyncio.create_task(agg.run(ready))
    await asyncio.wait_for(ready.wait(), 30)
    agent_task = asyncio.create_task(agent.run())
    async with StateWatcher(mosquitto.url) as watch:
        try:
            seen = await scenario(watch)
        finally:
            agent.stop()
            await agent_task
            agg.stop()
            await agg_task
        await eventually(lambda: watch.status() == "offline")

    # Assert
    assert seen["after_abort_received"] == ("0",)
    stats = agent.statistics()
    assert stats.training.aborted == {"ineligible": 1}
    assert stats.training.completed == 1
    assert stats.updates_sent == 1
    assert agg.statistics().received == 1
