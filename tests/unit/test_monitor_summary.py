"""One-line topic-log summaries: decoded fields for edgefl messages, size and a short hex prefix
for anything else, never a dump of a large payload; text rendering helpers."""

from __future__ import annotations

import pytest

from edgefl.monitor.decode import decode_inbound
from edgefl.monitor.model import FleetModel
from edgefl.monitor.render import format_age, snapshot_text, sparkline
from edgefl.monitor.summary import MAX_SUMMARY, human_bytes, log_entry
from edgefl.protocol.chunking import split_message
from edgefl.protocol.messages import (
    DeviceState,
    ModelFormat,
    ModelManifest,
    ServerMetrics,
    UpdateHeader,
    encode_message,
)
from edgefl.protocol.topics import (
    device_state_topic,
    manifest_topic,
    server_metrics_topic,
    update_topic,
)

FLEET = "lab"


def summary(topic: str, payload: bytes, *, retain: bool = False) -> str:
    obs = decode_inbound(topic, payload, fleet=FLEET, now=10.0)
    entry = log_entry(obs, topic=topic, payload=payload, qos=1, retain=retain, at=10.0)
    assert entry.size == len(payload)
    assert "\n" not in entry.summary
    assert len(entry.summary) <= MAX_SUMMARY
    return entry.summary


def test_device_state_summary() -> None:
    msg = DeviceState(
        FLEET,
        "pi-1",
        "idle",  # type: ignore[arg-type]
        3,
        1.0,
        model_version=5,
        reasons=("on_battery", "hot"),
        updates_sent=12,
        local_accuracy=0.9134,
    )
    text = summary(device_state_topic(FLEET, "pi-1"), encode_message(msg))
    assert text == "device_state pi-1 idle session=3 model=v5 sent=12 acc=0.913 why=on_battery,hot"
    plain = summary(device_state_topic(FLEET, "pi-1"), b'{"status":"online","session":1}')
    assert plain == "device_state (json) pi-1 online session=1 sent=0"


def test_manifest_metrics_and_update_summaries() -> None:
    manifest = ModelManifest(
        FLEET, 7, "mnist1d-cnn", ModelFormat.FP32_FLAT, "0f" * 32, 17192, 17192, 1, 4298, 1.0
    )
    assert summary(manifest_topic(FLEET), encode_message(manifest)) == (
        "model_manifest v7 mnist1d-cnn fp32-flat 16.8 KiB in 1 chunk sha256=0f0f0f0f0f0f"
    )
    metrics = ServerMetrics(
        FLEET, 2.0, 7, 3, 5, applied=40, updates_per_s=2.5, bytes_per_s=2048, accuracy=0.9
    )
    assert summary(server_metrics_topic(FLEET), encode_message(metrics)) == (
        "metrics v7 buffer 3/5 2.5 upd/s 2.0 KiB/s applied=40 rejected=0 acc=0.900"
    )
    header = UpdateHeader(
        FLEET, "pi-1", 9, 6, 160, "mnist1d-cnn", {"quantization": "int8"}, 4298, 1
    )
    body = b"\x01" * 4400
    assert summary(update_topic(FLEET, "pi-1", 9), encode_message(header, body)) == (
        "update pi-1 seq=9 base=v6 n=160 mnist1d-cnn int8 4298 params 4.5 KiB"
    )


def test_chunked_update_summary_names_the_chunk() -> None:
    packets = split_message(b"z" * 3000, max_packet=1024).packets
    text = summary(update_topic(FLEET, "pi-1", 2), packets[1])
    assert text.startswith(f"update_chunk pi-1 seq=2 chunk 2/{len(packets)} of 2.9 KiB id=")


def test_large_unknown_payload_is_summarised_not_dumped() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, not an envelope
    text = summary(device_state_topic(FLEET, "pi-1"), payload)
    assert text.startswith("bad_magic: ")
    assert "1.0 MiB 0x000102030405060708090a0b0c0d0e0f…" in text


def test_empty_retained_payload_and_sys_values() -> None:
    assert summary(device_state_topic(FLEET, "x"), b"", retain=True) == (
        "cleared retained device_state"
    )
    assert summary("$SYS/broker/clients/connected", b"4") == "4"
    assert summary("$SYS/broker/x", b"line\nbreak") == "line?break"


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**20, "3.0 MiB")]
)
def test_human_bytes(size: int, text: str) -> None:
    assert human_bytes(size) == text


def test_format_age_and_sparkline() -> None:
    assert [format_age(s) for s in (None, 4, 192, 7500, 90000)] == [
        "-",
        "4s",
        "3m12s",
        "2h05m",
        "1d01h",
    ]
    assert sparkline([0.1, 0.5, 0.9]) == "▁▅█"
    assert sparkline([0.5, 0.5]) == "▁▁"
    assert sparkline([]) == ""
    assert len(sparkline([float(i) for i in range(100)], width=10)) == 10


def test_snapshot_text_lists_devices() -> None:
    m = FleetModel(FLEET)
    topic = device_state_topic(FLEET, "pi-1")
    m.apply(decode_inbound(topic, b'{"status":"lost","session":1}', fleet=FLEET, now=5), now=5)
    text = snapshot_text(m.snapshot(10.0))
    assert "fleet lab" in text
    assert "1 lost" in text
    assert "pi-1    lost (will)  5s ago" in text
