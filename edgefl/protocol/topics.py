"""The edgefl MQTT topic tree (``docs/PROTOCOL.md``, "Topic tree"): validated names, builders,
subscription filters and a strict parser.

Every topic edgefl publishes lives under ``edgefl/v1/<fleet>/``::

    edgefl/v1/<fleet>/model/manifest                  retained, QoS1   MODEL_MANIFEST
    edgefl/v1/<fleet>/model/<version>/<chunk>         retained, QoS1   MODEL_CHUNK (weights)
    edgefl/v1/<fleet>/model/<version>/onnx/<chunk>    retained, QoS1   MODEL_CHUNK (ONNX graph)
    edgefl/v1/<fleet>/device/<id>/update/<seq>        QoS1             UPDATE or UPDATE_CHUNK
    edgefl/v1/<fleet>/device/<id>/state               retained + Will  DEVICE_STATE
    edgefl/v1/<fleet>/device/<id>/receipt             retained, QoS1   RECEIPT (protocol 1.1)
    edgefl/v1/<fleet>/device/<id>/checkin             QoS1             CHECKIN (protocol 1.2)
    edgefl/v1/<fleet>/device/<id>/lease               QoS1             LEASE (protocol 1.2)
    edgefl/v1/<fleet>/server/state                    retained + Will  SERVER_STATE
    edgefl/v1/<fleet>/server/metrics                  QoS0             METRICS
    edgefl/v1/<fleet>/secagg/share/<id>/<seq>         QoS1             SECAGG_SHARE (1.3)
    edgefl/v1/<fleet>/secagg/seed/<id>/<seq>          QoS1             SECAGG_SEED (1.3)
    edgefl/v1/<fleet>/secagg/decision                 QoS1             SECAGG_COORD, leader → helper
    edgefl/v1/<fleet>/secagg/report                   QoS1             SECAGG_COORD, helper → leader

Revision 1.3, the sharded tree (``docs/PROTOCOL.md`` §11; partitions by device hash)::

    edgefl/v1/<fleet>/part/<k>/device/<id>/update/<seq>   QoS1   UPDATE, UPDATE_CHUNK
    edgefl/v1/<fleet>/shards/assignment                   retained, QoS1   partition owners
    edgefl/v1/<fleet>/shards/partial                      QoS1   a shard's partial sums
    edgefl/v1/<fleet>/shards/root/status                  retained   the root's status
    edgefl/v1/<fleet>/shards/<shard>/state                retained + Will  a shard's liveness
    edgefl/v1/<fleet>/shards/part/<k>/<control>           QoS1   takeover, granted, confirm,
                                                                 progress (QoS0)

The chunk index of a chunked *update* is inside the packet (see ``chunking``), not a topic level:
all packets of one update share the topic ``.../update/<seq>``. Model chunks are retained, and a
broker keeps one retained message per topic, so their index *is* a topic level (and is repeated in
the packet, where receivers check that both agree).

Contract: builders validate their inputs and raise ``ProtocolError(BAD_NAME)`` for a bad fleet,
device or group name and ``ValueError`` for a negative or oversized integer (a programming error).
``parse_topic`` accepts exactly the strings the builders produce (integers in canonical decimal,
no leading zeros) and raises ``ProtocolError`` with ``BAD_TOPIC``, ``BAD_NAME``, ``BAD_VERSION``
(another ``edgefl/<version>`` root) or ``UNKNOWN_FLEET`` for everything else.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, NewType

from edgefl.errors import ProtocolError, RejectReason

__all__ = [
    "MAX_INT",
    "MAX_PARTITIONS",
    "MAX_TOPIC_BYTES",
    "NAME_PATTERN",
    "PARTITION_LEVEL",
    "PROTOCOL_ROOT",
    "SHARD_STATE_LEAF",
    "CheckInTopic",
    "DeviceId",
    "DeviceStateTopic",
    "FleetName",
    "LeaseTopic",
    "ModelArtifact",
    "ModelChunkTopic",
    "ModelManifestTopic",
    "ParsedTopic",
    "PartitionControl",
    "PartitionControlTopic",
    "ReceiptTopic",
    "SecAggDecisionTopic",
    "SecAggReportTopic",
    "SecAggSeedTopic",
    "SecAggShareTopic",
    "ServerMetricsTopic",
    "ServerStateTopic",
    "ShardStateTopic",
    "ShardsLeaf",
    "ShardsTopic",
    "TopicKind",
    "UpdateTopic",
    "all_fleet_filter",
    "checkin_topic",
    "checkins_filter",
    "device_id",
    "device_state_topic",
    "device_states_filter",
    "fleet_name",
    "lease_topic",
    "manifest_topic",
    "model_chunk_topic",
    "model_chunks_filter",
    "parse_topic",
    "partition_control_filter",
    "partition_control_topic",
    "receipt_topic",
    "receipts_filter",
    # secure aggregation (protocol 1.3)
    "secagg_decision_topic",
    "secagg_report_topic",
    "secagg_seed_topic",
    "secagg_seeds_filter",
    "secagg_share_topic",
    "secagg_shares_filter",
    "server_metrics_topic",
    "server_state_topic",
    "shard_state_topic",
    "shard_states_filter",
    "shards_topic",
    "shared_subscription",
    "update_topic",
    "updates_filter",
    "validate_name",
]

PROTOCOL_ROOT = "edgefl/v1"
"""First two levels of every edgefl topic. A future wire version moves to ``edgefl/v2``."""

MAX_TOPIC_BYTES = 65535
"""MQTT's limit on the UTF-8 length of a topic name."""

