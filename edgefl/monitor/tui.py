"""The ``edgefl monitor`` terminal UI (textual).

Panels: connection (broker, MQTT version, client id, ``$SYS`` clients / messages / bytes per
second / dropped publishes), model (version, size, chunks, age), aggregator (buffer fill k/K,
applied, rejected by reason, update rate, staleness histogram, accuracy sparkline over versions),
the fleet table (sortable by clicking a column header or with ``s``/``r``, filtered by the text
box, lost devices in red), and the live topic log (time, topic, QoS, retain, size, one-line
summary; ``p`` pauses it). The screen redraws from the fold every ``refresh_interval`` seconds,
not per message, so a busy fleet does not flood the terminal. Read-only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Final

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Header, Input, Sparkline, Static

from .client import FleetMonitor
from .modes import MonitorOptions
from .render import (
    FLEET_COLUMNS,
    STATUS_STYLES,
    aggregator_lines,
    connection_lines,
    device_cells,
    model_lines,
)
from .snapshot import DeviceView, FleetSnapshot
from .summary import TopicLogEntry, human_bytes

__all__ = ["LOG_COLUMNS", "MonitorApp", "sort_devices"]

LOG_COLUMNS: Final = ("time", "topic", "qos", "retain", "size", "summary")
_LOG_ROWS: Final = 200
PANELS_HEIGHT: Final = 9
"""Rows of the top panels at least (borders included); they grow to fit the aggregator's lines."""

_SORT_KEYS: Final[dict[str, Callable[[DeviceView], Any]]] = {
    "device": lambda d: d.device_id,
    "state": lambda d: (d.status, d.device_id),
    "last seen": lambda d: d.last_seen_age_s,
    "model": lambda d: -1 if d.model_version is None else d.model_version,
    "staleness": lambda d: -1 if d.model_staleness is None else d.model_staleness,
    "why": lambda d: ",".join(d.reasons),
    "sent": lambda d: d.updates_sent,
    "accuracy": lambda d: -1.0 if d.local_accuracy is None else d.local_accuracy,
}


def sort_devices(
    devices: tuple[DeviceView, ...], column: str, *, reverse: bool = False, text: str = ""
) -> list[DeviceView]:
    """Rows of the fleet table: devices whose cells contain ``text`` (case-insensitive), sorted
    by ``column`` (one of :data:`~edgefl.monitor.render.FLEET_COLUMNS`)."""
    needle = text.strip().lower()
    rows = [
        d for d in devices if not needle or needle in " ".join(device_cells(d).values()).lower()
    ]
    return sorted(rows, key=_SORT_KEYS[column], reverse=reverse)


