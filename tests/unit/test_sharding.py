"""Hierarchical FedBuff (edgefl.sharding): equivalence with single-process FedBuff, exactly-once
partials (dedupe, epoch fencing, high-water hand-over), partitions and rebalancing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefl.aggregation.fedbuff import FedBuff, FedBuffConfig, Normalisation
from edgefl.aggregation.robust import NormBound, RobustMode
from edgefl.errors import ProtocolError, RejectReason, UpdateRejected
from edgefl.protocol.topics import UpdateTopic, parse_topic, update_topic, updates_filter
from edgefl.sharding.assignment import Assignment, hrw_owner
from edgefl.sharding.partial import PartialId, PartialSum, ShardAccumulator, presum_is_exact
from edgefl.sharding.partitions import check_owner, partition_of
from edgefl.sharding.root import PartialVerdict, RootBuffer
from edgefl.sharding.seqwindow import WINDOW, SeqWindow

P = 8  # model parameters
PARTITIONS = 4
EXACT_BOUND = NormBound(max_norm=3.0, adaptive_multiplier=None)  # fixed bound: clips some


@dataclasses.dataclass(frozen=True)
class Upd:
    device: str
    seq: int
    delta: np.ndarray
    base: int
    examples: int


def _updates(n: int, version: int, seed: int = 0) -> list[Upd]:
    rng = np.random.default_rng(seed)
    return [
        Upd(
            f"dev{i % 11}",
            i,
            rng.normal(0, 1.0 + (i % 3), P).astype(np.float32),
            max(0, version - int(rng.integers(0, 4))),
            int(rng.integers(1, 200)),
        )
        for i in range(n)
    ]


def _config(normalisation: Normalisation, k: int) -> FedBuffConfig:
    return FedBuffConfig(buffer_size=k, normalisation=normalisation, norm_bound=EXACT_BOUND)


def _single(config: FedBuffConfig, init: np.ndarray, ups: list[Upd], version: int) -> FedBuff:
    fb = FedBuff(config, init, version=version)
    for u in ups:
        fb.add(u.delta, base_version=u.base, num_examples=u.examples)
    return fb


def _shard(config: FedBuffConfig, shard: str, part: int, version: int) -> ShardAccumulator:
    return ShardAccumulator(
        config, num_params=P, version=version, id_prefix=PartialId(shard, part, 0, 0)
    )


def _sharded(
    config: FedBuffConfig, init: np.ndarray, ups: list[Upd], version: int, flush_every: int
) -> RootBuffer:
    """Every partition on its own shard accumulator; partials every ``flush_every`` updates."""
    root = RootBuffer(config, init, partitions=PARTITIONS, version=version)
    shards = {k: _shard(config, f"s{k % 2}", k, version) for k in range(PARTITIONS)}
    for k in shards:
        root.take_over(k, 0)
    for u in ups:
        acc = shards[partition_of(u.device, PARTITIONS)]
        acc.add(u.device, u.seq, u.delta, base_version=u.base, num_examples=u.examples)
        if acc.pending >= flush_every:
            partial = acc.close()
            assert partial is not None
            assert root.add_partial(partial) is PartialVerdict.APPLIED
    for acc in shards.values():
        partial = acc.close()
        if partial is not None:
            assert root.add_partial(partial) is PartialVerdict.APPLIED
    return root


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("normalisation", [Normalisation.MEAN, Normalisation.SUM])
@pytest.mark.parametrize("flush_every", [1, 3, 100])
def test_sharded_step_equals_single_process_fedbuff(
    normalisation: Normalisation, flush_every: int
) -> None:
    version, ups = 5, _updates(40, 5)
    config = _config(normalisation, k=40)
    init = np.linspace(-1, 1, P, dtype=np.float32)
    single = _single(config, init, ups, version)
    root = _sharded(config, init, ups, version, flush_every)

    assert root.ready
    assert single.ready
    expected, got = single.step(), root.step()

    np.testing.assert_allclose(root.weights, single.weights, rtol=1e-5, atol=1e-6)
    assert got.version == expected.version == version + 1
    assert got.num_updates == expected.num_updates == 40
    assert got.weight_sum == pytest.approx(expected.weight_sum, rel=1e-12)
    assert got.mean_staleness == expected.mean_staleness
    assert got.max_staleness == expected.max_staleness
    assert got.clipped == expected.clipped > 0  # the fixed bound clipped some, the same ones


def test_one_shard_in_arrival_order_is_bit_exact() -> None:
    """Only the float32 summation order separates the two: with one shard and one partial the
    additions happen in the same order, and 0 + A_s == A_s exactly."""
    version, ups = 3, _updates(20, 3, seed=1)
    config = _config(Normalisation.MEAN, k=20)
    init = np.zeros(P, np.float32)
    single = _single(config, init, ups, version)
    root = RootBuffer(config, init, partitions=1, version=version)
    root.take_over(0, 0)
    acc = _shard(config, "s0", 0, version)
    for u in ups:
        acc.add(u.device, u.seq, u.delta, base_version=u.base, num_examples=u.examples)
    partial = acc.close()
    assert partial is not None
    root.add_partial(partial)

    single.step()
    root.step()

    np.testing.assert_array_equal(root.weights, single.weights)


def test_robust_modes_cannot_be_presummed() -> None:
    config = FedBuffConfig(buffer_size=4, robust=RobustMode.MEDIAN)

    with pytest.raises(ValueError, match="cannot be pre-summed"):
        _shard(config, "s0", 0, 0)
    with pytest.raises(ValueError, match="cannot be pre-summed"):
        RootBuffer(config, np.zeros(P, np.float32), partitions=1)
    assert not presum_is_exact(FedBuffConfig())  # the default adaptive bound is per shard
    assert presum_is_exact(_config(Normalisation.MEAN, 4))


# ---------------------------------------------------------------------------- exactly once
def _one_partial(root: RootBuffer, part: int, epoch: int, ups: list[Upd]) -> PartialSum:
    acc = ShardAccumulator(
        _config(Normalisation.MEAN, 10),
        num_params=P,
        version=root.version,
        id_prefix=PartialId("s0", part, epoch, 0),
    )
    for u in ups:
        acc.add(u.device, u.seq, u.delta, base_version=u.base, num_examples=u.examples)
    partial = acc.close()
    assert partial is not None
    return partial


def _successor(part: int, marks: dict[str, SeqWindow]) -> ShardAccumulator:
    """The next owner of ``part`` (shard s1, epoch 1), seeded with the root's windows."""
    return ShardAccumulator(
        _config(Normalisation.MEAN, 10),
        num_params=P,
        version=0,
        id_prefix=PartialId("s1", part, 1, 0),
        high_water=marks,
    )


