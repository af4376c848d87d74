"""The leader of secure aggregation as a service: ``edgefl aggregator --role leader``.

It owns the model, as the plaintext aggregator does, but never sees an update: it subscribes to
the fleet's masked shares (``secagg/share/+/+``) and to the helper's reports
(``secagg/report``), never to a sealed seed. Per message (acknowledged by :mod:`secagg_shell`
after :meth:`LeaderService.handle` returned, i.e. after the durable write):

* a masked share: weighed from its public metadata, as FedBuff weighs an update
  (``w = example_weight / cap · staleness(τ)``, ``τ`` = current version − ``base_version``,
  refused beyond ``max_staleness``) and turned into a public integer weight
  ``fixed_point_weight(w, weight_scale)``; held by :class:`~edgefl.secagg.SecAggLeader`;
* a seed report of the helper: marks the update complete (or excluded);
* a partial: combined with the leader's own sum and decoded (range-checked); the decoded
  weighted sum, divided by ``Σ w_i`` (``mean``) or ``K · weight_scale`` (``sum``), is the
  aggregate of a FedBuff step through the configured server optimizer. The step, the new
  version and the closing of the buffer are **one** SQLite transaction
  (:class:`~edgefl.aggregator.secagg_store.LeaderStore`); the new version is published after it;
* a refusal of the helper: the decision is aborted (members whose seeds the helper lacks are
  excluded, the rest go back to the queue).

After every change: a full buffer of complete updates becomes a decision, written, then
published on ``secagg/decision``; after a restart the open decision is published again (the
helper answers it with the same partial). Every tick: shares whose other half is overdue are
excluded (counted), a partly filled buffer is decided once its oldest complete update waited
``--flush-after`` seconds (with at least ``min_members``), and the retained server state is
refreshed; an open decision without an answer is published again every 30 s (the helper
answers a repeated decision with the same partial). A seq at or below the device's
highest accepted one is refused (``replay``) unless the role recognises it as a redelivery. With
``--device-keys`` every share must be signed by the device it names (``bad_signature``,
``unknown_device``).

With central DP (``--dp central:...``, :mod:`edgefl.secagg.privacy`): a share is refused before
the role when its device has an update held that is not combined yet (``dp_one_per_buffer``)
or took part in ``cap`` released buffers (``dp_budget_exhausted``); the decoded sum gets
``N(0, (z · W_max · C_q)² I)`` before the step; the step adds one participation per member,
written in the step's transaction; the server state's ``privacy`` and METRICS ``dp_*`` carry
the plaintext aggregator's figures (ε of the most frequent participant, ...).

The server state announces ``features = ("secagg", "receipts")`` and ``ServerState.secagg``
(the ring and the helper's public key, whose clip is the DP clip under DP); devices check that
key against their own configuration. With ``receipts`` (the default) the leader receipts each
share pair's final verdict after the write that made it durable
(:mod:`~edgefl.aggregator.secagg_receipts`). With ``--eval-dataset`` the plaintext
aggregator's held-out evaluation runs on its own thread (:func:`~edgefl.aggregator.evaluation.
start_on_loop`; torch is imported there only): each committed version is submitted after its
publication (latest wins), and its accuracy is written to the leader's ``history`` and shown as
METRICS ``accuracy``. Not here (docs/PRIVACY.md, "Not done yet"): leases, ``--until-accuracy``,
Prometheus. It publishes METRICS every ``metrics_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from edgefl.aggregation import (
    ExampleWeighting,
    FedBuff,
    FedBuffConfig,
    FedBuffState,
    Normalisation,
    NormBound,
)
from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.evaluation import Evaluator, start_on_loop
from edgefl.aggregator.publish import build_model_packets, clear_packets
from edgefl.aggregator.receipts import ReceiptQueue, ReceiptSender
from edgefl.aggregator.secagg_config import (
    SecAggSettings,
    check_compatible,
    read_key,
    share_authenticator,
)
from edgefl.aggregator.secagg_receipts import (
    LEADER_FINAL,
    exclusions,
    members,
    resend_verdict,
)
from edgefl.aggregator.secagg_shell import RoleShell
from edgefl.aggregator.secagg_store import LeaderStore, ModelRow
from edgefl.aggregator.service import central_privacy, initial_state, privacy_extra
from edgefl.aggregator.statelock import StateDirLock
from edgefl.errors import ProtocolError, RejectReason, UpdateRejected
from edgefl.protocol.envelope import decode_envelope
from edgefl.protocol.messages import (
    FEATURE_RECEIPTS,
    FEATURE_SECAGG,
    SecAggCoord,
    SecAggCoordKind,
    SecAggShareHeader,
    ServerMetrics,
    ServerState,
    ServerStatus,
    encode_message,
    message_from_envelope,
)
from edgefl.protocol.receipts import CommitOutcome, ReceiptBook
from edgefl.protocol.topics import (
    SecAggReportTopic,
    SecAggShareTopic,
    parse_topic,
    secagg_decision_topic,
    secagg_report_topic,
    secagg_shares_filter,
    server_metrics_topic,
    server_state_topic,
)
from edgefl.secagg import (
    AggregateResult,
    HelperPartial,
    LeaderConfig,
    LeaderPrivacy,
    LeaderSnapshot,
    SecAggError,
    SecAggLeader,
    SecAggReason,
    UpdateKey,
    load_helper_public_key,
)
from edgefl.secagg.weights import leader_weight
from edgefl.secagg.wire import (
    coord_decision,
    partial_from_coord,
    report_from_coord,
    secagg_info,
)
from edgefl.transport import InboundMessage, MqttTransport, Transport, Will

__all__ = ["LeaderService", "leader_state_path", "load_helper_public"]

log = logging.getLogger("edgefl.aggregator.secagg")

_STATE_EVERY_S = 5.0
_REPUBLISH_S = 30.0  # an open decision without a partial is published again this often


def leader_state_path(state_dir: Path) -> Path:
    return state_dir / "secagg-leader.sqlite"


def load_helper_public(path: Path) -> X25519PublicKey:
    """The helper's X25519 public key (PEM); ``ValueError`` with the path otherwise."""
    return read_key(path, load_helper_public_key, "X25519 public key")


