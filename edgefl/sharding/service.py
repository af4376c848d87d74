"""Asyncio shells of hierarchical FedBuff over MQTT: a root and partition workers (a shard runs
one worker per partition it owns). Still a minimal form: no signature checks on updates and no
receipts. A shard's partitions are given on its command line (``--own 0,3 --epoch E``) or it
follows the root's retained assignment (``--own assigned``, :mod:`~edgefl.sharding.follow`:
each partition newly given to ``--shard`` claimed at its owner epoch + 1,
:meth:`Assignment.claims`; the workers of partitions taken from it stopped) and keeps its
liveness on ``shards/<shard>/state``; the root rebalances the assignment when a shard is lost or
joins (:mod:`~edgefl.sharding.liveness`).

Updates of any codec, whole or chunked: a worker joins an update's ``UPDATE_CHUNK`` packets
with the protocol's :class:`Reassembler` (the one the aggregator's ingest uses) and keeps every
chunk unacknowledged until the partial covering the update is confirmed; an update refused
after reassembly, or given up by the reassembler (expired, evicted), has its chunks
acknowledged at once.

The model (``--model``; docs/PROTOCOL.md §11, "Model versions"): the root publishes every
committed version as the single aggregator does, with its :class:`Publisher` (retained chunks,
then the manifest with the training hints and codec, signed with ``--signing-key``; the retained
server state, whose status ``lost`` is the Will of the root's connection; METRICS every
``--metrics-interval-s``), at start and after each step, always after committing it
(:mod:`~edgefl.sharding.release`). A worker starts at the version of its grant and follows the
manifest: a newer version closes the open partial against the old one
(:meth:`ShardAccumulator.advance`), and an update based on the next version that arrives before
its manifest is held, unacknowledged, until it does. Without ``--model`` the root publishes no
model (tests that publish a fixed one themselves).

Topics (protocol revision 1.3, every one built and parsed by :mod:`edgefl.protocol.topics`;
docs/PROTOCOL.md §11), under ``edgefl/v1/<fleet>/``:

    part/<k>/device/<id>/update/<seq>  device -> worker of k   UPDATE                  QoS 1
    device/<id>/update/<seq>           old device -> every worker (``--legacy``)       QoS 1
    shards/part/<k>/takeover   worker -> root   {"epoch": e}                           QoS 1
    shards/part/<k>/granted    root -> worker   {"epoch", "version", "high_water"} or
                                                {"epoch", "refused"}                   QoS 1
    shards/part/<k>/confirm    root -> worker   {"id": [shard, k, e, n], "verdict"}    QoS 1
    shards/partial             worker -> root   encode_partial(...) bytes              QoS 1
    shards/part/<k>/progress   worker -> anyone {"shard", "epoch", "open"}  QoS 0, --progress
    shards/root/status         root -> anyone   {"version", "buffer_fill", "epochs",
                                                 "verdicts", "weights", "last_step"}   retained
    shards/assignment          root -> devices, shards   Assignment.to_json()    retained, QoS 1
    shards/<shard>/state       shard -> root    ShardState.to_json()   retained, QoS 1, Will lost
    model/manifest, model/<v>/<i>, server/state   root -> devices, workers (manifest)
                                                 as the single aggregator (§5)    retained, QoS 1
    server/metrics                     root -> monitors   METRICS of partials      QoS 0

The root publishes the assignment (P, owners, owner epochs) retained when it starts and after
every granted take-over that moves a partition (the ``"shard"`` of the take-over becomes the
partition's owner) and after every change of the live shards that moves one (committed
first): 1.3 devices read P from it and publish to their partition
(``device_agent/partition.py``). Its initial owners are the HRW assignment over ``--shards``.

Each partition worker owns the MQTT session ``edgefl-<fleet>-part-<k>`` (persistent, manual
acks): device updates stay unacknowledged until the root confirmed the partial covering them
(the exactly-once rule). The root commits its :class:`RootState` (one file, written atomically)
before it confirms or grants. Old (pre-1.3) devices publish unpartitioned topics: with
``--legacy`` every worker's session also subscribes to them, and a worker counts only its own
partition's devices (the others' copies are acknowledged unread, counted as
``other_partition``: each session holds its own copy, so the owner's is untouched). That costs P
broker deliveries per legacy update; the alternative is one legacy router (docs/SCALING.md).

Run: ``python -m edgefl.sharding.service root|shard --broker URL[,URL...] ...`` (``--help``).
SIGTERM or SIGINT stops either within about a second, exit 0 (:mod:`.stopping`): the root
handles the message in hand to its end, leaves those after it unacknowledged (redelivered to the
next run), publishes its newest version and server state ``offline`` and disconnects; a shard
stops its workers (their updates unacknowledged) and, following the assignment, publishes its
state ``offline`` (docs/SCALING.md, "Stopping the tree's processes").
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import pickle
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation.fedbuff import FedBuffConfig
from edgefl.aggregation.robust import NormBound
from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.publish import Release
from edgefl.aggregator.publisher import Publisher, RateMeter, server_state_will
from edgefl.codec.config import CodecConfig, CodecDescriptor, Quantization
from edgefl.codec.update import open_update
from edgefl.errors import ProtocolError, RejectReason, UpdateRejected
from edgefl.models import init_weights_numpy
from edgefl.protocol import ServerMetrics, ServerState, ServerStatus
from edgefl.protocol.chunking import Reassembler, ReassemblyConfig, decode_chunk
from edgefl.protocol.envelope import EnvelopeKind, decode_envelope
from edgefl.protocol.messages import ModelManifest, decode_message, decode_update
from edgefl.protocol.topics import (
    PartitionControl,
    PartitionControlTopic,
    ShardsLeaf,
    ShardStateTopic,
    UpdateTopic,
    manifest_topic,
    parse_topic,
    partition_control_filter,
    partition_control_topic,
    shard_states_filter,
    shards_topic,
    updates_filter,
)
from edgefl.sharding.assignment import Assignment
from edgefl.sharding.follow import AssignedShard, new_session
from edgefl.sharding.liveness import Rebalancer, ShardState
from edgefl.sharding.partial import PartialId, PartialSum, ShardAccumulator
from edgefl.sharding.partitions import check_owner
from edgefl.sharding.release import (
    AGGREGATOR_NAMED,
    ModelSettings,
    PublishedFile,
    RootTotals,
    release_config,
    root_metrics,
    root_server_state,
)
from edgefl.sharding.root import PartialVerdict, RootBuffer, RootState
from edgefl.sharding.seqwindow import SeqWindow
from edgefl.sharding.stopping import STOP_SIGNALS, run_until_signalled
from edgefl.sharding.wire import decode_partial, encode_partial
from edgefl.transport.base import InboundMessage, Transport, TransportError
from edgefl.transport.config import MqttConfig, Will
from edgefl.transport.mqtt import MqttTransport

log = logging.getLogger("edgefl.sharding")
MAX_DECOMPRESSED = 1 << 28
MAX_UPDATE_BYTES = 64 * 1024 * 1024  # the aggregator's default max_update_bytes
STOP_PUBLISH_S = 0.5
"""At a clean stop, the longest the root waits to publish its newest version and ``offline``."""


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _control_of(topic: str, fleet: str) -> PartitionControl | None:
    """The control kind of a ``shards/part/<k>/<control>`` topic; None for anything else."""
    if "/shards/" not in topic:
        return None  # an update topic: parsed (and judged) by the worker
    parsed = parse_topic(topic, expected_fleet=fleet)
    return parsed.control if isinstance(parsed, PartitionControlTopic) else None


# ---------------------------------------------------------------------------- root
@dataclass(frozen=True)
class _Committed:
    """The root's state file: its buffer and the assignment it published (one atomic file)."""

    root: RootState
    assignment: bytes  # Assignment.to_json()


