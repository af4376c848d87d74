"""Shard liveness and rebalancing (sans-IO): which shards are live, what the root assigns them,
and what a shard does when the assignment changes.

A shard started with ``--own assigned`` keeps a retained :class:`ShardState` on
``edgefl/v1/<fleet>/shards/<shard>/state``: ``online`` when it connects, ``lost`` as the Last
Will of that connection (a crash, SIGKILL, a cut network), ``offline`` on a clean stop. As with
device presence (``DeviceState.supersedes``), ``session`` strictly increases with every run of
a shard, and a receiver ignores a state whose session is below the highest it has seen for that
shard: a late Will of an old run cannot kill a newer one.

The root (:class:`Rebalancer`) keeps the live set and, on every change of it, the assignment
``assignment.rebalance(live)`` (HRW: only a lost shard's partitions move, each moved partition
at the new assignment epoch; a joining shard takes the partitions it ranks first for).
Live means: the shard's newest state is ``online``, or the shard owns partitions in the current
assignment and no state of it has been seen (a shard of the initial ``--shards`` that has not
connected yet, or one started with ``--own K`` that publishes no state, is presumed live). When
no shard is live the root keeps the last assignment: there is nobody to move partitions to,
and the dead owners' unacknowledged updates wait in their partitions' sessions.

A shard (:class:`AssignmentFollower`) follows the assignment: it takes over every partition
newly given to it at that partition's owner epoch + 1 (:meth:`Assignment.claims`; the
assignment records every grant, so that epoch is after the partition's current one and the
root grants it, fencing the previous owner's late partials), and stops the workers of the
partitions taken away from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from edgefl.errors import ProtocolError
from edgefl.protocol.topics import shard_state_topic, validate_name
from edgefl.sharding.assignment import Assignment
from edgefl.transport.config import Will


class ShardStatus(StrEnum):
    ONLINE = "online"  # connected, serving what the assignment gives it
    OFFLINE = "offline"  # stopped cleanly (its partitions are to move)
    LOST = "lost"  # the Will: the connection ended without DISCONNECT


@dataclass(frozen=True)
class ShardState:
    """The retained liveness of one run (``session``) of shard ``shard``."""

    shard: str
    status: ShardStatus
    session: int
    at: float  # when published; in a Will, when the connection was made

    def __post_init__(self) -> None:
        validate_name(self.shard, "shard id")
        object.__setattr__(self, "status", ShardStatus(self.status))
        if isinstance(self.session, bool) or not isinstance(self.session, int) or self.session < 0:
            raise ValueError(f"session must be an int >= 0, got {self.session!r}")

    def supersedes(self, previous: ShardState | None) -> bool:
        """Whether this state replaces ``previous`` of the same shard (session >= old)."""
        return previous is None or self.session >= previous.session

    def to_json(self) -> bytes:
        body: dict[str, object] = {"shard": self.shard, "status": self.status.value}
        body |= {"session": self.session, "at": self.at}
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShardState:
        """Parse :meth:`to_json`; ``ValueError`` for anything else."""
        try:
            body: Mapping[str, Any] = json.loads(data)
            at = body["at"]
            if isinstance(at, bool) or not isinstance(at, int | float):
                raise ValueError(f"at: expected a number, got {at!r}")
            return cls(str(body["shard"]), ShardStatus(body["status"]), body["session"], float(at))
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:  # JSON, names, enums
            raise ValueError(f"bad shard state: {exc}") from None

    def will(self, fleet: str) -> Will:
        """The Last Will of this run's connection: this state as ``lost``, retained, QoS 1."""
        lost = ShardState(self.shard, ShardStatus.LOST, self.session, self.at)
        return Will(shard_state_topic(fleet, self.shard), lost.to_json(), qos=1, retain=True)


class Rebalancer:
    """The root's live set of shards and the assignment it implies (see the module docstring)."""

    def __init__(self) -> None:
        self._states: dict[str, ShardState] = {}

    def live(self, assignment: Assignment) -> frozenset[str]:
        """Shards whose newest state is ``online``, and owners of ``assignment`` never seen."""
        unseen = {s for s in assignment.shards if s not in self._states}
        online = {s for s, st in self._states.items() if st.status is ShardStatus.ONLINE}
        return frozenset(unseen | online)

    def observe(self, state: ShardState, assignment: Assignment) -> Assignment:
        """The assignment after ``state``: ``assignment`` itself when the state is stale (a
        lower session than seen), changes no owner, or no shard is left live (keep the last);
        otherwise ``assignment.rebalance(live)``."""
        if not state.supersedes(self._states.get(state.shard)):
            return assignment
        self._states[state.shard] = state
        live = self.live(assignment)
        return assignment.rebalance(live) if live else assignment

    @property
    def states(self) -> Mapping[str, ShardState]:
        return dict(self._states)


@dataclass(frozen=True)
class Changes:
    """What a shard does after an assignment: take over ``start`` (partition -> claimed owner
    epoch) and stop the workers of ``stop``."""

    start: Mapping[int, int]
    stop: frozenset[int]


class AssignmentFollower:
    """A shard's view of the assignments it read, in order (see the module docstring).

    A worker that ends on its own (refused, or deposed by a newer take-over of its partition)
    is not started again while the assignment keeps giving the partition to this shard: only
    a partition *newly* given is claimed, so two processes run under one shard name do not
    take a partition from each other forever."""

    def __init__(self, shard: str) -> None:
        self._shard = validate_name(shard, "shard id")
        self._owned: frozenset[int] = frozenset()

    @property
    def owned(self) -> frozenset[int]:
        return self._owned

    def follow(self, assignment: Assignment) -> Changes:
        owned = frozenset(assignment.owned_by(self._shard))
        claims = assignment.claims(self._shard)
        start = {k: claims[k] for k in sorted(owned - self._owned)}
        stop, self._owned = self._owned - owned, owned
        return Changes(start, stop)
