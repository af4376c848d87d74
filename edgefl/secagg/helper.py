"""The helper's sans-IO role: sealed seeds in, seed reports and partial sums out.

Flow::

    report = helper.receive_sealed(key, sealed, now)  # device → helper; publish report (or None)
    partial = helper.apply(decision)                  # leader's BufferDecision → HelperPartial
    helper.expire(now)                                # unclaimed seeds → UNCLAIMED_SEED

The helper never sees a masked share. ``apply`` expands each member's mask (ChaCha20 of its
seed) and returns ``Σ_i w_i m_i mod 2^b``. It is idempotent: the members' seeds of an answered
decision are kept until a decision with a higher id arrives (which means the leader combined the
earlier one, as it holds one decision open at a time), so after a leader restart the re-published
decision gets the same partial again. A decision with an id below the highest answered is
``STALE_DECISION``; one naming a seed the helper does not hold is ``BAD_DECISION`` (the error's
``missing`` attribute lists them for the leader's :meth:`~SecAggLeader.abort`).

The helper is what stops a dishonest leader from learning a single update from the sums: it
refuses (``BAD_DECISION``) a decision of fewer than ``min_members`` updates, and one naming an
update that was a member of an earlier decision (the difference of two overlapping sums is the
updates they do not share). Seeds are deleted once superseded, so they cannot be reused later
either. What it cannot stop: a leader that is also K - 1 of the devices (Sybils) learns the one
honest update of a buffer, as in every secure aggregation without device authentication.

``seed_timeout`` must be far longer than the longest time a complete update may wait in the
leader's queue (a slow fleet fills a buffer slowly): it only collects seeds the leader never
claims.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from edgefl.secagg.decision import BufferDecision, HelperPartial, SeedReport, UpdateKey
from edgefl.secagg.errors import SecAggError, SecAggReason
from edgefl.secagg.ring import RingSpec, weighted_add
from edgefl.secagg.shares import HelperKeys, ShareContext, expand_mask, open_seed
from edgefl.secagg.state import HeldSeed, HelperSnapshot

__all__ = ["HelperConfig", "MissingSeeds", "SecAggHelper"]


@dataclass(frozen=True)
class HelperConfig:
    """The ring and the context every sealed seed must be bound to."""

    spec: RingSpec
    num_params: int
    fleet: str
    model: str
    seed_timeout: float = 3600.0
    min_members: int = 2

    def __post_init__(self) -> None:
        if self.min_members < 1 or not self.seed_timeout > 0:
            raise ValueError("min_members must be >= 1 and seed_timeout > 0")

    def context(self, key: UpdateKey) -> ShareContext:
        return ShareContext(
            fleet=self.fleet,
            device_id=key[0],
            seq=key[1],
            model=self.model,
            num_params=self.num_params,
            bits=self.spec.bits,
        )


class MissingSeeds(SecAggError):
    """``BAD_DECISION``: the decision names seeds the helper does not hold (``missing``)."""

    def __init__(self, missing: frozenset[UpdateKey]) -> None:
        super().__init__(SecAggReason.BAD_DECISION, f"no seed for {sorted(missing)}")
        self.missing = missing


class SecAggHelper:
    """See the module docstring."""

    def __init__(self, config: HelperConfig, keys: HelperKeys) -> None:
        self._config = config
        self._keys = keys
        self._seeds: dict[UpdateKey, tuple[HeldSeed, bytes]] = {}
        self._answered: dict[int, BufferDecision] = {}
        self._last_id = -1
        self._counts: Counter[SecAggReason] = Counter()
        self._accepted = 0

    def receive_sealed(self, key: UpdateKey, sealed: bytes, now: float) -> SeedReport | None:
        """Open and hold the seed of ``key``. Returns the report for the leader: ok, or
        ``BAD_SEAL`` (counted). A redelivery of the same bytes reports ok again (idempotent);
        other bytes for a held key are ``DUPLICATE`` (counted, nothing to report)."""
        held = self._seeds.get(key)
        if held is not None:
            if held[0].sealed == sealed:
                return SeedReport(key, True)
            self._counts[SecAggReason.DUPLICATE] += 1
            return None
        try:
            seed = open_seed(sealed, self._keys, self._config.context(key))
        except SecAggError as exc:
            self._counts[exc.reason] += 1
            return SeedReport(key, False, exc.reason)
        self._seeds[key] = (HeldSeed(key, bytes(sealed), now), seed)
        self._accepted += 1
        return SeedReport(key, True)

    def apply(self, decision: BufferDecision) -> HelperPartial:
        """The partial ``Σ_i w_i m_i mod 2^b`` of ``decision`` (see the module docstring)."""
        try:
            self._admit(decision)
        except SecAggError as exc:
            self._counts[exc.reason] += 1
            raise
        cfg = self._config
        acc = np.zeros(cfg.num_params, dtype=cfg.spec.dtype)
        scratch = np.empty_like(acc)
        for key, weight in zip(decision.members, decision.weights, strict=True):
            mask = expand_mask(self._seeds[key][1], cfg.spec, cfg.num_params)
            weighted_add(acc, mask, weight, scratch)
        return HelperPartial(decision.buffer_id, acc.tobytes())

    def _admit(self, decision: BufferDecision) -> None:
        known = self._answered.get(decision.buffer_id)
        if known is not None:
            if known != decision:
                raise SecAggError(SecAggReason.BAD_DECISION, "another decision under this id")
            return
        if decision.buffer_id <= self._last_id:
            raise SecAggError(SecAggReason.STALE_DECISION, f"decision {decision.buffer_id}")
        if len(decision.members) < self._config.min_members:
            raise SecAggError(SecAggReason.BAD_DECISION, f"fewer than {self._config.min_members}")
        used = {k for d in self._answered.values() for k in d.members}
        if any(k in used for k in decision.members):  # two sums would isolate the difference
            raise SecAggError(SecAggReason.BAD_DECISION, "a member of an earlier decision")
        missing = frozenset(k for k in decision.members if k not in self._seeds)
        if missing:
            raise MissingSeeds(missing)
        for old_id in [i for i in self._answered if i < decision.buffer_id]:
            for key in self._answered.pop(old_id).members:
                self._seeds.pop(key, None)
        for key in decision.dropped:
            if self._seeds.pop(key, None) is not None:
                self._counts[SecAggReason.DROPPED_BY_LEADER] += 1
        self._answered[decision.buffer_id] = decision
        self._last_id = decision.buffer_id

    def expire(self, now: float) -> int:
        """Drop seeds unclaimed for ``seed_timeout`` (not those of answered decisions)."""
        claimed = {k for d in self._answered.values() for k in d.members}
        limit = now - self._config.seed_timeout
        old = [k for k, (h, _) in self._seeds.items() if h.arrived < limit and k not in claimed]
        for key in old:
            del self._seeds[key]
        self._counts[SecAggReason.UNCLAIMED_SEED] += len(old)
        return len(old)

    def statistics(self) -> MappingProxyType[str, int]:
        stats = {str(r): n for r, n in self._counts.items() if n}
        stats.update(accepted=self._accepted, held=len(self._seeds))
        return MappingProxyType(stats)

    def snapshot(self) -> HelperSnapshot:
        return HelperSnapshot(
            seeds=tuple(h for h, _ in self._seeds.values()),
            answered=tuple(self._answered.values()),
            last_buffer_id=self._last_id,
            counts={str(r): n for r, n in self._counts.items()},
            accepted_total=self._accepted,
        )

    @classmethod
    def restore(cls, config: HelperConfig, keys: HelperKeys, state: HelperSnapshot) -> SecAggHelper:
        """Rebuild from a snapshot, reopening every held seed (``SecAggError(BAD_SEAL)`` if one
        no longer opens: the wrong key or a corrupted store)."""
        helper = cls(config, keys)
        for held in state.seeds:
            seed = open_seed(held.sealed, keys, config.context(held.key))
            helper._seeds[held.key] = (held, seed)
        helper._answered = {d.buffer_id: d for d in state.answered}
        helper._last_id = state.last_buffer_id
        helper._counts = Counter({SecAggReason(r): n for r, n in state.counts.items()})
        helper._accepted = state.accepted_total
        return helper
