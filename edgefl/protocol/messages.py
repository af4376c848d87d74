"""Typed headers of every envelope kind, and their encoding into envelopes.

Each message is a frozen dataclass with ``KIND`` (its :class:`EnvelopeKind`), ``to_header()``
(a JSON object) and ``from_header()``. Construction validates every field, so an invalid message
can neither be built nor decoded: both raise ``ProtocolError(BAD_HEADER)`` naming the field.
Decoders ignore header keys they do not know (additive evolution within wire version 1) and
treat a missing optional key as ``None``/empty.

Only ``UPDATE`` envelopes have a payload (the codec body, ``delta = local_weights -
base_weights`` encoded by ``edgefl.codec``). Manifests, device/server state and metrics are
header-only envelopes with an empty payload: small, and human-inspectable with any JSON tool
after skipping the 16-byte prefix. Model bytes travel as ``MODEL_CHUNK`` packets (``chunking``).

Fields holding dicts (``codec``, ``metrics``, ``rejected``, ...) are fresh copies made at
construction; treat them as read-only.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, ClassVar, Final, Protocol, Self, TypeVar, get_args

from edgefl.errors import ProtocolError, RejectReason

from . import _fields as f
from .chunking import Chunk, chunk_count
from .envelope import (
    Envelope,
    EnvelopeKind,
    JSONObject,
    decode_envelope,
    encode_envelope,
)
from .topics import (
    MAX_INT,
    CheckInTopic,
    DeviceStateTopic,
    LeaseTopic,
    ModelArtifact,
    ModelChunkTopic,
    ModelManifestTopic,
    ParsedTopic,
    ReceiptTopic,
    SecAggDecisionTopic,
    SecAggReportTopic,
    SecAggSeedTopic,
    SecAggShareTopic,
    ServerMetricsTopic,
    ServerStateTopic,
    TopicKind,
    UpdateTopic,
)

__all__ = [
    "FEATURE_LEASES",
    "FEATURE_RECEIPTS",
    # secure aggregation (protocol 1.3)
    "FEATURE_SECAGG",
    "MAX_CLOCK_AHEAD",
    "MAX_TIMESTAMP",
    "MESSAGE_TYPES",
    "PAYLOAD_KINDS",
    "PROTOCOL_REVISION",
    "TENSOR_DTYPES",
    "TOPIC_ENVELOPE_KINDS",
    "ArtifactInfo",
    "CheckIn",
    "DeviceState",
    "DeviceStatus",
    "Lease",
    "Message",
    "ModelFormat",
    "ModelManifest",
    "Participation",
    "Receipt",
    "SecAggCoord",
    "SecAggCoordKind",
    "SecAggInfo",
    "SecAggSeedHeader",
    "SecAggShareHeader",
    "ServerMetrics",
    "ServerState",
    "ServerStatus",
    "TensorSpec",
    "TrainingHints",
    "UpdateHeader",
    "UpdateMeta",
    "check_topic",
    "clamp_timestamp",
    "decode_message",
    "decode_update",
    "encode_message",
    "layout_num_params",
    "layout_sha256",
    "message_from_envelope",
]

PROTOCOL_REVISION: Final = "1.3"
"""Revision of wire version 1 this module implements (PROTOCOL.md, "Versioning"): 1.1 added
``RECEIPT``, ``ServerState.features`` and the spool fields of ``DeviceState``; 1.2 added
server-controlled participation (``CHECKIN``, ``LEASE``, ``UpdateHeader.lease_id``,
``ServerState.participation``, ``DeviceState.waiting_for_slot``) and ``ServerState.privacy``
(central differential privacy); 1.3 added the sharded tree's topics (``topics.py``) and the
sequence window below the mark (``sequence.py``)."""
FEATURE_RECEIPTS: Final = "receipts"
"""``ServerState.features`` entry of an aggregator that publishes receipts (PROTOCOL.md §4.6)."""
FEATURE_LEASES: Final = "leases"
"""``ServerState.features`` entry of an aggregator that grants training leases (PROTOCOL.md
§4.7): a device then trains only under a lease it was granted."""
MAX_TIMESTAMP: Final = f.MAX_TIMESTAMP
"""Timestamps in headers are clamped to this (2100-01-01T00:00:00Z) when decoded."""
MAX_CLOCK_AHEAD: Final = 86400.0
"""How far ahead of the receiver's clock :func:`clamp_timestamp` lets a sender's time be."""


def clamp_timestamp(value: float, *, now: float, max_ahead: float = MAX_CLOCK_AHEAD) -> float:
    """A sender's timestamp as a receiver may store or show it: within ``[0, now + max_ahead]``.

    Devices without a real-time clock report 1970 or a wildly wrong time until NTP syncs; their
    timestamps are never a reason to reject a message (headers only bound them to
    ``[0, MAX_TIMESTAMP]``), but what is stored or displayed must not claim a far future.
    Non-finite input gives ``now``.
    """
    if not math.isfinite(value):
        return now
    return min(max(value, 0.0), max(now, 0.0) + max_ahead)


TENSOR_DTYPES: Final = frozenset(
    {"float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
"""numpy dtype names a ``TensorSpec`` may declare."""
MAX_DIMS: Final = 32
MAX_DIM: Final = 2**31 - 1


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, _JSONFields):
        return value.to_json()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


class _JSONFields:
    """``to_json``/``from_json`` derived from the dataclass fields: one JSON key per field,
    ``None`` values omitted; a missing key takes the field's default (BAD_HEADER if it has
    none); unknown keys are ignored. Field validation happens in ``__post_init__``."""

    def to_json(self) -> JSONObject:
        out: JSONObject = {}
        for fl in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, fl.name)
            if value is not None:
                out[fl.name] = _jsonable(value)
        return out

    @classmethod
    def from_json(cls, value: Any) -> Self:
        obj = f.json_object(value, cls.__name__)
        kwargs: dict[str, Any] = {}
        for fl in dataclasses.fields(cls):  # type: ignore[arg-type]
            if fl.name in obj:
                kwargs[fl.name] = obj[fl.name]
            elif fl.default is dataclasses.MISSING and fl.default_factory is dataclasses.MISSING:
                raise f.bad(fl.name, "missing")
        return cls(**kwargs)


class _Message(_JSONFields):
    """A message: its envelope ``KIND`` and the header (``to_header``/``from_header``)."""

    KIND: ClassVar[EnvelopeKind]

    def to_header(self) -> JSONObject:
        """The envelope header (a JSON object)."""
        return self.to_json()

    @classmethod
    def from_header(cls, header: Mapping[str, Any]) -> Self:
        """Validate a decoded header; raises ``ProtocolError(BAD_HEADER)``."""
        return cls.from_json(header)


# ---------------------------------------------------------------------------------------------
# layout


@dataclass(frozen=True)
class TensorSpec(_JSONFields):
    """One tensor of a model's flat parameter vector, in layout order."""

    name: str  # 1-256 printable characters
    shape: tuple[int, ...]  # <= 32 dims, each in [0, 2**31-1]; () is a scalar
    dtype: str = "float32"  # one of TENSOR_DTYPES

    def __post_init__(self) -> None:
        f.text(self.name, "tensor name")
        if not isinstance(self.shape, list | tuple) or len(self.shape) > MAX_DIMS:
            raise f.bad("tensor shape", f"expected at most {MAX_DIMS} dimensions")
        _set(self, "shape", tuple(f.integer(d, "tensor dim", maximum=MAX_DIM) for d in self.shape))
        if not isinstance(self.dtype, str) or self.dtype not in TENSOR_DTYPES:
            raise f.bad("tensor dtype", f"unsupported dtype {self.dtype!r:.40}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def layout_num_params(layout: Sequence[TensorSpec]) -> int:
    """Total number of elements of a layout (the length of the flat parameter vector)."""
    return sum(t.numel for t in layout)


def layout_sha256(layout: Sequence[TensorSpec]) -> str:
    """SHA-256 hex of the canonical JSON of a layout: a short identity to compare layouts."""
    text = json.dumps([t.to_json() for t in layout], separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _layout(value: Any, num_params: Any) -> tuple[tuple[TensorSpec, ...], int]:
    if not isinstance(value, list | tuple) or len(value) > f.MAX_ENTRIES:
        raise f.bad("layout", f"expected a list of at most {f.MAX_ENTRIES} tensors")
    layout = tuple(v if isinstance(v, TensorSpec) else TensorSpec.from_json(v) for v in value)
    total = f.integer(num_params, "num_params")
    if layout and layout_num_params(layout) != total:
        raise f.bad("num_params", f"{total} != {layout_num_params(layout)} elements in layout")
    return layout, total


# ---------------------------------------------------------------------------------------------
# update


def _check_update_identity(h: UpdateHeader | SecAggShareHeader) -> None:
    """The fields an UPDATE and a SECAGG_SHARE header both carry: who sent which update, trained
    on which version, on how many examples, of which model."""
    f.name(h.fleet, "fleet")
    f.name(h.device_id, "device_id")
    f.integer(h.seq, "seq")
    f.integer(h.base_version, "base_version")
    f.integer(h.num_examples, "num_examples")
    f.name(h.model, "model")


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    """The public metadata of one update, unvalidated: what both an :class:`UpdateHeader` and a
    :class:`SecAggShareHeader` carry about it (those validate it when they are built). A device
    builds it once per update and hands it to whichever envelope the update goes out in."""

    fleet: str
    device_id: str
    seq: int
    base_version: int
    num_examples: int
    model: str
    created_at: float
    lease_id: int | None = None


@dataclass(frozen=True)
class UpdateHeader(_Message):
    """Header of an UPDATE envelope; the payload is the codec body of ``delta``.

    ``seq`` increases per device and is also the last topic level; ``(device_id, seq)``
    identifies the update for deduplication. ``layout`` may be empty (then only ``num_params``
    is declared); when present its element count must equal ``num_params``.
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.UPDATE
    fleet: str
    device_id: str
    seq: int
    base_version: int
    num_examples: int
    model: str
    codec: Mapping[str, Any]  # CodecDescriptor.to_dict(), opaque here
    num_params: int
    created_at: float
    layout: tuple[TensorSpec, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)  # e.g. {"loss": 0.3}
    lease_id: int | None = None  # the lease it was trained under (1.2)

    def __post_init__(self) -> None:
        _check_update_identity(self)
        f.opt_integer(self.lease_id, "lease_id")
        _set(self, "codec", f.json_object(self.codec, "codec"))
        layout, _ = _layout(self.layout, self.num_params)
        _set(self, "layout", layout)
        _set(self, "created_at", f.timestamp(self.created_at, "created_at"))
        _set(self, "metrics", f.number_map(self.metrics, "metrics"))


# ---------------------------------------------------------------------------------------------
# model manifest


class ModelFormat(StrEnum):
    """Format of a model version's main artifact."""

    FP32_FLAT = "fp32-flat"  # little-endian float32 parameters in layout order
    ONNX = "onnx"  # an ONNX graph with its weights


@dataclass(frozen=True)
class ArtifactInfo(_JSONFields):
    """Geometry of one chunked artifact: same meaning as the chunk header fields."""

    sha256: str  # hex of the artifact's bytes
    size: int
    chunk_size: int
    num_chunks: int

    def __post_init__(self) -> None:
        f.sha256_hex(self.sha256, "sha256")
        f.integer(self.size, "size")
        f.integer(self.chunk_size, "chunk_size", minimum=1)
        f.integer(self.num_chunks, "num_chunks", minimum=1)
        if self.num_chunks != chunk_count(self.size, self.chunk_size):
            raise f.bad("num_chunks", "inconsistent with size and chunk_size")


@dataclass(frozen=True)
class TrainingHints(_JSONFields):
    """What the server asks devices to do locally; every field optional."""

    local_epochs: int | None = None  # >= 1
    batch_size: int | None = None  # >= 1
    lr: float | None = None  # > 0
    codec: Mapping[str, Any] | None = None  # codec config (opaque here)

    def __post_init__(self) -> None:
        f.opt_integer(self.local_epochs, "local_epochs", minimum=1)
        f.opt_integer(self.batch_size, "batch_size", minimum=1)
        if self.lr is not None:
            _set(self, "lr", f.number(self.lr, "lr", minimum=math.ulp(0.0)))
        _set(self, "codec", f.opt_json_object(self.codec, "hints.codec"))


@dataclass(frozen=True)
class ModelManifest(_Message):
    """Header of a MODEL_MANIFEST envelope (retained on ``model/manifest``).

    The main artifact (``format``) is published as MODEL_CHUNK packets on
    ``model/<version>/<i>``; the optional ONNX graph on ``model/<version>/onnx/<i>``. For
    ``fp32-flat`` the size is exactly ``4 * num_params``.
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.MODEL_MANIFEST
    fleet: str
    version: int
    model: str
    format: ModelFormat
    sha256: str
    size: int
    chunk_size: int
    num_chunks: int
    num_params: int
    created_at: float
    layout: tuple[TensorSpec, ...] = ()
    hints: TrainingHints | None = None
    onnx: ArtifactInfo | None = None

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        f.integer(self.version, "version")
        f.name(self.model, "model")
        _set(self, "format", f.enum_value(ModelFormat, self.format, "format"))
        self.artifact(ModelArtifact.WEIGHTS)  # validates sha256/size/chunk_size/num_chunks
        layout, _ = _layout(self.layout, self.num_params)
        _set(self, "layout", layout)
        if self.format is ModelFormat.FP32_FLAT and self.size != 4 * self.num_params:
            raise f.bad("size", f"fp32-flat size {self.size} != 4 * num_params")
        _set(self, "created_at", f.timestamp(self.created_at, "created_at"))
        if self.hints is not None and not isinstance(self.hints, TrainingHints):
            _set(self, "hints", TrainingHints.from_json(self.hints))
        if self.onnx is not None and not isinstance(self.onnx, ArtifactInfo):
            _set(self, "onnx", ArtifactInfo.from_json(self.onnx))

    def artifact(self, which: ModelArtifact) -> ArtifactInfo:
        """Geometry of the weights or ONNX artifact (BAD_HEADER if the manifest has no ONNX)."""
        if which is ModelArtifact.WEIGHTS:
            return ArtifactInfo(self.sha256, self.size, self.chunk_size, self.num_chunks)
        if self.onnx is None:
            raise f.bad("onnx", "this model version has no ONNX artifact")
        return self.onnx

    def check_chunk(self, chunk: Chunk, topic: ModelChunkTopic) -> None:
        """Check a MODEL_CHUNK packet received on ``topic`` against this manifest.

        Raises ``ProtocolError(BAD_CHUNK)`` unless fleet, version and index of the topic and the
        chunk's sha256/total_size/chunk_size/count match the manifest's artifact.
        """
        if topic.fleet != self.fleet or topic.version != self.version:
            raise ProtocolError(RejectReason.BAD_CHUNK, "chunk topic is not this model version")
        if chunk.kind is not EnvelopeKind.MODEL_CHUNK or chunk.header.index != topic.index:
            raise ProtocolError(RejectReason.BAD_CHUNK, "chunk kind or index differs from topic")
        info = self.artifact(topic.artifact)
        h = chunk.header
        if (h.sha256.hex(), h.total_size, h.chunk_size, h.count) != (
            info.sha256,
            info.size,
            info.chunk_size,
            info.num_chunks,
        ):
            raise ProtocolError(RejectReason.BAD_CHUNK, "chunk does not belong to this manifest")


# ---------------------------------------------------------------------------------------------
# presence


class DeviceStatus(StrEnum):
    ONLINE = "online"  # connected, not yet decided
    IDLE = "idle"  # connected, not eligible or nothing to do
    TRAINING = "training"
    OFFLINE = "offline"  # clean shutdown
    LOST = "lost"  # Last Will: connection died


class ServerStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"  # clean shutdown
    LOST = "lost"  # Last Will


@dataclass(frozen=True)
class DeviceState(_Message):
    """Header of a DEVICE_STATE envelope (retained on ``device/<id>/state``, also the Will).

    ``session`` strictly increases with every connection of the device. Presence rule: a
    receiver ignores a state whose ``session`` is lower than the highest it has seen for that
    device (a late Will of an old connection), see :meth:`supersedes`. In a Will, ``at`` is the
    time the Will was registered (connect time), not the time the connection was lost.
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.DEVICE_STATE
    fleet: str
    device_id: str
    status: DeviceStatus
    session: int
    at: float
    model_version: int | None = None
    reasons: tuple[str, ...] = ()  # eligibility reasons, e.g. ("on_battery", "metered")
    updates_sent: int = 0
    local_accuracy: float | None = None  # in [0, 1]
    profile: str | None = None  # device profile name, e.g. "phone"
    spool_depth: int | None = None  # updates in the device's spool (1.1)
    awaiting_receipt: int | None = None  # of those, sent and waiting for a receipt (1.1)
    waiting_for_slot: bool | None = None  # True: eligible, checked in, waiting for a lease (1.2)
    # local differential privacy (1.2, docs/PRIVACY.md): all None when the device sends its
    # updates without local DP. epsilon_spent is the total over its noised updates at local_delta
    local_dp: str | None = None  # the mechanism: "gaussian" or "laplace"
    local_epsilon_per_update: float | None = None
    local_epsilon_spent: float | None = None
    local_epsilon_budget: float | None = None  # None: no budget
    local_delta: float | None = None  # 0 for Laplace alone
    local_dp_updates: int | None = None  # noised updates released so far
    local_budget_exhausted: bool | None = None  # True: one more update would pass the budget

    def __post_init__(self) -> None:
        if self.waiting_for_slot is not None:
            f.flag(self.waiting_for_slot, "waiting_for_slot")
        self._check_local_dp()
        f.name(self.fleet, "fleet")
        f.name(self.device_id, "device_id")
        f.opt_integer(self.spool_depth, "spool_depth")
        f.opt_integer(self.awaiting_receipt, "awaiting_receipt")
        _set(self, "status", f.enum_value(DeviceStatus, self.status, "status"))
        f.integer(self.session, "session")
        _set(self, "at", f.timestamp(self.at, "at"))
        f.opt_integer(self.model_version, "model_version")
        _set(self, "reasons", f.text_tuple(self.reasons, "reasons"))
        f.integer(self.updates_sent, "updates_sent")
        acc = f.opt_number(self.local_accuracy, "local_accuracy", minimum=0.0, maximum=1.0)
        _set(self, "local_accuracy", acc)
        if self.profile is not None:
            f.name(self.profile, "profile")

    def _check_local_dp(self) -> None:
        if self.local_dp is not None:
            f.name(self.local_dp, "local_dp")
        for key in ("local_epsilon_per_update", "local_epsilon_spent", "local_epsilon_budget"):
            _set(self, key, f.opt_number(getattr(self, key), key, minimum=0.0))
        _set(
            self,
            "local_delta",
            f.opt_number(self.local_delta, "local_delta", minimum=0.0, maximum=1.0),
        )
        f.opt_integer(self.local_dp_updates, "local_dp_updates")
        if self.local_budget_exhausted is not None:
            f.flag(self.local_budget_exhausted, "local_budget_exhausted")

    def supersedes(self, previous: DeviceState | None) -> bool:
        """Whether this state replaces ``previous`` under the presence rule (session >= old)."""
        return previous is None or self.session >= previous.session


@dataclass(frozen=True)
class Participation(_JSONFields):
    """Server-controlled participation of a leasing aggregator (``ServerState.participation``,
    protocol 1.2): at most ``concurrency`` leases at once, each valid ``lease_s`` seconds; a
    checked-in device stays a candidate ``checkin_ttl_s`` seconds unless it checks in again."""

    concurrency: int
    lease_s: float
    checkin_ttl_s: float
    in_flight: int = 0  # leases held when the state was published
    candidates: int = 0  # devices checked in and waiting for a lease

    def __post_init__(self) -> None:
        f.integer(self.concurrency, "concurrency", minimum=1)
        _set(self, "lease_s", f.number(self.lease_s, "lease_s", minimum=1.0))
        _set(self, "checkin_ttl_s", f.number(self.checkin_ttl_s, "checkin_ttl_s", minimum=1.0))
        f.integer(self.in_flight, "in_flight")
        f.integer(self.candidates, "candidates")


@dataclass(frozen=True)
class CentralPrivacy(_JSONFields):
    """Central differential privacy of the aggregator (``ServerState.privacy``, protocol 1.2):
    every update is clipped to L2 norm ``clip_norm`` and every flush adds Gaussian noise of std
    ``noise_multiplier * clip_norm``; ``epsilon`` (at ``delta``) is what the device with the
    most participations (``participation_max`` flushes) spent; a device may take part in
    ``participation_cap`` flushes; ``devices`` took part at least once, and
    ``participation_histogram`` maps a participation count to its number of devices."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    participation_cap: int
    participation_max: int = 0
    devices: int = 0  # devices with at least one participation
    participation_histogram: Mapping[int, int] = field(default_factory=dict)
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        _set(self, "epsilon", f.number(self.epsilon, "epsilon", minimum=0.0))
        _set(self, "delta", f.number(self.delta, "delta", minimum=0.0, maximum=1.0))
        _set(self, "noise_multiplier", f.number(self.noise_multiplier, "noise_multiplier"))
        _set(self, "clip_norm", f.number(self.clip_norm, "clip_norm", minimum=0.0))
        f.integer(self.participation_cap, "participation_cap", minimum=1)
        f.integer(self.participation_max, "participation_max")
        f.integer(self.devices, "devices")
        histogram = f.int_count_map(self.participation_histogram, "participation_histogram")
        _set(self, "participation_histogram", histogram)
        _set(self, "accountant", f.text(self.accountant, "accountant", max_len=16))


@dataclass(frozen=True)
class ServerState(_Message):
    """Header of a SERVER_STATE envelope (retained on ``server/state``, also the Will).

    Same session rule as :class:`DeviceState`. ``rejected`` counts rejections by
    ``RejectReason`` value (unknown keys from newer servers are kept as they are).
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.SERVER_STATE
    fleet: str
    status: ServerStatus
    session: int
    version: int  # current model version
    buffer_fill: int  # k: updates in the FedBuff buffer
    buffer_size: int  # K: updates per server step
    applied: int  # updates applied since started_at
    started_at: float
    at: float
    rejected: Mapping[str, int] = field(default_factory=dict)
    features: tuple[str, ...] = ()  # optional protocol features, e.g. ("receipts",) (1.1)
    participation: Participation | None = None  # with the "leases" feature (1.2)
    privacy: CentralPrivacy | None = None  # central differential privacy on (1.2)
    secagg: SecAggInfo | None = None  # with the "secagg" feature (1.3)

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        if self.secagg is not None and not isinstance(self.secagg, SecAggInfo):
            _set(self, "secagg", SecAggInfo.from_json(self.secagg))
        _set(self, "features", f.text_tuple(self.features, "features"))
        if self.participation is not None and not isinstance(self.participation, Participation):
            _set(self, "participation", Participation.from_json(self.participation))
        if self.privacy is not None and not isinstance(self.privacy, CentralPrivacy):
            _set(self, "privacy", CentralPrivacy.from_json(self.privacy))
        _set(self, "status", f.enum_value(ServerStatus, self.status, "status"))
        f.integer(self.session, "session")
        f.integer(self.version, "version")
        f.integer(self.buffer_size, "buffer_size", minimum=1)
        f.integer(self.buffer_fill, "buffer_fill", maximum=self.buffer_size)
        f.integer(self.applied, "applied")
        _set(self, "started_at", f.timestamp(self.started_at, "started_at"))
        _set(self, "at", f.timestamp(self.at, "at"))
        _set(self, "rejected", f.count_map(self.rejected, "rejected"))

    def supersedes(self, previous: ServerState | None) -> bool:
        return previous is None or self.session >= previous.session


# ---------------------------------------------------------------------------------------------
# metrics


@dataclass(frozen=True)
class ServerMetrics(_Message):
    """Header of a METRICS envelope (QoS0 on ``server/metrics``), published periodically.

    Totals count since the aggregator started; rates are per second over the last period.
    ``staleness`` is a histogram {staleness: count} of accepted updates. ``extra`` holds any
    further JSON figures (free-form, for dashboards; never needed to interpret the rest).
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.METRICS
    fleet: str
    at: float
    version: int
    buffer_fill: int
    buffer_size: int
    received: int = 0  # updates received (complete messages)
    applied: int = 0  # updates added to the buffer
    updates_per_s: float = 0.0
    bytes_ingested: int = 0  # MQTT payload bytes received
    bytes_per_s: float = 0.0
    staleness: Mapping[int, int] = field(default_factory=dict)
    rejected: Mapping[str, int] = field(default_factory=dict)
    accuracy: float | None = None  # in [0, 1], when the server evaluates
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        _set(self, "at", f.timestamp(self.at, "at"))
        f.integer(self.version, "version")
        f.integer(self.buffer_size, "buffer_size", minimum=1)
        f.integer(self.buffer_fill, "buffer_fill", maximum=self.buffer_size)
        for name in ("received", "applied", "bytes_ingested"):
            f.integer(getattr(self, name), name)
        for name in ("updates_per_s", "bytes_per_s"):
            _set(self, name, f.number(getattr(self, name), name, minimum=0.0))
        _set(self, "staleness", f.int_count_map(self.staleness, "staleness"))
        _set(self, "rejected", f.count_map(self.rejected, "rejected"))
        acc = f.opt_number(self.accuracy, "accuracy", minimum=0.0, maximum=1.0)
        _set(self, "accuracy", acc)
        _set(self, "extra", f.json_object(self.extra, "extra"))


# ---------------------------------------------------------------------------------------------
# receipts (protocol 1.1)

SeqRange = tuple[int, int]


def _seq_ranges(value: Any) -> tuple[SeqRange, ...]:
    if not isinstance(value, list | tuple) or len(value) > f.MAX_ENTRIES:
        raise f.bad("committed", f"expected a list of at most {f.MAX_ENTRIES} [lo, hi] ranges")
    out: list[SeqRange] = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise f.bad("committed", "each range is [lo, hi]")
        lo, hi = f.integer(item[0], "committed lo"), f.integer(item[1], "committed hi")
        if lo > hi or (out and lo <= out[-1][1] + 1):
            raise f.bad("committed", "ranges must be ascending, disjoint and not adjacent")
        out.append((lo, hi))
    return tuple(out)


def _rejections(value: Any) -> dict[int, str]:
    if not isinstance(value, Mapping) or len(value) > f.MAX_ENTRIES:
        raise f.bad("rejected", f"expected an object of at most {f.MAX_ENTRIES} entries")
    out: dict[int, str] = {}
    for key, reason in value.items():
        if isinstance(key, str) and _CANONICAL_INT.fullmatch(key) is not None:
            seq = f.integer(int(key), "rejected seq")
        elif isinstance(key, int) and not isinstance(key, bool):
            seq = f.integer(key, "rejected seq")
        else:
            raise f.bad("rejected", f"key {key!r:.40} is not a canonical seq")
        out[seq] = f.text(reason, f"rejected[{key}]", max_len=64)
    return dict(sorted(out.items()))


_CANONICAL_INT: Final = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class Receipt(_Message):
    """Header of a RECEIPT envelope (retained on ``device/<id>/receipt``; PROTOCOL.md §4.6).

    The aggregator publishes one per device per commit batch, after the batch committed:

    * ``through``: the device's highest durably committed ``seq`` (None: nothing committed yet).
      Every ``seq <= through`` is *settled*: committed, or refused for good if it ever arrives;
      from revision 1.3 only below ``through - 256``: a never-committed ``seq`` of the sequence
      window ``(through - 256, through)`` is still accepted once (``edgefl.protocol.sequence``).
    * ``committed``: the seqs committed by this batch (resends recognised as already committed
      included), as ascending, disjoint, non-adjacent ``[lo, hi]`` ranges.
    * ``rejected``: final rejections of this batch, ``{seq: RejectReason value}`` (unknown
      reasons from newer aggregators are kept as text).

    A device deletes the spooled updates that ``committed`` or ``rejected`` name. One it still
    holds with ``seq <= through`` that the receipt does not name was settled by a receipt it
    missed (or lost on the way): it resends it at once, and the aggregator answers with a
    receipt naming it. Receipts state facts about ``(device, seq)`` pairs, which are never
    reused, so a replayed or reordered receipt is harmless.
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.RECEIPT
    fleet: str
    device_id: str
    at: float
    through: int | None = None
    committed: tuple[SeqRange, ...] = ()
    rejected: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        f.name(self.device_id, "device_id")
        _set(self, "at", f.timestamp(self.at, "at"))
        f.opt_integer(self.through, "through")
        _set(self, "committed", _seq_ranges(self.committed))
        _set(self, "rejected", _rejections(self.rejected))
        if self.committed and (self.through is None or self.through < self.committed[-1][1]):
            raise f.bad("through", "lower than a committed seq")
        both = [seq for seq in self.rejected if self.is_committed(seq)]
        if both:
            raise f.bad("rejected", f"seq {both[0]} is also committed")

    def to_header(self) -> JSONObject:
        header = self.to_json()
        header.pop("committed", None)
        header.pop("rejected", None)
        if self.committed:
            header["committed"] = [[lo, hi] for lo, hi in self.committed]
        if self.rejected:
            header["rejected"] = {str(seq): reason for seq, reason in self.rejected.items()}
        return header

    def is_committed(self, seq: int) -> bool:
        """Whether this receipt names ``seq`` as committed."""
        index = bisect.bisect_right(self.committed, (seq, MAX_INT)) - 1
        return index >= 0 and self.committed[index][0] <= seq <= self.committed[index][1]

    def settles(self, seq: int) -> bool:
        """Whether ``seq`` is settled: ``seq <= through`` or named as rejected (1.1's reading of
        ``through``; from 1.3 a ``seq`` in the window below ``through`` that no receipt named
        may still be accepted: the device resends it, and the answer names it)."""
        return (self.through is not None and seq <= self.through) or seq in self.rejected


# ---------------------------------------------------------------------------------------------
# envelopes and topics

# ---------------------------------------------------------------------------------------------
# participation (protocol 1.2)


@dataclass(frozen=True)
class CheckIn(_Message):
    """Header of a CHECKIN envelope (QoS 1 on ``device/<id>/checkin``; PROTOCOL.md §4.7).

    ``available = True``: the device is eligible, holds model ``model_version`` and asks for a
    training lease; it stays a candidate for the aggregator's ``checkin_ttl_s`` and checks in
    again before that runs out. ``available = False``: it withdraws (no longer eligible, or
    stopping), and gives back a lease it holds without an update.
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.CHECKIN
    fleet: str
    device_id: str
    at: float
    available: bool = True
    model_version: int | None = None

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        f.name(self.device_id, "device_id")
        _set(self, "at", f.timestamp(self.at, "at"))
        f.flag(self.available, "available")
        f.opt_integer(self.model_version, "model_version")


@dataclass(frozen=True)
class Lease(_Message):
    """Header of a LEASE envelope (QoS 1 on ``device/<id>/lease``, from the aggregator only).

    The device may train one update, on model ``version`` or newer, and must deliver it under
    ``lease_id`` within ``ttl_s`` seconds of receiving the lease (a relative time: device clocks
    are untrusted). ``lease_id`` increases across every lease the aggregator ever granted.
    """

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.LEASE
    fleet: str
    device_id: str
    at: float
    lease_id: int
    ttl_s: float
    version: int

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        f.name(self.device_id, "device_id")
        _set(self, "at", f.timestamp(self.at, "at"))
        f.integer(self.lease_id, "lease_id", minimum=1)
        _set(self, "ttl_s", f.number(self.ttl_s, "ttl_s", minimum=1.0))
        f.integer(self.version, "version")


# ---------------------------------------------------------------------------------------------
# secure aggregation (protocol 1.3; PROTOCOL.md "Secure aggregation", docs/PRIVACY.md)

FEATURE_SECAGG: Final = "secagg"
"""``ServerState.features`` entry of a secure-aggregation leader: devices send each update as two
shares (``SECAGG_SHARE`` to the leader, ``SECAGG_SEED`` to the helper) instead of an UPDATE."""
_HELPER_KEY_B64: Final = re.compile(r"[A-Za-z0-9+/]{43}=")
_SECAGG_BITS: Final = (32, 64)


def _secagg_bits(value: Any) -> int:
    bits = f.integer(value, "bits")
    if bits not in _SECAGG_BITS:
        raise f.bad("bits", f"ring width must be 32 or 64, got {bits}")
    return bits


@dataclass(frozen=True)
class SecAggInfo(_JSONFields):
    """The ring of a secure-aggregation fleet (``ServerState.secagg``, 1.3): ``bits`` (32 or
    64), the fixed-point ``scale`` (a power of two), the clip norm ``clip_norm`` every device
    clips to, and ``helper_key``: the base64 of the helper's raw X25519 public key. A device
    seals only to the helper key of its *own* configuration (its bundle) and refuses to send
    when this one differs: a leader that announced its own key would receive both shares."""

    bits: int
    scale: int
    clip_norm: float
    helper_key: str

    def __post_init__(self) -> None:
        _secagg_bits(self.bits)
        f.integer(self.scale, "scale", minimum=1)
        if self.scale & (self.scale - 1):
            raise f.bad("scale", "must be a power of two")
        _set(self, "clip_norm", f.number(self.clip_norm, "clip_norm", minimum=math.ulp(0.0)))
        if not isinstance(self.helper_key, str) or not _HELPER_KEY_B64.fullmatch(self.helper_key):
            raise f.bad("helper_key", "expected the base64 of a 32-byte X25519 public key")


@dataclass(frozen=True)
class SecAggShareHeader(_Message):
    """Header of a SECAGG_SHARE envelope (QoS 1 on ``secagg/share/<id>/<seq>``): the leader's
    share of update ``(device_id, seq)``. The payload is the masked vector ``y = e - m mod
    2^bits``, ``bits / 8 * num_params`` bytes. The metadata is public, as for an UPDATE: the
    leader weighs the update from ``base_version`` and ``num_examples``."""

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.SECAGG_SHARE
    fleet: str
    device_id: str
    seq: int
    base_version: int
    num_examples: int
    model: str
    num_params: int
    bits: int
    created_at: float
    lease_id: int | None = None

    def __post_init__(self) -> None:
        _check_update_identity(self)
        f.integer(self.num_params, "num_params", minimum=1)
        _secagg_bits(self.bits)
        _set(self, "created_at", f.timestamp(self.created_at, "created_at"))
        f.opt_integer(self.lease_id, "lease_id")


@dataclass(frozen=True)
class SecAggSeedHeader(_Message):
    """Header of a SECAGG_SEED envelope (QoS 1 on ``secagg/seed/<id>/<seq>``): the helper's
    share of update ``(device_id, seq)``. The payload is the seed sealed to the helper's X25519
    key (80 bytes), bound to fleet, device, seq, model, ``num_params`` and ``bits``."""

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.SECAGG_SEED
    fleet: str
    device_id: str
    seq: int
    model: str
    num_params: int
    bits: int
    created_at: float

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        f.name(self.device_id, "device_id")
        f.integer(self.seq, "seq")
        f.name(self.model, "model")
        f.integer(self.num_params, "num_params", minimum=1)
        _secagg_bits(self.bits)
        _set(self, "created_at", f.timestamp(self.created_at, "created_at"))


class SecAggCoordKind(StrEnum):
    """What a SECAGG_COORD envelope says."""

    REPORT = "report"  # helper: the seed of (device_id, seq) opened (ok) or not (reason)
    DECISION = "decision"  # leader: buffer_id is members with weights; forget dropped
    PARTIAL = "partial"  # helper: the partial sum of buffer_id (the payload)
    REFUSAL = "refusal"  # helper: refused decision buffer_id (reason; missing seeds)


def _update_keys(value: Any, field_name: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list | tuple) or len(value) > f.MAX_ENTRIES:
        raise f.bad(field_name, f"expected a list of at most {f.MAX_ENTRIES} [device, seq]")
    out = []
    for item in value:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise f.bad(field_name, "each entry is [device, seq]")
        out.append((f.name(item[0], field_name), f.integer(item[1], field_name)))
    return tuple(out)


_COORD_NEEDS: Final[Mapping[SecAggCoordKind, tuple[str, ...]]] = {
    SecAggCoordKind.REPORT: ("device_id", "seq", "ok"),
    SecAggCoordKind.DECISION: ("buffer_id",),
    SecAggCoordKind.PARTIAL: ("buffer_id",),
    SecAggCoordKind.REFUSAL: ("buffer_id", "reason"),
}


@dataclass(frozen=True)
class SecAggCoord(_Message):
    """Header of a SECAGG_COORD envelope: the two aggregators' coordination (QoS 1; the leader
    publishes decisions on ``secagg/decision``, the helper the rest on ``secagg/report``).

    ``what`` selects the fields that must be present (:class:`SecAggCoordKind`); only a
    ``partial`` has a payload (``Σ_i w_i m_i mod 2^bits``, ``bits / 8 * num_params`` bytes)."""

    KIND: ClassVar[EnvelopeKind] = EnvelopeKind.SECAGG_COORD
    fleet: str
    what: SecAggCoordKind
    at: float
    buffer_id: int | None = None
    device_id: str | None = None
    seq: int | None = None
    ok: bool | None = None
    reason: str | None = None  # a SecAggReason value (kept as text: newer roles may add some)
    members: tuple[tuple[str, int], ...] = ()
    weights: tuple[int, ...] = ()
    dropped: tuple[tuple[str, int], ...] = ()
    missing: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        f.name(self.fleet, "fleet")
        _set(self, "what", f.enum_value(SecAggCoordKind, self.what, "what"))
        _set(self, "at", f.timestamp(self.at, "at"))
        for name in _COORD_NEEDS[self.what]:
            if getattr(self, name) is None:
                raise f.bad(name, f"required in a {self.what.value}")
        f.opt_integer(self.buffer_id, "buffer_id")
        if self.device_id is not None:
            f.name(self.device_id, "device_id")
        f.opt_integer(self.seq, "seq")
        if self.ok is not None:
            f.flag(self.ok, "ok")
        if self.reason is not None:
            f.text(self.reason, "reason", max_len=64)
        for name in ("members", "dropped", "missing"):
            _set(self, name, _update_keys(getattr(self, name), name))
        if not isinstance(self.weights, list | tuple) or len(self.weights) > f.MAX_ENTRIES:
            raise f.bad("weights", f"expected a list of at most {f.MAX_ENTRIES} integers")
        _set(self, "weights", tuple(f.integer(w, "weights", minimum=1) for w in self.weights))
        if self.what is SecAggCoordKind.DECISION and (
            not self.members or len(self.members) != len(self.weights)
        ):
            raise f.bad("weights", "a decision needs one weight per member, and members")

    def to_header(self) -> JSONObject:
        header = self.to_json()
        for name in ("members", "weights", "dropped", "missing"):
            if not header.get(name):
                header.pop(name, None)
        return header


Message = (
    UpdateHeader
    | ModelManifest
    | DeviceState
    | ServerState
    | ServerMetrics
    | Receipt
    | CheckIn
    | Lease
    | SecAggShareHeader
    | SecAggSeedHeader
    | SecAggCoord
)
M = TypeVar(
    "M",
    UpdateHeader,
    ModelManifest,
    DeviceState,
    ServerState,
    ServerMetrics,
    Receipt,
    CheckIn,
    Lease,
    SecAggShareHeader,
    SecAggSeedHeader,
    SecAggCoord,
)

MESSAGE_TYPES: Final[Mapping[EnvelopeKind, type[Message]]] = {
    cls.KIND: cls for cls in get_args(Message)
}

TOPIC_ENVELOPE_KINDS: Final[Mapping[TopicKind, frozenset[EnvelopeKind]]] = {
    TopicKind.MODEL_MANIFEST: frozenset({EnvelopeKind.MODEL_MANIFEST}),
    TopicKind.MODEL_CHUNK: frozenset({EnvelopeKind.MODEL_CHUNK}),
    TopicKind.DEVICE_UPDATE: frozenset({EnvelopeKind.UPDATE, EnvelopeKind.UPDATE_CHUNK}),
    TopicKind.DEVICE_STATE: frozenset({EnvelopeKind.DEVICE_STATE}),
    TopicKind.DEVICE_RECEIPT: frozenset({EnvelopeKind.RECEIPT}),
    TopicKind.DEVICE_CHECKIN: frozenset({EnvelopeKind.CHECKIN}),
    TopicKind.DEVICE_LEASE: frozenset({EnvelopeKind.LEASE}),
    TopicKind.SERVER_STATE: frozenset({EnvelopeKind.SERVER_STATE}),
    TopicKind.SERVER_METRICS: frozenset({EnvelopeKind.METRICS}),
    # 1.3, the sharded tree: JSON control messages and EDFP partials, no envelope (yet)
    TopicKind.SHARDS: frozenset(),
    TopicKind.PARTITION_CONTROL: frozenset(),
    TopicKind.SECAGG_SHARE: frozenset({EnvelopeKind.SECAGG_SHARE}),
    TopicKind.SECAGG_SEED: frozenset({EnvelopeKind.SECAGG_SEED}),
    TopicKind.SECAGG_DECISION: frozenset({EnvelopeKind.SECAGG_COORD}),
    TopicKind.SECAGG_REPORT: frozenset({EnvelopeKind.SECAGG_COORD}),
}
"""Which envelope kinds may be published on each kind of topic (anything else is BAD_KIND)."""

DEFAULT_MAX_MESSAGE: Final = 64 * 1024 * 1024
PAYLOAD_KINDS: Final = frozenset(
    {
        EnvelopeKind.UPDATE,
        EnvelopeKind.SECAGG_SHARE,
        EnvelopeKind.SECAGG_SEED,
        EnvelopeKind.SECAGG_COORD,
    }
)
"""Message kinds whose envelopes carry a payload (every other message is header-only)."""


class _Signer(Protocol):
    """What :func:`encode_message` needs of an ``edgefl.auth.EnvelopeSigner``."""

    def sign(self, envelope: bytes) -> bytes: ...


def encode_message(
    msg: Message,
    payload: bytes | bytearray | memoryview = b"",
    *,
    signer: _Signer | None = None,
) -> bytes:
    """Wrap a message in its envelope. Only the ``PAYLOAD_KINDS`` may have a payload.

    With ``signer`` (an ``edgefl.auth.EnvelopeSigner``, e.g. from ``edgefl.security.load_signer``)
    the result is the signed envelope (``docs/PROTOCOL.md``, "Signed envelopes"); every decoder
    accepts it, and ignores the signature unless it verifies it.
    """
    if len(payload) and msg.KIND not in PAYLOAD_KINDS:
        raise ValueError(f"{type(msg).__name__} envelopes have no payload")
    data = encode_envelope(msg.KIND, msg.to_header(), payload)
    return data if signer is None else signer.sign(data)


def check_topic(msg: Message, topic: ParsedTopic) -> None:
    """Raise ``ProtocolError`` unless ``msg`` may be published on ``topic``: BAD_KIND for the
    wrong kind of topic, BAD_HEADER when fleet / device id / seq / version disagree."""
    if msg.KIND not in TOPIC_ENVELOPE_KINDS[topic.kind]:
        raise ProtocolError(RejectReason.BAD_KIND, f"{msg.KIND.name} on a {topic.kind} topic")
    mismatch = msg.fleet != topic.fleet
    match msg, topic:
        case UpdateHeader(), UpdateTopic():
            mismatch |= (msg.device_id, msg.seq) != (topic.device_id, topic.seq)
        case (
            DeviceState() | Receipt() | CheckIn() | Lease(),
            DeviceStateTopic() | ReceiptTopic() | CheckInTopic() | LeaseTopic(),
        ):
            mismatch |= msg.device_id != topic.device_id
        case ModelManifest(), ModelManifestTopic():
            pass
        case SecAggShareHeader() | SecAggSeedHeader(), SecAggShareTopic() | SecAggSeedTopic():
            mismatch |= (msg.device_id, msg.seq) != (topic.device_id, topic.seq)
        case SecAggCoord(), SecAggDecisionTopic() | SecAggReportTopic():
            wrong_way = (msg.what is SecAggCoordKind.DECISION) != isinstance(
                topic, SecAggDecisionTopic
            )
            if wrong_way:
                raise ProtocolError(RejectReason.BAD_KIND, f"a {msg.what} on {topic.topic}")
        case (ServerState(), ServerStateTopic()) | (ServerMetrics(), ServerMetricsTopic()):
            pass
    if mismatch:
        raise ProtocolError(RejectReason.BAD_HEADER, f"header does not match topic {topic.topic}")


def message_from_envelope(
    envelope: Envelope, expected: type[M], *, topic: ParsedTopic | None = None
) -> M:
    """Parse a decoded envelope as ``expected``: BAD_KIND if it is another kind, BAD_HEADER if
    the header is invalid, a header-only kind carries a payload, or it disagrees with ``topic``."""
    if envelope.kind is not expected.KIND:
        raise ProtocolError(
            RejectReason.BAD_KIND, f"expected {expected.KIND.name}, got {envelope.kind.name}"
        )
    if expected.KIND not in PAYLOAD_KINDS and len(envelope.payload):
        raise ProtocolError(RejectReason.BAD_HEADER, f"{expected.KIND.name} has a payload")
    msg = expected.from_header(envelope.header)
    if topic is not None:
        check_topic(msg, topic)
    return msg


def decode_message(
    data: bytes | bytearray | memoryview,
    expected: type[M],
    *,
    max_payload: int | None = None,
    topic: ParsedTopic | None = None,
) -> M:
    """Decode an envelope holding ``expected`` (see :func:`message_from_envelope`).

    ``max_payload`` defaults to 0 for header-only kinds (a payload is then TOO_LARGE) and to
    ``DEFAULT_MAX_MESSAGE`` for updates; :func:`decode_update` also returns the update's body.
    """
    if max_payload is None:
        max_payload = DEFAULT_MAX_MESSAGE if expected.KIND in PAYLOAD_KINDS else 0
    envelope = decode_envelope(data, max_payload=max_payload)
    return message_from_envelope(envelope, expected, topic=topic)


def decode_update(
    data: bytes | bytearray | memoryview,
    *,
    max_payload: int = DEFAULT_MAX_MESSAGE,
    topic: ParsedTopic | None = None,
) -> tuple[UpdateHeader, memoryview]:
    """Decode a complete UPDATE envelope into its header and codec body (a zero-copy view)."""
    envelope = decode_envelope(data, max_payload=max_payload)
    return message_from_envelope(envelope, UpdateHeader, topic=topic), envelope.payload
