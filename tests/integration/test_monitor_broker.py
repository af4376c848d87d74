"""``edgefl monitor`` against a real Mosquitto: states published with ``mosquitto_pub`` (plain
JSON and a binary envelope) show up in ``--once --json``; a device whose connection dies turns
``lost`` while a late Will of an older session is ignored; ``--json`` streams lines;
``--clear-retained`` with and without ``--dry-run``; the terminal UI shows the fleet table."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import needs
import pytest
from waiting import eventually

from broker.launcher import MosquittoBroker, free_port
from edgefl.monitor.client import FleetMonitor, monitor_mqtt_config
from edgefl.monitor.modes import MonitorOptions
from edgefl.monitor.tui import MonitorApp
from edgefl.protocol.messages import DeviceState, encode_message
from edgefl.protocol.topics import device_state_topic
from edgefl.transport import MqttConfig, MqttTransport, Will

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

FLEET = "lab"


def mosquitto_pub(broker: MosquittoBroker, topic: str, *args: str) -> None:
    binary = needs.tool("mosquitto_pub")
    cmd = [binary, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-r", "-t", topic]
    subprocess.run([*cmd, *args], check=True, timeout=10)


def monitor_cli(broker: MosquittoBroker, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgefl.monitor", "--broker", broker.url, "--fleet", FLEET]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30, check=True)


def once_json(broker: MosquittoBroker, *args: str) -> dict[str, Any]:
    result = monitor_cli(broker, "--once", "--json", "--wait", "3", *args)
    snapshot: dict[str, Any] = json.loads(result.stdout)
    return snapshot


def devices(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in snapshot["devices"]}


def test_states_published_with_mosquitto_pub_show_up_in_once_json(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    now = time.time()
    # the documented plain JSON form (docs/MONITOR.md), copy-paste style
    mosquitto_pub(
        mosquitto,
        device_state_topic(FLEET, "sensor-1"),
        "-m",
        '{"status": "idle", "session": 1, "model_version": 3, "reasons": ["on_battery"],'
        ' "updates_sent": 7, "local_accuracy": 0.82, "profile": "sensor"}',
    )
    # an old JSON state: the device stopped talking long ago
    mosquitto_pub(
        mosquitto,
        device_state_topic(FLEET, "sensor-2"),
        "-m",
        json.dumps({"status": "training", "session": 4, "at": now - 3600}),
    )
    # the binary envelope, written to a file and published with -f
    state = DeviceState(FLEET, "pi-1", "training", 9, now, model_version=2)  # type: ignore[arg-type]
    envelope = tmp_path / "state.bin"
    envelope.write_bytes(encode_message(state))
    mosquitto_pub(mosquitto, device_state_topic(FLEET, "pi-1"), "-f", str(envelope))

    snapshot = once_json(mosquitto, "--stale-after", "600")

    found = devices(snapshot)
    assert sorted(found) == ["pi-1", "sensor-1", "sensor-2"]
    s1 = found["sensor-1"]
    assert (s1["status"], s1["session"], s1["encoding"]) == ("idle", 1, "json")
    assert (s1["model_version"], s1["reasons"], s1["updates_sent"]) == (3, ["on_battery"], 7)
    assert (s1["local_accuracy"], s1["profile"]) == (0.82, "sensor")
    s2 = found["sensor-2"]
    assert (s2["status"], s2["reported_status"], s2["lost_reason"]) == ("lost", "training", "stale")
    p1 = found["pi-1"]
    assert (p1["status"], p1["session"], p1["encoding"]) == ("training", 9, "envelope")
    assert snapshot["counts"] == {"idle": 1, "lost": 1, "training": 1}
    connection = snapshot["connection"]
    assert connection["connected"] is True
    assert connection["protocol"] == "5"
    assert connection["client_id"].startswith("edgefl-monitor-")
    assert connection["broker_stats"]["version"].startswith("mosquitto")
    assert snapshot["monitor"]["rejected"] == {}


async def test_device_killed_without_disconnect_turns_lost_and_a_late_will_is_ignored(
    mosquitto: MosquittoBroker,
) -> None:
    topic = device_state_topic(FLEET, "pi-7")

    def device(session: int) -> MqttTransport:
        lost = DeviceState(FLEET, "pi-7", "lost", session, time.time())  # type: ignore[arg-type]
        will = Will(topic, encode_message(lost), qos=1, retain=True)
        config = MqttConfig.from_url(mosquitto.url, client_id=f"pi-7-s{session}", will=will)
        return MqttTransport(config)

    async def online(transport: MqttTransport, session: int) -> None:
        state = DeviceState(FLEET, "pi-7", "online", session, time.time())  # type: ignore[arg-type]
        await transport.publish(topic, encode_message(state), qos=1, retain=True)

    async with FleetMonitor(monitor_mqtt_config(mosquitto.url), FLEET) as monitor:

        def status() -> tuple[str, int] | None:
            d = monitor.snapshot().device("pi-7")
            return None if d is None else (d.status, d.session)

        old, new = device(1), device(2)
        async with old, new:
            await online(old, 1)
            await online(new, 2)
            await eventually(lambda: status() == ("online", 2))
            # the old connection dies: its Will (session 1) arrives late and is ignored
            await old.close(abrupt=True)
            await eventually(lambda: monitor.model.snapshot(0).monitor.superseded_states > 0)
            assert status() == ("online", 2)
            # the current connection dies without DISCONNECT: the device is lost
            await new.close(abrupt=True)
            await eventually(lambda: status() == ("lost", 2))
            view = monitor.snapshot().device("pi-7")
            assert view is not None
            assert view.lost_reason == "will"
    # a monitor started afterwards sees the retained Will
    assert devices(once_json(mosquitto))["pi-7"]["status"] == "lost"


def test_json_stream_with_topic_filter_and_count(mosquitto: MosquittoBroker) -> None:
    for i in range(2):
        mosquitto_pub(
            mosquitto,
            device_state_topic(FLEET, f"d{i}"),
            "-m",
            '{"status": "online", "session": 1}',
        )
    result = monitor_cli(
        mosquitto, "--json", "--count", "2", "--topic", f"edgefl/v1/{FLEET}/device/+/state"
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(x["type"], x["topic"], x["retain"], x["qos"]) for x in lines] == [
        ("message", device_state_topic(FLEET, f"d{i}"), True, 1) for i in range(2)
    ]
    assert lines[0]["summary"] == "device_state (json) d0 online session=1 sent=0"


def test_clear_retained_lost_devices_with_dry_run_first(mosquitto: MosquittoBroker) -> None:
    mosquitto_pub(
        mosquitto, device_state_topic(FLEET, "gone"), "-m", '{"status": "lost", "session": 3}'
    )
    mosquitto_pub(
        mosquitto, device_state_topic(FLEET, "here"), "-m", '{"status": "idle", "session": 1}'
    )
    lost_topic = device_state_topic(FLEET, "gone")

    dry = json.loads(
        monitor_cli(mosquitto, "--clear-retained", "lost", "--dry-run", "--json").stdout
    )
    assert dry == {"dry_run": True, "target": "lost", "topics": [lost_topic]}
    assert sorted(devices(once_json(mosquitto))) == ["gone", "here"]  # nothing deleted

    done = monitor_cli(mosquitto, "--clear-retained", "lost")
    assert lost_topic in done.stdout
    assert sorted(devices(once_json(mosquitto))) == ["here"]


def test_clear_retained_refuses_filters_outside_the_fleet(mosquitto: MosquittoBroker) -> None:
    cmd = [sys.executable, "-m", "edgefl.cli", "monitor", "--broker", mosquitto.url]
    result = subprocess.run(
        [*cmd, "--fleet", FLEET, "--clear-retained", "#"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2  # usage
    assert "Traceback" not in result.stderr
    assert "must start with 'edgefl/v1/lab/'" in result.stderr


async def test_terminal_ui_shows_the_fleet_table(mosquitto: MosquittoBroker) -> None:
    mosquitto_pub(
        mosquitto, device_state_topic(FLEET, "pi-1"), "-m", '{"status": "training", "session": 2}'
    )
    mosquitto_pub(
        mosquitto, device_state_topic(FLEET, "pi-2"), "-m", '{"status": "lost", "session": 1}'
    )

    async def scenario() -> str:
        app = MonitorApp(MonitorOptions(monitor_mqtt_config(mosquitto.url), FLEET))
        async with app.run_test(size=(140, 36)) as pilot:
            for _ in range(100):  # the model first, then the table's next render
                await pilot.pause(0.1)
                if len(app.fleet_rows()) == 2 and "lost (will)" in app.screen_text():
                    break
            rows = app.fleet_rows()
            assert [r[:2] for r in rows] == [["pi-1", "training"], ["pi-2", "lost (will)"]]
            return app.screen_text()

    screen = await scenario()
    assert "pi-1" in screen
    assert "lost (will)" in screen
    assert "MQTT 5, connected" in screen
    assert f"edgefl/v1/{FLEET}/device/pi-2/state" in screen  # the topic log


async def test_unreachable_broker_fails_cleanly_or_shows_disconnected() -> None:
    url = f"mqtt://127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
    cmd = [sys.executable, "-m", "edgefl.cli", "monitor", "--broker", url, "--fleet", FLEET]
    once = await asyncio.to_thread(
        subprocess.run,
        [*cmd, "--once", "--connect-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert once.returncode == 69  # EX_UNAVAILABLE: the broker could not be reached
    assert "Traceback" not in once.stderr
    assert "Connection refused" in once.stderr

    async def scenario() -> tuple[str, str | None]:  # the UI comes up and shows why
        config = monitor_mqtt_config(url, start_timeout=None, reconnect_max_delay=0.5)
        app = MonitorApp(MonitorOptions(config, FLEET))
        async with app.run_test(size=(140, 30)) as pilot:
            await pilot.pause(1.0)
            snapshot = app.last_snapshot
            assert snapshot is not None
            assert snapshot.connection is not None
            return app.screen_text(), snapshot.connection.last_error

    screen, error = await scenario()
    assert "DISCONNECTED" in screen
    assert "error    cannot connect" in screen
    assert error is not None
    assert "Connection refused" in error