def _in_partition(part: int, n: int, version: int) -> list[Upd]:
    return [u for u in _updates(200, version) if partition_of(u.device, PARTITIONS) == part][:n]


def test_reforwarded_partial_is_applied_once() -> None:
    root = RootBuffer(_config(Normalisation.MEAN, 10), np.zeros(P), partitions=PARTITIONS)
    root.take_over(0, 0)
    partial = _one_partial(root, 0, 0, _in_partition(0, 3, 0))

    first = root.add_partial(partial)
    again = root.add_partial(partial)  # the shard did not see the confirmation: forwards again

    assert (first, again) == (PartialVerdict.APPLIED, PartialVerdict.DUPLICATE)
    assert root.buffer_fill == 3
    assert root.verdicts() == {"applied": 1, "duplicate": 1, "late": 0}


def test_deposed_owner_is_fenced_and_the_new_owner_skips_what_was_applied() -> None:
    root = RootBuffer(_config(Normalisation.MEAN, 10), np.zeros(P), partitions=PARTITIONS)
    root.take_over(2, 0)
    ups = _in_partition(2, 4, 0)
    applied = _one_partial(root, 2, 0, ups[:2])
    in_flight = _one_partial(root, 2, 0, ups[2:])  # made by the old owner, not yet at the root
    in_flight = dataclasses.replace(in_flight, id=dataclasses.replace(in_flight.id, number=1))
    assert root.add_partial(applied) is PartialVerdict.APPLIED

    marks = root.take_over(2, 1)  # the owner died: epoch 1 for its successor
    late = root.add_partial(in_flight)
    successor = _successor(2, marks)
    redelivered, replays = [], []  # every update comes again (none was acknowledged)
    for u in ups:
        try:
            successor.add(u.device, u.seq, u.delta, base_version=u.base, num_examples=u.examples)
            redelivered.append(u.seq)
        except UpdateRejected as exc:
            replays.append(exc.reason)
    partial = successor.close()
    assert partial is not None

    assert late is PartialVerdict.STALE_EPOCH
    assert redelivered == [u.seq for u in ups[2:]]
    assert replays == [RejectReason.REPLAY] * 2
    assert root.add_partial(partial) is PartialVerdict.APPLIED
    assert root.buffer_fill == 4  # each update exactly once


