"""Sans-IO validation of inbound update packets: one packet in, one typed outcome out.

:class:`Ingest` turns the (topic, payload) of an MQTT message on an update topic into

* :class:`Pending`: a chunk of a larger update was stored; the service holds its MQTT
  acknowledgement until the update completes (or is given up), so a crash never loses a chunk the
  broker thinks was delivered;
* :class:`Accepted`: a complete update passed every check and went into the engine's buffer;
* :class:`Rejected`: with a :class:`~edgefl.errors.RejectReason`; the service counts and
  acknowledges it.

``IngestOutcome`` is the union of the three frozen variants; callers ``match`` on them, and every
field a variant has is set (no optional field to assert on).

Checks, in order (first failure wins): topic (``BAD_TOPIC``/``UNKNOWN_FLEET``/...); envelope and
chunking (``TOO_LARGE`` against ``max_update_bytes``, ``BAD_CHECKSUM``, ``CHUNK_CONFLICT``,
``REASSEMBLY_*``, ``BAD_KIND``); header against topic (``BAD_HEADER``); the authenticator when
configured (``UNKNOWN_DEVICE``/``BAD_SIGNATURE``); model name (``WRONG_MODEL``), ``num_params``
and layout (``SHAPE_MISMATCH``); ``(device, seq)`` already accepted (``DUPLICATE``), or
``SEQ_WINDOW`` (256) or more below the device's highest accepted seq (``REPLAY``: a lower seq
inside the window is accepted once, out-of-order redelivery), or more than ``max_seq_jump`` above
it (``SEQ_JUMP``, :func:`~edgefl.protocol.sequence.seq_verdict`); per-device rate
(``RATE_LIMITED``); codec (bounded decode: ``BAD_CODEC``, ``DECOMPRESSION_BOMB``,
``NON_FINITE``, ...); the ``admit`` hook when given (the participation lease check:
``NO_LEASE``, ``LEASE_EXPIRED``); then the engine (``STALE``, ``FUTURE_VERSION``, ``BAD_EXAMPLES``,
``NORM_BOUND``, FedAvg ``DUPLICATE``).
Nothing changes for a rejected update.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation import AddableUpdate, RobustMode
from edgefl.aggregator.config import REASSEMBLY_PARTIALS, AggregatorConfig
from edgefl.aggregator.engine import AddResult, Engine
from edgefl.codec import (
    CodecDescriptor,
    DecodedUpdate,
    inflate_body,
    max_decompressed,
    open_inflated,
    open_update,
)
from edgefl.errors import EdgeflError, ProtocolError, RejectReason
from edgefl.protocol import (
    EnvelopeKind,
    Reassembler,
    ReassemblyConfig,
    UpdateHeader,
    decode_chunk,
    decode_envelope,
    parse_topic,
)
from edgefl.protocol.chunking import DroppedMessage
from edgefl.protocol.messages import message_from_envelope
from edgefl.protocol.sequence import SEQ_WINDOW, SeqVerdict, seq_verdict
from edgefl.protocol.topics import UpdateTopic

__all__ = [
    "Accepted",
    "ChunkKey",
    "Decoded",
    "Ingest",
    "IngestOutcome",
    "OutcomeKind",
    "Pending",
    "Rejected",
    "StagedUpdate",
    "decode_body",
    "max_decompressed",
    "open_body",
]

RATE_WINDOW_S: Final = 60.0
_CODEC_CACHE: Final = 64  # distinct codec objects remembered

ChunkKey = tuple[str, bytes]  # (device id, chunk message id)


class OutcomeKind(StrEnum):
    """The name of each outcome variant (``outcome.kind``), for logs and tallies."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Pending:
    """A chunk packet of an update that is not complete yet.

    ``hold``: its acknowledgement waits until the update of ``chunk_key`` completes or is given
    up. False for a late duplicate of a chunk already reassembled: acknowledge it now."""

    chunk_key: ChunkKey
    hold: bool = True
    kind: ClassVar[OutcomeKind] = OutcomeKind.PENDING


