"""The leader and helper roles together: exact sums, membership, exclusions, restarts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefl.secagg import (
    BufferDecision,
    GaussianSumNoise,
    HelperConfig,
    HelperKeys,
    LeaderConfig,
    MissingSeeds,
    RingSpec,
    SecAggError,
    SecAggHelper,
    SecAggLeader,
    SecAggReason,
    SeedReport,
    Shares,
    encode,
    make_shares,
)

P = 64
K = 3
W_MAX = 256
SPEC = RingSpec.fit(bits=32, clip_norm=1.0, buffer_size=K, w_max=W_MAX)
HCFG = HelperConfig(spec=SPEC, num_params=P, fleet="lab", model="mlp", seed_timeout=1000.0)
LCFG = LeaderConfig(spec=SPEC, num_params=P, buffer_size=K, w_max=W_MAX, share_timeout=10.0)
KEYS = HelperKeys.generate()


def _device(key: tuple[str, int], seed: int) -> tuple[np.ndarray, Shares]:
    """One device's update (codes as signed integers) and its two shares."""
    rng = np.random.default_rng(seed)
    encoded = encode(rng.standard_normal(P).astype(np.float32) * 0.1, SPEC, rng)
    shares = make_shares(encoded, SPEC, KEYS.public_key, HCFG.context(key), seed=rng.bytes(32))
    return encoded.view(np.int32).astype(np.int64), shares


def _send(
    leader: SecAggLeader, helper: SecAggHelper, key: tuple[str, int], weight: int, seed: int = 0
) -> np.ndarray:
    codes, shares = _device(key, seed)
    leader.receive_masked(key, shares.masked, weight, now=0.0)
    report = helper.receive_sealed(key, shares.sealed, now=0.0)
    assert report is not None
    leader.helper_report(report, now=0.0)
    return codes


def _plain(codes: list[np.ndarray], weights: list[int] | None = None) -> np.ndarray:
    """``Σ w_i q_i`` over the integers (int64: no wrap at these sizes), as float64."""
    w = np.ones(len(codes), np.int64) if weights is None else np.array(weights, np.int64)
    total: np.ndarray = (w[:, None] * np.stack(codes)).sum(axis=0)
    return total.astype(np.float64)


def _roles() -> tuple[SecAggLeader, SecAggHelper]:
    return SecAggLeader(LCFG), SecAggHelper(HCFG, KEYS)


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.integers(1, W_MAX), min_size=K, max_size=K),
    seeds=st.lists(st.integers(0, 2**31), min_size=K, max_size=K, unique=True),
)
def test_leader_decodes_the_plaintext_weighted_sum_exactly(
    weights: list[int], seeds: list[int]
) -> None:
    leader, helper = _roles()
    keys = [(f"pi-{i}", s) for i, s in enumerate(seeds)]
    codes = [_send(leader, helper, k, w, s) for k, w, s in zip(keys, weights, seeds, strict=True)]

    decision = leader.decide()
    result = leader.combine(helper.apply(decision))

    assert decision.members == tuple(keys)
    assert decision.weights == tuple(weights)
    assert np.array_equal(result.total * SPEC.scale, _plain(codes, weights))
    assert result.weight_sum == sum(weights)
    assert leader.statistics()["combined"] == K


def test_an_update_without_its_seed_is_excluded_after_the_timeout() -> None:
    leader, helper = _roles()
    _, lonely = _device(("pi-x", 1), 99)
    leader.receive_masked(("pi-x", 1), lonely.masked, 10, now=0.0)  # the seed never comes
    codes = [_send(leader, helper, (f"pi-{i}", 1), 1, i) for i in range(K)]

    assert leader.expire(now=5.0) == 0  # not yet
    assert leader.expire(now=10.5) == 1
    decision = leader.decide()
    result = leader.combine(helper.apply(decision))

    assert ("pi-x", 1) not in decision.members
    assert np.array_equal(result.total * SPEC.scale, _plain(codes))
    assert leader.statistics()[SecAggReason.MISSING_HELPER_SHARE] == 1


