"""The aggregator's receipts (PROTOCOL.md §4.6) and seq window, over the in-memory broker:
receipts only after the durable commit, the bounded send queue, SEQ_JUMP and reset-device."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from commit_gate import gated_commits
from test_aggregator_service import FLEET, Harness, delta, make_config, run, update
from waiting import eventually

from edgefl.aggregator import Aggregator
from edgefl.aggregator.receipts import ReceiptQueue, ReceiptSender
from edgefl.aggregator.store import StateStore
from edgefl.aggregator.updates import build_update_packets
from edgefl.cli import main
from edgefl.protocol import EnvelopeKind, ServerState, decode_message, server_state_topic
from edgefl.protocol.messages import FEATURE_RECEIPTS, Receipt
from edgefl.protocol.topics import MAX_INT, receipt_topic
from edgefl.security import Ed25519ManifestVerifier, Ed25519Signer, generate_private_key
from edgefl.transport import MemoryBroker, MemoryTransport


def receipt(broker: MemoryBroker, device: str) -> Receipt | None:
    payload = broker.retained().get(receipt_topic(FLEET, device))
    return None if payload is None else decode_message(payload, Receipt)


async def receipt_when(
    broker: MemoryBroker, device: str, holds: Callable[[Receipt], bool] = lambda r: True
) -> Receipt:
    """The device's retained receipt, once there is one for which ``holds``."""
    await eventually(lambda: (r := receipt(broker, device)) is not None and holds(r))
    r = receipt(broker, device)
    assert r is not None
    return r


def seen_rows(state_dir: Path) -> list[tuple[str, int]]:
    store = StateStore(state_dir)
    try:
        rows = store.open_reader().execute("SELECT device, seq FROM seen ORDER BY 1, 2")
        return [(d, int(s)) for d, s in rows.fetchall()]
    finally:
        store.close()


# --------------------------------------------------------------------------- after the commit


def test_a_receipt_is_published_only_after_its_batch_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: the writer thread's commit waits on a gate
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=10)

    async def body() -> None:
        async with Harness(broker, config) as h:
            # Act
            await h.send("pi-1", 0, 0, delta(1))
            await asyncio.to_thread(gate.entered.wait, 10)
            # Assert: applied in memory, the commit in progress: no receipt yet
            assert h.stats().applied == 1
            for _ in range(20):
                await asyncio.sleep(0)
            assert receipt(broker, "pi-1") is None
            gate.opened.set()
            r = await receipt_when(broker, "pi-1")
            assert (r.through, r.committed, dict(r.rejected)) == (0, ((0, 0),), {})
            assert seen_rows(config.state_dir) == [("pi-1", 0)]  # durable when it was sent

    with gated_commits(monkeypatch, lambda batch: bool(batch.accepted)) as gate:
        run(body)
    assert gate.entered.is_set()  # the commit was held


def test_receipts_report_accepted_resent_and_finally_rejected_seqs(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=10)

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("pi-1", 0, 0, delta(1))
            await h.send("pi-1", 1, 0, delta(2))
            await h.until(lambda s: s.applied == 2)
            await receipt_when(broker, "pi-1", lambda r: r.through == 1)
            # a resend of a committed update, and one for another model (final: WRONG_MODEL)
            await h.send("pi-1", 1, 0, delta(2))
            await h.send("pi-1", 2, 0, delta(3), model="mnist1d-cnn")
            await h.until(lambda s: s.received == 4)
            r = await receipt_when(broker, "pi-1", lambda r: 2 in r.rejected)
            assert r.through == 1
            assert r.committed == ((1, 1),)  # the resend is reported as committed
            assert dict(r.rejected) == {2: "wrong_model"}
            assert h.stats().receipts.sent >= 2

    run(body)


def test_signed_receipts_and_the_receipts_feature_in_server_state(tmp_path: Path) -> None:
    broker = MemoryBroker()
    key = generate_private_key()
    config = make_config(tmp_path, manifest_signer=Ed25519Signer(key))

    async def body() -> None:
        async with Harness(broker, config) as h:
            state = decode_message(broker.retained()[server_state_topic(FLEET)], ServerState)
            assert state.features == (FEATURE_RECEIPTS,)
            await h.send("pi-1", 0, 0, delta(1))
            await receipt_when(broker, "pi-1")
        payload = broker.retained()[receipt_topic(FLEET, "pi-1")]
        verifier = Ed25519ManifestVerifier([key.public_key()], kinds=(EnvelopeKind.RECEIPT,))
        verifier.verify(payload)

    run(body)


def test_receipts_off_publishes_none_and_announces_no_feature(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, receipts=False)

    async def body() -> None:
        async with Harness(broker, config) as h:
            state = decode_message(broker.retained()[server_state_topic(FLEET)], ServerState)
            assert state.features == ()
            await h.send("pi-1", 0, 0, delta(1))
            await h.until(lambda s: s.applied == 1 and s.commits.batches >= 1)
            assert receipt(broker, "pi-1") is None
            assert h.stats().receipts.sent == 0

    run(body)