class RootService:
    """Applies partials, grants take-overs, steps at K, publishes the assignment; state committed
    to ``state_path``."""

    def __init__(
        self,
        root: RootBuffer,
        fleet: str,
        state_path: Path,
        assignment: Assignment,
        publishing: tuple[AggregatorConfig, PublishedFile] | None = None,
        writer: concurrent.futures.Executor | None = None,
    ) -> None:
        """``publishing``: publish every committed model version, the server state (and its
        Last Will, :meth:`will`) and METRICS every ``outputs.metrics_interval_s`` with the
        single aggregator's :class:`Publisher`, from this configuration (:mod:`.release`),
        recording the chunk sets in this file; ``writer`` runs those file writes (default: a
        thread of its own). :meth:`run` is given the connection (made with :meth:`will`)."""
        self._root, self._fleet, self._path = root, fleet, state_path
        self._assignment = assignment
        self._rebalancer = Rebalancer()
        self._last_step: dict[str, Any] | None = None
        self._totals = RootTotals()
        self._rates = (0.0, 0.0)  # applied updates/s, partial bytes/s over the last period
        self._started_at = time.time()
        self._publishing = publishing
        self._writer = writer
        self._publisher: Publisher | None = None
        self._transport: Transport | None = None
        if publishing is not None:
            config, published = publishing
            self._buffer_size = config.aggregation.buffer_size
            self._session = published.start_session()

    def will(self) -> Will | None:
        """The Last Will of the root's connection when it publishes the server state: that
        state with status ``lost`` (as the single aggregator's); None otherwise."""
        if self._publishing is None:
            return None
        return server_state_will(self._server_state(ServerStatus.LOST))

    @property
    def _t(self) -> Transport:
        assert self._transport is not None, "RootService.run() was not called"
        return self._transport

    @staticmethod
    def load(
        config: FedBuffConfig,
        path: Path,
        *,
        partitions: int,
        params: int,
        shards: Sequence[str],
        initial: NDArray[np.float32] | None = None,
    ) -> tuple[RootBuffer, Assignment]:
        """The committed root and assignment, or a fresh root at version 0 with the weights
        ``initial`` (default: ``params`` zeros) and the initial HRW assignment of ``partitions``
        over ``shards``."""
        if path.exists():
            committed = pickle.loads(path.read_bytes())  # our own file, never received
            if not isinstance(committed, _Committed):  # a file from before the assignment
                committed = _Committed(committed, Assignment.initial(partitions, shards).to_json())
            root = RootBuffer.restore(config, committed.root, partitions=partitions)
            assignment = Assignment.from_json(committed.assignment)
            if assignment.partitions == partitions:
                return root, assignment
            return root, Assignment.initial(partitions, shards)  # P changed by the operator
        weights = np.zeros(params, np.float32) if initial is None else initial
        fresh = RootBuffer(config, weights, partitions=partitions)
        return fresh, Assignment.initial(partitions, shards)

    def _commit(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(pickle.dumps(_Committed(self._root.snapshot(), self._assignment.to_json())))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    async def run(self, transport: Transport, stop: asyncio.Event | None = None) -> None:
        """Serve on ``transport`` (connected, persistent session, manual acks) until ``stop`` is
        set, then stop cleanly: the message in hand is handled to its end (committed, confirmed,
        acknowledged), those read after it stay unacknowledged (the broker redelivers them to
        the next run), and, publishing, the newest committed version and the server state
        ``offline`` go out (within ``STOP_PUBLISH_S``); the caller then disconnects. Cancelled
        instead, it ends at once: what it acknowledged is committed (as after SIGKILL)."""
        self._transport = transport
        stop = stop or asyncio.Event()
        if self._publishing is not None:
            config, published = self._publishing
            writer = self._writer or concurrent.futures.ThreadPoolExecutor(1, "edgefl-root-writer")
            self._publisher = Publisher(
                config,
                transport,
                store=published,
                writer=writer,
                retained=published.retained(config.limits.chunk_grace_s),
                release=self._release(),
                server_state=self._server_state,
            )
        messages = self._t.messages()
        await self._t.subscribe(shards_topic(self._fleet, ShardsLeaf.PARTIAL), qos=1)
        await self._t.subscribe(partition_control_filter(self._fleet, PartitionControl.TAKEOVER))
        await self._t.subscribe(shard_states_filter(self._fleet), qos=1)
        await self._publish_assignment()
        if self._publisher is not None:  # the committed version, as the single service does
            await self._publisher.publish_current()
            await self._publisher.publish_state(ServerStatus.ONLINE)
        await self._publish_status()
        if self._publisher is None:
            await self._serve(messages, stop)
            return
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._serve(messages, stop)),
            loop.create_task(self._publisher.run()),
            loop.create_task(self._publisher.housekeeping()),
            loop.create_task(self._metrics(self._publisher)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failed task's exception
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)  # the publisher's lock released
        if stop.is_set():  # served to the end (a failure raised above): say goodbye
            with contextlib.suppress(TransportError, TimeoutError):
                async with asyncio.timeout(STOP_PUBLISH_S):
                    await self._publisher.publish_final()

    async def _serve(self, messages: AsyncIterator[InboundMessage], stop: asyncio.Event) -> None:
        """Handle messages one by one until ``stop`` is set (or the transport closed)."""
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                reading = asyncio.ensure_future(anext(messages))
                await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not reading.done():
                    reading.cancel()  # nothing in hand: the next message stays with the broker
                    return
                try:
                    message = reading.result()
                except StopAsyncIteration:
                    return
                await self._handle(message)
        finally:
            stopping.cancel()

    async def _handle(self, message: InboundMessage) -> None:
        try:
            topic = parse_topic(message.topic, expected_fleet=self._fleet)
        except ProtocolError as exc:  # e.g. shards/<not a name>/state
            log.warning("root: ignoring %r: %s", message.topic, exc)
            await self._t.ack(message)
            return
        match topic:
            case PartitionControlTopic(partition=k, control=PartitionControl.TAKEOVER):
                await self._on_takeover(k, message)
            case ShardStateTopic(shard=shard):
                await self._on_shard_state(shard, message.payload)
            case _:  # the only other subscription: shards/partial
                await self._on_partial(message)
        await self._t.ack(message)

    async def _on_takeover(self, k: int, message: InboundMessage) -> None:
        request = json.loads(message.payload)
        epoch = int(request["epoch"])
        moved = False
        try:
            marks = self._root.take_over(k, epoch)
            if "shard" in request:  # the owner's name (older shards do not send it)
                before = self._assignment
                self._assignment = before.taken_over(k, str(request["shard"]), epoch)
                moved = self._assignment is not before
            self._commit()
            windows = {d: w.to_json() for d, w in marks.items()}
            reply = {"epoch": epoch, "version": self._root.version, "high_water": windows}
        except ValueError as exc:
            reply = {"epoch": epoch, "refused": str(exc)}
        granted = partition_control_topic(self._fleet, k, PartitionControl.GRANTED)
        await self._t.publish(granted, _json(reply), qos=1)
        if moved:
            await self._publish_assignment()
        await self._publish_status()

    async def _on_shard_state(self, shard: str, payload: bytes) -> None:
        """A shard's liveness: rebalance when the live set changes an owner (committed, then
        published; :class:`Rebalancer`)."""
        if not payload:
            return  # a cleared retained state
        try:
            state = ShardState.from_json(payload)
            if state.shard != shard:
                raise ValueError(f"the state of {state.shard!r} on {shard!r}'s topic")
        except ValueError as exc:
            log.warning("root: ignoring a shard state: %s", exc)
            return
        before = self._assignment
        self._assignment = self._rebalancer.observe(state, before)
        if self._assignment is before:
            return
        moved = [
            k for k in range(before.partitions) if before.owners[k] != self._assignment.owners[k]
        ]
        log.info(
            "root: shard %s %s (session %d): partitions %s move, assignment %d",
            shard, state.status, state.session, moved, self._assignment.epoch,
        )  # fmt: skip
        self._commit()
        await self._publish_assignment()

    async def _on_partial(self, message: InboundMessage) -> None:
        try:
            partial = decode_partial(message.payload, max_params=len(self._root.weights))
        except ProtocolError as exc:
            log.warning("root: bad partial: %s", exc)
            return
        verdict = self._root.add_partial(partial)
        totals = self._totals
        totals.received += partial.count
        totals.bytes += len(message.payload)
        if verdict is PartialVerdict.APPLIED:
            totals.applied += partial.count
            totals.staleness_sum += partial.staleness_sum
            totals.staleness_max = max(totals.staleness_max, partial.staleness_max)
            stepped = self._root.ready
            if stepped:
                totals.steps += 1
                result = self._root.step()
                self._last_step = {"version": result.version, "num_updates": result.num_updates}
            self._commit()
            if stepped and self._publisher is not None:
                self._publisher.want(self._release())  # committed first, then published
        pid = partial.id
        confirm = {"id": [pid.shard, pid.partition, pid.epoch, pid.number], "verdict": verdict}
        topic = partition_control_topic(self._fleet, pid.partition, PartitionControl.CONFIRM)
        await self._t.publish(topic, _json(confirm))
        await self._publish_status()

    def _release(self) -> Release:
        """The root's current (committed) model version."""
        return Release(self._root.version, time.time(), self._root.weights.copy())

    def _server_state(self, status: ServerStatus) -> ServerState:
        published = None if self._publisher is None else self._publisher.published_version
        return root_server_state(
            self._fleet,
            status,
            session=self._session,
            version=self._root.version if published is None else published,
            buffer_fill=self._root.buffer_fill,
            buffer_size=self._buffer_size,
            applied=self._totals.applied,
            started_at=self._started_at,
        )

    def metrics(self) -> ServerMetrics:
        """The root's METRICS (:func:`~edgefl.sharding.release.root_metrics`) now."""
        return root_metrics(
            self._fleet,
            version=self._root.version,
            buffer_fill=self._root.buffer_fill,
            buffer_size=self._buffer_size,
            totals=self._totals,
            rates=self._rates,
            verdicts=dict(self._root.verdicts()),
            session=self._session,
        )

    async def _metrics(self, publisher: Publisher) -> None:
        """Every ``metrics_interval_s``: METRICS and the server state, as the single aggregator."""
        assert self._publishing is not None
        interval, totals = self._publishing[0].outputs.metrics_interval_s, self._totals
        meter = RateMeter(time.monotonic(), (totals.applied, totals.bytes))
        while True:
            await asyncio.sleep(interval)
            rates = meter.read(time.monotonic(), (totals.applied, totals.bytes))
            self._rates = (rates[0], rates[1])
            try:
                await publisher.publish_metrics(self.metrics())
            except TransportError as exc:
                log.warning("root: publishing metrics failed: %s", exc)

    async def _publish_assignment(self) -> None:
        """Retained: devices take P from it (PROTOCOL.md §11), operators read the owners."""
        topic = shards_topic(self._fleet, ShardsLeaf.ASSIGNMENT)
        await self._t.publish(topic, self._assignment.to_json(), qos=1, retain=True)

    async def _publish_status(self) -> None:
        status = {
            "version": self._root.version,
            "buffer_fill": self._root.buffer_fill,
            "epochs": {str(k): e for k, e in self._root.epochs.items()},
            "verdicts": dict(self._root.verdicts()),
            "weights": [float(w) for w in self._root.weights[:64]],
            "last_step": self._last_step,
        }
        topic = shards_topic(self._fleet, ShardsLeaf.ROOT_STATUS)
        await self._t.publish(topic, _json(status), retain=True)


