"""Local DP end to end over a real Mosquitto with the real aggregator: what crosses the broker
is the noised update, the aggregator steps on it, and the device's retained state says what it
spent and that its budget stops it from training on the new version."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
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
from device_agent.local_privacy import LEDGER_FILE
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
    assert agent.statistics().training.started == 1


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


async def test_the_agent_process_reads_privacy_from_its_file_and_stops_at_the_budget(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """What systemd runs (``python -m device_agent --config agent.toml``) with ``[privacy]``:
    os.urandom noise, the ledger on disk, the budget, the retained state and the one log line."""
    # Arrange: room for one Laplace update; FedBuff K=1 makes v1 from it
    digits = load_digits()
    x, y = (digits.data[:150] / 16.0).astype(np.float32), digits.target[:150]
    np.savez(tmp_path / "train.npz", x=x, y=y)
    write_fake_sysfs(tmp_path / "fs", throttled=0)
    config = agent_files.write_agent_toml(
        tmp_path,
        fleet=FLEET,
        device=DEVICE,
        url=mosquitto.url,
        reconnect_max_s=2.0,
        sections='\n[privacy]\ndp = "local:laplace,eps=1,C=1,budget=1"\n',
    )
    agg = fleet_parts.aggregator(tmp_path, mosquitto.url, fleet=FLEET, model=MODEL, buffer_size=1)
    ready = asyncio.Event()
    agg_task = asyncio.create_task(agg.run(ready))
    await asyncio.wait_for(ready.wait(), 30)
    log = tmp_path / "agent.log"
    proc = _start_agent(config, log)
    try:
        # Act: it trains v0; v1 comes back; it refuses; then SIGTERM
        await eventually(lambda: agg.statistics().applied == 1, 90)
        state = await _retained_exhausted(mosquitto.url)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        agg.stop()
        await agg_task

    # Assert
    assert code == 0, log.read_text()[-2000:]
    assert (state.local_dp, state.local_dp_updates, state.local_epsilon_spent) == (
        "laplace",
        1,
        1.0,
    )
    assert "privacy_budget_spent" in state.reasons
    ledger = json.loads((tmp_path / "state" / LEDGER_FILE).read_text())
    assert ledger["spend"] == {"updates": 1, "gaussian_mu_squared": 0.0, "laplace_epsilon": 1.0}
    assert log.read_text().count("local DP budget spent") == 1
    assert log.read_text().count("training on model v") == 1


def _start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFL_", "NOTIFY_"))}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config", str(config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


async def _retained_exhausted(url: str) -> DeviceState:
    """The retained device state, once it holds v1 and says the budget is spent."""
    async with MqttTransport(MqttConfig.from_url(url, client_id="reader")) as reader:
        await reader.subscribe(device_state_topic(FLEET, DEVICE))
        async with asyncio.timeout(60):
            async for message in reader.messages():
                state = decode_message(message.payload, DeviceState)
                if state.local_budget_exhausted and state.model_version == 1:
                    return state
    raise AssertionError("no retained state")
