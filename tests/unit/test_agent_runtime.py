"""The device agent end to end on the in-process MemoryBroker: model pick-up, training, spool-first
delivery, restarts, aborts on ineligibility, presence sessions, rejected manifests.

Real parts throughout: the agent, the protocol, the codec, the spool, the probes over a fake
sysfs tree and torch training of the digits MLP on scikit-learn's digits (160 examples)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from agent_helpers import (
    DATA,
    DEVICE,
    FLEET,
    MODEL,
    SPEC,
    GateTrainer,
    collect,
    decoded_update,
    factory,
    make_config,
    publish_model,
    running,
    signed_config,
)
from receipt_helpers import spool_updates
from waiting import eventually

from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig
from device_agent.model_store import ModelStore
from device_agent.release import model_release
from device_agent.spool import UpdateSpool
from device_agent.trainer import TrainJob, TrainResult
from edgefl.codec import CodecConfig, Quantization, encode_update, open_update
from edgefl.models.spec import init_weights_numpy
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope, encode_envelope
from edgefl.protocol.messages import (
    DeviceState,
    DeviceStatus,
    TrainingHints,
    decode_message,
    decode_update,
    encode_message,
)
from edgefl.protocol.topics import (
    device_state_topic,
    model_chunk_topic,
    updates_filter,
)
from edgefl.security import (
    Ed25519Signer,
    load_update_authenticator,
    write_public_key,
)
from edgefl.transport import MemoryBroker, MemoryTransport
from firmware_sim.fake_sysfs import write_fake_sysfs


def config_and_model_v0(tmp_path: Path) -> tuple[AgentConfig, MemoryBroker]:
    """The default agent config, and a memory broker that holds model v0 (retained)."""
    broker = MemoryBroker()
    publish_model(broker, 0)
    return make_config(tmp_path), broker


async def test_agent_picks_up_model_trains_and_delivers_one_update(tmp_path: Path) -> None:
    # Arrange
    cfg, broker = config_and_model_v0(tmp_path)

    async with running(broker, cfg, updates_filter(FLEET)) as (agent, updates):
        # Act
        await eventually(lambda: agent.statistics().updates_sent == 1)

    # Assert: exactly one update, against v0, decodable, non-trivial
    assert len(updates) == 1
    header, delta = decoded_update(updates[0].payload)
    assert (header.device_id, header.seq, header.base_version) == (DEVICE, 0, 0)
    assert header.num_examples == DATA.num_train == 160
    assert header.model == MODEL
    assert np.all(np.isfinite(delta))
    assert np.abs(delta).max() > 0
    stats = agent.statistics()
    assert stats.training.started == stats.training.completed == 1
    assert stats.spool_depth == 0
    assert stats.model_version == 0
    assert stats.training.last_accuracy is not None
    # the model is kept on disk, and the retained state says offline after the clean stop
    held = ModelStore(tmp_path / "state/model").load()
    assert held is not None
    assert held.version == 0
    state = decode_message(broker.retained()[device_state_topic(FLEET, DEVICE)], DeviceState)
    assert state.status is DeviceStatus.OFFLINE
    assert state.updates_sent == 1
    assert state.model_version == 0
    assert state.local_accuracy == stats.training.last_accuracy


async def test_restart_continues_sequence_and_session_and_does_not_retrain_same_version(
    tmp_path: Path,
) -> None:
    # Arrange: a first run trains v0 and delivers seq 0
    cfg, broker = config_and_model_v0(tmp_path)

    async def one_run(until: Callable[[DeviceAgent], bool], settle: float = 0.0) -> DeviceAgent:
        agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(broker))
        run = asyncio.create_task(agent.run())
        await eventually(lambda: until(agent))
        await asyncio.sleep(settle)
        agent.stop()
        await run
        return agent

    updates, stop_observer = await collect(broker, updates_filter(FLEET))
    await one_run(lambda a: a.statistics().updates_sent == 1)
    # Act: restart with v0 still current (must not train again), then v1 appears
    second = await one_run(lambda a: a.statistics().model_version == 0, settle=1.5)
    publish_model(broker, 1, seed=1)
    third = await one_run(lambda a: a.statistics().updates_sent == 1)
    await stop_observer()

    # Assert
    headers = [decode_update(m.payload)[0] for m in updates]
    assert [(h.seq, h.base_version) for h in headers] == [(0, 0), (1, 1)]
    assert second.statistics().training.started == 0
    assert (second.statistics().session, third.statistics().session) == (2, 3)


async def test_spooled_updates_are_resent_in_order_byte_identical(tmp_path: Path) -> None:
    # Arrange: three real updates already in the agent's spool (as after a crash offline)
    cfg, broker = config_and_model_v0(tmp_path)
    spooled = spool_updates(tmp_path, 3)
    write_fake_sysfs(tmp_path / "fs", mains=False)  # on battery: no new training interferes

    async with running(broker, cfg, updates_filter(FLEET)) as (agent, updates):
        # Act
        await eventually(lambda: agent.statistics().updates_sent == 3)

    # Assert: in sequence order, the exact spooled bytes, and the spool is empty afterwards
    assert [m.topic.rsplit("/", 1)[1] for m in updates] == ["0", "1", "2"]
    assert [m.payload for m in updates] == [spooled[seq][1] for seq in range(3)]
    _, decoded = decoded_update(updates[2].payload)
    np.testing.assert_array_equal(decoded, spooled[2][0])
    assert agent.statistics().spool_depth == 0
    assert agent.statistics().training.started == 0
    with UpdateSpool(tmp_path / "state/spool") as spool:
        assert spool.next_seq() == 3  # never reused


async def test_ineligible_mid_training_aborts_publishes_nothing_and_retries_when_back(
    tmp_path: Path,
) -> None:
    # Arrange
    cfg, broker = config_and_model_v0(tmp_path)
    trainer = GateTrainer()

    async with running(broker, cfg, updates_filter(FLEET), trainer=trainer) as (agent, updates):
        await eventually(lambda: agent.statistics().status is DeviceStatus.TRAINING)
        # Act: unplug mid-training
        write_fake_sysfs(tmp_path / "fs", mains=False)
        agent.check_now()
        await eventually(lambda: agent.statistics().training.aborted.get("ineligible") == 1, 10)
        aborted = dict(agent.statistics().training.aborted)
        reasons = list(agent.statistics().reasons)
        await asyncio.sleep(0.3)
        assert not updates
        # ... and plug in again: the next attempt completes
        trainer.gate.set()
        write_fake_sysfs(tmp_path / "fs", mains=True)
        agent.check_now()
        await eventually(lambda: agent.statistics().updates_sent == 1)

    # Assert
    assert aborted == {"ineligible": 1}
    assert reasons == ["on_battery"]
    assert len(updates) == 1
    assert decode_update(updates[0].payload)[0].seq == 0  # the aborted run took no number
    assert agent.statistics().training.started == 2


class StuckTrainer:
    """A trainer stuck where it cannot poll ``should_stop`` (e.g. importing torch on a Pi)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        self.entered.set()
        self.release.wait(60)
        return None


