"""The aggregator service: an asyncio shell around the sans-IO ingest, engine and state store.

Data flow (one process, one event loop, a writer thread for SQLite, an inflate thread)::

    MQTT (persistent session, QoS1, manual ack)
      -> reader task -> bounded queue -> ingest task: batch of messages
           Ingest.stage / inflate (bodies > 256 KiB: inflate thread) / decode / finish
           (reassembly, validation, decode, Engine.add / step)
           -> BatchRecord -> writer thread: StateStore.commit (one SQLite transaction)
           -> finisher task, in batch order, once committed: ack every message of the batch
              (chunks of incomplete updates are held)
           -> new versions: history, on_version, publisher, evaluator
      publisher task: retained chunks then manifest of the newest committed version (coalesced),
                      server state; housekeeping: clear old chunk sets, FedAvg deadlines,
                      reassembly expiry; metrics task: METRICS + server state every interval.

Group commit: an update is acknowledged only after the transaction holding it committed, so a
SIGKILL at any point loses nothing the broker believes delivered and double-counts nothing
(``store.py`` explains the restore). A version is published only after it is durable, so devices
never see a version a restarted aggregator does not know.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation import FedBuff, FedBuffConfig, FedBuffState
from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.engine import Engine
from edgefl.aggregator.evaluation import Evaluator
from edgefl.aggregator.ingest import (
    Ingest,
    IngestOutcome,
    OutcomeKind,
    StagedUpdate,
    decode_body,
)
from edgefl.aggregator.metrics import PrometheusExporter
from edgefl.aggregator.publish import RetainedChunks, build_model_packets, clear_packets
from edgefl.aggregator.stats import AggregatorStatistics, VersionRecord
from edgefl.aggregator.store import (
    AcceptedRow,
    BatchRecord,
    StateStore,
    seen_lookup,
)
from edgefl.errors import EdgeflError
from edgefl.models import init_weights_numpy
from edgefl.protocol import (
    ServerMetrics,
    ServerState,
    ServerStatus,
    encode_message,
    server_metrics_topic,
    server_state_topic,
)
from edgefl.protocol.topics import updates_filter
from edgefl.transport import (
    ConnectInfo,
    InboundMessage,
    MqttTransport,
    Transport,
    TransportError,
    Will,
)

__all__ = ["Aggregator", "OnVersion", "Phase"]

log = logging.getLogger("edgefl.aggregator")

OnVersion = Callable[[VersionRecord], None]
_SHUTDOWN_PUBLISH_S = 5.0
_IDLE_TICK_S = 0.5
_INFLATE_DEPTH = 2  # updates handed to the inflate thread and not finished yet
_INFLATE_OFFLOAD_BYTES = 256 * 1024  # smaller bodies are decompressed on the loop
_COMMITS_IN_FLIGHT = 2  # prepared batches waiting for their commit (each holds its payloads)
_REPLAY_BOUND = 4  # stored update bytes since the last snapshot, in checkpoint sizes
_SLICE_S = 0.01  # longest stretch of batch validation before yielding to the event loop


class Phase(StrEnum):
    """Where :meth:`Aggregator.run` is (for status lines, sd_notify and the signal handling)."""

    STARTING = "starting"
    RESTORING = "restoring state"
    CONNECTING = "connecting to the broker"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclasses.dataclass
class _Release:
    version: int
    created_at: float
    weights: NDArray[np.float32]


@dataclasses.dataclass(frozen=True)
class _Inflating:
    """A staged update whose body the inflate thread is decompressing."""

    message: InboundMessage
    received_at: float
    staged: StagedUpdate
    future: concurrent.futures.Future[bytes | EdgeflError]


@dataclasses.dataclass
class _Prepared:
    """One validated batch waiting for its commit."""

    record: BatchRecord
    acks: list[tuple[InboundMessage, float]] = dataclasses.field(default_factory=list)
    pairs: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    new_versions: list[VersionRecord] = dataclasses.field(default_factory=list)
    release: _Release | None = None


def initial_state(config: AggregatorConfig) -> FedBuffState:
    """Version 0: torch-free initial weights (``init_weights_numpy(spec, seed)``), no buffer."""
    w0 = init_weights_numpy(config.spec, config.seed)
    core = FedBuff(FedBuffConfig(server_optimizer=config.optimizer_config()), w0)
    return dataclasses.replace(core.snapshot(), accumulator=None)


class Aggregator:
    """The FedBuff / FedAvg aggregator service (see the module docstring)."""

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        transport: Transport | None = None,
        on_version: OnVersion | None = None,
    ) -> None:
        self.config = config
        self._given_transport = transport
        self._on_version = on_version
        self._transport: Transport | None = None
        self._stop = asyncio.Event()
        self._stopping = False
        self._queue: asyncio.Queue[tuple[InboundMessage, float] | None] | None = None
        self._store: StateStore | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflater: concurrent.futures.ThreadPoolExecutor | None = None
        self._engine: Engine | None = None
        self._ingest: Ingest | None = None
        self._counters: Counter[str] = Counter()
        self._history: list[VersionRecord] = []
        self._held: dict[tuple[str, bytes], list[tuple[InboundMessage, float]]] = {}
        self._pending_acks = 0
        self._rows_bytes = 0  # encoded update bytes stored since the last snapshot
        self._checkpoint_bytes = 3 * 4 * config.spec.num_params
        self._release: _Release | None = None
        self._publish_wanted = asyncio.Event()
        self._publish_lock = asyncio.Lock()
        self._published_version: int | None = None
        self._retained = RetainedChunks(config.chunk_grace_s)
        self._evaluator: Evaluator | None = None
        self._exporter: PrometheusExporter | None = None
        self._stats_cache: AggregatorStatistics | None = None
        self._last_accuracy: float | None = None
        self._session = 0
        self._started_at = 0.0
        self._batches = 0
        self._rate = (0.0, 0.0)  # updates/s, bytes/s over the last metrics period
        self._loop: asyncio.AbstractEventLoop | None = None
        self.phase = Phase.STARTING

    # ------------------------------------------------------------------ public API
    def stop(self) -> None:
        """Ask :meth:`run` to finish: the batch in flight is committed and acknowledged, the
        newest version published, server state ``offline`` published, then disconnect."""
        self._stopping = True
        self._stop.set()
        self.phase = Phase.STOPPING
        if self._queue is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    def _enter(self, phase: Phase) -> None:
        if not self._stopping:
            self.phase = phase

    @property
    def metrics_port(self) -> int | None:
        """The Prometheus port actually bound (``metrics_port=0`` picks a free one)."""
        return None if self._exporter is None else self._exporter.port

    def history(self) -> list[VersionRecord]:
        """Per-version records, oldest first (durable: restored after a restart)."""
        return list(self._history)

    def statistics(self) -> AggregatorStatistics:
        c = self._counters
        engine = self._engine
        staleness = {int(k.split(":", 1)[1]): v for k, v in c.items() if k.startswith("staleness:")}
        rejected = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:") and v}
        transport = self._transport
        ts = transport.statistics() if transport is not None else None
        return AggregatorStatistics(
            version=engine.version if engine else 0,
            buffer_fill=engine.buffer_fill if engine else 0,
            buffer_size=self.config.buffer_size,
            received=c["received"],
            applied=c["applied"],
            rejected=rejected,
            bytes_ingested=c["bytes"],
            updates_per_s=self._rate[0],
            bytes_per_s=self._rate[1],
            staleness=dict(sorted(staleness.items())),
            last_accuracy=self._last_accuracy,
            steps=c["steps"],
            discarded=engine.discarded if engine else 0,
            rounds=engine.rounds if engine else {},
            pending_acks=self._pending_acks,
            batches=self._batches,
            acked=ts.acked if ts else 0,
            connected=bool(ts and ts.connected),
            reconnects=ts.reconnects if ts else 0,
            session=self._session,
            started_at=self._started_at,
        )

    # ------------------------------------------------------------------ run
    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Run until :meth:`stop`; sets ``ready`` once subscribed and the current version is
        published."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(maxsize=max(16, self.config.batch_limits()[0]))
        if self._stopping:
            return
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgefl-db")
        self._inflater = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="edgefl-inflate"
        )
        try:
            self._enter(Phase.RESTORING)
            await self._restore()
            self._transport = self._given_transport or self._make_transport()
            self._enter(Phase.CONNECTING)
            log.info("connecting to %s", self.config.broker_url)
            if self.config.eval_dataset is not None:
                self._start_evaluator()
            if self.config.metrics_port is not None:
                self._exporter = PrometheusExporter(lambda: self._stats_cache)
                self._exporter.start(self.config.metrics_port, self.config.metrics_bind)
            async with self._transport as transport:
                await self._serve(transport, ready)
        finally:
            if self._exporter is not None:
                self._exporter.stop()
            if self._evaluator is not None:
                self._evaluator.stop()
            self._writer.shutdown(wait=True)
            self._inflater.shutdown(wait=True)
            if self._store is not None:
                self._store.close()

    async def _serve(self, transport: Transport, ready: asyncio.Event | None) -> None:
        async with asyncio.TaskGroup() as tg:
            # Ingest runs first: a persistent session starts delivering queued updates right
            # after CONNACK, and when the inbound queue fills the transport stops reading the
            # socket, so nobody would read the SUBACK and PUBACKs awaited below.
            reader = tg.create_task(self._reader(transport), name="edgefl-agg-reader")
            ingest = tg.create_task(self._ingest_loop(transport), name="edgefl-agg-ingest")
            await transport.subscribe(updates_filter(self.config.fleet), qos=1)
            assert self._release is not None
            await self._publish_release(transport, self._release)
            await self._publish_state(transport, ServerStatus.ONLINE)
            self._stats_cache = self.statistics()
            self._enter(Phase.RUNNING)
            if ready is not None:
                ready.set()
            log.info(
                "aggregator for fleet %s serving version %d", self.config.fleet, self._version()
            )
            publisher = tg.create_task(self._publisher(transport), name="edgefl-agg-publisher")
            house = tg.create_task(self._housekeeping(transport), name="edgefl-agg-house")
            metrics = tg.create_task(self._metrics(transport), name="edgefl-agg-metrics")
            await self._stop.wait()
            reader.cancel()
            await ingest  # finishes the batch in flight (commit, then ack)
            house.cancel()
            metrics.cancel()
            publisher.cancel()
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(_SHUTDOWN_PUBLISH_S):
                release = self._release
                if release is not None and release.version != self._published_version:
                    await self._publish_release(transport, release)
                await self._publish_state(transport, ServerStatus.OFFLINE)

    # ------------------------------------------------------------------ restore
    async def _restore(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        store = StateStore(cfg.state_dir, fsync=cfg.fsync)
        self._store = store
        identity = {
            "model": cfg.spec.name,
            "num_params": str(cfg.spec.num_params),
            "algorithm": cfg.algorithm.value,
            "fleet": cfg.fleet,
        }
        loaded = await loop.run_in_executor(
            self._writer,
            lambda: store.initialise(
                identity=identity, initial=initial_state(cfg), now=time.time()
            ),
        )
        self._session = loaded.session
        self._started_at = loaded.started_at
        self._counters = Counter(loaded.counters)
        self._history = [VersionRecord(v, t, n, a) for v, t, n, a in loaded.history]
        accuracies = [r.accuracy for r in self._history if r.accuracy is not None]
        self._last_accuracy = accuracies[-1] if accuracies else None
        now = time.monotonic()
        engine = Engine(cfg, loaded.state, generation=loaded.generation, now=now)
        self._engine = engine
        # replay the buffered updates of the current generation, in their original order
        record = BatchRecord(generation=engine.generation)
        new_versions: list[VersionRecord] = []
        ingest = Ingest(
            cfg, engine, max_seq=loaded.max_seq, committed_seen=self._seen_reader(store)
        )
        for row in loaded.buffer:
            update = decode_body(
                json.loads(row.codec), row.body, cfg.spec.num_params, ingest.scratch
            )
            engine.add(
                row.device,
                update,
                base_version=row.base_version,
                num_examples=row.num_examples,
                now=now,
            )
            if engine.generation != record.generation:  # e.g. K was lowered across the restart
                self._new_generation(record, new_versions)
            elif record.snapshot is not None:
                record.rebuffer.append(dataclasses.replace(row, generation=engine.generation))
        if record.snapshot is not None:
            await loop.run_in_executor(self._writer, store.commit, record)
            self._history.extend(new_versions)
            self._counters.update(record.counters)
        self._ingest = ingest
        self._release = _Release(
            engine.version, self._version_created_at(loaded.created_at), engine.weights.copy()
        )
        self._retained.restore(loaded.published, now)

    def _version_created_at(self, fallback: float) -> float:
        engine = self._engine
        assert engine is not None
        for rec in reversed(self._history):
            if rec.version == engine.version:
                return rec.created_at
        return fallback

    @staticmethod
    def _seen_reader(store: StateStore) -> Callable[[str, int], bool]:
        reader = store.open_reader()
        return lambda device, seq: seen_lookup(reader, device, seq)

    def _make_transport(self) -> MqttTransport:
        cfg = self.config
        will = encode_message(self._server_state(ServerStatus.LOST))
        mqtt = cfg.mqtt_config(will=Will(server_state_topic(cfg.fleet), will, qos=1, retain=True))
        return MqttTransport(mqtt, on_connect=self._on_connect)

    async def _on_connect(self, info: ConnectInfo) -> None:
        if info.connects > 1:
            log.warning("reconnected to the broker (session present: %s)", info.session_present)
            self._publish_wanted.set()  # republish: the broker may have lost retained messages
            transport = self._transport
            if transport is not None:
                await self._publish_state(transport, ServerStatus.ONLINE)

    def _start_evaluator(self) -> None:
        assert self.config.eval_dataset is not None
        assert self._loop is not None
        loop = self._loop

        def on_result(version: int, accuracy: float) -> None:
            loop.call_soon_threadsafe(self._accuracy, version, accuracy)

        self._evaluator = Evaluator(
            self.config.spec, self.config.eval_dataset, seed=self.config.seed, on_result=on_result
        )
        self._evaluator.start()
        engine = self._engine
        if engine is not None:
            self._evaluator.submit(engine.version, engine.weights)

    def _accuracy(self, version: int, accuracy: float) -> None:
        self._last_accuracy = accuracy
        for i in range(len(self._history) - 1, -1, -1):
            if self._history[i].version == version:
                self._history[i] = dataclasses.replace(self._history[i], accuracy=accuracy)
                break
        store, writer = self._store, self._writer
        if store is not None and writer is not None:
            with contextlib.suppress(RuntimeError):  # writer already shut down
                writer.submit(store.set_accuracy, version, accuracy)

    def _version(self) -> int:
        return self._engine.version if self._engine is not None else 0

    # ------------------------------------------------------------------ ingest
    async def _reader(self, transport: Transport) -> None:
        queue = self._queue
        assert queue is not None
        async for message in transport.messages():
            await queue.put((message, time.monotonic()))

    async def _ingest_loop(self, transport: Transport) -> None:
        """Batches in, group commits out, pipelined: batch N+1 is validated and applied while
        batch N commits in the writer thread, and N's messages are acknowledged as soon as N
        committed (a task per batch, in order), so the broker refills its window without
        waiting for N+1. At most ``_COMMITS_IN_FLIGHT`` batches wait for their commit."""
        queue = self._queue
        assert queue is not None
        finishing: collections.deque[asyncio.Task[None]] = collections.deque()
        loop = asyncio.get_running_loop()
        ok = False
        try:
            while not self._stopping:
                while finishing and finishing[0].done():
                    finishing.popleft().result()  # re-raises a failed commit
                batch = await self._next_batch(queue)
                if batch is None:
                    break
                prepared = await self._prepare(batch)
                if prepared is None:
                    continue
                self._counters.update(prepared.record.counters)
                while len(finishing) >= _COMMITS_IN_FLIGHT:
                    await finishing.popleft()
                store = self._store
                assert store is not None
                commit = loop.run_in_executor(self._writer, store.commit, prepared.record)
                previous = finishing[-1] if finishing else None
                finishing.append(
                    asyncio.create_task(self._finish(transport, commit, prepared, after=previous))
                )
            ok = True
        finally:
            if ok:
                for task in finishing:
                    await task
            else:
                for task in finishing:
                    task.cancel()

    async def _next_batch(
        self, queue: asyncio.Queue[tuple[InboundMessage, float] | None]
    ) -> list[tuple[InboundMessage, float]] | None:
        """The next batch (``[]`` after an idle period: deadlines and expiry still run;
        ``None`` when stopping)."""
        try:
            async with asyncio.timeout(_IDLE_TICK_S):
                item = await queue.get()
        except TimeoutError:
            return []
        if item is None:
            self._stopping = True
            return None
        batch = [item]
        limits = self.config.batch_limits()
        size = self._drain(queue, batch, len(item[0].payload), limits)
        linger = self.config.batch_linger_s
        if linger > 0 and len(batch) < limits[0] and size < limits[1] and not self._stopping:
            await asyncio.sleep(linger)
            self._drain(queue, batch, size, limits)
        return batch

    def _drain(
        self,
        queue: asyncio.Queue[tuple[InboundMessage, float] | None],
        batch: list[tuple[InboundMessage, float]],
        size: int,
        limits: tuple[int, int],
    ) -> int:
        while len(batch) < limits[0] and size < limits[1] and not queue.empty():
            item = queue.get_nowait()
            if item is None:
                self._stopping = True
                break
            batch.append(item)
            size += len(item[0].payload)
        return size

    async def _prepare(self, batch: list[tuple[InboundMessage, float]]) -> _Prepared | None:
        """Validate and apply one batch (no I/O); ``None`` when there is nothing to commit.

        Runs on the event loop thread, which yields every ``_SLICE_S`` so the socket keeps
        being read. Only the zstd decompression of large updates (``_INFLATE_OFFLOAD_BYTES``)
        runs on the inflate thread: one call that releases the GIL for all its work, started as
        soon as the packet is staged, so it overlaps with the loop's work on the neighbouring
        packets (1M parameters: loop 7.2-8.1 -> 5.7 ms per update; at 100k the hand-off cost
        more than the 0.13 ms it moved). Updates are finished in arrival order, so the result
        is that of processing the batch one packet at a time.
        (A worker doing the whole decode was measured slower on 2 cores: numpy releases and
        re-takes the GIL around every call, and those hand-offs cost 0.2-0.27 ms of CPU per
        100k-parameter update.)
        """
        engine, ingest = self._engine, self._ingest
        assert engine is not None
        assert ingest is not None
        inflater = self._inflater
        assert inflater is not None
        prepared = _Prepared(BatchRecord(generation=engine.generation))
        record, acks = prepared.record, prepared.acks
        now = time.monotonic()
        inflight: collections.deque[_Inflating] = collections.deque()
        slice_end = time.perf_counter() + _SLICE_S
        for message, received_at in batch:
            record.count("bytes", len(message.payload))
            staged = ingest.stage(message.topic, message.payload, now=now)
            # only the ack token is needed from here on: drop the payload reference so the
            # packet's memory is freed before its commit (the update's bytes are in `staged`)
            stub = InboundMessage(message.topic, b"", message.qos, ack_token=message.ack_token)
            if isinstance(staged, IngestOutcome):
                self._settle(prepared, stub, received_at, staged)
            else:
                if len(inflight) == _INFLATE_DEPTH:
                    self._complete(prepared, inflight.popleft(), now)
                if len(staged.body) >= _INFLATE_OFFLOAD_BYTES:
                    future = inflater.submit(ingest.inflate, staged)
                else:  # too small for the hand-off to pay: inflate here, in order
                    future = concurrent.futures.Future()
                    future.set_result(ingest.inflate(staged))
                inflight.append(_Inflating(stub, received_at, staged, future))
            if time.perf_counter() > slice_end:
                while inflight:  # nothing is half-done while other tasks run
                    self._complete(prepared, inflight.popleft(), now)
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + _SLICE_S
        while inflight:
            self._complete(prepared, inflight.popleft(), now)
        for dropped in ingest.expire(now):
            record.count("received")
            record.count(f"rejected:{dropped.reason.value}")
            acks.extend(self._held.pop((dropped.source, dropped.message_id), []))
        if engine.tick(now) is not None:
            self._new_generation(record, prepared.new_versions)
        self._maybe_checkpoint(record)
        self._pending_acks = sum(len(v) for v in self._held.values())
        if record.empty and not acks:
            return None
        if prepared.new_versions:
            created = prepared.new_versions[-1].created_at
            snapshot = record.snapshot
            if snapshot is not None and snapshot[0] == engine.version:
                weights = snapshot[2].weights  # already a copy of this version: share it
            else:
                weights = engine.weights.copy()
            prepared.release = _Release(engine.version, created, weights)
        return prepared

    def _complete(self, prepared: _Prepared, item: _Inflating, now: float) -> None:
        """Wait for one update's decompression (in arrival order), decode and finish it."""
        ingest = self._ingest
        assert ingest is not None
        decoded = ingest.decode(item.staged, ingest.scratch, item.future.result())
        out = ingest.finish(item.staged, decoded, now=now)
        self._settle(prepared, item.message, item.received_at, out)

    def _settle(
        self, prepared: _Prepared, message: InboundMessage, received_at: float, out: IngestOutcome
    ) -> None:
        """Book one packet's outcome: hold it (a chunk of an incomplete update) or queue its
        acknowledgement, count it, and record an accepted update for the commit."""
        engine = self._engine
        assert engine is not None
        record, acks = prepared.record, prepared.acks
        if out.chunk_key is not None and out.kind is OutcomeKind.PENDING and not out.release:
            self._held.setdefault(out.chunk_key, []).append((message, received_at))
            return
        acks.append((message, received_at))
        if out.chunk_key is not None and out.completes:
            acks.extend(self._held.pop(out.chunk_key, []))
        if out.kind is OutcomeKind.ACCEPTED:
            prepared.pairs.append(self._accepted(record, out))
            if engine.generation != record.generation:
                self._new_generation(record, prepared.new_versions)
        elif out.kind is OutcomeKind.REJECTED:
            assert out.reason is not None
            record.count("received")
            record.count(f"rejected:{out.reason.value}")
            log.debug("rejected %s: %s", message.topic, out.detail)

    async def _finish(
        self,
        transport: Transport,
        commit: asyncio.Future[None],
        prepared: _Prepared,
        *,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """Wait for the previous batch's finish (``after``) and this batch's commit, then
        acknowledge its messages and announce its versions."""
        if after is not None:
            await after
        await commit
        ingest = self._ingest
        assert ingest is not None
        ingest.committed(prepared.pairs)
        self._batches += 1
        await transport.ack_many(message for message, _ in prepared.acks)
        done = time.monotonic()
        if self._exporter is not None:
            for _, received_at in prepared.acks:
                self._exporter.latency.observe(done - received_at)
        release = prepared.release
        if release is not None:
            self._history.extend(prepared.new_versions)
            self._release = release
            self._publish_wanted.set()
            if self._evaluator is not None:
                self._evaluator.submit(release.version, release.weights)
            if self._on_version is not None:
                for rec in prepared.new_versions:
                    try:
                        self._on_version(rec)
                    except Exception:
                        log.exception("on_version callback failed")
        self._stats_cache = self.statistics()

    def _accepted(self, record: BatchRecord, out: IngestOutcome) -> tuple[str, int]:
        header, result, body = out.header, out.result, out.body
        assert header is not None
        assert result is not None
        assert body is not None
        record.count("received")
        record.count("applied")
        record.count(f"staleness:{result.outcome.staleness}")
        record.accepted.append(
            AcceptedRow(
                generation=record.generation,
                device=header.device_id,
                seq=header.seq,
                base_version=header.base_version,
                num_examples=header.num_examples,
                codec=out.codec_json,
                body=body,
                version=header.base_version + result.outcome.staleness,
                at=time.time(),
            )
        )
        return header.device_id, header.seq

    def _new_generation(self, record: BatchRecord, new_versions: list[VersionRecord]) -> None:
        """The buffer was emptied (a step or a closed round): snapshot the model now, before any
        further update enters the new generation's buffer."""
        engine = self._engine
        assert engine is not None
        created = time.time()
        if engine.version != self._history_version(record):
            applied = self._counters["applied"] + record.counters.get("applied", 0)
            record.history.append((engine.version, created, applied))
            new_versions.append(VersionRecord(engine.version, created, applied))
            record.count("steps")
        record.snapshot = (engine.version, created, engine.snapshot())
        record.generation = engine.generation
        self._rows_bytes = 0

    def _maybe_checkpoint(self, record: BatchRecord) -> None:
        """Store the buffer as a checkpoint (accumulator) instead of this batch's encoded
        updates when that writes less, or when the updates stored since the last snapshot
        exceed ``_REPLAY_BOUND`` checkpoints (which bounds the replay after a crash).

        A checkpoint is about 12 bytes per parameter (weights, accumulator, a momentum): at
        100k parameters and int8 a batch of 40 updates is 3.6 MB of bodies against a 1.2 MB
        checkpoint, so it is checkpointed; at 1M parameters a batch of 4 updates (3.6 MB) is
        not (12 MB), and with K = 20 the step comes before the replay bound."""
        engine = self._engine
        assert engine is not None
        if not engine.can_checkpoint:
            return
        batch_bytes = sum(len(r.body) for r in record.accepted if r.generation == record.generation)
        self._rows_bytes += batch_bytes
        if (
            batch_bytes <= self._checkpoint_bytes
            and self._rows_bytes <= _REPLAY_BOUND * self._checkpoint_bytes
        ):
            return
        state = engine.checkpoint()
        version = engine.version
        created = self._history[-1].created_at if self._history else time.time()
        if record.history:
            created = record.history[-1][1]
        record.snapshot = (version, created, state)
        record.generation = engine.generation
        record.count("checkpoints")
        self._rows_bytes = 0

    def _history_version(self, record: BatchRecord) -> int:
        if record.history:
            return record.history[-1][0]
        return self._history[-1].version if self._history else -1

    # ------------------------------------------------------------------ publishing
    async def _publisher(self, transport: Transport) -> None:
        while True:
            await self._publish_wanted.wait()
            self._publish_wanted.clear()
            release = self._release
            try:
                if release is not None:
                    await self._publish_release(transport, release)
                    await self._publish_state(transport, ServerStatus.ONLINE)
            except TransportError as exc:
                log.warning("publishing version failed (%s); will retry", exc)
                self._publish_wanted.set()
                await asyncio.sleep(0.5)

    async def _publish_release(self, transport: Transport, release: _Release) -> None:
        """Publish one version (chunks, then manifest); serialised, never backwards."""
        async with self._publish_lock:
            if self._published_version is not None and release.version < self._published_version:
                return
            await self._publish_release_locked(transport, release)

    async def _publish_release_locked(self, transport: Transport, release: _Release) -> None:
        cfg = self.config
        onnx = None
        if cfg.publish_onnx:
            from edgefl.models.onnx_export import export_onnx

            onnx = await asyncio.to_thread(export_onnx, cfg.spec, release.weights)
        packets = await asyncio.to_thread(
            lambda: build_model_packets(
                fleet=cfg.fleet,
                spec=cfg.spec,
                version=release.version,
                weights=release.weights,
                created_at=release.created_at,
                hints=cfg.training_hints(),
                max_packet=cfg.max_packet,
                onnx=onnx,
                signer=cfg.manifest_signer,
            )
        )
        await asyncio.gather(
            *(transport.publish(t, p, qos=1, retain=True) for t, p in packets.chunks)
        )
        await transport.publish(packets.manifest_topic, packets.manifest, qos=1, retain=True)
        self._published_version = release.version
        now = time.monotonic()
        entries = [(release.version, "weights", packets.num_chunks)]
        if packets.onnx_chunks:
            entries.append((release.version, "onnx", packets.onnx_chunks))
        store = self._store
        assert store is not None
        for version, artifact, n in entries:
            self._retained.published(version, artifact, n, now)
            await asyncio.get_running_loop().run_in_executor(
                self._writer, store.record_published, version, artifact, n
            )

    async def _clear_old_chunks(self, transport: Transport) -> None:
        due = self._retained.due(time.monotonic())
        if not due:
            return
        for version, artifact, n in due:
            topics = clear_packets(self.config.fleet, version, artifact, n)
            await asyncio.gather(*(transport.publish(t, b"", qos=1, retain=True) for t in topics))
        store = self._store
        assert store is not None
        await asyncio.get_running_loop().run_in_executor(
            self._writer, store.forget_published, [(v, a) for v, a, _ in due]
        )

    def _server_state(self, status: ServerStatus) -> ServerState:
        s = self.statistics()
        return ServerState(
            fleet=self.config.fleet,
            status=status,
            session=max(self._session, 0),
            version=self._published_version if self._published_version is not None else s.version,
            buffer_fill=min(s.buffer_fill, s.buffer_size),
            buffer_size=s.buffer_size,
            applied=s.applied,
            started_at=self._started_at or time.time(),
            at=time.time(),
            rejected=s.rejected,
        )

    async def _publish_state(self, transport: Transport, status: ServerStatus) -> None:
        payload = encode_message(self._server_state(status))
        await transport.publish(server_state_topic(self.config.fleet), payload, qos=1, retain=True)

    # ------------------------------------------------------------------ periodic tasks
    async def _housekeeping(self, transport: Transport) -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._clear_old_chunks(transport)
            except TransportError as exc:
                log.warning("clearing old model chunks failed: %s", exc)

    async def _metrics(self, transport: Transport) -> None:
        cfg = self.config
        last = (time.monotonic(), self._counters["applied"], self._counters["bytes"])
        while True:
            await asyncio.sleep(cfg.metrics_interval_s)
            now = time.monotonic()
            applied, nbytes = self._counters["applied"], self._counters["bytes"]
            dt = max(now - last[0], 1e-9)
            self._rate = (max(0.0, (applied - last[1]) / dt), max(0.0, (nbytes - last[2]) / dt))
            last = (now, applied, nbytes)
            s = self.statistics()
            self._stats_cache = s
            metrics = ServerMetrics(
                fleet=cfg.fleet,
                at=time.time(),
                version=s.version,
                buffer_fill=min(s.buffer_fill, s.buffer_size),
                buffer_size=s.buffer_size,
                received=s.received,
                applied=s.applied,
                updates_per_s=s.updates_per_s,
                bytes_ingested=s.bytes_ingested,
                bytes_per_s=s.bytes_per_s,
                staleness=s.staleness,
                rejected=s.rejected,
                accuracy=s.last_accuracy,
                extra={"steps": s.steps, "pending_acks": s.pending_acks, "session": s.session},
            )
            try:
                await transport.publish(
                    server_metrics_topic(cfg.fleet), encode_message(metrics), qos=0
                )
                await self._publish_state(transport, ServerStatus.ONLINE)
            except TransportError as exc:
                log.warning("publishing metrics failed: %s", exc)
