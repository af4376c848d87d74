"""Fixed topic partitions by device hash (docs/SCALING.md, "Partitions"; PROTOCOL.md §11).

``partition_of(device_id, P) = int.from_bytes(sha256(device_id)[:8], "big") % P``: stable
across processes, hosts, languages and Python versions (never ``hash()``), uniform over the
device ids. ``P`` is fixed for the life of a fleet (as a Kafka topic's partition count), and
large enough for the most shards ever wanted (64 or 256).

A partitioned update topic (protocol revision 1.3, built and parsed by
:mod:`edgefl.protocol.topics`: ``update_topic(..., partition=k)``, ``updates_filter(...,
partition=k)``, ``parse_topic``) puts the partition in front of the device subtree::

    edgefl/v1/<fleet>/part/<k>/device/<id>/update/<seq>

so one MQTT filter per partition (``edgefl/v1/<fleet>/part/<k>/device/+/update/+``) gives a
shard exactly its devices on any broker, with no shared subscription: all chunks of one update
share its topic and so reach the same shard (chunk affinity). The device id stays a topic
level of its own, so per-device ACLs keep working (Mosquitto:
``pattern write edgefl/v1/+/part/+/device/%u/update/+``). A device may still write into a
partition that is not its own; the shard rejects that (``BAD_TOPIC``, :func:`check_owner`),
because one device's sequence numbers must be judged by one owner.
"""

from __future__ import annotations

import hashlib

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.topics import MAX_PARTITIONS, UpdateTopic, validate_name


def check_partitions(partitions: int) -> int:
    """``partitions`` if it is an int in ``[1, MAX_PARTITIONS]``, else ``ValueError``."""
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise ValueError(f"partitions must be an int, got {partitions!r}")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be in [1, {MAX_PARTITIONS}], got {partitions}")
    return partitions


def partition_of(device_id: str, partitions: int) -> int:
    """The partition of ``device_id``: first 8 bytes of its SHA-256, big-endian, mod P."""
    check_partitions(partitions)
    digest = hashlib.sha256(validate_name(device_id, "device id").encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def check_owner(update: UpdateTopic, partitions: int) -> int:
    """The partition of the update's device; ``ProtocolError(BAD_TOPIC)`` when the topic names
    another partition. An unpartitioned topic (a device older than 1.3) names none."""
    expected = partition_of(update.device_id, partitions)
    if update.partition is not None and update.partition != expected:
        raise ProtocolError(
            RejectReason.BAD_TOPIC,
            f"device {update.device_id} belongs to partition {expected}, not {update.partition}",
        )
    return expected
