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
  *receiver* (retained manifest → fetch chunks → verify → swap; receipts; the server state),
  *sender* (spool in sequence order, QoS 1; without receipts an entry is deleted after the
  PUBACK of every packet, with receipts it then awaits the aggregator's receipt and is resent
  after a timeout with backoff, see :mod:`device_agent.receipts`), *state publisher* (retained
  state after CONNACK and on every change, coalesced).
* **eligibility** — a snapshot every ``probes.interval_s`` (or at once after
  :meth:`DeviceAgent.check_now`) through the :class:`EligibilityMonitor`; becoming ineligible
  aborts a running training.
* **scheduler** — when eligible and the held model is newer than the last one trained on, train
  in the executor; a finished training is (under local DP: clipped, noised and charged to the
  epsilon ledger, :mod:`device_agent.local_privacy`) encoded, signed and written to the spool
  *before* anything is published; an aborted one leaves nothing behind. When the aggregator grants
  leases (protocol 1.2), train only under a lease instead, once per lease
  (:mod:`device_agent.participation`: the per-connection *check-in* task, and the lease state).
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
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from device_agent.agent_store import AgentStore
from device_agent.config import AgentConfig, ReceiptMode
from device_agent.dataset import LocalDataset, load_local_dataset
from device_agent.eligibility import EligibilityMonitor
from device_agent.fetch import ModelFetch, check_manifest_size
from device_agent.local_privacy import LocalPrivacy, LocalPrivacyReport
from device_agent.model_store import CurrentModel
from device_agent.notify import SystemdNotifier
from device_agent.participation import (
    Conditions,
    LeaseClient,
    ParticipationStatistics,
    verified,
)
from device_agent.partition import PartitionRouter
from device_agent.receipts import DeliveryTracker, ReceiptPolicy, Settlement
from device_agent.secagg import SecAggUplink, is_pair, pair_packets
from device_agent.snapshots import ProbeSnapshotSource, SnapshotSource
from device_agent.spool import SpoolCorrupt, SpoolFull
from device_agent.trainer import Trainer, TrainJob, TrainResult
from device_agent.training_policy import (
    AbortReason,
    DropReason,
    HeldLease,
    TrainingGate,
    abort_reason,
    lease_expired,
    marks_version_done,
    presence_reasons,
    should_fetch,
    should_train,
    should_train_leased,
    status_line,
    training_job,
    undecided_wait,
)
from device_agent.updates import build_update, codec_config_for, residual_from_bytes
from edgefl.auth import EnvelopeSigner, ManifestVerifier
from edgefl.errors import CodecError, EdgeflError, ProtocolError, RejectReason
from edgefl.models.spec import ModelSpec, get_model_spec
from edgefl.protocol.chunking import packetize
from edgefl.protocol.messages import (
    FEATURE_RECEIPTS,
    DeviceState,
    DeviceStatus,
    ModelManifest,
    Receipt,
    ServerState,
    UpdateMeta,
)
from edgefl.protocol.messages import encode_message as encode_msg
from edgefl.protocol.topics import (
    LeaseTopic,
    ModelChunkTopic,
    ModelManifestTopic,
    ReceiptTopic,
    ServerStateTopic,
    device_state_topic,
    manifest_topic,
    model_chunks_filter,
    parse_topic,
    receipt_topic,
    server_state_topic,
)
from edgefl.sdnotify import keepalive, watchdog_period
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
    "DeliveryStatistics",
    "DeviceAgent",
    "TrainingStatistics",
    "TransportFactory",
    "mqtt_transport_factory",
]

log = logging.getLogger("device_agent")

TransportFactory = Callable[[Will, OnConnect], Transport]
"""``factory(will, on_connect)`` -> a new, not yet entered transport for one presence session.
``async with`` must return without waiting for the broker (the agent waits for ``on_connect``)."""

DEFAULT_MAX_MODEL_BYTES = 64 * 1024 * 1024
STOP_GRACE_S = 0.5
"""Seconds a stopping agent waits for a training thread that does not return at once."""
TRAINING_PROBE_INTERVAL = 5.0
"""Seconds between eligibility checks while training (when ``probes.interval_s`` is longer)."""
_OFFLINE_TIMEOUT = 3.0
SERVER_STATE_GRACE_S = 2.0
"""Seconds after its first connection an agent waits for the aggregator's retained state before
it trains without knowing whether leases are required (see ``undecided_wait``)."""


@dataclass(frozen=True)
class TrainingStatistics:
    """Local trainings since :meth:`DeviceAgent.run`: started, completed, aborted by reason, and
    the last local accuracy measured (kept on the device)."""

    started: int = 0
    completed: int = 0
    aborted: dict[str, int] = field(default_factory=dict)
    last_accuracy: float | None = None


@dataclass(frozen=True)
class DeliveryStatistics:
    """Update delivery under receipts: spooled updates sent and waiting for the aggregator's
    receipt, sends of an update after its first (timeouts, reconnects), updates a receipt
    reported committed (and deleted), receipted rejections by RejectReason value, and whether
    receipts are in use (None: "auto", server state not seen yet)."""

    awaiting_receipt: int = 0
    resends: int = 0
    receipted: int = 0
    receipt_rejected: dict[str, int] = field(default_factory=dict)
    receipts: bool | None = None


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
    training: TrainingStatistics
    manifests_accepted: int
    rejected: dict[str, int]  # inbound rejections by RejectReason value
    dropped: dict[str, int]  # updates lost: spool_full, spool_corrupt, encode_failed
    connections: int
    delivery: DeliveryStatistics = field(default_factory=DeliveryStatistics)
    participation: ParticipationStatistics = field(default_factory=ParticipationStatistics)
    local_privacy: LocalPrivacyReport | None = None  # local DP's epsilon (None: local DP off)


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


