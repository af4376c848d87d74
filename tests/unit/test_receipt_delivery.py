"""The spool's delivery state machine under receipts: sent -> awaiting -> receipted or rejected,
resend timing with an injected clock, restarts, and the full-spool policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.receipts import DeliveryTracker, ReceiptPolicy, Settlement
from device_agent.spool import SpoolFull, UpdateSpool
from edgefl.protocol.messages import Receipt

POLICY = ReceiptPolicy(timeout_s=10.0, max_backoff_s=35.0)


def tracker() -> DeliveryTracker:
    return DeliveryTracker(POLICY, jitter=lambda: 0.0)


def receipt(**fields: object) -> Receipt:
    return Receipt(fleet="farm", device_id="pi-1", at=0.0, **fields)  # type: ignore[arg-type]


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    assert [POLICY.delay(n) for n in (1, 2, 3, 4, 9)] == [10.0, 20.0, 35.0, 35.0, 35.0]
    assert POLICY.delay(1, jitter=0.5) == pytest.approx(10.5)
    assert POLICY.delay(10_000) == 35.0
    with pytest.raises(ValueError, match="timeout_s"):
        ReceiptPolicy(timeout_s=5.0, max_backoff_s=1.0)


def test_sent_update_awaits_then_is_due_after_the_timeout_with_backoff() -> None:
    # Arrange
    t = tracker()
    assert t.due([0, 1], now=0.0) == [0, 1]  # never sent: due at once, in order
    # Act / Assert: the first send at t=0, resends at 10 and then 30 (10 + 20)
    assert t.sent(0, now=0.0) == 1
    assert t.is_awaiting(0)
    assert t.awaiting == 1
    assert t.due([0], now=9.9) == []
    assert t.next_due() == 10.0
    assert t.due([0], now=10.0) == [0]
    assert t.sent(0, now=10.0) == 2
    assert t.next_due() == 30.0
    assert t.due([0], now=29.0) == []
    assert t.resends == 1


def test_committed_receipt_settles_and_stops_resends() -> None:
    t = tracker()
    for seq in (0, 1, 2):
        t.sent(seq, now=0.0)
    effect = t.on_receipt(receipt(through=1, committed=((0, 1),)), [0, 1, 2], now=1.0)
    assert effect.settled == {0: (Settlement.COMMITTED, None), 1: (Settlement.COMMITTED, None)}
    assert effect.resend_now == ()
    assert t.awaiting == 1
    assert t.due([2], now=100.0) == [2]  # 2 still awaits and is resent when due


def test_rejection_receipt_settles_with_its_reason() -> None:
    t = tracker()
    t.sent(4, now=0.0)
    effect = t.on_receipt(receipt(through=3, rejected={4: "stale"}), [4], now=1.0)
    assert effect.settled == {4: (Settlement.REJECTED, "stale")}
    assert not t.is_awaiting(4)
    assert t.next_due() is None


def test_settled_but_unnamed_update_is_resent_at_once() -> None:
    # seq 5 is below `through` but this receipt does not name it: its own receipt was missed
    t = tracker()
    t.sent(5, now=0.0)
    t.sent(7, now=0.0)
    effect = t.on_receipt(receipt(through=7, committed=((7, 7),)), [5, 7], now=2.0)
    assert effect.settled == {7: (Settlement.COMMITTED, None)}
    assert effect.resend_now == (5,)
    assert t.due([5], now=2.0) == [5]


def test_reconnect_makes_every_awaiting_update_due_in_order() -> None:
    t = tracker()
    for seq in (3, 1, 2):
        t.sent(seq, now=0.0)
    assert t.due([1, 2, 3, 4], now=1.0) == [4]
    t.reconnected(now=1.0)
    assert t.due([4, 3, 2, 1], now=1.0) == [1, 2, 3, 4]


def test_restored_updates_keep_their_attempts_and_are_due() -> None:
    t = tracker()
    t.restore(9, attempts=3, now=50.0)
    assert t.due([9], now=50.0) == [9]
    assert t.sent(9, now=50.0) == 4
    assert t.next_due() == 85.0  # 50 + min(35, 10 * 2**3)


# --------------------------------------------------------------------------- the spool


def test_spool_marks_survive_a_restart_and_go_with_their_entry(tmp_path: Path) -> None:
    # Arrange
    directory = tmp_path / "spool"
    with UpdateSpool(directory) as spool:
        for seq in range(3):
            spool.put(spool.next_seq(), f"u{seq}".encode(), {})
        mark = spool.mark_sent(0, 1)
        spool.mark_sent(1, 2)
        assert mark is not None
        assert mark.attempts == 1
        assert spool.mark_sent(7, 1) is None  # no such entry: nothing written
    # Act
    with UpdateSpool(directory) as spool:
        # Assert
        assert [(m.seq, m.attempts) for m in spool.awaiting()] == [(0, 1), (1, 2)]
        assert spool.statistics().awaiting == 2
        assert len(spool) == 3
        assert spool.remove(0)
        assert not (directory / f"u-{0:020d}.sent").exists()
    with UpdateSpool(directory) as spool:
        assert [m.seq for m in spool.awaiting()] == [1]


def test_orphaned_and_unreadable_marks_are_cleaned_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with UpdateSpool(directory) as spool:
        spool.put(spool.next_seq(), b"x", {})
        spool.put(spool.next_seq(), b"y", {})
    (directory / f"u-{5:020d}.sent").write_text('{"attempts": 1, "sent_at": 0}')  # no entry
    (directory / f"u-{1:020d}.sent").write_text("garbage")
    with UpdateSpool(directory) as spool:
        assert spool.awaiting() == []
    assert sorted(p.name for p in directory.glob("*.sent")) == []


def test_full_spool_refuses_new_updates_and_never_evicts_awaiting_ones(tmp_path: Path) -> None:
    with UpdateSpool(tmp_path / "spool", max_entries=2) as spool:
        for _ in range(2):
            seq = spool.next_seq()
            spool.put(seq, b"sent", {})
            spool.mark_sent(seq, 1)
        with pytest.raises(SpoolFull):
            spool.put(spool.next_seq(), b"new", {})
        assert [m.seq for m in spool.awaiting()] == [0, 1]
        assert spool.statistics().rejected_full == 1


def test_prune_forgets_updates_that_left_the_spool() -> None:
    t = tracker()
    for seq in (1, 2, 3):
        t.sent(seq, now=0.0)
    t.prune([2, 5])
    assert (t.awaiting, t.is_awaiting(2)) == (1, True)
