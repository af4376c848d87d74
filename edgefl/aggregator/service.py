"""The aggregator service: an asyncio shell around the sans-IO ingest, batch builder and engine.

Data flow (one process, one event loop, a writer thread for SQLite, an inflate thread)::

    MQTT (persistent session, QoS1, manual ack)
      -> reader task -> bounded queue -> ingest task, one batch of messages at a time:
           1. collect   (_next_batch): up to the batch limits, lingering ``batch_linger_s``;
                        an idle wait ends early when a lease expires or a buffer is due to flush
           2. apply     (_apply_batch): Ingest.stage each packet; bodies > 256 KiB inflate on the
                        inflate thread (_start_inflate / _finish_inflated), the rest on the loop;
                        BatchBuilder.book each outcome; with participation, check-ins go to the
                        LeaseDesk, each update's lease is checked (Ingest's admit hook) and the
                        free slots are granted (_grant), the lease changes joining the record;
                        BatchBuilder.close the batch
           3. commit    writer thread: StateStore.commit(batch.record), one SQLite transaction
           4. acknowledge (_acknowledge), in batch order, once committed: ack every message of
                        the batch (chunks of incomplete updates are held), publish its new
                        leases, then announce its new versions: history, on_version, publisher,
                        evaluator
      publisher task (Publisher.run): retained chunks then manifest of the newest committed
                      version (coalesced), server state; housekeeping task: clear old chunk sets;
      receipts task (ReceiptSender.run, ``receipts = true``): the receipts of each batch, built
                      by ReceiptBook in stage 4 after the commit, from a bounded queue, in
                      order (QoS 1, retained); full queue: the oldest is dropped and counted;
      metrics task: METRICS + server state every interval; participation task (leases on):
                      the server state again when in-flight or candidates changed (<= 1/s).

The sans-IO parts: :class:`~edgefl.aggregator.ingest.Ingest` (one packet in, one outcome out),
:class:`~edgefl.aggregator.batch.BatchBuilder` (outcomes in, one batch to commit out: holding,
new generations, the checkpoint rule, history) and :class:`~edgefl.aggregator.engine.Engine`.
:class:`~edgefl.aggregator.publisher.Publisher` owns the retained topics. :meth:`Aggregator.run`
builds a :class:`_Running` (store, builder, transport, publisher, threads) that the stages take
as an argument: nothing in it is ever ``None``.

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
import logging
import time
from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, cast

import numpy as np

from edgefl.aggregation import FedBuff, FedBuffConfig, FedBuffState
from edgefl.aggregator.batch import Batch, BatchBuilder, Ticket, checkpoint_bytes
from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.engine import Engine
from edgefl.aggregator.evaluation import Evaluator, start_on_loop
from edgefl.aggregator.ingest import Ingest, StagedUpdate
from edgefl.aggregator.participation import CheckInAuthenticator, LeaseDesk
from edgefl.aggregator.publish import Release, RetainedChunks
from edgefl.aggregator.publisher import Publisher, RateMeter, server_state_will
from edgefl.aggregator.receipts import ReceiptQueue, ReceiptSender
from edgefl.aggregator.statelock import StateDirLock
from edgefl.aggregator.stats import (
    AggregatorStatistics,
    CommitStatistics,
    LinkStatistics,
    ReceiptStatistics,
    RoundStatistics,
    VersionRecord,
)
from edgefl.aggregator.store import LoadedState, StateMismatch, StateStore, seen_lookup
from edgefl.aggregator.tally import Tally
from edgefl.errors import EdgeflError
from edgefl.models import init_weights_numpy
from edgefl.privacy import PrivacyStatistics
from edgefl.protocol import (
    ServerMetrics,
    ServerState,
    ServerStatus,
)
from edgefl.protocol.messages import FEATURE_LEASES, FEATURE_RECEIPTS, CentralPrivacy, UpdateHeader
from edgefl.protocol.receipts import ReceiptBook
from edgefl.protocol.topics import (
    CheckInTopic,
    DeviceStateTopic,
    checkins_filter,
    device_states_filter,
    updates_filter,
)
from edgefl.transport import (
    ConnectInfo,
    InboundMessage,
    MqttTransport,
    Transport,
    TransportError,
)

if TYPE_CHECKING:
    from edgefl.aggregator.metrics import PrometheusExporter

__all__ = ["Aggregator", "OnVersion", "Phase"]

log = logging.getLogger("edgefl.aggregator")

OnVersion = Callable[[VersionRecord], None]
_SHUTDOWN_PUBLISH_S = 5.0
_SHUTDOWN_RECEIPTS_S = 1.0  # the stop must stay within 2 s of SIGTERM even with a dead broker
_IDLE_TICK_S = 0.5
_INFLATE_DEPTH = 2  # updates handed to the inflate thread and not finished yet
_INFLATE_OFFLOAD_BYTES = 256 * 1024  # smaller bodies are decompressed on the loop
_COMMITS_IN_FLIGHT = 2  # prepared batches waiting for their commit (each holds its payloads)
_SLICE_S = 0.01  # longest stretch of batch validation before yielding to the event loop
_STATE_EVERY_S = 1.0  # the retained server state is republished at most this often for leases
_STATE_FANOUT_PER_S = 200.0  # ... and at most ~this many deliveries a second across the fleet
_STATE_EVERY_MAX_S = 30.0


def state_interval_s(audience: int) -> float:
    """Seconds between republications of the retained server state for a participation count
    change, with ``audience`` devices known (checked in or leased): every device receives and
    decodes each copy, so the fleet-wide cost is ``audience / interval`` decodes a second. One
    second for fleets up to 200 devices, then ``audience / 200`` (2,000 devices: 10 s), at most
    30 s. The counts are informational (monitors; devices read only the configuration, which
    is published at once with every new version)."""
    return min(_STATE_EVERY_MAX_S, max(_STATE_EVERY_S, audience / _STATE_FANOUT_PER_S))


_CHECKIN_LEAF = "/" + CheckInTopic.leaf
_STATE_LEAF = "/" + DeviceStateTopic.leaf


class Phase(StrEnum):
    """Where :meth:`Aggregator.run` is (for status lines, sd_notify and the signal handling)."""

    STARTING = "starting"
    RESTORING = "restoring state"
    CONNECTING = "connecting to the broker"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclasses.dataclass(frozen=True)
class _Inflating:
    """A staged update whose body the inflate thread is decompressing."""

    message: InboundMessage
    received_at: float
    staged: StagedUpdate
    future: concurrent.futures.Future[bytes | EdgeflError]


@dataclasses.dataclass(frozen=True)
class _Restored:
    """The state store opened and the state dir's state loaded (the buffer replayed)."""

    store: StateStore
    builder: BatchBuilder
    release: Release  # the current version
    retained: RetainedChunks  # chunk sets a previous run left on the broker
    session: int
    started_at: float
    high_water: dict[str, int]  # committed max seq per device (the receipts' ``through``)
    desk: LeaseDesk | None  # participation (None: off)