async def test_stop_does_not_wait_for_a_training_thread_that_cannot_poll(tmp_path: Path) -> None:
    # Arrange: the agent is training in a thread that ignores should_stop
    cfg, broker = config_and_model_v0(tmp_path)
    trainer = StuckTrainer()
    agent = DeviceAgent(cfg, trainer=trainer, dataset=DATA, transport_factory=factory(broker))
    run = asyncio.create_task(agent.run())
    await eventually(trainer.entered.is_set)

    # Act
    agent.stop()
    try:
        async with asyncio.timeout(10):  # the thread stays stuck for 60 s
            await run
        stats = agent.statistics()
    finally:
        trainer.release.set()

    # Assert: stopped while the thread was still stuck; the training counts as aborted
    assert stats.training.aborted == {"stopping": 1}
    assert stats.training.completed == 0


async def test_reconnect_starts_a_new_presence_session_and_the_old_will_is_lower(
    tmp_path: Path,
) -> None:
    # Arrange
    cfg = make_config(tmp_path)
    write_fake_sysfs(tmp_path / "fs", mains=False)
    broker = MemoryBroker()
    made: list[MemoryTransport] = []

    async with running(
        broker, cfg, device_state_topic(FLEET, DEVICE), transport_factory=factory(broker, made)
    ) as (agent, states_seen):
        await eventually(lambda: agent.statistics().status is DeviceStatus.IDLE)
        await eventually(lambda: len(states_seen) >= 1)  # ONLINE may coalesce into IDLE
        # Act: the link drops (the broker publishes the Will), then comes back
        await made[0].disconnect(abrupt=True)
        await made[0].connect()
        await eventually(lambda: agent.statistics().session == 2 and agent.statistics().connected)
        await eventually(lambda: decode_message(states_seen[-1].payload, DeviceState).session == 2)
    states = [decode_message(m.payload, DeviceState) for m in states_seen]

    # Assert: the Will carried session 1; everything after it session 2; supersedes() drops
    # the late Will of session 1 once session 2 was seen
    lost = [s for s in states if s.status is DeviceStatus.LOST]
    assert [s.session for s in lost] == [1]
    after = states[states.index(lost[0]) + 1 :]
    assert after
    assert all(s.session == 2 for s in after)
    assert after[-1].status is DeviceStatus.OFFLINE
    assert not lost[0].supersedes(after[0])
    assert "on_battery" in after[0].reasons


