"""Secure aggregation against a real Mosquitto: the leader and the helper as services, devices
publishing the two share envelopes of each update.

* a small fleet reaches the model plaintext FedBuff reaches on the same updates (within the
  fixed-point rounding);
* the helper never receives a masked share (a client with the helper's subscriptions, and the
  helper service's own log of what it handled);
* SIGKILL of the helper and of the leader, run through the CLI, loses no accepted update and
  double-counts none: the final model equals the reference, whose every step is the mean of
  exactly its buffer's updates.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from fleet_parts import killed_at_exit, start_aggregator_process, stop_cleanly
from waiting import eventually

from broker.launcher import MosquittoBroker
from edgefl.aggregation import ExampleWeighting, FedBuff
from edgefl.aggregator import AggregatorConfig, NormBoundSetting
from edgefl.aggregator.secagg_config import SecAggSettings
from edgefl.aggregator.secagg_helper import HelperService
from edgefl.aggregator.secagg_leader import LeaderService, leader_state_path
from edgefl.aggregator.service import initial_state
from edgefl.aggregator.store import decode_state
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope
from edgefl.protocol.messages import Receipt, decode_message
from edgefl.protocol.topics import (
    receipts_filter,
    secagg_decision_topic,
    secagg_seed_topic,
    secagg_seeds_filter,
    secagg_share_topic,
)
from edgefl.secagg import HelperKeys, RingSpec
from edgefl.secagg.wire import UpdateMeta, build_share_envelopes
from edgefl.transport import InboundMessage, MqttConfig, MqttTransport

pytestmark = pytest.mark.integration

FLEET = "sa"
MODEL = "digits-mlp"
NUM_PARAMS = 2410
K = 3


def _config(url: str, state_dir: Path) -> AggregatorConfig:
    return AggregatorConfig.build(
        broker_url=url,
        fleet=FLEET,
        model=MODEL,
        state_dir=state_dir,
        buffer_size=K,
        norm_bound=NormBoundSetting.OFF,
        example_weighting=ExampleWeighting.EQUAL,
        fsync=False,
    )


def _keys(tmp_path: Path) -> tuple[HelperKeys, Path, Path]:
    keys = HelperKeys.generate()
    private, public = tmp_path / "helper.pem", tmp_path / "helper.pub.pem"
    private.write_bytes(keys.private_pem())
    public.write_bytes(keys.public_pem())
    return keys, private, public


def _delta(i: int) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    return (rng.standard_normal(NUM_PARAMS) * 0.004).astype(np.float32)  # norm ~0.2 < C


def _reference(config: AggregatorConfig, rounds: list[list[int]]) -> np.ndarray:
    """Plaintext FedBuff on the same deltas: one step per buffer."""
    core = FedBuff.restore(config.fedbuff_config(), initial_state(config))
    for members in rounds:
        for i in members:
            core.add(_delta(i), base_version=core.version, num_examples=10)
        core.step()
    return core.weights.copy()


async def _send(
    url: str, spec: RingSpec, keys: HelperKeys, i: int, base: int, *, only: str | None = None
) -> None:
    """Device ``d<i>`` sends update ``i`` (seq 1) as its two envelopes (``only``: just the
    ``"share"`` or the ``"seed"``, a device that dropped out in between)."""
    device = f"d{i}"
    meta = UpdateMeta(FLEET, device, 1, base, 10, MODEL, time.time())
    built = build_share_envelopes(
        _delta(i), meta, spec, keys.public_key, rng=np.random.default_rng(i)
    )
    config = MqttConfig.from_url(url, client_id=f"dev-{device}-{time.monotonic_ns()}")
    async with MqttTransport(config) as transport:
        if only != "seed":
            await transport.publish(secagg_share_topic(FLEET, device, 1), built.share, qos=1)
        if only != "share":
            await transport.publish(secagg_seed_topic(FLEET, device, 1), built.seed, qos=1)


async def _next_version(leader: LeaderService, want: int) -> None:
    await eventually(lambda: leader.version >= want, what=f"version {want}")


async def test_secagg_fleet_reaches_the_plaintext_model_and_the_helper_sees_no_share(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange
    keys, _, _ = _keys(tmp_path)
    settings = SecAggSettings(helper_key=tmp_path / "unused")
    leader_cfg = _config(mosquitto.url, tmp_path / "leader")
    helper_cfg = _config(mosquitto.url, tmp_path / "helper")
    leader = LeaderService(leader_cfg, settings, keys.public_key)
    helper = HelperService(helper_cfg, settings, keys)
    handled: list[str] = []
    handle = helper.handle

    async def logging_handle(message: InboundMessage) -> None:
        handled.append(message.topic)
        await handle(message)

    helper.handle = logging_handle  # type: ignore[method-assign]
    sniffed: list[InboundMessage] = []
    sniffer_cfg = MqttConfig.from_url(mosquitto.url, client_id="as-the-helper")
    ready_l, ready_h = asyncio.Event(), asyncio.Event()
    spec = leader.spec

    async def sniff(transport: MqttTransport) -> None:
        async for message in transport.messages():
            sniffed.append(message)

    async with MqttTransport(sniffer_cfg) as sniffer:
        await sniffer.subscribe(secagg_seeds_filter(FLEET), qos=1)
        await sniffer.subscribe(secagg_decision_topic(FLEET), qos=1)
        sniffing = asyncio.create_task(sniff(sniffer))
        tasks = [asyncio.create_task(leader.run(ready_l)), asyncio.create_task(helper.run(ready_h))]
        await asyncio.wait_for(asyncio.gather(ready_l.wait(), ready_h.wait()), 30)

        # Act: two buffers; the second trained on version 1
        await asyncio.gather(*(_send(mosquitto.url, spec, keys, i, 0) for i in range(K)))
        await _next_version(leader, 1)
        await asyncio.gather(*(_send(mosquitto.url, spec, keys, i, 1) for i in range(K, 2 * K)))
        await _next_version(leader, 2)
        leader.stop()
        helper.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        sniffing.cancel()

    # Assert: the model, update for update
    got = leader.core.weights
    first = {k for k, _ in leader.leader.snapshot().closed}
    assert len(first) == 2 * K
    expected = _reference(leader_cfg, [list(range(K)), list(range(K, 2 * K))])
    step = 1.0 / spec.scale  # per coordinate and per update, at most
    assert np.max(np.abs(got - expected)) <= 2 * step + 1e-6
    assert np.max(np.abs(got - initial_state(leader_cfg).weights)) > 100 * step
    assert leader.statistics()["combined"] == 2 * K
    # Assert: the helper received seeds and decisions, never a masked share
    kinds = {decode_envelope(m.payload, max_payload=1 << 20).kind for m in sniffed}
    assert kinds == {EnvelopeKind.SECAGG_SEED, EnvelopeKind.SECAGG_COORD}
    assert len(handled) == 2 * K + 2
    assert not [t for t in handled if "/secagg/share/" in t]


async def test_a_device_that_sent_one_share_only_is_excluded_and_blocks_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: one share waits at most 1 s for the other
    keys, _, _ = _keys(tmp_path)
    settings = SecAggSettings(helper_key=tmp_path / "unused", share_timeout_s=1.0)
    leader_cfg = _config(mosquitto.url, tmp_path / "leader")
    leader = LeaderService(leader_cfg, settings, keys.public_key)
    helper = HelperService(_config(mosquitto.url, tmp_path / "helper"), settings, keys)
    ready_l, ready_h = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(leader.run(ready_l)), asyncio.create_task(helper.run(ready_h))]
    await asyncio.wait_for(asyncio.gather(ready_l.wait(), ready_h.wait()), 30)
    url, spec = mosquitto.url, leader.spec
    stats = leader.statistics

    # Act: d8 sends its seed only, d9 its share only; then two full buffers
    await _send(url, spec, keys, 8, 0, only="seed")
    await _send(url, spec, keys, 9, 0, only="share")
    await asyncio.gather(*(_send(url, spec, keys, i, 0) for i in range(K)))
    await _next_version(leader, 1)
    await eventually(lambda: stats().get("secagg_missing_leader_share", 0) == 1, what="d8 out")
    await eventually(lambda: stats().get("secagg_missing_helper_share", 0) == 1, what="d9 out")
    await asyncio.gather(*(_send(url, spec, keys, i, 1) for i in range(K, 2 * K)))
    await _next_version(leader, 2)
    leader.stop()
    helper.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)

    # Assert: the two buffers are exactly the complete updates; the helper dropped d8's seed
    expected = _reference(leader_cfg, [list(range(K)), list(range(K, 2 * K))])
    assert np.max(np.abs(leader.core.weights - expected)) <= 2.0 / spec.scale + 1e-6
    assert stats()["combined"] == 2 * K
    assert helper.helper.statistics().get("secagg_dropped_by_leader") == 1
    assert helper.helper.statistics()["held"] == 2 * K - K  # the last buffer's, until superseded


# -- crashes -----------------------------------------------------------------------------------


def _start(role: str, url: str, state_dir: Path, key: Path) -> subprocess.Popen[str]:
    args = [
        "--broker", url, "--fleet", FLEET, "--model", MODEL, "--state-dir", str(state_dir),
        "--buffer-size", str(K), "--norm-bound", "off", "--example-weighting", "equal",
        "--no-participation", "--no-fsync", "--role", role, "--helper-key", str(key),
    ]  # fmt: skip
    return start_aggregator_process(args, state_dir)


def _committed(state_dir: Path) -> tuple[int, np.ndarray | None, int]:
    """The leader's committed (version, weights, combined) from its SQLite file."""
    path = leader_state_path(state_dir)
    if not path.exists():
        return 0, None, 0
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT version, state FROM model WHERE id = 1").fetchone()
        combined = db.execute("SELECT value FROM meta WHERE key = 'combined'").fetchone()
    if row is None:
        return 0, None, 0
    return int(row[0]), decode_state(row[1]).weights, 0 if combined is None else int(combined[0])


