"""The agent's sans-IO participation rules (protocol 1.2, device_agent.training_policy): when to
check in, renew and withdraw, when to train under a lease, the per-lease seed, the abort reason."""

from __future__ import annotations

import dataclasses
import math

import pytest
from agent_helpers import server_state

from device_agent.dataset import device_seed
from device_agent.training_policy import (
    AbortReason,
    CheckInAction,
    HeldLease,
    Presence,
    Resync,
    abort_reason,
    check_in_action,
    lease_expired,
    leases_mode,
    leases_required,
    marks_version_done,
    renew_interval,
    resync_action,
    should_fetch,
    should_train_leased,
    status_line,
    training_seed,
    undecided_wait,
)
from edgefl.protocol.messages import (
    FEATURE_LEASES,
    FEATURE_RECEIPTS,
    DeviceStatus,
    Participation,
    ServerStatus,
)

IDLE, CHECKED_IN, LEASED = Presence.IDLE, Presence.CHECKED_IN, Presence.LEASED
NONE, CHECK_IN, WITHDRAW = CheckInAction.NONE, CheckInAction.CHECK_IN, CheckInAction.WITHDRAW


SETTINGS = Participation(concurrency=10, lease_s=60.0, checkin_ttl_s=120.0)


@pytest.mark.parametrize(
    ("features", "participation", "expected"),
    [
        ((FEATURE_RECEIPTS, FEATURE_LEASES), SETTINGS, True),
        ((FEATURE_LEASES,), SETTINGS, True),
        ((FEATURE_RECEIPTS,), None, False),  # a protocol 1.1 aggregator
        ((FEATURE_RECEIPTS,), SETTINGS, False),  # settings without the feature
        ((FEATURE_LEASES,), None, False),  # the feature without settings
        ((), None, False),  # protocol 1.0
    ],
)
def test_leases_required_only_with_the_feature_and_the_settings(
    features: tuple[str, ...], participation: Participation | None, expected: bool
) -> None:
    assert leases_required(server_state(features, participation)) is expected


def test_renewal_at_half_the_checkin_lifetime() -> None:
    assert renew_interval(120.0) == 60.0


@pytest.mark.parametrize(
    ("presence", "eligible", "stopping", "has_model", "renew_due", "expected"),
    [
        # idle: check in when eligible with a model, else stay quiet
        (IDLE, True, False, True, False, CHECK_IN),
        (IDLE, True, False, False, False, NONE),  # no model yet
        (IDLE, False, False, True, True, NONE),  # not eligible: nothing to withdraw
        (IDLE, True, True, True, True, NONE),  # stopping
        # a candidate: renew when due, withdraw when it can no longer train
        (CHECKED_IN, True, False, True, False, NONE),
        (CHECKED_IN, True, False, True, True, CHECK_IN),
        (CHECKED_IN, False, False, True, False, WITHDRAW),
        (CHECKED_IN, True, True, True, False, WITHDRAW),
        # a lease holder: quiet while it can train (no renewal), withdraws otherwise
        (LEASED, True, False, True, True, NONE),
        (LEASED, True, False, False, True, NONE),  # waiting for the lease's model
        (LEASED, False, False, True, False, WITHDRAW),
        (LEASED, True, True, True, False, WITHDRAW),
    ],
)
def test_check_in_action(
    presence: Presence,
    eligible: bool,
    stopping: bool,
    has_model: bool,
    renew_due: bool,
    expected: CheckInAction,
) -> None:
    conditions = {"eligible": eligible, "stopping": stopping, "has_model": has_model}
    assert check_in_action(presence=presence, renew_due=renew_due, **conditions) is expected


LEASE = HeldLease(lease_id=7, version=4, deadline=100.0)


@pytest.mark.parametrize(
    ("model_version", "lease", "eligible", "stopping", "now", "expected"),
    [
        (4, LEASE, True, False, 50.0, True),  # the lease's version
        (5, LEASE, True, False, 50.0, True),  # a newer one is fine
        (3, LEASE, True, False, 50.0, False),  # wait for v4
        (None, LEASE, True, False, 50.0, False),  # no model yet
        (4, None, True, False, 50.0, False),  # no lease: never under leases
        (4, LEASE, False, False, 50.0, False),
        (4, LEASE, True, True, 50.0, False),
        (4, LEASE, True, False, 100.0, False),  # expired at the deadline
        (4, LEASE, True, False, 99.9, True),
    ],
)
def test_should_train_leased(
    model_version: int | None,
    lease: HeldLease | None,
    eligible: bool,
    stopping: bool,
    now: float,
    expected: bool,
) -> None:
    wanted = should_train_leased(
        model_version=model_version, lease=lease, eligible=eligible, stopping=stopping, now=now
    )
    assert wanted is expected


def test_lease_expires_at_its_local_deadline() -> None:
    assert not lease_expired(LEASE, 99.0)
    assert lease_expired(LEASE, 100.0)


