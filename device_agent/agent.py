"""The device agent: an asyncio shell around the sans-IO pieces of ``device_agent``.

``DeviceAgent(config).run()`` runs until :meth:`DeviceAgent.stop`. Many agents can share one
process and one event loop (the live fleet simulator does): an agent keeps no global state, owns
one MQTT connection, and runs its trainings in ``executor`` (default: a private one-thread pool).

Tasks (one ``asyncio.TaskGroup``):

* **connection** — one MQTT connection per *presence session*. The session counter is
  incremented and persisted before every connection and goes into the Last Will (``lost``) and
  every retained ``DeviceState``. The transport reconnects by itself with jittered exponential
  backoff, but its Will is fixed at construction; so when it reconnects, the agent closes it
  cleanly (DISCONNECT: no Will) and opens a new one with the next session. Per connection:
  *receiver* (retained manifest → fetch chunks → verify → swap), *sender* (spool in sequence
  order, QoS 1, an entry is deleted only after the PUBACK of every packet), *state publisher*
  (retained state after CONNACK and on every change, coalesced).
* **eligibility** — a snapshot every ``probes.interval_s`` (or at once after
  :meth:`DeviceAgent.check_now`) through the :class:`EligibilityMonitor`; becoming ineligible
  aborts a running training.
* **scheduler** — when eligible and the held model is newer than the last one trained on, train
  in the executor; a finished training is encoded, signed and written to the spool *before*
  anything is published; an aborted one leaves nothing behind.
* **watchdog** — ``WATCHDOG=1`` every ``WatchdogSec / 2`` from the event loop.

Model swap: a manifest is accepted only when its envelope verifies (``manifest_verifier``, when
configured), it is newer than the model held, its model is known with the same parameter count,
and it fits ``max_model_bytes``. Its chunks are fetched and hashed; then the model is written to
``<state_dir>/model`` (atomic pointer swap) and replaced in memory. Any failure is counted by
``RejectReason`` and the previous model stays.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from device_agent.config import AgentConfig
from device_agent.dataset import LocalDataset, device_seed, load_local_dataset
from device_agent.eligibility import EligibilityMonitor
from device_agent.fetch import ModelFetch, check_manifest_size
from device_agent.model_store import CurrentModel, ModelStore
from device_agent.notify import SystemdNotifier
from device_agent.persist import PersistentInt
from device_agent.snapshots import ProbeSnapshotSource, SnapshotSource
from device_agent.spool import ResidualStore, SpoolCorrupt, SpoolFull, UpdateSpool
from device_agent.trainer import Trainer, TrainJob, TrainResult
from device_agent.updates import build_update, codec_config_for, residual_from_bytes
from edgefl.auth import EnvelopeSigner, ManifestVerifier
from edgefl.errors import EdgeflError, ProtocolError, RejectReason
from edgefl.models.spec import ModelSpec, get_model_spec
from edgefl.protocol.chunking import packetize
from edgefl.protocol.messages import DeviceState, DeviceStatus, ModelManifest, decode_message
from edgefl.protocol.messages import encode_message as encode_msg
from edgefl.protocol.topics import (
    ModelChunkTopic,
    ModelManifestTopic,
    device_state_topic,
    manifest_topic,
    model_chunks_filter,
    parse_topic,
    update_topic,
)
from edgefl.transport import (
    ConnectInfo,
    InboundMessage,
    MqttConfig,
    MqttTransport,
    OnConnect,
    Transport,
    TransportError,
    Will,
)

__all__ = [
    "AbortReason",
    "AgentStatistics",
    "DeviceAgent",
    "TransportFactory",
    "mqtt_transport_factory",
]

log = logging.getLogger("device_agent")

TransportFactory = Callable[[Will, OnConnect], Transport]
"""``factory(will, on_connect)`` -> a new, not yet entered transport for one presence session.
``async with`` must return without waiting for the broker (the agent waits for ``on_connect``)."""

DEFAULT_MAX_MODEL_BYTES = 64 * 1024 * 1024
TRAINING_PROBE_INTERVAL = 5.0
"""Seconds between eligibility checks while training (when ``probes.interval_s`` is longer)."""
_OFFLINE_TIMEOUT = 3.0


class AbortReason(StrEnum):
    """Why a started training produced no update."""

    INELIGIBLE = "ineligible"  # a condition broke mid-training
    STOPPING = "stopping"  # the agent is shutting down
    TIMEOUT = "timeout"  # longer than training.max_train_seconds
    ERROR = "error"  # the trainer raised


class _Dropped(StrEnum):
    SPOOL_FULL = "spool_full"
    SPOOL_CORRUPT = "spool_corrupt"
    ENCODE_FAILED = "encode_failed"


@dataclass(frozen=True)
class AgentStatistics:
    """A snapshot of what the agent did. Counters are totals since :meth:`DeviceAgent.run`."""

    device_id: str
    status: DeviceStatus
    connected: bool
    session: int
    model_version: int | None
    trained_version: int | None
    eligible: bool
    reasons: tuple[str, ...]
    updates_sent: int
    spool_depth: int
    trainings_started: int
    trainings_completed: int
    trainings_aborted: dict[str, int]
    last_local_accuracy: float | None
    manifests_accepted: int
    rejected: dict[str, int]  # inbound rejections by RejectReason value
    dropped: dict[str, int]  # updates lost: spool_full, spool_corrupt, encode_failed
    connections: int


def mqtt_transport_factory(config: AgentConfig) -> TransportFactory:
    """Default: :class:`MqttTransport` with client id = device id, clean session (the model is
    retained, the spool is on disk), background connecting and the configured backoff cap."""
    broker = config.broker
    base = MqttConfig.from_url(
        broker.url,
        client_id=config.device_id,
        username=broker.username,
        password=broker.password,
        ca_file=broker.ca_file,
        cert_file=broker.cert_file,
        key_file=broker.key_file,
        tls_insecure=broker.tls_insecure,
        keepalive=broker.keepalive,
        start_timeout=None,
        reconnect_max_delay=broker.reconnect_max_s,
    )

    def make(will: Will, on_connect: OnConnect) -> Transport:
        return MqttTransport(base.replace(will=will), on_connect=on_connect)

    return make


class _SessionEnded(Exception):
    """Internal: the presence session is over (reconnected with a stale Will, or stopping)."""


class DeviceAgent:
    """See the module docstring. ``run()`` once; ``stop()`` from the same event loop (or a
    signal handler installed on it)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        trainer: Trainer | None = None,
        snapshots: SnapshotSource | None = None,
        dataset: LocalDataset | None = None,
        executor: concurrent.futures.Executor | None = None,
        signer: EnvelopeSigner | None = None,
        manifest_verifier: ManifestVerifier | None = None,
        transport_factory: TransportFactory | None = None,
        notifier: SystemdNotifier | None = None,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    ) -> None:
        self.config = config
        self._fleet = config.fleet
        self._device = config.device_id
        self._trainer = trainer
        self._snapshots: SnapshotSource = snapshots or ProbeSnapshotSource(config.probes)
        self._dataset = dataset
        self._executor = executor
        self._own_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._signer = signer
        self._verifier = manifest_verifier
        self._transport_factory = transport_factory or mqtt_transport_factory(config)
        self._notifier = notifier if notifier is not None else SystemdNotifier()
        self._max_model_bytes = max_model_bytes
        self._state_topic = device_state_topic(self._fleet, self._device)
        self._monitor = EligibilityMonitor(config.eligibility)
        # durable state (opened in run)
        self._spool: UpdateSpool | None = None
        self._residuals: ResidualStore | None = None
        self._models: ModelStore | None = None
        self._sessions: PersistentInt | None = None
        self._trained: PersistentInt | None = None  # last version trained + 1 (0: none)
        self._io_lock = asyncio.Lock()
        # runtime state
        self._model: CurrentModel | None = None
        self._fetch: ModelFetch | None = None
        self._status = DeviceStatus.ONLINE
        self._session = 0
        self._connected = False
        self._transport: Transport | None = None
        self._probe_failed = False
        self._training = False
        self._abort_flag = threading.Event()
        self._abort_reason: AbortReason | None = None
        self._stopping = asyncio.Event()
        self._wake_scheduler = asyncio.Event()
        self._wake_eligibility = asyncio.Event()
        self._spool_changed = asyncio.Event()
        self._state_dirty = asyncio.Event()
        self._started = False
        self._last_status = ""
        # counters
        self._updates_sent = 0
        self._trainings_started = 0
        self._trainings_completed = 0
        self._aborted: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._manifests_accepted = 0
        self._connections = 0
        self._last_accuracy: float | None = None

    # ------------------------------------------------------------------ public API

    def stop(self) -> None:
        """Ask the agent to stop: abort a running training, publish ``offline``, disconnect."""
        self._abort(AbortReason.STOPPING)
        self._stopping.set()

    def check_now(self) -> None:
        """Re-read eligibility now instead of at the next interval (e.g. a simulated plug-in)."""
        self._wake_eligibility.set()

    @property
    def model(self) -> CurrentModel | None:
        """The verified model the agent holds (None before the first one)."""
        return self._model

    def statistics(self) -> AgentStatistics:
        trained = self._trained.value if self._trained is not None else 0
        return AgentStatistics(
            device_id=self._device,
            status=self._status,
            connected=self._link_up(),
            session=self._session,
            model_version=None if self._model is None else self._model.version,
            trained_version=trained - 1 if trained else None,
            eligible=self._eligible(),
            reasons=self._reasons(),
            updates_sent=self._updates_sent,
            spool_depth=0 if self._spool is None else len(self._spool),
            trainings_started=self._trainings_started,
            trainings_completed=self._trainings_completed,
            trainings_aborted=dict(self._aborted),
            last_local_accuracy=self._last_accuracy,
            manifests_accepted=self._manifests_accepted,
            rejected=dict(self._rejected),
            dropped=dict(self._dropped),
            connections=self._connections,
        )

    async def run(self) -> None:
        """Open the state directory, then run until :meth:`stop`. Raises on a configuration or
        data problem found at start (``DataSourceError``, ``SpoolLocked``, ...)."""
        if self._started:
            raise RuntimeError("DeviceAgent.run() may be called once")
        self._started = True
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_state))
        try:
            await asyncio.shield(opening)
            self._load_security()
        except BaseException:
            # cancelled or failed while starting: the thread may still be opening the state
            # directory; let it finish, then release the spool's lock so that another agent
            # (a restart in the same process) can take it
            with contextlib.suppress(BaseException):
                await asyncio.shield(opening)
            if self._spool is not None:
                self._spool.close()
            raise
        if self._trainer is None:
            from device_agent.config import TrainingIsolation
            from device_agent.trainer import ProcessTrainer, TorchTrainer

            isolated = self.config.training.isolation is TrainingIsolation.PROCESS
            self._trainer = ProcessTrainer(TorchTrainer) if isolated else TorchTrainer()
        if self._executor is None:
            self._own_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"edgefl-train-{self._device}"
            )
            self._executor = self._own_executor
        self._notifier.ready(self._status_line())
        log.info(
            "%s: agent started (model %s, %d spooled updates, state %s)",
            self._device,
            "none" if self._model is None else f"v{self._model.version}",
            len(self._spool) if self._spool else 0,
            self.config.state_dir,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._connection_loop(), name=f"{self._device}-connection")
                tg.create_task(self._eligibility_loop(), name=f"{self._device}-eligibility")
                tg.create_task(self._scheduler_loop(), name=f"{self._device}-scheduler")
                tg.create_task(self._watchdog_loop(), name=f"{self._device}-watchdog")
        finally:
            self._abort(AbortReason.STOPPING)
            self._notifier.stopping("stopped")
            if self._own_executor is not None:
                self._own_executor.shutdown(wait=False, cancel_futures=True)
            async with self._io_lock:
                if self._spool is not None:
                    self._spool.close()
            log.info("%s: agent stopped", self._device)

    # ------------------------------------------------------------------ start-up

    def _open_state(self) -> None:
        cfg = self.config
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable = cfg.spool.durable
        self._spool = UpdateSpool(
            state / "spool",
            max_entries=cfg.spool.max_entries,
            max_bytes=cfg.spool.max_bytes,
            durable=durable,
        )
        self._residuals = ResidualStore(state / "residual.bin", durable=durable)
        self._models = ModelStore(state / "model", durable=durable)
        self._sessions = PersistentInt(state / "session", durable=durable)
        self._trained = PersistentInt(state / "trained_version", durable=durable)
        self._model = self._models.load()
        if self._dataset is None:
            self._dataset = load_local_dataset(
                cfg.data, cfg.training.holdout_fraction, cfg.device_id
            )

    def _load_security(self) -> None:
        sec = self.config.security
        if self._signer is None and sec.signing_key_file is not None:
            from edgefl.security import load_signer  # type: ignore[import-not-found,unused-ignore]

            self._signer = load_signer(sec.signing_key_file)
        if self._verifier is None and sec.aggregator_public_key_file is not None:
            from edgefl.security import (  # type: ignore[import-not-found,unused-ignore]
                load_manifest_verifier,
            )

            self._verifier = load_manifest_verifier(sec.aggregator_public_key_file)

    # ------------------------------------------------------------------ presence

    def _reasons(self) -> tuple[str, ...]:
        if self._probe_failed:
            return ("probe_failed",)
        decision = self._monitor.decision
        reasons = tuple(r.value for r in decision.reasons) if decision is not None else ()
        if not reasons and decision is not None and not self._training and self._model is None:
            return ("no_model",)
        return reasons

    def _link_up(self) -> bool:
        transport = self._transport
        return self._connected and transport is not None and transport.statistics().connected

    def _eligible(self) -> bool:
        return self._monitor.eligible and not self._probe_failed

    def _device_state(self, status: DeviceStatus) -> DeviceState:
        return DeviceState(
            fleet=self._fleet,
            device_id=self._device,
            status=status,
            session=self._session,
            at=time.time(),
            model_version=None if self._model is None else self._model.version,
            reasons=self._reasons(),
            updates_sent=self._updates_sent,
            local_accuracy=self._last_accuracy,
            profile=self.config.profile,
        )

    def _set_status(self, status: DeviceStatus) -> None:
        self._status = status
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        self._state_dirty.set()
        self._systemd_status()

    def _systemd_status(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            self._notifier.status(line)

    def _status_line(self) -> str:
        model = "no model" if self._model is None else f"model v{self._model.version}"
        spool = len(self._spool) if self._spool is not None else 0
        reasons = ",".join(self._reasons())
        link = "connected" if self._link_up() else "disconnected"
        text = f"{self._status.value}; {model}; {link}; spool {spool}; sent {self._updates_sent}"
        return f"{text}; not eligible: {reasons}" if reasons else text

    # ------------------------------------------------------------------ connection

    async def _connection_loop(self) -> None:
        assert self._sessions is not None
        while not self._stopping.is_set():
            async with self._io_lock:
                self._session = await asyncio.to_thread(self._sessions.increment)
            will = Will(
                self._state_topic,
                encode_msg(self._device_state(DeviceStatus.LOST)),
                qos=1,
                retain=True,
            )
            connected = asyncio.Event()
            reconnected = asyncio.Event()

            async def on_connect(
                info: ConnectInfo,
                first: asyncio.Event = connected,
                again: asyncio.Event = reconnected,
            ) -> None:
                (first if info.connects == 1 else again).set()

            transport = self._transport_factory(will, on_connect)
            failed = False
            try:
                await transport.__aenter__()
                if await _first(connected.wait(), self._stopping.wait()) == 1:
                    return
                self._connected = True
                self._transport = transport
                self._connections += 1
                self._mark_dirty()
                await self._serve(transport, reconnected)
            except* (TransportError, OSError) as group:
                failed = True
                log.warning(
                    "%s: connection session %d failed: %s",
                    self._device,
                    self._session,
                    group.exceptions[0],
                )
            except* Exception as group:  # a bug in a session task: log, reconnect after a pause
                failed = True
                log.error(
                    "%s: session %d ended by an error",
                    self._device,
                    self._session,
                    exc_info=group.exceptions[0],
                )
            finally:
                self._connected = False
                self._transport = None
                self._systemd_status()
                await self._close_transport(transport)
            if failed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._stopping.wait()

    async def _close_transport(self, transport: Transport) -> None:
        if self._stopping.is_set() and transport.statistics().connected:
            self._status = DeviceStatus.OFFLINE
            with contextlib.suppress(TransportError, TimeoutError):
                async with asyncio.timeout(_OFFLINE_TIMEOUT):
                    state = self._device_state(DeviceStatus.OFFLINE)
                    await transport.publish(self._state_topic, encode_msg(state), retain=True)
        with contextlib.suppress(TransportError):
            await transport.close()

    async def _serve(self, transport: Transport, reconnected: asyncio.Event) -> None:
        async def end_of_session() -> None:
            if await _first(self._stopping.wait(), reconnected.wait()) == 1:
                log.info("%s: reconnected; starting a new presence session", self._device)
            raise _SessionEnded

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(end_of_session())
                tg.create_task(self._publish_states(transport))
                tg.create_task(self._receive(transport))
                tg.create_task(self._send_spool(transport))
        except* _SessionEnded:
            pass

    async def _publish_states(self, transport: Transport) -> None:
        while True:
            self._state_dirty.clear()
            state = self._device_state(self._status)
            await transport.publish(self._state_topic, encode_msg(state), qos=1, retain=True)
            # Republish at least every heartbeat_s so a monitor can tell a silent device from a
            # healthy idle one even when no Last Will could be delivered (e.g. a broker restart).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._state_dirty.wait()

    # ------------------------------------------------------------------ receiving models

    async def _receive(self, transport: Transport) -> None:
        await transport.subscribe(manifest_topic(self._fleet), qos=1)
        if self._fetch is not None:
            await transport.subscribe(model_chunks_filter(self._fleet, self._fetch.version))
        async for message in transport.messages():
            await self._handle(transport, message)

    def _reject(self, reason: RejectReason, detail: str) -> None:
        self._rejected[reason.value] += 1
        log.warning("%s: rejected: %s: %s", self._device, reason.value, detail)

    async def _handle(self, transport: Transport, message: InboundMessage) -> None:
        if not message.payload:
            return  # a cleared retained message
        try:
            topic = parse_topic(message.topic, expected_fleet=self._fleet)
        except ProtocolError as exc:
            self._reject(exc.reason, exc.detail)
            return
        if isinstance(topic, ModelManifestTopic):
            await self._on_manifest(transport, topic, message.payload)
        elif isinstance(topic, ModelChunkTopic):
            await self._on_chunk(topic, message.payload)
        else:
            self._reject(RejectReason.BAD_TOPIC, f"unexpected topic {message.topic}")

    async def _on_manifest(
        self, transport: Transport, topic: ModelManifestTopic, payload: bytes
    ) -> None:
        try:
            if self._verifier is not None:
                self._verifier.verify(payload)
            manifest = decode_message(payload, ModelManifest, topic=topic)
        except EdgeflError as exc:
            self._reject(exc.reason, f"manifest: {exc.detail}")
            return
        held = self._model.version if self._model is not None else -1
        fetching = self._fetch.version if self._fetch is not None else -1
        if manifest.version <= max(held, fetching):
            return  # what we hold or already fetch (a retained copy on reconnect)
        try:
            spec = _spec_for(manifest)
            check_manifest_size(manifest, self._max_model_bytes)
        except EdgeflError as exc:
            self._reject(exc.reason, f"manifest v{manifest.version}: {exc.detail}")
            return
        del spec
        log.info(
            "%s: fetching model v%d (%s, %d B in %d chunks%s)",
            self._device,
            manifest.version,
            manifest.model,
            manifest.size,
            manifest.num_chunks,
            ", with ONNX" if manifest.onnx is not None else "",
        )
        self._fetch = ModelFetch(manifest, payload, max_packet=self.config.broker.max_packet)
        await transport.subscribe(model_chunks_filter(self._fleet, manifest.version), qos=1)

    async def _on_chunk(self, topic: ModelChunkTopic, payload: bytes) -> None:
        fetch = self._fetch
        if fetch is None or topic.version != fetch.version:
            return  # a retained chunk of a version we no longer want
        try:
            model = fetch.offer(topic, payload)
        except EdgeflError as exc:
            self._reject(exc.reason, f"model v{fetch.version} chunk {topic.index}: {exc.detail}")
            if exc.reason in (RejectReason.BAD_CHECKSUM, RejectReason.BAD_HEADER):
                self._fetch = None  # this version is unusable; keep the model we have
            return
        if model is None:
            return
        assert self._models is not None
        async with self._io_lock:
            await asyncio.to_thread(self._models.install, model)
        self._model = model
        self._fetch = None
        self._manifests_accepted += 1
        log.info("%s: now holding model v%d", self._device, model.version)
        self._mark_dirty()
        self._wake_scheduler.set()

    # ------------------------------------------------------------------ sending updates

    async def _send_spool(self, transport: Transport) -> None:
        spool = self._spool
        assert spool is not None
        max_packet = self.config.broker.max_packet
        while True:
            self._spool_changed.clear()
            for entry in spool.pending():
                try:
                    async with self._io_lock:
                        payload = await asyncio.to_thread(spool.read, entry.seq)
                except SpoolCorrupt as exc:
                    self._dropped[_Dropped.SPOOL_CORRUPT.value] += 1
                    log.error("%s: %s", self._device, exc)
                    continue
                except KeyError:
                    continue
                topic = update_topic(self._fleet, self._device, entry.seq)
                for packet in packetize(payload, max_packet=max_packet):
                    await transport.publish(topic, packet, qos=1)
                async with self._io_lock:
                    await asyncio.to_thread(spool.remove, entry.seq)
                self._updates_sent += 1
                log.info("%s: update %d delivered (%d B)", self._device, entry.seq, len(payload))
                self._mark_dirty()
            await self._spool_changed.wait()

    # ------------------------------------------------------------------ eligibility

    async def _eligibility_loop(self) -> None:
        interval = self.config.probes.interval_s
        threads = float(self.config.training.max_threads)
        while not self._stopping.is_set():
            self._wake_eligibility.clear()
            was_eligible, old_reasons = self._eligible(), self._reasons()
            try:
                snapshot = await self._snapshots.snapshot()
            except Exception:
                log.exception("%s: snapshot source failed", self._device)
                self._probe_failed = True
            else:
                self._probe_failed = False
                self._monitor.update(snapshot, own_load=threads if self._training else 0.0)
            eligible = self._eligible()
            if self._training and not eligible:
                log.info("%s: no longer eligible (%s)", self._device, ",".join(self._reasons()))
                self._abort(AbortReason.INELIGIBLE)
            if eligible and not was_eligible:
                self._wake_scheduler.set()
            if self._status is DeviceStatus.ONLINE and not self._training:
                self._set_status(DeviceStatus.IDLE)
            elif eligible != was_eligible or old_reasons != self._reasons():
                self._mark_dirty()
            # while training, re-check at least every few seconds so a broken condition (unplugged,
            # too hot, busy) gives the CPU back promptly even with a long probes.interval_s
            wait = min(interval, TRAINING_PROBE_INTERVAL) if self._training else interval
            await _first(self._stopping.wait(), self._wake_eligibility.wait(), timeout=wait)

    # ------------------------------------------------------------------ training

    def _abort(self, reason: AbortReason) -> None:
        if self._training and self._abort_reason is None:
            self._abort_reason = reason
        self._abort_flag.set()

    def _wants_training(self) -> CurrentModel | None:
        model = self._model
        if self._stopping.is_set() or model is None or not self._eligible():
            return None
        assert self._trained is not None
        return model if model.version + 1 > self._trained.value else None

    async def _scheduler_loop(self) -> None:
        while not self._stopping.is_set():
            model = self._wants_training()
            if model is None:
                self._wake_scheduler.clear()
                await _first(self._stopping.wait(), self._wake_scheduler.wait())
                continue
            await self._train(model)

    def _job(self, model: CurrentModel, spec: ModelSpec) -> TrainJob:
        limits = self.config.training
        hints = model.manifest.hints
        epochs = limits.max_epochs
        batch, lr = limits.batch_size, limits.lr
        if hints is not None:
            epochs = min(hints.local_epochs or epochs, limits.max_epochs)
            batch = hints.batch_size or batch
            lr = hints.lr or lr
        assert self._dataset is not None
        return TrainJob(
            spec=spec,
            base_version=model.version,
            base_weights=model.weights,
            data=self._dataset,
            epochs=epochs,
            batch_size=batch,
            lr=lr,
            max_steps=limits.max_steps,
            threads=limits.max_threads,
            nice=limits.nice,
            seed=(device_seed(self._device) + model.version) % 2**31,
        )

    async def _train(self, model: CurrentModel) -> None:
        trainer = self._trainer
        assert trainer is not None
        assert self._trained is not None
        try:
            job = self._job(model, _spec_for(model.manifest))
        except (EdgeflError, ValueError) as exc:
            log.error("%s: cannot train on model v%d: %s", self._device, model.version, exc)
            self._aborted[AbortReason.ERROR.value] += 1
            async with self._io_lock:
                await asyncio.to_thread(self._trained.set, model.version + 1)
            return
        self._abort_flag.clear()
        self._abort_reason = None
        self._training = True
        self._trainings_started += 1
        self._set_status(DeviceStatus.TRAINING)
        self._wake_eligibility.set()  # switch the eligibility loop to its training interval
        log.info("%s: training on model v%d", self._device, model.version)
        deadline = time.monotonic() + self.config.training.max_train_seconds
        flag = self._abort_flag

        def should_stop() -> bool:
            return flag.is_set() or time.monotonic() > deadline

        loop = asyncio.get_running_loop()
        result: TrainResult | None = None
        error = False
        try:
            result = await loop.run_in_executor(self._executor, trainer.train, job, should_stop)
        except asyncio.CancelledError:
            flag.set()
            raise
        except Exception:
            log.exception("%s: training on model v%d failed", self._device, model.version)
            error = True
        finally:
            self._training = False
            self._set_status(DeviceStatus.IDLE)
        if result is None:
            reason = (
                AbortReason.ERROR
                if error
                else self._abort_reason
                or (AbortReason.TIMEOUT if time.monotonic() > deadline else AbortReason.STOPPING)
            )
            self._aborted[reason.value] += 1
            log.info("%s: training on v%d aborted: %s", self._device, model.version, reason.value)
            if reason in (AbortReason.ERROR, AbortReason.TIMEOUT):
                # do not retry this version in a loop; the next model gets a fresh chance
                async with self._io_lock:
                    await asyncio.to_thread(self._trained.set, model.version + 1)
            return
        self._trainings_completed += 1
        if result.global_accuracy is not None:
            self._last_accuracy = min(1.0, max(0.0, result.global_accuracy))
        async with self._io_lock:
            await asyncio.to_thread(self._spool_result, model, result)
        self._mark_dirty()
        self._spool_changed.set()

    def _spool_result(self, model: CurrentModel, result: TrainResult) -> None:
        """Encode, sign and spool one finished training (worker thread, under the I/O lock)."""
        assert self._spool is not None
        assert self._residuals is not None
        assert self._trained is not None
        manifest = model.manifest
        try:
            codec = codec_config_for(self.config.codec, manifest)
            residual = residual_from_bytes(self._residuals.load(), manifest.num_params)
            seq = self._spool.next_seq()
            built = build_update(
                result,
                manifest=manifest,
                fleet=self._fleet,
                device_id=self._device,
                seq=seq,
                codec=codec,
                residual=residual,
                rng=np.random.default_rng(),
                created_at=time.time(),
                signer=self._signer,
            )
        except EdgeflError as exc:
            self._dropped[_Dropped.ENCODE_FAILED.value] += 1
            log.error("%s: cannot encode the update: %s", self._device, exc)
        else:
            try:
                self._spool.put(seq, built.envelope, {"base_version": manifest.version})
            except SpoolFull as exc:
                self._dropped[_Dropped.SPOOL_FULL.value] += 1
                log.error("%s: update dropped: %s", self._device, exc)
            else:
                if built.residual is not None:
                    self._residuals.save(built.residual.values.astype("<f4").tobytes())
                else:
                    self._residuals.clear()
                log.info(
                    "%s: update %d spooled (v%d, %d B, %d examples)",
                    self._device,
                    seq,
                    manifest.version,
                    len(built.envelope),
                    result.num_examples,
                )
        self._trained.set(model.version + 1)

    # ------------------------------------------------------------------ systemd watchdog

    async def _watchdog_loop(self) -> None:
        interval = self._notifier.watchdog_interval()
        if interval is None:
            return
        while not self._stopping.is_set():
            self._notifier.watchdog()
            await _first(self._stopping.wait(), timeout=interval / 2)


def _spec_for(manifest: ModelManifest) -> ModelSpec:
    """The registered model of a manifest; ``WRONG_MODEL`` / ``SHAPE_MISMATCH`` otherwise."""
    try:
        spec = get_model_spec(manifest.model)
    except (KeyError, ValueError) as exc:
        raise ProtocolError(RejectReason.WRONG_MODEL, f"unknown model {manifest.model!r}") from exc
    if spec.num_params != manifest.num_params:
        raise ProtocolError(
            RejectReason.SHAPE_MISMATCH,
            f"{manifest.model} has {spec.num_params} parameters, manifest says "
            f"{manifest.num_params}",
        )
    return spec


async def _first(
    *aws: Coroutine[Any, Any, Any],
    timeout: float | None = None,  # noqa: ASYNC109
) -> int | None:
    """Run the coroutines until the first finishes; return its index (None on timeout). The
    others are cancelled."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for index, task in enumerate(tasks):
        if task in done:
            return index
    return None