def test_restored_root_dedupes_and_steps_like_the_one_that_never_stopped() -> None:
    config = _config(Normalisation.MEAN, 4)
    root = RootBuffer(config, np.ones(P, np.float32), partitions=PARTITIONS)
    root.take_over(0, 0)
    ups = _in_partition(0, 4, 0)
    first = _one_partial(root, 0, 0, ups[:2])
    root.add_partial(first)

    restored = RootBuffer.restore(config, root.snapshot(), partitions=PARTITIONS)  # a crash
    second = _one_partial(root, 0, 0, ups[2:])
    second = dataclasses.replace(second, id=dataclasses.replace(second.id, number=1))
    verdicts = [restored.add_partial(first), restored.add_partial(second)]
    root.add_partial(second)
    restored.step()
    root.step()

    assert verdicts == [PartialVerdict.DUPLICATE, PartialVerdict.APPLIED]
    np.testing.assert_array_equal(restored.weights, root.weights)
    assert restored.take_over(0, 1) == root.take_over(0, 1)
    assert restored.verdicts() == {"applied": 2, "duplicate": 1, "late": 0}


def test_partial_covering_a_counted_update_is_refused() -> None:
    root = RootBuffer(_config(Normalisation.MEAN, 10), np.zeros(P), partitions=PARTITIONS)
    root.take_over(1, 0)
    ups = _in_partition(1, 2, 0)
    root.add_partial(_one_partial(root, 1, 0, ups))
    twin = _one_partial(root, 1, 0, ups)
    twin = dataclasses.replace(twin, id=dataclasses.replace(twin.id, number=7))

    assert root.add_partial(twin) is PartialVerdict.OVERLAP
    assert root.buffer_fill == 2


def test_partial_ahead_of_the_root_is_refused() -> None:
    root = RootBuffer(_config(Normalisation.MEAN, 10), np.zeros(P), partitions=PARTITIONS)
    root.take_over(0, 0)
    partial = dataclasses.replace(_one_partial(root, 0, 0, _in_partition(0, 1, 0)), version=1)

    assert root.add_partial(partial) is PartialVerdict.FUTURE_VERSION
    assert root.buffer_fill == 0


def test_shard_rejects_a_replayed_sequence_number() -> None:
    acc = _shard(_config(Normalisation.MEAN, 4), "s0", 0, 0)
    acc.add("d1", 5, np.ones(P, np.float32), base_version=0, num_examples=1)

    with pytest.raises(UpdateRejected) as info:
        acc.add("d1", 5, np.ones(P, np.float32), base_version=0, num_examples=1)

    assert info.value.reason is RejectReason.REPLAY
    assert acc.pending == 1


# ---------------------------------------------------------------------------- partitions
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True), st.integers(1, 4096))
def test_partition_is_stable_and_in_range(device: str, partitions: int) -> None:
    k = partition_of(device, partitions)

    assert 0 <= k < partitions
    assert k == partition_of(device, partitions)


def test_partition_hash_is_fixed() -> None:
    """The hash is part of the protocol (devices compute it too): these values never change."""
    assert [partition_of(f"dev{i}", 64) for i in range(5)] == [27, 43, 12, 52, 40]
    assert partition_of("dev0", 2**16) == 0x00872A1964B50F1B % 2**16


