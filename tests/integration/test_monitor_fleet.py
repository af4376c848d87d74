"""``edgefl monitor --once --json`` against a running fleet: the real aggregator (FedBuff, K=3)
and three real device agents on a real Mosquitto. The snapshot (taken by the CLI in a separate
process) must agree with what the aggregator and the agents report about themselves: device
count, states and eligibility reasons, model versions held, the current version, buffer fill,
applied updates."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import fleet_parts
import numpy as np
import pytest
from agent_files import agent_config
from sklearn.datasets import load_digits
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.agent import DeviceAgent
from device_agent.dataset import LocalDataset
from edgefl.aggregator import Aggregator
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

FLEET, MODEL, K = "orchard", "digits-mlp", 3
DEVICES = ("pi-1", "pi-2", "pi-3")


def agent(tmp: Path, url: str, device: str, seed: int, **fields: Any) -> DeviceAgent:
    config = agent_config(tmp, url, fleet=FLEET, device=device, state_dir=tmp / device, **fields)
    digits = load_digits()
    rows = slice(seed * 200, seed * 200 + 200)
    x = (digits.data[rows] / 16.0).astype(np.float32)
    data = LocalDataset.split(x, digits.target[rows].astype(np.int64), 0.2, seed=seed)
    return DeviceAgent(config, dataset=data)


async def monitor_once(url: str, *options: str) -> dict[str, Any]:
    """``edgefl monitor --once --json`` (a process) with more ``options``: its snapshot."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "edgefl.monitor",
        "--broker",
        url,
        "--fleet",
        FLEET,
        "--once",
        "--json",
        "--wait",
        "5",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    snapshot: dict[str, Any] = json.loads(out)
    return snapshot


async def test_once_json_matches_a_running_aggregator_and_agents(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    write_fake_sysfs(tmp_path / "fs", mains=True)
    aggregator = fleet_parts.aggregator(
        tmp_path, mosquitto.url, fleet=FLEET, model=MODEL, buffer_size=K, metrics_interval_s=0.5
    )
    agents = [agent(tmp_path, mosquitto.url, d, i) for i, d in enumerate(DEVICES)]

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        ready = asyncio.Event()
        agg_task = asyncio.create_task(aggregator.run(ready))
        await asyncio.wait_for(ready.wait(), 30)
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            # the fleet trains: K=3 updates per version from three devices
            await eventually(lambda: aggregator.statistics().version >= 2, 45)
            live = await monitor_once(mosquitto.url)

            # unplug every device: they stop training and report why; the fleet settles
            write_fake_sysfs(tmp_path / "fs", mains=False)
            for a in agents:
                a.check_now()
            await eventually(lambda: all(a.statistics().reasons == ("on_battery",) for a in agents))
            await eventually(lambda: all(a.statistics().spool_depth == 0 for a in agents))
            version = aggregator.statistics().version
            await eventually(lambda: all(a.statistics().model_version == version for a in agents))
            await asyncio.sleep(1.5)  # > metrics interval: the retained server state is current
            settled = await monitor_once(mosquitto.url)
            return live, settled
        finally:
            for a in agents:
                a.stop()
            await asyncio.gather(*tasks)
            aggregator.stop()
            await agg_task

    live, settled = await scenario()

    assert_live_snapshot_shows_the_training_fleet(live)
    assert_settled_snapshot_matches_the_services(settled, aggregator, agents)


def assert_live_snapshot_shows_the_training_fleet(live: dict[str, Any]) -> None:
    """While training: every device is there and connected, the server reports K."""
    assert sorted(d["device_id"] for d in live["devices"]) == list(DEVICES)
    assert {d["status"] for d in live["devices"]} <= {"online", "idle", "training"}
    assert live["aggregator"]["status"] == "online"
    assert live["aggregator"]["buffer_size"] == K
    assert live["aggregator"]["version"] >= 2
    assert live["model"]["version"] >= 2


def assert_settled_snapshot_matches_the_services(
    settled: dict[str, Any], aggregator: Aggregator, agents: list[DeviceAgent]
) -> None:
    """Settled: the snapshot agrees with the services' own statistics."""
    stats = aggregator.statistics()
    agg = settled["aggregator"]
    assert (agg["version"], agg["buffer_fill"], agg["buffer_size"]) == (
        stats.version,
        stats.buffer_fill,
        K,
    )
    assert agg["applied"] == stats.applied
    assert agg["applied"] >= 2 * K
    assert settled["model"]["version"] == stats.version
    assert settled["model"]["model"] == MODEL
    assert settled["counts"] == {"idle": len(DEVICES)}
    by_id = {d["device_id"]: d for d in settled["devices"]}
    assert sorted(by_id) == list(DEVICES)
    for a in agents:
        s = a.statistics()
        d = by_id[s.device_id]
        assert (d["status"], d["reasons"], d["session"]) == ("idle", ["on_battery"], s.session)
        assert (d["model_version"], d["model_staleness"]) == (stats.version, 0)
        assert d["updates_sent"] == s.updates_sent >= 2
