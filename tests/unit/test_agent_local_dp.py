"""Local differential privacy in the device agent, end to end on the in-process MemoryBroker:
nothing the device publishes carries its raw update (or statistics of its data), the noise has
the analytic scale, the epsilon ledger survives restarts and enforces the budget, and the
device state reports epsilon.

Real parts throughout: the agent, torch training of the digits MLP, the codec (fp32, so the
published vector is exactly what was noised), the spool and the ledger file. The noise
generator is seeded here only (``noise_rng``); the agent's default draws it from os.urandom."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from agent_helpers import (
    DATA,
    DEVICE,
    FLEET,
    SPEC,
    RecordingTrainer,
    collect,
    decoded_update,
    factory,
    make_config,
    publish_model,
)
from waiting import eventually

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig, PrivacyConfig, ReceiptMode
from device_agent.local_privacy import LEDGER_FILE, LedgerCorrupt
from device_agent.trainer import TrainJob, TrainResult
from edgefl.privacy import LocalDP, LocalMechanism, LocalSpend
from edgefl.protocol.messages import DeviceState, decode_message
from edgefl.protocol.topics import (
    PROTOCOL_ROOT,
    TopicKind,
    device_state_topic,
    parse_topic,
    updates_filter,
)
from edgefl.transport import MemoryBroker


def ldp_config(tmp: Path, dp: str) -> AgentConfig:
    cfg = make_config(tmp)
    return dataclasses.replace(
        cfg,
        privacy=PrivacyConfig(dp=dp),
        codec=dataclasses.replace(cfg.codec, quantization="fp32"),  # lossless: exact checks
    )


def clipped(delta: np.ndarray, config: LocalDP) -> np.ndarray:
    """The clip the device must apply, computed independently of ``LocalDP.privatize``."""
    wide = delta.astype(np.float64)
    ord_ = 1 if config.mechanism is LocalMechanism.LAPLACE else 2
    norm = float(np.linalg.norm(wide, ord=ord_))
    return wide * min(1.0, config.clip_norm / norm)


def expected_noise_std(config: LocalDP) -> float:
    """From the definitions, not from edgefl: Gaussian sigma = 2C * analytic sigma(eps, delta)
    (dp-accounting's), Laplace std = sqrt(2) * 2C / eps."""
    if config.mechanism is LocalMechanism.LAPLACE:
        return math.sqrt(2.0) * 2.0 * config.clip_norm / config.epsilon
    return 2.0 * config.clip_norm * dp_accounting.get_sigma_gaussian(config.epsilon, config.delta)


async def run_until(
    broker: MemoryBroker,
    cfg: AgentConfig,
    until: Callable[[DeviceAgent], bool],
    **kwargs: object,
) -> DeviceAgent:
    """One run of an agent on ``broker`` until ``until(agent)``; then a clean stop."""
    options: dict[str, object] = {"dataset": DATA, "transport_factory": factory(broker), **kwargs}
    agent = DeviceAgent(cfg, **options)  # type: ignore[arg-type]
    run = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: until(agent))
    finally:
        agent.stop()
        await run
    return agent


