"""The agent as a real process (``python -m device_agent --config agent.toml``, what systemd
runs) against a real Mosquitto and the real aggregator:

* SIGKILLed with a finished update in its spool (the broker was down), restarted: the update
  reaches the aggregator exactly once, and SIGTERM then stops the agent cleanly (``offline``);
* the broker is down for 20 s while the agent finishes an update: delivered afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import fleet_parts
import numpy as np
import pytest
from agent_files import write_agent_toml
from sklearn.datasets import load_digits

from broker.launcher import MosquittoBroker
from edgefl.aggregator import Aggregator
from edgefl.protocol.messages import DeviceState, DeviceStatus, decode_message
from edgefl.protocol.topics import device_state_topic
from edgefl.transport import MqttConfig, MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = pytest.mark.integration

FLEET, DEVICE, MODEL = "vineyard", "pi-3", "digits-mlp"
REPO = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, url: str) -> Path:
    d = load_digits()
    np.savez(tmp / "train.npz", x=(d.data[:150] / 16.0).astype(np.float32), y=d.target[:150])
    write_fake_sysfs(tmp / "fs", mains=False)
    return write_agent_toml(tmp, fleet=FLEET, device=DEVICE, url=url, reconnect_max_s=2.0)


class AgentProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.log = config.parent / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFL_")}
        env.pop("NOTIFY_SOCKET", None)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def signal(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(20)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


async def wait_for(predicate: Callable[[], bool], within: float, agent: AgentProcess) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in time; agent log:\n{agent.tail()}")
        await asyncio.sleep(0.1)


def spooled(state: Path) -> int:
    return len(list((state / "spool").glob("u-*.upd"))) if (state / "spool").is_dir() else 0


@contextlib.asynccontextmanager
async def agent_holding_v0(tmp: Path, url: str) -> AsyncIterator[tuple[Aggregator, AgentProcess]]:
    """The aggregator running and the agent process started and holding model v0; on the way
    out the agent is killed (if still running) and the aggregator stopped."""
    agent = AgentProcess(write_config(tmp, url))
    agg = aggregator(tmp, url)
    ready = asyncio.Event()
    agg_task = asyncio.create_task(agg.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        agent.start()
        await wait_for(lambda: (tmp / "state" / "model/current").exists(), 30, agent)
        yield agg, agent
    finally:
        agent.close()
        agg.stop()
        await agg_task


async def update_spooled_while_broker_down(
    mosquitto: MosquittoBroker, tmp: Path, agent: AgentProcess
) -> float:
    """The broker goes away, then the device is plugged in and spools the update it trains;
    returns when the broker went down (``time.monotonic``)."""
    await asyncio.to_thread(mosquitto.stop)
    down_at = time.monotonic()
    write_fake_sysfs(tmp / "fs", mains=True)
    await wait_for(lambda: spooled(tmp / "state") == 1, 60, agent)
    return down_at


def aggregator(tmp: Path, url: str) -> Aggregator:
    return fleet_parts.aggregator(tmp, url, fleet=FLEET, model=MODEL, buffer_size=10)


async def retained_state(url: str) -> DeviceState:
    async with MqttTransport(MqttConfig.from_url(url, client_id="reader")) as reader:
        await reader.subscribe(device_state_topic(FLEET, DEVICE))
        async with asyncio.timeout(10):
            async for message in reader.messages():
                return decode_message(message.payload, DeviceState)
    raise AssertionError("no retained state")


async def test_sigkill_with_spooled_update_then_restart_delivers_exactly_once(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange
    state = tmp_path / "state"
    async with agent_holding_v0(tmp_path, mosquitto.url) as (agg, agent):
        await update_spooled_while_broker_down(mosquitto, tmp_path, agent)
        # Act: crash with the update in the spool, broker back, agent restarted
        assert agent.signal(signal.SIGKILL) == -signal.SIGKILL
        await asyncio.to_thread(mosquitto.start)
        agent.start()
        await wait_for(lambda: agg.statistics().applied == 1, 60, agent)
        await wait_for(lambda: spooled(state) == 0, 30, agent)
        await asyncio.sleep(1.5)  # a duplicate, if any, would arrive by now
        code = agent.signal(signal.SIGTERM)
        final = await retained_state(mosquitto.url)

    # Assert: counted once; the restart did not train v0 again; clean stop -> offline
    stats = agg.statistics()
    assert stats.applied == 1
    assert stats.received - stats.rejected.get("duplicate", 0) == 1
    assert code == 0, agent.tail()
    assert final.status is DeviceStatus.OFFLINE
    assert final.session == 2  # one session per process run here (the broker never returned)
    assert final.updates_sent == 1
    assert "update 0 spooled" in agent.log.read_text()
    assert agent.log.read_text().count("training on model v0") == 1


@pytest.mark.slow
async def test_broker_down_for_20s_agent_delivers_afterwards(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange
    state = tmp_path / "state"
    async with agent_holding_v0(tmp_path, mosquitto.url) as (agg, agent):
        # Act: broker down 20 s; meanwhile the device trains and spools its update
        down_at = await update_spooled_while_broker_down(mosquitto, tmp_path, agent)
        await asyncio.sleep(max(0.0, 20.0 - (time.monotonic() - down_at)))
        assert agg.statistics().applied == 0
        await asyncio.to_thread(mosquitto.start)
        up_at = time.monotonic()
        await wait_for(lambda: agg.statistics().applied == 1, 30, agent)
        delivered_after = time.monotonic() - up_at
        # the update leaves the spool when the aggregator's receipt arrives (after its commit)
        await wait_for(lambda: spooled(state) == 0, 30, agent)
        assert agent.signal(signal.SIGTERM) == 0
    downtime, delivered_after = up_at - down_at, delivered_after

    # Assert
    assert downtime >= 20.0
    assert delivered_after < 15.0  # reconnect backoff is capped at 2 s here
    assert spooled(state) == 0
    assert agg.statistics().applied == 1
