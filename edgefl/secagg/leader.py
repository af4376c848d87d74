"""The leader's sans-IO role: masked shares in, membership decisions out, partial sums combined
and decoded.

Flow (the caller passes ``now``, seconds on any monotonic clock it persists consistently)::

    leader.receive_masked(key, masked, weight, now)   # device → leader (masked share)
    leader.helper_report(report, now)                 # helper → leader (SeedReport)
    leader.expire(now)                                # timeouts → exclusions by reason
    if leader.ready: decision = leader.decide()       # publish decision.to_json() to the helper
    result = leader.combine(partial)                  # helper's HelperPartial → the float sum

**Membership.** An update is a member only when its masked share arrived here (right length,
weight in ``[1, w_max]``) *and* the helper reported its seed open (:class:`SeedReport` ok).
Complete updates enter decisions in the order they became complete, ``buffer_size`` at a time.
An update whose other share has not come ``share_timeout`` seconds after the first is excluded
(``MISSING_HELPER_SHARE`` or ``MISSING_LEADER_SHARE``); a share arriving after that is
``LATE_SHARE``; a seed the helper could not open is ``HELPER_REJECTED``. Excluded updates the
helper holds are listed in the next decision's ``dropped``. One decision is open at a time.

**Combine.** The members' masked shares stay with the open decision; ``combine`` sums the
leader's partial ``Σ w_i y_i``, adds the helper's ``Σ w_i m_i``, decodes
(:func:`~edgefl.secagg.ring.decode_sum`, range-checked), applies the noise hook, closes the
buffer and returns ``Σ_i w_i x_i`` as float64 plus the weight sum. Normalisation (``/ W`` for
``mean``, ``/ (K · weight_scale)`` for ``sum``) and the server step are the caller's.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Container
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from edgefl.secagg.decision import BufferDecision, HelperPartial, SeedReport, UpdateKey
from edgefl.secagg.errors import SecAggError, SecAggReason
from edgefl.secagg.ring import RingArray, RingSpec, decode_sum, from_bytes, weighted_add
from edgefl.secagg.state import LeaderSnapshot, PendingShare

__all__ = ["AggregateResult", "LeaderConfig", "SecAggLeader", "SumNoise"]


class SumNoise(Protocol):
    """The DP hook: add noise in place to the decoded sum ``Σ w_i x_i`` of a decision."""

    def __call__(self, total: NDArray[np.float64], decision: BufferDecision) -> None: ...


@dataclass(frozen=True)
class LeaderConfig:
    """``buffer_size`` K, ``w_max`` (largest integer weight), ``share_timeout`` seconds,
    ``memory`` (how many closed update keys are remembered to tell late and duplicate shares),
    ``min_members`` (the smallest flushed buffer; the helper enforces its own)."""

    spec: RingSpec
    num_params: int
    buffer_size: int
    w_max: int
    share_timeout: float = 60.0
    memory: int = 100_000
    min_members: int = 2
    noise: SumNoise | None = None

    def __post_init__(self) -> None:
        if self.num_params < 1 or self.buffer_size < 1 or self.w_max < 1:
            raise ValueError("num_params, buffer_size and w_max must be >= 1")
        if not self.spec.fits([self.w_max] * self.buffer_size):
            raise ValueError(
                f"K={self.buffer_size} updates of weight {self.w_max} overflow the ring "
                f"(scale {self.spec.scale}, b={self.spec.bits}): use RingSpec.fit"
            )
        if not self.share_timeout > 0 or self.memory < 1:
            raise ValueError("share_timeout must be > 0 and memory >= 1")
        if not 1 <= self.min_members <= self.buffer_size:
            raise ValueError("min_members must be in [1, buffer_size]")


@dataclass(frozen=True)
class AggregateResult:
    """A combined buffer: ``total = Σ_i w_i x_i`` (noise added when configured)."""

    decision: BufferDecision
    total: NDArray[np.float64]

    @property
    def weight_sum(self) -> int:
        return self.decision.weight_sum


class SecAggLeader:
    """See the module docstring. Refusals raise :class:`SecAggError` and are counted."""

    def __init__(self, config: LeaderConfig) -> None:
        self._config = config
        self._pending: dict[UpdateKey, PendingShare] = {}
        self._complete: dict[UpdateKey, None] = {}  # insertion order = completion order
        self._announced: dict[UpdateKey, float] = {}
        self._closed: OrderedDict[UpdateKey, str] = OrderedDict()
        self._drops: list[UpdateKey] = []
        self._open: BufferDecision | None = None
        self._open_shares: tuple[PendingShare, ...] = ()
        self._next_id = 0
        self._counts: Counter[SecAggReason] = Counter()
        self._accepted = 0
        self._combined = 0

    # ------------------------------------------------------------------ ingest
    def receive_masked(self, key: UpdateKey, masked: bytes, weight: int, now: float) -> None:
        """Hold the masked share of ``key`` with its public integer ``weight``."""
        cfg = self._config
        try:
            self._check_new(key, self._pending)
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise SecAggError(SecAggReason.BAD_WEIGHT, f"weight {weight!r}")
            if not 1 <= weight <= cfg.w_max:
                raise SecAggError(
                    SecAggReason.BAD_WEIGHT, f"weight {weight} not in [1, {cfg.w_max}]"
                )
            from_bytes(masked, cfg.spec, cfg.num_params)  # length check
        except SecAggError as exc:
            self._counts[exc.reason] += 1
            raise
        announced = self._announced.pop(key, None)
        self._pending[key] = PendingShare(key, bytes(masked), weight, now, announced is not None)
        self._accepted += 1
        if announced is not None:
            self._complete[key] = None

    def helper_report(self, report: SeedReport, now: float) -> None:
        """Record the helper's word on the seed of ``report.key``."""
        key = report.key
        try:
            self._check_new(key, self._announced)
        except SecAggError as exc:
            self._counts[exc.reason] += 1
            if report.ok and exc.reason is SecAggReason.LATE_SHARE:
                self._drops.append(key)  # the helper holds a seed nobody will claim
            raise
        pending = self._pending.get(key)
        if not report.ok:
            self._exclude(key, SecAggReason.HELPER_REJECTED)
        elif pending is None:
            self._announced[key] = now
        elif not pending.helper_ok:
            self._pending[key] = PendingShare(
                key, pending.masked, pending.weight, pending.arrived, True
            )
            self._complete[key] = None

    def _check_new(self, key: UpdateKey, held: Container[UpdateKey]) -> None:
        closed = self._closed.get(key)
        if closed is not None:
            reason = SecAggReason.DUPLICATE if closed == "member" else SecAggReason.LATE_SHARE
            raise SecAggError(reason, f"{key} is already closed ({closed})")
        if key in held:
            raise SecAggError(SecAggReason.DUPLICATE, f"{key} is already held")

    def _exclude(self, key: UpdateKey, reason: SecAggReason) -> None:
        self._pending.pop(key, None)
        self._complete.pop(key, None)
        self._counts[reason] += 1
        self._close(key, reason.value)

    def _close(self, key: UpdateKey, why: str) -> None:
        self._closed[key] = why
        while len(self._closed) > self._config.memory:
            self._closed.popitem(last=False)

    def expire(self, now: float) -> int:
        """Exclude every update whose other share is overdue; returns how many."""
        limit = now - self._config.share_timeout
        late = [k for k, p in self._pending.items() if not p.helper_ok and p.arrived < limit]
        for key in late:
            self._exclude(key, SecAggReason.MISSING_HELPER_SHARE)
        orphans = [k for k, t in self._announced.items() if t < limit]
        for key in orphans:
            del self._announced[key]
            self._exclude(key, SecAggReason.MISSING_LEADER_SHARE)
            self._drops.append(key)
        return len(late) + len(orphans)

    def holds(self, device_id: str) -> bool:
        """Whether a masked share of ``device_id`` is held and neither combined nor excluded
        (waiting for its seed, complete, or in the open decision): central DP's
        one-update-per-buffer rule (:class:`~edgefl.secagg.privacy.LeaderPrivacy`)."""
        members = () if self._open is None else self._open.members
        return any(key[0] == device_id for key in (*self._pending, *members))

    # ------------------------------------------------------------------ decide and combine
    @property
    def ready(self) -> bool:
        """A full buffer of complete updates and no open decision."""
        return self._open is None and len(self._complete) >= self._config.buffer_size

    @property
    def open_decision(self) -> BufferDecision | None:
        """The decision awaiting the helper's partial (re-publish it after a restart)."""
        return self._open

    def decide(self, *, flush: bool = False) -> BufferDecision:
        """Close the next buffer: the first K complete updates (``flush``: up to K, at least
        ``min_members``; the helper refuses fewer). The masked shares stay with the decision
        until :meth:`combine`."""
        cfg = self._config
        if self._open is not None:
            raise RuntimeError(f"decision {self._open.buffer_id} is still open")
        count = min(len(self._complete), cfg.buffer_size)
        if count < cfg.min_members or (count < cfg.buffer_size and not flush):
            raise RuntimeError(f"{len(self._complete)} complete updates, need {cfg.buffer_size}")
        members = list(self._complete)[:count]
        shares = tuple(self._pending.pop(k) for k in members)
        decision = BufferDecision(
            buffer_id=self._next_id,
            members=tuple(members),
            weights=tuple(s.weight for s in shares),
            dropped=tuple(self._drops),
        )
        for key in members:
            del self._complete[key]
            self._close(key, "member")
        self._drops.clear()
        self._next_id += 1
        self._open, self._open_shares = decision, shares
        return decision

    def abort(self, missing: frozenset[UpdateKey]) -> BufferDecision:
        """The helper refused the open decision (``BAD_DECISION``: it lacks the seeds of
        ``missing``): exclude those, return the other members to the front of the queue."""
        if self._open is None:
            raise RuntimeError("no open decision")
        decision, shares = self._open, self._open_shares
        self._open, self._open_shares = None, ()
        self._counts[SecAggReason.BAD_DECISION] += 1
        back = [s for s in shares if s.key not in missing]
        for share in shares:
            del self._closed[share.key]
            if share.key in missing:
                self._exclude(share.key, SecAggReason.MISSING_HELPER_SHARE)
        self._pending.update((s.key, s) for s in back)
        self._complete = dict.fromkeys([*(s.key for s in back), *self._complete])
        return decision

    def _leader_sum(self) -> RingArray:
        cfg = self._config
        acc = np.zeros(cfg.num_params, dtype=cfg.spec.dtype)
        scratch = np.empty_like(acc)
        for share in self._open_shares:
            weighted_add(
                acc, from_bytes(share.masked, cfg.spec, cfg.num_params), share.weight, scratch
            )
        return acc

    def combine(self, partial: HelperPartial) -> AggregateResult:
        """Add the leader's and the helper's partials, decode, add noise, close the buffer.

        ``STALE_DECISION`` for a partial of no open decision (a duplicate after a restart),
        ``BAD_SHARE`` for a wrong length: both leave the decision open. ``OVERFLOW`` closes it
        (the members are spent, none is counted as combined; they are closed as
        ``OVERFLOW``, so a resend of one is a ``LATE_SHARE``)."""
        cfg = self._config
        decision = self._open
        try:
            if decision is None or partial.buffer_id != decision.buffer_id:
                raise SecAggError(SecAggReason.STALE_DECISION, f"partial {partial.buffer_id}")
            helper_sum = from_bytes(partial.total, cfg.spec, cfg.num_params)
        except SecAggError as exc:
            self._counts[exc.reason] += 1
            raise
        ring_sum = self._leader_sum()
        ring_sum += helper_sum  # wraps mod 2^b
        self._open, self._open_shares = None, ()
        try:
            total = decode_sum(ring_sum, cfg.spec, decision.weights)
        except SecAggError as exc:
            self._counts[exc.reason] += 1
            for key in decision.members:  # spent, never counted: a resend is a late share
                self._close(key, exc.reason.value)
            raise
        self._combined += len(decision.members)
        if cfg.noise is not None:
            cfg.noise(total, decision)
        return AggregateResult(decision, total)

    # ------------------------------------------------------------------ observability, state
    def statistics(self) -> MappingProxyType[str, int]:
        """Counters: ``accepted``, ``combined``, ``pending``, ``complete`` and every reason."""
        stats = {str(r): n for r, n in self._counts.items()}
        stats.update(
            accepted=self._accepted,
            combined=self._combined,
            pending=len(self._pending),
            complete=len(self._complete),
        )
        return MappingProxyType(stats)

    def snapshot(self) -> LeaderSnapshot:
        return LeaderSnapshot(
            next_buffer_id=self._next_id,
            pending=tuple(self._pending.values()),
            complete=tuple(self._complete),
            announced=tuple(self._announced.items()),
            closed=tuple(self._closed.items()),
            drops=tuple(self._drops),
            open_decision=self._open,
            open_shares=self._open_shares,
            counts={str(r): n for r, n in self._counts.items()},
            accepted_total=self._accepted,
            combined_total=self._combined,
        )

    @classmethod
    def restore(cls, config: LeaderConfig, state: LeaderSnapshot) -> SecAggLeader:
        leader = cls(config)
        leader._next_id = state.next_buffer_id
        leader._pending = {p.key: p for p in state.pending}
        leader._complete = dict.fromkeys(state.complete)
        leader._announced = dict(state.announced)
        leader._closed = OrderedDict(state.closed)
        leader._drops = list(state.drops)
        leader._open, leader._open_shares = state.open_decision, state.open_shares
        leader._counts = Counter({SecAggReason(r): n for r, n in state.counts.items()})
        leader._accepted = state.accepted_total
        leader._combined = state.combined_total
        return leader
