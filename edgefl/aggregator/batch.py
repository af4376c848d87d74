"""Sans-IO batch building: ingest outcomes in, one :class:`Batch` to commit out.

The service validates each batch of inbound packets with :class:`~edgefl.aggregator.ingest.Ingest`
and books every outcome here. :class:`BatchBuilder` owns what a batch changes besides the engine:

* **book**: a pending chunk packet is *held* (acknowledged only when its update completes or is
  given up); any other packet is queued for acknowledgement, counted, and an accepted update
  becomes a row of the :class:`~edgefl.aggregator.store.BatchRecord`;
* **new generation**: the buffer was emptied (a step or a closed round): the model is
  snapshotted into the record before any further update enters the new generation's buffer,
  and a new version goes into the history;
* **checkpoint rule**: store the buffer (accumulator) instead of the batch's encoded updates
  when that writes less, or when the updates stored since the last snapshot exceed
  ``REPLAY_BOUND`` checkpoints (which bounds the replay after a crash);
* **history**: versions and when they were created, committed with the batch that made them;
* **receipt outcomes**: every accepted update and every rejection a receipt reports
  (:data:`~edgefl.protocol.receipts.RECEIPTED_REJECTIONS`), as ``batch.outcomes``; the service
  turns them into receipts only after the batch committed.

Stages of one batch (each a distinct method): :meth:`BatchBuilder.open` ->
:meth:`~BatchBuilder.book` per packet -> :meth:`~BatchBuilder.close` (expiry, deadlines,
checkpoint, release) -> the service commits ``batch.record`` -> :meth:`~BatchBuilder.committed`.
A restart rebuilds the buffer with :meth:`BatchBuilder.replay`.

No clock, socket or file: times come in with the batch (``now``: monotonic seconds, for ingest,
deadlines and expiry; ``wall``: wall-clock seconds, for row and version timestamps), and the
packets to acknowledge are opaque :class:`~edgefl.transport.InboundMessage` values.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from edgefl.aggregator.engine import Engine
from edgefl.aggregator.ingest import Accepted, ChunkKey, Ingest, IngestOutcome, Pending, decode_body
from edgefl.aggregator.publish import Release
from edgefl.aggregator.stats import VersionRecord
from edgefl.aggregator.store import AcceptedRow, BatchRecord
from edgefl.aggregator.tally import Tally
from edgefl.errors import EdgeflError, RejectReason
from edgefl.protocol.receipts import RECEIPTED_REJECTIONS, CommitOutcome
from edgefl.protocol.topics import UpdateTopic, parse_topic
from edgefl.transport.base import InboundMessage

__all__ = ["REPLAY_BOUND", "Batch", "BatchBuilder", "Ticket", "checkpoint_bytes"]

log = logging.getLogger("edgefl.aggregator")

REPLAY_BOUND = 4  # stored update bytes since the last snapshot, in checkpoint sizes

Ticket = tuple[InboundMessage, float]  # a packet to acknowledge, and when it arrived (monotonic)


def checkpoint_bytes(num_params: int) -> int:
    """The size of a checkpoint: weights, accumulator and one optimizer moment, float32."""
    return 3 * 4 * num_params


@dataclass
class Batch:
    """One batch on its way to the store: built by :class:`BatchBuilder`, committed as
    ``record``, then its ``acks`` acknowledged and its ``new_versions`` announced."""

    record: BatchRecord
    now: float  # monotonic seconds
    wall: float  # wall-clock seconds
    tally: Tally = field(default_factory=Tally)
    acks: list[Ticket] = field(default_factory=list)
    accepted: list[tuple[str, int]] = field(default_factory=list)  # (device, seq) of new rows
    # the final outcomes a receipt reports, in booking order (published once committed)
    outcomes: list[CommitOutcome] = field(default_factory=list)
    new_versions: list[VersionRecord] = field(default_factory=list)
    release: Release | None = None  # the newest version this batch made, once committed


class BatchBuilder:
    """The batch-building state of one aggregator (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        ingest: Ingest,
        *,
        totals: Tally | None = None,
        history: Iterable[VersionRecord] = (),
        checkpoint_size: int,
    ) -> None:
        self.engine = engine
        self.ingest = ingest
        self.totals = totals if totals is not None else Tally()
        self._history = list(history)
        self._held: dict[ChunkKey, list[Ticket]] = {}
        self._rows_bytes = 0  # encoded update bytes stored since the last snapshot
        self._checkpoint_size = checkpoint_size
        accuracies = [r.accuracy for r in self._history if r.accuracy is not None]
        self._last_accuracy = accuracies[-1] if accuracies else None

    # ------------------------------------------------------------------ observations
    @property
    def history(self) -> list[VersionRecord]:
        """Committed versions, oldest first (a copy)."""
        return list(self._history)

    @property
    def held_packets(self) -> int:
        """Chunk packets whose acknowledgement waits for their update to complete."""
        return sum(len(tickets) for tickets in self._held.values())

    @property
    def last_accuracy(self) -> float | None:
        """The held-out accuracy measured last (at start: the newest in the history; ``None``:
        none measured)."""
        return self._last_accuracy

    def created_at(self, version: int, fallback: float) -> float:
        """When ``version`` was created, from the history (``fallback`` if it is not there)."""
        for rec in reversed(self._history):
            if rec.version == version:
                return rec.created_at
        return fallback

    def current_release(self, fallback_created_at: float) -> Release:
        """The engine's current version as a release (a copy of its weights)."""
        engine = self.engine
        created = self.created_at(engine.version, fallback_created_at)
        return Release(engine.version, created, engine.weights.copy())

    def record_accuracy(self, version: int, accuracy: float) -> None:
        """A held-out accuracy measured for ``version`` (kept in its history record)."""
        self._last_accuracy = accuracy
        for i in range(len(self._history) - 1, -1, -1):
            if self._history[i].version == version:
                self._history[i] = dataclasses.replace(self._history[i], accuracy=accuracy)
                break

    # ------------------------------------------------------------------ stages
    def open(self, *, now: float, wall: float) -> Batch:
        """Start a batch at the engine's current generation."""
        return Batch(BatchRecord(generation=self.engine.generation), now=now, wall=wall)

    def book(
        self, batch: Batch, message: InboundMessage, received_at: float, out: IngestOutcome
    ) -> None:
        """Book one packet's outcome: hold it (a chunk of an incomplete update) or queue its
        acknowledgement, count it, and turn an accepted update into a row of the record."""
        match out:
            case Pending(chunk_key=key, hold=True):
                self._held.setdefault(key, []).append((message, received_at))
                return
            case Pending():
                batch.acks.append((message, received_at))
            case Accepted():
                batch.acks.append((message, received_at))
                self._release_held(batch, out.chunk_key)
                self._accept(batch, out)
            case _:  # Rejected
                batch.acks.append((message, received_at))
                if out.ends_message:
                    self._release_held(batch, out.chunk_key)
                batch.tally.reject(out.reason)
                if out.reason in RECEIPTED_REJECTIONS:
                    self._receipt_rejection(batch, message.topic, out.reason)
                log.debug("rejected %s: %s", message.topic, out.detail)

    def close(self, batch: Batch, *, timers: bool = True) -> Batch | None:
        """End a batch: give up expired chunked messages, run FedAvg deadlines and the flush
        deadline (unless ``timers`` is False: no step then), apply the checkpoint rule, and add
        the batch's counts to the totals. ``None`` when there is nothing to commit or
        acknowledge."""
        for dropped in self.ingest.expire(batch.now):
            batch.tally.reject(dropped.reason)
            batch.acks.extend(self._held.pop((dropped.source, dropped.message_id), []))
        if timers and self.engine.tick(batch.now) is not None:
            self._new_generation(batch)
        self._apply_checkpoint_rule(batch)
        record = batch.record
        record.counters = batch.tally.to_rows()
        self.totals.add(batch.tally)
        if record.empty and not batch.acks:
            return None
        if batch.new_versions:
            batch.release = self._release(batch)
        return batch

    def committed(self, batch: Batch) -> None:
        """``batch.record`` is durable: its rows join the durable duplicate lookup, its
        versions the history."""
        self.ingest.committed(batch.accepted)
        self._history.extend(batch.new_versions)

    def replay(self, rows: Iterable[AcceptedRow], *, now: float, wall: float) -> Batch | None:
        """Rebuild the buffer after a restart from the stored rows of the current generation,
        in their original order. Returns the batch to commit (and then pass to
        :meth:`committed`) when the replay emptied the buffer (e.g. ``K`` was lowered across
        the restart), else ``None``."""
        engine, ingest = self.engine, self.ingest
        batch = self.open(now=now, wall=wall)
        record = batch.record
        for row in rows:
            codec = json.loads(row.codec)
            update = decode_body(codec, row.body, engine.weights.shape[0], ingest.scratch)
            engine.add(
                row.device,
                update,
                base_version=row.base_version,
                num_examples=row.num_examples,
                now=now,
            )
            if engine.generation != record.generation:
                self._new_generation(batch)
            elif record.snapshot is not None:
                record.rebuffer.append(dataclasses.replace(row, generation=engine.generation))
        if record.snapshot is None:
            return None
        record.counters = batch.tally.to_rows()
        self.totals.add(batch.tally)
        return batch

    # ------------------------------------------------------------------ steps of a stage
    @staticmethod
    def _receipt_rejection(batch: Batch, topic: str, reason: RejectReason) -> None:
        """Book a final rejection for the device's receipt: device and seq come from the topic
        (a rejected update may have no decoded header)."""
        try:
            parsed = parse_topic(topic)
        except EdgeflError:
            return
        if isinstance(parsed, UpdateTopic):
            batch.outcomes.append(CommitOutcome(parsed.device_id, parsed.seq, reason))

    def _release_held(self, batch: Batch, key: ChunkKey | None) -> None:
        if key is not None:
            batch.acks.extend(self._held.pop(key, []))

    def _accept(self, batch: Batch, out: Accepted) -> None:
        header, staleness = out.header, out.result.outcome.staleness
        record = batch.record
        batch.tally.accept(staleness)
        record.accepted.append(
            AcceptedRow(
                generation=record.generation,
                device=header.device_id,
                seq=header.seq,
                base_version=header.base_version,
                num_examples=header.num_examples,
                codec=out.codec_json,
                body=out.body,
                version=header.base_version + staleness,
                at=batch.wall,
            )
        )
        batch.accepted.append((header.device_id, header.seq))
        batch.outcomes.append(CommitOutcome(header.device_id, header.seq))
        if self.engine.generation != record.generation:
            self._new_generation(batch)

    def _new_generation(self, batch: Batch) -> None:
        """The buffer was emptied (a step or a closed round): snapshot the model now, before any
        further update enters the new generation's buffer."""
        engine, record = self.engine, batch.record
        if engine.version != self._last_version(record):
            applied = self.totals.applied + batch.tally.applied
            record.history.append((engine.version, batch.wall, applied))
            batch.new_versions.append(VersionRecord(engine.version, batch.wall, applied))
            batch.tally.steps += 1
        record.snapshot = (engine.version, batch.wall, engine.snapshot())
        record.generation = engine.generation
        self._rows_bytes = 0

    def _apply_checkpoint_rule(self, batch: Batch) -> None:
        """Store the buffer as a checkpoint (accumulator) instead of this batch's encoded
        updates when that writes less, or when the updates stored since the last snapshot
        exceed ``REPLAY_BOUND`` checkpoints.

        A checkpoint is about 12 bytes per parameter (weights, accumulator, a momentum): at
        100k parameters and int8 a batch of 40 updates is 3.6 MB of bodies against a 1.2 MB
        checkpoint, so it is checkpointed; at 1M parameters a batch of 4 updates (3.6 MB) is
        not (12 MB), and with K = 20 the step comes before the replay bound."""
        engine, record = self.engine, batch.record
        if not engine.can_checkpoint:
            return
        batch_bytes = sum(len(r.body) for r in record.accepted if r.generation == record.generation)
        self._rows_bytes += batch_bytes
        size = self._checkpoint_size
        if batch_bytes <= size and self._rows_bytes <= REPLAY_BOUND * size:
            return
        state = engine.checkpoint()
        created = self._history[-1].created_at if self._history else batch.wall
        if record.history:
            created = record.history[-1][1]
        record.snapshot = (engine.version, created, state)
        record.generation = engine.generation
        batch.tally.checkpoints += 1
        self._rows_bytes = 0

    def _last_version(self, record: BatchRecord) -> int:
        if record.history:
            return record.history[-1][0]
        return self._history[-1].version if self._history else -1

    def _release(self, batch: Batch) -> Release:
        engine = self.engine
        created = batch.new_versions[-1].created_at
        snapshot = batch.record.snapshot
        if snapshot is not None and snapshot[0] == engine.version:
            weights = snapshot[2].weights  # already a copy of this version: share it
        else:
            weights = engine.weights.copy()
        return Release(engine.version, created, weights)
