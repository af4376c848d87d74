"""Central DP at the secure-aggregation leader, end to end over a real Mosquitto: the leader and
the helper run through the CLI (``edgefl aggregator --role leader --dp central:...``), three
real agents train on digits and send share pairs. The leader caps each device's participations,
publishes ε in its retained server state and METRICS, adds noise to every release, and keeps
the counts across a SIGKILL."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import agent_files
import numpy as np
import pytest
from fleet_parts import killed_at_exit, start_aggregator_process, stop_cleanly
from sklearn.datasets import load_digits
from waiting import eventually

from broker.launcher import MosquittoBroker
from device_agent.agent import DeviceAgent
from device_agent.config import SecurityConfig
from device_agent.dataset import LocalDataset
from edgefl.aggregation import ExampleWeighting, Normalisation
from edgefl.aggregator import AggregatorConfig, NormBoundSetting
from edgefl.aggregator.secagg_leader import leader_state_path
from edgefl.aggregator.service import initial_state
from edgefl.aggregator.store import decode_state
from edgefl.privacy import CentralDP
from edgefl.protocol.messages import ServerMetrics, ServerState, decode_message
from edgefl.protocol.topics import (
    secagg_seed_topic,
    secagg_share_topic,
    server_metrics_topic,
    server_state_topic,
)
from edgefl.secagg import HelperKeys
from edgefl.secagg.wire import UpdateMeta, build_share_envelopes, spec_of
from edgefl.transport import MqttConfig, MqttTransport
from firmware_sim.fake_sysfs import write_fake_sysfs

pytestmark = pytest.mark.integration

FLEET, MODEL, K, CAP = "sadp", "digits-mlp", 2, 2
DP_TEXT = f"central:z=0.5,C=1,cap={CAP},seed=11"
DP = CentralDP(clip_norm=1.0, noise_multiplier=0.5, target_epsilon=None, max_participations=CAP)


def _data(part: int) -> LocalDataset:
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    rows = slice(300 * part, 300 * (part + 1))
    return LocalDataset.split(x[rows], d.target[rows].astype(np.int64), 0.2, seed=part)


def _start(role: str, url: str, state_dir: Path, key: Path) -> subprocess.Popen[str]:
    args = [
        "--broker", url, "--fleet", FLEET, "--model", MODEL, "--state-dir", str(state_dir),
        "--buffer-size", str(K), "--no-participation", "--no-fsync", "--metrics-interval", "1",
        "--local-epochs", "2", "--role", role, "--helper-key", str(key), "--dp", DP_TEXT,
    ]  # fmt: skip
    return start_aggregator_process(args, state_dir)


def _committed(state_dir: Path) -> tuple[int, np.ndarray | None, dict[str, int], dict[str, int]]:
    """The leader's committed version, weights, participations and refusals (its SQLite file)."""
    path = leader_state_path(state_dir)
    if not path.exists():
        return 0, None, {}, {}
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT version, state FROM model WHERE id = 1").fetchone()
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    if row is None:
        return 0, None, {}, {}
    counts = meta.get("privacy", {}).get("participations", {})
    return int(row[0]), decode_state(row[1]).weights, counts, meta.get("refused", {})


class _Observer:
    """The latest retained server state and METRICS of the fleet."""

    def __init__(self) -> None:
        self.state: ServerState | None = None
        self.metrics: ServerMetrics | None = None

    async def run(self, transport: MqttTransport) -> None:
        await transport.subscribe(server_state_topic(FLEET), qos=1)
        await transport.subscribe(server_metrics_topic(FLEET), qos=0)
        async for message in transport.messages():
            if message.topic == server_state_topic(FLEET) and message.payload:
                self.state = decode_message(message.payload, ServerState)
            elif message.topic == server_metrics_topic(FLEET):
                self.metrics = decode_message(message.payload, ServerMetrics)


async def _send_by_hand(url: str, state: ServerState, helper: HelperKeys, device: str) -> None:
    """``device`` sends one more update (seq 1000) as a share pair."""
    assert state.secagg is not None
    meta = UpdateMeta(FLEET, device, 1000, state.version, 10, MODEL, time.time())
    delta = np.full(2410, 0.001, np.float32)
    built = build_share_envelopes(
        delta, meta, spec_of(state.secagg), helper.public_key, rng=np.random.default_rng(0)
    )
    config = MqttConfig.from_url(url, client_id=f"by-hand-{time.monotonic_ns()}")
    async with MqttTransport(config) as transport:
        await transport.publish(secagg_share_topic(FLEET, device, 1000), built.share, qos=1)
        await transport.publish(secagg_seed_topic(FLEET, device, 1000), built.seed, qos=1)


def _keys(tmp_path: Path) -> tuple[HelperKeys, Path, Path]:
    keys = HelperKeys.generate()
    private, public = tmp_path / "helper.pem", tmp_path / "helper.pub"
    private.write_bytes(keys.private_pem())
    public.write_bytes(keys.public_pem())
    return keys, private, public