# ---------------------------------------------------------------------------- partition worker
@dataclass(frozen=True)
class _Whole:
    """One complete update: its topic, its envelope and every message (chunk) that carried it."""

    topic: UpdateTopic
    data: bytes
    messages: list[InboundMessage]


@dataclass
class _Held:
    partial: PartialSum
    messages: list[InboundMessage]


@dataclass
class WorkerSettings:
    fleet: str
    shard: str
    partition: int
    partitions: int
    epoch: int
    num_params: int
    config: FedBuffConfig
    flush_every: int = 5
    flush_after: float = 0.5
    progress: bool = False
    legacy: bool = False
    """Also take unpartitioned (pre-1.3) update topics, counting only this partition's devices."""
    counts: dict[str, int] = field(default_factory=dict)


class PartitionWorker:
    """Owns one partition at one epoch: take over, pre-sum, forward, ack on confirmation."""

    def __init__(self, data: Transport, control: Transport, settings: WorkerSettings) -> None:
        """``data``: the partition's session (updates only); ``control``: another connection
        for grants and confirmations. They must not share a connection: with updates held
        unacknowledged until their confirmation, a full in-flight window on one connection
        would keep the confirmation that frees it from being read (a deadlock)."""
        self._t, self._ctl, self._s = data, control, settings
        self._acc: ShardAccumulator | None = None
        self._open: list[InboundMessage] = []
        self._held: dict[PartialId, _Held] = {}
        self._waiting: list[InboundMessage] = []
        self._ahead: list[_Whole] = []  # trained on a version not yet read here
        self._reassembler = Reassembler(ReassemblyConfig(max_message_size=MAX_UPDATE_BYTES))
        self._chunks: dict[tuple[str, bytes], list[InboundMessage]] = {}  # held, by update
        self._manifest = -1  # the newest manifest version read
        self.deposed = False

    async def run(self) -> None:
        s = self._s
        control, data = self._ctl.messages(), self._t.messages()
        for what in (PartitionControl.GRANTED, PartitionControl.CONFIRM):
            await self._ctl.subscribe(partition_control_topic(s.fleet, s.partition, what), qos=1)
        await self._ctl.subscribe(manifest_topic(s.fleet), qos=1)  # the root's new versions
        await self._t.subscribe(updates_filter(s.fleet, partition=s.partition), qos=1)
        if s.legacy:
            await self._t.subscribe(updates_filter(s.fleet), qos=1)
        takeover = partition_control_topic(s.fleet, s.partition, PartitionControl.TAKEOVER)
        await self._ctl.publish(takeover, _json({"epoch": s.epoch, "shard": s.shard}), qos=1)
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._flush_periodically()),
            loop.create_task(self._consume(control)),
            loop.create_task(self._consume(data)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()

    async def _consume(self, messages: AsyncIterator[InboundMessage]) -> None:
        async for message in messages:
            await self._dispatch(message)
            if self.deposed:
                return

    async def _dispatch(self, message: InboundMessage) -> None:
        if message.topic == manifest_topic(self._s.fleet):
            await self._ctl.ack(message)
            await self._on_manifest(message.payload)
            return
        control = _control_of(message.topic, self._s.fleet)
        if control is PartitionControl.GRANTED:
            await self._ctl.ack(message)
            await self._on_granted(json.loads(message.payload))
        elif control is PartitionControl.CONFIRM:
            await self._ctl.ack(message)
            await self._on_confirm(json.loads(message.payload))
        elif self._acc is None:
            self._waiting.append(message)  # not granted yet: unacknowledged, kept
        else:
            await self._on_update(message)

    async def _on_granted(self, reply: dict[str, Any]) -> None:
        s = self._s
        if reply["epoch"] != s.epoch or self._acc is not None:
            return  # a reply to an older owner of this partition
        if "refused" in reply:
            log.warning("partition %d: take-over refused: %s", s.partition, reply["refused"])
            self.deposed = True
            return
        self._acc = ShardAccumulator(
            s.config,
            num_params=s.num_params,
            version=int(reply["version"]),
            id_prefix=PartialId(s.shard, s.partition, s.epoch, 0),
            high_water={str(d): SeqWindow.from_json(w) for d, w in reply["high_water"].items()},
        )
        if self._manifest > self._acc.version:  # published after the root granted
            self._acc.advance(self._manifest)
        waiting, self._waiting = self._waiting, []
        for message in waiting:
            await self._on_update(message)

    async def _on_update(self, message: InboundMessage) -> None:
        s = self._s
        try:
            parsed = parse_topic(message.topic, expected_fleet=s.fleet)
            if not isinstance(parsed, UpdateTopic):
                raise ProtocolError(RejectReason.BAD_TOPIC, f"not an update: {message.topic!r}")
            if check_owner(parsed, s.partitions) != s.partition:
                # an old device's unpartitioned update of another partition: its owner's
                # session holds its own copy
                s.counts["other_partition"] = s.counts.get("other_partition", 0) + 1
                await self._t.ack(message)
                return
            whole = await self._reassemble(parsed, message)
        except ProtocolError as exc:
            await self._reject(exc, [message])
            return
        if whole is not None:
            await self._judge(whole)

    async def _reassemble(self, topic: UpdateTopic, message: InboundMessage) -> _Whole | None:
        """The update ``message`` is, or completes (its chunks joined by the protocol's
        :class:`Reassembler`, as in the aggregator's ingest); None while chunks are missing.
        Every chunk of an update stays unacknowledged until the update is judged: rejected, or
        covered by a confirmed partial (PROTOCOL.md §4.5, §11)."""
        outer = decode_envelope(message.payload, max_payload=MAX_UPDATE_BYTES)
        if outer.kind is not EnvelopeKind.UPDATE_CHUNK:
            return _Whole(topic, message.payload, [message])
        chunk = decode_chunk(outer)
        key = (topic.device_id, chunk.header.message_id)
        late = self._reassembler.statistics().late_duplicates
        try:
            done = self._reassembler.add(chunk, source=topic.device_id, now=time.monotonic())
        except ProtocolError as exc:  # a bad checksum ends the message; a conflict only the copy
            held = self._chunks.pop(key, []) if exc.reason is RejectReason.BAD_CHECKSUM else []
            await self._reject(exc, [*held, message])
            return None
        if done is None:
            if self._reassembler.statistics().late_duplicates != late:
                await self._t.ack(message)  # a chunk of an update completed before
            else:
                self._chunks.setdefault(key, []).append(message)
            return None
        return _Whole(topic, bytes(done.data), [*self._chunks.pop(key, []), message])

    async def _judge(self, whole: _Whole) -> None:
        assert self._acc is not None
        s = self._s
        try:
            header, body = decode_update(whole.data, topic=whole.topic)
            if header.base_version == self._acc.version + 1:
                self._ahead.append(whole)  # its manifest is on its way here: unacknowledged
                return
            descriptor = CodecDescriptor.from_dict(header.codec)
            update = open_update(
                descriptor, body, num_params=s.num_params, max_decompressed=MAX_DECOMPRESSED
            )
            self._acc.add(
                header.device_id,
                header.seq,
                update,
                base_version=header.base_version,
                num_examples=header.num_examples,
            )
        except (ProtocolError, UpdateRejected) as exc:
            await self._reject(exc, whole.messages)
            return
        self._open.extend(whole.messages)
        if self._acc.pending >= s.flush_every:
            await self._forward()
        if s.progress:
            progress = {"shard": s.shard, "epoch": s.epoch, "open": len(self._open)}
            topic = partition_control_topic(s.fleet, s.partition, PartitionControl.PROGRESS)
            await self._t.publish(topic, _json(progress), qos=0)

    async def _reject(
        self, exc: ProtocolError | UpdateRejected, messages: list[InboundMessage]
    ) -> None:
        """Judged for good: counted by reason, acknowledged, never counted, never redelivered."""
        reason = str(exc.reason)
        self._s.counts[reason] = self._s.counts.get(reason, 0) + 1
        await self._t.ack_many(messages)

    async def _expire_chunks(self) -> None:
        """Acknowledge the chunks of updates the reassembler gave up (expired, evicted)."""
        for dropped in self._reassembler.expire(time.monotonic()):
            held = self._chunks.pop((dropped.source, dropped.message_id), [])
            reason = str(dropped.reason)
            self._s.counts[reason] = self._s.counts.get(reason, 0) + 1
            await self._t.ack_many(held)

    async def _on_manifest(self, payload: bytes) -> None:
        """A new model version from the root: the open partial goes out against the old one
        (the root weighs it as FedBuff did when the updates came), the rest against the new."""
        if not payload:
            return  # a cleared retained manifest
        try:
            version = decode_message(payload, ModelManifest).version
        except ProtocolError as exc:
            log.warning("partition %d: bad manifest: %s", self._s.partition, exc)
            return
        self._manifest = max(self._manifest, version)
        if self._acc is None or version <= self._acc.version:
            return  # not granted yet: _on_granted catches up
        await self._send(self._acc.advance(version))
        ahead, self._ahead = self._ahead, []
        for whole in ahead:
            await self._judge(whole)

    async def _forward(self) -> None:
        if self._acc is not None:
            await self._send(self._acc.close())

    async def _send(self, partial: PartialSum | None) -> None:
        """Forward ``partial``, holding the open messages it covers until it is confirmed."""
        if partial is None:
            return
        self._held[partial.id] = _Held(partial, self._open)
        self._open = []
        topic = shards_topic(self._s.fleet, ShardsLeaf.PARTIAL)
        await self._ctl.publish(topic, encode_partial(partial), qos=1)

    async def _on_confirm(self, confirm: dict[str, Any]) -> None:
        shard, k, epoch, number = confirm["id"]
        held = self._held.pop(PartialId(shard, k, epoch, number), None)
        if held is None:
            return  # another owner's, or confirmed before
        if confirm["verdict"] in (PartialVerdict.APPLIED, PartialVerdict.DUPLICATE):
            await self._t.ack_many(held.messages)
        elif confirm["verdict"] == PartialVerdict.STALE_EPOCH:
            self.deposed = True  # a newer owner has the partition; our updates go to it

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._s.flush_after)
            await self._expire_chunks()
            await self._forward()


