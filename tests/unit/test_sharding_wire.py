"""The wire form of a shard's partial sum (edgefl.sharding.wire): exact round trip, every
malformed input rejected with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgefl.errors import ProtocolError, RejectReason
from edgefl.sharding.partial import PartialId, PartialSum
from edgefl.sharding.wire import decode_partial, encode_partial

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,12}", fullmatch=True)
nats = st.integers(0, 2**63 - 1)


@st.composite
def partials(draw: st.DrawFn) -> PartialSum:
    n = draw(st.integers(1, 6))
    covered = draw(st.lists(st.tuples(names, nats), min_size=n, max_size=n, unique=True))
    acc = draw(arrays(np.float32, draw(st.integers(1, 32)), elements=st.floats(width=32)))
    return PartialSum(
        id=PartialId(draw(names), draw(st.integers(0, 65535)), draw(nats), draw(nats)),
        version=draw(nats),
        accumulator=acc,
        weight_sum=draw(st.floats(0, 1e12)),
        count=n,
        staleness_sum=draw(nats),
        staleness_max=draw(nats),
        clipped=draw(st.integers(0, n)),
        covered=tuple(covered),
    )


def _same(a: PartialSum, b: PartialSum) -> bool:
    fields = ("id", "version", "weight_sum", "count", "staleness_sum", "staleness_max")
    return (
        all(getattr(a, f) == getattr(b, f) for f in fields)
        and (a.clipped, a.covered) == (b.clipped, b.covered)
        and a.accumulator.tobytes() == b.accumulator.tobytes()
    )


@given(partials())
def test_round_trip_is_exact(partial: PartialSum) -> None:
    decoded = decode_partial(encode_partial(partial), max_params=32)

    assert _same(decoded, partial)


def _sample() -> bytes:
    acc = np.arange(4, dtype=np.float32)
    p = PartialSum(PartialId("s0", 3, 1, 7), 5, acc, 2.5, 2, 1, 1, 0, (("d1", 4), ("d2", 9)))
    return encode_partial(p)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:10], RejectReason.TRUNCATED),
        (lambda b: b"XXXX" + b[4:], RejectReason.BAD_MAGIC),
        (lambda b: b[:4] + b"\x02" + b[5:], RejectReason.BAD_VERSION),
        (lambda b: b[:-9] + bytes([b[-9] ^ 1]) + b[-8:], RejectReason.BAD_CHECKSUM),
    ],
    ids=["truncated", "magic", "version", "bitflip"],
)
def test_malformed_partials_are_rejected_by_reason(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError) as info:
        decode_partial(mutate(_sample()), max_params=100)

    assert info.value.reason is reason


def test_declared_size_is_bounded_before_allocation() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_partial(_sample(), max_params=3)

    assert info.value.reason is RejectReason.TOO_LARGE
