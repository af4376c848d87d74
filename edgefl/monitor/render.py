"""Text rendering of a snapshot, shared by the terminal UI and ``edgefl monitor --once``.

Pure functions from snapshot values to strings; no terminal library is imported here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from .privacy import compact_histogram
from .snapshot import (
    AggregatorView,
    ConnectionView,
    DeviceView,
    FleetSnapshot,
    ModelView,
    ParticipationView,
    PrivacyView,
)
from .summary import human_bytes

__all__ = [
    "FLEET_COLUMNS",
    "STATUS_STYLES",
    "aggregator_lines",
    "connection_lines",
    "device_cells",
    "format_age",
    "model_lines",
    "participation_lines",
    "privacy_lines",
    "snapshot_text",
    "sparkline",
]

_BLOCKS: Final = "▁▂▃▄▅▆▇█"

STATUS_STYLES: Final = {
    "online": "green",
    "idle": "cyan",
    "training": "bold yellow",
    "offline": "dim",
    "lost": "bold red",
}
"""Rich styles of the effective device status (lost devices stand out)."""

FLEET_COLUMNS: Final = (
    "device",
    "state",
    "last seen",
    "model",
    "staleness",
    "why",
    "sent",
    "accuracy",
)
"""Fleet table columns, in display order (the keys of :func:`device_cells`)."""


def format_age(seconds: float | None) -> str:
    """``4s``, ``3m12s``, ``2h05m``, ``3d04h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """Unicode block sparkline of the last ``width`` values, scaled to their min..max."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    low, high = min(tail), max(tail)
    span = high - low
    top = len(_BLOCKS) - 1
    return "".join(_BLOCKS[0 if span == 0 else round((v - low) / span * top)] for v in tail)


def _opt(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def device_cells(device: DeviceView) -> dict[str, str]:
    """The fleet-table cells of one device, keyed by :data:`FLEET_COLUMNS`."""
    state = device.status
    if device.lost_reason is not None:
        state = f"lost ({device.lost_reason.value})"
    return {
        "device": device.device_id,
        "state": state,
        "last seen": format_age(device.last_seen_age_s) + " ago",
        "model": _opt(device.model_version, "v{}"),
        "staleness": _opt(device.model_staleness),
        "why": ",".join(device.reasons) or ("waiting for slot" if device.waiting_for_slot else "-"),
        "sent": f"{device.updates_sent}",
        "accuracy": _opt(device.local_accuracy, "{:.3f}"),
    }


def connection_lines(connection: ConnectionView | None) -> list[str]:
    if connection is None:
        return ["not connected"]
    proto = f"MQTT {connection.protocol}" if connection.protocol else "MQTT ?"
    link = "connected" if connection.connected else "DISCONNECTED"
    lines = [
        f"broker   {connection.broker}",
        f"         {proto}, {link}",
        f"client   {connection.client_id}",
    ]
    if not connection.connected and connection.last_error:
        lines.append(f"error    {connection.last_error}")
    b = connection.broker_stats
    if b.available:
        msgs = f"{_opt(b.messages_in_per_s, '{:.1f}')} in / {_opt(b.messages_out_per_s, '{:.1f}')}"
        bytes_in = "-" if b.bytes_in_per_s is None else human_bytes(b.bytes_in_per_s)
        bytes_out = "-" if b.bytes_out_per_s is None else human_bytes(b.bytes_out_per_s)
        lines += [
            f"$SYS     {_opt(b.clients)} clients, up {format_age(b.uptime_s)}",
            f"msgs/s   {msgs} out",
            f"bytes/s  {bytes_in} in / {bytes_out} out",
            f"dropped  {_opt(b.dropped_publishes)} broker / {connection.dropped} monitor",
        ]
    else:
        lines.append(f"$SYS     n/a (broker publishes none); monitor dropped {connection.dropped}")
    return lines


def model_lines(model: ModelView | None) -> list[str]:
    if model is None:
        return ["no model manifest yet"]
    onnx = " +onnx" if model.onnx else ""
    return [
        f"version  v{model.version} {model.model}",
        f"format   {model.format}{onnx}",
        f"size     {human_bytes(model.size)}, {model.num_params:,} params",
        f"chunks   {model.num_chunks} ({model.chunks_seen} retained seen)",
        f"age      {format_age(model.age_s)}",
        f"sha256   {model.sha256[:16]}",
    ]


def aggregator_lines(
    agg: AggregatorView, *, width: int = 40, with_sparkline: bool = True
) -> list[str]:
    """Aggregator panel lines; the accuracy sparkline (text) unless ``with_sparkline=False``."""
    if agg.version is None:
        return [
            "no aggregator state yet",
            f"updates  {agg.observed_updates_per_s:.1f}/s seen on the broker",
        ]
    fill = f"{agg.buffer_fill}/{agg.buffer_size}"
    rate = _opt(agg.updates_per_s, "{:.1f}")
    rejected = ", ".join(f"{k}={v}" for k, v in sorted(agg.rejected.items())) or "none"
    stale = " ".join(f"{k}:{v}" for k, v in sorted(agg.staleness.items())) or "-"
    accs = [a for _, a in agg.accuracy_history]
    acc_line = f"accuracy {_opt(agg.accuracy, '{:.3f}')}"
    if accs and with_sparkline:
        plural = "s" if len(accs) != 1 else ""
        acc_line += f"  {sparkline(accs, width)}  ({len(accs)} version{plural})"
    return [
        f"server   {_opt(agg.status)} v{agg.version}, buffer {fill}, applied {_opt(agg.applied)}",
        f"updates  {rate}/s server, {agg.observed_updates_per_s:.1f}/s seen",
        f"rejected {rejected}",
        *participation_lines(agg.participation),
        *privacy_lines(agg.privacy),
        f"τ:count  {stale}",
        acc_line,
    ]


def participation_lines(p: ParticipationView | None) -> list[str]:
    """``leases   7/10 in flight, 41 checked in, 38 waiting`` (for a slot) and the staleness
    of accepted updates against ``C / K``; nothing without leases."""
    if p is None:
        return []
    lines = [
        f"leases   {p.in_flight}/{p.concurrency} in flight, {p.candidates} checked in,"
        f" {p.waiting_for_slot} waiting"
    ]
    s = p.staleness
    seen = "no updates yet" if s is None else f"mean {s.mean:.1f}, p90 {s.p90}, max {s.max}"
    lines.append(f"τ vs C/K {seen} (C/K {p.staleness_target:.1f})")
    return lines


def privacy_lines(p: PrivacyView | None) -> list[str]:
    """Central DP: ``privacy  ε 3.21 at δ 1e-05 (rdp), z 1.1, C 0.3``, the most participations
    against the cap, and their distribution: median, p90 and mean, then ``1:12 2:30 3-5:8``
    (``k:n``: ``n`` devices took part in ``k`` flushes); nothing while DP is off."""
    if p is None:
        return []
    lines = [
        f"privacy  ε {p.epsilon:.3g} at δ {p.delta:g} ({p.accountant}),"
        f" z {p.noise_multiplier:g}, C {p.clip_norm:g}",
        f"dp cap   max {p.participation_max}/{p.participation_cap} flushes per device"
        f" ({100 * p.budget_used:.0f}%), {p.at_cap} at cap",
    ]
    if p.mean is None:
        return [*lines, "k:dev    no participations yet"]
    ranges = " ".join(
        f"{lo}:{n}" if lo == hi else f"{lo}-{hi}:{n}"
        for lo, hi, n in compact_histogram(p.participation_histogram)
    )
    plural = "s" if p.devices != 1 else ""
    spread = f"{p.devices} device{plural}: p50 {p.p50}, p90 {p.p90}, mean {p.mean:.1f}"
    return [*lines, f"k:dev    {spread}", f"         {ranges}"]


def snapshot_text(snapshot: FleetSnapshot) -> str:
    """A plain-text report of a snapshot (``edgefl monitor --once`` without ``--json``)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snapshot.at))
    counts = ", ".join(f"{v} {k}" for k, v in snapshot.counts.items()) or "no devices"
    out = [f"edgefl monitor — fleet {snapshot.fleet} at {when}: {counts}", ""]
    for title, lines in (
        ("connection", connection_lines(snapshot.connection)),
        ("model", model_lines(snapshot.model)),
        ("aggregator", aggregator_lines(snapshot.aggregator)),
    ):
        out.append(f"[{title}]")
        out += ["  " + line for line in lines]
        out.append("")
    rows = [list(FLEET_COLUMNS)] + [list(device_cells(d).values()) for d in snapshot.devices]
    widths = [max(len(r[i]) for r in rows) for i in range(len(FLEET_COLUMNS))]
    out.append("[fleet]")
    for row in rows:
        out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in out) + "\n"