@pytest.mark.parametrize(
    "dp",
    ["local:gaussian,eps=2,C=0.5,delta=1e-5", "local:laplace,eps=4,C=3"],
)
async def test_nothing_leaves_the_device_without_noise(tmp_path: Path, dp: str) -> None:
    # Arrange: two model versions, so two real trainings; an observer of everything the
    # device publishes (updates, states, check-ins) under the fleet's topic tree
    cfg = ldp_config(tmp_path, dp)
    config = cfg.privacy.local
    assert config is not None
    broker = MemoryBroker()
    publish_model(broker, 0)
    trainer = RecordingTrainer()
    seen, stop_observer = await collect(broker, f"{PROTOCOL_ROOT}/#")

    # Act
    agent = DeviceAgent(
        cfg,
        trainer=trainer,
        dataset=DATA,
        transport_factory=factory(broker),
        noise_rng=np.random.default_rng(11),
    )
    run = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: agent.statistics().updates_sent == 1)
        publish_model(broker, 1, seed=1)
        await eventually(lambda: agent.statistics().updates_sent == 2)
    finally:
        agent.stop()
        await run
        await stop_observer()

    # Assert: each update is exactly the seeded privatization of that training's raw delta ...
    mine = [m for m in seen if f"/device/{DEVICE}/" in m.topic]
    updates = [m for m in mine if parse_topic(m.topic).kind is TopicKind.DEVICE_UPDATE]
    assert len(updates) == 2 == len(trainer.deltas)
    replay = np.random.default_rng(11)
    std = expected_noise_std(config)
    for message, raw in zip(updates, trainer.deltas, strict=True):
        header, sent = decoded_update(message.payload)
        assert np.array_equal(sent, config.privatize(raw, replay).update)
        # ... which differs from the clipped update by noise of the analytic scale
        noise = sent.astype(np.float64) - clipped(raw, config)
        assert noise.std() == pytest.approx(std, rel=0.06)  # 2,410 values: ~1.5% sd of the sd
        assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
        assert np.mean(sent == raw) < 0.01  # (almost) no value went out as trained
        # no statistic of the local data rides along (loss, accuracy, steps, time)
        assert header.metrics == {}
    # and no device state carries the accuracy on local data
    states = [
        decode_message(m.payload, DeviceState)
        for m in mine
        if m.payload and parse_topic(m.topic).kind is TopicKind.DEVICE_STATE
    ]
    assert states
    assert all(s.local_accuracy is None for s in states)
    assert agent.statistics().training.last_accuracy is not None  # it was measured, kept local


class FixedDeltaTrainer:
    """A trainer whose update is given: here far longer than the clip."""

    def __init__(self, delta: np.ndarray) -> None:
        self.delta = delta

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        return TrainResult(self.delta, job.data.num_train, {"loss": 0.5})


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
async def test_a_long_update_is_clipped_to_c_before_the_noise(
    tmp_path: Path, mechanism: str
) -> None:
    # Arrange: an update of L2 norm 147 (L1 7,230) against C = 1 and little noise (eps = 50)
    cfg = ldp_config(tmp_path, f"local:{mechanism},eps=50,C=1")
    raw = np.full(SPEC.num_params, 3.0, np.float32)
    broker = MemoryBroker()
    publish_model(broker, 0)
    updates, stop_observer = await collect(broker, updates_filter(FLEET))

    await run_until(
        broker,
        cfg,
        lambda a: a.statistics().updates_sent == 1,
        trainer=FixedDeltaTrainer(raw),
    )
    await stop_observer()

    # Assert: the mean of the sent values is the clipped value, not 3
    _, sent = decoded_update(updates[0].payload)
    ord_ = 1 if mechanism == "laplace" else 2
    per_value = 3.0 / float(np.linalg.norm(raw.astype(np.float64), ord=ord_))
    config = cfg.privacy.local
    assert config is not None
    std = expected_noise_std(config)
    assert abs(float(sent.mean()) - per_value) < 5 * std / math.sqrt(sent.size)
    assert per_value < 0.03


async def test_without_local_dp_the_update_is_the_trained_delta(tmp_path: Path) -> None:
    """The control for the test above: the same observation without ``[privacy]`` sees the raw
    delta (so the check above is able to fail)."""
    cfg = ldp_config(tmp_path, "off")
    broker = MemoryBroker()
    publish_model(broker, 0)
    trainer = RecordingTrainer()
    seen, stop_observer = await collect(broker, f"{PROTOCOL_ROOT}/#")

    await run_until(broker, cfg, lambda a: a.statistics().updates_sent == 1, trainer=trainer)
    await stop_observer()

    updates = [m for m in seen if parse_topic(m.topic).kind is TopicKind.DEVICE_UPDATE]
    header, sent = decoded_update(updates[0].payload)
    assert np.array_equal(sent, trainer.deltas[0])
    assert "global_accuracy" in header.metrics
    state = decode_message(broker.retained()[device_state_topic(FLEET, DEVICE)], DeviceState)
    assert state.local_dp is None
    assert state.local_epsilon_spent is None