class MonitorApp(App[None]):
    """The monitor UI over a :class:`FleetMonitor` (built from ``options`` unless given)."""

    TITLE = "edgefl monitor"
    CSS = (
        f"#panels {{ height: {PANELS_HEIGHT}; }}"
        + """
    .panel { border: round $primary; padding: 0 1; height: 100%; }
    #connection { width: 5fr; }
    #model { width: 4fr; }
    #aggregator { width: 6fr; }
    #accuracy { height: 1; }
    #filter { height: 3; }
    #fleet { height: 1fr; min-height: 6; }
    #log { height: 11; border-top: solid $primary; }
    """
    )
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("slash", "focus_filter", "Filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse"),
        Binding("p", "toggle_log", "Pause log"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(
        self,
        options: MonitorOptions | None = None,
        *,
        monitor: FleetMonitor | None = None,
        refresh_interval: float = 0.5,
    ) -> None:
        super().__init__()
        if monitor is None:
            if options is None:
                raise ValueError("MonitorApp needs options or a monitor")
            monitor = options.monitor()
        self.monitor = monitor
        self.refresh_interval = refresh_interval
        self.sort_column = "device"
        self.sort_reverse = False
        self.filter_text = ""
        self.log_paused = False
        self.error: str | None = None
        self.last_snapshot: FleetSnapshot | None = None
        self._started = False
        self._log_seen = 0
        self._fleet_cells: list[tuple[str, str, tuple[str, ...]]] = []

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="panels"):
            yield Static(id="connection", classes="panel")
            yield Static(id="model", classes="panel")
            with Vertical(id="aggregator", classes="panel"):
                yield Static(id="aggregator-text")
                yield Sparkline([], id="accuracy")
        yield Input(placeholder="filter devices (any text: id, state, reason...)", id="filter")
        yield DataTable(id="fleet", zebra_stripes=True, cursor_type="row")
        yield DataTable(id="log", cursor_type="none", show_cursor=False)
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = f"fleet {self.monitor.fleet}"
        self.query_one("#connection", Static).border_title = "connection"
        self.query_one("#model", Static).border_title = "model"
        self.query_one("#aggregator", Vertical).border_title = "aggregator"
        fleet = self.query_one("#fleet", DataTable)
        for column in FLEET_COLUMNS:
            fleet.add_column(column, key=column)
        log = self.query_one("#log", DataTable)
        for column in LOG_COLUMNS:
            log.add_column(column, key=column)
        fleet.focus()  # keys go to the app's bindings until "/" focuses the filter box
        self.refresh_views()
        self.set_interval(self.refresh_interval, self.refresh_views)
        self.run_worker(self._connect(), name="connect", exclusive=True)

    async def _connect(self) -> None:
        """Connect in the background: the screen is up (showing "DISCONNECTED" and the last
        error) while the transport keeps trying."""
        self._started = True
        try:
            await self.monitor.start()
        except Exception as exc:  # shown in the connection panel; the app stays up
            self.error = f"cannot connect: {exc}"

    async def on_unmount(self) -> None:
        if self._started:
            await self.monitor.close()

    # ------------------------------------------------------------------ refresh

    def refresh_views(self) -> None:
        try:
            connection_panel = self.query_one("#connection", Static)
        except NoMatches:  # a timer tick while the app exits: its widgets are already gone
            return
        snapshot = self.monitor.snapshot()
        self.last_snapshot = snapshot
        connection = connection_lines(snapshot.connection)
        if self.error is not None:
            connection.insert(0, self.error)
        connection_panel.update(Text("\n".join(connection)))
        self.query_one("#model", Static).update(Text("\n".join(model_lines(snapshot.model))))
        agg = snapshot.aggregator
        lines = aggregator_lines(agg, with_sparkline=False)
        self.query_one("#aggregator-text", Static).update(Text("\n".join(lines)))
        self._fit_panels(len(connection), lines)
        self.query_one("#accuracy", Sparkline).data = [a for _, a in agg.accuracy_history]
        self._refresh_fleet(snapshot)
        if not self.log_paused:
            self._refresh_log()
        counts = ", ".join(f"{v} {k}" for k, v in snapshot.counts.items()) or "no devices"
        self.sub_title = f"fleet {snapshot.fleet}: {counts}"

    def _fit_panels(self, connection_rows: int, aggregator: list[str]) -> None:
        """Grow the top panels to the aggregator's text as wrapped at its width (leases and
        central DP add lines), plus the borders and the sparkline; at least PANELS_HEIGHT."""
        width = self.query_one("#aggregator-text", Static).size.width
        text = Text("\n".join(aggregator))
        rows = len(text.wrap(self.console, width)) if width > 0 else len(aggregator)
        height = max(PANELS_HEIGHT, connection_rows + 2, rows + 3)
        self.query_one("#panels", Horizontal).styles.height = height

    def _refresh_fleet(self, snapshot: FleetSnapshot) -> None:
        table = self.query_one("#fleet", DataTable)
        rows = sort_devices(
            snapshot.devices, self.sort_column, reverse=self.sort_reverse, text=self.filter_text
        )
        cells = [(d.device_id, d.status, tuple(device_cells(d).values())) for d in rows]
        if cells != self._fleet_cells:  # rebuild only when something visible changed
            self._fleet_cells = cells
            # keep the cursor on the same device and the scroll position across the rebuild
            selected = None
            if table.row_count and 0 <= table.cursor_row < table.row_count:
                key = table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key
                selected = key.value
            scroll_y = table.scroll_y
            table.clear()
            for device_id, status, values in cells:
                style = STATUS_STYLES.get(status, "")
                row = [
                    Text(value, style=style if column == "state" or status == "lost" else "")
                    for column, value in zip(FLEET_COLUMNS, values, strict=True)
                ]
                table.add_row(*row, key=device_id)
            ids = [device_id for device_id, _, _ in cells]
            if selected in ids:
                table.move_cursor(row=ids.index(selected), animate=False, scroll=False)
            table.scroll_to(y=scroll_y, animate=False)
        arrow = "▼" if self.sort_reverse else "▲"
        table.border_title = f"fleet ({len(rows)}/{len(snapshot.devices)}) sorted by "
        table.border_title += f"{self.sort_column} {arrow}"

    def _refresh_log(self) -> None:
        table = self.query_one("#log", DataTable)
        new = min(self.monitor.logged - self._log_seen, len(self.monitor.log))
        self._log_seen = self.monitor.logged
        if new <= 0:
            return
        entries = list(self.monitor.log)[-new:]
        for entry in entries[-_LOG_ROWS:]:
            table.add_row(*_log_cells(entry))
        while table.row_count > _LOG_ROWS:
            table.remove_row(next(iter(table.rows)))
        table.move_cursor(row=table.row_count - 1, animate=False)
        table.scroll_end(animate=False)

    # ------------------------------------------------------------------ interaction

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.refresh_views()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#fleet", DataTable).focus()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        if event.data_table.id != "fleet":
            return
        column = str(event.column_key.value)
        if column == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = column, False
        self.refresh_views()

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#filter", Input).value = ""
        self.query_one("#fleet", DataTable).focus()

    def action_cycle_sort(self) -> None:
        index = FLEET_COLUMNS.index(self.sort_column)
        self.sort_column = FLEET_COLUMNS[(index + 1) % len(FLEET_COLUMNS)]
        self.refresh_views()

    def action_reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self.refresh_views()

    def action_toggle_log(self) -> None:
        self.log_paused = not self.log_paused
        self.query_one("#log", DataTable).border_title = "paused" if self.log_paused else None

    # ------------------------------------------------------------------ capture

    def fleet_rows(self) -> list[list[str]]:
        """The fleet table's visible cells, row by row (what a user sees)."""
        table = self.query_one("#fleet", DataTable)
        return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]

    def screen_text(self) -> str:
        """The current screen as plain text (for documentation and tests)."""
        import io

        from rich.console import Console

        width, height = self.size
        console = Console(
            width=width, height=height, file=io.StringIO(), record=True, color_system=None
        )
        # textual has no public "render the whole screen as text"; a test-only helper
        console.print(self.screen._compositor.render_update(full=True))  # noqa: SLF001
        return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def _log_cells(entry: TopicLogEntry) -> tuple[str, ...]:
    return (
        time.strftime("%H:%M:%S", time.localtime(entry.at)),
        entry.topic,
        str(entry.qos),
        "R" if entry.retain else "",
        human_bytes(entry.size),
        entry.summary,
    )