def test_a_late_seed_is_counted_and_dropped_by_the_helper() -> None:
    leader, helper = _roles()
    _, shares = _device(("pi-x", 1), 99)
    leader.receive_masked(("pi-x", 1), shares.masked, 10, now=0.0)
    leader.expire(now=11.0)
    report = helper.receive_sealed(("pi-x", 1), shares.sealed, now=12.0)
    assert report == SeedReport(("pi-x", 1), True)

    with pytest.raises(SecAggError) as info:
        leader.helper_report(report, now=12.0)
    for i in range(K):
        _send(leader, helper, (f"pi-{i}", 1), 1, i)
    decision = leader.decide()
    helper.apply(decision)

    assert info.value.reason is SecAggReason.LATE_SHARE
    assert decision.dropped == (("pi-x", 1),)
    assert helper.statistics()[SecAggReason.DROPPED_BY_LEADER] == 1
    assert helper.statistics()["held"] == K  # only the members' seeds, until superseded


def test_a_seed_without_its_masked_share_is_excluded_and_dropped() -> None:
    leader, helper = _roles()
    _, shares = _device(("pi-x", 1), 99)
    report = helper.receive_sealed(("pi-x", 1), shares.sealed, now=0.0)
    assert report is not None
    leader.helper_report(report, now=0.0)

    leader.expire(now=11.0)
    with pytest.raises(SecAggError) as info:
        leader.receive_masked(("pi-x", 1), shares.masked, 10, now=12.0)

    assert info.value.reason is SecAggReason.LATE_SHARE
    assert leader.statistics()[SecAggReason.MISSING_LEADER_SHARE] == 1
    assert leader.statistics()[SecAggReason.LATE_SHARE] == 1


def test_a_seed_the_helper_cannot_open_excludes_the_update() -> None:
    leader, helper = _roles()
    _, shares = _device(("pi-x", 1), 99)
    leader.receive_masked(("pi-x", 1), shares.masked, 10, now=0.0)
    tampered = shares.sealed[:-1] + bytes([shares.sealed[-1] ^ 1])

    report = helper.receive_sealed(("pi-x", 1), tampered, now=0.0)
    assert report == SeedReport(("pi-x", 1), False, SecAggReason.BAD_SEAL)
    leader.helper_report(report, now=0.0)

    assert leader.statistics()[SecAggReason.HELPER_REJECTED] == 1
    assert leader.statistics()["pending"] == 0


def test_bad_weights_duplicates_and_short_shares_are_refused_and_counted() -> None:
    leader, _ = _roles()
    _, shares = _device(("pi-1", 1), 1)
    leader.receive_masked(("pi-1", 1), shares.masked, 1, now=0.0)
    cases = [
        (("pi-2", 1), shares.masked, 0, SecAggReason.BAD_WEIGHT),
        (("pi-2", 1), shares.masked, W_MAX + 1, SecAggReason.BAD_WEIGHT),
        (("pi-1", 1), shares.masked, 1, SecAggReason.DUPLICATE),
        (("pi-3", 1), shares.masked[:-4], 1, SecAggReason.BAD_SHARE),
    ]
    for key, masked, weight, reason in cases:
        with pytest.raises(SecAggError) as info:
            leader.receive_masked(key, masked, weight, now=0.0)
        assert info.value.reason is reason
    stats = leader.statistics()
    assert (stats[SecAggReason.BAD_WEIGHT], stats[SecAggReason.DUPLICATE]) == (2, 1)
    assert stats["accepted"] == 1


