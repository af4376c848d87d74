"""Local DP end to end over a real Mosquitto with the real aggregator: what crosses the broker
is the noised update, the aggregator steps on it, and the device's retained state says what it
spent and that its budget stops it from training on the new version."""

from __future__ import annotations

import asyncio
from pathlib import Path

import agent_files
import fleet_parts
import numpy as np
import pytest
from agent_helpers import RecordingTrainer, decoded_update
from sklearn.datasets import load_digits
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.agent import DeviceAgent
from device_agent.config import PrivacyConfig
from device_agent.dataset import LocalDataset
from edgefl.codec import CodecConfig, Quantization
from edgefl.protocol.messages import DeviceState, decode_message
from edgefl.protocol.topics import device_state_topic, updates_filter
from edgefl.transport import InboundMessage, MqttConfig, MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = pytest.mark.integration

FLEET, DEVICE, MODEL = "vineyard", "pi-3", "digits-mlp"


async def test_the_broker_and_the_aggregator_see_only_the_noised_update(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: FedBuff K=1; a device with room for one Gaussian update (eps 4 of budget 5)
    write_fake_sysfs(tmp_path / "fs", throttled=0)
    fp32 = CodecConfig(quantization=Quantization.FP32)  # lossless: an exact comparison
    agg = fleet_parts.aggregator(
        tmp_path, mosquitto.url, fleet=FLEET, model=MODEL, buffer_size=1, codec=fp32
    )
    cfg = agent_files.agent_config(
        tmp_path,
        mosquitto.url,
        fleet=FLEET,
        device=DEVICE,
        state_dir=tmp_path / "agent",
        privacy=PrivacyConfig(dp="local:gaussian,eps=4,C=0.3,delta=1e-5,budget=5"),
    )
    ldp = cfg.privacy.local
    assert ldp is not None
    trainer = RecordingTrainer()
    agent = DeviceAgent(
        cfg, trainer=trainer, dataset=_digits(), noise_rng=np.random.default_rng(23)
    )
    seen: list[InboundMessage] = []
    watcher = MqttTransport(MqttConfig.from_url(mosquitto.url, client_id="watcher"))

    async def watch() -> None:
        async for message in watcher.messages():
            seen.append(message)

    # Act: the agent trains on v0, its update makes v1; the agent holds v1 and may not train
    async with watcher:
        await watcher.subscribe(updates_filter(FLEET), qos=1)
        await watcher.subscribe(device_state_topic(FLEET, DEVICE), qos=1)
        pump = asyncio.create_task(watch())
        ready = asyncio.Event()
        agg_task = asyncio.create_task(agg.run(ready))
        await asyncio.wait_for(ready.wait(), 30)
        agent_task = asyncio.create_task(agent.run())
        try:
            await eventually(lambda: (agent.statistics().model_version or 0) >= 1, 60)
            await eventually(lambda: _refused(agent) >= 1, 30)
            await eventually(lambda: _exhausted(seen), 30)
        finally:
            agent.stop()
            await agent_task
            agg.stop()
            await agg_task
        await watcher.close()
        await pump

    # Assert: one update crossed the broker, exactly the seeded privatization of the raw delta
    updates = [m for m in seen if "/update/" in m.topic]
    assert len(updates) == 1
    assert len(trainer.deltas) == 1
    header, sent = decoded_update(updates[0].payload)
    expected = ldp.privatize(trainer.deltas[0], np.random.default_rng(23)).update
    assert np.array_equal(sent, expected)
    assert header.metrics == {}
    assert agg.statistics().applied == 1
    # the retained state: epsilon spent, the budget, why it does not train
    state = _last_state(seen)
    assert state is not None
    assert (state.local_dp, state.local_dp_updates) == ("gaussian", 1)
    assert state.local_epsilon_spent == pytest.approx(4.0, rel=1e-6)
    assert state.local_epsilon_budget == 5.0
    assert "privacy_budget_spent" in state.reasons
    assert state.local_accuracy is None
    assert agent.statistics().trainings_started == 1


def _digits() -> LocalDataset:
    digits = load_digits()
    x = (digits.data[:250] / 16.0).astype(np.float32)
    return LocalDataset.split(x, digits.target[:250].astype(np.int64), 0.2, seed=5)


def _refused(agent: DeviceAgent) -> int:
    report = agent.statistics().local_privacy
    return 0 if report is None else report.refused


def _last_state(seen: list[InboundMessage]) -> DeviceState | None:
    states = [m for m in seen if m.topic.endswith("/state") and m.payload]
    return decode_message(states[-1].payload, DeviceState) if states else None


def _exhausted(seen: list[InboundMessage]) -> bool:
    state = _last_state(seen)
    return state is not None and state.local_budget_exhausted is True