async def test_model_with_corrupt_chunk_is_rejected_and_previous_model_kept(tmp_path: Path) -> None:
    # Arrange: v0 is fine; v1's chunk carries other bytes under the advertised digest
    cfg = make_config(tmp_path)
    write_fake_sysfs(tmp_path / "fs", mains=False)
    broker = MemoryBroker()
    publish_model(broker, 0)
    good = model_release(FLEET, 1, MODEL, init_weights_numpy(SPEC, 1))
    chunk_topic = model_chunk_topic(FLEET, 1, 0)
    packet = dict(good.messages)[chunk_topic]
    env = decode_envelope(packet, max_payload=1 << 20)
    tampered = bytearray(env.payload)
    tampered[0] ^= 0xFF
    bad_packet = encode_envelope(EnvelopeKind.MODEL_CHUNK, env.header, bytes(tampered))

    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(broker))
    run = asyncio.create_task(agent.run())
    await eventually(lambda: agent.statistics().model_version == 0)
    # Act
    for topic, payload in good.messages:
        broker.publish(topic, bad_packet if topic == chunk_topic else payload, 1, True)
    await eventually(lambda: sum(agent.statistics().rejected.values()) >= 1)
    await asyncio.sleep(0.1)
    agent.stop()
    await run

    # Assert
    stats = agent.statistics()
    assert stats.rejected == {"bad_checksum": 1}
    assert stats.model_version == 0
    held = ModelStore(tmp_path / "state/model").load()
    assert held is not None
    assert held.version == 0


async def test_manifest_for_unknown_model_is_rejected_as_wrong_model(tmp_path: Path) -> None:
    # Arrange: a manifest naming a model this agent cannot build (sizes of digits-mlp)
    cfg = make_config(tmp_path)
    broker = MemoryBroker()
    release = model_release(FLEET, 0, MODEL, init_weights_numpy(SPEC, 0))
    *chunks, (manifest_topic_name, _) = release.messages
    for topic, payload in chunks:
        broker.publish(topic, payload, 1, True)
    bogus = dataclasses.replace(release.manifest, model="no-such-model")
    broker.publish(manifest_topic_name, encode_message(bogus), 1, True)

    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(broker))
    run = asyncio.create_task(agent.run())
    # Act
    await eventually(lambda: sum(agent.statistics().rejected.values()) == 1)
    agent.stop()
    await run

    # Assert
    assert agent.statistics().rejected == {"wrong_model": 1}
    assert agent.statistics().model_version is None
    assert agent.statistics().training.started == 0


