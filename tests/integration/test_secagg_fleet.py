"""Real device agents (torch training on digits) with the two secure-aggregation roles, over a real
Mosquitto: the agents read the leader's announcement, send every update as two shares, and
follow the versions the leader steps from the decoded sums; the model learns, and the leader's
held-out evaluation (``eval_dataset``) shows it in METRICS ``accuracy``."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import agent_files
import numpy as np
import pytest
from sklearn.datasets import load_digits
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.agent import DeviceAgent
from device_agent.config import SecurityConfig
from device_agent.dataset import LocalDataset
from edgefl.aggregator import AggregatorConfig
from edgefl.aggregator.secagg_config import SecAggSettings
from edgefl.aggregator.secagg_helper import HelperService
from edgefl.aggregator.secagg_leader import LeaderService, leader_state_path
from edgefl.aggregator.secagg_store import LeaderStore
from edgefl.models.spec import get_model_spec
from edgefl.protocol.messages import ServerMetrics, decode_message
from edgefl.protocol.topics import server_metrics_topic
from edgefl.secagg import HelperKeys
from edgefl.transport import MqttConfig, MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = pytest.mark.integration

FLEET, MODEL = "safleet", "digits-mlp"


def _data(part: int) -> LocalDataset:
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    rows = slice(300 * part, 300 * (part + 1))
    return LocalDataset.split(x[rows], d.target[rows].astype(np.int64), 0.2, seed=part)


def _accuracy(weights: np.ndarray) -> float:
    import torch

    from edgefl.models.torch_models import build_module, load_flat

    d = load_digits()
    x, y = (d.data[1200:] / 16.0).astype(np.float32), d.target[1200:]
    module = build_module(get_model_spec(MODEL))
    load_flat(module, weights.copy())
    module.eval()
    with torch.no_grad():
        return float((module(torch.from_numpy(x)).numpy().argmax(axis=1) == y).mean())


class _MetricsWatch:
    """The fleet's METRICS, as an operator's monitor receives them."""

    def __init__(self, url: str) -> None:
        self._transport = MqttTransport(MqttConfig.from_url(url, client_id="observer"))
        self.seen: list[ServerMetrics] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._transport.__aenter__()
        await self._transport.subscribe(server_metrics_topic(FLEET), qos=0)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._transport.messages():
            self.seen.append(decode_message(message.payload, ServerMetrics))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._transport.__aexit__(None, None, None)

    def evaluated(self) -> list[ServerMetrics]:
        """The METRICS carrying the held-out accuracy of a committed version."""
        return [m for m in self.seen if m.accuracy is not None and m.version >= 1]

    def check_stored(self, state_dir: Path) -> None:
        """The accuracy shown last is one the leader wrote into its history."""
        store = LeaderStore(leader_state_path(state_dir), fsync=False)
        measured = {v: a for v, _, a in store.history() if a is not None}
        store.close()
        assert max(measured) >= 1
        assert self.evaluated()[-1].accuracy in measured.values()


async def test_agents_train_through_secure_aggregation(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: leader and helper (K = 2), three agents holding the helper's public key
    keys = HelperKeys.generate()
    key_file = tmp_path / "helper.pub"
    key_file.write_bytes(keys.public_pem())
    settings = SecAggSettings(helper_key=key_file)

    def role_config(name: str) -> AggregatorConfig:
        return AggregatorConfig.build(
            broker_url=mosquitto.url, fleet=FLEET, model=MODEL, state_dir=tmp_path / name,
            buffer_size=2, lr=0.1, local_epochs=2, fsync=False,
        )  # fmt: skip

    evaluating = role_config("leader").replace(eval_dataset="digits", metrics_interval_s=0.5)
    leader = LeaderService(evaluating, settings, keys.public_key)
    helper = HelperService(role_config("helper"), settings, keys)
    initial = _accuracy(leader.core.weights)
    ready = [asyncio.Event(), asyncio.Event()]
    roles = [asyncio.create_task(leader.run(ready[0])), asyncio.create_task(helper.run(ready[1]))]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 30)
    agents = []
    for i in range(3):
        home = tmp_path / f"dev{i}"
        write_fake_sysfs(home / "fs")
        cfg = agent_files.agent_config(
            home, mosquitto.url, fleet=FLEET, device=f"dev{i}", state_dir=home / "state",
            security=SecurityConfig(helper_public_key_file=key_file),
        )  # fmt: skip
        agents.append(DeviceAgent(cfg, dataset=_data(i)))
    running = [asyncio.create_task(a.run()) for a in agents]
    watch = _MetricsWatch(mosquitto.url)
    await watch.start()

    # Act: four server steps, each the decoded sum of two agents' shares
    try:
        await eventually(lambda: leader.version >= 4, 120, what="version 4")
        await eventually(lambda: all((a.statistics().model_version or 0) >= 3 for a in agents), 60)
        combined = leader.statistics()["combined"]  # receipted to the agents once written

        def receipted() -> int:
            return sum(a.statistics().delivery.receipted for a in agents)

        await eventually(lambda: receipted() >= combined, 30, what=f"{combined} receipts")
        await eventually(lambda: bool(watch.evaluated()), 30, what="a METRICS accuracy")
    finally:  # (a failed wait must not leave the agents and roles running)
        await watch.close()
        for agent in agents:
            agent.stop()
        await asyncio.gather(*running)
        leader.stop()
        helper.stop()
        await asyncio.gather(*roles)

    # Assert
    stats = leader.statistics()
    assert stats["combined"] >= 8
    assert stats["accepted"] >= stats["combined"]  # (a PUBACK may be in flight at the stop)
    assert all(a.statistics().updates_sent >= 1 for a in agents)
    assert all(not a.statistics().dropped for a in agents)
    # the leader's receipts: the agents kept their pairs until it said they were combined
    delivery = [a.statistics().delivery for a in agents]
    assert all(d.receipts for d in delivery)
    assert not [d.receipt_rejected for d in delivery if d.receipt_rejected]
    assert helper.helper.statistics()["accepted"] >= stats["combined"]
    assert not [k for k in stats if k.startswith("secagg_") and stats[k]]
    final = _accuracy(leader.core.weights)
    print(f"held-out accuracy: v0 {initial:.3f}, v{leader.version} {final:.3f}")
    assert final > initial + 0.2
    watch.check_stored(tmp_path / "leader")  # the leader's evaluation: METRICS and history
