"""``edgefl broker``: one-line errors with documented exit codes, clean stops on signals, and the
embedded broker serving a subscriber that acknowledges late (the aggregator's pattern)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest
from fleet_parts import listening_url

from broker.launcher import ThreadedEmbeddedBroker
from edgefl.cli import main
from edgefl.transport import MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
KINDS = ["mosquitto", "embedded"]


def _need(kind: str) -> None:
    if kind == "mosquitto":
        needs.mosquitto()


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    code = exited.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--kind", "mosquit"], "did you mean 'mosquitto'"),
        (["--kind", "fast"], "auto, mosquitto, embedded"),
        (["--bind", "localhost:1883"], "--bind"),
        (["--port", "abc"], "--port"),
        (["--embedded", "--kind", "mosquitto"], "--embedded"),
    ],
)
def test_bad_option_is_one_line_naming_it_and_exit_2(
    args: list[str], names: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_main(["broker", *args, "--data-dir", str(tmp_path / "state")], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert names in err
    assert "Traceback" not in err
    assert not (tmp_path / "state").exists()  # nothing written before validation


@pytest.mark.parametrize("kind", KINDS)
def test_port_in_use_is_one_line_and_exit_78(
    kind: str, busy_port: int, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _need(kind)
    code, err = run_main(
        ["broker", "--kind", kind, "--port", str(busy_port), "--data-dir", str(tmp_path / "s")],
        capsys,
    )
    assert code == 78
    assert err.splitlines() == [
        f"edgefl: error: --port: {busy_port} is already in use on 127.0.0.1 (another broker?); "
        "choose another port, or --port 0 for a free one"
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_address_not_on_this_host_is_exit_78_naming_bind(
    kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _need(kind)
    code, err = run_main(["broker", "--kind", kind, "--bind", "192.0.2.1", "--port", "0"], capsys)
    assert code == 78
    assert len(err.splitlines()) == 1
    assert "--bind: cannot listen on 192.0.2.1" in err


def test_missing_amqtt_names_the_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "amqtt", None)  # what `import amqtt` sees when it is absent
    code, err = run_main(["broker", "--kind", "embedded", "--port", "0"], capsys)
    assert code == 78
    assert len(err.splitlines()) == 1
    assert "--kind embedded: the embedded broker needs amqtt" in err
    assert "pip install 'edgefl-mqtt[broker]'" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kind", KINDS)
def test_signal_stops_the_broker_cleanly(kind: str, sig: signal.Signals, tmp_path: Path) -> None:
    _need(kind)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefl.cli", "broker", "--kind", kind, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        assert proc.stdout is not None
        url = listening_url(proc.stdout)
        assert url is not None, proc.stderr.read() if proc.stderr else ""
        signalled = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(10)
        elapsed = time.monotonic() - signalled
        err = proc.stderr.read() if proc.stderr else ""
        assert code == 0, err
        assert "Traceback" not in err
        assert elapsed < 5.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
async def test_embedded_broker_serves_a_subscriber_that_acknowledges_late() -> None:
    """A manual-ack subscriber holds its acknowledgements past amqtt's 5 s PUBACK timeout (as
    the aggregator does until its SQLite commit), including that of a retained message (as a
    device holds the retained model until it takes it): every message arrives once, the
    subscriber's own publishes go through while it holds them, the broker logs nothing, and
    delivery goes on afterwards."""
    held_for = 6.0  # amqtt 0.12 gives up on a PUBACK after 5 s
    publishers, per_publisher = 3, 10

    async def scenario(url: str) -> tuple[list[str], str, list[str]]:
        sub_cfg = MqttConfig.from_url(
            url, client_id="late-acker", manual_ack=True, persistent_session=True,
            start_timeout=10.0, protocol_probe_timeout=0.5, max_queued_messages=1000,
        )  # fmt: skip
        pub_cfg = MqttConfig.from_url(url, start_timeout=10.0, protocol_probe_timeout=0.5)
        async with MqttTransport(pub_cfg) as pub:
            await pub.publish("late/model", b"model", retain=True)
        async with MqttTransport(sub_cfg) as sub, MqttTransport(pub_cfg) as watcher:
            await watcher.subscribe("echo/#")
            await sub.subscribe("late/#")

            async def publish(i: int) -> None:
                async with MqttTransport(pub_cfg) as pub:
                    for j in range(per_publisher):
                        await pub.publish(f"late/{i}", f"{i}-{j}".encode())

            held = []
            async with asyncio.TaskGroup() as group:
                for i in range(publishers):
                    group.create_task(publish(i))
                async with asyncio.timeout(30):
                    async for message in sub.messages():
                        held.append(message)
                        if len(held) == publishers * per_publisher + 1:
                            break
            # While holding every acknowledgement, the subscriber's own publish goes through.
            await sub.publish("echo/1", b"echo")
            async with asyncio.timeout(30):
                echo = (await anext(watcher.messages())).payload.decode()
            await asyncio.sleep(held_for)  # the aggregator's commit, made long
            await sub.ack_many(held)
            async with MqttTransport(pub_cfg) as pub:
                await pub.publish("late/after", b"after")
            after = []
            async with asyncio.timeout(30):
                async for message in sub.messages():
                    await sub.ack(message)
                    after.append(message.payload.decode())
                    break
            return [m.payload.decode() for m in held], echo, after

    with ThreadedEmbeddedBroker() as broker:
        held, echo, after = await scenario(broker.url)
        log_counts = dict(broker.embedded.log_counts.counts)
        errors = broker.embedded.loop_errors.counts
        loop_errors = {k: n for k, n in errors.items() if "client_connected" not in k}

    expected = sorted(f"{i}-{j}" for i in range(publishers) for j in range(per_publisher))
    assert sorted(held) == sorted([*expected, "model"])  # each exactly once
    assert echo == "echo"
    assert after == ["after"]
    assert log_counts == {}  # no "Timeout waiting for PUBACK", no "Task failed"
    assert loop_errors == {}
