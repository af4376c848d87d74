"""Which topic a device publishes its updates to: its partition's, or the plain one (sans-IO).

Protocol revision 1.3 (docs/PROTOCOL.md §11, docs/SCALING.md "Devices and partitions"). A
sharded tree's root keeps the fleet's assignment retained on
``edgefl/v1/<fleet>/shards/assignment`` (:class:`edgefl.sharding.assignment.Assignment`, canonical
JSON with ``partitions`` = P). The agent subscribes to it; while one is known, every update goes
to ``edgefl/v1/<fleet>/part/<k>/device/<id>/update/<seq>`` with
``k = partition_of(device_id, P)`` (:func:`edgefl.sharding.partitions.partition_of`, the very
function the shards and the root check against). With none (a single aggregator, an older tree,
or the retained message cleared) it is the plain ``device/<id>/update/<seq>``: unchanged 1.0
behaviour.

Contract:

* :meth:`PartitionRouter.update_topic` is called **once per send of an update**, and the caller
  publishes every packet of that send to the returned string: an assignment that changes while
  the chunks go out changes the topic of the *next* send, never of a chunk (chunk affinity).
* Only ``partitions`` is read; owners and epochs are the shards' business. A device's partition
  is a fixed hash of its id, so it changes only if P does (a fleet's P is fixed for its life).
* A malformed assignment is refused (``BAD_HEADER``, counted by the caller's ``reject``) and the
  previous one stays in force: a garbled retained message never sends updates astray.
"""

from __future__ import annotations

from collections.abc import Callable

from edgefl.errors import RejectReason
from edgefl.protocol.topics import ShardsLeaf, shards_topic, update_topic
from edgefl.sharding.assignment import Assignment
from edgefl.sharding.partitions import partition_of

__all__ = ["PartitionRouter"]

Reject = Callable[[RejectReason, str], None]


class PartitionRouter:
    """The update topic of one device, following the retained assignment of its fleet."""

    def __init__(self, fleet: str, device_id: str) -> None:
        self._fleet, self._device = fleet, device_id
        self.assignment_topic = shards_topic(fleet, ShardsLeaf.ASSIGNMENT)
        self._partitions: int | None = None

    @property
    def partitions(self) -> int | None:
        """P of the assignment in force; None: no sharded tree known (plain topics)."""
        return self._partitions

    @property
    def partition(self) -> int | None:
        """This device's partition under the assignment in force, or None."""
        p = self._partitions
        return None if p is None else partition_of(self._device, p)

    def handles(self, topic: str) -> bool:
        """Whether ``topic`` is the assignment topic (route its messages to :meth:`on_message`)."""
        return topic == self.assignment_topic

    def on_message(self, payload: bytes, *, reject: Reject) -> None:
        """A message on the assignment topic: empty (the retained one was cleared: back to plain
        topics) or an assignment; anything else is refused through ``reject`` and ignored."""
        if not payload:
            self._partitions = None
            return
        try:
            assignment = Assignment.from_json(payload)
        except ValueError as exc:
            reject(RejectReason.BAD_HEADER, f"assignment: {exc}")
            return
        self._partitions = assignment.partitions

    def update_topic(self, seq: int) -> str:
        """The topic of every packet of one send of update ``seq``."""
        return update_topic(self._fleet, self._device, seq, partition=self.partition)