def test_no_decision_before_k_complete_updates_unless_flushed() -> None:
    leader, helper = _roles()
    _send(leader, helper, ("pi-0", 1), 1, 0)
    assert not leader.ready
    with pytest.raises(RuntimeError, match="need"):
        leader.decide()
    with pytest.raises(RuntimeError, match="need"):
        leader.decide(flush=True)  # one member: its sum would be the update itself
    _send(leader, helper, ("pi-1", 1), 1, 1)
    decision = leader.decide(flush=True)
    assert decision.members == (("pi-0", 1), ("pi-1", 1))


def test_a_leader_restart_between_decision_and_partial_loses_and_doubles_nothing() -> None:
    leader, helper = _roles()
    codes = [_send(leader, helper, (f"pi-{i}", 1), i + 1, i) for i in range(K + 1)]
    decision = leader.decide()
    saved = leader.snapshot()  # persisted with the decision, before publishing it

    restarted = SecAggLeader.restore(LCFG, saved)  # the leader crashed after publishing
    assert restarted.open_decision == decision  # re-published after the restart
    partial = helper.apply(decision)
    again = helper.apply(restarted.open_decision)  # the helper answers the re-publication
    result = restarted.combine(again)

    assert partial == again
    expected = _plain(codes[:K], [i + 1 for i in range(K)])
    assert np.array_equal(result.total * SPEC.scale, expected)
    with pytest.raises(SecAggError) as info:  # the first answer arrives too: not counted twice
        restarted.combine(partial)
    assert info.value.reason is SecAggReason.STALE_DECISION
    assert restarted.statistics()["combined"] == K
    assert restarted.statistics()["complete"] == 1  # the K+1-th update waits for the next buffer


def test_a_helper_restart_keeps_its_seeds_and_answers() -> None:
    leader, helper = _roles()
    for i in range(K):
        _send(leader, helper, (f"pi-{i}", 1), 1, i)
    decision = leader.decide()
    partial = helper.apply(decision)

    restarted = SecAggHelper.restore(HCFG, KEYS, helper.snapshot())

    assert restarted.apply(decision) == partial
    assert all(len(s.sealed) == 80 for s in helper.snapshot().seeds)  # sealed at rest
    with pytest.raises(SecAggError, match="does not open"):
        SecAggHelper.restore(HCFG, HelperKeys.generate(), helper.snapshot())


def test_a_later_decision_supersedes_and_an_older_one_is_stale() -> None:
    leader, helper = _roles()
    for i in range(K):
        _send(leader, helper, (f"pi-{i}", 0), 1, i)
    first = leader.decide()
    leader.combine(helper.apply(first))
    for i in range(K):
        _send(leader, helper, (f"pi-{i}", 1), 1, 10 + i)
    assert helper.statistics()["held"] == 2 * K  # the first buffer's seeds are kept until...

    helper.apply(leader.decide())  # ...a later decision shows the leader combined it

    assert helper.statistics()["held"] == K
    with pytest.raises(SecAggError) as info:
        helper.apply(first)
    assert info.value.reason is SecAggReason.STALE_DECISION


def test_a_decision_naming_a_lost_seed_is_aborted_and_the_rest_requeued() -> None:
    leader, helper = _roles()
    for i in range(K):
        _send(leader, helper, (f"pi-{i}", 1), 1, i)
    helper.expire(now=HCFG.seed_timeout + 1)  # a misconfigured helper dropped every seed
    codes = [_send(leader, helper, (f"pi-{i}", 2), 1, 10 + i) for i in range(K)]
    decision = leader.decide()

    with pytest.raises(MissingSeeds) as info:
        helper.apply(decision)
    leader.abort(info.value.missing)
    for i in range(K):  # the requeued members are decided again, in order
        _send(leader, helper, (f"pi-{i}", 3), 1, 20 + i)
    retry = leader.decide()
    result = leader.combine(helper.apply(retry))

    assert info.value.missing == frozenset(decision.members)
    assert retry.members == tuple((f"pi-{i}", 2) for i in range(K))
    assert np.array_equal(result.total * SPEC.scale, _plain(codes))
    assert leader.statistics()[SecAggReason.MISSING_HELPER_SHARE] == K
    assert helper.statistics()[SecAggReason.UNCLAIMED_SEED] == K