@pytest.mark.parametrize("quantization", ["int8", "fp16"])
async def test_manifest_codec_hint_wins_over_device_preference(
    tmp_path: Path, quantization: str
) -> None:
    # Arrange
    cfg = make_config(tmp_path)
    broker = MemoryBroker()
    hints = TrainingHints(local_epochs=1, batch_size=16, codec={"quantization": quantization})
    release = model_release(FLEET, 0, MODEL, init_weights_numpy(SPEC, 0), hints=hints)
    for topic, payload in release.messages:
        broker.publish(topic, payload, 1, True)

    async with running(broker, cfg, updates_filter(FLEET)) as (agent, updates):
        # Act
        await eventually(lambda: agent.statistics().updates_sent == 1)

    # Assert: the aggregator's hint decides the codec; batch 16 -> 10 steps over 160 examples
    header, _ = decode_update(updates[0].payload)
    assert header.codec["quantization"] == quantization
    assert header.metrics["steps"] == 10


async def test_signed_manifests_only_and_signed_updates(tmp_path: Path) -> None:
    # Arrange: aggregator and device key pairs as PEM files
    cfg, keys = signed_config(tmp_path)
    aggregator_key, stranger_key = keys.aggregator, keys.stranger
    (tmp_path / "devices").mkdir()
    write_public_key(tmp_path / f"devices/{DEVICE}.pub", keys.device.public_key())
    broker = MemoryBroker()
    weights = init_weights_numpy(SPEC, 0)
    unsigned = model_release(FLEET, 0, MODEL, weights)
    forged = model_release(FLEET, 1, MODEL, weights, signer=Ed25519Signer(stranger_key))
    genuine = model_release(FLEET, 2, MODEL, weights, signer=Ed25519Signer(aggregator_key))

    async with running(broker, cfg, updates_filter(FLEET)) as (agent, updates):
        # Act
        for release in (unsigned, forged):
            for topic, payload in release.messages:
                broker.publish(topic, payload, 1, True)
            await asyncio.sleep(0.2)
        await eventually(lambda: sum(agent.statistics().rejected.values()) == 2)
        assert agent.statistics().model_version is None
        for topic, payload in genuine.messages:
            broker.publish(topic, payload, 1, True)
        await eventually(lambda: agent.statistics().updates_sent == 1)
    agent, updates = agent, [m.payload for m in updates]

    # Assert
    assert agent.statistics().rejected == {"bad_signature": 2}
    assert agent.statistics().model_version == 2
    (payload,) = updates
    header, _ = decode_update(payload)
    assert header.base_version == 2
    load_update_authenticator(tmp_path / "devices").authenticate(header, payload)  # no raise


async def test_systemd_ready_status_and_watchdog_from_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a notification socket like systemd's, WatchdogSec 0.2 s; the watchdog loop's
    # sleeps are recorded (and yield one loop tick), so the ping period is read, not timed
    import socket

    import device_agent.agent as agent_module
    from device_agent.notify import SystemdNotifier
    from edgefl import sdnotify

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    messages: list[str] = []
    done = threading.Event()

    def read() -> None:  # drain like systemd does
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())

    sleeps: list[float] = []

    async def tick(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0.01)

    def keepalive(notifier: SystemdNotifier, period: float) -> Awaitable[None]:
        return sdnotify.keepalive(notifier, period, sleep=tick)

    monkeypatch.setattr(agent_module, "keepalive", keepalive)
    reader = threading.Thread(target=read)
    reader.start()
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    cfg = make_config(tmp_path)
    write_fake_sysfs(tmp_path / "fs", mains=False)
    broker = MemoryBroker()

    agent = DeviceAgent(cfg, dataset=DATA, transport_factory=factory(broker), notifier=notifier)
    run = asyncio.create_task(agent.run())
    # Act: run until the watchdog loop went round ten times and the state settled
    await eventually(lambda: len(sleeps) >= 10 and agent.statistics().reasons == ("on_battery",))
    agent.stop()
    await run
    await eventually(lambda: bool(messages) and messages[-1].startswith("STOPPING=1"))
    done.set()
    reader.join()
    sock.close()

    # Assert: one ping per round, every round at most half of WatchdogSec
    assert messages[0].startswith("READY=1\nSTATUS=")
    assert sum(m == "WATCHDOG=1" for m in messages) >= 10
    assert set(sleeps) == {0.1}
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert any("not eligible: on_battery" in m for m in statuses)
    assert messages[-1].startswith("STOPPING=1")


