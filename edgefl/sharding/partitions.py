"""Fixed topic partitions by device hash (docs/SCALING.md, "Partitions").

``partition_of(device_id, P) = int.from_bytes(sha256(device_id)[:8], "big") % P``: stable
across processes, hosts, languages and Python versions (never ``hash()``), uniform over the
device ids. ``P`` is fixed for the life of a fleet (as a Kafka topic's partition count), and
large enough for the most shards ever wanted (64 or 256).

A partitioned update topic puts the partition in front of the device subtree::

    edgefl/v1/<fleet>/part/<k>/device/<id>/update/<seq>

so one MQTT filter per partition (``edgefl/v1/<fleet>/part/<k>/device/+/update/+``) gives a
shard exactly its devices on any broker, with no shared subscription: all chunks of one update
share its topic and so reach the same shard (chunk affinity). The device id stays a topic
level of its own, so per-device ACLs keep working (Mosquitto:
``pattern write edgefl/v1/+/part/+/device/%u/update/+``). A device may still write into a
partition that is not its own; the shard rejects that (``BAD_TOPIC``), because one device's
sequence numbers must be judged by one owner.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edgefl.errors import ProtocolError, RejectReason
from edgefl.protocol.topics import PROTOCOL_ROOT, UpdateTopic, parse_topic, validate_name

PARTITION_LEVEL = "part"
MAX_PARTITIONS = 65536


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


def _prefix(fleet: str, partition: int) -> str:
    validate_name(fleet, "fleet name")
    if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
        raise ValueError(f"partition must be an int >= 0, got {partition!r}")
    return f"{PROTOCOL_ROOT}/{fleet}/{PARTITION_LEVEL}/{partition}"


def partitioned_update_topic(fleet: str, partition: int, device_id: str, seq: int) -> str:
    """``edgefl/v1/<fleet>/part/<k>/device/<id>/update/<seq>``."""
    plain = UpdateTopic(fleet, device_id, seq).topic  # validates id and seq
    return _prefix(fleet, partition) + plain[len(f"{PROTOCOL_ROOT}/{fleet}") :]


def partition_updates_filter(fleet: str, partition: int) -> str:
    """What the owner of partition ``k`` subscribes to (one filter per owned partition)."""
    return f"{_prefix(fleet, partition)}/device/+/update/+"


@dataclass(frozen=True)
class PartitionedUpdate:
    """A parsed partitioned update topic: the partition and the plain update topic."""

    partition: int
    update: UpdateTopic


def parse_partitioned_update(topic: str, *, fleet: str | None = None) -> PartitionedUpdate:
    """Parse ``.../part/<k>/device/<id>/update/<seq>``; ``ProtocolError(BAD_TOPIC)`` otherwise
    (the rest is judged by :func:`edgefl.protocol.topics.parse_topic`)."""
    levels = topic.split("/")
    if len(levels) < 6 or levels[3] != PARTITION_LEVEL or not levels[4].isdigit():
        raise ProtocolError(RejectReason.BAD_TOPIC, f"not a partitioned update topic: {topic!r}")
    if levels[4] != str(int(levels[4])) or int(levels[4]) >= MAX_PARTITIONS:
        raise ProtocolError(RejectReason.BAD_TOPIC, f"bad partition level in {topic!r}")
    plain = parse_topic("/".join(levels[:3] + levels[5:]), expected_fleet=fleet)
    if not isinstance(plain, UpdateTopic):
        raise ProtocolError(RejectReason.BAD_TOPIC, f"not an update topic: {topic!r}")
    return PartitionedUpdate(int(levels[4]), plain)


def check_owner(parsed: PartitionedUpdate, partitions: int) -> None:
    """``ProtocolError(BAD_TOPIC)`` unless the device of ``parsed`` hashes to its partition."""
    expected = partition_of(parsed.update.device_id, partitions)
    if expected != parsed.partition:
        raise ProtocolError(
            RejectReason.BAD_TOPIC,
            f"device {parsed.update.device_id} belongs to partition {expected}, "
            f"not {parsed.partition}",
        )