async def test_the_device_state_reports_epsilon_and_the_ledger_survives_a_restart(
    tmp_path: Path,
) -> None:
    # Arrange: Gaussian eps=1 per update, no budget
    cfg = ldp_config(tmp_path, "local:gaussian,eps=1,C=0.3,delta=1e-6")
    config = cfg.privacy.local
    assert config is not None
    broker = MemoryBroker()
    publish_model(broker, 0)

    # Act: a first run sends one update; a second one starts from the persisted ledger
    first = await run_until(broker, cfg, lambda a: a.statistics().updates_sent == 1)
    after_first = decode_message(broker.retained()[device_state_topic(FLEET, DEVICE)], DeviceState)
    second = await run_until(broker, cfg, lambda a: a.statistics().model_version == 0)
    publish_model(broker, 1, seed=1)
    third = await run_until(broker, cfg, lambda a: a.statistics().updates_sent == 1)
    final = decode_message(broker.retained()[device_state_topic(FLEET, DEVICE)], DeviceState)

    # Assert: epsilon per update and in total, as the definitions give it
    one = dp_accounting.get_epsilon_gaussian(config.noise_scale / (2 * 0.3), 1e-6)
    two = dp_accounting.get_epsilon_gaussian(config.noise_scale / (2 * 0.3) / math.sqrt(2), 1e-6)
    assert one == pytest.approx(1.0, rel=1e-6)
    assert (after_first.local_dp, after_first.local_dp_updates) == ("gaussian", 1)
    assert after_first.local_epsilon_per_update == 1.0
    assert after_first.local_epsilon_spent == pytest.approx(one, rel=1e-6)
    assert after_first.local_delta == 1e-6
    assert after_first.local_epsilon_budget is None
    assert after_first.local_budget_exhausted is False
    report = second.statistics().local_privacy
    assert report is not None
    assert (report.updates, second.statistics().training.started) == (1, 0)
    assert report.epsilon_spent == pytest.approx(one, rel=1e-6)
    assert final.local_dp_updates == 2
    assert final.local_epsilon_spent == pytest.approx(two, rel=1e-6)  # exact composition
    assert one < two < 2 * one
    assert first.statistics().local_privacy is not None
    last = third.statistics().local_privacy
    assert last is not None
    assert (last.updates, last.epsilon_spent) == (2, final.local_epsilon_spent)


async def test_the_budget_stops_training_across_restarts_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange: Laplace eps=1 per update, budget 2: exactly two updates in the device's life
    cfg = ldp_config(tmp_path, "local:laplace,eps=1,C=1,budget=2")
    broker = MemoryBroker()
    publish_model(broker, 0)
    updates, stop_observer = await collect(broker, updates_filter(FLEET))
    caplog.set_level(logging.INFO, logger="device_agent")

    # Act: v0 in one run, v1 after a restart (the budget is spent now); after another
    # restart, v2 and then v3 come
    await run_until(broker, cfg, lambda a: a.statistics().updates_sent == 1)
    publish_model(broker, 1, seed=1)
    await run_until(broker, cfg, lambda a: a.statistics().updates_sent == 1)
    publish_model(broker, 2, seed=2)
    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(broker))
    run = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: _refused(agent) == 1 and _version(agent) == 2)
        publish_model(broker, 3, seed=3)
        await eventually(lambda: _refused(agent) == 2 and _version(agent) == 3)
    finally:
        agent.stop()
        await run
        await stop_observer()

    # Assert: two updates, none after; each refused version counted; the state says why
    assert len(updates) == 2
    stats = agent.statistics()
    assert (stats.training.started, stats.updates_sent) == (0, 0)
    assert stats.local_privacy is not None
    assert stats.local_privacy.epsilon_spent == pytest.approx(2.0)
    assert (stats.local_privacy.updates, stats.local_privacy.updates_left) == (2, 0)
    assert "privacy_budget_spent" in stats.reasons
    state = decode_message(broker.retained()[device_state_topic(FLEET, DEVICE)], DeviceState)
    assert state.local_budget_exhausted is True
    assert (state.local_epsilon_budget, state.local_epsilon_spent) == (2.0, 2.0)
    assert "privacy_budget_spent" in state.reasons
    # logged once per agent run: when the second update spent it, and at the third start
    told = [r for r in caplog.records if "local DP budget spent" in r.getMessage()]
    assert len(told) == 2