# ---------------------------------------------------------------------------- command line
def fedbuff_config(k: int) -> FedBuffConfig:
    return FedBuffConfig(buffer_size=k, norm_bound=NormBound(adaptive_multiplier=None))


async def _run_root(args: argparse.Namespace) -> None:
    config = fedbuff_config(args.k)
    path = Path(args.state)
    shards = args.shards.split(",")
    publishing, initial = None, None
    if args.model is not None:  # publish the model, starting from the aggregator's version 0
        settings = ModelSettings(
            model=args.model,
            codec=CodecConfig(
                quantization=Quantization(args.quantization), topk_fraction=args.topk_fraction
            ),
            signing_key=None if args.signing_key is None else Path(args.signing_key),
            **{name: getattr(args, name) for name in AGGREGATOR_NAMED},
        )
        release = release_config(
            settings,
            broker_url=args.broker,
            fleet=args.fleet,
            state_dir=path.parent,
            buffer_size=args.k,
        )
        if release.spec.num_params != args.params:
            raise SystemExit(f"--params {args.params}: {args.model} has {release.spec.num_params}")
        publishing = (release, PublishedFile(path.with_name(path.name + ".published")))
        initial = init_weights_numpy(release.spec, args.seed)
    root, assignment = RootService.load(
        config, path, partitions=args.partitions, params=args.params, shards=shards, initial=initial
    )
    service = RootService(root, args.fleet, path, assignment, publishing)
    mqtt = MqttConfig.from_url(
        args.broker,
        client_id=f"edgefl-{args.fleet}-root",
        persistent_session=True,
        manual_ack=True,
        will=service.will(),
    )
    transport = MqttTransport(mqtt)

    async def serve(stop: asyncio.Event) -> None:
        async with transport:  # closed with DISCONNECT: the broker discards the Will
            await service.run(transport, stop)

    await run_until_signalled(serve, graceful=lambda: transport.connected)