def test_training_seed_differs_per_lease_and_is_deterministic() -> None:
    base = device_seed("pi-1")
    assert training_seed("pi-1", 3) == (base + 3) % 2**31  # protocol 1.1: as before
    assert training_seed("pi-1", 3, 1) == (base + 3 + 1_000_003) % 2**31
    seeds = {training_seed("pi-1", v, lease) for v in range(5) for lease in range(1, 50)}
    assert len(seeds) == 5 * 49  # every (version, lease) of a device trains differently
    assert training_seed("pi-1", 3, 9) == training_seed("pi-1", 3, 9)
    assert training_seed("pi-1", 3, 9) != training_seed("pi-2", 3, 9)


@pytest.mark.parametrize(
    ("failed", "requested", "timed_out", "expired", "expected"),
    [
        (False, None, False, True, AbortReason.LEASE_EXPIRED),
        (False, None, True, True, AbortReason.LEASE_EXPIRED),  # the lease ran out first
        (False, AbortReason.INELIGIBLE, False, True, AbortReason.INELIGIBLE),
        (True, None, False, True, AbortReason.ERROR),
        (False, None, True, False, AbortReason.TIMEOUT),
    ],
)
def test_abort_reason_lease_expired(
    failed: bool,
    requested: AbortReason | None,
    timed_out: bool,
    expired: bool,
    expected: AbortReason,
) -> None:
    reason = abort_reason(
        failed=failed, requested=requested, timed_out=timed_out, lease_expired=expired
    )
    assert reason is expected


def test_an_expired_lease_does_not_give_the_version_up() -> None:
    assert not marks_version_done(AbortReason.LEASE_EXPIRED)


def test_status_line_says_waiting_for_a_slot() -> None:
    common = {
        "status": DeviceStatus.IDLE,
        "model_version": 3,
        "connected": True,
        "spool_depth": 0,
        "updates_sent": 2,
        "reasons": (),
    }
    waiting = status_line(**common, waiting_for_slot=True)  # type: ignore[arg-type]
    assert waiting == "idle; model v3; connected; spool 0; sent 2; waiting for a training slot"
    assert "slot" not in status_line(**common)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("leases", "held", "lease_version", "expected"),
    [
        (False, 3, None, True),  # protocol 1.1: every version
        (True, None, None, True),  # no model yet: one is needed to check in
        (True, 3, None, False),  # waiting for a slot: keep the manifest for later
        (True, 3, 4, True),  # the lease asks for v4
        (True, 4, 4, False),  # the lease's version is held already
    ],
)
def test_should_fetch(
    leases: bool, held: int | None, lease_version: int | None, expected: bool
) -> None:
    assert should_fetch(leases=leases, held_version=held, lease_version=lease_version) is expected


@pytest.mark.parametrize(
    ("presence", "reconnected", "update_pending", "expected"),
    [
        (CHECKED_IN, True, False, Resync.REJOIN),  # release a lease whose message was lost
        (CHECKED_IN, True, True, Resync.RENEW),  # the held lease is its update's: keep it
        (CHECKED_IN, False, False, Resync.NONE),
        (LEASED, True, False, Resync.NONE),  # it holds its lease: nothing to recover
        (IDLE, True, False, Resync.NONE),  # not a candidate: it checks in anyway when it can
    ],
)
def test_resync_action(
    presence: Presence, reconnected: bool, update_pending: bool, expected: Resync
) -> None:
    action = resync_action(
        presence=presence, reconnected=reconnected, update_pending=update_pending
    )
    assert action is expected


@pytest.mark.parametrize("current", [True, False, None])
def test_a_stopped_or_lost_aggregator_does_not_change_the_leases_mode(current: bool | None) -> None:
    online = server_state((FEATURE_LEASES,), SETTINGS)
    for status in (ServerStatus.OFFLINE, ServerStatus.LOST):
        # its Last Will may carry the feature without the settings
        will = dataclasses.replace(online, status=status, participation=None)
        assert leases_mode(will, current) is current
    assert leases_mode(online, current) is True


@pytest.mark.parametrize(
    ("leases", "connected_at", "now", "expected"),
    [
        (True, None, 0.0, None),  # decided (seen, or remembered): no wait
        (False, 10.0, 10.0, None),
        (None, None, 5.0, math.inf),  # never connected: wait for the broker
        (None, 10.0, 10.5, 1.5),  # connected half a second ago: 1.5 s of the 2 s grace left
        (None, 10.0, 12.0, None),  # no server state within the grace: train as with 1.1
    ],
)
def test_undecided_wait(
    leases: bool | None, connected_at: float | None, now: float, expected: float | None
) -> None:
    wait = undecided_wait(leases=leases, connected_at=connected_at, now=now, grace_s=2.0)
    assert wait == expected
