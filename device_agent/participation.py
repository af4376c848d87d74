"""The agent's side of server-controlled participation (protocol 1.2, PROTOCOL.md §4.7): an
asyncio shell around the sans-IO rules of :mod:`device_agent.training_policy`.

When the aggregator's retained ``ServerState`` lists the ``leases`` feature
(:func:`~device_agent.training_policy.leases_required`), a device trains only under a lease:

* **check in** — eligible, holding a model and not training, it publishes
  ``CheckIn(available=True, model_version)`` (QoS 1 on ``device/<id>/checkin``, signed with the
  device key when it has one) and renews it every ``checkin_ttl_s / 2``; meanwhile its device
  state says ``waiting_for_slot``;
* **lease** — a ``Lease`` on ``device/<id>/lease`` (verified against the aggregator's key when
  the device has it; one for another device is ignored) is held with a local deadline
  ``monotonic() + ttl_s``; the agent's scheduler trains once under it
  (:func:`~device_agent.training_policy.should_train_leased`) and then checks in again;
* **withdraw** — a candidate or lease holder that turns ineligible, or stops, publishes
  ``CheckIn(available=False)``: the aggregator frees the slot at once.

Without the feature nothing here publishes anything and the agent trains once per version, as
with protocol 1.1 aggregators. :class:`LeaseClient` holds the state; :meth:`LeaseClient.serve`
is the per-connection check-in task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from device_agent.persist import PersistentInt
from device_agent.training_policy import (
    CheckInAction,
    HeldLease,
    Presence,
    Resync,
    check_in_action,
    lease_expired,
    leases_mode,
    renew_interval,
    resync_action,
)
from edgefl.auth import EnvelopeSigner, ManifestVerifier
from edgefl.errors import EdgeflError, RejectReason
from edgefl.protocol.messages import (
    CheckIn,
    Lease,
    M,
    Participation,
    ServerState,
    ServerStatus,
    decode_message,
)
from edgefl.protocol.messages import encode_message as encode_msg
from edgefl.protocol.topics import LeaseTopic, ParsedTopic, checkin_topic, lease_topic
from edgefl.transport import Transport

__all__ = ["Conditions", "LeaseClient", "LeaseKeys", "ParticipationStatistics", "verified"]

log = logging.getLogger("device_agent")

Reject = Callable[[RejectReason, str], None]


def verified(
    payload: bytes,
    cls: type[M],
    *,
    topic: ParsedTopic,
    verifier: ManifestVerifier | None,
    reject: Reject,
) -> M | None:
    """The ``cls`` message of ``payload`` on ``topic``, its signature checked by ``verifier``
    when there is one; None (and ``reject(reason, detail)``) when it fails either."""
    try:
        if verifier is not None:
            verifier.verify(payload)
        return decode_message(payload, cls, topic=topic)
    except EdgeflError as exc:
        what = cls.__name__.lower()
        reject(exc.reason, f"{what}: {exc.detail}")
        return None


class LeaseKeys(Protocol):
    """The agent's keys as the lease client reads them (loaded once the agent runs)."""

    @property
    def signer(self) -> EnvelopeSigner | None: ...

    @property
    def lease_verifier(self) -> ManifestVerifier | None: ...


@dataclass(frozen=True, slots=True)
class Conditions:
    """What the check-in rule needs to know of the agent right now."""

    eligible: bool
    stopping: bool
    model_version: int | None
    update_pending: bool = False  # a spooled update not yet settled (its lease is held for it)


@dataclass(frozen=True)
class ParticipationStatistics:
    """Counters since the agent started; ``leases`` None until the server state was seen."""

    leases: bool | None = None
    presence: str = Presence.IDLE.value
    check_ins: int = 0  # CheckIn(available=True) published (first ones and renewals)
    withdrawals: int = 0  # CheckIn(available=False) published
    leases_received: int = 0
    leases_ignored: dict[str, int] = field(default_factory=dict)  # by reason
    leases_unused: int = 0  # expired before a training could start (waiting for the model)
    lease_id: int | None = None  # the lease held now


@dataclass(frozen=True, slots=True)
class _Hooks:
    """What the lease client calls back in the agent."""

    conditions: Callable[[], Conditions]
    on_change: Callable[[], None]  # a lease came or went, the mode or the presence changed
    reject: Reject  # an inbound message refused, by reason


