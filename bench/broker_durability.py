"""What Mosquitto's autosave settings cost, and what a SIGKILL loses with each (bounded run).

For every setting (``autosave_on_changes false`` with the shipped ``autosave_interval 60`` s,
then ``autosave_on_changes true`` with ``autosave_interval`` N changes) and payload size, on a
fresh private Mosquitto (``broker/conf/dev.conf`` plus the two lines) on 127.0.0.1:

1. a subscriber makes a persistent session (MQTT 3.1.1, clean session off, QoS 1);
2. mode ``offline``: it disconnects, so every message is *queued* for it (the aggregator down
   or restarting); mode ``paused``: it stays connected and never acknowledges (a stalled
   aggregator, SIGSTOP), so messages go *in flight* (up to ``max_inflight_messages`` 1000);
3. one publisher sends QoS 1 messages (20 in flight, paho's default) for at most
   ``--seconds`` or ``--count`` messages and waits for every PUBACK: **messages/s**;
4. right after the last PUBACK the broker is SIGKILLed and restarted, the subscriber reconnects
   to its session and collects what the broker still has: **lost** = acknowledged - received.

Mosquitto 2.0 counts as a "change" a message *queued* for a client, a subscription and a
retained message, and a PUBACK it receives from a subscriber; with ``autosave_on_changes true``
it writes its whole database (every queued and in-flight message, retained models included)
once N changes have accumulated, and no longer on a timer. A message sent straight into a
connected client's in-flight window is not a change.

    python bench/broker_durability.py [--seconds 8] [--scale 1.0] [--json]

The table goes to stdout (``--json``: one JSON object per cell, then one summary line). It takes
about 2-3 minutes; run it with ``nice`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.launcher import MosquittoBroker

TOPIC = "bench/durability"
SUB_ID = "bench-durability-sub"


@dataclass(frozen=True)
class Setting:
    on_changes: bool
    interval: int

    @property
    def label(self) -> str:
        return f"on_changes N={self.interval}" if self.on_changes else f"timer {self.interval} s"

    def lines(self) -> list[str]:
        return [
            f"autosave_on_changes {'true' if self.on_changes else 'false'}",
            f"autosave_interval {self.interval}",
        ]


@dataclass
class Cell:
    setting: str
    mode: str
    size: int
    target: int
    acked: int
    seconds: float
    rate: float
    saves: int
    received_after_kill: int
    lost: int


def _client(client_id: str, *, clean: bool, manual_ack: bool = False) -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )


def _connect(client: mqtt.Client, port: int, timeout: float = 10.0) -> None:
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not connected.wait(timeout):
        client.loop_stop()
        raise TimeoutError("no CONNACK")


def _subscribe(client: mqtt.Client, timeout: float = 10.0) -> None:
    done = threading.Event()
    client.on_subscribe = lambda *_args: done.set()
    client.subscribe(TOPIC, qos=1)
    if not done.wait(timeout):
        raise TimeoutError("no SUBACK")


def _publish(port: int, size: int, count: int, seconds: float) -> tuple[int, float]:
    """Publish until ``count`` or ``seconds``; returns (acknowledged, elapsed)."""
    pub = _client("bench-durability-pub", clean=True)
    pub.max_inflight_messages_set(20)
    _connect(pub, port)
    pad = b"x" * max(0, size - 8)
    infos: list[mqtt.MQTTMessageInfo] = []
    started = time.monotonic()
    try:
        i = 0
        while i < count and time.monotonic() - started < seconds:
            for _ in range(min(50, count - i)):
                infos.append(pub.publish(TOPIC, i.to_bytes(8, "big") + pad, qos=1))
                i += 1
            # keep at most a few batches queued inside paho, so the time bound holds
            while sum(1 for info in infos[-200:] if not info.is_published()) > 100:
                if time.monotonic() - started > seconds + 30:
                    raise TimeoutError("broker stopped acknowledging")
                time.sleep(0.002)
        deadline = time.monotonic() + 60
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        elapsed = time.monotonic() - started
        return sum(1 for info in infos if info.is_published()), elapsed
    finally:
        pub.disconnect()
        pub.loop_stop()


def _collect(port: int, expected: int, idle_s: float = 2.0, limit_s: float = 30.0) -> int:
    """Reconnect to the session; distinct messages received before ``idle_s`` of silence."""
    got: set[int] = set()
    last = [time.monotonic()]

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.add(int.from_bytes(msg.payload[:8], "big"))
        last[0] = time.monotonic()

    sub = _client(SUB_ID, clean=False)
    sub.on_message = on_message
    _connect(sub, port)
    deadline = time.monotonic() + limit_s
    try:
        while len(got) < expected and time.monotonic() < deadline:
            if time.monotonic() - last[0] > idle_s:
                break
            time.sleep(0.05)
    finally:
        sub.disconnect()
        sub.loop_stop()
    return len(got)


def run_cell(setting: Setting, mode: str, size: int, count: int, seconds: float) -> Cell:
    state = Path(tempfile.mkdtemp(prefix="edgefl-bench-durability-"))
    broker = MosquittoBroker(state_dir=state, extra_config=setting.lines())
    stalled: mqtt.Client | None = None
    try:
        broker.start()
        sub = _client(SUB_ID, clean=False, manual_ack=(mode == "paused"))
        _connect(sub, broker.port)
        _subscribe(sub)
        if mode == "offline":
            sub.disconnect()
            sub.loop_stop()
        else:
            stalled = sub  # connected, never acknowledges
        acked, elapsed = _publish(broker.port, size, count, seconds)
        # a crash right after the last PUBACK
        assert broker.pid is not None
        broker.kill()
        if stalled is not None:
            stalled.loop_stop()
            stalled = None
        saves = broker.log_path.read_text(errors="replace").count("Saving in-memory database")
        broker.start()
        received = _collect(broker.port, acked)
        return Cell(
            setting=setting.label,
            mode=mode,
            size=size,
            target=count,
            acked=acked,
            seconds=round(elapsed, 2),
            rate=round(acked / elapsed, 1) if elapsed > 0 else 0.0,
            saves=saves,
            received_after_kill=received,
            lost=acked - received,
        )
    finally:
        if stalled is not None:
            stalled.loop_stop()
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)


SETTINGS = (
    Setting(False, 60),
    Setting(True, 1),
    Setting(True, 100),
    Setting(True, 1000),
)
# (mode, payload bytes, max messages): the paused backlog of 450 fits in the in-flight window of
# 1000, the one of 2,950 does not. Counts are not multiples of N, so the loss after the last
# save shows (a multiple of N ends right after a save: lucky, not typical).
CELLS = (
    ("offline", 100, 19_950),
    ("offline", 90_000, 950),
    ("paused", 100, 450),
    ("paused", 100, 2_950),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="publishing time per cell")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every cell's count")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    results: list[Cell] = []
    for mode, size, count in CELLS:
        for setting in SETTINGS:
            cell = run_cell(setting, mode, size, max(1, int(count * args.scale)), args.seconds)
            results.append(cell)
            if args.json:
                print(json.dumps(asdict(cell)), flush=True)
    base = {(c.mode, c.size, c.target): c.rate for c in results if c.setting == SETTINGS[0].label}
    print(
        f"\n{'mode':8} {'size':>6} {'max':>5} {'setting':18} {'msg/s':>8} {'vs timer':>8} "
        f"{'saves':>6} {'acked':>6} {'lost':>6}"
    )
    for c in results:
        first = base[(c.mode, c.size, c.target)]
        ratio = c.rate / first if first else 0.0
        print(
            f"{c.mode:8} {c.size:>6} {c.target:>5} {c.setting:18} {c.rate:>8.1f} {ratio:>7.2f}x "
            f"{c.saves:>6} {c.acked:>6} {c.lost:>6}"
        )
    if args.json:
        lost = {f"{c.mode} {c.size} B x{c.target} {c.setting}": c.lost for c in results}
        print(json.dumps({"cells": len(results), "lost": lost}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
