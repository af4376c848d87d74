"""The leader's held-out evaluation (``--eval-dataset``) on an in-process MemoryBroker: a
committed version is evaluated for real (torch, the digits test split) on the evaluator's
thread, and its accuracy lands in the leader's history and in METRICS ``accuracy``, which
``edgefl monitor`` shows."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from waiting import eventually

from edgefl.aggregator import AggregatorConfig, NormBoundSetting
from edgefl.aggregator.secagg_config import SecAggSettings
from edgefl.aggregator.secagg_leader import LeaderService, leader_state_path
from edgefl.aggregator.secagg_store import LeaderStore
from edgefl.monitor.decode import decode_inbound
from edgefl.monitor.model import FleetModel
from edgefl.participation import ParticipationConfig
from edgefl.protocol.envelope import decode_envelope
from edgefl.protocol.messages import ServerMetrics, decode_message, encode_message
from edgefl.protocol.topics import (
    secagg_report_topic,
    secagg_share_topic,
    server_metrics_topic,
)
from edgefl.secagg import HelperConfig, HelperKeys, SecAggHelper
from edgefl.secagg.wire import UpdateMeta, build_share_envelopes, coord_partial, coord_report
from edgefl.transport import InboundMessage, MemoryBroker, MemoryTransport

pytest.importorskip("torch")
pytest.importorskip("sklearn")

FLEET, MODEL, N = "evl", "digits-mlp", 2410
KEYS = HelperKeys.generate()
SETTINGS = SecAggSettings(helper_key=Path("unused"))


def _leader(state_dir: Path, transport: MemoryTransport) -> LeaderService:
    config = AggregatorConfig.build(
        broker_url="mqtt://127.0.0.1:1",
        fleet=FLEET,
        model=MODEL,
        state_dir=state_dir,
        buffer_size=3,
        norm_bound=NormBoundSetting.OFF,
        fsync=False,
    ).replace(
        eval_dataset="digits",
        metrics_interval_s=0.01,
        participation=ParticipationConfig(flush_after_s=1.0),
    )
    service = LeaderService(config, SETTINGS, KEYS.public_key)
    service._restore(LeaderStore(leader_state_path(state_dir), fsync=False))
    service._transport = transport
    return service


async def _commit_version_1(leader: LeaderService) -> None:
    """Two devices' updates (random directions of norm 0.9) through both roles: version 1."""
    helper = SecAggHelper(HelperConfig(SETTINGS.ring(3), N, FLEET, MODEL), KEYS)
    rng = np.random.default_rng(7)
    for i in range(2):
        delta = rng.standard_normal(N).astype(np.float32)
        delta *= np.float32(0.9 / np.linalg.norm(delta))
        meta = UpdateMeta(FLEET, f"d{i}", 1, 0, 10, MODEL, time.time())
        built = build_share_envelopes(delta, meta, SETTINGS.ring(3), KEYS.public_key, rng=rng)
        await leader.handle(InboundMessage(secagg_share_topic(FLEET, f"d{i}", 1), built.share))
        sealed = bytes(decode_envelope(built.seed, max_payload=1024).payload)
        report = helper.receive_sealed((f"d{i}", 1), sealed, 0.0)
        assert report is not None
        payload = encode_message(coord_report(FLEET, report, 0.0))
        await leader.handle(InboundMessage(secagg_report_topic(FLEET), payload))
    await leader.tick(time.time() + 2.0)  # flushed: a decision of the two
    decision = leader.leader.open_decision
    assert decision is not None
    partial = helper.apply(decision)
    msg = encode_message(coord_partial(FLEET, partial, 0.0), partial.total)
    await leader.handle(InboundMessage(secagg_report_topic(FLEET), msg))
    assert leader.version == 1


def _held_out_accuracy(leader: LeaderService, weights: np.ndarray) -> float:
    from edgefl.data import load_dataset
    from edgefl.training import evaluate

    data = load_dataset("digits", seed=leader.config.seed)
    accuracy, _ = evaluate(
        leader.config.spec, weights, data.x_test[:4000], data.y_test[:4000], threads=1
    )
    return float(accuracy)


async def test_the_leader_evaluates_a_committed_version_into_metrics_and_its_history(
    tmp_path: Path,
) -> None:
    # Arrange: a leader with --eval-dataset digits
    broker = MemoryBroker()
    state_dir = tmp_path / "leader"
    async with (
        MemoryTransport(broker, "leader") as transport,
        MemoryTransport(broker, "obs") as obs,
    ):
        leader = _leader(state_dir, transport)
        leader._start_evaluator()
        v0 = leader.core.weights.copy()
        try:
            # Act: version 1 is committed; wait until its evaluation is in the history
            await _commit_version_1(leader)
            assert leader._store is not None
            store = leader._store
            await eventually(lambda: store.history()[-1][2] is not None, 30, what="evaluated")
            await obs.subscribe(server_metrics_topic(FLEET))  # (the METRICS from now on)
            await leader.tick(time.time())
            async with asyncio.timeout(5):
                message = await anext(aiter(obs.messages()))
        finally:
            assert leader.evaluator is not None
            leader.evaluator.stop()
        history = leader._store.history()
        leader._store.close()

    # Assert: the accuracy of version 1's weights (not version 0's), stored and published
    expected = _held_out_accuracy(leader, leader.core.weights)
    assert expected != _held_out_accuracy(leader, v0)  # (the step changed the predictions)
    assert [(v, a) for v, _, a in history][-1] == (1, pytest.approx(expected))
    metrics = decode_message(message.payload, ServerMetrics)
    assert metrics.version == 1
    assert metrics.accuracy == pytest.approx(expected)
    # edgefl monitor reads it as the plaintext aggregator's (accuracy line, sparkline)
    monitor = FleetModel(FLEET)
    monitor.apply(decode_inbound(message.topic, message.payload, fleet=FLEET, now=1.0), now=1.0)
    panel = monitor.snapshot(1.0).aggregator
    assert panel.accuracy == pytest.approx(expected)
    assert panel.accuracy_history == ((1, pytest.approx(expected)),)
    # a restarted leader shows it again before evaluating anything
    async with MemoryTransport(MemoryBroker(), "again") as again:
        restarted = _leader(state_dir, again)
        assert restarted.last_accuracy == pytest.approx(expected)
        assert restarted._store is not None
        restarted._store.close()
