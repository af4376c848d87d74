"""broker/: the Mosquitto launcher with dev.conf, the embedded amqtt broker, `edgefl broker`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import needs
import pytest
from fleet_parts import listening_url

from broker.launcher import (
    DEV_CONF,
    BrokerStartError,
    EmbeddedBroker,
    MosquittoBroker,
    ThreadedEmbeddedBroker,
    render_config,
)
from edgefl.transport import InboundMessage, MqttConfig, MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

REPO = Path(__file__).resolve().parents[2]


async def roundtrip(url: str) -> tuple[InboundMessage, str | None]:
    """Publish one message through the broker at ``url``; the message and the protocol used."""
    cfg = MqttConfig.from_url(
        url, start_timeout=5.0, reconnect_min_delay=0.05, protocol_probe_timeout=0.5
    )
    async with MqttTransport(cfg) as sub, MqttTransport(cfg) as pub:
        await sub.subscribe("check/#")
        await pub.publish("check/1", b"ok")
        async with asyncio.timeout(5):
            message = await anext(sub.messages())
        return message, sub.statistics().protocol


def test_render_config_fills_every_placeholder() -> None:
    text = render_config(DEV_CONF.read_text(), port=1999, bind="0.0.0.0", data_dir="/x")
    assert "listener 1999 0.0.0.0" in text
    assert "persistence_location /x/" in text
    assert "${" not in text
    assert "$SYS" in text  # comments mentioning $SYS are not placeholders
    with pytest.raises(KeyError, match="data_dir"):
        render_config(DEV_CONF.read_text(), port=1, bind="b")


def test_dev_conf_sizes_queues_and_packets_for_edgefl() -> None:
    settings = dict(
        line.split(None, 1)
        for line in DEV_CONF.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert int(settings["max_queued_messages"]) >= 100_000
    assert int(settings["max_inflight_messages"]) > 20
    assert int(settings["max_packet_size"]) >= 4 * 256 * 1024
    assert settings["sys_interval"] == "2"
    assert settings["persistence"] == "true"
    assert settings["allow_anonymous"] == "true"


async def test_mosquitto_broker_lifecycle(mosquitto: MosquittoBroker) -> None:
    url = mosquitto.url
    assert url == f"mqtt://127.0.0.1:{mosquitto.port}"
    message, protocol = await roundtrip(url)
    assert (message.payload, protocol) == (b"ok", "5")
    assert f"listener {mosquitto.port} 127.0.0.1" in mosquitto.config_path.read_text()

    mosquitto.stop()
    assert not mosquitto.is_running()
    assert (mosquitto.data_dir / "mosquitto.db").exists()  # saved on SIGTERM
    assert mosquitto.start() == url  # same port
    mosquitto.kill()
    assert mosquitto.restart() == url
    assert (await roundtrip(url))[0].payload == b"ok"
    assert "mosquitto version" in mosquitto.log_tail(50)


async def test_mosquitto_publishes_sys_topics(mosquitto: MosquittoBroker) -> None:
    async def main() -> InboundMessage:
        async with MqttTransport(MqttConfig.from_url(mosquitto.url)) as t:
            await t.subscribe("$SYS/broker/version")
            async with asyncio.timeout(5):
                return await anext(t.messages())

    assert (await main()).payload.startswith(b"mosquitto version")


def test_mosquitto_start_failure_reports_the_log(tmp_path: Path) -> None:
    needs.mosquitto()
    bad = tmp_path / "bad.conf"
    bad.write_text("listener ${port} ${bind}\nno_such_option 1\n# ${data_dir}\n")
    broker = MosquittoBroker(state_dir=tmp_path / "state", config_template=bad)
    with pytest.raises(RuntimeError, match="no_such_option"):
        broker.start(timeout=5)
    broker.cleanup()


def test_port_in_use_is_reported_not_mistaken_for_our_broker(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    second = MosquittoBroker(port=mosquitto.port, state_dir=tmp_path / "second")
    with pytest.raises(BrokerStartError, match="already in use"):
        second.start(timeout=5)
    assert not second.is_running()


async def test_embedded_broker_in_the_running_loop() -> None:
    async with EmbeddedBroker() as broker:
        message, protocol = await roundtrip(broker.url)
        assert (message.payload, protocol) == (b"ok", "3.1.1")
    assert not broker.running


async def test_threaded_embedded_broker(embedded_broker: ThreadedEmbeddedBroker) -> None:
    assert (await roundtrip(embedded_broker.url))[0].payload == b"ok"


@pytest.mark.parametrize("embedded", [False, True], ids=["mosquitto", "embedded"])
def test_edgefl_broker_runs_in_foreground_until_sigterm(embedded: bool, tmp_path: Path) -> None:
    if not embedded:
        needs.mosquitto()
    kind = "embedded" if embedded else "mosquitto"
    code = (
        "import sys; from broker.cli import run_broker; "
        f"sys.exit(run_broker(port=0, bind='127.0.0.1', kind={kind!r}, data_dir=None))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path, env=env
    )
    try:
        assert proc.stdout is not None
        url = listening_url(proc.stdout)
        assert url is not None
        message, protocol = asyncio.run(roundtrip(url))  # a process-level test: one client call
        assert (message.payload, protocol) == (b"ok", "3.1.1" if embedded else "5")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
