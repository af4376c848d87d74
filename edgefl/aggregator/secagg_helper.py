"""The helper of secure aggregation as a service: ``edgefl aggregator --role helper``.

Subscribes to the fleet's sealed seeds (``secagg/seed/+/+``) and to the leader's decisions
(``secagg/decision``), never to a masked share. Per message (:mod:`secagg_shell` acknowledges
it after :meth:`HelperService.handle` returned):

* a sealed seed: open and hold it (:meth:`SecAggHelper.receive_sealed`), write the change to
  ``secagg-helper.sqlite`` (the seed stays sealed at rest), then publish the seed report. A
  redelivery of the same bytes re-reports ok, so a crash anywhere loses no report;
* a decision: the partial sum (:meth:`SecAggHelper.apply`), written (answered decision, the
  superseded and dropped seeds deleted), then published; a refused decision is answered with a
  ``refusal`` (``missing`` seeds for the leader's ``abort``); a stale one is ignored;
* every tick: seeds no decision claimed within ``seed_timeout_s`` are deleted (counted).

With ``--device-keys`` a seed must be signed by the device it names; refused messages (and
undecodable ones) are counted by reason in :attr:`RoleShell.rejected` and acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.secagg_config import SecAggSettings, read_key, share_authenticator
from edgefl.aggregator.secagg_shell import RoleShell
from edgefl.aggregator.secagg_store import HelperStore
from edgefl.aggregator.statelock import StateDirLock
from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.envelope import decode_envelope
from edgefl.protocol.messages import (
    SecAggCoord,
    SecAggSeedHeader,
    decode_message,
    encode_message,
    message_from_envelope,
)
from edgefl.protocol.topics import (
    SecAggDecisionTopic,
    SecAggSeedTopic,
    parse_topic,
    secagg_decision_topic,
    secagg_report_topic,
    secagg_seeds_filter,
)
from edgefl.secagg import (
    SEALED_SIZE,
    HelperConfig,
    HelperKeys,
    HelperSnapshot,
    MissingSeeds,
    SecAggError,
    SecAggHelper,
    SecAggReason,
)
from edgefl.secagg.wire import coord_partial, coord_refusal, coord_report, decision_from_coord
from edgefl.transport import InboundMessage, MqttTransport, Transport

__all__ = ["HelperService", "helper_state_path", "load_helper_keys"]

log = logging.getLogger("edgefl.aggregator.secagg")


def helper_state_path(state_dir: Path) -> Path:
    return state_dir / "secagg-helper.sqlite"


def load_helper_keys(path: Path) -> HelperKeys:
    """The helper's X25519 private key (PEM); ``ValueError`` with the path otherwise."""
    return read_key(path, HelperKeys.from_pem, "X25519 private key")


