"""The terminal UI driven headless (textual pilot) over the in-memory broker: the fleet table
shows the devices, sorts by a clicked column, filters by text, and lost devices stand out.
(The same UI against a real Mosquitto: tests/integration/test_monitor_broker.py.)"""

from __future__ import annotations

import json
import time

from samples import central_privacy
from textual.coordinate import Coordinate
from textual.widgets import DataTable

from edgefl.monitor.client import FleetMonitor, monitor_mqtt_config
from edgefl.monitor.tui import MonitorApp
from edgefl.protocol.messages import (
    DeviceState,
    Participation,
    ServerState,
    ServerStatus,
    encode_message,
)
from edgefl.protocol.topics import device_state_topic, server_state_topic
from edgefl.transport.memory import MemoryBroker, MemoryTransport

FLEET = "lab"


def publish_fleet(broker: MemoryBroker) -> None:
    envelope = DeviceState(
        FLEET,
        "pi-c",
        "training",  # type: ignore[arg-type]
        1,
        time.time(),
        model_version=4,
        updates_sent=9,
    )
    broker.publish(device_state_topic(FLEET, "pi-c"), encode_message(envelope), qos=1, retain=True)
    states = [  # the plain JSON form
        ("pi-a", {"status": "idle", "session": 2, "reasons": ["on_battery"], "updates_sent": 2}),
        ("pi-b", {"status": "lost", "session": 1, "updates_sent": 5}),
    ]
    for device, fields in states:
        broker.publish(
            device_state_topic(FLEET, device), json.dumps(fields).encode(), qos=1, retain=True
        )
    server = ServerState(FLEET, "online", 1, 4, 2, 5, 18, 0.0, 1.0)  # type: ignore[arg-type]
    broker.publish(server_state_topic(FLEET), encode_message(server), qos=1, retain=True)


def cursor_key(table: DataTable) -> str | None:  # type: ignore[type-arg]
    return table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value


async def test_fleet_table_sort_filter_and_lost_style() -> None:
    broker = MemoryBroker()
    publish_fleet(broker)
    monitor = FleetMonitor(
        monitor_mqtt_config("mqtt://memory.invalid"),
        FLEET,
        transport=MemoryTransport(broker),
    )
    app = MonitorApp(monitor=monitor, refresh_interval=0.1)
    async with app.run_test(size=(150, 40)) as pilot:
        await pilot.pause(0.3)
        rows = app.fleet_rows()
        assert [r[0] for r in rows] == ["pi-a", "pi-b", "pi-c"]
        assert rows[1][:2] == ["pi-b", "lost (will)"]
        assert rows[2][3:5] == ["v4", "0"]  # model held and its staleness vs v4

        # lost devices stand out: the whole row is styled
        cells = app.query_one("#fleet", DataTable).get_row("pi-b")
        assert all("red" in str(cell.style) for cell in cells)

        # keys reach the app's bindings from the start (the table has the focus)
        await pilot.press("r", "r")
        assert not app.sort_reverse
        # clicking the header of the sort column reverses the order
        await pilot.click("#fleet", offset=(2, 0))  # header row, first column: device
        assert (app.sort_column, app.sort_reverse) == ("device", True)
        assert [r[0] for r in app.fleet_rows()] == ["pi-c", "pi-b", "pi-a"]
        await pilot.press("r")
        # "s" cycles the sort column: device -> state -> last seen -> ... -> sent
        await pilot.press(*"s" * 6)
        assert (app.sort_column, app.sort_reverse) == ("sent", False)
        assert [r[0] for r in app.fleet_rows()] == ["pi-a", "pi-b", "pi-c"]  # 2, 5, 9
        await pilot.press("r")
        assert [r[0] for r in app.fleet_rows()] == ["pi-c", "pi-b", "pi-a"]

        # a rebuild keeps the cursor on the same device when rows move
        table = app.query_one("#fleet", DataTable)
        await pilot.press("down")
        under = cursor_key(table)
        before = table.cursor_row
        new = json.dumps({"status": "idle", "session": 1, "updates_sent": 99}).encode()
        broker.publish(device_state_topic(FLEET, "pi-0"), new, qos=1, retain=True)
        await pilot.pause(0.3)
        assert app.fleet_rows()[0][0] == "pi-0"  # sorts first: most updates sent
        assert table.cursor_row == before + 1
        assert table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value == under

        # filter by text: "/" focuses the box, Enter returns to the table
        await pilot.press("slash")
        await pilot.press(*"battery", "enter")
        await pilot.pause(0.05)
        assert [r[0] for r in app.fleet_rows()] == ["pi-a"]
        await pilot.press("r")  # a binding again, not typed into the box
        assert app.filter_text == "battery"

        # the aggregator panel shows the buffer fill
        screen = app.screen_text()
        assert "buffer 2/5" in screen
        assert "fleet lab: 2 idle, 1 lost, 1 training" in screen


async def test_the_aggregator_panel_grows_to_show_central_privacy() -> None:
    # Arrange: a leasing aggregator with central DP (7 aggregator lines without the sparkline)
    broker = MemoryBroker()
    participation = Participation(
        concurrency=20, lease_s=60.0, checkin_ttl_s=120.0, in_flight=3, candidates=1
    )
    privacy = central_privacy(
        epsilon=7.97, noise_multiplier=3.0, participation_cap=22, participation_max=22,
        participation_histogram={3: 4, 9: 3, 22: 3},
    )  # fmt: skip
    server = ServerState(
        FLEET, ServerStatus.ONLINE, 1, 87, 3, 5, 435, 0.0, 1.0,
        features=("leases",), participation=participation, privacy=privacy,
    )  # fmt: skip
    broker.publish(server_state_topic(FLEET), encode_message(server), qos=1, retain=True)
    monitor = FleetMonitor(
        monitor_mqtt_config("mqtt://memory.invalid"), FLEET, transport=MemoryTransport(broker)
    )
    app = MonitorApp(monitor=monitor, refresh_interval=0.1)
    # Act
    async with app.run_test(size=(180, 40)) as pilot:
        await pilot.pause(0.3)
        screen = app.screen_text()
        await pilot.resize_terminal(110, 40)  # a narrow panel wraps the long lines
        await pilot.pause(0.3)
        narrow = app.screen_text()
    # Assert: every line of the panel is on the screen, the last ones included
    assert "accuracy -" in narrow
    assert "leases   3/20 in flight" in screen
    assert "privacy  ε 7.97 at δ 1e-05 (rdp), z 3, C 0.3" in screen
    assert "dp cap   max 22/22 flushes per device (100%), 3 at cap" in screen
    assert "k:dev    10 devices: p50 9, p90 22, mean 10.5" in screen
    assert "         3:4 9:3 22:3" in screen
    assert "accuracy -" in screen
