"""Shard liveness and rebalancing: the sans-IO rules (edgefl/sharding/liveness.py), the root's
rebalancing shell (``RootService``) and the shard's following shell (``AssignedShard``), both on
the in-process MemoryBroker (with its Wills and retained messages)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from waiting import eventually

from edgefl.protocol.topics import ShardsLeaf, shard_state_topic, shards_topic
from edgefl.sharding.assignment import Assignment
from edgefl.sharding.follow import AssignedShard
from edgefl.sharding.liveness import AssignmentFollower, Rebalancer, ShardState, ShardStatus
from edgefl.sharding.partial import PartialId, PartialSum
from edgefl.sharding.root import PartialVerdict, RootBuffer
from edgefl.sharding.service import RootService, fedbuff_config
from edgefl.transport import MemoryBroker, MemoryTransport

FLEET, P = "f1", 8
ASSIGNMENT = shards_topic(FLEET, ShardsLeaf.ASSIGNMENT)


def _state(shard: str, status: ShardStatus, session: int) -> ShardState:
    return ShardState(shard, status, session, 1.0)


def _initial() -> Assignment:
    assignment = Assignment.initial(P, ["a", "b", "c"])
    assert all(assignment.owned_by(s) for s in "abc")  # every shard has partitions
    return assignment


# ---------------------------------------------------------------------------- sans-IO
def test_a_shard_state_round_trips_and_malformed_ones_are_value_errors() -> None:
    state = ShardState("a", ShardStatus.ONLINE, 7, 12.5)
    assert ShardState.from_json(state.to_json()) == state
    assert ShardState.from_json(state.will(FLEET).payload) == _lost(state)
    assert state.will(FLEET).topic == shard_state_topic(FLEET, "a")
    assert state.will(FLEET).retain
    bad = [
        b"",
        b"{",
        b"[]",
        b'{"shard":"a"}',
        b'{"shard":"a/b","status":"online","session":1,"at":1}',
    ]
    bad += [b'{"shard":"a","status":"dead","session":1,"at":1}']
    bad += [b'{"shard":"a","status":"online","session":-1,"at":1}']
    bad += [b'{"shard":"a","status":"online","session":1,"at":"x"}']
    for payload in bad:
        with pytest.raises(ValueError, match="bad shard state"):
            ShardState.from_json(payload)


def _lost(state: ShardState) -> ShardState:
    return ShardState(state.shard, ShardStatus.LOST, state.session, state.at)


def test_a_lost_shards_partitions_and_only_those_move_to_the_live_shards() -> None:
    rebalancer, initial = Rebalancer(), _initial()
    for shard in "abc":
        assert rebalancer.observe(_state(shard, ShardStatus.ONLINE, 5), initial) is initial

    after = rebalancer.observe(_state("a", ShardStatus.LOST, 5), initial)

    assert after == initial.rebalance({"b", "c"})
    assert set(after.owners) == {"b", "c"}
    for k in range(P):
        moved = initial.owners[k] == "a"
        assert (after.owners[k] != initial.owners[k]) is moved
        assert after.owner_epochs[k] == (after.epoch if moved else initial.owner_epochs[k])


def test_a_late_will_of_an_older_session_changes_nothing() -> None:
    rebalancer, initial = Rebalancer(), _initial()
    rebalancer.observe(_state("a", ShardStatus.ONLINE, 6), initial)  # a restarted: session 6

    after = rebalancer.observe(_state("a", ShardStatus.LOST, 5), initial)  # run 5's Will, late

    assert after is initial
    assert "a" in rebalancer.live(initial)
    assert rebalancer.states["a"].session == 6
    # the same session's Will does count (this run's connection was lost)
    assert rebalancer.observe(_state("a", ShardStatus.LOST, 6), initial).shards == {"b", "c"}


def test_owners_never_seen_are_presumed_live_and_a_joining_shard_takes_its_share() -> None:
    rebalancer, initial = Rebalancer(), _initial()
    assert rebalancer.live(initial) == {"a", "b", "c"}  # nobody seen yet: the owners

    joined = rebalancer.observe(_state("d", ShardStatus.ONLINE, 1), initial)

    assert joined == initial.rebalance({"a", "b", "c", "d"})
    assert joined.owned_by("d")  # d ranks first for some partitions, and only those move
    assert all(joined.owners[k] in (initial.owners[k], "d") for k in range(P))
    # a clean stop moves partitions as a crash does
    stopped = rebalancer.observe(_state("d", ShardStatus.OFFLINE, 1), joined)
    assert stopped.owners == initial.owners


def test_when_no_shard_is_live_the_last_assignment_is_kept() -> None:
    rebalancer, initial = Rebalancer(), Assignment.initial(P, ["a"])
    rebalancer.observe(_state("a", ShardStatus.ONLINE, 1), initial)

    after = rebalancer.observe(_state("a", ShardStatus.LOST, 1), initial)

    assert after is initial
    assert rebalancer.live(initial) == frozenset()
    # the first shard back gets everything
    back = rebalancer.observe(_state("b", ShardStatus.ONLINE, 1), initial)
    assert back.owners == ("b",) * P


def test_a_shard_claims_newly_given_partitions_above_their_epoch_and_fences_the_old_owner() -> None:
    # Arrange: the root granted every partition to its owner's claim (recorded in the assignment)
    initial = _initial()
    root = RootBuffer(fedbuff_config(100), np.zeros(4, np.float32), partitions=P)
    assignment = initial
    followers = {s: AssignmentFollower(s) for s in "abc"}
    for shard, follower in followers.items():
        changes = follower.follow(assignment)
        assert dict(changes.start) == initial.claims(shard)
        assert not changes.stop
        for k, epoch in changes.start.items():
            root.take_over(k, epoch)
            assignment = assignment.taken_over(k, shard, epoch)
    assert not any(f.follow(assignment).start for f in followers.values())  # grants: no change
    old = {k: root.epoch(k) for k in assignment.owned_by("a")}

    # Act: a is lost; the root rebalances, b and c follow
    rebalancer = Rebalancer()
    rebalanced = rebalancer.observe(_state("a", ShardStatus.LOST, 1), assignment)
    claims = {s: followers[s].follow(rebalanced) for s in "bc"}

    # Assert: b and c claim exactly a's partitions, each granted by the root at an epoch after
    # a's, so a late partial of a's is refused
    taken = {k: (s, e) for s, ch in claims.items() for k, e in ch.start.items()}
    assert sorted(taken) == sorted(old)
    assert not any(ch.stop for ch in claims.values())
    for k, (_, epoch) in taken.items():
        assert epoch == rebalanced.owner_epochs[k] + 1
        root.take_over(k, epoch)  # no ValueError: granted
        ones = np.ones(4, np.float32)
        late = PartialSum(PartialId("a", k, old[k], 0), 0, ones, 1.0, 1, 0, 0, 0, (("d0", 1),))
        assert root.add_partial(late) is PartialVerdict.STALE_EPOCH
    # a coming back takes its partitions back from b and c, which stop their workers
    back = Rebalancer()
    for shard in "bc":
        back.observe(_state(shard, ShardStatus.ONLINE, 1), rebalanced)
    returned = back.observe(_state("a", ShardStatus.ONLINE, 2), rebalanced)
    stops = {s: followers[s].follow(returned).stop for s in "bc"}
    assert sorted(stops["b"] | stops["c"]) == sorted(old)


# ---------------------------------------------------------------------------- root shell
async def _run_root(
    broker: MemoryBroker, state: Path
) -> tuple[asyncio.Task[None], MemoryTransport]:
    config = fedbuff_config(10)
    root, assignment = RootService.load(
        config, state, partitions=P, params=8, shards=["a", "b", "c"]
    )
    transport = MemoryTransport(
        broker, f"edgefl-{FLEET}-root", persistent_session=True, manual_ack=True
    )
    await transport.connect()
    service = RootService(root, FLEET, state, assignment)
    return asyncio.get_running_loop().create_task(service.run(transport)), transport


async def _stop(task: asyncio.Task[None], transport: MemoryTransport) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await transport.close()


def _retained(broker: MemoryBroker) -> Assignment | None:
    payload = broker.retained().get(ASSIGNMENT)
    return None if payload is None else Assignment.from_json(payload)


async def test_the_root_rebalances_on_a_shards_will_commits_it_and_does_not_flap(
    tmp_path: Path,
) -> None:
    # Arrange: a root over a, b, c; a's connection carries its Will
    broker, state = MemoryBroker(), tmp_path / "root.state"
    task, transport = await _run_root(broker, state)
    await eventually(lambda: _retained(broker) == _initial(), what="the initial assignment")
    a = ShardState("a", ShardStatus.ONLINE, 3, 1.0)
    conn = MemoryTransport(broker, "edgefl-f1-shard-a", will=a.will(FLEET))
    await conn.connect()
    await conn.publish(shard_state_topic(FLEET, "a"), a.to_json(), qos=1, retain=True)

    # Act: a's connection dies
    await conn.close(abrupt=True)

    # Assert: the retained assignment gives a's partitions to b and c
    expected = _initial().rebalance({"b", "c"})
    await eventually(lambda: _retained(broker) == expected, what="the rebalanced assignment")
    await _stop(task, transport)

    # a restarted root starts from the committed assignment and, reading the same retained
    # states (a lost), moves nothing
    broker.publish(ASSIGNMENT, b"", 1, True)
    task, transport = await _run_root(broker, state)
    await eventually(lambda: _retained(broker) is not None, what="the restarted root's")
    assert _retained(broker) == expected
    # b online, then a late Will of an older run of b's, a state on another shard's topic, and
    # c online (an owner already): nothing moves; a topic that is no name is ignored; then d
    # joins and takes its share
    for shard, state in [
        ("b", _state("b", ShardStatus.ONLINE, 1)),
        ("b", _state("b", ShardStatus.LOST, 0)),
        ("c", _state("b", ShardStatus.LOST, 9)),
        ("c", _state("c", ShardStatus.ONLINE, 1)),
    ]:
        broker.publish(shard_state_topic(FLEET, shard), state.to_json(), 1, True)
    broker.publish(f"edgefl/v1/{FLEET}/shards/not a name/state", b"{}", 1, False)  # ignored
    d = _state("d", ShardStatus.ONLINE, 1)
    broker.publish(shard_state_topic(FLEET, "d"), d.to_json(), 1, True)
    joined = expected.rebalance({"b", "c", "d"})
    await eventually(lambda: _retained(broker) == joined, what="d's share")
    await _stop(task, transport)


# ---------------------------------------------------------------------------- shard shell
async def test_an_assigned_shard_follows_the_assignment_and_keeps_its_state(
    tmp_path: Path,
) -> None:
    # Arrange: shard a's shell, its workers recorded (the partition workers themselves are
    # exercised over Mosquitto in tests/integration/test_sharded_fedbuff.py)
    broker, initial = MemoryBroker(), _initial()
    running: dict[int, int] = {}
    started: list[tuple[int, int]] = []

    async def worker(k: int, epoch: int) -> None:
        started.append((k, epoch))
        running[k] = epoch
        try:
            await asyncio.Event().wait()
        finally:
            del running[k]

    shard = AssignedShard(FLEET, "a", P, worker, session=5)
    conn = MemoryTransport(
        broker, "edgefl-f1-shard-a", will=shard.will(), on_connect=shard.announce
    )
    await conn.connect()
    topic = shard_state_topic(FLEET, "a")

    def retained_state() -> tuple[ShardStatus, int] | None:
        payload = broker.retained().get(topic)
        state = None if payload is None else ShardState.from_json(payload)
        return None if state is None else (state.status, state.session)

    broker.publish(ASSIGNMENT, initial.to_json(), 1, True)
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(shard.run(conn, stop, 10))

    # Act 1: the first assignment; a online
    await eventually(lambda: running == initial.claims("a"), what="a's claims")
    assert retained_state() == (ShardStatus.ONLINE, 5)

    # Act 2: b is lost: a takes over the partitions the rebalance gives it, at epoch + 1
    without_b = initial.rebalance({"a", "c"})
    gained = {k: e for k, e in without_b.claims("a").items() if initial.owners[k] == "b"}
    assert gained
    assert all(e == without_b.epoch + 1 for e in gained.values())
    broker.publish(ASSIGNMENT, without_b.to_json(), 1, True)
    await eventually(lambda: running == {**initial.claims("a"), **gained}, what="a's take-overs")

    # Act 3: d joins and takes some of a's partitions: their workers stop, the others go on
    with_d = without_b.rebalance({"a", "c", "d"})
    kept = set(with_d.owned_by("a"))
    assert kept < set(running)
    broker.publish(ASSIGNMENT, with_d.to_json(), 1, True)
    await eventually(lambda: set(running) == kept, what="the taken partitions stopped")
    assert len(started) == len(set(started))  # no worker started twice

    # Act 4: a late Will of a's previous run lands on its topic: a re-asserts online
    broker.publish(topic, _state("a", ShardStatus.LOST, 4).to_json(), 1, True)
    await eventually(lambda: retained_state() == (ShardStatus.ONLINE, 5), what="re-asserted")

    # Act 5: a clean stop: workers stopped, then offline
    stop.set()
    await task
    assert running == {}
    assert retained_state() == (ShardStatus.OFFLINE, 5)
    await conn.close(abrupt=True)  # its Will: lost, same session
    assert retained_state() == (ShardStatus.LOST, 5)