ASSIGNED = "assigned"
"""``--own assigned``: follow the root's retained assignment (:class:`~edgefl.sharding.follow.
AssignedShard`)."""


async def _run_shard(args: argparse.Namespace) -> None:
    async def one(k: int, epoch: int) -> None:
        data, control = (
            MqttConfig.from_url(
                args.broker,
                client_id=f"edgefl-{args.fleet}-part-{k}{suffix}",
                persistent_session=True,
                manual_ack=True,
            )
            for suffix in ("", "-control")
        )
        settings = WorkerSettings(
            fleet=args.fleet,
            shard=args.shard,
            partition=k,
            partitions=args.partitions,
            epoch=epoch,
            num_params=args.params,
            config=fedbuff_config(args.k),
            flush_every=args.flush_every,
            flush_after=args.flush_after,
            progress=args.progress,
            legacy=args.legacy,
        )
        async with MqttTransport(data) as data_t, MqttTransport(control) as control_t:
            await PartitionWorker(data_t, control_t, settings).run()

    if args.own != ASSIGNED:  # nobody to say goodbye to: a signal cancels the workers at once
        workers = (one(int(k), args.epoch) for k in args.own.split(","))

        async def fixed(_stop: asyncio.Event) -> None:
            await asyncio.gather(*workers)

        await run_until_signalled(fixed, graceful=lambda: False)
        return
    shard = AssignedShard(args.fleet, args.shard, args.partitions, one, session=new_session())
    config = MqttConfig.from_url(
        args.broker, client_id=f"edgefl-{args.fleet}-shard-{args.shard}", will=shard.will()
    )
    transport = MqttTransport(config, on_connect=shard.announce)

    async def assigned(stop: asyncio.Event) -> None:
        async with transport:
            await shard.run(transport, stop, args.assignment_wait_s)

    await run_until_signalled(assigned, graceful=lambda: transport.connected)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m edgefl.sharding.service")
    parser.add_argument("role", choices=["root", "shard"])
    parser.add_argument("--broker", required=True, help="URL, or a comma list of cluster nodes")
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--k", type=int, required=True, help="FedBuff buffer size K")
    parser.add_argument("--state", help="root: state file")
    model = parser.add_argument_group("root: publish the model (as the single aggregator does)")
    model.add_argument("--model", help="the model served (its manifest, chunks, server state)")
    model.add_argument("--seed", type=int, default=0, help="version 0: init weights of seed")
    model.add_argument("--local-epochs", type=int, default=1, help="manifest hint")
    model.add_argument("--batch-size", type=int, default=32, help="manifest hint")
    model.add_argument("--lr", type=float, default=0.1, help="manifest hint")
    model.add_argument("--quantization", default="int8", help="manifest codec hint")
    model.add_argument("--topk-fraction", type=float, help="manifest codec hint")
    model.add_argument("--max-packet", type=int, default=256 * 1024, help="model chunk bytes")
    model.add_argument("--signing-key", help="Ed25519 private key PEM: sign every manifest")
    model.add_argument(
        "--metrics-interval-s", type=float, default=5.0, help="METRICS and server state, seconds"
    )
    parser.add_argument("--shard", default="s0")
    parser.add_argument(
        "--shards", default="s0", help="root: the shards, comma-separated (initial assignment)"
    )
    parser.add_argument(
        "--own",
        default="0",
        help=f"shard: partitions, comma-separated, or {ASSIGNED!r}: follow the root's assignment "
        "(take over what it gives --shard, each at its owner epoch + 1, stop what it takes "
        "away; --epoch is then unused) and keep a retained liveness state with a Will",
    )
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument(
        "--assignment-wait-s",
        type=float,
        default=30.0,
        help="shard: --own assigned, seconds to wait for the first assignment",
    )
    parser.add_argument("--flush-every", type=int, default=5, help="shard: updates per partial")
    parser.add_argument("--flush-after", type=float, default=0.5, help="shard: seconds")
    parser.add_argument("--progress", action="store_true", help="shard: publish open counts")
    parser.add_argument(
        "--legacy", action="store_true", help="shard: also take pre-1.3 unpartitioned updates"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for sig in STOP_SIGNALS:  # until the event loop's handlers: a quiet exit 0
        signal.signal(sig, _leave)
    asyncio.run(_run_root(args) if args.role == "root" else _run_shard(args))


def _leave(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
