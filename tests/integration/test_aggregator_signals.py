"""``edgefl aggregator`` stops on SIGTERM/SIGINT in every phase: exit 0, no traceback, fast.

The aggregator runs as a subprocess through the umbrella CLI (``python -m edgefl.cli``), with
``NOTIFY_SOCKET`` pointing at a datagram socket of the test, so the sd_notify messages systemd
would get (READY, STATUS, WATCHDOG, STOPPING) are checked as well. Each test waits for a phase
marker (a log line, or a STATUS message), then signals.

Phases: connecting (a closed port: the transport keeps retrying), running (idle, connected to a
private Mosquitto), committing (devices keep publishing updates, so batches are being committed
and acknowledged when the signal lands).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker.launcher import MosquittoBroker
from edgefl.aggregator.updates import build_update_packets
from edgefl.codec import CodecConfig
from edgefl.transport import MqttConfig, MqttTransport

FLEET = "sig"
MODEL = "digits-mlp"
NUM_PARAMS = 2410
REPO = Path(__file__).resolve().parents[2]
STOP_LIMIT_S = 5.0  # the contract is 2 s; the margin is for a loaded CI machine

pytestmark = pytest.mark.integration


class NotifyListener:
    """A NOTIFY_SOCKET: collects every datagram in a thread (the kernel queue is short)."""

    def __init__(self, directory: str) -> None:
        self.path = str(Path(directory) / "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.1)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.extend(data.decode().split("\n"))
                self._cond.notify_all()

    def wait_for(self, predicate: object, timeout: float = 30.0) -> list[str]:
        assert callable(predicate)
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.messages), timeout):
                raise AssertionError(f"no such notification; got {self.messages[-10:]}")
            return list(self.messages)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify() -> Iterator[NotifyListener]:
    with tempfile.TemporaryDirectory(prefix="efs-") as directory:  # AF_UNIX paths are short
        listener = NotifyListener(directory)
        try:
            yield listener
        finally:
            listener.close()


class Aggregator:
    """The aggregator CLI in a subprocess; a thread collects its output (stdout and stderr
    merged) line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefl.cli", "aggregator", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, marker: str, timeout: float = 60.0) -> None:
        def seen() -> bool:
            return any(marker in line for line in self.lines) or not self._reader.is_alive()

        with self._cond:
            self._cond.wait_for(seen, timeout)
            if any(marker in line for line in self.lines):
                return
        self.proc.kill()
        raise AssertionError(f"no {marker!r} in the output: {self.output()[-3000:]}")

    def signal_and_wait(self, sig: signal.Signals) -> tuple[int, float, str]:
        started = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        elapsed = time.monotonic() - started
        self._reader.join(10)
        print(f"stopped in {elapsed:.2f} s (exit {code})")  # shown with pytest -s
        return code, elapsed, self.output()


