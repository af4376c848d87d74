"""Protocol 1.1 receipts: the topic, the RECEIPT message, the aggregator's receipt builder, the
sequence window against the seq lock-out, and clamped timestamps."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.envelope import EnvelopeKind, encode_envelope
from edgefl.protocol.messages import (
    FEATURE_RECEIPTS,
    MAX_TIMESTAMP,
    DeviceState,
    Receipt,
    ServerState,
    UpdateHeader,
    check_topic,
    clamp_timestamp,
    decode_message,
    encode_message,
)
from edgefl.protocol.receipts import CommitOutcome, ReceiptBook, seq_ranges
from edgefl.protocol.sequence import (
    SeqVerdict,
    recovered_high_water,
    seq_acceptable,
    seq_verdict,
)
from edgefl.protocol.topics import (
    NAME_PATTERN,
    ReceiptTopic,
    TopicKind,
    parse_topic,
    receipt_topic,
    receipts_filter,
)
from edgefl.security import Ed25519ManifestVerifier, Ed25519Signer, generate_private_key

MAX_INT = 2**63 - 1
names = st.from_regex(NAME_PATTERN, fullmatch=True)
seqs = st.integers(0, MAX_INT)


# --------------------------------------------------------------------------- topic


def test_receipt_topic_builds_and_parses() -> None:
    topic = receipt_topic("farm", "pi-1")
    assert topic == "edgefl/v1/farm/device/pi-1/receipt"
    parsed = parse_topic(topic, expected_fleet="farm")
    assert parsed == ReceiptTopic("farm", "pi-1")
    assert parsed.kind is TopicKind.DEVICE_RECEIPT
    assert parsed.topic == topic
    assert receipts_filter("farm") == "edgefl/v1/farm/device/+/receipt"


@pytest.mark.parametrize(
    "topic",
    [
        "edgefl/v1/farm/device/pi-1/receipt/1",
        "edgefl/v1/farm/device/pi-1/receipts",
        "edgefl/v1/farm/device/+/receipt",
    ],
)
def test_receipt_topic_variants_are_rejected(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_topic(topic)


# --------------------------------------------------------------------------- message


@st.composite
def receipts(draw: st.DrawFn) -> Receipt:
    chosen = sorted(draw(st.sets(st.integers(0, 10_000), max_size=40)))
    committed = [s for s in chosen if draw(st.booleans())]
    rejected = {s: draw(st.sampled_from(["stale", "replay", "newer_reason"])) for s in chosen}
    for s in committed:
        rejected.pop(s)
    through = None
    if committed or draw(st.booleans()):
        through = max(committed, default=0) + draw(st.integers(0, 5))
    return Receipt(
        fleet=draw(names),
        device_id=draw(names),
        at=draw(st.floats(0, 4e9)),
        through=through,
        committed=seq_ranges(committed),
        rejected=rejected,
    )


@given(receipts())
def test_receipt_round_trips_through_header_and_envelope(receipt: Receipt) -> None:
    assert Receipt.from_header(receipt.to_header()) == receipt
    data = encode_message(receipt)
    topic = parse_topic(receipt_topic(receipt.fleet, receipt.device_id))
    assert decode_message(data, Receipt, topic=topic) == receipt


@given(st.sets(st.integers(0, 200), max_size=60))
def test_seq_ranges_cover_exactly_the_seqs(chosen: set[int]) -> None:
    ranges = seq_ranges(chosen)
    covered = {s for lo, hi in ranges for s in range(lo, hi + 1)}
    assert covered == chosen
    receipt = Receipt("f", "d", 0.0, through=max(chosen, default=0), committed=ranges)
    assert all(receipt.is_committed(s) for s in chosen)
    assert not any(receipt.is_committed(s) for s in set(range(202)) - chosen)


def test_receipt_header_is_compact_json() -> None:
    receipt = Receipt("farm", "pi-1", 5.0, through=9, committed=((8, 9),), rejected={7: "stale"})
    data = encode_message(receipt)
    assert data[16:-4] == (
        b'{"at":5.0,"committed":[[8,9]],"device_id":"pi-1","fleet":"farm",'
        b'"rejected":{"7":"stale"},"through":9}'
    )
    assert len(data) == 20 + len(data[16:-4])
    assert receipt.settles(9)
    assert receipt.settles(7)
    assert not receipt.settles(10)


@pytest.mark.parametrize(
    "overrides",
    [
        {"committed": [[3, 2]]},  # lo > hi
        {"committed": [[1, 3], [3, 5]]},  # overlapping
        {"committed": [[1, 3], [4, 5]]},  # adjacent: must be one range
        {"committed": [[4, 5], [1, 2]]},  # not ascending
        {"committed": [[1, 2, 3]]},
        {"committed": [[1, 12]]},  # above through
        {"through": None, "committed": [[1, 1]]},
        {"rejected": {"2": "stale"}},  # also committed
        {"rejected": {"01": "stale"}},  # not canonical
        {"rejected": {"-1": "stale"}},
        {"rejected": {"5": ""}},
        {"through": -1},
        {"committed": [[0, 1]] * 0 + [[i * 2, i * 2] for i in range(1025)], "through": 5000},
    ],
)
def test_invalid_receipts_are_bad_header(overrides: dict[str, Any]) -> None:
    header: dict[str, Any] = {
        "fleet": "f",
        "device_id": "d",
        "at": 1.0,
        "through": 10,
        "committed": [[1, 2]],
    }
    header.update(overrides)
    with pytest.raises(ProtocolError) as exc_info:
        Receipt.from_header(header)
    assert exc_info.value.reason is RejectReason.BAD_HEADER


def test_receipt_must_match_its_topic() -> None:
    receipt = Receipt("farm", "pi-1", 1.0, through=0, committed=((0, 0),))
    check_topic(receipt, ReceiptTopic("farm", "pi-1"))
    with pytest.raises(ProtocolError) as exc_info:
        check_topic(receipt, ReceiptTopic("farm", "pi-2"))  # another device's receipt topic
    assert exc_info.value.reason is RejectReason.BAD_HEADER
    with pytest.raises(ProtocolError) as kind_info:
        decode_message(encode_envelope(EnvelopeKind.DEVICE_STATE, {}), Receipt)
    assert kind_info.value.reason is RejectReason.BAD_KIND


def test_new_optional_fields_default_for_old_senders() -> None:
    state = ServerState.from_header(
        {"fleet": "f", "status": "online", "session": 1, "version": 0, "buffer_fill": 0,
         "buffer_size": 1, "applied": 0, "started_at": 0, "at": 0}
    )  # fmt: skip
    assert state.features == ()
    device = DeviceState.from_header(
        {"fleet": "f", "device_id": "d", "status": "idle", "session": 1, "at": 0}
    )
    assert (device.spool_depth, device.awaiting_receipt) == (None, None)
    newer = ServerState.from_header({**state.to_header(), "features": [FEATURE_RECEIPTS]})
    assert newer.features == (FEATURE_RECEIPTS,)


# --------------------------------------------------------------------------- builder


def test_builder_reports_committed_ranges_and_final_rejections_per_device() -> None:
    # Arrange: device a has committed up to 4 before this batch
    book = ReceiptBook("farm", {"a": 4})
    batch = [
        CommitOutcome("a", 5),
        CommitOutcome("a", 6),
        CommitOutcome("a", 3, RejectReason.DUPLICATE),  # a resend of a committed update
        CommitOutcome("a", 2, RejectReason.REPLAY),  # below the mark, never committed
        CommitOutcome("a", 9, RejectReason.STALE),
        CommitOutcome("b", 0, RejectReason.BAD_SIGNATURE),  # maybe forged: not receipted
        CommitOutcome("c", 0, RejectReason.RATE_LIMITED),  # transient: not receipted
        CommitOutcome("d", 7),
    ]
    # Act
    got = book.receipt_messages(batch, now=100.0)
    # Assert
    assert got == [
        Receipt("farm", "a", 100.0, through=6, committed=((3, 3), (5, 6)),
                rejected={2: "replay", 9: "stale"}),
        Receipt("farm", "d", 100.0, through=7, committed=((7, 7),)),
    ]  # fmt: skip
    assert (book.high_water("a"), book.high_water("b"), book.high_water("d")) == (6, None, 7)


def test_builder_keeps_the_mark_across_batches_and_rejection_only_receipts() -> None:
    book = ReceiptBook("farm")
    book.receipt_messages([CommitOutcome("a", 0), CommitOutcome("a", 1)], now=1.0)
    (second,) = book.receipt_messages([CommitOutcome("a", 2, RejectReason.STALE)], now=2.0)
    assert second == Receipt("farm", "a", 2.0, through=1, rejected={2: "stale"})
    (fresh,) = book.receipt_messages([CommitOutcome("n", 0, RejectReason.NORM_BOUND)], now=3.0)
    assert fresh.through is None


def test_duplicate_above_the_mark_is_a_rejection_not_a_commit() -> None:
    # FedAvg refuses a second update of a device in one round as DUPLICATE: a new seq
    book = ReceiptBook("farm", {"a": 3})
    (receipt,) = book.receipt_messages([CommitOutcome("a", 8, RejectReason.DUPLICATE)], now=0.0)
    assert receipt.committed == ()
    assert receipt.rejected == {8: "duplicate"}


def test_original_and_resend_in_one_batch_are_one_commit() -> None:
    book = ReceiptBook("farm")
    (receipt,) = book.receipt_messages(
        [CommitOutcome("a", 0), CommitOutcome("a", 0, RejectReason.DUPLICATE)], now=0.0
    )
    assert (receipt.committed, receipt.rejected, receipt.through) == (((0, 0),), {}, 0)


def test_builder_splits_more_than_1024_ranges() -> None:
    book = ReceiptBook("farm")
    outs = [CommitOutcome("a", 2 * i) for i in range(1500)]
    first, second = book.receipt_messages(outs, now=0.0)
    assert len(first.committed) == 1024
    assert len(second.committed) == 476
    assert first.through == second.through == 2998


def test_signed_receipts_verify_with_the_aggregator_key_and_only_as_receipts() -> None:
    key = generate_private_key()
    book = ReceiptBook("farm", signer=Ed25519Signer(key))
    ((topic, payload),) = book.receipts([CommitOutcome("pi-1", 0)], now=1.0)
    assert topic == "edgefl/v1/farm/device/pi-1/receipt"
    Ed25519ManifestVerifier([key.public_key()], kinds=(EnvelopeKind.RECEIPT,)).verify(payload)
    with pytest.raises(ProtocolError) as exc_info:  # a signed receipt is no manifest
        Ed25519ManifestVerifier([key.public_key()]).verify(payload)
    assert exc_info.value.reason is RejectReason.BAD_SIGNATURE
    assert decode_message(payload, Receipt).committed == ((0, 0),)


# --------------------------------------------------------------------------- seq window


@pytest.mark.parametrize(
    ("last", "seq", "verdict"),
    [
        (None, 0, SeqVerdict.NEW),
        (None, 9, SeqVerdict.NEW),
        (None, 10, SeqVerdict.TOO_FAR),  # a new device starts below max_jump
        (5, 5, SeqVerdict.SEEN),
        (5, 4, SeqVerdict.LATE),  # inside the window: new unless counted (the caller's set)
        (5, 0, SeqVerdict.LATE),
        (300, 45, SeqVerdict.LATE),  # 255 below: the lowest seq of the window
        (300, 44, SeqVerdict.TOO_OLD),  # 256 below: refused for good
        (MAX_INT, 0, SeqVerdict.TOO_OLD),
        (5, 6, SeqVerdict.NEW),
        (5, 15, SeqVerdict.NEW),
        (5, 16, SeqVerdict.TOO_FAR),
        (5, MAX_INT, SeqVerdict.TOO_FAR),
    ],
)
def test_seq_verdict(last: int | None, seq: int, verdict: SeqVerdict) -> None:
    assert seq_verdict(last, seq, max_jump=10) is verdict
    assert seq_acceptable(last, seq, 10) is (verdict is SeqVerdict.NEW)


def test_a_window_of_one_is_the_bare_high_water_rule() -> None:
    assert seq_verdict(5, 4, max_jump=10, window=1) is SeqVerdict.TOO_OLD
    assert seq_verdict(5, 4, max_jump=10, window=2) is SeqVerdict.LATE
    assert seq_verdict(5, 3, max_jump=10, window=2) is SeqVerdict.TOO_OLD
    with pytest.raises(ValueError, match="window must be an int"):
        seq_verdict(5, 4, max_jump=10, window=0)


def test_receipts_of_out_of_order_commits_keep_through_at_the_highest_seq() -> None:
    # Arrange: a device's 5 is committed, then (redelivered late) 3, a resend of 5, then 4, and
    # a replay far below the window; what the aggregator's window accepts, batch by batch
    book = ReceiptBook("farm")
    batches = [
        [CommitOutcome("a", 5)],
        [CommitOutcome("a", 3), CommitOutcome("a", 5, RejectReason.DUPLICATE)],
        [CommitOutcome("a", 4), CommitOutcome("a", 3, RejectReason.DUPLICATE)],
    ]

    # Act
    got = [book.receipt_messages(b, now=float(i)) for i, b in enumerate(batches)]

    # Assert: `through` never goes down; a late seq below it is named as committed, so the
    # device deletes it (an unnamed one at or below `through` is resent at once by the device)
    assert got == [
        [Receipt("farm", "a", 0.0, through=5, committed=((5, 5),))],
        [Receipt("farm", "a", 1.0, through=5, committed=((3, 3), (5, 5)))],
        [Receipt("farm", "a", 2.0, through=5, committed=((3, 4),))],
    ]


def test_a_max_seq_update_cannot_lock_a_device_out() -> None:
    # the attack of issue 15: seq 2**63-1 is refused, so seq 1 after it is still acceptable
    last = 0
    assert not seq_acceptable(last, MAX_INT, 2**32)
    assert seq_acceptable(last, 1, 2**32)


def test_seq_verdict_rejects_bad_arguments() -> None:
    for args in ((None, -1, 5), (None, MAX_INT + 1, 5), (None, 0, 0), (-1, 0, 5), (None, 0, True)):
        with pytest.raises(ValueError, match="must be an int"):
            seq_verdict(*args)  # type: ignore[arg-type]


def test_recovered_high_water_skips_the_far_jump_and_everything_after() -> None:
    assert recovered_high_water([0, 1, 2, MAX_INT, 3], max_jump=2**32) == 3
    assert recovered_high_water([4, 2, 7], max_jump=3) == 7
    assert recovered_high_water([2, 9, 10], max_jump=3) == 2
    assert recovered_high_water([MAX_INT], max_jump=2**32) is None
    assert recovered_high_water([], max_jump=5) is None


@given(st.lists(st.integers(0, 100), max_size=30), st.integers(1, 20))
def test_recovered_high_water_is_acceptable_chain(committed: list[int], jump: int) -> None:
    mark = recovered_high_water(committed, jump)
    if mark is not None:
        assert mark in committed
        below = sorted({s for s in committed if s <= mark})
        assert all(seq_acceptable(a, b, jump) for a, b in zip([None, *below], below, strict=False))


# --------------------------------------------------------------------------- timestamps


def _update(created_at: float) -> UpdateHeader:
    return UpdateHeader(
        fleet="f", device_id="d", seq=0, base_version=0, num_examples=1, model="m",
        codec={}, num_params=1, created_at=created_at,
    )  # fmt: skip


def test_absurd_timestamps_are_clamped_not_rejected() -> None:
    assert _update(1e300).created_at == MAX_TIMESTAMP
    assert _update(1.7e9).created_at == 1.7e9
    header = _update(1.7e9).to_header() | {"created_at": 1e300}
    assert UpdateHeader.from_header(header).created_at == MAX_TIMESTAMP
    with pytest.raises(ProtocolError):
        _update(-1.0)  # a negative time is malformed, not an untrusted clock


def test_clamp_timestamp_bounds_what_is_stored_or_shown() -> None:
    now = 1_700_000_000.0
    assert clamp_timestamp(1e300, now=now) == now + 86400.0
    assert clamp_timestamp(MAX_TIMESTAMP, now=now, max_ahead=60.0) == now + 60.0
    assert clamp_timestamp(12.0, now=now) == 12.0  # a Pi before NTP: kept, it is in range
    assert clamp_timestamp(-5.0, now=now) == 0.0
    assert clamp_timestamp(float("inf"), now=now) == now
    assert clamp_timestamp(float("nan"), now=now) == now