@dataclass
class _Counters:
    """What the agent did since :meth:`DeviceAgent.run` (the counters of AgentStatistics)."""

    updates_sent: int = 0
    trainings_started: int = 0
    trainings_completed: int = 0
    manifests_accepted: int = 0
    connections: int = 0
    last_accuracy: float | None = None
    aborted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    receipted: int = 0
    resends: int = 0
    receipt_rejected: Counter[str] = field(default_factory=Counter)


@dataclass
class _Link:
    """The current presence session: its number, and its transport once CONNACK came."""

    session: int = 0
    transport: Transport | None = None
    first_connected_at: float | None = None  # the agent's clock at its first CONNACK

    def up(self) -> bool:
        return self.transport is not None and self.transport.statistics().connected


@dataclass(frozen=True)
class _Wakeups:
    """The events the agent's loops wait on."""

    started: asyncio.Event = field(default_factory=asyncio.Event)  # run() was called
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    scheduler: asyncio.Event = field(default_factory=asyncio.Event)
    eligibility: asyncio.Event = field(default_factory=asyncio.Event)
    spool_changed: asyncio.Event = field(default_factory=asyncio.Event)
    state_dirty: asyncio.Event = field(default_factory=asyncio.Event)


class _StatusNotifier:
    """systemd notifications; a status line is sent only when it changed."""

    def __init__(self, notifier: SystemdNotifier) -> None:
        self.systemd = notifier
        self._last = ""

    def status(self, line: str) -> None:
        if line != self._last:
            self._last = line
            self.systemd.status(line)


@dataclass
class _Delivery:
    """End-to-end receipts: the tracker of sent, awaiting updates, its clock, and whether the
    aggregator announced receipts (None until its retained server state came; "auto" mode)."""

    tracker: DeliveryTracker
    clock: Callable[[], float]
    server_receipts: bool | None = None


@dataclass
class _Credentials:
    """The update signer and the manifest verifier (loaded from the config's key files)."""

    signer: EnvelopeSigner | None = None
    verifier: ManifestVerifier | None = None
    receipt_verifier: ManifestVerifier | None = None  # the aggregator's key, RECEIPT envelopes
    lease_verifier: ManifestVerifier | None = None  # the aggregator's key, LEASE envelopes


@dataclass
class _Workbench:
    """What a training runs with: the trainer, the local data and the executor (each made in
    ``run()`` when not injected), and local DP (its noise generator, and the ledger's shell)."""

    trainer: Trainer | None = None
    dataset: LocalDataset | None = None
    executor: concurrent.futures.Executor | None = None
    noise_rng: np.random.Generator | None = None  # None: os.urandom-seeded (never fix it)
    privacy: LocalPrivacy | None = None  # local DP, set up with the state


@dataclass
class _Eligibility:
    """Where the device's conditions come from, the monitor that decides on them, and whether
    the last probe failed (then the device counts as not eligible)."""

    source: SnapshotSource
    monitor: EligibilityMonitor
    probe_failed: bool = False


