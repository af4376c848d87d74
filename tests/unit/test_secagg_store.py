"""The SQLite stores of the secure-aggregation roles: after any sequence of changes, each written
as the difference of two snapshots, the file reloads to the role's exact state."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefl.aggregation import FedBuff, FedBuffConfig, FedBuffState
from edgefl.aggregator.secagg_store import HelperStore, LeaderStore, ModelRow
from edgefl.secagg import (
    BufferDecision,
    HelperConfig,
    HelperKeys,
    LeaderConfig,
    LeaderSnapshot,
    MissingSeeds,
    RingSpec,
    SecAggError,
    SecAggHelper,
    SecAggLeader,
    ShareContext,
    encode,
    make_shares,
)

P, K = 16, 3
SPEC = RingSpec.fit(bits=32, clip_norm=1.0, buffer_size=K, w_max=8)
KEYS = HelperKeys.generate()
LCFG = LeaderConfig(SPEC, P, buffer_size=K, w_max=8, share_timeout=5.0, memory=6)
HCFG = HelperConfig(SPEC, P, "f", "m", seed_timeout=8.0)

# one step: (kind, device index, flag) -- share, report ok/bad, expire, decide-and-answer
steps = st.lists(
    st.tuples(st.sampled_from(["share", "report", "expire", "answer"]), st.integers(0, 7)),
    max_size=40,
)


def _shares(device: int) -> tuple[bytes, bytes]:
    ctx = ShareContext("f", f"d{device}", 1, "m", P, 32)
    x = encode(np.full(P, 0.01 * device, np.float32), SPEC, np.random.default_rng(device))
    s = make_shares(x, SPEC, KEYS.public_key, ctx)
    return s.masked, s.sealed


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps)
def test_both_stores_reload_every_state_they_were_written(
    tmp_path_factory: pytest.TempPathFactory, plan: list[tuple[str, int]]
) -> None:
    # Arrange
    where = tmp_path_factory.mktemp("store")
    lstore, hstore = LeaderStore(where / "l.sqlite"), HelperStore(where / "h.sqlite")
    leader, helper = SecAggLeader(LCFG), SecAggHelper(HCFG, KEYS)
    lbefore, hbefore = None, None
    clock = 0.0

    # Act: every change is written as a diff, then the file must reload to the same state
    for kind, device in plan:
        clock += 1.0
        key = (f"d{device}", 1)
        masked, sealed = _shares(device)
        try:
            if kind == "share":
                leader.receive_masked(key, masked, 1 + device % 8, clock)
            elif kind == "report":
                report = helper.receive_sealed(key, sealed, clock)
                if report is not None:
                    leader.helper_report(report, clock)
            elif kind == "expire":  # the helper may drop a seed the leader counts on (abort)
                leader.expire(clock + 10.0 * (device % 2))
                helper.expire(clock)
            elif leader.ready:
                decision = leader.decide()
                try:
                    leader.combine(helper.apply(decision))
                except MissingSeeds as exc:
                    leader.abort(exc.missing)
        except SecAggError:
            pass
        lafter, hafter = leader.snapshot(), helper.snapshot()
        model = ModelRow(int(clock), clock, _state()) if kind == "answer" else None
        lstore.write(lbefore, lafter, model=model)
        hstore.write(hbefore, hafter)
        lbefore, hbefore = lafter, hafter

        # Assert (pending shares and announcements are unordered; closed keys are ordered)
        loaded, _ = lstore.load()
        assert loaded is not None
        assert _unordered(loaded) == _unordered(lafter)
        assert loaded.closed == lafter.closed
        assert hstore.load() == hafter
    lstore.close()
    hstore.close()


def _unordered(s: LeaderSnapshot) -> LeaderSnapshot:
    return dataclasses.replace(
        s, pending=tuple(sorted(s.pending, key=str)), announced=tuple(sorted(s.announced))
    )


def _state() -> FedBuffState:
    return FedBuff(FedBuffConfig(), np.zeros(4, np.float32)).snapshot(buffer=False)


def test_leader_store_keeps_the_model_with_its_step(tmp_path: Path) -> None:
    store = LeaderStore(tmp_path / "l.sqlite")
    leader = SecAggLeader(LCFG)
    assert store.load() == (None, None)
    store.write(None, leader.snapshot(), model=ModelRow(3, 12.5, _state()), device_seq=("d", 4))
    snapshot, model = store.load()
    assert snapshot == leader.snapshot()
    assert model is not None
    assert (model.version, model.created_at) == (3, 12.5)
    assert store.max_seqs() == {"d": 4}
    store.check_identity({"fleet": "f"})
    with pytest.raises(ValueError, match="belongs to"):
        store.check_identity({"fleet": "g"})
    assert store.next_session() == 1
    assert store.next_session() == 2


def test_helper_store_keeps_answered_decisions(tmp_path: Path) -> None:
    store = HelperStore(tmp_path / "h.sqlite")
    helper = SecAggHelper(HCFG, KEYS)
    for device in range(2):
        helper.receive_sealed((f"d{device}", 1), _shares(device)[1], 1.0)
    before = helper.snapshot()
    store.write(None, before)
    helper.apply(BufferDecision(0, (("d0", 1), ("d1", 1)), (1, 1)))
    store.write(before, helper.snapshot())
    loaded = store.load()
    assert loaded == helper.snapshot()
    assert loaded is not None
    restored = SecAggHelper.restore(HCFG, KEYS, loaded)
    again = restored.apply(BufferDecision(0, (("d0", 1), ("d1", 1)), (1, 1)))
    assert again == helper.apply(BufferDecision(0, (("d0", 1), ("d1", 1)), (1, 1)))


def test_leader_store_after_an_aborted_decision(tmp_path: Path) -> None:
    # Arrange: three complete updates; the helper lost the seed of d0 (expired)
    store = LeaderStore(tmp_path / "l.sqlite")
    leader, helper = SecAggLeader(LCFG), SecAggHelper(HCFG, KEYS)
    for device in range(3):
        masked, sealed = _shares(device)
        leader.receive_masked((f"d{device}", 1), masked, 1, 0.0)
        report = helper.receive_sealed((f"d{device}", 1), sealed, float(device))
        assert report is not None
        leader.helper_report(report, 0.0)
    helper.expire(8.5)  # d0's seed only
    decision = leader.decide()
    before = leader.snapshot()
    store.write(None, before)

    # Act
    with pytest.raises(MissingSeeds) as info:
        helper.apply(decision)
    leader.abort(info.value.missing)
    store.write(before, leader.snapshot())

    # Assert: d0 is closed again, at the end of the memory, and the rest is queued again
    loaded, _ = store.load()
    assert loaded is not None
    assert loaded.closed == leader.snapshot().closed
    assert loaded.closed[-1] == (("d0", 1), "secagg_missing_helper_share")
    assert _unordered(loaded) == _unordered(leader.snapshot())