MAX_INT = 2**63 - 1
"""Largest version, sequence number or chunk index (fits a signed 64-bit integer everywhere)."""

PARTITION_LEVEL = "part"
"""The topic level before a partition number (revision 1.3, the sharded tree)."""

MAX_PARTITIONS = 65536
"""Partitions of a fleet: ``<k>`` is in ``[0, MAX_PARTITIONS)``."""

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
"""Fleet names, device ids, model names and shared-subscription groups: 1-64 ASCII characters,
letters, digits, ``_``, ``.``, ``-``, starting with a letter or digit. This excludes the MQTT
separators and wildcards (``/ + #``), ``$`` (broker-internal topics), NUL and whitespace."""

_NAME_RE = re.compile(NAME_PATTERN)
_INT_RE = re.compile(r"0|[1-9][0-9]{0,18}")

FleetName = NewType("FleetName", str)
DeviceId = NewType("DeviceId", str)


def validate_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a valid edgefl name (``NAME_PATTERN``), else raise BAD_NAME."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ProtocolError(RejectReason.BAD_NAME, f"invalid {what}: {value!r}")
    return value


def fleet_name(value: object) -> FleetName:
    """Validate a fleet name (``NAME_PATTERN``); raise ``ProtocolError(BAD_NAME)`` if invalid."""
    return FleetName(validate_name(value, "fleet name"))


def device_id(value: object) -> DeviceId:
    """Validate a device id (``NAME_PATTERN``); raise ``ProtocolError(BAD_NAME)`` if invalid."""
    return DeviceId(validate_name(value, "device id"))


def _check_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise ValueError(f"{what} must be an int in [0, 2**63-1], got {value!r}")
    return value


def _validate_fields(topic: object) -> None:
    """Topics built directly (not parsed) are validated like builder arguments."""
    for name, value in vars(topic).items():
        if name == "fleet":
            fleet_name(value)
        elif name == "device_id":
            device_id(value)
        elif name == "shard":
            validate_name(value, "shard id")
        elif name == "artifact":
            ModelArtifact(value)
        elif name == "leaf":
            ShardsLeaf(value)
        elif name == "control":
            PartitionControl(value)
        elif name == "partition":
            if value is not None:
                _check_partition(value)
        else:
            _check_int(value, name)