def _wait_version(state_dir: Path, version: int, timeout: float = 30.0) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, weights, _ = _committed(state_dir)
        if got >= version and weights is not None:
            return weights
        time.sleep(0.1)
    raise AssertionError(f"version {version} not committed: {_committed(state_dir)[0]}")


@pytest.mark.slow
async def test_sigkill_of_helper_and_leader_loses_and_double_counts_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange
    keys, private, public = _keys(tmp_path)
    leader_dir, helper_dir = tmp_path / "leader", tmp_path / "helper"
    spec = SecAggSettings(helper_key=public).ring(K)
    rng = random.Random(int(os.environ.get("EDGEFL_CRASH_SEED", "20261204")))
    with killed_at_exit() as procs:
        procs += [
            await asyncio.to_thread(_start, "helper", mosquitto.url, helper_dir, private),
            await asyncio.to_thread(_start, "leader", mosquitto.url, leader_dir, public),
        ]
        helper, leader = procs
        # Act 1: the helper dies with seeds of the first buffer in its store (or not yet)
        await _send(mosquitto.url, spec, keys, 0, 0)
        await _send(mosquitto.url, spec, keys, 1, 0)
        helper.send_signal(signal.SIGKILL)
        helper.wait()
        await _send(mosquitto.url, spec, keys, 2, 0)  # its seed waits in the broker
        helper = await asyncio.to_thread(_start, "helper", mosquitto.url, helper_dir, private)
        procs.append(helper)
        await asyncio.to_thread(_wait_version, leader_dir, 1)

        # Act 2: the leader dies with the second buffer in flight
        await _send(mosquitto.url, spec, keys, 3, 1)
        await _send(mosquitto.url, spec, keys, 4, 1)
        leader.send_signal(signal.SIGKILL)
        leader.wait()
        await _send(mosquitto.url, spec, keys, 5, 1)
        leader = await asyncio.to_thread(_start, "leader", mosquitto.url, leader_dir, public)
        procs.append(leader)
        await asyncio.to_thread(_wait_version, leader_dir, 2)

        # Act 3: both die at a random point of the third buffer's life (decision, partial, step)
        await asyncio.gather(*(_send(mosquitto.url, spec, keys, i, 2) for i in range(6, 9)))
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        for proc in (leader, helper):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        helper = await asyncio.to_thread(_start, "helper", mosquitto.url, helper_dir, private)
        leader = await asyncio.to_thread(_start, "leader", mosquitto.url, leader_dir, public)
        procs += [helper, leader]
        weights = await asyncio.to_thread(_wait_version, leader_dir, 3)

        # Act 4: a clean stop
        stop_cleanly(leader, helper)

    # Assert: every update counted exactly once
    config = _config(mosquitto.url, leader_dir)
    expected = _reference(config, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    assert np.max(np.abs(weights - expected)) <= 2.0 / spec.scale + 1e-6
    version, _, combined = _committed(leader_dir)
    assert (version, combined) == (3, 3 * K)


async def test_the_leader_receipts_each_pair_once_its_verdict_is_durable(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    # Arrange: one share waits at most 1 s for the other; a client reading the receipts
    keys, _, _ = _keys(tmp_path)
    settings = SecAggSettings(helper_key=tmp_path / "unused", share_timeout_s=1.0)
    leader = LeaderService(_config(mosquitto.url, tmp_path / "leader"), settings, keys.public_key)
    helper = HelperService(_config(mosquitto.url, tmp_path / "helper"), settings, keys)
    ready_l, ready_h = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(leader.run(ready_l)), asyncio.create_task(helper.run(ready_h))]
    await asyncio.wait_for(asyncio.gather(ready_l.wait(), ready_h.wait()), 30)
    url, spec = mosquitto.url, leader.spec
    receipts: dict[str, Receipt] = {}
    reader_cfg = MqttConfig.from_url(url, client_id="receipt-reader")
    async with MqttTransport(reader_cfg) as reader:
        await reader.subscribe(receipts_filter(FLEET), qos=1)

        async def read() -> None:
            async for message in reader.messages():
                receipt = decode_message(message.payload, Receipt)
                receipts[receipt.device_id] = receipt

        reading = asyncio.create_task(read())

        # Act: d9 sends its share only; a full buffer of d0..d2
        await _send(url, spec, keys, 9, 0, only="share")
        await asyncio.gather(*(_send(url, spec, keys, i, 0) for i in range(K)))
        await _next_version(leader, 1)
        want = {f"d{i}" for i in (*range(K), 9)}
        await eventually(lambda: set(receipts) == want, what="a receipt for every device")
        reading.cancel()
    leader.stop()
    helper.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)

    # Assert: the buffer's members committed, d9 refused for good, by reason
    for i in range(K):
        assert receipts[f"d{i}"].committed == ((1, 1),)
        assert not receipts[f"d{i}"].rejected
    assert receipts["d9"].rejected == {1: "secagg_missing_helper_share"}
    assert not receipts["d9"].committed
    assert leader.statistics()["receipts_sent"] == K + 1
