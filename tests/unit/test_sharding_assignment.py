"""The root publishes the retained assignment devices read P from (PROTOCOL.md §11): at start,
after a take-over that moves a partition, and again after a restart from its state file.

Real parts: the root's asyncio shell (``RootService``) on the in-process MemoryBroker."""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from waiting import eventually

from edgefl.protocol.topics import (
    PartitionControl,
    ShardsLeaf,
    partition_control_topic,
    shards_topic,
)
from edgefl.sharding.assignment import Assignment
from edgefl.sharding.follow import AssignedShard
from edgefl.sharding.root import RootBuffer
from edgefl.sharding.service import RootService, fedbuff_config
from edgefl.transport import MemoryBroker, MemoryTransport

FLEET, P = "f1", 4
ASSIGNMENT = shards_topic(FLEET, ShardsLeaf.ASSIGNMENT)


def test_a_take_over_moves_one_partition_and_keeps_epochs_in_range() -> None:
    initial = Assignment.initial(P, ["a", "b"])
    k = 0
    other = "b" if initial.owners[k] == "a" else "a"

    moved = initial.taken_over(k, other, 3)

    assert moved.owners[k] == other
    assert moved.owner_epochs[k] == 3
    assert moved.epoch == 3  # max(0 + 1, 3): every owner epoch within [0, epoch]
    assert moved.owners[1:] == initial.owners[1:]
    assert moved.owner_epochs[1:] == initial.owner_epochs[1:]
    assert moved.taken_over(k, other, 3) is moved  # a repeated grant changes nothing
    assert Assignment.from_json(moved.to_json()) == moved
    with pytest.raises(ValueError, match="not below"):
        moved.taken_over(P, other, 4)


async def _run_root(
    broker: MemoryBroker, state: Path
) -> tuple[asyncio.Task[None], MemoryTransport]:
    config = fedbuff_config(10)
    root, assignment = RootService.load(config, state, partitions=P, params=8, shards=["a", "b"])
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


async def test_the_root_publishes_the_assignment_and_follows_take_overs(tmp_path: Path) -> None:
    # Arrange: a fresh root publishes the initial HRW assignment over its shards
    broker, state = MemoryBroker(), tmp_path / "root.state"
    task, transport = await _run_root(broker, state)
    await eventually(lambda: _retained(broker) is not None, what="the assignment")
    initial = Assignment.initial(P, ["a", "b"])
    assert _retained(broker) == initial
    k = 2
    newcomer = "c"

    # Act: shard c takes partition 2 over at epoch 1
    takeover = partition_control_topic(FLEET, k, PartitionControl.TAKEOVER)
    granted = partition_control_topic(FLEET, k, PartitionControl.GRANTED)
    replies: list[bytes] = []
    shard = MemoryTransport(broker, "shard-c")
    await shard.connect()
    await shard.subscribe(granted)
    broker.publish(takeover, json.dumps({"epoch": 1, "shard": newcomer}).encode(), 1, False)

    async def first_reply() -> None:
        async for message in shard.messages():
            replies.append(message.payload)
            return

    await asyncio.wait_for(first_reply(), 30)

    # Assert: granted, and the retained assignment names c as k's owner at epoch 1
    assert "refused" not in json.loads(replies[0])
    moved = initial.taken_over(k, newcomer, 1)
    await eventually(lambda: _retained(broker) == moved, what="the moved assignment")
    await _stop(task, transport)
    await shard.close()

    # a restarted root publishes what it committed, not the initial assignment again
    broker.publish(ASSIGNMENT, b"", 1, True)  # cleared, so only the new root can set it
    task, transport = await _run_root(broker, state)
    await eventually(lambda: _retained(broker) is not None, what="the restarted root's")
    assert _retained(broker) == moved
    await _stop(task, transport)


def test_a_state_file_from_before_the_assignment_loads_with_the_initial_one(
    tmp_path: Path,
) -> None:
    config = fedbuff_config(10)
    old, state = RootBuffer(config, np.ones(8, np.float32), partitions=P), tmp_path / "old.state"
    old.take_over(1, 2)
    state.write_bytes(pickle.dumps(old.snapshot()))  # the format before the assignment was kept

    root, assignment = RootService.load(config, state, partitions=P, params=8, shards=["a", "b"])

    assert root.epochs == old.epochs
    np.testing.assert_array_equal(root.weights, old.weights)
    assert assignment == Assignment.initial(P, ["a", "b"])