# --------------------------------------------------------------------------- the bounded queue


def test_a_full_receipt_queue_drops_the_oldest_and_counts_it() -> None:
    queue = ReceiptQueue(2)
    queue.put([("t/a", b"1"), ("t/b", b"2")])
    queue.put([("t/c", b"3")])
    assert queue.dropped == 1
    assert len(queue) == 2

    async def drain() -> list[tuple[str, bytes]]:
        return [await queue.get(), await queue.get()]

    assert asyncio.run(drain()) == [("t/b", b"2"), ("t/c", b"3")]


class _SlowReceipts(MemoryTransport):
    """A real in-memory transport whose receipt PUBACKs wait for ``gate`` (a stalled broker)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        if topic.endswith("/receipt"):
            await self.gate.wait()
        await super().publish(topic, payload, qos=qos, retain=retain)


def test_a_stalled_broker_drops_receipts_not_ingest(tmp_path: Path) -> None:
    # Arrange: a queue of one receipt, and receipt publishes that never complete
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=100, receipt_queue=1)
    h = Harness(broker, config)
    h.transport = _SlowReceipts(broker, "aggregator", persistent_session=True, manual_ack=True)
    h.agg = Aggregator(config, transport=h.transport)

    async def body() -> None:
        async with h:
            # Act: four devices, one batch each
            for i in range(4):
                await h.send(f"pi-{i}", 0, 0, delta(i))
                await h.until(lambda s, n=i + 1: s.commits.batches == n)
            # Assert: ingest went on; 1 receipt in hand, 1 queued, 2 dropped and counted
            s = h.stats()
            assert (s.applied, s.receipts.sent, s.receipts.dropped) == (4, 0, 2)
            h.transport.gate.set()
            await eventually(lambda: h.stats().receipts.sent == 2)
            published = {d for d in ("pi-0", "pi-1", "pi-2", "pi-3") if receipt(broker, d)}
            assert published == {"pi-0", "pi-3"}

    run(body)


def test_the_sender_publishes_in_order_retained() -> None:
    async def body() -> None:
        broker = MemoryBroker()
        transport = MemoryTransport(broker, "agg")
        await transport.connect()
        queue = ReceiptQueue(8)
        sender = ReceiptSender(queue, transport)
        task = asyncio.create_task(sender.run())
        queue.put([("t/x", b"1"), ("t/x", b"2"), ("t/y", b"3")])
        await queue.join()
        task.cancel()
        assert broker.retained() == {"t/x": b"2", "t/y": b"3"}
        assert sender.sent == 3
        await transport.close()

    asyncio.run(body())


# --------------------------------------------------------------------------- seq window


def test_a_far_seq_jump_is_refused_and_the_device_keeps_working(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=10)

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("pi-1", 2, 0, delta(1))
            await h.send("pi-1", MAX_INT, 0, delta(2))  # 2^63-1 after 2: the old lock-out
            await h.send("pi-1", 3, 0, delta(3))
            s = await h.until(lambda s: s.received == 3)
            assert s.applied == 2
            assert dict(s.rejected) == {"seq_jump": 1}
            await receipt_when(broker, "pi-1", lambda r: r.through == 3)
        assert seen_rows(config.state_dir) == [("pi-1", 2), ("pi-1", 3)]

    run(body)


def test_out_of_order_redelivery_is_counted_once_across_a_restart(tmp_path: Path) -> None:
    """The sequence window (PROTOCOL.md, "Sequence window"): what a broker that redelivers out
    of order (NATS JetStream) does to one device's updates, through the whole service."""
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=100)

    async def first() -> None:
        async with Harness(broker, config) as h:
            # Act: 5 arrives first, then the redelivered 3, a second copy of 3, then 4
            for seq in (5, 3, 3, 4):
                await h.send("pi-1", seq, 0, delta(seq))
            s = await h.until(lambda s: s.received == 4)
            # Assert: 5, 3 and 4 counted once each, the copy of 3 a duplicate
            assert (s.applied, dict(s.rejected)) == (3, {"duplicate": 1})
            r = await receipt_when(broker, "pi-1", lambda r: r.is_committed(4))
            assert r.through == 5  # the highest committed seq, never lowered

    async def after_restart() -> None:
        async with Harness(broker, config) as h:
            receipts: list[Receipt] = []
            await h.device.subscribe(receipt_topic(FLEET, "pi-1"))

            async def collect() -> None:  # the receipts published after the restart
                async for message in h.device.messages():
                    r = decode_message(message.payload, Receipt)
                    if r.at >= restarted:
                        receipts.append(r)

            collector = asyncio.create_task(collect())
            # Act: the late 2 (never seen), copies of 4 and 5 (in `seen` only, on disk), a jump
            # to 300, then 44 (256 below: outside the window) and 45 (the window's lowest)
            for seq in (2, 4, 5, 300, 44, 45):
                await h.send("pi-1", seq, 0, delta(seq % 7))
            s = await h.until(lambda s: s.received == 4 + 6)  # the totals are durable
            # Assert
            assert (s.applied, dict(s.rejected)) == (3 + 3, {"duplicate": 1 + 2, "replay": 1})
            await eventually(lambda: any(r.is_committed(45) for r in receipts))
            collector.cancel()
            committed = {q for r in receipts for q in range(400) if r.is_committed(q)}
            rejected = {q: why for r in receipts for q, why in r.rejected.items()}
            assert (committed, rejected) == ({2, 4, 5, 45, 300}, {44: "replay"})
            assert receipts[-1].through == 300

    run(first)
    restarted = time.time()
    run(after_restart)
    assert seen_rows(config.state_dir) == [("pi-1", s) for s in (2, 3, 4, 5, 45, 300)]


