"""Per-device sequence numbers: the acceptance window that makes a ``seq`` lock-out impossible.

The aggregator accepts an update only when its ``seq`` is above the device's highest committed
``seq`` (lower or equal: ``DUPLICATE`` or ``REPLAY``). Without an upper bound, a single update with
``seq = 2**63 - 1`` (a buggy device, a stolen key, or anyone on a broker without ACLs) makes every
later update of that device a replay, for ever. :func:`seq_verdict` bounds the jump: a ``seq``
more than ``max_jump`` above the highest committed one (above ``max_jump - 1`` for a device
never seen) is refused and counted, and nothing is recorded, so the device's genuine updates
keep being accepted. A genuine device never jumps far: its counter only skips the numbers of
updates that were lost before they were spooled (a crash between allocation and write, a full
spool), at most one per training. :func:`recovered_high_water` is the recovery for a database
that already holds a far jump (written before the window existed): the value
``edgefl aggregator reset-device`` stores.

Sans-IO, pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Final

from .topics import MAX_INT

__all__ = [
    "DEFAULT_MAX_SEQ_JUMP",
    "SeqVerdict",
    "recovered_high_water",
    "seq_acceptable",
    "seq_verdict",
]

DEFAULT_MAX_SEQ_JUMP: Final = 2**32
"""Default window: 4.3 billion numbers above the highest committed ``seq``. No device trains that
often; to push a device to ``2**63 - 1`` an attacker would need ``2**31`` accepted updates."""


class SeqVerdict(StrEnum):
    """What the sequence rule says about one incoming ``seq``."""

    NEW = "new"  # above the highest committed seq, within the window: acceptable
    SEEN = "seen"  # not above the highest committed seq: a duplicate or a replay
    TOO_FAR = "too_far"  # more than max_jump above it: refused, nothing recorded


def _check(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise ValueError(f"{what} must be an int in [0, 2**63-1], got {value!r}")


def seq_verdict(last_committed: int | None, seq: int, max_jump: int) -> SeqVerdict:
    """Classify ``seq`` against the device's highest committed seq (``None``: never seen).

    ``NEW`` iff ``last < seq <= last + max_jump`` with ``last = -1`` for a new device (so a new
    device's first seq is below ``max_jump``). ``ValueError`` for arguments out of range
    (``max_jump >= 1``).
    """
    _check(seq, "seq")
    if last_committed is not None:
        _check(last_committed, "last_committed")
    if isinstance(max_jump, bool) or not isinstance(max_jump, int) or max_jump < 1:
        raise ValueError(f"max_jump must be an int >= 1, got {max_jump!r}")
    last = -1 if last_committed is None else last_committed
    if seq <= last:
        return SeqVerdict.SEEN
    return SeqVerdict.NEW if seq - last <= max_jump else SeqVerdict.TOO_FAR


def seq_acceptable(last_committed: int | None, seq: int, max_jump: int) -> bool:
    """Whether the sequence rule accepts ``seq`` (:func:`seq_verdict` is ``NEW``)."""
    return seq_verdict(last_committed, seq, max_jump) is SeqVerdict.NEW


def recovered_high_water(committed: Iterable[int], max_jump: int) -> int | None:
    """The high-water mark a locked-out device is reset to: the highest committed seq reachable
    from "never seen" in steps the window allows (sorted ascending, each at most ``max_jump``
    above the previous). The first far jump and everything after it are ignored, so the device's
    next genuine update is acceptable again; every committed pair stays in the aggregator's
    ``seen`` table, so no update can be counted twice. ``None`` when nothing is reachable.
    """
    last: int | None = None
    for seq in sorted(set(committed)):
        if seq_verdict(last, seq, max_jump) is not SeqVerdict.NEW:
            break
        last = seq
    return last