def _owner_epochs(broker: MemoryBroker, partitions: tuple[int, ...]) -> list[int] | None:
    assignment = _retained(broker)
    return None if assignment is None else [assignment.owner_epochs[k] for k in partitions]


async def _take_over(broker: MemoryBroker, k: int, epoch: int, shard: str) -> dict[str, object]:
    """Shard ``shard``'s take-over request for partition ``k`` at ``epoch``: the root's reply."""
    granted = partition_control_topic(FLEET, k, PartitionControl.GRANTED)
    client = MemoryTransport(broker, f"{shard}-{k}-{epoch}")
    await client.connect()
    messages = client.messages()
    await client.subscribe(granted)
    takeover = partition_control_topic(FLEET, k, PartitionControl.TAKEOVER)
    await client.publish(takeover, json.dumps({"epoch": epoch, "shard": shard}).encode())
    try:
        async with asyncio.timeout(30):
            async for message in messages:
                reply: dict[str, object] = json.loads(message.payload)
                if reply["epoch"] == epoch:
                    return reply
    finally:
        await client.close()
    raise AssertionError("no reply")


async def test_a_shard_claims_what_the_retained_assignment_gives_it_and_is_granted(
    tmp_path: Path,
) -> None:
    broker, state = MemoryBroker(), tmp_path / "root.state"
    task, transport = await _run_root(broker, state)
    owned = Assignment.initial(P, ["a", "b"]).owned_by("b")
    assert owned  # b has partitions to claim
    for run in (1, 2):  # shard b started, then started again under the same name
        # Act: b reads the retained assignment and asks for what it gives b
        await eventually(lambda: _retained(broker) is not None, what="the root's assignment")
        assignment = _retained(broker)
        assert assignment is not None
        claims = assignment.claims("b")
        replies = [await _take_over(broker, k, e, "b") for k, e in claims.items()]

        # Assert: each owned partition claimed one epoch above its owner epoch, and granted;
        # the assignment records the grants, so the next run claims above them
        assert claims == dict.fromkeys(owned, run)
        assert all("refused" not in r for r in replies), replies
        await eventually(
            lambda: _owner_epochs(broker, owned) == [run] * len(owned),  # noqa: B023
            what="the grants in the assignment",
        )
    final = _retained(broker)
    assert final is not None
    assert final.owners == Assignment.initial(P, ["a", "b"]).owners  # nothing moved
    assert final.claims("a") == dict.fromkeys(final.owned_by("a"), 1)  # a never claimed
    await _stop(task, transport)


async def test_a_following_shard_skips_malformed_assignments_and_times_out_without_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``AssignedShard`` (``--own assigned``): no assignment within the wait is a TimeoutError;
    a malformed or cleared retained assignment is skipped (logged), the next valid one is
    followed (its partitions claimed)."""
    broker = MemoryBroker()
    claimed: list[tuple[int, int]] = []

    async def worker(k: int, epoch: int) -> None:
        claimed.append((k, epoch))
        await asyncio.Event().wait()

    async def run_shard(within: float, stop: asyncio.Event, name: str) -> None:
        conn = MemoryTransport(broker, name)
        await conn.connect()
        try:
            await AssignedShard(FLEET, "a", P, worker, session=1).run(conn, stop, within)
        finally:
            await conn.close()

    with pytest.raises(TimeoutError):  # nothing retained: no assignment
        await run_shard(0.2, asyncio.Event(), "a-1")
    valid = Assignment.initial(P, ["a"])
    broker.publish(ASSIGNMENT, b'{"partitions": 4}', 1, True)  # malformed, retained

    stop = asyncio.Event()
    following = asyncio.create_task(run_shard(10, stop, "a-2"))
    await eventually(lambda: "ignoring the assignment" in caplog.text, what="malformed skipped")
    broker.publish(ASSIGNMENT, b"", 1, True)  # cleared
    broker.publish(ASSIGNMENT, valid.to_json(), 1, True)
    await eventually(lambda: sorted(claimed) == sorted(valid.claims("a").items()), what="claims")
    stop.set()
    await following