def test_a_chunked_update_completing_after_a_later_seq_is_accepted(tmp_path: Path) -> None:
    """Out of order without any redelivery: seq 3's chunks interleave with the single packet of
    seq 4, so 3 completes after 4 was accepted (the 1.1 rule refused it as a replay)."""
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=100)
    topic3, chunks3 = build_update_packets(max_packet=4096, **update("pi-1", 3, delta(3)))
    assert len(chunks3) >= 2

    async def body() -> None:
        async with Harness(broker, config) as h:
            # Act: the first chunk of 3, all of 4, then the rest of 3
            await h.device.publish(topic3, chunks3[0], qos=1)
            await h.send("pi-1", 4, 0, delta(4))
            await h.until(lambda s: s.applied == 1)
            for chunk in chunks3[1:]:
                await h.device.publish(topic3, chunk, qos=1)
            s = await h.until(lambda s: s.received == 2)
            # Assert
            assert (s.applied, dict(s.rejected)) == (2, {})
            r = await receipt_when(broker, "pi-1", lambda r: r.is_committed(3))
            assert r.through == 4

    run(body)


def lock_out(tmp_path: Path) -> Path:
    """A state dir written without the window: pi-1 committed 0, 1, 2 and 2^63-1."""
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=10, max_seq_jump=MAX_INT)

    async def body() -> None:
        async with Harness(broker, config) as h:
            for seq in (0, 1, 2, MAX_INT):
                await h.send("pi-1", seq, 0, delta(seq % 7))
            await h.until(lambda s: s.applied == 4 and s.commits.batches >= 1)
            await h.send("pi-1", 3, 0, delta(3))
            s = await h.until(lambda s: s.received == 5)
            assert dict(s.rejected) == {"replay": 1}  # locked out

    run(body)
    return config.state_dir


def test_reset_device_recovers_a_locked_out_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Arrange
    state_dir = lock_out(tmp_path)

    # Act
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "reset-device", "pi-1", "--state-dir", str(state_dir)])
    out = capsys.readouterr().out

    # Assert: mark 2, seen untouched, then seq 3 is accepted and seq 2 is a duplicate
    assert info.value.code == 0
    assert f"{MAX_INT} -> 2" in out
    store = StateStore(state_dir)
    assert store.device_max_seq("pi-1") == 2
    store.close()
    rows = [("pi-1", s) for s in (0, 1, 2, MAX_INT)]
    assert seen_rows(state_dir) == rows
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=10)

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("pi-1", 3, 0, delta(3))
            await h.send("pi-1", 2, 0, delta(2))
            s = await h.until(lambda s: s.received == 7)
            assert s.applied == 5
            assert dict(s.rejected) == {"replay": 1, "duplicate": 1}

    run(body)
    assert seen_rows(state_dir) == [*rows[:3], ("pi-1", 3), rows[3]]


def test_reset_device_to_a_given_seq_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state_dir = lock_out(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "reset-device", "pi-1", "--to", "10", "--state-dir", str(state_dir),
              "--json"])  # fmt: skip
    assert info.value.code == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert (result["before"], result["after"], result["committed"]) == (MAX_INT, 10, 4)


def test_reset_device_refuses_while_the_aggregator_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path)

    async def body() -> None:
        async with Harness(broker, config):
            with pytest.raises(SystemExit) as info:
                main(["aggregator", "reset-device", "pi-1", "--state-dir", str(config.state_dir)])
            assert info.value.code == 78
            assert "stop the aggregator first" in capsys.readouterr().err

    run(body)


def test_reset_device_without_state_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["aggregator", "reset-device", "pi-1", "--state-dir", str(tmp_path / "nothing")])
    assert info.value.code == 2
    assert "--state-dir" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_a_second_aggregator_on_the_same_state_dir_exits_78(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path)
    args = [
        sys.executable, "-m", "edgefl.aggregator.cli", "--broker", "mqtt://127.0.0.1:1",
        "--fleet", FLEET, "--model", config.model, "--state-dir", str(config.state_dir),
    ]  # fmt: skip

    async def body() -> None:
        async with Harness(broker, config):
            done = await asyncio.to_thread(
                subprocess.run, args, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 78
            assert "state_dir" in done.stderr
            assert "in use by process" in done.stderr

    run(body)
