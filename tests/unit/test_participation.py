"""The lease book, the check-in pool and the flush deadline (edgefl.participation)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.participation import (
    CheckInPool,
    LeaseBook,
    LeaseVerdict,
    ParticipationConfig,
    PresenceWatch,
    flush_due,
)
from edgefl.protocol.messages import DeviceState, DeviceStatus


def book(c: int = 2, *, lease_s: float = 100.0, grace: float = 0.1, seed: int = 0) -> LeaseBook:
    cfg = ParticipationConfig(concurrency=c, lease_s=lease_s, lease_grace=grace)
    return LeaseBook(cfg, rng=np.random.default_rng(seed))


def pool_of(*devices: str, now: float = 0.0, ttl: float = 1000.0) -> CheckInPool:
    pool = CheckInPool(ttl)
    for d in devices:
        pool.check_in(d, now)
    return pool


def test_grant_fills_at_most_concurrency_slots_and_takes_devices_out_of_the_pool() -> None:
    b, pool = book(2), pool_of("a", "b", "c")

    leases = b.grant(0.0, pool, version=7)

    assert len(leases) == 2
    assert b.in_flight == 2
    assert [lease.lease_id for lease in leases] == [1, 2]
    assert all(lease.version == 7 and lease.expires_at == 100.0 for lease in leases)
    assert len(pool) == 1
    assert not any(lease.device in pool for lease in leases)
    assert b.grant(1.0, pool, version=7) == []  # no free slot


def test_a_completed_update_frees_its_slot_for_the_next_candidate() -> None:
    b, pool = book(1), pool_of("a", "b")
    (first,) = b.grant(0.0, pool, version=0)

    verdict = b.complete(first.device, first.lease_id, 50.0)
    (second,) = b.grant(50.0, pool, version=1)

    assert verdict is LeaseVerdict.VALID
    assert second.device != first.device
    assert second.lease_id == 2


def test_an_update_is_accepted_once_per_lease() -> None:
    b, pool = book(1), pool_of("a")
    (lease,) = b.grant(0.0, pool, version=0)

    assert b.complete("a", lease.lease_id, 1.0) is LeaseVerdict.VALID
    assert b.complete("a", lease.lease_id, 2.0) is LeaseVerdict.NO_LEASE


@pytest.mark.parametrize(
    ("lease_id", "device", "verdict"),
    [(None, "a", LeaseVerdict.NO_LEASE), (99, "a", LeaseVerdict.NO_LEASE)],
)
def test_updates_without_the_device_s_lease_are_refused(
    lease_id: int | None, device: str, verdict: LeaseVerdict
) -> None:
    b, pool = book(1), pool_of("a")
    b.grant(0.0, pool, version=0)

    assert b.complete(device, lease_id, 1.0) is verdict


def test_another_device_cannot_use_a_lease_it_was_not_granted() -> None:
    b, pool = book(1), pool_of("a")
    (lease,) = b.grant(0.0, pool, version=0)

    assert b.complete("b", lease.lease_id, 1.0) is LeaseVerdict.NO_LEASE
    assert b.in_flight == 1


def test_a_dead_device_frees_its_slot_when_its_lease_expires() -> None:
    b, pool = book(1, lease_s=100.0), pool_of("dead", "alive")
    (lease,) = b.grant(0.0, pool, version=0)

    assert b.grant(99.9, pool, version=0) == []
    (nxt,) = b.grant(100.0, pool, version=0)

    assert nxt.device != lease.device
    assert b.statistics().ended["expired"] == 1


def test_late_within_grace_is_accepted_after_that_expired() -> None:
    b = book(1, lease_s=100.0, grace=0.1)
    (lease,) = b.grant(0.0, pool_of("a"), version=0)
    b.expire(100.0)

    assert b.check("a", lease.lease_id, 109.0) is LeaseVerdict.LATE
    assert b.check("a", lease.lease_id, 110.0) is LeaseVerdict.EXPIRED
    assert b.complete("a", lease.lease_id, 105.0) is LeaseVerdict.LATE
    assert b.complete("a", lease.lease_id, 106.0) is LeaseVerdict.NO_LEASE  # used


def test_an_old_lease_is_dead_once_the_device_holds_a_newer_one() -> None:
    b, pool = book(1, lease_s=10.0), pool_of("a")
    (old,) = b.grant(0.0, pool, version=0)
    pool.check_in("a", 10.0)
    (new,) = b.grant(10.0, pool, version=1)

    assert new.device == "a"
    assert new.lease_id == old.lease_id + 1
    assert b.check("a", old.lease_id, 10.5) is LeaseVerdict.EXPIRED
    assert b.check("a", new.lease_id, 10.5) is LeaseVerdict.VALID


def test_release_frees_the_slot_at_once() -> None:
    b, pool = book(1), pool_of("a", "b")
    (lease,) = b.grant(0.0, pool, version=0)

    assert b.release(lease.device) == lease
    assert b.in_flight == 0
    assert len(b.grant(1.0, pool, version=0)) == 1
    assert b.check("b", lease.lease_id, 1.0) is LeaseVerdict.NO_LEASE  # not b's


def test_a_released_lease_is_redeemable_once_until_it_expires_even_under_a_newer_one() -> None:
    """An agent killed between spooling and delivering: its presence goes (release), it comes
    back, checks in, is granted a new lease, and resends the update of the old one."""
    b, pool = book(1, lease_s=100.0, grace=0.1), pool_of("a")
    (old,) = b.grant(0.0, pool, version=0)
    b.release("a")
    pool.check_in("a", 5.0)
    (new,) = b.grant(5.0, pool, version=1)

    assert b.in_flight == 1
    assert b.complete("a", old.lease_id, 6.0) is LeaseVerdict.LATE
    assert b.complete("a", old.lease_id, 7.0) is LeaseVerdict.NO_LEASE  # once
    assert b.complete("a", new.lease_id, 8.0) is LeaseVerdict.VALID


def test_a_released_lease_dies_with_its_expiry_and_survives_a_restart() -> None:
    b, pool = book(1, lease_s=100.0, grace=0.1), pool_of("a", "b")
    (lease,) = b.grant(0.0, pool, version=0)
    b.release(lease.device)

    again = LeaseBook(b.config, rng=np.random.default_rng(1), state=b.snapshot())

    assert again.snapshot().returned == (lease,)
    assert again.check(lease.device, lease.lease_id, 50.0) is LeaseVerdict.LATE
    assert again.check("b", lease.lease_id, 50.0) is LeaseVerdict.NO_LEASE
    again.expire(110.0)
    assert again.snapshot().returned == ()
    assert again.complete(lease.device, lease.lease_id, 110.0) is LeaseVerdict.NO_LEASE


def test_restore_brings_back_held_leases_so_a_restart_grants_no_more_than_c() -> None:
    b, pool = book(2), pool_of("a", "b", "c", "d")
    b.grant(0.0, pool, version=0)
    state = b.snapshot()

    again = LeaseBook(b.config, rng=np.random.default_rng(1), state=state)
    more = again.grant(1.0, pool, version=0)

    assert again.in_flight == 2
    assert more == []
    assert [lease.lease_id for lease in state.leases] == [1, 2]
    assert state.next_id == 3


def test_restore_never_reuses_a_lease_id() -> None:
    b, pool = book(1), pool_of("a", "b")
    (lease,) = b.grant(0.0, pool, version=0)
    b.complete(lease.device, lease.lease_id, 1.0)

    again = LeaseBook(b.config, rng=np.random.default_rng(1), state=b.snapshot())
    (nxt,) = again.grant(2.0, pool, version=1)

    assert nxt.lease_id == 2


def test_next_expiry_follows_held_leases() -> None:
    b, pool = book(2, lease_s=10.0), pool_of("a", "b")
    assert b.next_expiry() is None
    first, _ = b.grant(0.0, pool, version=0)
    b.complete(first.device, first.lease_id, 1.0)

    assert b.next_expiry() == 10.0
    b.expire(10.0)
    assert b.next_expiry() is None


def test_pool_expires_check_ins_and_renews_them() -> None:
    pool = CheckInPool(10.0)
    pool.check_in("a", 0.0)
    pool.check_in("b", 0.0)
    pool.check_in("b", 5.0)  # renewed until 15

    got = pool.sample(5, rng=np.random.default_rng(0), exclude=(), now=12.0)

    assert got == ["b"]
    assert "a" not in pool


def test_pool_withdraw_keeps_the_others_sampleable() -> None:
    pool = pool_of("a", "b", "c")

    assert pool.withdraw("a")
    assert not pool.withdraw("a")
    got = pool.sample(3, rng=np.random.default_rng(0), exclude=(), now=1.0)
    assert sorted(got) == ["b", "c"]


def test_big_pool_sampling_is_uniform_enough() -> None:
    pool = pool_of(*(f"d{i}" for i in range(100)))
    rng = np.random.default_rng(5)
    counts = dict.fromkeys((f"d{i}" for i in range(100)), 0)

    for _ in range(2000):
        for d in pool.sample(5, rng=rng, exclude=(), now=1.0):
            counts[d] += 1

    # 10,000 draws over 100 devices: 100 each, binomial sd about 10
    assert min(counts.values()) > 55
    assert max(counts.values()) < 145


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(
        st.tuples(
            st.sampled_from(["checkin", "grant", "complete", "release", "tick"]), st.integers(0, 7)
        ),
        max_size=80,
    ),
)
def test_in_flight_never_exceeds_c_and_each_accepted_update_had_a_lease(
    c: int, ops: list[tuple[str, int]]
) -> None:
    b, pool = book(c, lease_s=5.0), CheckInPool(20.0)
    granted: dict[int, str] = {}
    accepted: set[int] = set()
    now = 0.0
    for op, n in ops:
        device = f"d{n}"
        if op == "checkin":
            pool.check_in(device, now)
        elif op == "grant":
            granted.update({le.lease_id: le.device for le in b.grant(now, pool, version=0)})
        elif op == "complete":
            lease = b.holder(device)
            lease_id = lease.lease_id if lease is not None else n
            if b.complete(device, lease_id, now).accepted:
                assert granted.get(lease_id) == device
                assert lease_id not in accepted
                accepted.add(lease_id)
        elif op == "release":
            b.release(device)
        else:
            now += 1.0 + n
        assert b.in_flight <= c


@pytest.mark.parametrize(
    ("fill", "first", "now", "after", "due"),
    [
        (0, None, 100.0, 10.0, False),
        (1, 0.0, 9.9, 10.0, False),
        (1, 0.0, 10.0, 10.0, True),
        (3, 0.0, 1e9, None, False),
    ],
)
def test_flush_deadline(
    fill: int, first: float | None, now: float, after: float | None, due: bool
) -> None:
    assert flush_due(buffer_fill=fill, first_buffered_at=first, now=now, flush_after_s=after) is due


@pytest.mark.parametrize(
    "kwargs",
    [
        {"concurrency": 0},
        {"lease_s": 0},
        {"lease_grace": 2},
        {"checkin_ttl_s": -1},
        {"flush_after_s": float("nan")},
        {"concurrency": True},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        ParticipationConfig(**kwargs)  # type: ignore[arg-type]


def test_grant_fills_only_the_free_slots() -> None:
    b, pool = book(2), pool_of("a")
    b.grant(0.0, pool, version=0)
    for d in ("b", "c", "d"):
        pool.check_in(d, 1.0)

    more = b.grant(1.0, pool, version=0)

    assert len(more) == 1
    assert b.in_flight == 2


def _state(status: str, session: int) -> DeviceState:
    return DeviceState("f", "d1", DeviceStatus(status), session, 1.0)


def test_presence_a_will_or_shutdown_of_the_newest_session_means_gone() -> None:
    watch = PresenceWatch()

    assert watch.gone(_state("online", 3)) is False
    assert watch.gone(_state("lost", 3)) is True
    assert watch.gone(_state("offline", 4)) is True


def test_presence_a_late_will_of_an_older_connection_is_ignored() -> None:
    watch = PresenceWatch()
    watch.gone(_state("idle", 5))

    assert watch.gone(_state("lost", 4)) is False