class FixedDeltaTrainer:
    """A Trainer whose delta is fixed per base version (the simulator's trainers look alike)."""

    def __init__(self, deltas: dict[int, np.ndarray]) -> None:
        self.deltas = deltas

    def train(self, job: TrainJob, should_stop: Callable[[], bool]) -> TrainResult | None:
        return TrainResult(self.deltas[job.base_version], job.data.num_train)


async def test_error_feedback_residual_survives_a_restart(tmp_path: Path) -> None:
    # Arrange: top-k 10 % in fp32 (exact), two versions trained in two agent runs
    cfg = make_config(tmp_path)
    cfg = dataclasses.replace(
        cfg, codec=dataclasses.replace(cfg.codec, quantization="fp32", topk_fraction=0.1)
    )
    rng = np.random.default_rng(3)
    deltas = {v: rng.normal(size=SPEC.num_params).astype(np.float32) for v in (0, 1)}
    broker = MemoryBroker()
    publish_model(broker, 0)

    async def one_run(sent: int) -> None:
        agent = DeviceAgent(
            cfg,
            trainer=FixedDeltaTrainer(deltas),
            dataset=DATA,
            transport_factory=factory(broker),
        )
        run = asyncio.create_task(agent.run())
        await eventually(lambda: agent.statistics().updates_sent == sent)
        agent.stop()
        await run

    # Act
    updates, stop_observer = await collect(broker, updates_filter(FLEET))
    await one_run(1)
    publish_model(broker, 1, seed=1)
    await one_run(1)
    await stop_observer()

    # Assert: the second update carries top-k(delta_1 + residual of the first), as if no restart
    topk = CodecConfig(quantization=Quantization.FP32, topk_fraction=0.1)
    first, residual = encode_update(deltas[0], topk, rng=rng)
    second, _ = encode_update(deltas[1], topk, rng=rng, residual=residual)
    sent = [decoded_update(message.payload)[1] for message in updates]
    expected = [
        open_update(
            e.descriptor, e.body, num_params=SPEC.num_params, max_decompressed=1 << 20
        ).to_dense()
        for e in (first, second)
    ]
    np.testing.assert_array_equal(sent[0], expected[0])
    np.testing.assert_array_equal(sent[1], expected[1])
    assert (tmp_path / "state/residual.bin").stat().st_size > 4 * SPEC.num_params


async def test_idle_agent_republishes_its_state_every_heartbeat(tmp_path: Path) -> None:
    # Arrange: an idle agent (on battery, no model) with a 1 s heartbeat
    cfg = dataclasses.replace(make_config(tmp_path), heartbeat_s=1.0)
    write_fake_sysfs(tmp_path / "fs", mains=False)
    broker = MemoryBroker()

    async with running(broker, cfg, device_state_topic(FLEET, DEVICE)) as (agent, states_seen):
        await eventually(lambda: agent.statistics().status is DeviceStatus.IDLE)
        settled = len(states_seen)
        # Act: nothing changes; wait for two heartbeats
        await eventually(lambda: len(states_seen) >= settled + 2, 10, what="two heartbeats")
        repeats = states_seen[settled:]
    repeats = [decode_message(m.payload, DeviceState) for m in repeats]

    # Assert: the same idle state came again, with fresh timestamps
    assert len(repeats) >= 2
    assert all(s.status is DeviceStatus.IDLE and s.session == 1 for s in repeats)
    assert repeats[-1].at > repeats[0].at


async def test_cancelled_while_opening_state_releases_the_spool_lock(tmp_path: Path) -> None:
    """A simulated crash can cancel an agent while its state directory is being opened (in a
    thread that keeps running): the spool lock must still be released, or the restarted agent
    in the same process fails with SpoolLocked."""
    cfg = make_config(tmp_path)
    opened = threading.Event()

    class SlowOpen(DeviceAgent):
        def _open_state(self) -> None:
            super()._open_state()
            opened.set()
            time.sleep(0.3)  # still "opening" when the cancellation lands

    # Arrange
    agent = SlowOpen(cfg, dataset=DATA, transport_factory=factory(MemoryBroker()))
    task = asyncio.create_task(agent.run())
    await asyncio.to_thread(opened.wait, 5)

    # Act: cancel mid-open
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    # Assert: the spool can be opened again at once
    UpdateSpool(cfg.state_dir / "spool").close()