def test_partitioned_topic_round_trip_and_owner_check() -> None:
    k = partition_of("d.7", 16)
    topic = update_topic("f1", "d.7", 42, partition=k)
    wrong = update_topic("f1", "d.7", 42, partition=(k + 1) % 16)

    parsed = parse_topic(topic, expected_fleet="f1")

    assert topic == f"edgefl/v1/f1/part/{k}/device/d.7/update/42"
    assert updates_filter("f1", partition=k) == f"edgefl/v1/f1/part/{k}/device/+/update/+"
    assert parsed == UpdateTopic("f1", "d.7", 42, partition=k)
    assert check_owner(parsed, 16) == k
    # an old device's unpartitioned topic names no partition: its owner is the hash's
    assert check_owner(parse_topic("edgefl/v1/f1/device/d.7/update/42"), 16) == k  # type: ignore[arg-type]
    with pytest.raises(ProtocolError) as info:
        check_owner(parse_topic(wrong), 16)  # type: ignore[arg-type]
    assert info.value.reason is RejectReason.BAD_TOPIC


# ---------------------------------------------------------------------------- rebalancing
def test_dead_shard_partitions_move_to_survivors_with_new_epochs() -> None:
    before = Assignment.initial(64, ["s0", "s1", "s2", "s3"])
    dead = before.owned_by("s2")

    after = before.rebalance(["s0", "s1", "s3"])

    assert dead
    assert "s2" not in after.shards
    assert after.epoch == before.epoch + 1
    for k in range(64):
        if k in dead:
            assert after.owners[k] == hrw_owner(k, ["s0", "s1", "s3"])
            assert after.owner_epochs[k] == after.epoch
        else:  # only the dead shard's partitions move
            assert (after.owners[k], after.owner_epochs[k]) == (before.owners[k], 0)
    assert len({after.owners[k] for k in dead}) > 1  # its load is spread over the survivors


def test_joining_shard_takes_only_partitions_it_ranks_first_for() -> None:
    before = Assignment.initial(64, ["s0", "s1"])

    after = before.rebalance(["s0", "s1", "s2"])
    moved = [k for k in range(64) if after.owners[k] != before.owners[k]]

    assert moved
    assert all(after.owners[k] == "s2" for k in moved)
    assert before.rebalance(["s1", "s0"]) is before  # same live set: nothing moves
    assert Assignment.from_json(after.to_json()) == after
    with pytest.raises(ValueError, match="bad assignment"):
        Assignment.from_json(b'{"partitions": 2}')


# ---------------------------------------------------------------------------- out of order
def test_out_of_order_redelivery_is_counted_once() -> None:
    """NATS redelivers unacknowledged QoS 1 messages out of order: seq 30 after seq 37 is new."""
    acc = _shard(_config(Normalisation.MEAN, 4), "s0", 0, 0)
    delta = np.ones(P, np.float32)
    for seq in (37, 30):
        acc.add("d1", seq, delta, base_version=0, num_examples=1)

    with pytest.raises(UpdateRejected) as info:
        acc.add("d1", 30, delta, base_version=0, num_examples=1)

    assert info.value.reason is RejectReason.REPLAY
    assert acc.pending == 2


def test_seq_window_bounds_and_round_trip() -> None:
    window = SeqWindow()
    for seq in (5, 300, 299, 100):
        window.record(seq)

    assert [window.counted(s) for s in (5, 44, 45, 46, 100, 101, 299, 300, 301)] == [
        True,  # 5 <= 300 - WINDOW: too old to tell, treated as counted
        True,
        False,  # 45 = 300 - 255: inside the window, never counted
        False,
        True,
        False,
        True,
        True,
        False,
    ]
    assert SeqWindow.from_json(window.to_json()) == window
    assert 300 - WINDOW == 44
    with pytest.raises(ValueError, match="bad seq window"):
        SeqWindow.from_json([1, "zz" * 200])


def test_root_hands_the_window_to_the_next_owner() -> None:
    root = RootBuffer(_config(Normalisation.MEAN, 10), np.zeros(P), partitions=PARTITIONS)
    root.take_over(0, 0)
    one = _in_partition(0, 1, 0)[0]
    ups = [dataclasses.replace(one, seq=seq) for seq in (3, 5, 9)]  # one device
    root.add_partial(_one_partial(root, 0, 0, [ups[2]]))  # the newest first

    marks = root.take_over(0, 1)
    successor = _successor(0, marks)
    for u in ups[:2]:  # older seqs, redelivered late: new, not replays
        successor.add(u.device, u.seq, u.delta, base_version=u.base, num_examples=u.examples)
    partial = successor.close()
    assert partial is not None

    assert root.add_partial(partial) is PartialVerdict.APPLIED
    assert root.buffer_fill == 3
