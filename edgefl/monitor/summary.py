"""One-line topic-log entries (sans-IO).

:func:`log_entry` describes one received message in a single line of at most
:data:`MAX_SUMMARY` characters: the decoded kind and its key fields for an edgefl envelope (or
plain JSON device state), the value of a ``$SYS`` topic, and for anything else its size and a
hex prefix of at most :data:`HEX_PREFIX` bytes. Payloads are never dumped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from edgefl.protocol.topics import ModelArtifact

from .decode import (
    BrokerStat,
    Cleared,
    DeviceStateSeen,
    ManifestSeen,
    MetricsSeen,
    ModelChunkSeen,
    Observation,
    ReceiptSeen,
    ServerStateSeen,
    StateEncoding,
    TreeSeen,
    Undecodable,
    UpdateSeen,
    observation_kind,
)

__all__ = ["HEX_PREFIX", "MAX_SUMMARY", "TopicLogEntry", "human_bytes", "log_entry", "summarize"]

MAX_SUMMARY: Final = 160
HEX_PREFIX: Final = 16


def human_bytes(size: float) -> str:
    """``532 B``, ``17.2 KiB``, ``1.5 MiB`` (binary units, like the chunk limits)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _short(text: str, limit: int) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _hex_prefix(payload: bytes) -> str:
    head = payload[:HEX_PREFIX].hex()
    return "0x" + head + ("…" if len(payload) > HEX_PREFIX else "")


def _fmt_acc(value: float | None) -> str:
    return "" if value is None else f" acc={value:.3f}"


def summarize(obs: Observation, payload: bytes) -> str:
    """The one-line description of ``obs`` (decoded from ``payload``)."""
    match obs:
        case DeviceStateSeen():
            text = _device_state_text(obs)
        case ManifestSeen(manifest=m):
            chunks = f"{m.num_chunks} chunk{'s' if m.num_chunks != 1 else ''}"
            onnx = " +onnx" if m.onnx is not None else ""
            text = (
                f"model_manifest v{m.version} {m.model} {m.format.value} {human_bytes(m.size)}"
                f" in {chunks}{onnx} sha256={m.sha256[:12]}"
            )
        case ModelChunkSeen(version=v, artifact=artifact, chunk=c):
            what = "" if artifact is ModelArtifact.WEIGHTS else " onnx"
            text = (
                f"model_chunk v{v}{what} {c.index + 1}/{c.count}"
                f" of {human_bytes(c.total_size)} (data {human_bytes(c.data_length)})"
            )
        case UpdateSeen():
            text = _update_text(obs, payload)
        case ServerStateSeen():
            text = _server_state_text(obs)
        case ReceiptSeen(receipt=r):
            committed = ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in r.committed)
            rejected_seqs = ",".join(f"{seq}:{why}" for seq, why in sorted(r.rejected.items()))
            text = (
                f"receipt {r.device_id} through={r.through}"
                f" committed={committed or '-'} rejected={rejected_seqs or '-'}"
            )
        case MetricsSeen(metrics=m):
            text = (
                f"metrics v{m.version} buffer {m.buffer_fill}/{m.buffer_size}"
                f" {m.updates_per_s:.1f} upd/s {human_bytes(m.bytes_per_s)}/s"
                f" applied={m.applied} rejected={sum(m.rejected.values())}{_fmt_acc(m.accuracy)}"
            )
        case TreeSeen(topic=t, size=size):
            text = f"shards {t.topic.split('/shards/', 1)[1]} {human_bytes(size)}"
        case Cleared(topic=t):
            text = f"cleared retained {t.kind.value}"
        case BrokerStat(value=value):
            text = _short(value, 60)
        case Undecodable(reason=reason, detail=detail):
            text = (
                f"{reason.value}: {_short(detail, 60)} {human_bytes(len(payload))}"
                f" {_hex_prefix(payload)}"
            )
    return _short(text, MAX_SUMMARY)


def _server_state_text(obs: ServerStateSeen) -> str:
    s = obs.state
    rejected = sum(s.rejected.values())
    features = f" features={','.join(s.features)}" if s.features else ""
    p = s.participation
    leases = "" if p is None else f" leases={p.in_flight}/{p.concurrency}"
    leases += "" if p is None else f" candidates={p.candidates}"
    dp, privacy = s.privacy, ""
    if dp is not None:
        privacy = f" ε={dp.epsilon:.3g}@δ={dp.delta:g}"
        privacy += f" dp_max={dp.participation_max}/{dp.participation_cap}"
    return (
        f"server_state {s.status.value} session={s.session} v{s.version}"
        f" buffer {s.buffer_fill}/{s.buffer_size} applied={s.applied} rejected={rejected}"
        f"{features}{leases}{privacy}"
    )


def _device_state_text(obs: DeviceStateSeen) -> str:
    s = obs.state
    parts = [f"device_state{' (json)' if obs.encoding is StateEncoding.JSON else ''}"]
    parts += [s.device_id, s.status.value, f"session={s.session}"]
    if s.model_version is not None:
        parts.append(f"model=v{s.model_version}")
    parts.append(f"sent={s.updates_sent}")
    if s.spool_depth is not None:
        parts.append(f"spool={s.spool_depth}")
    if s.awaiting_receipt is not None:
        parts.append(f"awaiting_receipt={s.awaiting_receipt}")
    if s.waiting_for_slot:
        parts.append("waiting_for_slot")
    if s.local_accuracy is not None:
        parts.append(f"acc={s.local_accuracy:.3f}")
    if s.reasons:
        parts.append("why=" + ",".join(s.reasons))
    return " ".join(parts)


def _update_text(obs: UpdateSeen, payload: bytes) -> str:
    h, c = obs.header, obs.chunk
    if h is not None:
        codec: dict[str, Any] = dict(h.codec)
        q = codec.get("quantization", "?")
        topk = f" top{codec['topk']}" if codec.get("topk") else ""
        return (
            f"update {obs.device_id} seq={obs.seq} base=v{h.base_version} n={h.num_examples}"
            f" {h.model} {q}{topk} {h.num_params} params {human_bytes(len(payload))}"
        )
    assert c is not None  # an UpdateSeen has a header or a chunk
    return (
        f"update_chunk {obs.device_id} seq={obs.seq} chunk {c.index + 1}/{c.count}"
        f" of {human_bytes(c.total_size)} id={c.message_id.hex()[:8]}"
    )


@dataclass(frozen=True)
class TopicLogEntry:
    """One line of the live topic log."""

    at: float
    topic: str
    qos: int
    retain: bool
    size: int
    kind: str
    summary: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "topic": self.topic,
            "qos": self.qos,
            "retain": self.retain,
            "size": self.size,
            "kind": self.kind,
            "summary": self.summary,
        }


def log_entry(
    obs: Observation, *, topic: str, payload: bytes, qos: int, retain: bool, at: float
) -> TopicLogEntry:
    """A topic-log entry for one message; the topic itself is shortened to 200 characters."""
    return TopicLogEntry(
        at=at,
        topic=_short(topic, 200),
        qos=qos,
        retain=retain,
        size=len(payload),
        kind=observation_kind(obs),
        summary=summarize(obs, payload),
    )
