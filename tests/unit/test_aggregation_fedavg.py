"""SyncFedAvg: the cohort barrier, deadlines, and rejections."""

from __future__ import annotations

import numpy as np
import pytest

from edgefl.aggregation import (
    DenseUpdate,
    NormBound,
    RoundStatus,
    SyncAddOutcome,
    SyncFedAvg,
    SyncFedAvgConfig,
    required_updates,
)
from edgefl.errors import RejectReason, UpdateRejected


def sync(min_fraction: float = 0.5) -> SyncFedAvg:
    cfg = SyncFedAvgConfig(min_fraction=min_fraction, norm_bound=NormBound.off())
    return SyncFedAvg(cfg, np.zeros(2, np.float32), version=2)


def send(
    s: SyncFedAvg, device: str, delta: list[float], n: int = 1, base: int | None = None
) -> SyncAddOutcome:
    return s.add(
        device, DenseUpdate(delta), base_version=s.version if base is None else base, num_examples=n
    )


def reason(s: SyncFedAvg, device: str, base: int | None = None) -> RejectReason:
    with pytest.raises(UpdateRejected) as info:
        send(s, device, [1.0, 1.0], base=base)
    return info.value.reason


def test_barrier_waits_for_all_then_steps_weighted_mean() -> None:
    s = sync()
    assert s.open_round(["a", "b", "c"], deadline=100.0) == 2

    first = send(s, "a", [3.0, 0.0], n=1)
    second = send(s, "b", [0.0, 3.0], n=2)
    assert (first.result, second.result, s.version) == (None, None, 2)
    assert s.deadline_passed(99.0) is None
    last = send(s, "c", [3.0, 3.0], n=3)

    result = last.result
    assert result is not None
    assert (result.status, result.round_version, result.version) == (RoundStatus.COMPLETE, 2, 3)
    assert (result.accepted, result.missing) == (3, frozenset())
    # (1 [3, 0] + 2 [0, 3] + 3 [3, 3]) / 6 = [2, 2.5]
    np.testing.assert_allclose(s.weights, [2.0, 2.5], rtol=1e-6)
    assert not s.round_open


def test_deadline_closes_with_partial_cohort() -> None:
    s = sync(min_fraction=0.5)
    s.open_round(["a", "b", "c", "d"], deadline=10.0)
    send(s, "a", [2.0, 0.0])
    send(s, "b", [0.0, 2.0])

    assert s.deadline_passed(9.5) is None
    result = s.deadline_passed(10.0)

    assert result is not None
    assert (result.status, result.accepted, result.required) == (RoundStatus.PARTIAL, 2, 2)
    assert result.missing == frozenset({"c", "d"})
    assert result.step is not None
    assert result.step.num_updates == 2
    assert s.version == 3
    np.testing.assert_allclose(s.weights, [1.0, 1.0])


def test_deadline_with_too_few_fails_without_step() -> None:
    s = sync(min_fraction=0.75)
    s.open_round(["a", "b", "c", "d"], deadline=10.0)
    send(s, "a", [2.0, 0.0])
    send(s, "b", [0.0, 2.0])

    result = s.deadline_passed(11.0)

    assert result is not None
    assert (result.status, result.step, s.version) == (RoundStatus.FAILED, None, 2)
    np.testing.assert_array_equal(s.weights, [0.0, 0.0])
    # the dropped buffer does not leak into the next round
    s.open_round(["e"])
    send(s, "e", [4.0, 4.0])
    np.testing.assert_allclose(s.weights, [4.0, 4.0])
    assert s.statistics().rounds == {RoundStatus.FAILED: 1, RoundStatus.COMPLETE: 1}


def test_non_cohort_wrong_version_duplicate_and_closed_round_rejected() -> None:
    s = sync()
    assert reason(s, "a") is RejectReason.UNKNOWN_DEVICE  # no round open
    s.open_round(["a", "b"])

    assert reason(s, "mallory") is RejectReason.UNKNOWN_DEVICE
    assert reason(s, "a", base=1) is RejectReason.STALE
    assert reason(s, "a", base=3) is RejectReason.FUTURE_VERSION
    send(s, "a", [1.0, 1.0])
    assert reason(s, "a") is RejectReason.DUPLICATE
    assert s.arrived == frozenset({"a"})

    stats = s.statistics()
    assert sum(stats.rejected.values()) == 5
    assert stats.fedbuff.accepted_total == 1


def test_content_rejection_leaves_member_pending() -> None:
    s = sync()
    s.open_round(["a"], deadline=5.0)
    with pytest.raises(UpdateRejected) as info:
        send(s, "a", [1.0, 1.0], n=0)
    assert info.value.reason is RejectReason.BAD_EXAMPLES
    assert s.statistics().rejected == {RejectReason.BAD_EXAMPLES: 1}
    assert s.arrived == frozenset()
    result = s.deadline_passed(5.0)
    assert result is not None
    assert result.status is RoundStatus.FAILED


def test_round_management_errors() -> None:
    s = sync()
    with pytest.raises(ValueError, match="non-empty"):
        s.open_round([])
    with pytest.raises(RuntimeError, match="no round"):
        s.close_round()
    s.open_round(["a"])
    with pytest.raises(RuntimeError, match="still open"):
        s.open_round(["b"])
    assert s.deadline_passed(1e12) is None  # no deadline: only close_round() ends it
    assert s.close_round().status is RoundStatus.FAILED


def test_required_updates() -> None:
    assert [required_updates(10, f) for f in (0.1, 0.5, 0.7, 1.0)] == [1, 5, 7, 10]
    assert required_updates(3, 0.01) == 1
    with pytest.raises(ValueError, match="min_fraction"):
        SyncFedAvgConfig(min_fraction=0.0)