def base_args(url: str, state_dir: Path) -> list[str]:
    return [
        "--broker", url, "--fleet", FLEET, "--model", MODEL, "--state-dir", str(state_dir),
        "--buffer-size", "5", "--norm-bound", "off", "--metrics-interval", "0.5",
        "--no-participation",  # the devices here publish raw updates, without leases
    ]  # fmt: skip


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_connecting(
    sig: signal.Signals, tmp_path: Path, notify: NotifyListener
) -> None:
    # Arrange: nothing listens; the aggregator would retry for a minute
    url = f"mqtt://127.0.0.1:{closed_port()}"
    agg = Aggregator(
        [*base_args(url, tmp_path / "state"), "--connect-timeout", "60"],
        {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"},
    )
    agg.wait_for("connecting to")
    notify.wait_for(lambda m: "STATUS=connecting to the broker" in m)

    # Act
    code, elapsed, output = agg.signal_and_wait(sig)

    # Assert
    assert code == 0, output
    assert elapsed < STOP_LIMIT_S
    assert "Traceback" not in output
    assert "error" not in output.lower()
    after = notify.wait_for(lambda m: "STATUS=stopped" in m, timeout=5)
    assert "STOPPING=1" in after
    assert "READY=1" not in after


def test_signal_while_waiting_for_a_silent_broker(tmp_path: Path, notify: NotifyListener) -> None:
    # Arrange: a listener that accepts TCP connections and never answers CONNECT
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"
    agg = Aggregator(
        [*base_args(url, tmp_path / "state"), "--connect-timeout", "60"],
        {"NOTIFY_SOCKET": notify.path},
    )
    try:
        agg.wait_for("connecting to")
        server.settimeout(30)
        accepted, _ = server.accept()  # the aggregator's TCP connection is up, CONNACK pending

        # Act
        code, elapsed, output = agg.signal_and_wait(signal.SIGTERM)
        accepted.close()
    finally:
        server.close()

    # Assert
    assert code == 0, output
    assert elapsed < STOP_LIMIT_S
    assert "Traceback" not in output


def test_signal_while_running(
    mosquitto: MosquittoBroker, tmp_path: Path, notify: NotifyListener
) -> None:
    # Arrange: WatchdogSec=0.4, so pings come every 0.2 s
    agg = Aggregator(
        base_args(mosquitto.url, tmp_path / "state"),
        {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"},
    )
    agg.wait_for("aggregator ready")
    seen = notify.wait_for(lambda m: "READY=1" in m and m.count("WATCHDOG=1") >= 3)

    # Act
    code, elapsed, output = agg.signal_and_wait(signal.SIGTERM)

    # Assert
    assert code == 0, output
    assert elapsed < STOP_LIMIT_S
    assert "Traceback" not in output
    assert any(m.startswith("STATUS=serving fleet sig: version 0") for m in seen)
    after = notify.wait_for(lambda m: "STATUS=stopped" in m, timeout=5)
    assert after.index("STOPPING=1") > after.index("READY=1")


def test_signal_after_the_broker_went_away(
    mosquitto: MosquittoBroker, tmp_path: Path, notify: NotifyListener
) -> None:
    # Arrange: serving, then the broker dies; the graceful shutdown cannot publish "offline"
    agg = Aggregator(
        base_args(mosquitto.url, tmp_path / "state"),
        {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"},
    )
    agg.wait_for("aggregator ready")
    mosquitto.kill()
    notify.wait_for(lambda m: any("disconnected, reconnecting" in x for x in m))

    # Act
    code, elapsed, output = agg.signal_and_wait(signal.SIGTERM)

    # Assert
    assert code == 0, output
    assert elapsed < STOP_LIMIT_S
    assert "Traceback" not in output


def delta(device: int, seq: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * device + seq)
    return (rng.standard_normal(NUM_PARAMS) * 0.01).astype(np.float32)


async def publish_updates(url: str, device: int, stop: threading.Event) -> None:
    name = f"dev-{device:02d}"
    config = MqttConfig.from_url(url, client_id=f"pub-{name}")
    async with MqttTransport(config) as transport:
        seq = 0
        while not stop.is_set():
            seq += 1
            topic, packets = build_update_packets(
                fleet=FLEET, model=MODEL, device=name, seq=seq, base_version=0,
                delta=delta(device, seq), num_examples=10, codec=CodecConfig(),
            )  # fmt: skip
            for packet in packets:
                await transport.publish(topic, packet, qos=1)
            await asyncio.sleep(0.005)


def test_signal_while_committing(
    mosquitto: MosquittoBroker, tmp_path: Path, notify: NotifyListener
) -> None:
    # Arrange: three devices publish updates without pause
    agg = Aggregator(
        base_args(mosquitto.url, tmp_path / "state"),
        {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"},
    )
    agg.wait_for("aggregator ready")
    stop = threading.Event()

    def devices() -> None:
        async def all_devices() -> None:
            await asyncio.gather(*(publish_updates(mosquitto.url, d, stop) for d in range(3)))

        asyncio.run(all_devices())

    publishers = threading.Thread(target=devices, daemon=True)
    publishers.start()
    applied = re.compile(r"applied (\d+)")

    def busy(messages: list[str]) -> bool:
        counts = [int(x.group(1)) for m in messages if (x := applied.search(m))]
        return bool(counts) and counts[-1] >= 30

    try:
        notify.wait_for(busy)

        # Act: updates are arriving and being committed
        code, elapsed, output = agg.signal_and_wait(signal.SIGTERM)
    finally:
        stop.set()
        publishers.join(10)

    # Assert
    assert code == 0, output
    assert elapsed < STOP_LIMIT_S
    assert "Traceback" not in output