def _check_partition(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_PARTITIONS:
        raise ValueError(f"partition must be an int in [0, {MAX_PARTITIONS}), got {value!r}")
    return value


class TopicKind(StrEnum):
    """What a topic carries."""

    MODEL_MANIFEST = "model_manifest"
    MODEL_CHUNK = "model_chunk"
    DEVICE_UPDATE = "device_update"
    DEVICE_STATE = "device_state"
    DEVICE_RECEIPT = "device_receipt"
    DEVICE_CHECKIN = "device_checkin"
    DEVICE_LEASE = "device_lease"
    SERVER_STATE = "server_state"
    SERVER_METRICS = "server_metrics"
    SHARDS = "shards"  # 1.3: shards/assignment, shards/partial, shards/root/status
    PARTITION_CONTROL = "partition_control"  # 1.3: shards/part/<k>/<control>
    # secure aggregation (protocol 1.3)
    SECAGG_SHARE = "secagg_share"
    SECAGG_SEED = "secagg_seed"
    SECAGG_DECISION = "secagg_decision"
    SECAGG_REPORT = "secagg_report"


class ModelArtifact(StrEnum):
    """Which artifact of a model version a model chunk belongs to."""

    WEIGHTS = "weights"  # model/<version>/<chunk>: the bytes described by the manifest
    ONNX = "onnx"  # model/<version>/onnx/<chunk>: the optional ONNX graph


@dataclass(frozen=True)
class ModelManifestTopic:
    """``edgefl/v1/<fleet>/model/manifest``."""

    kind: ClassVar[TopicKind] = TopicKind.MODEL_MANIFEST
    fleet: str

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return manifest_topic(self.fleet)


@dataclass(frozen=True)
class ModelChunkTopic:
    """``edgefl/v1/<fleet>/model/<version>/<chunk>`` or ``.../<version>/onnx/<chunk>``."""

    kind: ClassVar[TopicKind] = TopicKind.MODEL_CHUNK
    fleet: str
    version: int
    index: int
    artifact: ModelArtifact = ModelArtifact.WEIGHTS

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return model_chunk_topic(self.fleet, self.version, self.index, artifact=self.artifact)


@dataclass(frozen=True)
class UpdateTopic:
    """``edgefl/v1/<fleet>/device/<id>/update/<seq>``, or (1.3) with ``partition`` set
    ``edgefl/v1/<fleet>/part/<k>/device/<id>/update/<seq>``."""

    kind: ClassVar[TopicKind] = TopicKind.DEVICE_UPDATE
    fleet: str
    device_id: str
    seq: int
    partition: int | None = None

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return update_topic(self.fleet, self.device_id, self.seq, partition=self.partition)


@dataclass(frozen=True)
class _DeviceLeafTopic:
    """``edgefl/v1/<fleet>/device/<id>/<leaf>``: the one-level topics of a device."""

    kind: ClassVar[TopicKind]
    leaf: ClassVar[str]
    fleet: str
    device_id: str

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return _device_leaf(self.fleet, self.device_id, self.leaf)


@dataclass(frozen=True)
class DeviceStateTopic(_DeviceLeafTopic):
    """``edgefl/v1/<fleet>/device/<id>/state``."""

    kind = TopicKind.DEVICE_STATE
    leaf = "state"


@dataclass(frozen=True)
class ReceiptTopic(_DeviceLeafTopic):
    """``edgefl/v1/<fleet>/device/<id>/receipt`` (protocol 1.1)."""

    kind = TopicKind.DEVICE_RECEIPT
    leaf = "receipt"


@dataclass(frozen=True)
class CheckInTopic(_DeviceLeafTopic):
    """``edgefl/v1/<fleet>/device/<id>/checkin`` (protocol 1.2)."""

    kind = TopicKind.DEVICE_CHECKIN
    leaf = "checkin"


@dataclass(frozen=True)
class LeaseTopic(_DeviceLeafTopic):
    """``edgefl/v1/<fleet>/device/<id>/lease`` (protocol 1.2)."""

    kind = TopicKind.DEVICE_LEASE
    leaf = "lease"


@dataclass(frozen=True)
class _ServerLeafTopic:
    """``edgefl/v1/<fleet>/server/<leaf>``."""

    kind: ClassVar[TopicKind]
    leaf: ClassVar[str]
    fleet: str

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return f"{_fleet_root(self.fleet)}/server/{self.leaf}"


@dataclass(frozen=True)
class ServerStateTopic(_ServerLeafTopic):
    """``edgefl/v1/<fleet>/server/state``."""

    kind = TopicKind.SERVER_STATE
    leaf = "state"


@dataclass(frozen=True)
class ServerMetricsTopic(_ServerLeafTopic):
    """``edgefl/v1/<fleet>/server/metrics``."""

    kind = TopicKind.SERVER_METRICS
    leaf = "metrics"


class ShardsLeaf(StrEnum):
    """``edgefl/v1/<fleet>/shards/<leaf>`` (1.3): the sharded tree's fleet-wide topics."""

    ASSIGNMENT = "assignment"  # root -> shards, devices: partition owners (retained)
    PARTIAL = "partial"  # shard -> root: a partial sum (the EDFP bytes of sharding.wire)
    ROOT_STATUS = "root/status"  # root -> anyone: version, buffer fill, verdicts (retained)


class PartitionControl(StrEnum):
    """``edgefl/v1/<fleet>/shards/part/<k>/<control>`` (1.3): one partition's hand-over."""

    TAKEOVER = "takeover"  # new owner -> root: {"epoch": e}
    GRANTED = "granted"  # root -> owner: the epoch, the version and the seq windows (or refused)
    CONFIRM = "confirm"  # root -> owner: the verdict on a partial; the owner then acks
    PROGRESS = "progress"  # owner -> anyone: open updates (QoS 0)


@dataclass(frozen=True)
class ShardsTopic:
    """``edgefl/v1/<fleet>/shards/<leaf>`` (1.3)."""

    kind: ClassVar[TopicKind] = TopicKind.SHARDS
    fleet: str
    leaf: ShardsLeaf

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return shards_topic(self.fleet, self.leaf)


@dataclass(frozen=True)
class ShardStateTopic:
    """``edgefl/v1/<fleet>/shards/<shard>/state`` (1.3): a shard's liveness (retained + Will)."""

    kind: ClassVar[TopicKind] = TopicKind.SHARDS
    fleet: str
    shard: str

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return shard_state_topic(self.fleet, self.shard)


@dataclass(frozen=True)
class PartitionControlTopic:
    """``edgefl/v1/<fleet>/shards/part/<k>/<control>`` (1.3)."""

    kind: ClassVar[TopicKind] = TopicKind.PARTITION_CONTROL
    fleet: str
    partition: int
    control: PartitionControl

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return partition_control_topic(self.fleet, self.partition, self.control)


# secure aggregation (protocol 1.3): the topic classes; builders and parser further down


@dataclass(frozen=True)
class _SecAggUpdateTopic:
    """``edgefl/v1/<fleet>/secagg/<leaf>/<id>/<seq>``: one share of update ``(id, seq)``."""

    kind: ClassVar[TopicKind]
    leaf: ClassVar[str]
    fleet: str
    device_id: str
    seq: int

    def __post_init__(self) -> None:
        _validate_fields(self)

    @property
    def topic(self) -> str:
        return f"{_fleet_root(self.fleet)}/secagg/{self.leaf}/{self.device_id}/{self.seq}"


@dataclass(frozen=True)
class SecAggShareTopic(_SecAggUpdateTopic):
    """``edgefl/v1/<fleet>/secagg/share/<id>/<seq>``: the masked share (device → leader)."""

    kind = TopicKind.SECAGG_SHARE
    leaf = "share"


@dataclass(frozen=True)
class SecAggSeedTopic(_SecAggUpdateTopic):
    """``edgefl/v1/<fleet>/secagg/seed/<id>/<seq>``: the sealed seed (device → helper)."""

    kind = TopicKind.SECAGG_SEED
    leaf = "seed"


@dataclass(frozen=True)
class _SecAggLeafTopic(_ServerLeafTopic):
    """``edgefl/v1/<fleet>/secagg/<leaf>``: a coordination topic between the two aggregators."""

    @property
    def topic(self) -> str:
        return f"{_fleet_root(self.fleet)}/secagg/{self.leaf}"


@dataclass(frozen=True)
class SecAggDecisionTopic(_SecAggLeafTopic):
    """``edgefl/v1/<fleet>/secagg/decision``: membership decisions (leader → helper)."""

    kind = TopicKind.SECAGG_DECISION
    leaf = "decision"


@dataclass(frozen=True)
class SecAggReportTopic(_SecAggLeafTopic):
    """``edgefl/v1/<fleet>/secagg/report``: seed reports, partials, refusals (helper → leader)."""

    kind = TopicKind.SECAGG_REPORT
    leaf = "report"


ParsedTopic = (
    ModelManifestTopic
    | ModelChunkTopic
    | UpdateTopic
    | DeviceStateTopic
    | ReceiptTopic
    | CheckInTopic
    | LeaseTopic
    | ServerStateTopic
    | ServerMetricsTopic
    | ShardsTopic
    | ShardStateTopic
    | PartitionControlTopic
    | SecAggShareTopic
    | SecAggSeedTopic
    | SecAggDecisionTopic
    | SecAggReportTopic
)
"""Tagged union returned by :func:`parse_topic`; narrow with ``isinstance`` or ``match``."""


# ---------------------------------------------------------------------------------------------
# builders


def _fleet_root(fleet: str) -> str:
    return f"{PROTOCOL_ROOT}/{fleet_name(fleet)}"


def manifest_topic(fleet: str) -> str:
    """``edgefl/v1/<fleet>/model/manifest`` (retained, QoS1, MODEL_MANIFEST)."""
    return f"{_fleet_root(fleet)}/model/manifest"


def model_chunk_topic(
    fleet: str, version: int, index: int, *, artifact: ModelArtifact = ModelArtifact.WEIGHTS
) -> str:
    """``edgefl/v1/<fleet>/model/<version>/<index>`` for weights, ``.../onnx/<index>`` for ONNX."""
    version = _check_int(version, "version")
    index = _check_int(index, "chunk index")
    middle = "" if artifact is ModelArtifact.WEIGHTS else f"{ModelArtifact(artifact).value}/"
    return f"{_fleet_root(fleet)}/model/{version}/{middle}{index}"


def update_topic(fleet: str, device: str, seq: int, *, partition: int | None = None) -> str:
    """``edgefl/v1/<fleet>/device/<id>/update/<seq>`` (QoS1, not retained); with ``partition``
    (1.3) ``edgefl/v1/<fleet>/part/<k>/device/<id>/update/<seq>``."""
    device_part = f"device/{device_id(device)}/update/{_check_int(seq, 'seq')}"
    return f"{_partition_root(fleet, partition)}/{device_part}"


def _partition_root(fleet: str, partition: int | None) -> str:
    """``edgefl/v1/<fleet>``, or ``edgefl/v1/<fleet>/part/<k>`` for a partition."""
    if partition is None:
        return _fleet_root(fleet)
    return f"{_fleet_root(fleet)}/{PARTITION_LEVEL}/{_check_partition(partition)}"


def shards_topic(fleet: str, leaf: ShardsLeaf) -> str:
    """``edgefl/v1/<fleet>/shards/<leaf>`` (1.3): ``assignment``, ``partial``, ``root/status``."""
    return f"{_fleet_root(fleet)}/shards/{ShardsLeaf(leaf).value}"


SHARD_STATE_LEAF = "state"


def shard_state_topic(fleet: str, shard: str) -> str:
    """``edgefl/v1/<fleet>/shards/<shard>/state`` (1.3): a shard's retained liveness."""
    return f"{_fleet_root(fleet)}/shards/{validate_name(shard, 'shard id')}/{SHARD_STATE_LEAF}"


def shard_states_filter(fleet: str) -> str:
    """Every shard's liveness: ``.../shards/+/state`` (the root's)."""
    return f"{_fleet_root(fleet)}/shards/+/{SHARD_STATE_LEAF}"


def partition_control_topic(fleet: str, partition: int, control: PartitionControl) -> str:
    """``edgefl/v1/<fleet>/shards/part/<k>/<control>`` (1.3)."""
    k = _check_partition(partition)
    return f"{_fleet_root(fleet)}/shards/{PARTITION_LEVEL}/{k}/{PartitionControl(control).value}"


def partition_control_filter(fleet: str, control: PartitionControl) -> str:
    """One control topic of every partition: ``.../shards/part/+/<control>`` (the root's)."""
    return f"{_fleet_root(fleet)}/shards/{PARTITION_LEVEL}/+/{PartitionControl(control).value}"


def _device_leaf(fleet: str, device: str, leaf: str) -> str:
    return f"{_fleet_root(fleet)}/device/{device_id(device)}/{leaf}"


def device_state_topic(fleet: str, device: str) -> str:
    """``edgefl/v1/<fleet>/device/<id>/state`` (retained, QoS1, also the device's Last Will)."""
    return _device_leaf(fleet, device, DeviceStateTopic.leaf)


def receipt_topic(fleet: str, device: str) -> str:
    """``edgefl/v1/<fleet>/device/<id>/receipt`` (retained, QoS1, published by the aggregator
    only; the device reads its own)."""
    return _device_leaf(fleet, device, ReceiptTopic.leaf)


def checkin_topic(fleet: str, device: str) -> str:
    """``edgefl/v1/<fleet>/device/<id>/checkin`` (QoS1, not retained, published by the device:
    it asks for, or gives up, a training lease)."""
    return _device_leaf(fleet, device, CheckInTopic.leaf)


def lease_topic(fleet: str, device: str) -> str:
    """``edgefl/v1/<fleet>/device/<id>/lease`` (QoS1, not retained, published by the aggregator
    only: a training lease for that device)."""
    return _device_leaf(fleet, device, LeaseTopic.leaf)


def server_state_topic(fleet: str) -> str:
    """``edgefl/v1/<fleet>/server/state`` (retained, QoS1, also the aggregator's Last Will)."""
    return ServerStateTopic(fleet).topic


def server_metrics_topic(fleet: str) -> str:
    """``edgefl/v1/<fleet>/server/metrics`` (QoS0, not retained, periodic)."""
    return ServerMetricsTopic(fleet).topic


# ---------------------------------------------------------------------------------------------
# subscription filters


def updates_filter(fleet: str, *, device: str | None = None, partition: int | None = None) -> str:
    """All update packets of a fleet (``.../device/+/update/+``) or of one device; with
    ``partition`` (1.3) those of one partition (``.../part/<k>/device/+/update/+``, what the
    partition's owner subscribes to)."""
    who = "+" if device is None else device_id(device)
    return f"{_partition_root(fleet, partition)}/device/{who}/update/+"


def device_states_filter(fleet: str) -> str:
    """Every device state of a fleet: ``edgefl/v1/<fleet>/device/+/state``."""
    return f"{_fleet_root(fleet)}/device/+/{DeviceStateTopic.leaf}"


def receipts_filter(fleet: str) -> str:
    """Every device's receipt of a fleet: ``edgefl/v1/<fleet>/device/+/receipt``."""
    return f"{_fleet_root(fleet)}/device/+/{ReceiptTopic.leaf}"


def checkins_filter(fleet: str) -> str:
    """Every device's check-in of a fleet: ``edgefl/v1/<fleet>/device/+/checkin``."""
    return f"{_fleet_root(fleet)}/device/+/{CheckInTopic.leaf}"


def model_chunks_filter(fleet: str, version: int) -> str:
    """Every chunk (weights and ONNX) of one model version: ``.../model/<version>/#``."""
    return f"{_fleet_root(fleet)}/model/{_check_int(version, 'version')}/#"


def all_fleet_filter(fleet: str) -> str:
    """Everything of a fleet (what ``edgefl monitor`` subscribes to): ``edgefl/v1/<fleet>/#``."""
    return f"{_fleet_root(fleet)}/#"


def shared_subscription(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription ``$share/<group>/<filter>`` (load-balanced aggregators).

    ``group`` follows ``NAME_PATTERN``; ``topic_filter`` must be an edgefl filter or topic.
    """
    validate_name(group, "shared subscription group")
    if not topic_filter.startswith(PROTOCOL_ROOT + "/"):
        raise ValueError(f"not an edgefl topic filter: {topic_filter!r}")
    return f"$share/{group}/{topic_filter}"


# ---------------------------------------------------------------------------------------------
# parser


def _bad_topic(topic: str, why: str) -> ProtocolError:
    return ProtocolError(RejectReason.BAD_TOPIC, f"{why}: {topic[:200]!r}")


def _parse_int(level: str, topic: str, what: str) -> int:
    if _INT_RE.fullmatch(level) is None or int(level) > MAX_INT:
        raise _bad_topic(topic, f"{what} is not a canonical decimal integer")
    return int(level)


def parse_topic(
    topic: str | bytes | memoryview, *, expected_fleet: str | None = None
) -> ParsedTopic:
    """Parse a concrete edgefl topic (never a filter) into its typed form.

    ``bytes`` are decoded as strict UTF-8 (invalid UTF-8 is ``BAD_TOPIC``). When
    ``expected_fleet`` is given, a well-formed topic of another fleet raises ``UNKNOWN_FLEET``.
    ``parse_topic(t).topic == t`` for every topic this returns.
    """
    text = _topic_text(topic)
    levels = text.split("/")
    if len(levels) < 4 or levels[0] != "edgefl":
        raise _bad_topic(text, "not an edgefl topic")
    if levels[1] != "v1":
        raise ProtocolError(RejectReason.BAD_VERSION, f"unsupported topic version {levels[1]!r}")
    fleet = fleet_name(levels[2])
    if expected_fleet is not None and fleet != expected_fleet:
        raise ProtocolError(RejectReason.UNKNOWN_FLEET, f"topic of fleet {fleet!r}")
    parsed = _parse_fleet_levels(fleet, levels[3:], text)
    if parsed is None:
        raise _bad_topic(text, "unknown edgefl topic")
    return parsed


def _topic_text(topic: str | bytes | memoryview) -> str:
    """The topic as text, at most ``MAX_TOPIC_BYTES`` long; strict UTF-8 for bytes."""
    if isinstance(topic, bytes | bytearray | memoryview):
        raw = bytes(topic)
        if len(raw) > MAX_TOPIC_BYTES:
            raise ProtocolError(RejectReason.BAD_TOPIC, f"topic longer than {MAX_TOPIC_BYTES} B")
        try:
            return raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as exc:
            raise ProtocolError(RejectReason.BAD_TOPIC, f"topic is not UTF-8: {exc}") from None
    if isinstance(topic, str):
        if len(topic) > MAX_TOPIC_BYTES:  # cheap bound before encoding
            raise ProtocolError(RejectReason.BAD_TOPIC, f"topic longer than {MAX_TOPIC_BYTES} B")
        return topic
    raise ProtocolError(RejectReason.BAD_TOPIC, f"topic must be str or bytes: {topic!r}")


def _parse_fleet_levels(fleet: str, rest: list[str], text: str) -> ParsedTopic | None:
    """The levels after ``edgefl/v1/<fleet>/`` as a typed topic; None if they name none."""
    family = _FLEET_FAMILIES.get(rest[0])
    return None if family is None else family(fleet, rest, text)


def _parse_model_levels(fleet: str, rest: list[str], text: str) -> ParsedTopic | None:
    """``model/manifest``, ``model/<version>/<index>``, ``model/<version>/onnx/<index>``."""
    n = len(rest)
    if n == 2 and rest[1] == "manifest":
        return ModelManifestTopic(fleet)
    if n == 3:
        version = _parse_int(rest[1], text, "model version")
        return ModelChunkTopic(fleet, version, _parse_int(rest[2], text, "chunk index"))
    if n == 4 and rest[2] == ModelArtifact.ONNX.value:
        version = _parse_int(rest[1], text, "model version")
        index = _parse_int(rest[3], text, "chunk index")
        return ModelChunkTopic(fleet, version, index, ModelArtifact.ONNX)
    return None


_DEVICE_LEAVES: dict[str, Callable[[str, str], ParsedTopic]] = {
    DeviceStateTopic.leaf: DeviceStateTopic,
    ReceiptTopic.leaf: ReceiptTopic,
    CheckInTopic.leaf: CheckInTopic,
    LeaseTopic.leaf: LeaseTopic,
}
_SERVER_LEAVES: dict[str, Callable[[str], ParsedTopic]] = {
    ServerStateTopic.leaf: ServerStateTopic,
    ServerMetricsTopic.leaf: ServerMetricsTopic,
}


def _parse_device_levels(fleet: str, rest: list[str], text: str) -> ParsedTopic | None:
    """``device/<id>/<leaf>`` (state, receipt, checkin, lease), ``device/<id>/update/<seq>``."""
    n = len(rest)
    if n < 3:
        return None
    device = device_id(rest[1])
    leaf = _DEVICE_LEAVES.get(rest[2]) if n == 3 else None
    if leaf is not None:
        return leaf(fleet, device)
    if n == 4 and rest[2] == "update":
        return UpdateTopic(fleet, device, _parse_int(rest[3], text, "update seq"))
    return None


def _parse_partition_levels(fleet: str, rest: list[str], text: str) -> ParsedTopic | None:
    """``part/<k>/device/<id>/update/<seq>`` (1.3): a partitioned update topic."""
    if len(rest) != 6 or rest[2] != "device" or rest[4] != "update":
        return None
    partition = _parse_partition(rest[1], text)
    device = device_id(rest[3])
    return UpdateTopic(fleet, device, _parse_int(rest[5], text, "update seq"), partition)


def _parse_partition(level: str, text: str) -> int:
    value = _parse_int(level, text, "partition")
    if value >= MAX_PARTITIONS:
        raise _bad_topic(text, f"partition {value} is not below {MAX_PARTITIONS}")
    return value


_SHARDS_LEAVES = {tuple(leaf.value.split("/")): leaf for leaf in ShardsLeaf}


def _parse_shards_levels(fleet: str, rest: list[str], text: str) -> ParsedTopic | None:
    """``shards/<leaf>``, ``shards/<shard>/state`` and ``shards/part/<k>/<control>`` (1.3)."""
    leaf = _SHARDS_LEAVES.get(tuple(rest[1:]))
    if leaf is not None:
        return ShardsTopic(fleet, leaf)
    if len(rest) == 3 and rest[2] == SHARD_STATE_LEAF:
        return ShardStateTopic(fleet, validate_name(rest[1], "shard id"))
    if len(rest) == 4 and rest[1] == PARTITION_LEVEL and rest[3] in _CONTROLS:
        return PartitionControlTopic(fleet, _parse_partition(rest[2], text), _CONTROLS[rest[3]])
    return None


_CONTROLS = {control.value: control for control in PartitionControl}


def _parse_server_levels(fleet: str, rest: list[str], _text: str) -> ParsedTopic | None:
    """``server/state``, ``server/metrics``."""
    leaf = _SERVER_LEAVES.get(rest[1]) if len(rest) == 2 else None
    return None if leaf is None else leaf(fleet)


_FLEET_FAMILIES: dict[str, Callable[[str, list[str], str], ParsedTopic | None]] = {
    "model": _parse_model_levels,
    "device": _parse_device_levels,
    "server": _parse_server_levels,
    PARTITION_LEVEL: _parse_partition_levels,
    "shards": _parse_shards_levels,
}


# ---------------------------------------------------------------------------------------------
# secure aggregation (protocol 1.3, docs/PROTOCOL.md "Secure aggregation"): a family of its own,
# ``edgefl/v1/<fleet>/secagg/...``, so that broker ACLs give the share and seed subtrees each to
# exactly one reader (the leader, the helper) with one pattern each.


def secagg_share_topic(fleet: str, device: str, seq: int) -> str:
    """``edgefl/v1/<fleet>/secagg/share/<id>/<seq>`` (QoS1, not retained; read by the leader
    only)."""
    return SecAggShareTopic(fleet, device, seq).topic


def secagg_seed_topic(fleet: str, device: str, seq: int) -> str:
    """``edgefl/v1/<fleet>/secagg/seed/<id>/<seq>`` (QoS1, not retained; read by the helper
    only)."""
    return SecAggSeedTopic(fleet, device, seq).topic


def secagg_decision_topic(fleet: str) -> str:
    """``edgefl/v1/<fleet>/secagg/decision`` (QoS1, not retained, published by the leader)."""
    return SecAggDecisionTopic(fleet).topic


def secagg_report_topic(fleet: str) -> str:
    """``edgefl/v1/<fleet>/secagg/report`` (QoS1, not retained, published by the helper)."""
    return SecAggReportTopic(fleet).topic


def secagg_shares_filter(fleet: str) -> str:
    """Every masked share of a fleet: ``edgefl/v1/<fleet>/secagg/share/+/+``."""
    return f"{_fleet_root(fleet)}/secagg/{SecAggShareTopic.leaf}/+/+"


def secagg_seeds_filter(fleet: str) -> str:
    """Every sealed seed of a fleet: ``edgefl/v1/<fleet>/secagg/seed/+/+``."""
    return f"{_fleet_root(fleet)}/secagg/{SecAggSeedTopic.leaf}/+/+"


_SECAGG_UPDATE_LEAVES: dict[str, Callable[[str, str, int], ParsedTopic]] = {
    SecAggShareTopic.leaf: SecAggShareTopic,
    SecAggSeedTopic.leaf: SecAggSeedTopic,
}
_SECAGG_LEAVES: dict[str, Callable[[str], ParsedTopic]] = {
    SecAggDecisionTopic.leaf: SecAggDecisionTopic,
    SecAggReportTopic.leaf: SecAggReportTopic,
}


def _parse_secagg_levels(fleet: str, rest: list[str], text: str) -> ParsedTopic | None:
    """``secagg/share/<id>/<seq>``, ``secagg/seed/<id>/<seq>``, ``secagg/decision``,
    ``secagg/report``."""
    n = len(rest)
    if n == 2:
        leaf = _SECAGG_LEAVES.get(rest[1])
        return None if leaf is None else leaf(fleet)
    update_leaf = _SECAGG_UPDATE_LEAVES.get(rest[1]) if n == 4 else None
    if update_leaf is None:
        return None
    return update_leaf(fleet, device_id(rest[2]), _parse_int(rest[3], text, "update seq"))


_FLEET_FAMILIES["secagg"] = _parse_secagg_levels