@dataclass
class _Routes:
    """How a spooled update leaves the device: as the two shares of secure aggregation when the
    aggregator announces it (:mod:`device_agent.secagg`), and to its partition's topic when a
    sharded tree announced partitions (:mod:`device_agent.partition`)."""

    secagg: SecAggUplink
    partitions: PartitionRouter


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
        receipt_verifier: ManifestVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        noise_rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self._work = _Workbench(trainer, dataset, executor, noise_rng)
        self._eligibility = _Eligibility(
            snapshots or ProbeSnapshotSource(config.probes), EligibilityMonitor(config.eligibility)
        )
        self._credentials = _Credentials(signer, manifest_verifier, receipt_verifier)
        self._transport_factory = transport_factory or mqtt_transport_factory(config)
        self._notifier = _StatusNotifier(notifier if notifier is not None else SystemdNotifier())
        self._max_model_bytes = max_model_bytes
        self._store: AgentStore | None = None  # durable state, opened in run()
        self._model: CurrentModel | None = None
        self._fetch: ModelFetch | None = None
        self._deferred: tuple[ModelManifest, bytes] | None = None  # fetched when a lease asks
        self._status = DeviceStatus.ONLINE
        self._link = _Link()
        self._gate = TrainingGate()
        self._wake = _Wakeups()
        self._counts = _Counters()
        spool_cfg = config.spool
        self._delivery = _Delivery(
            DeliveryTracker(ReceiptPolicy(spool_cfg.receipt_timeout_s, spool_cfg.resend_max_s)),
            clock,
        )
        self._routes = _Routes(
            SecAggUplink(config.security.helper_public_key_file),
            PartitionRouter(config.fleet, config.device_id),  # protocol 1.3
        )
        self._leases = LeaseClient(
            config.fleet,
            config.device_id,
            keys=self._credentials,
            conditions=self._conditions,
            on_change=self._participation_changed,
            reject=self._reject,
            clock=clock,
        )

    @property
    def _fleet(self) -> str:
        return self.config.fleet

    @property
    def _device(self) -> str:
        return self.config.device_id

    @property
    def _state_topic(self) -> str:
        return device_state_topic(self.config.fleet, self.config.device_id)

    @property
    def _durable(self) -> AgentStore:
        """The durable state; only used once ``run()`` opened it."""
        if self._store is None:
            raise RuntimeError("the agent's state is not open (run() has not started)")
        return self._store

    # ------------------------------------------------------------------ public API

    def stop(self) -> None:
        """Ask the agent to stop: abort a running training, publish ``offline``, disconnect."""
        self._gate.abort(AbortReason.STOPPING)
        self._wake.stopping.set()

    def check_now(self) -> None:
        """Re-read eligibility now instead of at the next interval (e.g. a simulated plug-in)."""
        self._wake.eligibility.set()

    @property
    def model(self) -> CurrentModel | None:
        """The verified model the agent holds (None before the first one)."""
        return self._model

    @property
    def training_lease(self) -> HeldLease | None:
        """The lease the running training is under (None: no training, or no leases)."""
        return self._leases.training

    def statistics(self) -> AgentStatistics:
        store, counts = self._store, self._counts
        trained = store.trained.value if store is not None else 0
        return AgentStatistics(
            device_id=self._device,
            status=self._status,
            connected=self._link.up(),
            session=self._link.session,
            model_version=None if self._model is None else self._model.version,
            trained_version=trained - 1 if trained else None,
            eligible=self._eligible(),
            reasons=self._reasons(),
            updates_sent=counts.updates_sent,
            spool_depth=0 if store is None else len(store.spool),
            training=TrainingStatistics(
                counts.trainings_started,
                counts.trainings_completed,
                dict(counts.aborted),
                counts.last_accuracy,
            ),
            manifests_accepted=counts.manifests_accepted,
            rejected=dict(counts.rejected),
            dropped=dict(counts.dropped),
            connections=counts.connections,
            delivery=DeliveryStatistics(
                self._delivery.tracker.awaiting,
                counts.resends,
                counts.receipted,
                dict(counts.receipt_rejected),
                self._receipts_active(),
            ),
            participation=self._leases.statistics(),
            local_privacy=None if self._work.privacy is None else self._work.privacy.report(),
        )

    async def run(self) -> None:
        """Open the state directory, then run until :meth:`stop`. Raises on a configuration or
        data problem found at start (``DataSourceError``, ``SpoolLocked``, ...)."""
        if self._wake.started.is_set():
            raise RuntimeError("DeviceAgent.run() may be called once")
        self._wake.started.set()
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
            if self._store is not None:
                self._store.close()
            raise
        if self._work.trainer is None:
            from device_agent.config import TrainingIsolation
            from device_agent.trainer import ProcessTrainer, TorchTrainer

            isolated = self.config.training.isolation is TrainingIsolation.PROCESS
            self._work.trainer = ProcessTrainer(TorchTrainer) if isolated else TorchTrainer()
        own_executor: concurrent.futures.ThreadPoolExecutor | None = None
        if self._work.executor is None:
            own_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"edgefl-train-{self._device}"
            )
            self._work.executor = own_executor
        self._notifier.systemd.ready(self._status_line())
        log.info(
            "%s: agent started (model %s, %d spooled updates, state %s)",
            self._device,
            "none" if self._model is None else f"v{self._model.version}",
            len(self._durable.spool),
            self.config.state_dir,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._connection_loop(), name=f"{self._device}-connection")
                tg.create_task(self._eligibility_loop(), name=f"{self._device}-eligibility")
                tg.create_task(self._scheduler_loop(), name=f"{self._device}-scheduler")
                tg.create_task(self._watchdog_loop(), name=f"{self._device}-watchdog")
        finally:
            self._gate.abort(AbortReason.STOPPING)
            self._notifier.systemd.stopping("stopped")
            if own_executor is not None:
                own_executor.shutdown(wait=False, cancel_futures=True)
            async with self._durable.lock:
                self._durable.close()
            log.info("%s: agent stopped", self._device)

    # ------------------------------------------------------------------ start-up

    def _open_state(self) -> None:
        cfg = self.config
        self._store = AgentStore.open(cfg)
        self._leases.remember_in(cfg.state_dir / "leases", durable=cfg.spool.durable)
        self._model = self._store.models.load()
        if self._store.privacy is not None and cfg.privacy.local is not None:
            self._work.privacy = LocalPrivacy(
                cfg.privacy.local,
                self._store.privacy,
                device_id=self._device,
                rng=self._work.noise_rng,
            )
        now = self._delivery.clock()
        for mark in self._store.spool.awaiting():
            self._delivery.tracker.restore(mark.seq, mark.attempts, now)
        if self._work.dataset is None:
            self._work.dataset = load_local_dataset(
                cfg.data, cfg.training.holdout_fraction, cfg.device_id
            )

    def _load_security(self) -> None:
        sec, creds = self.config.security, self._credentials
        if creds.signer is None and sec.signing_key_file is not None:
            from edgefl.security import load_signer  # type: ignore[import-not-found,unused-ignore]

            creds.signer = load_signer(sec.signing_key_file)
        if creds.verifier is None and sec.aggregator_public_key_file is not None:
            from edgefl.security import (  # type: ignore[import-not-found,unused-ignore]
                load_manifest_verifier,
            )

            creds.verifier = load_manifest_verifier(sec.aggregator_public_key_file)
        if sec.aggregator_public_key_file is not None:
            from edgefl.protocol.envelope import EnvelopeKind
            from edgefl.security import (  # type: ignore[import-not-found,unused-ignore]
                Ed25519ManifestVerifier,
                load_public_keys,
            )

            keys = load_public_keys(sec.aggregator_public_key_file)
            if creds.receipt_verifier is None:
                kinds = (EnvelopeKind.RECEIPT,)
                creds.receipt_verifier = Ed25519ManifestVerifier(keys, kinds=kinds)
            if creds.lease_verifier is None:
                kinds = (EnvelopeKind.LEASE,)
                creds.lease_verifier = Ed25519ManifestVerifier(keys, kinds=kinds)

    # ------------------------------------------------------------------ presence

    def _reasons(self) -> tuple[str, ...]:
        decision = self._eligibility.monitor.decision
        return presence_reasons(
            probe_failed=self._eligibility.probe_failed,
            decision_reasons=None if decision is None else [r.value for r in decision.reasons],
            training=self._gate.active,
            has_model=self._model is not None,
            budget_spent=self._budget_spent(),
        )

    def _budget_spent(self) -> bool:
        return self._work.privacy is not None and self._work.privacy.exhausted

    def _eligible(self) -> bool:
        return self._eligibility.monitor.eligible and not self._eligibility.probe_failed

    def _device_state(self, status: DeviceStatus) -> DeviceState:
        privacy = self._work.privacy
        return DeviceState(
            fleet=self._fleet,
            device_id=self._device,
            status=status,
            session=self._link.session,
            at=time.time(),
            model_version=None if self._model is None else self._model.version,
            reasons=self._reasons(),
            updates_sent=self._counts.updates_sent,
            # under local DP the accuracy on local data would leave the device without noise
            local_accuracy=self._counts.last_accuracy if privacy is None else None,
            profile=self.config.profile,
            spool_depth=0 if self._store is None else len(self._store.spool),
            awaiting_receipt=self._delivery.tracker.awaiting,
            waiting_for_slot=self._leases.waiting_for_slot,
            **({} if privacy is None else privacy.report().device_state_fields()),
        )

    def _set_status(self, status: DeviceStatus) -> None:
        self._status = status
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        self._wake.state_dirty.set()
        self._notifier.status(self._status_line())
        self._leases.poke()

    def _conditions(self) -> Conditions:
        return Conditions(
            eligible=self._eligible() and not self._budget_spent(),
            stopping=self._wake.stopping.is_set(),
            model_version=None if self._model is None else self._model.version,
            update_pending=self._store is not None and len(self._store.spool) > 0,
        )

    def _participation_changed(self) -> None:
        """A lease came or went, or the aggregator switched leases on or off."""
        self._wake.scheduler.set()
        self._wake.state_dirty.set()
        self._notifier.status(self._status_line())

    def _status_line(self) -> str:
        return status_line(
            status=self._status,
            model_version=None if self._model is None else self._model.version,
            connected=self._link.up(),
            spool_depth=0 if self._store is None else len(self._store.spool),
            updates_sent=self._counts.updates_sent,
            reasons=self._reasons(),
            awaiting_receipt=self._delivery.tracker.awaiting,
            waiting_for_slot=bool(self._leases.waiting_for_slot),
        )

    # ------------------------------------------------------------------ connection

    async def _connection_loop(self) -> None:
        store = self._durable
        while not self._wake.stopping.is_set():
            async with store.lock:
                self._link.session = await asyncio.to_thread(store.sessions.increment)
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
                if await _first(connected.wait(), self._wake.stopping.wait()) == 1:
                    return
                self._link.transport = transport
                self._counts.connections += 1
                if self._link.first_connected_at is None:
                    self._link.first_connected_at = self._delivery.clock()
                    self._wake.scheduler.set()
                self._mark_dirty()
                await self._serve(transport, reconnected)
            except* (TransportError, OSError) as group:
                failed = True
                log.warning(
                    "%s: connection session %d failed: %s",
                    self._device,
                    self._link.session,
                    group.exceptions[0],
                )
            except* Exception as group:  # a bug in a session task: log, reconnect after a pause
                failed = True
                log.error(
                    "%s: session %d ended by an error",
                    self._device,
                    self._link.session,
                    exc_info=group.exceptions[0],
                )
            finally:
                self._link.transport = None
                self._notifier.status(self._status_line())
                await self._close_transport(transport)
            if failed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.stopping.wait()

    async def _close_transport(self, transport: Transport) -> None:
        if self._wake.stopping.is_set() and transport.statistics().connected:
            self._status = DeviceStatus.OFFLINE
            with contextlib.suppress(TransportError, TimeoutError):
                async with asyncio.timeout(_OFFLINE_TIMEOUT):
                    await self._leases.withdraw(transport)
                    state = self._device_state(DeviceStatus.OFFLINE)
                    await transport.publish(self._state_topic, encode_msg(state), retain=True)
        with contextlib.suppress(TransportError):
            await transport.close()

    async def _serve(self, transport: Transport, reconnected: asyncio.Event) -> None:
        async def end_of_session() -> None:
            if await _first(self._wake.stopping.wait(), reconnected.wait()) == 1:
                log.info("%s: reconnected; starting a new presence session", self._device)
            raise _SessionEnded

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(end_of_session())
                tg.create_task(self._publish_states(transport))
                tg.create_task(self._receive(transport))
                tg.create_task(self._send_spool(transport))
                tg.create_task(self._leases.serve(transport))
        except* _SessionEnded:
            pass

    async def _publish_states(self, transport: Transport) -> None:
        while True:
            self._wake.state_dirty.clear()
            state = self._device_state(self._status)
            await transport.publish(self._state_topic, encode_msg(state), qos=1, retain=True)
            # Republish at least every heartbeat_s so a monitor can tell a silent device from a
            # healthy idle one even when no Last Will could be delivered (e.g. a broker restart).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.heartbeat_s):
                    await self._wake.state_dirty.wait()

    # ------------------------------------------------------------------ receiving models

    async def _receive(self, transport: Transport) -> None:
        mode = self.config.spool.receipts
        if mode is not ReceiptMode.OFF:
            await transport.subscribe(receipt_topic(self._fleet, self._device), qos=1)
        # The server state says whether the aggregator sends receipts ("auto") and whether it
        # grants training leases (protocol 1.2). It and the manifest are retained and every
        # connection subscribes afresh, so QoS 0 loses nothing for good (a copy dropped on the
        # way is replaced by the next one, or the retained one on reconnect) and spares the
        # broker a PUBACK per device per publication (a leasing aggregator republishes its
        # state up to once a second: 500 PUBACKs/s from 500 devices).
        await transport.subscribe(server_state_topic(self._fleet), qos=0)
        # A fetch that a previous connection started is dropped: the retained manifest comes
        # again on this subscription and starts a fresh one (chunks that went to the closed
        # connection would otherwise never come, and the device would wait for ever).
        self._fetch = None
        await transport.subscribe(manifest_topic(self._fleet), qos=0)
        await transport.subscribe(self._routes.partitions.assignment_topic, qos=0)  # retained, 1.3
        async for message in transport.messages():
            await self._handle(transport, message)

    def _reject(self, reason: RejectReason, detail: str) -> None:
        self._counts.rejected[reason.value] += 1
        log.warning("%s: rejected: %s: %s", self._device, reason.value, detail)

    async def _handle(self, transport: Transport, message: InboundMessage) -> None:
        if self._routes.partitions.handles(message.topic):  # a sharded tree's assignment (1.3)
            self._routes.partitions.on_message(message.payload, reject=self._reject)
            return
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
        elif isinstance(topic, ReceiptTopic) and topic.device_id == self._device:
            await self._on_receipt(topic, message.payload)
        elif isinstance(topic, ServerStateTopic):
            await self._on_server_state(topic, message.payload)
            await self._fetch_deferred(transport)
        elif isinstance(topic, LeaseTopic):
            self._leases.on_lease(topic, message.payload)
            await self._fetch_deferred(transport)
        else:
            self._reject(RejectReason.BAD_TOPIC, f"unexpected topic {message.topic}")

    async def _on_manifest(
        self, transport: Transport, topic: ModelManifestTopic, payload: bytes
    ) -> None:
        verifier = self._credentials.verifier
        manifest = verified(
            payload, ModelManifest, topic=topic, verifier=verifier, reject=self._reject
        )
        if manifest is None:
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
        self._deferred = (manifest, payload)
        await self._fetch_deferred(transport)

    def _wants_fetch(self) -> bool:
        return should_fetch(
            leases=self._leases.active,
            held_version=None if self._model is None else self._model.version,
            lease_version=self._leases.wanted_version(),
        )

    async def _fetch_deferred(self, transport: Transport) -> None:
        """Start fetching the newest manifest seen, when :func:`should_fetch` says so now (under
        leases a device fetches a new model only when a lease asks for it)."""
        if self._deferred is None or not self._wants_fetch():
            return
        manifest, payload = self._deferred
        self._deferred = None
        fetching = self._fetch.version if self._fetch is not None else -1
        held = self._model.version if self._model is not None else -1
        if manifest.version <= max(held, fetching):
            return
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
        store = self._durable
        async with store.lock:
            await asyncio.to_thread(store.models.install, model)
        self._model = model
        self._fetch = None
        self._counts.manifests_accepted += 1
        log.info("%s: now holding model v%d", self._device, model.version)
        self._mark_dirty()
        self._wake.scheduler.set()

    # ------------------------------------------------------------------ sending updates

    def _receipts_active(self) -> bool | None:
        """Whether sent updates wait for receipts: the configured mode, or with ``auto`` what
        the retained server state says (None until it was seen: keep them, to be safe)."""
        match self.config.spool.receipts:
            case ReceiptMode.ON:
                return True
            case ReceiptMode.OFF:
                return False
            case _:
                return self._delivery.server_receipts

    async def _send_spool(self, transport: Transport) -> None:
        store = self._durable
        spool = store.spool
        tracker = self._delivery.tracker
        max_packet = self.config.broker.max_packet
        # a new connection: resend what awaits, in order
        tracker.reconnected(self._delivery.clock())
        while True:
            self._wake.spool_changed.clear()
            spooled = [e.seq for e in spool.pending()]
            tracker.prune(spooled)
            for seq in tracker.due(spooled, self._delivery.clock()):
                try:
                    async with store.lock:
                        payload = await asyncio.to_thread(spool.read, seq)
                except SpoolCorrupt as exc:
                    tracker.forget(seq)
                    self._counts.dropped[DropReason.SPOOL_CORRUPT.value] += 1
                    log.error("%s: %s", self._device, exc)
                    continue
                except KeyError:
                    continue  # settled by a receipt meanwhile
                attempts = tracker.attempts(seq) + 1
                for topic, packet in self._packets(seq, payload, max_packet):
                    await transport.publish(topic, packet, qos=1)
                await self._delivered(seq, attempts, len(payload))
            next_due = tracker.next_due()
            wait = None if next_due is None else max(0.0, next_due - self._delivery.clock())
            await _first(self._wake.spool_changed.wait(), timeout=wait)

    def _packets(self, seq: int, payload: bytes, max_packet: int) -> list[tuple[str, bytes]]:
        """The publications of spooled update ``seq``: its UPDATE packets, or the two share
        envelopes of secure aggregation (:mod:`device_agent.secagg`). Every UPDATE packet of
        one send goes to one topic: the device's partition's when a sharded tree announced
        one (:mod:`device_agent.partition`), else the plain one."""
        if is_pair(payload):
            return pair_packets(self._fleet, self._device, seq, payload)
        topic = self._routes.partitions.update_topic(seq)  # one topic for all its chunks
        return [(topic, packet) for packet in packetize(payload, max_packet=max_packet)]

    async def _delivered(self, seq: int, attempts: int, size: int) -> None:
        """The broker acknowledged every packet of the ``attempts``-th send of update ``seq``:
        delete it (no receipts) or mark it awaiting its receipt (persisted, so a restart keeps
        it)."""
        store, tracker = self._durable, self._delivery.tracker
        keep = self._receipts_active() is not False
        async with store.lock:  # serialised with _on_receipt: both change spool and tracker
            if keep:
                still_there = await asyncio.to_thread(store.spool.mark_sent, seq, attempts)
            else:
                await asyncio.to_thread(store.spool.remove, seq)
                still_there = None
            if still_there is not None:
                tracker.sent(seq, self._delivery.clock())
            else:
                tracker.forget(seq)  # deleted (no receipts), or settled by a receipt meanwhile
        if attempts == 1:
            self._counts.updates_sent += 1
            log.info("%s: update %d delivered (%d B)", self._device, seq, size)
        else:
            self._counts.resends += 1
            log.info("%s: update %d sent again (send %d)", self._device, seq, attempts)
        self._mark_dirty()

    async def _on_receipt(self, topic: ReceiptTopic, payload: bytes) -> None:
        """Delete the spooled updates a receipt settles; resend at once those it shows this
        device missed a receipt for."""
        verifier = self._credentials.receipt_verifier
        receipt = verified(payload, Receipt, topic=topic, verifier=verifier, reject=self._reject)
        if receipt is None:
            return
        store = self._durable
        async with store.lock:  # serialised with _delivered
            effect = self._delivery.tracker.on_receipt(
                receipt, [e.seq for e in store.spool.pending()], self._delivery.clock()
            )
            for seq, (how, reason) in effect.settled.items():
                if how is Settlement.COMMITTED:
                    self._counts.receipted += 1
                    log.info("%s: update %d recorded by the aggregator", self._device, seq)
                else:
                    self._counts.receipt_rejected[reason or "unknown"] += 1
                    log.warning(
                        "%s: update %d refused by the aggregator: %s", self._device, seq, reason
                    )
            for seq in effect.settled:
                await asyncio.to_thread(store.spool.remove, seq)
        if effect.settled or effect.resend_now:
            self._mark_dirty()
            self._wake.spool_changed.set()

    async def _on_server_state(self, topic: ServerStateTopic, payload: bytes) -> None:
        """Leases: follow the aggregator's ``leases`` feature. ``auto`` receipts: follow its
        ``receipts`` feature; an aggregator without receipts: what awaits one is deleted, as its
        PUBACK would have done (protocol 1.0)."""
        state = verified(payload, ServerState, topic=topic, verifier=None, reject=self._reject)
        if state is None:
            return
        self._leases.on_server_state(state)
        self._routes.secagg.on_server_state(state)
        supports = FEATURE_RECEIPTS in state.features
        if self.config.spool.receipts is not ReceiptMode.AUTO:
            return
        if supports == self._delivery.server_receipts:
            return
        self._delivery.server_receipts = supports
        log.info("%s: the aggregator %s receipts", self._device, "sends" if supports else "has no")
        if supports:
            return
        store = self._durable
        async with store.lock:
            for mark in store.spool.awaiting():
                await asyncio.to_thread(store.spool.remove, mark.seq)
                self._delivery.tracker.forget(mark.seq)
        self._mark_dirty()

    # ------------------------------------------------------------------ eligibility

    async def _eligibility_loop(self) -> None:
        interval = self.config.probes.interval_s
        threads = float(self.config.training.max_threads)
        while not self._wake.stopping.is_set():
            self._wake.eligibility.clear()
            was_eligible, old_reasons = self._eligible(), self._reasons()
            try:
                snapshot = await self._eligibility.source.snapshot()
            except Exception:
                log.exception("%s: snapshot source failed", self._device)
                self._eligibility.probe_failed = True
            else:
                self._eligibility.probe_failed = False
                training = self._gate.active
                self._eligibility.monitor.update(snapshot, own_load=threads if training else 0.0)
            eligible = self._eligible()
            if self._gate.active and not eligible:
                log.info("%s: no longer eligible (%s)", self._device, ",".join(self._reasons()))
                self._gate.abort(AbortReason.INELIGIBLE)
            if eligible and not was_eligible:
                self._wake.scheduler.set()
            if self._status is DeviceStatus.ONLINE and not self._gate.active:
                self._set_status(DeviceStatus.IDLE)
            elif eligible != was_eligible or old_reasons != self._reasons():
                self._mark_dirty()
            # while training, re-check at least every few seconds so a broken condition (unplugged,
            # too hot, busy) gives the CPU back promptly even with a long probes.interval_s
            wait = min(interval, TRAINING_PROBE_INTERVAL) if self._gate.active else interval
            await _first(self._wake.stopping.wait(), self._wake.eligibility.wait(), timeout=wait)

    # ------------------------------------------------------------------ training

    def _wants_training(self) -> CurrentModel | None:
        model = self._model
        version = None if model is None else model.version
        if self._leases.active:
            wanted = should_train_leased(
                model_version=version,
                lease=self._leases.lease,
                eligible=self._eligible(),
                stopping=self._wake.stopping.is_set(),
                now=self._delivery.clock(),
            )
        else:
            wanted = should_train(
                model_version=version,
                trained_mark=self._durable.trained.value,
                eligible=self._eligible(),
                stopping=self._wake.stopping.is_set(),
            )
        if model is not None and wanted and self._work.privacy is not None:
            wanted = not self._work.privacy.refuses(model.version)  # local DP budget spent
        return model if wanted else None

    async def _scheduler_loop(self) -> None:
        while not self._wake.stopping.is_set():
            self._wake.scheduler.clear()
            undecided = undecided_wait(
                leases=self._leases.enabled,
                connected_at=self._link.first_connected_at,
                now=self._delivery.clock(),
                grace_s=SERVER_STATE_GRACE_S,
            )
            if undecided is not None:
                timeout = None if math.isinf(undecided) else undecided
                await _first(
                    self._wake.stopping.wait(), self._wake.scheduler.wait(), timeout=timeout
                )
                continue
            model = self._wants_training()
            if model is None:
                await _first(self._wake.stopping.wait(), self._wake.scheduler.wait())
                continue
            lease = self._leases.take() if self._leases.active else None
            try:
                await self._train(model, lease)
            finally:
                if lease is not None:
                    self._leases.done()

    async def _training_result(
        self, running: asyncio.Future[TrainResult | None]
    ) -> TrainResult | None:
        """The training's result; once the agent is stopping, at most ``STOP_GRACE_S`` more,
        then None. A trainer polls ``should_stop`` between batches, but a thread can be stuck
        where it cannot poll (importing torch takes seconds on a Pi): the agent stops anyway,
        and the abandoned thread's result is discarded when it ends."""
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._wake.stopping.wait())
        pending: set[asyncio.Future[Any]] = {running, stopping}
        try:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not running.done():
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    return await asyncio.shield(running)
            except TimeoutError:
                running.add_done_callback(_discard_result)
                log.info("%s: stopping without waiting for the training thread", self._device)
                return None
        return running.result()

    async def _mark_trained(self, version: int) -> None:
        """Never train on ``version`` (or older) again."""
        store = self._durable
        async with store.lock:
            await asyncio.to_thread(store.trained.set, version + 1)

    async def _train(self, model: CurrentModel, lease: HeldLease | None) -> None:
        """Train on ``model`` (under ``lease``, when the aggregator grants leases), then spool
        the update; an aborted training is counted by reason."""
        trainer = self._work.trainer
        assert trainer is not None
        assert self._work.dataset is not None
        lease_id = None if lease is None else lease.lease_id
        try:
            spec = _spec_for(model.manifest)
            job = training_job(
                model, spec, self.config.training, self._work.dataset, self._device, lease_id
            )
        except (EdgeflError, ValueError) as exc:
            log.error("%s: cannot train on model v%d: %s", self._device, model.version, exc)
            self._counts.aborted[AbortReason.ERROR.value] += 1
            await self._mark_trained(model.version)
            return
        result = await self._run_job(trainer, job, lease)
        late = lease is not None and self._leases.given_back(lease)
        if late and not isinstance(result, AbortReason):
            result = self._gate.reason or AbortReason.INELIGIBLE  # finished after the lease
        accuracy = None if isinstance(result, AbortReason) else result.global_accuracy
        sent = result if isinstance(result, AbortReason) else await self._privatized(result)
        if lease is not None:
            # the lease is used up now, before its update is spooled and sent: a withdrawal
            # from here on would release it on the aggregator before the update arrives (under
            # local DP the update is charged already: the next check-in knows the budget)
            self._leases.done()
        if isinstance(sent, AbortReason):
            reason = sent
            self._counts.aborted[reason.value] += 1
            log.info("%s: training on v%d aborted: %s", self._device, model.version, reason.value)
            if marks_version_done(reason):
                await self._mark_trained(model.version)
            return
        self._counts.trainings_completed += 1
        if accuracy is not None:  # kept on the device (sent only without local DP)
            self._counts.last_accuracy = min(1.0, max(0.0, accuracy))
        store = self._durable
        async with store.lock:
            await asyncio.to_thread(self._spool_result, model, sent, lease_id)
        self._mark_dirty()
        self._wake.spool_changed.set()

    async def _privatized(self, result: TrainResult) -> TrainResult | AbortReason:
        """Under local DP: ``result`` clipped and noised, its cost charged to the ledger (on
        disk before anything is spooled); a non-finite update is a failed training (``error``).
        Without local DP: ``result``."""
        privacy = self._work.privacy
        if privacy is None:
            return result
        try:
            noised, release = await asyncio.to_thread(privacy.privatize_result, result)
        except CodecError as exc:
            log.error("%s: cannot privatize the update: %s", self._device, exc)
            return AbortReason.ERROR
        store = self._durable
        async with store.lock:
            await asyncio.to_thread(privacy.charge, release)
        return noised

    async def _run_job(
        self, trainer: Trainer, job: TrainJob, lease: HeldLease | None
    ) -> TrainResult | AbortReason:
        """Run ``job`` in the executor until it returns, or it is asked to stop (an abort, its
        ``max_train_seconds``, the end of its lease): its result, or why there is none."""
        gate = self._gate
        gate.begin()
        self._counts.trainings_started += 1
        self._set_status(DeviceStatus.TRAINING)
        self._wake.eligibility.set()  # switch the eligibility loop to its training interval
        version = job.base_version
        log.info("%s: training on model v%d", self._device, version)
        deadline = time.monotonic() + self.config.training.max_train_seconds
        clock = self._delivery.clock

        def out_of_lease() -> bool:
            return lease is not None and lease_expired(lease, clock())

        def should_stop() -> bool:
            return gate.aborted() or time.monotonic() > deadline or out_of_lease()

        loop = asyncio.get_running_loop()
        result: TrainResult | None = None
        failed = False
        try:
            running = loop.run_in_executor(self._work.executor, trainer.train, job, should_stop)
            result = await self._training_result(running)
        except asyncio.CancelledError:
            gate.abort(AbortReason.STOPPING)
            raise
        except Exception:
            log.exception("%s: training on model v%d failed", self._device, version)
            failed = True
        finally:
            gate.end()
            self._set_status(DeviceStatus.IDLE)
        if result is not None:
            return result
        return abort_reason(
            failed=failed,
            requested=gate.reason,
            timed_out=time.monotonic() > deadline,
            lease_expired=out_of_lease(),
        )

    def _spool_result(self, model: CurrentModel, result: TrainResult, lease_id: int | None) -> None:
        """Encode, sign and spool one finished training (worker thread, under the I/O lock)."""
        store = self._durable
        manifest = model.manifest
        try:
            codec = codec_config_for(self.config.codec, manifest)
            residual = residual_from_bytes(store.residuals.load(), manifest.num_params)
            seq = store.spool.next_seq()
            meta = UpdateMeta(
                fleet=self._fleet,
                device_id=self._device,
                seq=seq,
                base_version=manifest.version,
                num_examples=result.num_examples,
                model=manifest.model,
                created_at=time.time(),
                lease_id=lease_id,
            )
            signer = self._credentials.signer
            if self._routes.secagg.required:  # two shares, not an UPDATE
                envelope = self._routes.secagg.build(result, meta, signer=signer)
                new_residual = None
            else:
                built = build_update(
                    result,
                    meta,
                    manifest=manifest,
                    codec=codec,
                    residual=residual,
                    rng=np.random.default_rng(),
                    signer=signer,
                )
                envelope, new_residual = built.envelope, built.residual
        except EdgeflError as exc:
            self._counts.dropped[DropReason.ENCODE_FAILED.value] += 1
            log.error("%s: cannot encode the update: %s", self._device, exc)
        else:
            try:
                store.spool.put(seq, envelope, {"base_version": manifest.version})
            except SpoolFull as exc:
                self._counts.dropped[DropReason.SPOOL_FULL.value] += 1
                log.error("%s: update dropped: %s", self._device, exc)
            else:
                if new_residual is not None:
                    store.residuals.save(new_residual.values.astype("<f4").tobytes())
                else:
                    store.residuals.clear()
                log.info(
                    "%s: update %d spooled (v%d, %d B, %d examples)",
                    self._device,
                    seq,
                    manifest.version,
                    len(envelope),
                    result.num_examples,
                )
        store.trained.set(model.version + 1)

    # ------------------------------------------------------------------ systemd watchdog

    async def _watchdog_loop(self) -> None:
        """``WATCHDOG=1`` every half ``WatchdogSec`` from the agent's event loop, until it stops
        (status lines are sent on change by ``_mark_dirty``)."""
        systemd = self._notifier.systemd
        period = watchdog_period(systemd)
        if period is None:
            return
        await _first(self._wake.stopping.wait(), keepalive(systemd, period))


def _discard_result(future: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned training's outcome, so asyncio does not report it as lost."""
    if not future.cancelled():
        future.exception()


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
