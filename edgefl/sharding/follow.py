"""The asyncio shell of a shard that follows the root's assignment (``shard --own assigned``).

On its own connection (client id ``edgefl-<fleet>-shard-<shard>``, made with :meth:`will`
and :meth:`announce` as the ``on_connect`` hook) the shard keeps its retained
:class:`~edgefl.sharding.liveness.ShardState` on ``shards/<shard>/state``: ``online`` after
every (re)connection, ``lost`` as the Will, ``offline`` on a clean stop (after its workers
stopped, so the next owner does not find them connected). It re-asserts ``online`` when the
retained state of its name is anything else of its own or an older session (a late Will of
an earlier run, or of a dropped connection of this one); a newer session is another run under
the same name, which it leaves alone.

It reads every assignment (``shards/assignment``, retained) in order and, through an
:class:`~edgefl.sharding.liveness.AssignmentFollower`, starts a partition worker for each
partition newly given to it (claimed at its owner epoch + 1) and cancels the workers of the
partitions taken from it; their unacknowledged updates stay in the partitions' persistent
sessions for the next owner. A worker that fails ends the shard (the exception propagates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from edgefl.protocol.topics import ShardsLeaf, shard_state_topic, shards_topic
from edgefl.sharding.assignment import Assignment
from edgefl.sharding.liveness import AssignmentFollower, ShardState, ShardStatus
from edgefl.transport.base import ConnectInfo, InboundMessage, Transport, TransportError
from edgefl.transport.config import Will

log = logging.getLogger("edgefl.sharding")

RunWorker = Callable[[int, int], Coroutine[Any, Any, None]]
"""Runs the worker of partition ``k`` claimed at owner epoch ``e`` until it ends or is
cancelled: ``run_worker(k, e)``."""


def new_session() -> int:
    """A session number above every earlier run's on this clock: milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class AssignedShard:
    """Shard ``shard`` of ``fleet`` serving what the assignment gives it (module docstring)."""

    def __init__(
        self, fleet: str, shard: str, partitions: int, run_worker: RunWorker, *, session: int
    ) -> None:
        self._fleet, self._shard, self._partitions = fleet, shard, partitions
        self._run_worker = run_worker
        self._online = ShardState(shard, ShardStatus.ONLINE, session, time.time())
        self._topic = shard_state_topic(fleet, shard)
        self._follower = AssignmentFollower(shard)
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._failed: asyncio.Future[None] | None = None
        self._transport: Transport | None = None

    def will(self) -> Will:
        """The Last Will of the shard's connection: its state ``lost`` (retained, QoS 1)."""
        return self._online.will(self._fleet)

    @property
    def running(self) -> frozenset[int]:
        """The partitions with a worker now."""
        return frozenset(self._workers)

    async def announce(self, _info: ConnectInfo | None = None) -> None:
        """Publish ``online`` (retained): the ``on_connect`` hook of the shard's connection."""
        if self._transport is not None:
            await self._transport.publish(self._topic, self._online.to_json(), qos=1, retain=True)

    async def run(self, transport: Transport, stop: asyncio.Event, first_within: float) -> None:
        """Serve until ``stop`` is set (then stop the workers and publish ``offline``). The first
        assignment must come within ``first_within`` seconds (``TimeoutError`` otherwise)."""
        self._transport = transport
        self._failed = asyncio.get_running_loop().create_future()
        messages = transport.messages()
        await transport.subscribe(shards_topic(self._fleet, ShardsLeaf.ASSIGNMENT), qos=1)
        await transport.subscribe(self._topic, qos=1)
        await self.announce()
        pump = asyncio.create_task(self._pump(messages, first_within))
        stopping = asyncio.create_task(stop.wait())
        try:
            waiting: list[asyncio.Future[Any]] = [pump, stopping, self._failed]
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failed worker's or the pump's exception
        finally:
            pump.cancel()
            stopping.cancel()
            await self._stop_workers(set(self._workers))
            with contextlib.suppress(TransportError):
                offline = ShardState(
                    self._shard, ShardStatus.OFFLINE, self._online.session, time.time()
                )
                await transport.publish(self._topic, offline.to_json(), qos=1, retain=True)

    async def _pump(self, messages: AsyncIterator[InboundMessage], first_within: float) -> None:
        async with asyncio.timeout(first_within) as first:
            async for message in messages:
                if message.topic == self._topic:
                    await self._on_state(message.payload)
                elif await self._on_assignment(message.payload):
                    first.reschedule(None)

    async def _on_state(self, payload: bytes) -> None:
        try:
            state = ShardState.from_json(payload) if payload else None
        except ValueError as exc:
            log.warning("shard %s: a bad state on its topic: %s", self._shard, exc)
            state = None
        if state is not None and state.session > self._online.session:
            log.warning("shard %s: a newer run (session %d) is up", self._shard, state.session)
        elif state != self._online:  # an older run's late Will, ours, or cleared: re-assert
            await self.announce()

    async def _on_assignment(self, payload: bytes) -> bool:
        """Follow one assignment message; False for a malformed or cleared one (skipped)."""
        try:
            assignment = Assignment.from_json(payload)
        except ValueError as exc:
            log.warning("shard %s: ignoring the assignment message: %s", self._shard, exc)
            return False
        if assignment.partitions != self._partitions:
            raise SystemExit(
                f"--partitions {self._partitions}: the assignment has {assignment.partitions}"
            )
        changes = self._follower.follow(assignment)
        if changes.start or changes.stop:
            log.info(
                "shard %s: assignment %d: claiming %s, stopping %s",
                self._shard, assignment.epoch, dict(changes.start), sorted(changes.stop),
            )  # fmt: skip
        await self._stop_workers(changes.stop)
        for k, epoch in changes.start.items():
            self._start_worker(k, epoch)
        return True

    def _start_worker(self, k: int, epoch: int) -> None:
        task = asyncio.create_task(self._run_worker(k, epoch), name=f"partition-{k}")
        self._workers[k] = task

        def ended(task: asyncio.Task[None]) -> None:
            if self._workers.get(k) is task:
                del self._workers[k]  # deposed, refused or failed: not restarted (the follower)
            if task.cancelled() or self._failed is None or self._failed.done():
                return
            if (exc := task.exception()) is not None:
                self._failed.set_exception(exc)

        task.add_done_callback(ended)

    async def _stop_workers(self, partitions: set[int] | frozenset[int]) -> None:
        tasks = [self._workers.pop(k) for k in partitions if k in self._workers]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