def _refused(agent: DeviceAgent) -> int:
    report = agent.statistics().local_privacy
    return -1 if report is None else report.refused


def _version(agent: DeviceAgent) -> int | None:
    return agent.statistics().model_version


async def test_a_corrupt_ledger_stops_the_agent_instead_of_resetting_epsilon(
    tmp_path: Path,
) -> None:
    cfg = ldp_config(tmp_path, "local:gaussian,eps=1,C=1")
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / LEDGER_FILE).write_text('{"format": 1, "spend": {"updates": -3}}')
    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(MemoryBroker()))

    with pytest.raises(LedgerCorrupt, match="refusing to start"):
        async with asyncio.timeout(60):  # a hang guard: an agent that starts runs for ever
            await agent.run()


def test_the_ledger_file_holds_the_spend(tmp_path: Path) -> None:
    from device_agent.local_privacy import LocalPrivacyLedger

    ledger = LocalPrivacyLedger.in_state_dir(tmp_path)
    spend = LocalSpend(updates=3, gaussian_mu_squared=0.25, laplace_epsilon=1.5)

    ledger.record(spend)

    assert LocalPrivacyLedger.in_state_dir(tmp_path).spend == spend
    assert LocalPrivacyLedger.in_state_dir(tmp_path / "new").spend == LocalSpend()


async def test_the_spend_is_charged_before_the_update_is_spooled(tmp_path: Path) -> None:
    """Conservative order: an update the spool refuses was noised and charged already (it is
    charged whenever it could have left the device)."""
    # Arrange: a spool of one entry that keeps its update until a receipt no one sends
    cfg = ldp_config(tmp_path, "local:laplace,eps=1,C=1")
    cfg = dataclasses.replace(
        cfg, spool=dataclasses.replace(cfg.spool, max_entries=1, receipts=ReceiptMode.ON)
    )
    broker = MemoryBroker()
    publish_model(broker, 0)
    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(broker))
    run = asyncio.create_task(agent.run())
    try:
        # Act: v0's update is sent and kept; v1's finds the spool full
        await eventually(lambda: agent.statistics().delivery.awaiting_receipt == 1)
        publish_model(broker, 1, seed=1)
        await eventually(lambda: agent.statistics().dropped.get("spool_full") == 1)
    finally:
        agent.stop()
        await run

    # Assert: both trainings were charged, in memory and on disk
    report = agent.statistics().local_privacy
    assert report is not None
    assert (report.updates, report.epsilon_spent) == (2, 2.0)
    ledger = json.loads((tmp_path / "state" / LEDGER_FILE).read_text())
    assert ledger["spend"]["updates"] == 2


async def test_without_an_injected_generator_the_noise_is_never_the_same(tmp_path: Path) -> None:
    """Production draws a fresh os.urandom seed per update: two devices (fresh state) sending
    the same update send different noise, and so do two updates of one device."""
    raw = np.full(SPEC.num_params, 0.01, np.float32)
    sent: list[np.ndarray] = []
    for name in ("a", "b"):
        cfg = ldp_config(tmp_path / name, "local:gaussian,eps=1,C=1")
        broker = MemoryBroker()
        publish_model(broker, 0)
        updates, stop_observer = await collect(broker, updates_filter(FLEET))
        agent = DeviceAgent(
            cfg, trainer=FixedDeltaTrainer(raw), dataset=DATA, transport_factory=factory(broker)
        )
        run = asyncio.create_task(agent.run())
        try:
            await eventually(lambda: agent.statistics().updates_sent == 1)  # noqa: B023
            publish_model(broker, 1, seed=1)
            await eventually(lambda: agent.statistics().updates_sent == 2)  # noqa: B023
        finally:
            agent.stop()
            await run
            await stop_observer()
        sent.extend(decoded_update(m.payload)[1] for m in updates)

    assert len(sent) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            # independent noise: an exact float32 tie is rare (about 1e-8 per value), a reused
            # seed makes every value equal
            assert np.mean(sent[i] == sent[j]) < 0.01, (i, j)