class LeaseClient:
    """See the module docstring. One per agent; not thread-safe (the agent's event loop)."""

    def __init__(
        self,
        fleet: str,
        device: str,
        *,
        keys: LeaseKeys,
        conditions: Callable[[], Conditions],
        on_change: Callable[[], None],
        reject: Reject,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fleet, self._device, self._keys, self.clock = fleet, device, keys, clock
        self._hooks = _Hooks(conditions, on_change, reject)
        self.enabled: bool | None = None  # None: the server state was not seen yet
        self._settings: Participation | None = None
        self.presence = Presence.IDLE
        self.lease: HeldLease | None = None  # held and not yet trained under
        self.training: HeldLease | None = None  # the lease the running training is under
        self._given_back: int | None = None  # the id of a training's lease a withdrawal released
        self._renew_at: float | None = None
        self._withdrawn = False  # withdrew, and has not checked in since
        self._server_session: int | None = None
        self._resync = False  # a new connection or aggregator session: see resync_action
        self._wake = asyncio.Event()
        self._remembered: PersistentInt | None = None
        self._counts: Counter[str] = Counter()  # and "ignored:<reason>" for leases not taken

    # ------------------------------------------------------------------ queries

    @property
    def active(self) -> bool:
        """The aggregator grants leases: train only under one."""
        return bool(self.enabled)

    @property
    def waiting_for_slot(self) -> bool | None:
        """For the device state: None without leases, else whether the device is a candidate."""
        return None if not self.active else self.presence is Presence.CHECKED_IN

    def statistics(self) -> ParticipationStatistics:
        c = self._counts
        return ParticipationStatistics(
            leases=self.enabled,
            presence=self.presence.value,
            check_ins=c["check_ins"],
            withdrawals=c["withdrawals"],
            leases_received=c["leases"],
            leases_ignored={
                k.removeprefix("ignored:"): n for k, n in c.items() if k.startswith("ignored:")
            },
            leases_unused=c["unused"],
            lease_id=None if self.lease is None else self.lease.lease_id,
        )

    # ------------------------------------------------------------------ events

    def remember_in(self, path: Path, *, durable: bool) -> None:
        """Keep whether the aggregator grants leases in ``path`` (0 unknown, 1 no, 2 yes), and
        start from what it says: a restarted agent must not train on a model it holds before
        the aggregator's retained state arrives, when the aggregator requires leases
        (blocking; called while the agent opens its state directory)."""
        self._remembered = PersistentInt(path, durable=durable)
        if self.enabled is None and self._remembered.value in (1, 2):
            self.enabled = self._remembered.value == 2

    def poke(self) -> None:
        """Something the check-in rule reads changed (eligibility, model, training)."""
        self._wake.set()

    def on_server_state(self, state: ServerState) -> None:
        """Follow the aggregator's ``leases`` feature (and its check-in lifetime)."""
        enabled = leases_mode(state, self.enabled)  # a stopped or lost aggregator: as we are
        if state.status is ServerStatus.ONLINE:
            self._settings = state.participation if enabled else None
            known, self._server_session = self._server_session, state.session
            self._resync |= known is not None and known != state.session
        if enabled != self.enabled:
            log.info(
                "%s: the aggregator %s training leases",
                self._device,
                "grants" if enabled else "does not grant",
            )
            self.enabled = enabled
            if self._remembered is not None:
                self._remembered.set(2 if enabled else 1)
            if not enabled:
                self.presence, self.lease = Presence.IDLE, None
            self._hooks.on_change()  # the scheduler's rule changed
        self.poke()

    def on_lease(self, topic: LeaseTopic, payload: bytes) -> None:
        """A lease for this device: hold it until its local deadline, wake the scheduler."""
        if topic.device_id != self._device:
            self._counts["ignored:other_device"] += 1
            return
        verifier = self._keys.lease_verifier
        lease = verified(payload, Lease, topic=topic, verifier=verifier, reject=self._hooks.reject)
        if lease is None:
            return
        if lease.fleet != self._fleet:
            self._counts["ignored:other_fleet"] += 1
            return
        if self._withdrawn and self.presence is Presence.IDLE:
            # granted before the aggregator saw the withdrawal, which released it: an update
            # under it would be refused (NO_LEASE)
            self._counts["ignored:withdrawn"] += 1
            return
        self.lease = HeldLease(lease.lease_id, lease.version, self.clock() + lease.ttl_s)
        self.presence, self._renew_at = Presence.LEASED, None
        self._counts["leases"] += 1
        log.info(
            "%s: lease %d (model v%d or newer, %.0f s)",
            self._device,
            lease.lease_id,
            lease.version,
            lease.ttl_s,
        )
        self._hooks.on_change()
        self.poke()

    def wanted_version(self) -> int | None:
        """The model version the held lease asks for (None: no lease held)."""
        return None if self.lease is None else self.lease.version

    def take(self) -> HeldLease | None:
        """A training starts under the held lease (None: no lease); it is used up."""
        lease, self.lease = self.lease, None
        self.training = lease
        return lease

    def given_back(self, lease: HeldLease) -> bool:
        """Whether a withdrawal released ``lease`` while a training ran under it: the
        aggregator would refuse its update (``no_lease``), even if the training finished."""
        return self._given_back == lease.lease_id

    def done(self) -> None:
        """A training under a lease ended (an update, or none): check in again when eligible,
        unless a newer lease arrived meanwhile."""
        self.training = None
        if self.lease is None and self.presence is Presence.LEASED:
            self.presence = Presence.IDLE
        self.poke()

    # ------------------------------------------------------------------ publishing

    async def serve(self, transport: Transport) -> None:
        """The check-in task of one connection: subscribe to the lease topic, then check in,
        renew and withdraw as :func:`~device_agent.training_policy.check_in_action` says."""
        await transport.subscribe(lease_topic(self._fleet, self._device), qos=1)
        self._resync = True
        while True:
            self._wake.clear()
            if self.active:
                await self._step(transport)
            wait = self._next_wake()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _step(self, transport: Transport) -> None:
        cond = self._hooks.conditions()
        if self._resync:
            self._resync = False
            resync = resync_action(
                presence=self.presence, reconnected=True, update_pending=cond.update_pending
            )
            if resync is Resync.REJOIN:
                await self.withdraw(transport)  # then check in again, below
            elif resync is Resync.RENEW:
                self._renew_at = None
        now = self.clock()
        if self.lease is not None and lease_expired(self.lease, now):
            log.info("%s: lease %d expired unused", self._device, self.lease.lease_id)
            self.lease, self.presence = None, Presence.IDLE
            self._counts["unused"] += 1
        action = check_in_action(
            presence=self.presence,
            eligible=cond.eligible,
            stopping=cond.stopping,
            has_model=cond.model_version is not None,
            renew_due=self._renew_at is None or now >= self._renew_at,
        )
        if action is CheckInAction.CHECK_IN:
            await self._publish(transport, available=True, model_version=cond.model_version)
            self.presence, self._withdrawn = Presence.CHECKED_IN, False
            ttl = self._settings.checkin_ttl_s if self._settings is not None else 60.0
            self._renew_at = now + renew_interval(ttl)
            self._hooks.on_change()  # the device state now says waiting_for_slot
        elif action is CheckInAction.WITHDRAW:
            await self.withdraw(transport)

    def _next_wake(self) -> float | None:
        """Seconds until a renewal or a lease's deadline is due (None: only on a poke)."""
        if not self.active:
            return None
        due = []
        if self._renew_at is not None and self.presence is Presence.CHECKED_IN:
            due.append(self._renew_at)
        if self.lease is not None:
            due.append(self.lease.deadline)
        return max(0.0, min(due) - self.clock()) if due else None

    async def withdraw(self, transport: Transport) -> None:
        """Give up candidacy and a held lease (ineligible, or stopping); a no-op when idle."""
        if not self.active or self.presence is Presence.IDLE:
            return
        cond = self._hooks.conditions()
        if self.training is not None:
            self._given_back = self.training.lease_id
        self.presence, self.lease, self._renew_at = Presence.IDLE, None, None
        self._withdrawn = True
        await self._publish(transport, available=False, model_version=cond.model_version)
        self._hooks.on_change()

    async def _publish(
        self, transport: Transport, *, available: bool, model_version: int | None
    ) -> None:
        msg = CheckIn(
            fleet=self._fleet,
            device_id=self._device,
            at=time.time(),
            available=available,
            model_version=model_version,
        )
        envelope = encode_msg(msg)
        signer = self._keys.signer
        if signer is not None:
            envelope = signer.sign(envelope)
        await transport.publish(checkin_topic(self._fleet, self._device), envelope, qos=1)
        self._counts["check_ins" if available else "withdrawals"] += 1
        log.info("%s: %s", self._device, "checked in" if available else "withdrew")