class HelperService:
    """See the module docstring. ``transport``: injected in tests (else MQTT from ``config``)."""

    def __init__(
        self,
        config: AggregatorConfig,
        settings: SecAggSettings,
        keys: HelperKeys,
        *,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self._keys = keys
        self._auth = share_authenticator(config)
        self._given = transport
        self._transport: Transport | None = None
        spec = settings.ring(config.aggregation.buffer_size)
        self._role_config = HelperConfig(
            spec=spec,
            num_params=config.spec.num_params,
            fleet=config.fleet,
            model=config.spec.name,
            seed_timeout=settings.seed_timeout_s,
            min_members=settings.min_members,
        )
        self.helper = SecAggHelper(self._role_config, keys)
        self._store: HelperStore | None = None
        self.shell = RoleShell(self)

    def stop(self) -> None:
        self.shell.stop()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        cfg = self.config
        lock = StateDirLock(cfg.state_dir)
        lock.acquire()
        store = HelperStore(helper_state_path(cfg.state_dir), fsync=cfg.ingest.fsync)
        try:
            spec = self._role_config.spec
            store.check_identity(
                {"fleet": cfg.fleet, "model": cfg.spec.name, "bits": spec.bits, "role": "helper"}
            )
            snapshot = store.load()
            if snapshot is not None:
                self.helper = SecAggHelper.restore(self._role_config, self._keys, snapshot)
            self._store = store
            transport = self._given or MqttTransport(
                cfg.mqtt_config(client_id=f"edgefl-secagg-helper-{cfg.fleet}")
            )
            async with transport:
                self._transport = transport
                await transport.subscribe(secagg_seeds_filter(cfg.fleet), qos=1)
                await transport.subscribe(secagg_decision_topic(cfg.fleet), qos=1)
                log.info("secagg helper for fleet %s serving", cfg.fleet)
                if ready is not None:
                    ready.set()
                await self.shell.serve(transport)
        finally:
            store.close()
            lock.release()

    # ------------------------------------------------------------------ RoleHandler
    async def handle(self, message: InboundMessage) -> None:
        topic = parse_topic(message.topic, expected_fleet=self.config.fleet)
        if isinstance(topic, SecAggSeedTopic):
            await self._on_seed(topic, message.payload)
        elif isinstance(topic, SecAggDecisionTopic):
            await self._on_decision(topic, message.payload)
        else:
            raise ProtocolError(RejectReason.BAD_TOPIC, f"not for the helper: {message.topic}")

    async def tick(self, now: float) -> None:
        before = self.helper.snapshot()
        if self.helper.expire(now):
            self._write(before)

    # ------------------------------------------------------------------ messages
    async def _on_seed(self, topic: SecAggSeedTopic, payload: bytes) -> None:
        envelope = decode_envelope(payload, max_payload=SEALED_SIZE)
        header = message_from_envelope(envelope, SecAggSeedHeader, topic=topic)
        cfg = self._role_config
        if (header.model, header.num_params, header.bits) != (
            cfg.model,
            cfg.num_params,
            cfg.spec.bits,
        ):
            raise ProtocolError(RejectReason.SHAPE_MISMATCH, "seed of another model or ring")
        if self._auth is not None:  # --device-keys: signed by the device it names
            self._auth.authenticate_share(header, payload)  # UpdateRejected: counted, dropped
        before = self.helper.snapshot()
        key = (header.device_id, header.seq)
        report = self.helper.receive_sealed(key, bytes(envelope.payload), time.time())
        self._write(before)
        if report is not None:
            msg = coord_report(self.config.fleet, report, time.time())
            await self._publish(secagg_report_topic(self.config.fleet), encode_message(msg))

    async def _on_decision(self, topic: SecAggDecisionTopic, payload: bytes) -> None:
        decision = decision_from_coord(decode_message(payload, SecAggCoord, topic=topic))
        fleet = self.config.fleet
        before = self.helper.snapshot()
        try:
            partial = self.helper.apply(decision)
        except MissingSeeds as exc:
            self._write(before)
            refusal = coord_refusal(fleet, decision.buffer_id, exc.reason, time.time(), exc.missing)
            await self._publish(secagg_report_topic(fleet), encode_message(refusal))
            return
        except SecAggError as exc:
            self._write(before)
            if exc.reason is SecAggReason.STALE_DECISION:
                log.info("ignored stale decision %d", decision.buffer_id)
                return
            log.warning("refused decision %d: %s", decision.buffer_id, exc)
            refusal = coord_refusal(fleet, decision.buffer_id, exc.reason, time.time())
            await self._publish(secagg_report_topic(fleet), encode_message(refusal))
            return
        self._write(before)
        msg = coord_partial(fleet, partial, time.time())
        await self._publish(secagg_report_topic(fleet), encode_message(msg, partial.total))

    def _write(self, before: HelperSnapshot) -> None:
        assert self._store is not None, "run() opens the store before any message"
        self._store.write(before, self.helper.snapshot())

    async def _publish(self, topic: str, payload: bytes) -> None:
        assert self._transport is not None
        await self._transport.publish(topic, payload, qos=1)
