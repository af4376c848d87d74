"""Receipts at the secure-aggregation leader: the final verdict of each share pair, sans-IO.

A device keeps a sent pair in its spool until a receipt settles it (protocol 1.1, docs/
PROTOCOL.md 4.6): committed (deleted), refused for good (deleted, counted by reason), or no word
(resent after its timeout). The leader reports, only after the transaction that made the
verdict durable:

* **committed**: the members of a buffer whose step was written (:func:`members`), and a
  resend of an update already combined (:func:`resend_verdict`);
* **refused for good**: a refusal of the share before the role (``stale``, ``replay``,
  ``dp_budget_exhausted``, ... the plaintext aggregator's :data:`RECEIPTED_REJECTIONS`), an
  exclusion by the role (:func:`exclusions`: the other share missing, a seed the helper could
  not open, a share of the wrong length), the members of a buffer whose decoded sum failed the
  range check (``secagg_overflow``), and a resend of an excluded update;
* **nothing** for a transient refusal (``dp_one_per_buffer``: the device resends it after its
  timeout, accepted once the device's held update is combined; a ``replay``, receipted, if a
  later update of the device was accepted meanwhile), for a resend of an update still held,
  and for a share whose signature failed (it may be a forgery).

Updates complete out of seq order (a buffer takes updates in the order both shares arrived), so
the ``through`` of a leader's receipt is the highest seq it commits, not the device's mark
(``ReceiptBook(through=False)``): the device resends a lower seq still held there at once only
when a receipt commits a higher one, and the leader refuses the resend as a duplicate without a
receipt (400 KB of bandwidth, nothing counted twice).
"""

from __future__ import annotations

from typing import Final

from edgefl.protocol.receipts import RECEIPTED_REJECTIONS, CommitOutcome
from edgefl.secagg import BufferDecision, LeaderSnapshot, SecAggReason, UpdateKey

__all__ = ["LEADER_FINAL", "exclusions", "members", "resend_verdict"]

_MEMBER: Final = "member"  # SecAggLeader's closing reason of a buffer member

LEADER_FINAL: Final = frozenset(
    {
        *RECEIPTED_REJECTIONS,
        SecAggReason.MISSING_HELPER_SHARE,
        SecAggReason.MISSING_LEADER_SHARE,
        SecAggReason.HELPER_REJECTED,
        SecAggReason.BAD_SHARE,
        SecAggReason.OVERFLOW,
    }
)
"""The rejections the leader's receipts report: the plaintext ones, and the role's exclusions
(final: a resend of an excluded update is refused as ``secagg_late_share``)."""


def _outcome(key: UpdateKey, reason: SecAggReason | None = None) -> CommitOutcome:
    return CommitOutcome(key[0], key[1], reason)


def members(decision: BufferDecision) -> list[CommitOutcome]:
    """The members of a combined buffer: committed."""
    return [_outcome(key) for key in decision.members]


def exclusions(before: LeaderSnapshot | None, after: LeaderSnapshot) -> list[CommitOutcome]:
    """The updates the role excluded between two snapshots (closed with a reason, or reclosed:
    an aborted decision's members whose seeds the helper lacks, a buffer's members whose sum
    failed the range check)."""
    if before is None:
        return []
    old = dict(before.closed)
    return [
        _outcome(key, SecAggReason(why))
        for key, why in after.closed
        if why != _MEMBER and old.get(key) != why and why in LEADER_FINAL
    ]


def resend_verdict(before: LeaderSnapshot, key: UpdateKey) -> CommitOutcome | None:
    """The verdict to repeat for a resent share of ``key`` the role refused as a duplicate or
    late: committed once its buffer was combined, refused with its exclusion reason; None while
    it is held (pending, or a member of the open decision)."""
    why = dict(before.closed).get(key)
    if why is None:
        return None
    if why == _MEMBER:
        decision = before.open_decision
        if decision is not None and key in decision.members:
            return None
        return _outcome(key)
    reason = SecAggReason(why)
    return _outcome(key, reason) if reason in LEADER_FINAL else None
