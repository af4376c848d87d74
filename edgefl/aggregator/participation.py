"""The aggregator's side of server-controlled participation (PROTOCOL.md §4.7).

:class:`LeaseDesk` wraps the sans-IO :class:`~edgefl.participation.LeaseBook` and
:class:`~edgefl.participation.CheckInPool` for the service. It is sans-IO too (times come in,
messages go out as ``(topic, payload)``); the service calls it from its ingest task only, so
every change it makes lands in exactly one commit batch:

* :meth:`LeaseDesk.check_in`: one CHECKIN packet in (``available``: a candidate;
  not ``available``: withdrawn, its lease released), a :class:`~edgefl.errors.RejectReason` out
  when it is refused (counted by reason);
* :meth:`LeaseDesk.presence`: one device state in (retained, or the broker's Last Will): a
  device whose newest connection died (``lost``) or shut down (``offline``) is withdrawn and
  its lease released at once (:class:`~edgefl.participation.PresenceWatch`), instead of holding
  a slot until its lease expires and winning leases with a stale check-in;
* :meth:`LeaseDesk.admit`: the lease check of one update, after its de-duplication and before
  it enters the buffer (``Ingest``'s ``admit`` hook): the lease ends (completed), or the update
  is refused ``NO_LEASE`` / ``LEASE_EXPIRED``;
* :meth:`LeaseDesk.grant`: fill the free slots (expiring what is due first), from the
  candidates the ``admissible`` predicate accepts (central DP: not at its participation cap and
  no update in the open buffer, so no device trains for an update that would be refused); the
  others stay candidates for a later grant;
* :meth:`LeaseDesk.changes`: what the store must write with the batch: the leases granted and
  ended since the last call, the next lease id, and the candidates that checked in or left
  (withdrew, or were granted a lease). The service puts them in the batch's record, so a
  lease's completion commits in the same SQLite transaction as the update that completed it, a
  new lease is durable before its LEASE message is published (after the commit), and a
  check-in is durable before it is acknowledged: a restart forgets neither leases nor
  candidates.

Time is wall-clock seconds (leases outlive a restart).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Protocol

import numpy as np

from edgefl.errors import EdgeflError, ProtocolError, RejectReason, UpdateRejected
from edgefl.participation import (
    CandidatePool,
    CheckInPool,
    Lease,
    LeaseBook,
    LeaseBookState,
    LeaseVerdict,
    ParticipationConfig,
    PresenceWatch,
)
from edgefl.protocol import decode_envelope, encode_message, parse_topic
from edgefl.protocol.messages import (
    CheckIn,
    DeviceState,
    Participation,
    UpdateHeader,
    message_from_envelope,
)
from edgefl.protocol.messages import Lease as LeaseMessage
from edgefl.protocol.topics import CheckInTopic, DeviceStateTopic, lease_topic

__all__ = ["CheckInAuthenticator", "LeaseChanges", "LeaseDesk", "LeaseDeskStatistics"]

MAX_CHECKIN_BYTES: Final = 4096  # a CHECKIN is header-only: a few hundred bytes, signed


class CheckInAuthenticator(Protocol):
    """Decides whether a check-in really comes from the device it names."""

    def authenticate_checkin(self, checkin: CheckIn, envelope: bytes) -> None:
        """Return when ``envelope`` is a CHECKIN signed by ``checkin.device_id``'s key; raise
        ``UpdateRejected`` (``UNKNOWN_DEVICE`` / ``BAD_SIGNATURE``) otherwise."""
        ...


class _Signer(Protocol):
    def sign(self, envelope: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class LeaseChanges:
    """What one batch changes in the durable lease and check-in tables."""

    granted: tuple[Lease, ...] = ()
    ended: tuple[int, ...] = ()  # lease ids completed, released or expired
    next_id: int | None = None  # None: unchanged
    checked_in: tuple[tuple[str, float], ...] = ()  # (device, when) of new or renewed check-ins
    left: tuple[str, ...] = ()  # devices no longer candidates (withdrew, or granted a lease)
    returned: tuple[Lease, ...] = ()  # leases released since, redeemable until they expire
    forgotten: tuple[int, ...] = ()  # returned lease ids redeemed or past their expiry


@dataclass(frozen=True, slots=True)
class LeaseDeskStatistics:
    """Counters since start (``checkins``: by outcome: ``available``, ``withdrawn``, or the
    rejection reason)."""

    in_flight: int
    concurrency: int
    candidates: int
    granted: int
    ended: Mapping[str, int]
    verdicts: Mapping[str, int]
    checkins: Mapping[str, int]


_REFUSED: Final = {
    LeaseVerdict.NO_LEASE: RejectReason.NO_LEASE,
    LeaseVerdict.EXPIRED: RejectReason.LEASE_EXPIRED,
}


class LeaseDesk:
    """The participation state of one aggregator (see the module docstring)."""

    def __init__(
        self,
        config: ParticipationConfig,
        fleet: str,
        *,
        rng: np.random.Generator,
        state: LeaseBookState | None = None,
        checkins: Iterable[tuple[str, float]] = (),
        authenticator: CheckInAuthenticator | None = None,
        signer: _Signer | None = None,
        admissible: Callable[[str], bool] | None = None,
    ) -> None:
        """``state`` and ``checkins`` ((device, when) rows) are what the store holds;
        ``admissible(device)`` false keeps a candidate from being granted a lease now."""
        self.config = config
        self._fleet = fleet
        self.book = LeaseBook(config, rng=rng, state=state)
        self.pool = CheckInPool(config.checkin_ttl_s)
        self._draw: CandidatePool = (
            self.pool if admissible is None else _AdmissiblePool(self.pool, admissible)
        )
        self._authenticator = authenticator
        self._signer = signer
        self._durable: dict[int, Lease] = {} if state is None else _by_id(state.leases)
        self._durable_returned: dict[int, Lease] = {} if state is None else _by_id(state.returned)
        self._next_id_durable = self.book.snapshot().next_id
        self._checkins: Counter[str] = Counter()
        for device, at in checkins:
            if self.book.holder(device) is None:
                self.pool.check_in(device, at)
        self._presence = PresenceWatch()
        self._arrived: dict[str, float] = {}  # check-ins since the last changes()
        self._left: set[str] = set()  # candidates gone since the last changes()

    # ------------------------------------------------------------------ inbound
    def check_in(self, topic: str, payload: bytes, *, now: float) -> RejectReason | None:
        """One CHECKIN packet: the rejection reason, or None when it was applied."""
        try:
            parsed = parse_topic(topic, expected_fleet=self._fleet)
            if not isinstance(parsed, CheckInTopic):
                raise ProtocolError(RejectReason.BAD_TOPIC, f"not a check-in topic: {topic[:200]}")
            envelope = decode_envelope(payload, max_payload=MAX_CHECKIN_BYTES)
            checkin = message_from_envelope(envelope, CheckIn, topic=parsed)
            if self._authenticator is not None:
                self._authenticator.authenticate_checkin(checkin, payload)
        except EdgeflError as exc:
            self._checkins[exc.reason.value] += 1
            return exc.reason
        device = checkin.device_id
        if checkin.available:
            self.pool.check_in(device, now)
            self._arrived[device] = now
            self._left.discard(device)
            self._checkins["available"] += 1
        else:
            self.pool.withdraw(device)
            self.book.release(device)
            self._gone(device)
            self._checkins["withdrawn"] += 1
        return None

    def presence(self, topic: str, payload: bytes) -> bool:
        """One device state: True when it withdrew the device (its Will or clean shutdown,
        for the newest session seen), which then loses its candidacy and its lease. An empty
        payload (a cleared retained state) is ignored; a malformed one is counted."""
        if not payload:
            return False
        try:
            parsed = parse_topic(topic, expected_fleet=self._fleet)
            if not isinstance(parsed, DeviceStateTopic):
                return False
            envelope = decode_envelope(payload, max_payload=MAX_CHECKIN_BYTES)
            state = message_from_envelope(envelope, DeviceState, topic=parsed)
        except EdgeflError:
            self._checkins["bad_state"] += 1
            return False
        device = state.device_id
        if not self._presence.gone(state):
            return False
        if device not in self.pool and self.book.holder(device) is None:
            return False
        self.pool.withdraw(device)
        self.book.release(device)
        self._gone(device)
        self._checkins["presence_gone"] += 1
        return True

    def _gone(self, device: str) -> None:
        self._arrived.pop(device, None)
        self._left.add(device)

    def admit(self, header: UpdateHeader, *, now: float) -> None:
        """The lease check of one update (ends its lease); raises ``UpdateRejected``
        (``NO_LEASE``, ``LEASE_EXPIRED``) when the update has no valid lease."""
        verdict = self.book.complete(header.device_id, header.lease_id, now)
        refused = _REFUSED.get(verdict)
        if refused is not None:
            raise UpdateRejected(
                refused,
                f"{header.device_id} update seq {header.seq} under lease {header.lease_id}:"
                f" {verdict.value}",
            )

    # ------------------------------------------------------------------ decisions
    def grant(self, *, now: float, version: int) -> list[Lease]:
        """Expire what is due, then fill the free slots from the checked-in devices that are
        admissible now (the others keep their check-in)."""
        leases = self.book.grant(now, self._draw, version=version)
        for lease in leases:
            self._gone(lease.device)
        return leases

    def changes(self) -> LeaseChanges | None:
        """The lease and check-in rows to write with the current batch (None: nothing changed
        since the last call); from then on they count as durable."""
        snapshot = self.book.snapshot()
        current = _by_id(snapshot.leases)
        granted = tuple(lease for i, lease in current.items() if i not in self._durable)
        ended = tuple(i for i in self._durable if i not in current)
        next_id = None if snapshot.next_id == self._next_id_durable else snapshot.next_id
        returned = _by_id(snapshot.returned)
        changes = LeaseChanges(
            granted,
            ended,
            next_id,
            tuple(self._arrived.items()),
            tuple(self._left),
            returned=tuple(x for i, x in returned.items() if i not in self._durable_returned),
            forgotten=tuple(i for i in self._durable_returned if i not in returned),
        )
        if changes == LeaseChanges():
            return None
        self._durable, self._durable_returned = current, returned
        self._next_id_durable = snapshot.next_id
        self._arrived, self._left = {}, set()
        return changes

    # ------------------------------------------------------------------ outbound
    def lease_message(self, lease: Lease, *, now: float) -> tuple[str, bytes]:
        """The LEASE message of a granted lease: ``(topic, payload)``, signed when a signer is
        configured. ``ttl_s`` is what is left of the lease (devices count it from receipt)."""
        msg = LeaseMessage(
            fleet=self._fleet,
            device_id=lease.device,
            at=now,
            lease_id=lease.lease_id,
            ttl_s=max(1.0, lease.expires_at - now),
            version=lease.version,
        )
        return lease_topic(self._fleet, lease.device), encode_message(msg, signer=self._signer)

    def participation(self) -> Participation:
        """``ServerState.participation``."""
        cfg = self.config
        return Participation(
            concurrency=cfg.concurrency,
            lease_s=cfg.lease_s,
            checkin_ttl_s=cfg.checkin_ttl_s,
            in_flight=self.book.in_flight,
            candidates=len(self.pool),
        )

    def next_expiry(self) -> float | None:
        return self.book.next_expiry()

    def statistics(self) -> LeaseDeskStatistics:
        s = self.book.statistics()
        return LeaseDeskStatistics(
            in_flight=s.in_flight,
            concurrency=s.concurrency,
            candidates=len(self.pool),
            granted=s.granted,
            ended=s.ended,
            verdicts=s.verdicts,
            checkins=MappingProxyType(dict(self._checkins)),
        )


class _AdmissiblePool:
    """The check-in pool as the lease book draws from it: a candidate ``admissible`` refuses is
    skipped as if excluded (it stays in the pool, so it may be drawn once admissible again)."""

    def __init__(self, pool: CheckInPool, admissible: Callable[[str], bool]) -> None:
        self._pool = pool
        self._admissible = admissible

    def sample(
        self, k: int, *, rng: np.random.Generator, exclude: Container[str], now: float
    ) -> list[str]:
        return self._pool.sample(k, rng=rng, exclude=_Excluded(exclude, self._admissible), now=now)

    def take(self, devices: Iterable[str]) -> None:
        self._pool.take(devices)


class _Excluded:
    """``exclude``, plus every device ``admissible`` refuses."""

    def __init__(self, exclude: Container[str], admissible: Callable[[str], bool]) -> None:
        self._exclude = exclude
        self._admissible = admissible

    def __contains__(self, device: object) -> bool:
        if device in self._exclude:
            return True
        return isinstance(device, str) and not self._admissible(device)


def _by_id(leases: tuple[Lease, ...]) -> dict[int, Lease]:
    return {lease.lease_id: lease for lease in leases}
