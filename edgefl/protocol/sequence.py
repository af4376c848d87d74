"""Per-device sequence numbers: which ``seq`` an aggregator accepts, bounded above and below.

**Below: the sequence window** (revision 1.3). A broker may redeliver unacknowledged QoS 1
messages out of their original order (NATS JetStream does, nats-server ``README-MQTT.md``,
"Known issues"), so an aggregator can receive a device's ``seq = 30`` after its ``seq = 37``.
A bare high-water rule ("accept only ``seq`` above the highest committed") would refuse 30 as a
replay and lose it. Like the anti-replay window of IPsec (RFC 4303 §3.4.3), the rule accepts a
``seq`` not yet counted that is less than :data:`SEQ_WINDOW` below the device's highest committed
``seq`` ``h`` (:attr:`SeqVerdict.LATE`: the caller looks it up in its exact set of counted pairs,
the aggregator's ``seen`` table); ``h`` itself is a duplicate; ``seq <= h - SEQ_WINDOW`` is
refused for good (``REPLAY``, or ``DUPLICATE`` when it was counted): the bound makes "every
``seq <= through - SEQ_WINDOW`` is settled" a promise a receipt can make.

**Above: the jump bound.** Without an upper bound, a single update with
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
    "SEQ_WINDOW",
    "SeqVerdict",
    "recovered_high_water",
    "seq_acceptable",
    "seq_verdict",
]

DEFAULT_MAX_SEQ_JUMP: Final = 2**32
"""Default window: 4.3 billion numbers above the highest committed ``seq``. No device trains that
often; to push a device to ``2**63 - 1`` an attacker would need ``2**31`` accepted updates."""


SEQ_WINDOW: Final = 256
"""Width of the sequence window: a ``seq`` less than this below the device's highest committed
``seq`` is still accepted once (out-of-order redelivery); at or beyond it, it is refused."""


class SeqVerdict(StrEnum):
    """What the sequence rule says about one incoming ``seq``, from the device's highest
    committed ``seq`` ``h`` alone (``LATE`` and ``TOO_OLD`` then need the counted set)."""

    NEW = "new"  # above h, at most max_jump above it: acceptable
    SEEN = "seen"  # equal to h: counted (a duplicate)
    LATE = "late"  # h - window < seq < h: acceptable iff not counted yet, else a duplicate
    TOO_OLD = "too_old"  # seq <= h - window: refused (a replay; a duplicate if it was counted)
    TOO_FAR = "too_far"  # more than max_jump above h: refused, nothing recorded


def _check(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise ValueError(f"{what} must be an int in [0, 2**63-1], got {value!r}")


def seq_verdict(
    last_committed: int | None, seq: int, max_jump: int, *, window: int = SEQ_WINDOW
) -> SeqVerdict:
    """Classify ``seq`` against the device's highest committed seq (``None``: never seen).

    ``NEW`` iff ``last < seq <= last + max_jump`` with ``last = -1`` for a new device (so a new
    device's first seq is below ``max_jump``); ``SEEN`` iff ``seq == last``; ``LATE`` iff
    ``last - window < seq < last``; ``TOO_OLD`` iff ``seq <= last - window``. ``ValueError`` for
    arguments out of range (``max_jump >= 1``, ``window >= 1``; ``window = 1`` is the bare
    high-water rule).
    """
    _check(seq, "seq")
    if last_committed is not None:
        _check(last_committed, "last_committed")
    if isinstance(max_jump, bool) or not isinstance(max_jump, int) or max_jump < 1:
        raise ValueError(f"max_jump must be an int >= 1, got {max_jump!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    last = -1 if last_committed is None else last_committed
    if seq == last:
        return SeqVerdict.SEEN
    if seq < last:
        return SeqVerdict.LATE if last - seq < window else SeqVerdict.TOO_OLD
    return SeqVerdict.NEW if seq - last <= max_jump else SeqVerdict.TOO_FAR


def seq_acceptable(last_committed: int | None, seq: int, max_jump: int) -> bool:
    """Whether ``seq`` is acceptable whatever was counted: above the mark, within the jump
    (:func:`seq_verdict` is ``NEW``)."""
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