def step_core(config: AggregatorConfig, state: FedBuffState | None = None) -> FedBuff:
    """The model's FedBuff, used for its server optimizer only: one dense aggregate per step
    (buffer of 1, weight 1, norm bound off, ``mean``), so ``a`` is the aggregate exactly."""
    fb = FedBuffConfig(
        buffer_size=1,
        max_staleness=None,
        example_weighting=ExampleWeighting.EQUAL,
        normalisation=Normalisation.MEAN,
        norm_bound=NormBound.off(),
        server_optimizer=config.aggregation.server_optimizer,
    )
    initial = initial_state(config) if state is None else state
    return FedBuff.restore(fb, initial)


@dataclass
class _Announced:
    """When the leader last published what it republishes on a timer (monotonic seconds), and
    the newest model version it published."""

    state_at: float = 0.0
    model_version: int | None = None
    decision_at: float = 0.0  # the open decision
    metrics: tuple[float, int] = field(default_factory=lambda: (time.monotonic(), 0))
    # ^ the last METRICS: when, and the combined-updates count then


class LeaderService:
    """See the module docstring. ``transport``: injected in tests (else MQTT from ``config``)."""

    def __init__(
        self,
        config: AggregatorConfig,
        settings: SecAggSettings,
        helper_public: X25519PublicKey,
        *,
        transport: Transport | None = None,
    ) -> None:
        check_compatible(config, settings)
        self._auth = share_authenticator(config)
        self.config = config
        self.settings = settings
        self._helper_public = helper_public
        self._given = transport
        self._transport: Transport | None = None
        self.spec = settings.ring(config.aggregation.buffer_size)
        self.privacy = None
        if config.aggregation.privacy is not None:
            self.privacy = LeaderPrivacy(
                config.aggregation.privacy,
                spec=self.spec,
                num_params=config.spec.num_params,
                w_max=settings.weight_scale,
            )
        self._role_config = LeaderConfig(
            spec=self.spec,
            num_params=config.spec.num_params,
            buffer_size=config.aggregation.buffer_size,
            w_max=settings.weight_scale,
            share_timeout=settings.share_timeout_s,
            memory=settings.memory,
            min_members=settings.min_members,
            noise=None if self.privacy is None else self.privacy.noise,
        )
        self.leader = SecAggLeader(self._role_config)
        self.core = step_core(config)
        self.created_at = time.time()
        self.refused: Counter[str] = Counter()  # shares refused before the role: by reason
        self._max_seq: dict[str, int] = {}
        self._store: LeaderStore | None = None
        self._session = 0
        self._started_at = time.time()
        self._announced = _Announced()
        self.shell = RoleShell(self)
        self.receipts: ReceiptSender | None = None  # with receipts, once run() connected
        self._receipt_book = ReceiptBook(
            config.fleet, signer=config.manifest_signer, final=LEADER_FINAL, through=False
        )
        self.evaluator: Evaluator | None = None  # with ``eval_dataset``, while run() runs
        self.last_accuracy: float | None = None  # the newest held-out accuracy measured

    def stop(self) -> None:
        self.shell.stop()

    @property
    def version(self) -> int:
        return self.core.version

    # ------------------------------------------------------------------ run
    async def run(self, ready: asyncio.Event | None = None) -> None:
        cfg = self.config
        lock = StateDirLock(cfg.state_dir)
        lock.acquire()
        store = LeaderStore(leader_state_path(cfg.state_dir), fsync=cfg.ingest.fsync)
        try:
            self._restore(store)
            self._start_evaluator()
            transport = self._given or MqttTransport(
                cfg.mqtt_config(
                    client_id=f"edgefl-secagg-leader-{cfg.fleet}",
                    will=Will(
                        server_state_topic(cfg.fleet),
                        encode_message(self._server_state(ServerStatus.LOST)),
                        qos=1,
                        retain=True,
                    ),
                )
            )
            async with transport:
                self._transport = transport
                await transport.subscribe(secagg_shares_filter(cfg.fleet), qos=1)
                await transport.subscribe(secagg_report_topic(cfg.fleet), qos=1)
                await self._publish_model()
                await self._publish_state(ServerStatus.ONLINE)
                if self.leader.open_decision is not None:  # the helper answers it again
                    await self._publish_decision()
                log.info("secagg leader for fleet %s serving version %d", cfg.fleet, self.version)
                if ready is not None:
                    ready.set()
                try:
                    await self._serve(transport)
                finally:
                    await self._publish_state(ServerStatus.OFFLINE)
        finally:
            if self.evaluator is not None:
                self.evaluator.stop()
            store.close()
            lock.release()

    def _start_evaluator(self) -> None:
        """With ``eval_dataset``: evaluate the version served, then each committed one; the
        results are recorded on the event loop (:meth:`_record_accuracy`)."""
        cfg = self.config
        if cfg.outputs.eval_dataset is None:
            return
        self.evaluator = start_on_loop(
            cfg.spec,
            cfg.outputs.eval_dataset,
            seed=cfg.seed,
            record=self._record_accuracy,
            version=self.version,
            weights=self.core.weights,
        )

    def _record_accuracy(self, version: int, accuracy: float) -> None:
        """An evaluation's result: METRICS ``accuracy`` from now on, and the version's row of
        the history (a result arriving after the store closed is dropped, as the plaintext
        aggregator's)."""
        self.last_accuracy = accuracy
        if self._store is not None:
            with contextlib.suppress(sqlite3.ProgrammingError):  # the store closed meanwhile
                self._store.set_accuracy(version, accuracy)

    async def _serve(self, transport: Transport) -> None:
        """The shell, and with receipts the task publishing them (the last ones queued are
        published before stopping; one not sent costs the device a resend)."""
        if not self.config.ingest.receipts:
            await self.shell.serve(transport)
            return
        self.receipts = ReceiptSender(ReceiptQueue(self.config.ingest.receipt_queue), transport)
        sending = asyncio.create_task(self.receipts.run(), name="edgefl-secagg-receipts")
        try:
            await self.shell.serve(transport)
            await asyncio.wait_for(self.receipts.queue.join(), timeout=5.0)
        except TimeoutError:
            log.warning("stopping with receipts unsent; devices will resend")
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending

    def _restore(self, store: LeaderStore) -> None:
        cfg = self.config
        store.check_identity(
            {
                "fleet": cfg.fleet,
                "model": cfg.spec.name,
                "bits": self.spec.bits,
                "scale": self.spec.scale,
                "role": "leader",
            }
        )
        self._session = store.next_session()
        snapshot, model = store.load()
        if snapshot is not None:
            self.leader = SecAggLeader.restore(self._role_config, snapshot)
        if model is not None:
            self.core = step_core(cfg, model.state)
            self.created_at = model.created_at
        self._max_seq = store.max_seqs()
        self.refused.update(store.refused())
        self.last_accuracy = store.last_accuracy()
        self._store = store
        fresh_privacy = self._restore_privacy(store, snapshot)
        if model is None or fresh_privacy:  # the initial version is durable before it is published
            self._write(snapshot, model=model is None, privacy=fresh_privacy)

    def _restore_privacy(self, store: LeaderStore, snapshot: LeaderSnapshot | None) -> bool:
        """Load central DP's participation counts; True when the file has none yet (a first
        start with DP: write them). A file holding shares accepted before DP was on is refused
        (``ValueError``): their devices were never admitted by the one-update rule."""
        if self.privacy is None:
            return False
        stored = store.privacy()
        if stored is not None:
            self.privacy.load(stored.participations)
            return False
        if snapshot is not None and (snapshot.pending or snapshot.open_shares):
            raise ValueError(
                f"{store.path} holds shares accepted before differential privacy was on; "
                "start DP with a new --state-dir"
            )
        return True

    # ------------------------------------------------------------------ RoleHandler
    async def handle(self, message: InboundMessage) -> None:
        topic = parse_topic(message.topic, expected_fleet=self.config.fleet)
        if isinstance(topic, SecAggShareTopic):
            self._on_share(topic, message.payload)
        elif isinstance(topic, SecAggReportTopic):
            await self._on_report(topic, message.payload)
        else:
            raise ProtocolError(RejectReason.BAD_TOPIC, f"not for the leader: {message.topic}")
        await self._decide()

    async def tick(self, now: float) -> None:
        before = self.leader.snapshot()
        if self.leader.expire(now):
            self._write(before)
            await self._decide()
        late = time.monotonic() - self._announced.decision_at >= _REPUBLISH_S
        if self.leader.open_decision is not None and late:  # lost on the way? (idempotent)
            await self._publish_decision()
        if self._flush_due(now):
            before = self.leader.snapshot()
            self.leader.decide(flush=True)
            self._write(before)
            await self._publish_decision()
        if time.monotonic() - self._announced.state_at >= _STATE_EVERY_S:
            await self._publish_state(ServerStatus.ONLINE)
        if time.monotonic() - self._announced.metrics[0] >= self.config.outputs.metrics_interval_s:
            await self._publish_metrics()

    # ------------------------------------------------------------------ shares
    def _on_share(self, topic: SecAggShareTopic, payload: bytes) -> None:
        cfg = self._role_config
        envelope = decode_envelope(payload, max_payload=self.spec.bytes_per_share(cfg.num_params))
        header = message_from_envelope(envelope, SecAggShareHeader, topic=topic)
        if (header.model, header.num_params, header.bits) != (
            self.config.spec.name,
            cfg.num_params,
            self.spec.bits,
        ):
            raise ProtocolError(RejectReason.SHAPE_MISMATCH, "share of another model or ring")
        before = self.leader.snapshot()
        if self._auth is not None:  # --device-keys: signed by the device it names
            try:
                self._auth.authenticate_share(header, payload)
            except UpdateRejected as exc:
                self._refuse(exc.reason, before)
                return
        key = (header.device_id, header.seq)
        held = {p.key for p in before.pending} | {k for k, _ in before.closed}
        if header.seq < self._max_seq.get(header.device_id, -1) and key not in held:
            self._refuse(RejectReason.REPLAY, before, key)
            return
        try:
            weight = self._weight(header)
            if self.privacy is not None and key not in held:  # (a redelivery: the role's)
                self.privacy.admit(header.device_id, held=self.leader.holds(header.device_id))
        except UpdateRejected as exc:
            self._refuse(exc.reason, before, key)
            return
        try:
            self.leader.receive_masked(key, bytes(envelope.payload), weight, time.time())
        except SecAggError as exc:
            log.debug("share %s refused: %s", key, exc)
            verdict = resend_verdict(before, key)
            if exc.reason is SecAggReason.BAD_SHARE:
                verdict = CommitOutcome(key[0], key[1], exc.reason)
            self._write(before, outcomes=[] if verdict is None else [verdict])
            return
        seq = max(self._max_seq.get(header.device_id, -1), header.seq)
        self._max_seq[header.device_id] = seq
        self._write(before, device_seq=(header.device_id, seq))

    def _weight(self, header: SecAggShareHeader) -> int:
        """FedBuff's weight of the update, normalised to at most 1, in fixed point."""
        cfg = self.config
        if header.base_version > self.version:
            raise UpdateRejected(RejectReason.FUTURE_VERSION, f"base {header.base_version}")
        tau = self.version - header.base_version
        if cfg.aggregation.max_staleness is not None and tau > cfg.aggregation.max_staleness:
            raise UpdateRejected(RejectReason.STALE, f"staleness {tau}")
        return leader_weight(
            header.num_examples,
            tau,
            weighting=cfg.aggregation.example_weighting,
            cap=cfg.aggregation.example_cap,
            staleness=cfg.staleness_weight(),
            weight_scale=self.settings.weight_scale,
        )

    def _refuse(
        self, reason: RejectReason, before: LeaderSnapshot, key: UpdateKey | None = None
    ) -> None:
        """Count a refusal before the role; receipt it for ``key`` (when authenticated, and
        final: :data:`LEADER_FINAL`)."""
        self.refused[reason.value] += 1
        outcomes = [] if key is None else [CommitOutcome(key[0], key[1], reason)]
        self._write(before, outcomes=outcomes)

    # ------------------------------------------------------------------ helper's messages
    async def _on_report(self, topic: SecAggReportTopic, payload: bytes) -> None:
        cfg = self._role_config
        envelope = decode_envelope(payload, max_payload=self.spec.bytes_per_share(cfg.num_params))
        msg = message_from_envelope(envelope, SecAggCoord, topic=topic)
        before = self.leader.snapshot()
        if msg.what is SecAggCoordKind.REPORT:
            try:
                self.leader.helper_report(report_from_coord(msg), time.time())
            except SecAggError as exc:
                log.debug("seed report refused: %s", exc)
            self._write(before)
        elif msg.what is SecAggCoordKind.PARTIAL:
            await self._combine(before, partial_from_coord(msg, envelope.payload))
        elif msg.what is SecAggCoordKind.REFUSAL:
            self._on_refusal(before, msg)

    def _on_refusal(self, before: LeaderSnapshot, msg: SecAggCoord) -> None:
        open_decision = self.leader.open_decision
        if open_decision is None or open_decision.buffer_id != msg.buffer_id:
            return  # about a buffer already closed: nothing to undo
        # missing seeds: exclude those, queue the rest again. Any other refusal (a helper with
        # another min_members, a member it already summed) would refuse the same members
        # again at once: exclude them all rather than loop (counted, logged as an error)
        missing = frozenset(msg.missing)
        if not missing:
            log.error(
                "helper refused decision %s (%s): its updates are excluded",
                msg.buffer_id,
                msg.reason,
            )
            missing = frozenset(open_decision.members)
        else:
            log.warning("helper lacks seeds of decision %s: %s", msg.buffer_id, sorted(missing))
        self.leader.abort(missing)
        self._write(before)

    async def _combine(self, before: LeaderSnapshot, partial: HelperPartial) -> None:
        try:
            result = self.leader.combine(partial)
        except SecAggError as exc:
            if exc.reason is not SecAggReason.STALE_DECISION:
                log.error("buffer %d lost: %s", partial.buffer_id, exc)
            self._write(before)  # (an overflow's members: receipted as excluded)
            return
        if self.privacy is not None:
            self.privacy.release(result.decision)
        self._step(result)
        self._write(
            before,
            model=True,
            privacy=self.privacy is not None,
            outcomes=members(result.decision),
        )
        await self._publish_model()
        await self._publish_state(ServerStatus.ONLINE)
        if self.evaluator is not None:
            self.evaluator.submit(self.version, self.core.weights)

    def _step(self, result: AggregateResult) -> None:
        """One FedBuff step with the decoded aggregate (see the module docstring)."""
        if self.config.aggregation.normalisation is Normalisation.MEAN:
            divisor = float(result.weight_sum)
        else:
            divisor = float(self.config.aggregation.buffer_size * self.settings.weight_scale)
        aggregate = (result.total / divisor).astype(np.float32)
        self.core.add(aggregate, base_version=self.core.version, num_examples=1)
        self.core.step()
        self.created_at = time.time()
        log.info(
            "version %d from buffer %d (%d updates)",
            self.version,
            result.decision.buffer_id,
            len(result.decision.members),
        )

    # ------------------------------------------------------------------ decisions
    def _flush_due(self, now: float) -> bool:
        """A partly filled buffer is decided when its oldest complete update's share arrived
        ``participation.flush_after_s`` ago (the plaintext aggregator's ``--flush-after``) and
        it holds at least ``min_members`` complete updates (the helper refuses fewer)."""
        part = self.config.participation
        after = None if part is None else part.flush_after_s
        if after is None or self.leader.open_decision is not None:
            return False
        snap = self.leader.snapshot()
        if len(snap.complete) < self.settings.min_members:
            return False
        arrived = {p.key: p.arrived for p in snap.pending}
        return now - min(arrived[k] for k in snap.complete) >= after

    async def _decide(self) -> None:
        if not self.leader.ready:
            return
        before = self.leader.snapshot()
        self.leader.decide()
        self._write(before)
        await self._publish_decision()

    async def _publish_decision(self) -> None:
        decision = self.leader.open_decision
        assert decision is not None
        self._announced.decision_at = time.monotonic()
        msg = coord_decision(self.config.fleet, decision, time.time())
        await self._publish(secagg_decision_topic(self.config.fleet), encode_message(msg))

    # ------------------------------------------------------------------ durability
    def _write(
        self,
        before: LeaderSnapshot | None,
        *,
        model: bool = False,
        device_seq: tuple[str, int] | None = None,
        privacy: bool = False,
        outcomes: list[CommitOutcome] | None = None,
    ) -> None:
        """Write the role's change since ``before`` (with the model, a device's highest seq,
        central DP's counts when asked) and the refusal counters, in one transaction; then
        queue the receipts of ``outcomes`` and of the updates the change excluded
        (:mod:`~edgefl.aggregator.secagg_receipts`)."""
        assert self._store is not None, "run() opens the store before any message"
        row = None
        if model:
            row = ModelRow(self.version, self.created_at, self.core.snapshot(buffer=False))
        counts = self.privacy.state() if privacy and self.privacy is not None else None
        after = self.leader.snapshot()
        self._store.write(
            before,
            after,
            model=row,
            device_seq=device_seq,
            refused=self.refused,
            privacy=counts,
        )
        if self.receipts is not None:  # only now: the verdicts are durable
            verdicts = [*(outcomes or ()), *exclusions(before, after)]
            if verdicts:
                self.receipts.queue.put(self._receipt_book.receipts(verdicts, now=time.time()))

    # ------------------------------------------------------------------ publishing
    async def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert self._transport is not None
        await self._transport.publish(topic, payload, qos=1, retain=retain)

    async def _publish_model(self) -> None:
        """The current version: retained chunks, then the manifest; the chunks of the version
        before the previous one are cleared."""
        cfg, version = self.config, self.version
        if self._announced.model_version == version:
            return
        packets = build_model_packets(
            fleet=cfg.fleet,
            spec=cfg.spec,
            version=version,
            weights=self.core.weights,
            created_at=self.created_at,
            hints=cfg.training_hints(),
            max_packet=cfg.limits.max_packet,
            signer=cfg.manifest_signer,
        )
        for topic, payload in packets.chunks:
            await self._publish(topic, payload, retain=True)
        await self._publish(packets.manifest_topic, packets.manifest, retain=True)
        if version >= 2:
            for topic in clear_packets(cfg.fleet, version - 2, "weights", packets.num_chunks):
                await self._publish(topic, b"", retain=True)
        self._announced.model_version = version

    async def _publish_state(self, status: ServerStatus) -> None:
        self._announced.state_at = time.monotonic()
        state = encode_message(self._server_state(status))
        await self._publish(server_state_topic(self.config.fleet), state, retain=True)

    async def _publish_metrics(self) -> None:
        """METRICS on ``server/metrics`` (QoS 0): ``received`` every share the leader saw,
        ``applied`` the updates combined into a step, ``rejected`` by reason, ``accuracy`` the
        newest held-out accuracy (``--eval-dataset``; None before); ``extra`` the
        role's own figures (``secagg_pending``, ``secagg_complete``, the open decision)."""
        now = time.monotonic()
        stats = self.leader.statistics()
        then, combined_then = self._announced.metrics
        rate = max(0.0, (stats["combined"] - combined_then) / max(now - then, 1e-9))
        self._announced.metrics = (now, stats["combined"])
        state = self._server_state(ServerStatus.ONLINE)
        decision = self.leader.open_decision
        metrics = ServerMetrics(
            fleet=self.config.fleet,
            at=time.time(),
            version=self.version,
            buffer_fill=state.buffer_fill,
            buffer_size=state.buffer_size,
            received=stats["accepted"] + sum(state.rejected.values()),
            applied=stats["combined"],
            updates_per_s=rate,
            rejected=state.rejected,
            accuracy=self.last_accuracy,
            extra={
                "secagg_pending": stats["pending"],
                "secagg_complete": stats["complete"],
                "secagg_open_decision": None if decision is None else decision.buffer_id,
                "session": self._session,
                **privacy_extra(None if self.privacy is None else self.privacy.statistics()),
            },
        )
        topic = server_metrics_topic(self.config.fleet)
        assert self._transport is not None
        await self._transport.publish(topic, encode_message(metrics), qos=0)

    def _server_state(self, status: ServerStatus) -> ServerState:
        stats = self.leader.statistics()
        rejected = {k: v for k, v in stats.items() if k.startswith("secagg_") and v}
        rejected.update(self.refused)
        return ServerState(
            fleet=self.config.fleet,
            status=status,
            session=self._session,
            version=self.version,
            buffer_fill=min(stats["complete"], self.config.aggregation.buffer_size),
            buffer_size=self.config.aggregation.buffer_size,
            applied=stats["combined"],
            started_at=self._started_at,
            at=time.time(),
            rejected=rejected,
            features=(FEATURE_SECAGG, FEATURE_RECEIPTS)
            if self.config.ingest.receipts
            else (FEATURE_SECAGG,),
            secagg=secagg_info(self.spec, self._helper_public),
            privacy=None if self.privacy is None else central_privacy(self.privacy.statistics()),
        )

    def statistics(self) -> dict[str, int]:
        """The role's counters plus the refusals before it (for tests and logs)."""
        return {**self.leader.statistics(), **self.refused, **self._receipt_counts()}

    def _receipt_counts(self) -> dict[str, int]:
        sender = self.receipts
        if sender is None:
            return {}
        return {"receipts_sent": sender.sent, "receipts_dropped": sender.queue.dropped}