def _initial(url: str, state_dir: Path) -> np.ndarray:
    """The leader's version 0."""
    config = AggregatorConfig.build(
        url, FLEET, MODEL, state_dir, buffer_size=K,
        normalisation=Normalisation.SUM, norm_bound=NormBoundSetting.OFF,
        example_weighting=ExampleWeighting.EQUAL, privacy=DP,
    )  # fmt: skip
    return initial_state(config).weights


def _capped(observer: _Observer) -> bool:
    """A device reached the cap and a later update of one was refused."""
    s = observer.state
    return (
        s is not None
        and s.privacy is not None
        and s.privacy.participation_max == CAP
        and s.rejected.get("dp_budget_exhausted", 0) >= 1
    )


def _settled(observer: _Observer, since: float) -> bool:
    """A METRICS of at least 1 s after ``since`` shows no open decision and every held share
    complete: nothing the leader holds can still become a step (fewer than K complete)."""
    m = observer.metrics
    if m is None or m.at < since + 1.0:
        return False
    extra = m.extra
    return extra["secagg_open_decision"] is None and (
        extra["secagg_pending"] == extra["secagg_complete"]
    )


async def _train_until_capped(url: str, public: Path, home: Path, observer: _Observer) -> None:
    """Three agents (each its third of digits) train until :func:`_capped`, then stop."""
    agents = []
    for i in range(3):
        root = home / f"dev{i}"
        write_fake_sysfs(root / "fs")
        cfg = agent_files.agent_config(
            root, url, fleet=FLEET, device=f"dev{i}", state_dir=root / "state",
            security=SecurityConfig(helper_public_key_file=public),
        )  # fmt: skip
        agents.append(DeviceAgent(cfg, dataset=_data(i)))
    running = [asyncio.create_task(a.run()) for a in agents]
    try:
        await eventually(lambda: _capped(observer), 180, interval=0.2, what="a capped device")
    finally:
        for agent in agents:
            agent.stop()
        await asyncio.gather(*running)


@pytest.mark.slow
async def test_dp_at_the_leader_caps_devices_publishes_epsilon_and_survives_sigkill(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: helper and leader through the CLI with --dp; the agents hold the helper's key
    keys, private, public = _keys(tmp_path)
    url, leader_dir = mosquitto.url, tmp_path / "leader"
    observer = _Observer()
    with killed_at_exit() as procs:
        procs.append(await asyncio.to_thread(_start, "helper", url, tmp_path / "helper", private))
        procs.append(await asyncio.to_thread(_start, "leader", url, leader_dir, public))
        async with MqttTransport(MqttConfig.from_url(url, client_id="observer")) as transport:
            observing = asyncio.create_task(observer.run(transport))

            # Act 1: train until devices reach their cap and are refused
            await _train_until_capped(url, public, tmp_path, observer)
            stopped = time.time()
            await eventually(lambda: _settled(observer, stopped), 90, what="no buffer in flight")
            before = _committed(leader_dir)
            state, metrics = observer.state, observer.metrics

            # Act 2: SIGKILL the leader, start it again, a capped device sends once more
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait()
            assert state is not None
            procs.append(await asyncio.to_thread(_start, "leader", url, leader_dir, public))
            await eventually(
                lambda: observer.state is not None and observer.state.session > state.session,
                30,
                what="the restarted leader's state",
            )
            restarted = observer.state
            assert restarted is not None
            capped = next(d for d, n in before[2].items() if n == CAP)
            refused = before[3].get("dp_budget_exhausted", 0)
            await _send_by_hand(url, restarted, keys, capped)
            await eventually(
                lambda: _committed(leader_dir)[3].get("dp_budget_exhausted", 0) > refused,
                30,
                what="the capped device refused after the restart",
            )
            observing.cancel()
        stop_cleanly(procs[0], procs[2])

    # Assert: every release counted once per member, nobody past the cap
    version, weights, counts, _ = _committed(leader_dir)
    assert version == before[0] >= 2
    assert counts == before[2]
    assert sum(counts.values()) == K * version
    assert max(counts.values()) == CAP
    # Assert: ε published as the plaintext aggregator does, the announced clip is the DP's C
    assert state.privacy is not None
    assert state.privacy.epsilon == pytest.approx(DP.epsilon(CAP))
    assert (state.privacy.participation_cap, state.privacy.clip_norm) == (CAP, 1.0)
    assert state.secagg is not None
    assert state.secagg.clip_norm == DP.clip_norm
    assert metrics is not None
    assert metrics.extra["dp_participation_cap"] == CAP
    assert restarted.privacy is not None
    assert restarted.privacy.participation_max == CAP  # the counts came back from SQLite
    assert restarted.privacy.devices == len(counts)
    # Assert: the releases are noisy. Each step moves the model by at most C = 1 without noise
    # (sum normalisation, weights <= W_max); the noise adds about z·C·sqrt(P)/K = 12 per step.
    assert weights is not None
    moved = float(np.linalg.norm(weights - _initial(url, leader_dir)))
    print(f"v{version}, participations {counts}, moved {moved:.1f}")
    assert moved > 2.0 * version
