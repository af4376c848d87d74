"""The sans-IO batch builder: holding chunk acks, counting, new generations, the checkpoint rule,
history and replay, driven directly (no event loop, no socket, no file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefl.aggregator import AggregatorConfig, VersionRecord
from edgefl.aggregator.batch import REPLAY_BOUND, Batch, BatchBuilder
from edgefl.aggregator.engine import Engine
from edgefl.aggregator.ingest import Accepted, Ingest, Pending, Rejected
from edgefl.aggregator.service import initial_state
from edgefl.aggregator.tally import Tally
from edgefl.aggregator.updates import build_update_packets
from edgefl.errors import RejectReason
from edgefl.transport import InboundMessage

FLEET, MODEL = "lab", "digits-mlp"
WALL = 1_000.0  # wall-clock seconds of the batches below


def make_builder(
    tmp_path: Path, *, checkpoint_size: int = 1 << 40, **overrides: Any
) -> BatchBuilder:
    values: dict[str, Any] = {
        "broker_url": "mqtt://127.0.0.1:1", "fleet": FLEET, "model": MODEL,
        "state_dir": tmp_path / "state", "buffer_size": 2, "norm_bound": "off",
        "staleness": "constant", "example_weighting": "equal", "max_staleness": None,
    }  # fmt: skip
    values.update(overrides)
    config = AggregatorConfig.build(**values)
    engine = Engine(config, initial_state(config))
    return BatchBuilder(engine, Ingest(config, engine), checkpoint_size=checkpoint_size)


def open_batch(tmp_path: Path, **overrides: Any) -> tuple[BatchBuilder, Batch]:
    """A builder (see :func:`make_builder`) and the batch it opened at time 0."""
    builder = make_builder(tmp_path, **overrides)
    return builder, builder.open(now=0.0, wall=WALL)


def packets(device: str, seq: int, *, max_packet: int = 256 * 1024) -> tuple[str, list[bytes]]:
    """The packets of one update; every update has the same delta and the same encoded body."""
    d = (np.random.default_rng(0).standard_normal(2410) * 0.01).astype(np.float32)
    return build_update_packets(
        fleet=FLEET, model=MODEL, device=device, seq=seq, base_version=0, delta=d,
        rng=np.random.default_rng(0), max_packet=max_packet,
    )  # fmt: skip


def feed(builder: BatchBuilder, batch: Batch, device: str, seq: int, **kw: Any) -> list[str]:
    """Stage, decode and book every packet of one update; the outcome kinds, in order."""
    topic, payloads = packets(device, seq, **kw)
    kinds = []
    for i, payload in enumerate(payloads):
        out = builder.ingest.process(topic, payload, now=batch.now)
        builder.book(batch, InboundMessage(topic, b"", 1, ack_token=(seq, i)), 0.0, out)
        kinds.append(out.kind.value)
    return kinds


def tokens(batch: Batch) -> list[object]:
    return [message.ack_token for message, _ in batch.acks]


def test_chunks_are_held_until_their_update_completes(tmp_path: Path) -> None:
    # Arrange: an update in several chunk packets
    builder, batch = open_batch(tmp_path, buffer_size=10)
    topic, payloads = packets("d", 7, max_packet=1024)
    assert len(payloads) >= 3
    held = []

    # Act: book each packet, noting what is held and acknowledged after it
    for i, payload in enumerate(payloads):
        out = builder.ingest.process(topic, payload, now=batch.now)
        builder.book(batch, InboundMessage(topic, b"", 1, ack_token=i), 0.0, out)
        held.append((builder.held_packets, len(batch.acks)))

    # Assert: nothing acknowledged before the last chunk, then all of them, the last one first
    n = len(payloads)
    assert held == [(i + 1, 0) for i in range(n - 1)] + [(0, n)]
    assert tokens(batch) == [n - 1, *range(n - 1)]
    assert batch.accepted == [("d", 7)]
    assert [(r.device, r.seq, r.at) for r in batch.record.accepted] == [("d", 7, WALL)]


def test_a_held_chunk_is_acknowledged_when_its_message_ends_in_a_rejection(
    tmp_path: Path,
) -> None:
    # Arrange: two chunk packets of message b"m" held, as Ingest reports them
    builder, batch = open_batch(tmp_path)
    key = ("d", b"m")
    first, second, last = (InboundMessage("t", b"", 1, ack_token=i) for i in (1, 2, 3))
    builder.book(batch, first, 0.0, Pending(key))
    builder.book(batch, second, 0.0, Pending(key))
    assert (builder.held_packets, tokens(batch)) == (2, [])

    # Act: the last packet ends the message with a bad checksum
    builder.book(batch, last, 0.0, Rejected(RejectReason.BAD_CHECKSUM, "", key, ends_message=True))

    # Assert: all three acknowledged, one rejected update counted
    assert tokens(batch) == [3, 1, 2]
    assert builder.held_packets == 0
    assert (batch.tally.received, dict(batch.tally.rejected)) == (1, {RejectReason.BAD_CHECKSUM: 1})


def test_late_duplicate_chunks_and_non_final_rejections_release_nothing_held(
    tmp_path: Path,
) -> None:
    # Arrange: one packet of message b"m" held
    builder, batch = open_batch(tmp_path)
    key = ("d", b"m")
    builder.book(batch, InboundMessage("t", b"", 1, ack_token=1), 0.0, Pending(key))

    # Act: a late duplicate chunk, and a conflicting chunk that does not end the message
    builder.book(batch, InboundMessage("t", b"", 1, ack_token=2), 0.0, Pending(key, hold=False))
    conflict = Rejected(RejectReason.CHUNK_CONFLICT, "", key, ends_message=False)
    builder.book(batch, InboundMessage("t", b"", 1, ack_token=3), 0.0, conflict)

    # Assert: both acknowledged on their own; packet 1 is still held
    assert tokens(batch) == [2, 3]
    assert builder.held_packets == 1


def test_a_step_snapshots_the_model_and_makes_a_version_released_after_commit(
    tmp_path: Path,
) -> None:
    # Arrange: K = 2, one update already applied in an earlier batch
    builder = make_builder(tmp_path, buffer_size=2)
    first = builder.open(now=0.0, wall=WALL - 1)
    feed(builder, first, "a", 1)
    closed_first = builder.close(first)
    assert closed_first is not None
    builder.committed(closed_first)
    batch = builder.open(now=0.0, wall=WALL)

    # Act: the second update makes the step
    feed(builder, batch, "b", 1)
    closed = builder.close(batch)

    # Assert: version 1 at the batch's wall time, 2 applied in total; the snapshot is taken at
    # the step and the new generation starts there; the history grows only once committed
    assert closed is batch
    assert batch.new_versions == [VersionRecord(1, WALL, 2)]
    assert batch.record.history == [(1, WALL, 2)]
    snapshot = batch.record.snapshot
    assert snapshot is not None
    assert (snapshot[0], snapshot[1]) == (1, WALL)
    assert batch.record.generation == builder.engine.generation == 1
    assert batch.release is not None
    assert (batch.release.version, batch.release.created_at) == (1, WALL)
    np.testing.assert_array_equal(batch.release.weights, builder.engine.weights)
    assert batch.record.counters == {"received": 1, "applied": 1, "steps": 1, "staleness:0": 1}
    assert builder.history == []
    builder.committed(batch)
    assert builder.history == [VersionRecord(1, WALL, 2)]
    assert (builder.totals.applied, builder.totals.steps) == (2, 1)


def test_an_empty_batch_is_nothing_to_commit(tmp_path: Path) -> None:
    builder = make_builder(tmp_path)
    assert builder.close(builder.open(now=0.0, wall=WALL)) is None


def test_rejections_are_counted_by_reason_and_acknowledged(tmp_path: Path) -> None:
    # Arrange: seq 300 accepted, then seq 300 again (duplicate) and seq 44 (a replay: 256 or
    # more below the highest accepted seq, the sequence window)
    builder, batch = open_batch(tmp_path, buffer_size=10)

    # Act
    kinds = [feed(builder, batch, "d", seq) for seq in (300, 300, 44)]
    builder.close(batch)

    # Assert
    assert kinds == [["accepted"], ["rejected"], ["rejected"]]
    assert len(batch.acks) == 3
    assert dict(batch.tally.rejected) == {RejectReason.DUPLICATE: 1, RejectReason.REPLAY: 1}
    assert batch.record.counters == {
        "received": 3, "applied": 1, "staleness:0": 1,
        "rejected:duplicate": 1, "rejected:replay": 1,
    }  # fmt: skip
    assert builder.totals.rejected_by_value() == {"duplicate": 1, "replay": 1}


def test_checkpoint_rule_bounds_the_stored_updates_since_the_last_snapshot(
    tmp_path: Path,
) -> None:
    # Arrange: a checkpoint as large as one update's body, no step (K = 100): one update per
    # batch stores its body until more than REPLAY_BOUND bodies are stored since the last snapshot
    probe = make_builder(tmp_path / "probe", buffer_size=100)
    b = probe.open(now=0.0, wall=WALL)
    feed(probe, b, "p", 1)
    body = len(b.record.accepted[0].body)
    builder = make_builder(tmp_path, buffer_size=100, checkpoint_size=body)

    # Act: REPLAY_BOUND + 2 batches of one update each
    checkpointed = []
    for seq in range(1, REPLAY_BOUND + 3):
        batch = builder.open(now=0.0, wall=WALL + seq)
        feed(builder, batch, "d", seq)
        builder.close(batch)
        builder.committed(batch)
        checkpointed.append(batch.tally.checkpoints)

    # Assert: batches 1..4 store 1..4 bodies (<= 4 checkpoints); batch 5 would make 5: checkpoint,
    # and the count starts again from 0 (batch 6 stores one body)
    assert checkpointed == [0] * REPLAY_BOUND + [1, 0]


def test_a_step_starts_the_replay_bound_again(tmp_path: Path) -> None:
    # Arrange: K = 2 and a checkpoint as large as one body: every second update makes a step
    probe = make_builder(tmp_path / "probe", buffer_size=100)
    b = probe.open(now=0.0, wall=WALL)
    feed(probe, b, "p", 1)
    builder = make_builder(tmp_path, buffer_size=2, checkpoint_size=len(b.record.accepted[0].body))

    # Act: ten batches of one update (five steps)
    checkpoints = 0
    for seq in range(1, 11):
        batch = builder.open(now=0.0, wall=WALL + seq)
        feed(builder, batch, "d", seq)
        builder.close(batch)
        builder.committed(batch)
        checkpoints += batch.tally.checkpoints

    # Assert: the snapshot of each step resets the stored bytes: at most one body is ever
    # stored since the last snapshot, so no checkpoint is needed
    assert builder.engine.version == 5
    assert checkpoints == 0


def test_a_batch_larger_than_a_checkpoint_is_checkpointed(tmp_path: Path) -> None:
    # Arrange: checkpoints of 1 byte
    builder, batch = open_batch(tmp_path, buffer_size=100, checkpoint_size=1)
    generation = builder.engine.generation

    # Act
    feed(builder, batch, "d", 1)
    builder.close(batch)

    # Assert: the buffer (with the update) is stored as a checkpoint of version 0, from the next
    # generation on; the row is still stored (its seq must be seen as accepted)
    snapshot = batch.record.snapshot
    assert snapshot is not None
    assert snapshot[0] == 0
    assert snapshot[2].accumulator is not None
    assert batch.record.generation == builder.engine.generation == generation + 1
    assert batch.tally.checkpoints == 1
    assert batch.new_versions == []
    assert len(batch.record.accepted) == 1


def test_replay_rebuilds_the_buffer_and_reports_a_step_it_makes(tmp_path: Path) -> None:
    # Arrange: two updates buffered under K = 3 (stored rows), then a restart with K = 2
    before = make_builder(tmp_path, buffer_size=3)
    batch = before.open(now=0.0, wall=WALL)
    feed(before, batch, "a", 1)
    feed(before, batch, "b", 1)
    rows = batch.record.accepted
    after = make_builder(tmp_path, buffer_size=2)

    # Act
    replayed = after.replay(rows, now=0.0, wall=WALL + 5)
    no_step = make_builder(tmp_path, buffer_size=3).replay(rows, now=0.0, wall=WALL + 5)

    # Assert: K = 2 steps on the replayed rows (version 1, committed by the caller); K = 3 only
    # rebuilds the buffer (nothing to commit)
    assert replayed is not None
    assert replayed.new_versions == [VersionRecord(1, WALL + 5, 0)]
    assert after.engine.version == 1
    assert no_step is None


@pytest.mark.parametrize(
    ("rows", "typed"),
    [
        ({}, Tally()),
        (
            {"received": 3, "applied": 2, "bytes": 10, "rejected:stale": 1, "staleness:4": 2},
            Tally(
                received=3, applied=2, bytes=10,
                rejected={RejectReason.STALE: 1}, staleness={4: 2},  # type: ignore[arg-type]
            ),
        ),
    ],
)  # fmt: skip
def test_tally_reads_and_writes_the_stores_counter_rows(rows: dict[str, int], typed: Tally) -> None:
    assert Tally.from_rows(rows) == typed
    assert typed.to_rows() == rows


def test_tally_leaves_unknown_rows_out_and_adds_typed_counts() -> None:
    # Arrange: a reason this release does not know, and a malformed staleness
    tally = Tally.from_rows({"rejected:gone": 4, "staleness:x": 1, "received": 1})
    other = Tally()
    other.reject(RejectReason.STALE)
    other.accept(2)

    # Act
    tally.add(other)

    # Assert
    assert tally.to_rows() == {
        "received": 3, "applied": 1, "rejected:stale": 1, "staleness:2": 1,
    }  # fmt: skip
    assert tally.rejected_by_value() == {"stale": 1}


def test_outcomes_are_typed_variants() -> None:
    rejected = Rejected(RejectReason.STALE)
    assert (rejected.kind.value, rejected.chunk_key, rejected.ends_message) == (
        "rejected",
        None,
        False,
    )
    assert Pending(("d", b"m")).hold
    assert Accepted.kind.value == "accepted"