@dataclass(frozen=True, slots=True)
class Accepted:
    """A complete update that went into the engine's buffer, with what the store keeps of it.

    ``chunk_key`` is set when the update came in chunks: this packet completed it, so the held
    chunk packets of that key are acknowledged with it."""

    header: UpdateHeader
    body: bytes | memoryview  # a read-only view into the received payload
    codec_json: str  # the header's codec object as canonical JSON (what the store keeps)
    result: AddResult
    chunk_key: ChunkKey | None = None
    kind: ClassVar[OutcomeKind] = OutcomeKind.ACCEPTED


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused update (or chunk packet); nothing changed.

    ``ends_message``: the packet ended the chunked message of ``chunk_key`` (its held chunk
    packets are acknowledged with it); False when the message may still complete."""

    reason: RejectReason
    detail: str = ""
    chunk_key: ChunkKey | None = None
    ends_message: bool = False
    kind: ClassVar[OutcomeKind] = OutcomeKind.REJECTED


IngestOutcome = Pending | Accepted | Rejected


@dataclass(frozen=True, slots=True)
class StagedUpdate:
    """A complete update packet that passed every check that needs no decoding (see
    :meth:`Ingest.stage`): what :meth:`Ingest.decode` and :meth:`Ingest.finish` need."""

    header: UpdateHeader
    body: bytes | memoryview
    descriptor: CodecDescriptor
    codec_json: str
    chunk_key: ChunkKey | None


Decoded = AddableUpdate | EdgeflError  # what Ingest.decode returns: the update, or why not


def decode_body(
    codec: Mapping[str, Any],
    body: bytes | memoryview,
    num_params: int,
    scratch: NDArray[np.float32] | None = None,
) -> AddableUpdate:
    """Validate a codec descriptor and open a body (raises ``CodecError``).

    With ``scratch`` (float32 ``(num_params,)``, reused between calls) the update is
    dequantized once into it and returned as a :class:`ScratchUpdate`: one dequantization pass
    instead of one for the norm and one for the accumulation. Only for consumers that use the
    update immediately and do not keep it (FedBuff without a robust mode).
    """
    return open_body(CodecDescriptor.from_dict(codec), body, num_params, scratch)


def open_body(
    descriptor: CodecDescriptor,
    body: bytes | memoryview,
    num_params: int,
    scratch: NDArray[np.float32] | None = None,
    *,
    inflated: bytes | None = None,
) -> AddableUpdate:
    """:func:`decode_body` with an already validated descriptor (and, when given, the body
    already decompressed by :func:`~edgefl.codec.inflate_body`)."""
    if inflated is None:
        decoded = open_update(
            descriptor, body, num_params=num_params, max_decompressed=max_decompressed(num_params)
        )
    else:
        decoded = open_inflated(descriptor, inflated, num_params=num_params)
    if scratch is None:
        return decoded
    return ScratchUpdate(decoded, scratch)


class ScratchUpdate:
    """:class:`~edgefl.aggregation.AddableUpdate` over a decoded update densified into a shared
    scratch vector (valid until the next :func:`decode_body` with the same scratch).

    ``squared_norm`` is the dot product of the dense float32 delta (float32 accumulation);
    ``add_to`` is ``out += float32(weight) * delta`` and may be called once: it scales the
    scratch in place instead of writing the product to another model-sized array.
    Deterministic, so replaying stored updates reproduces the buffer exactly.
    """

    __slots__ = ("_dense", "_spent", "_squared_norm")

    def __init__(self, decoded: DecodedUpdate, scratch: NDArray[np.float32]) -> None:
        dense: NDArray[np.float32] = scratch.reshape(-1)
        decoded.write_dense(dense)
        self._dense = dense
        self._spent = False
        # computed while the scratch is hot in cache. einsum runs numpy's own loop: np.dot
        # would call multi-threaded BLAS, whose helper threads spin and take a core away from
        # ingest (measured in docs/AGGREGATOR.md)
        self._squared_norm = float(np.einsum("i,i->", dense, dense))

    @property
    def num_params(self) -> int:
        return int(self._dense.shape[0])

    def squared_norm(self) -> float:
        self._check()
        return self._squared_norm

    def add_to(self, out: NDArray[np.float32], weight: float) -> None:
        self._check()
        self._spent = True
        np.multiply(self._dense, np.float32(weight), out=self._dense)
        np.add(out, self._dense, out=out)

    def to_dense(self) -> NDArray[np.float32]:
        self._check()
        return self._dense.copy()

    def _check(self) -> None:
        if self._spent:
            raise RuntimeError("a ScratchUpdate is consumed by its add_to()")


class Ingest:
    """Validation state of one aggregator: reassembly, dedup and rate windows (not durable
    except through the service, which persists what :class:`Accepted` outcomes carry)."""

    def __init__(
        self,
        config: AggregatorConfig,
        engine: Engine,
        *,
        max_seq: Mapping[str, int] | None = None,
        committed_seen: Callable[[str, int], bool] = lambda device, seq: False,
        admit: Callable[[UpdateHeader], None] | None = None,
    ) -> None:
        self._config = config
        self._admit = admit
        self._engine = engine
        self._spec = config.spec
        self._layout = tuple((t.name, tuple(t.shape), t.dtype) for t in self._spec.layout)
        self._reassembler = Reassembler(
            ReassemblyConfig(
                max_message_size=config.limits.max_update_bytes,
                max_buffered_bytes=max(
                    config.limits.max_update_bytes, config.ingest.max_inflight_bytes
                ),
                max_partials=REASSEMBLY_PARTIALS,
            )
        )
        self._max_seq: dict[str, int] = dict(max_seq or {})
        self._pending_seen: set[tuple[str, int]] = set()
        self._committed_seen = committed_seen
        self._windows: dict[str, deque[float]] = {}
        self._codecs: dict[tuple[tuple[str, str, Any], ...], tuple[CodecDescriptor, str]] = {}
        self.scratch = (
            np.zeros(self._spec.num_params, np.float32)
            if config.aggregation.robust is RobustMode.NONE
            else None
        )

    @property
    def reassembler(self) -> Reassembler:
        return self._reassembler

    def committed(self, pairs: list[tuple[str, int]]) -> None:
        """The service committed these accepted pairs: the durable lookup covers them now."""
        self._pending_seen.difference_update(pairs)

    def expire(self, now: float) -> list[DroppedMessage]:
        return self._reassembler.expire(now)

    # ------------------------------------------------------------------ one packet
    def process(self, topic: str, payload: bytes, *, now: float) -> IngestOutcome:
        """Validate one MQTT message of an update topic (``now``: monotonic seconds):
        :meth:`stage`, then :meth:`decode` into :attr:`scratch`, then :meth:`finish`."""
        staged = self.stage(topic, payload, now=now)
        if not isinstance(staged, StagedUpdate):
            return staged
        return self.finish(staged, self.decode(staged, self.scratch), now=now)

    def stage(self, topic: str, payload: bytes, *, now: float) -> StagedUpdate | Pending | Rejected:
        """The checks of one packet that need no decoding (topic, envelope, chunks, header,
        authentication, model, shape, seq, rate, codec descriptor). Returns the outcome when the
        packet is a pending chunk or rejected, else the staged update.

        Between :meth:`stage` and :meth:`finish` of one update, other packets may be staged and
        finished: :meth:`finish` repeats the checks whose state they can change (seq, rate), so
        the outcome is the one of processing the packets one by one in finish order."""
        chunk_key: ChunkKey | None = None
        try:
            parsed = parse_topic(topic, expected_fleet=self._config.fleet)
            if not isinstance(parsed, UpdateTopic):
                raise ProtocolError(RejectReason.BAD_TOPIC, f"not an update topic: {topic[:200]}")
            outer = decode_envelope(payload, max_payload=self._config.limits.max_update_bytes)
            if outer.kind is EnvelopeKind.UPDATE:
                envelope, data = outer, payload
            elif outer.kind is EnvelopeKind.UPDATE_CHUNK:
                chunk = decode_chunk(outer)
                chunk_key = (parsed.device_id, chunk.header.message_id)
                late = self._reassembler.statistics().late_duplicates
                try:
                    done = self._reassembler.add(chunk, source=parsed.device_id, now=now)
                except ProtocolError as exc:
                    ends = exc.reason is RejectReason.BAD_CHECKSUM
                    return Rejected(exc.reason, exc.detail, chunk_key, ends_message=ends)
                if done is None:
                    is_late = self._reassembler.statistics().late_duplicates != late
                    return Pending(chunk_key, hold=not is_late)
                data = done.data
                envelope = decode_envelope(data, max_payload=self._config.limits.max_update_bytes)
                if envelope.kind is not EnvelopeKind.UPDATE:
                    raise ProtocolError(
                        RejectReason.BAD_KIND, f"chunks carried {envelope.kind.name}"
                    )
            else:
                raise ProtocolError(RejectReason.BAD_KIND, f"{outer.kind.name} on an update topic")
            header = message_from_envelope(envelope, UpdateHeader, topic=parsed)
            self._check_header(header, data)
            self._check_seq(header.device_id, header.seq)
            self._check_rate(header.device_id, now)
            descriptor, codec_text = self._codec(header.codec)
        except EdgeflError as exc:
            return self._rejected(exc, chunk_key)
        return StagedUpdate(header, envelope.payload, descriptor, codec_text, chunk_key)

    def inflate(self, staged: StagedUpdate) -> bytes | EdgeflError:
        """Decompress a staged body (bounded): one GIL-free zstd call that touches no state of
        the Ingest, so it may run on another thread; returns the error instead of raising."""
        try:
            return inflate_body(
                staged.descriptor,
                staged.body,
                num_params=self._spec.num_params,
                max_decompressed=max_decompressed(self._spec.num_params),
            )
        except EdgeflError as exc:
            return exc

    def decode(
        self,
        staged: StagedUpdate,
        scratch: NDArray[np.float32] | None,
        inflated: bytes | EdgeflError | None = None,
    ) -> Decoded:
        """Validate and decode a staged body (into ``scratch`` when given), from its
        :meth:`inflate` result when given. Touches no state of the Ingest; returns the error
        instead of raising."""
        if isinstance(inflated, EdgeflError):
            return inflated
        try:
            return open_body(
                staged.descriptor,
                staged.body,
                self._spec.num_params,
                scratch,
                inflated=inflated,
            )
        except EdgeflError as exc:
            return exc

    def finish(self, staged: StagedUpdate, decoded: Decoded, *, now: float) -> Accepted | Rejected:
        """Re-check seq and rate, then add the decoded update to the engine."""
        header = staged.header
        device, seq = header.device_id, header.seq
        try:
            self._check_seq(device, seq)
            window = self._check_rate(device, now)
            if isinstance(decoded, EdgeflError):
                raise decoded
            if self._admit is not None:  # the participation lease check (it ends the lease)
                self._admit(header)
            result = self._engine.add(
                device,
                decoded,
                base_version=header.base_version,
                num_examples=header.num_examples,
                now=now,
            )
        except EdgeflError as exc:
            return self._rejected(exc, staged.chunk_key)
        self._max_seq[device] = max(seq, self._max_seq.get(device, -1))
        self._pending_seen.add((device, seq))
        if window is not None:
            window.append(now)
        return Accepted(header, staged.body, staged.codec_json, result, staged.chunk_key)

    @staticmethod
    def _rejected(exc: EdgeflError, chunk_key: ChunkKey | None) -> Rejected:
        return Rejected(exc.reason, exc.detail, chunk_key, ends_message=chunk_key is not None)

    def _check_header(self, header: UpdateHeader, data: bytes) -> None:
        cfg = self._config
        if cfg.authenticator is not None:
            cfg.authenticator.authenticate(header, data)
        if header.model != self._spec.name:
            raise ProtocolError(
                RejectReason.WRONG_MODEL,
                f"update for {header.model!r}, serving {self._spec.name!r}",
            )
        if header.num_params != self._spec.num_params:
            raise ProtocolError(
                RejectReason.SHAPE_MISMATCH,
                f"num_params {header.num_params} != {self._spec.num_params}",
            )
        if header.layout:
            layout = tuple((t.name, tuple(t.shape), t.dtype) for t in header.layout)
            if layout != self._layout:
                raise ProtocolError(RejectReason.SHAPE_MISMATCH, "layout differs from the model's")

    def _codec(self, codec: Mapping[str, Any]) -> tuple[CodecDescriptor, str]:
        """The validated descriptor and canonical JSON of a codec object, cached: a fleet uses
        a handful of codec settings, and parsing one costs about as much as decoding a small
        body."""
        try:
            # the type is part of the key: True == 1 == 1.0 must not share an entry
            key = tuple(sorted((k, type(v).__name__, v) for k, v in codec.items()))
            cached = self._codecs.get(key)
        except TypeError:  # an unhashable value: validation below refuses it
            key, cached = None, None
        if cached is not None:
            return cached
        descriptor = CodecDescriptor.from_dict(codec)
        text = json.dumps(dict(codec), separators=(",", ":"), sort_keys=True)
        if key is not None:
            if len(self._codecs) >= _CODEC_CACHE:
                self._codecs.clear()
            self._codecs[key] = (descriptor, text)
        return descriptor, text

    def _check_seq(self, device: str, seq: int) -> None:
        """The sequence rule (:func:`~edgefl.protocol.sequence.seq_verdict`): a ``seq`` above
        the device's mark (within ``max_seq_jump``), or less than ``SEQ_WINDOW`` below it and
        not counted yet (pending or in ``seen``), is new; a counted one is a ``DUPLICATE``; an
        uncounted one ``SEQ_WINDOW`` or more below the mark is a ``REPLAY``."""
        last, jump = self._max_seq.get(device), self._config.limits.max_seq_jump
        verdict = seq_verdict(last, seq, jump)
        if verdict is SeqVerdict.NEW:
            return
        if verdict is SeqVerdict.TOO_FAR:
            raise ProtocolError(
                RejectReason.SEQ_JUMP,
                f"seq {seq} is more than {jump} above the highest accepted"
                f" seq {-1 if last is None else last} of {device}",
            )
        if (
            verdict is SeqVerdict.SEEN
            or (device, seq) in self._pending_seen
            or self._committed_seen(device, seq)
        ):
            raise ProtocolError(RejectReason.DUPLICATE, f"({device}, {seq}) already accepted")
        if verdict is SeqVerdict.LATE:
            return  # out of order, inside the window, never counted: new
        raise ProtocolError(
            RejectReason.REPLAY,
            f"seq {seq} is {SEQ_WINDOW} or more below the highest accepted seq {last} of {device}",
        )

    def _check_rate(self, device: str, now: float) -> deque[float] | None:
        limit = self._config.limits.rate_limit_per_minute
        if limit is None:
            return None
        window = self._windows.setdefault(device, deque())
        while window and now - window[0] >= RATE_WINDOW_S:
            window.popleft()
        if len(window) >= max(1, int(limit)):
            raise ProtocolError(
                RejectReason.RATE_LIMITED, f"{device} sent {len(window)} updates in the last minute"
            )
        return window