@dataclasses.dataclass(frozen=True)
class _Receipts:
    """What publishes receipts (``receipts = true``): the book that builds them after each
    commit, and the sender task's queue."""

    book: ReceiptBook
    sender: ReceiptSender


@dataclasses.dataclass(frozen=True)
class _Running:
    """Everything :meth:`Aggregator.run` built, passed to the stages that need it."""

    transport: Transport
    store: StateStore
    writer: concurrent.futures.ThreadPoolExecutor
    inflater: concurrent.futures.ThreadPoolExecutor
    builder: BatchBuilder
    publisher: Publisher
    evaluator: Evaluator | None  # only with ``eval_dataset``
    receipts: _Receipts | None  # only with ``receipts``
    desk: LeaseDesk | None  # only with ``participation``
    session: int
    started_at: float


def initial_state(config: AggregatorConfig) -> FedBuffState:
    """Version 0: torch-free initial weights (``init_weights_numpy(spec, seed)``), no buffer."""
    w0 = init_weights_numpy(config.spec, config.seed)
    core = FedBuff(FedBuffConfig(server_optimizer=config.aggregation.server_optimizer), w0)
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
        self._stop = asyncio.Event()
        self._stopping = False
        self._queue: asyncio.Queue[Ticket | None] = asyncio.Queue(
            maxsize=max(16, config.batch_limits()[0])
        )
        self._running: _Running | None = None  # set by run(), kept after it for statistics()
        self._exporter: PrometheusExporter | None = None
        self._stats_cache: AggregatorStatistics | None = None
        self._batches = 0
        self._rate = (0.0, 0.0)  # updates/s, bytes/s over the last metrics period
        self._state_shown: tuple[int, int] | None = None  # (in_flight, candidates) published
        self._state_at = 0.0  # monotonic time of the last server state published for leases
        self._state_wanted = asyncio.Event()  # the participation figures changed
        self.phase = Phase.STARTING
        # (version, accuracy) that met ``outputs.until_accuracy`` (the run then stopped)
        self.reached: tuple[int, float] | None = None

    # ------------------------------------------------------------------ public API
    def stop(self) -> None:
        """Ask :meth:`run` to finish: the batch in flight is committed and acknowledged, the
        newest version published, server state ``offline`` published, then disconnect."""
        self._stopping = True
        self._stop.set()
        self.phase = Phase.STOPPING
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
        return [] if self._running is None else self._running.builder.history

    def statistics(self) -> AggregatorStatistics:
        running = self._running
        if running is None:
            return AggregatorStatistics(
                version=0,
                buffer_fill=0,
                buffer_size=self.config.aggregation.buffer_size,
                received=0,
                applied=0,
            )
        return self._statistics(
            running.builder, running.session, running.started_at, running.transport
        )

    def _statistics(
        self,
        builder: BatchBuilder,
        session: int,
        started_at: float,
        transport: Transport | None = None,
    ) -> AggregatorStatistics:
        totals, engine = builder.totals, builder.engine
        ts = transport.statistics() if transport is not None else None
        receipts = self._running.receipts if self._running is not None else None
        return AggregatorStatistics(
            version=engine.version,
            buffer_fill=engine.buffer_fill,
            buffer_size=self.config.aggregation.buffer_size,
            received=totals.received,
            applied=totals.applied,
            rejected=totals.rejected_by_value(),
            bytes_ingested=totals.bytes,
            updates_per_s=self._rate[0],
            bytes_per_s=self._rate[1],
            staleness=dict(sorted(totals.staleness.items())),
            last_accuracy=builder.last_accuracy,
            steps=totals.steps,
            rounds=RoundStatistics(engine.rounds, engine.discarded),
            commits=CommitStatistics(self._batches, ts.acked if ts else 0, builder.held_packets),
            link=LinkStatistics(bool(ts and ts.connected), ts.reconnects if ts else 0),
            session=session,
            started_at=started_at,
            receipts=ReceiptStatistics(receipts.sender.sent, receipts.sender.queue.dropped)
            if receipts
            else ReceiptStatistics(),
            participation=self._running.desk.statistics()
            if self._running is not None and self._running.desk is not None
            else None,
            privacy=engine.privacy(),
        )

    # ------------------------------------------------------------------ run
    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Run until :meth:`stop`; sets ``ready`` once subscribed and the current version is
        published."""
        if self._stopping:
            return
        cfg = self.config
        writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgefl-db")
        inflater = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgefl-inflate")
        store: StateStore | None = None
        evaluator: Evaluator | None = None
        lock = StateDirLock(cfg.state_dir)
        try:
            self._enter(Phase.RESTORING)
            lock.acquire()  # held until the process ends: reset-device refuses meanwhile
            store = StateStore(cfg.state_dir, fsync=cfg.ingest.fsync)
            restored = await self._restore(store, writer)
            transport = self._given_transport or self._make_transport(restored)
            self._enter(Phase.CONNECTING)
            log.info("connecting to %s", cfg.broker_url)
            if cfg.outputs.eval_dataset is not None:
                evaluator = self._start_evaluator(restored, writer)
            if cfg.outputs.metrics_port is not None:
                from edgefl.aggregator.metrics import PrometheusExporter  # [aggregator] extra

                self._exporter = PrometheusExporter(lambda: self._stats_cache)
                self._exporter.start(cfg.outputs.metrics_port, cfg.outputs.metrics_bind)
            running = self._start(restored, transport, writer, inflater, evaluator)
            async with transport:
                await self._serve(running, ready)
        finally:
            if self._exporter is not None:
                self._exporter.stop()
            if evaluator is not None:
                evaluator.stop()
            writer.shutdown(wait=True)
            inflater.shutdown(wait=True)
            if store is not None:
                store.close()
            lock.release()

    def _start(
        self,
        restored: _Restored,
        transport: Transport,
        writer: concurrent.futures.ThreadPoolExecutor,
        inflater: concurrent.futures.ThreadPoolExecutor,
        evaluator: Evaluator | None,
    ) -> _Running:
        """The running state: the restored state, the transport and a publisher on it."""
        publisher = Publisher(
            self.config,
            transport,
            store=restored.store,
            writer=writer,
            retained=restored.retained,
            release=restored.release,
            server_state=lambda status: self._server_state(status, publisher.published_version),
        )
        receipts = None
        if self.config.ingest.receipts:
            book = ReceiptBook(
                self.config.fleet, restored.high_water, signer=self.config.manifest_signer
            )
            sender = ReceiptSender(ReceiptQueue(self.config.ingest.receipt_queue), transport)
            receipts = _Receipts(book, sender)
        running = _Running(
            transport=transport,
            store=restored.store,
            desk=restored.desk,
            writer=writer,
            inflater=inflater,
            builder=restored.builder,
            publisher=publisher,
            evaluator=evaluator,
            receipts=receipts,
            session=restored.session,
            started_at=restored.started_at,
        )
        self._running = running
        return running

    async def _serve(self, running: _Running, ready: asyncio.Event | None) -> None:
        transport, publisher = running.transport, running.publisher
        async with asyncio.TaskGroup() as tg:
            # Ingest runs first: a persistent session starts delivering queued updates right
            # after CONNACK, and when the inbound queue fills the transport stops reading the
            # socket, so nobody would read the SUBACK and PUBACKs awaited below.
            reader = tg.create_task(self._reader(transport), name="edgefl-agg-reader")
            ingest = tg.create_task(self._ingest_loop(running), name="edgefl-agg-ingest")
            await transport.subscribe(updates_filter(self.config.fleet), qos=1)
            if running.desk is not None:
                await transport.subscribe(checkins_filter(self.config.fleet), qos=1)
                await transport.subscribe(device_states_filter(self.config.fleet), qos=1)
            await publisher.publish_current()
            await publisher.publish_state(ServerStatus.ONLINE)
            self._stats_cache = self.statistics()
            self._enter(Phase.RUNNING)
            if ready is not None:
                ready.set()
            log.info(
                "aggregator for fleet %s serving version %d",
                self.config.fleet,
                running.builder.engine.version,
            )
            publishing = tg.create_task(publisher.run(), name="edgefl-agg-publisher")
            house = tg.create_task(publisher.housekeeping(), name="edgefl-agg-house")
            metrics = tg.create_task(self._metrics(running), name="edgefl-agg-metrics")
            sending = leasing = None
            if running.desk is not None:
                leasing = tg.create_task(
                    self._participation_state(publisher, running.desk), name="edgefl-agg-leases"
                )
            if running.receipts is not None:
                sender = running.receipts.sender
                sending = tg.create_task(sender.run(), name="edgefl-agg-receipts")
            await self._stop.wait()
            reader.cancel()
            await ingest  # finishes the batch in flight (commit, then ack)
            if sending is not None and running.receipts is not None:
                # the last batches' receipts; one not sent costs the device a resend
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_SHUTDOWN_RECEIPTS_S):
                        await running.receipts.sender.queue.join()
                sending.cancel()
            house.cancel()
            metrics.cancel()
            publishing.cancel()
            if leasing is not None:
                leasing.cancel()
        with contextlib.suppress(TransportError, TimeoutError):
            async with asyncio.timeout(_SHUTDOWN_PUBLISH_S):
                await publisher.publish_final()

    # ------------------------------------------------------------------ restore
    async def _restore(
        self, store: StateStore, writer: concurrent.futures.ThreadPoolExecutor
    ) -> _Restored:
        """Load the state dir (creating it at version 0) and replay the buffered updates of the
        current generation; a replay that empties the buffer is committed here."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        identity = {
            "model": cfg.spec.name,
            "num_params": str(cfg.spec.num_params),
            "algorithm": cfg.algorithm.value,
            "fleet": cfg.fleet,
        }
        loaded = await loop.run_in_executor(
            writer,
            lambda: store.initialise(
                identity=identity, initial=initial_state(cfg), now=time.time()
            ),
        )
        if cfg.participation is not None:  # bound the table: expired check-ins go at start
            before = time.time() - cfg.participation.checkin_ttl_s
            await loop.run_in_executor(writer, store.forget_checkins, before)
        if (
            cfg.aggregation.privacy is not None
            and loaded.state.privacy is None
            and loaded.state.count
        ):
            raise StateMismatch(
                f"{store.path} holds a buffer checkpointed before differential privacy was on, "
                "whose devices are unknown; start DP with a new --state-dir"
            )
        now = time.monotonic()
        engine = Engine(cfg, loaded.state, generation=loaded.generation, now=now)
        desk = self._lease_desk(loaded, engine)
        ingest = Ingest(
            cfg,
            engine,
            max_seq=loaded.max_seq,
            committed_seen=self._seen_reader(store),
            admit=None if desk is None else _admit_now(desk),
        )
        builder = BatchBuilder(
            engine,
            ingest,
            totals=Tally.from_rows(loaded.counters),
            history=(VersionRecord(v, t, n, a) for v, t, n, a in loaded.history),
            checkpoint_size=checkpoint_bytes(cfg.spec.num_params),
        )
        replayed = builder.replay(loaded.buffer, now=now, wall=time.time())
        if replayed is not None:
            await loop.run_in_executor(writer, store.commit, replayed.record)
            builder.committed(replayed)
        retained = RetainedChunks(cfg.limits.chunk_grace_s)
        retained.restore(loaded.published, now)
        release = builder.current_release(loaded.created_at)
        return _Restored(
            store,
            builder,
            release,
            retained,
            loaded.session,
            loaded.started_at,
            dict(loaded.max_seq),
            desk,
        )

    def _lease_desk(self, loaded: LoadedState, engine: Engine) -> LeaseDesk | None:
        """The participation desk with the leases and check-ins the store holds (None:
        participation off). Leases that expired while the aggregator was down expire at its
        first grant; expired check-ins are dropped when drawn (and from the store at start).
        With central DP, no lease goes to a device whose update DP would refuse now."""
        cfg = self.config
        if cfg.participation is None:
            return None
        authenticator = cfg.authenticator
        if authenticator is not None and not hasattr(authenticator, "authenticate_checkin"):
            raise ValueError("participation with signatures needs an authenticator of check-ins")
        return LeaseDesk(
            cfg.participation,
            cfg.fleet,
            rng=np.random.default_rng([cfg.seed, loaded.session]),
            state=loaded.leases,
            checkins=loaded.checkins,
            authenticator=cast(CheckInAuthenticator | None, authenticator),
            signer=cfg.manifest_signer,
            admissible=None if cfg.aggregation.privacy is None else engine.privacy_admits,
        )

    @staticmethod
    def _seen_reader(store: StateStore) -> Callable[[str, int], bool]:
        reader = store.open_reader()
        return lambda device, seq: seen_lookup(reader, device, seq)

    def _make_transport(self, restored: _Restored) -> MqttTransport:
        cfg = self.config
        stats = self._statistics(restored.builder, restored.session, restored.started_at)
        lost = _server_state(cfg.fleet, ServerStatus.LOST, stats, None, self._features())
        mqtt = cfg.mqtt_config(will=server_state_will(lost))
        return MqttTransport(mqtt, on_connect=self._on_connect)

    async def _on_connect(self, info: ConnectInfo) -> None:
        if info.connects > 1:
            log.warning("reconnected to the broker (session present: %s)", info.session_present)
            running = self._running
            if running is not None:
                running.publisher.want()  # republish: the broker may have lost retained messages
                await running.publisher.publish_state(ServerStatus.ONLINE)

    def _start_evaluator(
        self, restored: _Restored, writer: concurrent.futures.ThreadPoolExecutor
    ) -> Evaluator:
        cfg = self.config
        if cfg.outputs.eval_dataset is None:
            raise ValueError("held-out evaluation needs eval_dataset")
        builder, store = restored.builder, restored.store

        def record(version: int, accuracy: float) -> None:
            builder.record_accuracy(version, accuracy)
            with contextlib.suppress(RuntimeError):  # writer already shut down
                writer.submit(store.set_accuracy, version, accuracy)
            self._check_target(version, accuracy, newest=builder.engine.version)

        return start_on_loop(
            cfg.spec,
            cfg.outputs.eval_dataset,
            seed=cfg.seed,
            record=record,
            version=builder.engine.version,
            weights=builder.engine.weights,
        )

    def _check_target(self, version: int, accuracy: float, *, newest: int) -> None:
        """``outputs.until_accuracy``: the evaluation of the newest version reached the target,
        so stop with that version as the final model. Runs on the event loop, so no step can
        come between the check and the stop: the batch being applied books no further packet
        (:meth:`_apply_batch`), its unbooked packets stay unacknowledged and the broker
        redelivers them to the next run. An older version's evaluation never stops the run:
        the model moved on since, and the newer version has not been measured."""
        target = self.config.outputs.until_accuracy
        if target is None or self.reached is not None or accuracy < target or version != newest:
            return
        self.reached = (version, accuracy)
        log.info("version %d reached accuracy %.4f >= %.4f: stopping", version, accuracy, target)
        self.stop()

    # ------------------------------------------------------------------ ingest
    async def _reader(self, transport: Transport) -> None:
        async for message in transport.messages():
            await self._queue.put((message, time.monotonic()))

    async def _ingest_loop(self, running: _Running) -> None:
        """Batches in, group commits out, pipelined: batch N+1 is validated and applied while
        batch N commits in the writer thread, and N's messages are acknowledged as soon as N
        committed (a task per batch, in order), so the broker refills its window without
        waiting for N+1. At most ``_COMMITS_IN_FLIGHT`` batches wait for their commit."""
        acknowledging: collections.deque[asyncio.Task[None]] = collections.deque()
        loop = asyncio.get_running_loop()
        ok = False
        try:
            while not self._stopping:
                while acknowledging and acknowledging[0].done():
                    acknowledging.popleft().result()  # re-raises a failed commit
                messages = await self._next_batch(self._idle_wait(running))
                if messages is None:
                    break
                batch = await self._apply_batch(running, messages)
                if batch is None:
                    continue
                while len(acknowledging) >= _COMMITS_IN_FLIGHT:
                    await acknowledging.popleft()
                commit = loop.run_in_executor(running.writer, running.store.commit, batch.record)
                previous = acknowledging[-1] if acknowledging else None
                acknowledging.append(
                    asyncio.create_task(self._acknowledge(running, commit, batch, after=previous))
                )
            ok = True
        finally:
            if ok:
                for task in acknowledging:
                    await task
            else:
                for task in acknowledging:
                    task.cancel()

    def _idle_wait(self, running: _Running) -> float:
        """How long stage 1 may wait for a first message: the idle tick, or less when a lease
        expires or a partly filled buffer is due to flush (the timers of participation)."""
        wait = _IDLE_TICK_S
        flush = running.builder.engine.flush_deadline
        if flush is not None:
            wait = min(wait, flush - time.monotonic())
        desk = running.desk
        if desk is not None:
            expiry = desk.next_expiry()
            if expiry is not None:
                wait = min(wait, expiry - time.time())
        return max(0.0, wait)

    async def _next_batch(self, idle_s: float = _IDLE_TICK_S) -> list[Ticket] | None:
        """Stage 1, collect: the next batch (``[]`` after ``idle_s`` without a message: deadlines
        and expiry still run; ``None`` when stopping)."""
        queue = self._queue
        try:
            async with asyncio.timeout(idle_s):
                item = await queue.get()
        except TimeoutError:
            return []
        if item is None:
            self._stopping = True
            return None
        batch = [item]
        limits = self.config.batch_limits()
        size = self._drain(batch, len(item[0].payload), limits)
        linger = self.config.ingest.batch_linger_s
        if linger > 0 and len(batch) < limits[0] and size < limits[1] and not self._stopping:
            await asyncio.sleep(linger)
            self._drain(batch, size, limits)
        return batch

    def _drain(self, batch: list[Ticket], size: int, limits: tuple[int, int]) -> int:
        queue = self._queue
        while len(batch) < limits[0] and size < limits[1] and not queue.empty():
            item = queue.get_nowait()
            if item is None:
                self._stopping = True
                break
            batch.append(item)
            size += len(item[0].payload)
        return size

    async def _apply_batch(self, running: _Running, messages: list[Ticket]) -> Batch | None:
        """Stage 2, apply: validate and apply one batch (no I/O); ``None`` when there is
        nothing to commit.

        Runs on the event loop thread, which yields every ``_SLICE_S`` so the socket keeps
        being read. Only the zstd decompression of large updates (``_INFLATE_OFFLOAD_BYTES``)
        runs on the inflate thread: one call that releases the GIL for all its work, started as
        soon as the packet is staged, so it overlaps with the loop's work on the neighbouring
        packets. Updates are finished in arrival order, so the result is that of processing the
        batch one packet at a time. (Why not a worker doing the whole decode, and the measured
        figures: docs/AGGREGATOR.md.)
        """
        builder, ingest = running.builder, running.builder.ingest
        batch = builder.open(now=time.monotonic(), wall=time.time())
        inflight: collections.deque[_Inflating] = collections.deque()
        slice_end = time.perf_counter() + _SLICE_S
        for message, received_at in messages:
            if self.reached is not None:
                break  # the target version is final: the rest stays unacknowledged
            if running.desk is not None and message.topic.endswith((_CHECKIN_LEAF, _STATE_LEAF)):
                self._check_in(running.desk, batch, (message, received_at))
                continue
            batch.tally.bytes += len(message.payload)
            staged = ingest.stage(message.topic, message.payload, now=batch.now)
            # only the ack token is needed from here on: drop the payload reference so the
            # packet's memory is freed before its commit (the update's bytes are in `staged`)
            stub = InboundMessage(message.topic, b"", message.qos, ack_token=message.ack_token)
            if isinstance(staged, StagedUpdate):
                if len(inflight) == _INFLATE_DEPTH:
                    self._finish_inflated(builder, batch, inflight.popleft())
                inflight.append(self._start_inflate(running, stub, received_at, staged))
            else:
                builder.book(batch, stub, received_at, staged)
            if time.perf_counter() > slice_end:
                while inflight:  # nothing is half-done while other tasks run
                    self._finish_inflated(builder, batch, inflight.popleft())
                await asyncio.sleep(0)
                slice_end = time.perf_counter() + _SLICE_S
        while inflight:
            self._finish_inflated(builder, batch, inflight.popleft())
        if self.reached is not None and not batch.acks:
            return None  # stopped at the target before this batch booked anything
        if running.desk is not None:
            self._grant(running.desk, batch, builder.engine.version)
        return builder.close(batch, timers=self.reached is None)

    @staticmethod
    def _check_in(desk: LeaseDesk, batch: Batch, ticket: Ticket) -> None:
        """One CHECKIN packet, or one device state (a Will withdraws the device): applied to
        the pool and the lease book (or refused, counted by the desk), and acknowledged with
        the batch."""
        message, received_at = ticket
        if message.topic.endswith(_STATE_LEAF):
            if desk.presence(message.topic, message.payload):
                log.debug("withdrew %s: its connection ended", message.topic)
        else:
            refused = desk.check_in(message.topic, message.payload, now=batch.wall)
            if refused is not None:
                log.debug("refused check-in on %s: %s", message.topic, refused.value)
        stub = InboundMessage(message.topic, b"", message.qos, ack_token=message.ack_token)
        batch.acks.append((stub, received_at))

    @staticmethod
    def _grant(desk: LeaseDesk, batch: Batch, version: int) -> None:
        """Fill the free lease slots (the batch's completions and releases freed some, its
        check-ins brought candidates, time expired some), and put every lease change into the
        batch's record: completions commit with the updates that completed them, and new
        leases are durable before they are published (stage 4)."""
        desk.grant(now=batch.wall, version=version)
        batch.record.participation = desk.changes()

    @staticmethod
    def _start_inflate(
        running: _Running, message: InboundMessage, received_at: float, staged: StagedUpdate
    ) -> _Inflating:
        """Start decompressing one staged body: on the inflate thread when it is large, else
        here, in order (too small for the hand-off to pay)."""
        ingest = running.builder.ingest
        future: concurrent.futures.Future[bytes | EdgeflError]
        if len(staged.body) >= _INFLATE_OFFLOAD_BYTES:
            future = running.inflater.submit(ingest.inflate, staged)
        else:
            future = concurrent.futures.Future()
            future.set_result(ingest.inflate(staged))
        return _Inflating(message, received_at, staged, future)

    @staticmethod
    def _finish_inflated(builder: BatchBuilder, batch: Batch, item: _Inflating) -> None:
        """Wait for one update's decompression (in arrival order), decode it, add it to the
        engine and book the outcome."""
        ingest = builder.ingest
        decoded = ingest.decode(item.staged, ingest.scratch, item.future.result())
        out = ingest.finish(item.staged, decoded, now=batch.now)
        builder.book(batch, item.message, item.received_at, out)

    async def _acknowledge(
        self,
        running: _Running,
        commit: asyncio.Future[None],
        batch: Batch,
        *,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        """Stage 4, acknowledge: wait for the previous batch's acknowledgement (``after``) and
        this batch's commit, then acknowledge its messages and announce its versions."""
        if after is not None:
            await after
        await commit
        running.builder.committed(batch)
        self._batches += 1
        if running.receipts is not None and batch.outcomes:
            # only now: a receipt says "durably recorded" (and the batches before this one are)
            self._queue_receipts(running.receipts, batch)
        await running.transport.ack_many(message for message, _ in batch.acks)
        if running.desk is not None:
            await self._publish_leases(running, running.desk, batch)
        done = time.monotonic()
        if self._exporter is not None:
            for _, received_at in batch.acks:
                self._exporter.latency.observe(done - received_at)
        if batch.release is not None:
            self._announce(running, batch.release, batch.new_versions)
        self._stats_cache = self.statistics()

    async def _publish_leases(self, running: _Running, desk: LeaseDesk, batch: Batch) -> None:
        """Publish the committed batch's new leases (QoS 1, not retained), and wake the
        participation state task when the in-flight or candidate count changed. A LEASE lost
        here (the broker went away) costs its slot until the lease expires."""
        now = time.time()
        changes = batch.record.participation
        granted = () if changes is None else changes.granted
        messages = [desk.lease_message(lease, now=now) for lease in granted]
        try:
            await asyncio.gather(*(running.transport.publish(t, p, qos=1) for t, p in messages))
        except TransportError as exc:
            log.warning("publishing leases failed: %s", exc)
        if self._state_stale(desk):
            self._state_wanted.set()

    async def _participation_state(self, publisher: Publisher, desk: LeaseDesk) -> None:
        """The participation state task: republish the retained server state when its
        in-flight or candidate count is out of date, at most every :func:`state_interval_s`."""
        while True:
            await self._state_wanted.wait()
            self._state_wanted.clear()
            p = desk.participation()
            every = state_interval_s(p.in_flight + p.candidates)
            await asyncio.sleep(max(0.0, self._state_at + every - time.monotonic()))
            if self._state_stale(desk):
                try:
                    await publisher.publish_state(ServerStatus.ONLINE)
                except TransportError as exc:
                    log.warning("publishing the server state failed: %s", exc)

    def _state_stale(self, desk: LeaseDesk) -> bool:
        """Whether the published server state shows other in-flight or candidate counts."""
        p = desk.participation()
        return self._state_shown != (p.in_flight, p.candidates)

    @staticmethod
    def _queue_receipts(receipts: _Receipts, batch: Batch) -> None:
        """Hand the committed batch's receipts to the sender task (never waits). A failure
        here must not stop ingest: a missing receipt only costs the device a resend."""
        try:
            receipts.sender.queue.put(receipts.book.receipts(batch.outcomes, now=time.time()))
        except Exception:
            log.exception("building the receipts of a batch failed; devices will resend")

    def _announce(
        self, running: _Running, release: Release, new_versions: list[VersionRecord]
    ) -> None:
        """New committed versions: publish the newest, evaluate it, tell ``on_version``."""
        running.publisher.want(release)
        if running.evaluator is not None:
            running.evaluator.submit(release.version, release.weights)
        if self._on_version is not None:
            for rec in new_versions:
                try:
                    self._on_version(rec)
                except Exception:
                    log.exception("on_version callback failed")

    # ------------------------------------------------------------------ server state, metrics
    def _server_state(self, status: ServerStatus, published_version: int | None) -> ServerState:
        state = _server_state(
            self.config.fleet, status, self.statistics(), published_version, self._features()
        )
        desk = self._running.desk if self._running is not None else None
        if desk is None:
            return state
        participation = desk.participation()
        self._state_shown = (participation.in_flight, participation.candidates)
        self._state_at = time.monotonic()
        return dataclasses.replace(state, participation=participation)

    def _features(self) -> tuple[str, ...]:
        """``ServerState.features``: what devices may rely on (PROTOCOL.md §4.6, §4.7)."""
        features = [FEATURE_RECEIPTS] if self.config.ingest.receipts else []
        if self.config.participation is not None:
            features.append(FEATURE_LEASES)
        return tuple(features)

    async def _metrics(self, running: _Running) -> None:
        cfg, totals = self.config, running.builder.totals
        meter = RateMeter(time.monotonic(), (totals.applied, totals.bytes))
        while True:
            await asyncio.sleep(cfg.outputs.metrics_interval_s)
            rates = meter.read(time.monotonic(), (totals.applied, totals.bytes))
            self._rate = (rates[0], rates[1])
            s = self.statistics()
            self._stats_cache = s
            try:
                await running.publisher.publish_metrics(_server_metrics(cfg.fleet, s))
            except TransportError as exc:
                log.warning("publishing metrics failed: %s", exc)


def _server_state(
    fleet: str,
    status: ServerStatus,
    s: AggregatorStatistics,
    published_version: int | None,
    features: tuple[str, ...] = (),
) -> ServerState:
    """The retained server state message (``version``: the newest published, else current)."""
    return ServerState(
        fleet=fleet,
        status=status,
        session=max(s.session, 0),
        version=published_version if published_version is not None else s.version,
        buffer_fill=min(s.buffer_fill, s.buffer_size),
        buffer_size=s.buffer_size,
        applied=s.applied,
        started_at=s.started_at or time.time(),
        at=time.time(),
        rejected=s.rejected,
        features=features,
        privacy=None if s.privacy is None else central_privacy(s.privacy),
    )


def central_privacy(p: PrivacyStatistics) -> CentralPrivacy:
    """The server state's central DP figures (PROTOCOL.md §4.4, 1.2): the fields of the same
    names (also the secure-aggregation leader's)."""
    return CentralPrivacy(**{f.name: getattr(p, f.name) for f in dataclasses.fields(p)})


def _server_metrics(fleet: str, s: AggregatorStatistics) -> ServerMetrics:
    """The METRICS message of one statistics snapshot."""
    return ServerMetrics(
        fleet=fleet,
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
        extra={
            "steps": s.steps,
            "pending_acks": s.commits.pending_acks,
            "session": s.session,
            "receipts_sent": s.receipts.sent,
            "receipts_dropped": s.receipts.dropped,
            **_participation_extra(s),
            **privacy_extra(s.privacy),
        },
    )


def _participation_extra(s: AggregatorStatistics) -> dict[str, object]:
    """The lease figures of METRICS ``extra`` (none while participation is off)."""
    p = s.participation
    if p is None:
        return {}
    return {
        "leases_in_flight": p.in_flight,
        "concurrency": p.concurrency,
        "lease_candidates": p.candidates,
        "staleness_reference": p.concurrency / max(1, s.buffer_size),
        "leases_granted": p.granted,
        "leases_ended": dict(p.ended),
        "lease_verdicts": dict(p.verdicts),
        "checkins": dict(p.checkins),
    }


def privacy_extra(p: PrivacyStatistics | None) -> dict[str, object]:
    """The central DP figures of METRICS ``extra``, each :class:`~edgefl.privacy.PrivacyStatistics`
    field as ``dp_<field>`` (none while DP is off); the histogram's keys (participation counts)
    become strings, as JSON object keys must be."""
    if p is None:
        return {}
    figures = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}
    figures["participation_histogram"] = {str(k): n for k, n in p.participation_histogram.items()}
    return {f"dp_{name}": value for name, value in figures.items()}


def _admit_now(desk: LeaseDesk) -> Callable[[UpdateHeader], None]:
    """``Ingest``'s lease check: :meth:`LeaseDesk.admit` at the wall-clock time of the call."""
    return lambda header: desk.admit(header, now=time.time())
