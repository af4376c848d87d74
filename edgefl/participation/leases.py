"""The lease book: who may train now (sans-IO; PROTOCOL.md §4.7, AGGREGATOR.md "Participation").

At most ``C = config.concurrency`` leases are held at once. :meth:`LeaseBook.grant` fills the
free slots with candidates drawn uniformly at random from a :class:`~.pool.CandidatePool`, each
lease valid ``lease_s`` from its grant. A lease ends in exactly one way:

* **completed**: its update arrived (:meth:`LeaseBook.complete` says ``VALID``, or ``LATE``
  within ``grace_s`` after expiry);
* **released**: the device gave it back (a withdrawal), or its presence went away
  (:meth:`LeaseBook.release`); the slot is free at once. A released lease stays *redeemable*
  until it would have expired (plus ``grace_s``), even when the device holds a newer one: an
  update the device finished under it before letting go is accepted (``LATE``), once. Two
  cases need it: an agent SIGKILLed between spooling its update and delivering it comes back,
  checks in and resends; an agent that delivered its update to a broker which then died with
  it, and stopped being eligible meanwhile (it withdraws on reconnecting, then resends). The
  slot count is unaffected (the slot was freed at the release); a device never redeems more
  leases than it was granted;
* **expired**: ``lease_s`` passed (:meth:`LeaseBook.expire`); the slot is free again, and an
  update under it that arrives later than the grace is refused (``EXPIRED``).

Invariants, for any sequence of calls: ``in_flight <= C``; lease ids strictly increase and are
never reused (``next_id`` is part of the snapshot); one lease per device at a time; every
update accepted under a lease names a lease the book granted to that device, and each lease is
redeemed at most once. After a restart, the snapshot brings back every unexpired lease, so a
restarted aggregator never holds more than ``C``, and every released one still redeemable.

Time is the caller's clock, in seconds (the aggregator passes wall-clock time, so that leases
persist across restarts; the simulator passes virtual time).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Container, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

import numpy as np

from .config import ParticipationConfig
from .pool import CandidatePool

__all__ = ["Lease", "LeaseBook", "LeaseBookState", "LeaseStatistics", "LeaseVerdict"]


@dataclass(frozen=True, slots=True)
class Lease:
    """A training lease: ``device`` may deliver one update under ``lease_id`` until
    ``expires_at``; it trains on model ``version`` (the current one when granted) or newer."""

    device: str
    lease_id: int
    granted_at: float
    expires_at: float
    version: int


class LeaseVerdict(StrEnum):
    """What :meth:`LeaseBook.check` says of an update delivered under a lease."""

    VALID = "valid"  # the device's current lease, not expired
    # its slot already freed: expired less than grace_s ago and the slot not claimed by a newer
    # lease of the device, or released with the device's presence and not yet expired + grace
    LATE = "late"
    EXPIRED = "expired"  # expired longer ago (or its slot went to the device's newer lease)
    NO_LEASE = "no_lease"  # the device holds no lease of that id

    @property
    def accepted(self) -> bool:
        return self in (LeaseVerdict.VALID, LeaseVerdict.LATE)


@dataclass(frozen=True, slots=True)
class LeaseBookState:
    """What survives a restart: the held leases, the next lease id, and the released leases
    still redeemable."""

    leases: tuple[Lease, ...]
    next_id: int
    returned: tuple[Lease, ...] = ()


@dataclass(frozen=True, slots=True)
class LeaseStatistics:
    """Counters since the book was created (``ended`` by how each lease ended)."""

    in_flight: int
    concurrency: int
    granted: int
    ended: Mapping[str, int]
    verdicts: Mapping[str, int]


class _Ended(StrEnum):
    COMPLETED = "completed"
    RELEASED = "released"
    EXPIRED = "expired"


class LeaseBook:
    """The held leases of one aggregator (see the module docstring for the contract)."""

    def __init__(
        self,
        config: ParticipationConfig,
        *,
        rng: np.random.Generator,
        state: LeaseBookState | None = None,
    ) -> None:
        self._config = config
        self._rng = rng
        self._leases: dict[str, Lease] = {}
        self._expiries: list[tuple[float, int, str]] = []
        self._recent: dict[str, Lease] = {}  # device -> its last lease that expired (grace)
        self._returned: dict[int, Lease] = {}  # lease id -> released, redeemable once
        self._next_id = 1
        self._granted = 0
        self._ended: Counter[str] = Counter()
        self._verdicts: Counter[str] = Counter()
        if state is not None:
            self._next_id = max(1, state.next_id)
            for lease in state.leases:
                self._hold(lease)
                self._next_id = max(self._next_id, lease.lease_id + 1)
            for lease in state.returned:
                self._returned[lease.lease_id] = lease
                self._next_id = max(self._next_id, lease.lease_id + 1)

    # ------------------------------------------------------------------ queries
    @property
    def config(self) -> ParticipationConfig:
        return self._config

    @property
    def in_flight(self) -> int:
        """Leases held (granted, not yet completed, released or expired)."""
        return len(self._leases)

    @property
    def free(self) -> int:
        return max(0, self._config.concurrency - len(self._leases))

    def holder(self, device: str) -> Lease | None:
        """The lease ``device`` holds, if any."""
        return self._leases.get(device)

    def leased(self) -> Container[str]:
        """The devices that hold a lease (for a pool's ``exclude``)."""
        return self._leases.keys()

    def next_expiry(self) -> float | None:
        """When the earliest held lease expires (None: none held)."""
        while self._expiries:
            at, lease_id, device = self._expiries[0]
            lease = self._leases.get(device)
            if lease is not None and lease.lease_id == lease_id:
                return at
            heapq.heappop(self._expiries)
        return None

    def snapshot(self) -> LeaseBookState:
        leases = tuple(sorted(self._leases.values(), key=lambda lease: lease.lease_id))
        returned = tuple(self._returned[i] for i in sorted(self._returned))
        return LeaseBookState(leases=leases, next_id=self._next_id, returned=returned)

    def statistics(self) -> LeaseStatistics:
        return LeaseStatistics(
            in_flight=len(self._leases),
            concurrency=self._config.concurrency,
            granted=self._granted,
            ended=MappingProxyType(dict(self._ended)),
            verdicts=MappingProxyType(dict(self._verdicts)),
        )

    # ------------------------------------------------------------------ decisions
    def grant(self, now: float, pool: CandidatePool, *, version: int) -> list[Lease]:
        """Expire what is due, then fill every free slot with a uniformly drawn candidate.

        Returns the new leases (to publish); the pool no longer holds their devices."""
        self.expire(now)
        if self.free == 0:
            return []
        chosen = pool.sample(self.free, rng=self._rng, exclude=self._leases, now=now)
        pool.take(chosen)
        out = []
        for device in chosen:
            lease = Lease(device, self._next_id, now, now + self._config.lease_s, version)
            self._next_id += 1
            self._granted += 1
            self._hold(lease)
            out.append(lease)
        return out

    def check(self, device: str, lease_id: int | None, now: float) -> LeaseVerdict:
        """The verdict on an update of ``device`` under ``lease_id``, without ending the lease."""
        held = self._leases.get(device)
        if held is not None and held.lease_id == lease_id:
            if now < held.expires_at:
                return LeaseVerdict.VALID
            return self._late_or_expired(held, now)
        returned = self._returned.get(lease_id) if lease_id is not None else None
        if returned is not None and returned.device == device:
            return self._late_or_expired(returned, now)
        recent = self._recent.get(device)
        if recent is not None and recent.lease_id == lease_id:
            if held is not None:  # the device already holds a newer lease: one at a time
                return LeaseVerdict.EXPIRED
            return self._late_or_expired(recent, now)
        return LeaseVerdict.NO_LEASE

    def complete(self, device: str, lease_id: int | None, now: float) -> LeaseVerdict:
        """An update of ``device`` under ``lease_id`` arrived: the verdict (counted), and an
        accepted one ends the lease (its slot is free for the next :meth:`grant`)."""
        verdict = self.check(device, lease_id, now)
        self._verdicts[verdict.value] += 1
        if verdict.accepted:
            held = self._leases.get(device)
            if held is not None and held.lease_id == lease_id:
                self._end(device, _Ended.COMPLETED)
            elif lease_id is not None and lease_id in self._returned:
                del self._returned[lease_id]  # one update per lease
                return verdict
            self._recent.pop(device, None)  # one update per lease
        return verdict

    def release(self, device: str) -> Lease | None:
        """``device``'s lease ends at once and its slot is free (it withdrew, or its presence
        went away); an update it finished under the lease may still come, once, until the
        lease would have expired (module doc)."""
        lease = self._leases.get(device)
        if lease is not None:
            self._end(device, _Ended.RELEASED)
            self._returned[lease.lease_id] = lease
        self._recent.pop(device, None)
        return lease

    def expire(self, now: float) -> list[Lease]:
        """End every lease with ``expires_at <= now``; returns them (oldest first)."""
        out = []
        while self._expiries and self._expiries[0][0] <= now:
            _, lease_id, device = heapq.heappop(self._expiries)
            lease = self._leases.get(device)
            if lease is not None and lease.lease_id == lease_id:
                self._end(device, _Ended.EXPIRED)
                self._recent[device] = lease
                out.append(lease)
        self._forget_recent(now)
        grace = self._config.grace_s
        for lease_id in [i for i, x in self._returned.items() if x.expires_at + grace <= now]:
            del self._returned[lease_id]
        return out

    # ------------------------------------------------------------------ internals
    def _hold(self, lease: Lease) -> None:
        self._leases[lease.device] = lease
        heapq.heappush(self._expiries, (lease.expires_at, lease.lease_id, lease.device))

    def _end(self, device: str, how: _Ended) -> None:
        del self._leases[device]
        self._ended[how.value] += 1

    def _late_or_expired(self, lease: Lease, now: float) -> LeaseVerdict:
        late = now < lease.expires_at + self._config.grace_s
        return LeaseVerdict.LATE if late else LeaseVerdict.EXPIRED

    def _forget_recent(self, now: float) -> None:
        """Drop expired leases past their grace (bounded memory: at most the leases that
        expired within the last ``grace_s``, plus those not swept since)."""
        if len(self._recent) <= 2 * self._config.concurrency:
            return
        grace = self._config.grace_s
        for device in [d for d, lease in self._recent.items() if lease.expires_at + grace <= now]:
            del self._recent[device]
