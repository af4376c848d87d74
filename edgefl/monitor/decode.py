"""Decode one inbound MQTT message into a typed observation (sans-IO).

The monitor sees everything under ``edgefl/v1/<fleet>/#`` plus, optionally, ``$SYS/#``.
:func:`decode_inbound` turns one ``(topic, payload)`` into exactly one observation:

* ``DeviceStateSeen`` — a ``DEVICE_STATE`` envelope, **or** a plain JSON object on the same
  topic (``{"status": "online", "session": 1, ...}``; the monitor's extension for scripts and
  non-Python devices, see ``docs/MONITOR.md``). The JSON form takes ``fleet`` and ``device_id``
  from the topic (if present they must agree) and ``at`` defaults to the receipt time; every
  field is validated exactly like the envelope's header (``DeviceState``).
* ``ManifestSeen``, ``ServerStateSeen``, ``MetricsSeen`` — the other header-only kinds.
* ``UpdateSeen`` — an ``UPDATE`` envelope (its header) or one ``UPDATE_CHUNK`` packet (its
  chunk header); the codec body is never opened.
* ``ModelChunkSeen`` — one retained ``MODEL_CHUNK`` packet.
* ``ReceiptSeen`` — a ``RECEIPT`` the aggregator published for a device (protocol 1.1).
* ``TreeSeen`` — traffic of a sharded tree under ``shards/`` (assignment, partials, controls,
  the root's status; protocol revision 1.3, §11): JSON and ``EDFP`` bytes between the root and
  its shards, not envelopes, so never counted as a rejection; its size only.
* ``Cleared`` — a zero-length payload: the deletion of a retained message (never ``TRUNCATED``).
* ``BrokerStat`` — a ``$SYS/...`` value as text (at most 256 characters kept).
* ``Undecodable`` — anything else, with the ``RejectReason`` a receiver would count.

Nothing here allocates from a declared size: envelopes are checked against the received length.
Device-provided times (a device state's ``at``, an update's ``created_at``) are clamped with
:func:`~edgefl.protocol.messages.clamp_timestamp` against the receive time: a device without a
real-time clock never makes the monitor show a far future.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from edgefl.errors import EdgeflError, ProtocolError, RejectReason
from edgefl.protocol.chunking import ChunkHeader, decode_chunk
from edgefl.protocol.envelope import Envelope, EnvelopeKind, decode_envelope
from edgefl.protocol.messages import (
    DeviceState,
    ModelManifest,
    Receipt,
    ServerMetrics,
    ServerState,
    UpdateHeader,
    clamp_timestamp,
    message_from_envelope,
)
from edgefl.protocol.topics import (
    DeviceStateTopic,
    ModelArtifact,
    ModelChunkTopic,
    ModelManifestTopic,
    ParsedTopic,
    PartitionControlTopic,
    ReceiptTopic,
    ServerMetricsTopic,
    ServerStateTopic,
    ShardStateTopic,
    ShardsTopic,
    UpdateTopic,
    parse_topic,
)

__all__ = [
    "MAX_JSON_STATE",
    "SYS_PREFIX",
    "BrokerStat",
    "Cleared",
    "DeviceStateSeen",
    "ManifestSeen",
    "MetricsSeen",
    "ModelChunkSeen",
    "Observation",
    "ReceiptSeen",
    "ServerStateSeen",
    "StateEncoding",
    "TreeSeen",
    "Undecodable",
    "UpdateSeen",
    "decode_inbound",
    "observation_kind",
    "parse_json_state",
]

SYS_PREFIX: Final = "$SYS/"
MAX_JSON_STATE: Final = 64 * 1024
"""Largest plain-JSON device state accepted (the envelope header limit)."""
_MAX_SYS_TEXT: Final = 256


class StateEncoding(StrEnum):
    """How a device state arrived."""

    ENVELOPE = "envelope"  # DEVICE_STATE envelope (docs/PROTOCOL.md §4.3)
    JSON = "json"  # plain JSON object (docs/MONITOR.md)


@dataclass(frozen=True)
class DeviceStateSeen:
    state: DeviceState
    encoding: StateEncoding


@dataclass(frozen=True)
class ManifestSeen:
    manifest: ModelManifest


@dataclass(frozen=True)
class ServerStateSeen:
    state: ServerState


@dataclass(frozen=True)
class MetricsSeen:
    metrics: ServerMetrics


@dataclass(frozen=True)
class UpdateSeen:
    """One update packet. ``header`` for a single-packet update, ``chunk`` for a chunk packet."""

    device_id: str
    seq: int
    header: UpdateHeader | None = None
    chunk: ChunkHeader | None = None


@dataclass(frozen=True)
class ModelChunkSeen:
    version: int
    artifact: ModelArtifact
    chunk: ChunkHeader


@dataclass(frozen=True)
class ReceiptSeen:
    """A receipt of the aggregator to one device: what it durably committed (or refused)."""

    receipt: Receipt


@dataclass(frozen=True)
class Cleared:
    """A zero-length payload on an edgefl topic: a retained message was deleted."""

    topic: ParsedTopic


@dataclass(frozen=True)
class TreeSeen:
    """One message of a sharded tree (``shards/...``, revision 1.3): ``topic`` and its size."""

    topic: ShardsTopic | ShardStateTopic | PartitionControlTopic
    size: int


@dataclass(frozen=True)
class BrokerStat:
    """One ``$SYS`` value, e.g. ``name="broker/clients/connected"``, ``value="3"``."""

    name: str
    value: str


@dataclass(frozen=True)
class Undecodable:
    reason: RejectReason
    detail: str


Observation = (
    DeviceStateSeen
    | ManifestSeen
    | ServerStateSeen
    | MetricsSeen
    | UpdateSeen
    | ModelChunkSeen
    | ReceiptSeen
    | TreeSeen
    | Cleared
    | BrokerStat
    | Undecodable
)
"""Tagged union returned by :func:`decode_inbound`."""

_KIND_NAMES: Final[dict[type, str]] = {
    DeviceStateSeen: "device_state",
    ManifestSeen: "model_manifest",
    ModelChunkSeen: "model_chunk",
    UpdateSeen: "update",
    ServerStateSeen: "server_state",
    MetricsSeen: "metrics",
    ReceiptSeen: "receipt",
    TreeSeen: "shards",
    Cleared: "cleared",
    BrokerStat: "sys",
    Undecodable: "undecodable",
}


def observation_kind(obs: Observation) -> str:
    """Short name of an observation's kind (``device_state``, ``update``, ``sys``, ...)."""
    return _KIND_NAMES[type(obs)]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def parse_json_state(payload: bytes, topic: DeviceStateTopic, *, now: float) -> DeviceState:
    """A plain JSON device state on ``topic`` (see the module docstring).

    Raises ``ProtocolError``: TOO_LARGE beyond :data:`MAX_JSON_STATE`, BAD_HEADER for anything
    that is not a JSON object of valid ``DeviceState`` fields or names another fleet/device.
    """
    if len(payload) > MAX_JSON_STATE:
        raise ProtocolError(RejectReason.TOO_LARGE, f"JSON state {len(payload)} B")
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(RejectReason.BAD_HEADER, f"not a JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(RejectReason.BAD_HEADER, "JSON state must be an object")
    for key, expected in (("fleet", topic.fleet), ("device_id", topic.device_id)):
        if obj.setdefault(key, expected) != expected:
            raise ProtocolError(RejectReason.BAD_HEADER, f"{key} does not match the topic")
    obj.setdefault("at", now)
    return _clamped(DeviceState.from_header(obj), now)


def _clamped(state: DeviceState, now: float) -> DeviceState:
    """``state`` with its device-provided ``at`` bounded for display (``clamp_timestamp``)."""
    at = clamp_timestamp(state.at, now=now)
    return state if at == state.at else dataclasses.replace(state, at=at)


def _looks_like_json(payload: bytes) -> bool:
    return payload[:1] == b"{" or payload.lstrip()[:1] == b"{"


def _decode_edgefl(topic: ParsedTopic, payload: bytes, now: float) -> Observation:
    if isinstance(topic, ShardsTopic | ShardStateTopic | PartitionControlTopic):
        return TreeSeen(topic, len(payload))  # the tree's own JSON / EDFP, not an envelope
    if not payload:
        return Cleared(topic)
    if isinstance(topic, DeviceStateTopic) and _looks_like_json(payload[:64]):
        return DeviceStateSeen(parse_json_state(payload, topic, now=now), StateEncoding.JSON)
    envelope = decode_envelope(payload, max_payload=len(payload))
    match topic:
        case DeviceStateTopic():
            state = message_from_envelope(envelope, DeviceState, topic=topic)
            return DeviceStateSeen(_clamped(state, now), StateEncoding.ENVELOPE)
        case ReceiptTopic():
            return ReceiptSeen(message_from_envelope(envelope, Receipt, topic=topic))
        case ModelManifestTopic():
            return ManifestSeen(message_from_envelope(envelope, ModelManifest, topic=topic))
        case ServerStateTopic():
            return ServerStateSeen(message_from_envelope(envelope, ServerState, topic=topic))
        case ServerMetricsTopic():
            return MetricsSeen(message_from_envelope(envelope, ServerMetrics, topic=topic))
        case UpdateTopic():
            return _update_seen(topic, envelope, now)
        case ModelChunkTopic():
            return _model_chunk_seen(topic, envelope)
    raise ProtocolError(RejectReason.BAD_TOPIC, "unhandled topic")  # pragma: no cover


def _update_seen(topic: UpdateTopic, envelope: Envelope, now: float) -> UpdateSeen:
    """An update's header (its device-provided time clamped for display), or one of its chunks."""
    if envelope.kind is EnvelopeKind.UPDATE_CHUNK:
        chunk = decode_chunk(envelope)
        return UpdateSeen(topic.device_id, topic.seq, chunk=chunk.header)
    header = message_from_envelope(envelope, UpdateHeader, topic=topic)
    created = clamp_timestamp(header.created_at, now=now)
    if created != header.created_at:
        header = dataclasses.replace(header, created_at=created)
    return UpdateSeen(topic.device_id, topic.seq, header=header)


def _model_chunk_seen(topic: ModelChunkTopic, envelope: Envelope) -> ModelChunkSeen:
    """A model chunk whose envelope kind and index agree with its topic."""
    if envelope.kind is not EnvelopeKind.MODEL_CHUNK:
        raise ProtocolError(RejectReason.BAD_KIND, f"{envelope.kind.name} on a model chunk")
    chunk = decode_chunk(envelope)
    if chunk.header.index != topic.index:
        raise ProtocolError(RejectReason.BAD_CHUNK, "chunk index differs from topic")
    return ModelChunkSeen(topic.version, topic.artifact, chunk.header)


def decode_inbound(topic: str, payload: bytes, *, fleet: str, now: float) -> Observation:
    """Decode one message received by the monitor of ``fleet`` at wall time ``now``."""
    if topic.startswith(SYS_PREFIX):
        text = payload[: _MAX_SYS_TEXT * 4].decode("utf-8", errors="replace")
        return BrokerStat(topic[len(SYS_PREFIX) :], text[:_MAX_SYS_TEXT])
    try:
        parsed = parse_topic(topic, expected_fleet=fleet)
        return _decode_edgefl(parsed, payload, now)
    except EdgeflError as exc:
        return Undecodable(exc.reason, exc.detail)
