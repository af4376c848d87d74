"""Sans-IO receipt builder: the aggregator's half of end-to-end receipts (PROTOCOL.md §4.6).

The aggregator calls :meth:`ReceiptBook.receipts` once per commit batch, **after** the batch's
SQLite transaction committed (and after every earlier batch's), with the outcome of every update
of the batch whose ``(device, seq)`` it knows (from the update topic). It returns the RECEIPT
messages to publish (topic, payload; QoS 1, retained), one per device, and keeps each device's
committed high-water mark (``through``) in memory, restored from the store at start.

What a receipt reports, for each device of the batch:

* ``committed``: the seqs accepted by this batch, plus resends the aggregator recognised as
  already committed (``DUPLICATE`` at or below the device's high-water mark);
* ``rejected``: only *final* rejections of an update proven to come from the device
  (:data:`RECEIPTED_REJECTIONS`: decisions taken after authentication and identical for a
  resend of the same bytes). Framing, signature and transient failures (``BAD_CHECKSUM``,
  ``BAD_SIGNATURE``, ``RATE_LIMITED``, ``REASSEMBLY_EXPIRED``, ...) are not receipted: they may
  come from a forgery on a broker without ACLs, or from a corrupted or incomplete copy, and the
  right answer to them is the device's resend.

Receipts are only ever published for committed outcomes: a rejection is receipted after its
batch committed too, because ``DUPLICATE``/``REPLAY``/``STALE`` depend on state (pending seqs,
the model version) that a crash before the commit would roll back.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from edgefl.errors import RejectReason

from . import _fields as f
from .messages import Receipt, SeqRange, encode_message
from .topics import device_id, receipt_topic

__all__ = [
    "RECEIPTED_REJECTIONS",
    "CommitOutcome",
    "ReceiptBook",
    "seq_ranges",
]

RECEIPTED_REJECTIONS: Final = frozenset(
    {
        RejectReason.WRONG_MODEL,
        RejectReason.SHAPE_MISMATCH,
        RejectReason.BAD_CODEC,
        RejectReason.DECOMPRESSION_BOMB,
        RejectReason.BAD_COMPRESSION,
        RejectReason.NON_FINITE,
        RejectReason.STALE,
        RejectReason.FUTURE_VERSION,
        RejectReason.DUPLICATE,
        RejectReason.NORM_BOUND,
        RejectReason.BAD_EXAMPLES,
        RejectReason.REPLAY,
        RejectReason.SEQ_JUMP,
        # participation (1.2): checked after authentication and de-duplication, and final: a
        # lease id is granted once and never reused, a used or never-granted one never becomes
        # valid, and an expired one stays expired (a resend of the same bytes gets the same
        # answer); a receipt stops the device from resending an update no one will take
        RejectReason.NO_LEASE,
        RejectReason.LEASE_EXPIRED,
        # central DP: final. A device's participation count only grows (it is durable, restored
        # after a restart), so a device at its cap stays there and a resend of the same bytes
        # gets the same answer; a receipt stops it resending an update no one will take.
        # (DP_ONE_PER_BUFFER is not here: it is transient. The device's resend after its
        # timeout is accepted once the buffer holding its other update has flushed.)
        RejectReason.DP_BUDGET_EXHAUSTED,
    }
)
"""Rejections a receipt reports (the device then stops resending that seq). Any other reason is
left unreported: the device resends after its timeout."""


class _Signer(Protocol):
    def sign(self, envelope: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class CommitOutcome:
    """The committed outcome of one update: accepted (``reason is None``) or rejected (a
    :class:`~edgefl.errors.RejectReason`, or another reason enum a book is told is final)."""

    device_id: str
    seq: int
    reason: StrEnum | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


def seq_ranges(seqs: Iterable[int]) -> tuple[SeqRange, ...]:
    """Ascending, disjoint, non-adjacent ``(lo, hi)`` ranges covering exactly ``seqs``."""
    out: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return tuple((lo, hi) for lo, hi in out)


class ReceiptBook:
    """Per-device committed high-water marks and the receipts of each commit batch.

    ``high_water``: the store's committed ``max_seq`` per device at start. ``signer``: the
    aggregator's envelope signer when signing is on (the one that signs manifests). Not
    thread-safe; call from one task, in commit order.

    ``final``: the rejections it reports (default :data:`RECEIPTED_REJECTIONS`).
    ``through=False``: a receipt's ``through`` is the highest seq *it* commits (None when it
    commits none), not the device's high-water mark: for an aggregator that commits a device's
    updates out of seq order (the secure-aggregation leader), where an old mark would make the
    device resend every lower seq still pending there at once.
    """

    def __init__(
        self,
        fleet: str,
        high_water: Mapping[str, int] | None = None,
        *,
        signer: _Signer | None = None,
        final: Container[StrEnum] = RECEIPTED_REJECTIONS,
        through: bool = True,
    ) -> None:
        self.fleet = fleet
        self._high: dict[str, int] = dict(high_water or {})
        self._signer = signer
        self._final = final
        self._through = through

    def high_water(self, device: str) -> int | None:
        """The highest committed seq of ``device`` known to the book (None: none)."""
        return self._high.get(device)

    def reset(self, device: str, high_water: int | None) -> None:
        """Set a device's mark (after ``edgefl aggregator reset-device``)."""
        if high_water is None:
            self._high.pop(device, None)
        else:
            self._high[device] = high_water

    def receipt_messages(self, outcomes: Iterable[CommitOutcome], *, now: float) -> list[Receipt]:
        """The receipts of one committed batch, one per device with something to report
        (more than one only if a device has over 1,024 ranges or rejections in one batch)."""
        by_device: dict[str, list[CommitOutcome]] = defaultdict(list)
        for out in outcomes:
            by_device[device_id(out.device_id)].append(out)
        receipts: list[Receipt] = []
        for device, outs in by_device.items():
            accepted = [o.seq for o in outs if o.accepted]
            high = max([*accepted, self._high.get(device, -1)])
            committed = set(accepted)
            rejected: dict[int, str] = {}
            for o in outs:
                if o.reason is RejectReason.DUPLICATE and o.seq <= high:
                    committed.add(o.seq)  # a resend of an update committed before
                elif o.reason is not None and o.reason in self._final and o.seq not in committed:
                    rejected[o.seq] = o.reason.value
            for seq in committed:
                rejected.pop(seq, None)
            if high >= 0:
                self._high[device] = high
            if not committed and not rejected:
                continue
            receipts.extend(self._split(device, high, seq_ranges(committed), rejected, now))
        return receipts

    def receipts(self, outcomes: Iterable[CommitOutcome], *, now: float) -> list[tuple[str, bytes]]:
        """:meth:`receipt_messages` encoded (and signed): ``(topic, payload)`` to publish with
        QoS 1, retained."""
        return [
            (receipt_topic(r.fleet, r.device_id), encode_message(r, signer=self._signer))
            for r in self.receipt_messages(outcomes, now=now)
        ]

    def _reported_through(self, high: int, ranges: tuple[SeqRange, ...]) -> int | None:
        if self._through:
            return high if high >= 0 else None
        return ranges[-1][1] if ranges else None

    def _split(
        self,
        device: str,
        high: int,
        ranges: tuple[SeqRange, ...],
        rejected: dict[int, str],
        now: float,
    ) -> list[Receipt]:
        n = f.MAX_ENTRIES
        items = sorted(rejected.items())
        parts = max(1, -(-len(ranges) // n), -(-len(items) // n))
        return [
            Receipt(
                fleet=self.fleet,
                device_id=device,
                at=now,
                through=self._reported_through(high, ranges),
                committed=ranges[i * n : (i + 1) * n],
                rejected=dict(items[i * n : (i + 1) * n]),
            )
            for i in range(parts)
        ]