def test_the_noise_hook_adds_seeded_gaussian_noise_to_the_decoded_sum() -> None:
    results = []
    for noise in (None, GaussianSumNoise(stddev=0.5, seed=3), GaussianSumNoise(0.5, seed=3)):
        leader = SecAggLeader(dataclasses.replace(LCFG, noise=noise))
        helper = SecAggHelper(HCFG, KEYS)
        for i in range(K):
            _send(leader, helper, (f"pi-{i}", 1), 1, i)
        results.append(leader.combine(helper.apply(leader.decide())).total)
    clean, noisy, again = results

    assert np.array_equal(noisy, again)  # deterministic for a seed
    assert 0.3 < float(np.std(noisy - clean)) < 0.7


def test_the_pipeline_is_deterministic() -> None:
    totals = []
    for _ in range(2):
        leader, helper = _roles()
        for i in range(K):
            _send(leader, helper, (f"pi-{i}", 1), 2, i)
        totals.append(leader.combine(helper.apply(leader.decide())).total)
    assert np.array_equal(totals[0], totals[1])


def test_decisions_round_trip_through_json() -> None:
    decision = BufferDecision(4, (("pi-1", 2), ("pi-3", 4)), (5, 6), dropped=(("pi-9", 1),))
    assert BufferDecision.from_json(decision.to_json()) == decision
    with pytest.raises(ValueError, match="bad decision"):
        BufferDecision.from_json(b'{"buffer_id": 1, "members": [["a", 1]], "weights": []}')


def test_an_update_is_not_a_member_until_the_helper_reports_its_seed() -> None:
    leader, helper = _roles()
    _, lonely = _device(("pi-x", 1), 99)
    leader.receive_masked(("pi-x", 1), lonely.masked, 1, now=0.0)
    for i in range(K - 1):
        _send(leader, helper, (f"pi-{i}", 1), 1, i)
    assert not leader.ready  # K shares at the leader, but only K - 1 complete

    _send(leader, helper, ("pi-last", 1), 1, 7)
    decision = leader.decide()

    assert ("pi-x", 1) not in decision.members
    assert leader.statistics()["pending"] == 1


def test_a_redelivered_seed_is_reported_again_and_a_conflicting_one_is_a_duplicate() -> None:
    _, helper = _roles()
    _, shares = _device(("pi-1", 1), 1)
    _, other = _device(("pi-1", 1), 2)
    first = helper.receive_sealed(("pi-1", 1), shares.sealed, now=0.0)

    again = helper.receive_sealed(("pi-1", 1), shares.sealed, now=1.0)  # QoS 1 redelivery
    conflict = helper.receive_sealed(("pi-1", 1), other.sealed, now=1.0)

    assert first == again == SeedReport(("pi-1", 1), True)
    assert conflict is None
    assert helper.statistics()[SecAggReason.DUPLICATE] == 1
    assert helper.statistics()["accepted"] == 1


def test_the_helper_refuses_decisions_that_would_isolate_one_update() -> None:
    leader, helper = _roles()
    for i in range(K):
        _send(leader, helper, (f"pi-{i}", 1), 1, i)
    first = leader.decide()
    helper.apply(first)
    _send(leader, helper, ("pi-new", 1), 1, 9)
    overlapping = BufferDecision(first.buffer_id + 1, (first.members[0], ("pi-new", 1)), (1, 1))
    alone = BufferDecision(first.buffer_id + 1, (("pi-new", 1),), (1,))

    for bad in (overlapping, alone):
        with pytest.raises(SecAggError) as info:
            helper.apply(bad)
        assert info.value.reason is SecAggReason.BAD_DECISION
    assert helper.statistics()[SecAggReason.BAD_DECISION] == 2
