"""``edgefl monitor``: :func:`monitor_command`, mounted by ``edgefl/cli.py``.

Interactive by default (the textual UI, :mod:`edgefl.monitor.tui`, imported only then);
``--once`` prints one snapshot, ``--json`` switches to JSON (one object, or JSON lines when
streaming), ``--clear-retained TARGET`` deletes retained topics (``--dry-run`` lists them).
Torch is never imported. User documentation: ``docs/MONITOR.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefl.transport.config import MqttProtocol

from .model import FleetModelConfig
from .modes import (
    MonitorOptions,
    clear_retained,
    dump_json,
    snapshot_once,
    stream_json,
    topics_filter,
)

__all__ = ["monitor_command"]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"edgefl monitor: {message}", err=True)
    return typer.Exit(2)


def monitor_command(
    fleet: Annotated[str, typer.Option(help="Fleet name (the <fleet> level of the topics).")],
    broker: Annotated[
        str, typer.Option(help="Broker URL: mqtt://[user[:pass]@]host[:port] or mqtts://...")
    ] = "mqtt://127.0.0.1:1883",
    once: Annotated[
        bool, typer.Option("--once", help="Print one snapshot after the retained messages.")
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="JSON: with --once one object; otherwise JSON lines (per message, or per"
            " --interval).",
        ),
    ] = False,
    interval: Annotated[
        float,
        typer.Option(help="Streaming --json: one snapshot every N s instead of one per message."),
    ] = 0.0,
    count: Annotated[
        int | None, typer.Option(help="Streaming --json: stop after N lines.", min=1)
    ] = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic", help="Topic-log filter (MQTT wildcards; repeatable). The model sees all."
        ),
    ] = None,
    sys_topics: Annotated[
        bool, typer.Option("--sys/--no-sys", help="Subscribe to $SYS/# for broker statistics.")
    ] = True,
    updates: Annotated[
        bool,
        typer.Option(
            "--updates/--no-updates",
            help="Receive update and model-chunk packets (all fleet traffic); --no-updates"
            " keeps to device states, the manifest and the server topics.",
        ),
    ] = True,
    stale_after: Annotated[
        float,
        typer.Option(
            help="Show a connected device as lost after N s without a sign of life (0: never)."
            " Agents republish their state every heartbeat_s (300 s by default), so the"
            " default of 900 s flags a device that missed three heartbeats."
        ),
    ] = 900.0,
    wait: Annotated[
        float, typer.Option(help="Longest wait for the retained messages (--once, clearing).")
    ] = 5.0,
    connect_timeout: Annotated[
        float,
        typer.Option(help="Non-interactive modes: give up when not connected within N s."),
    ] = 10.0,
    clear_retained_target: Annotated[
        str | None,
        typer.Option(
            "--clear-retained",
            metavar="TARGET",
            help="Delete retained messages: 'lost' (state of lost devices) or a topic filter"
            " under edgefl/v1/<fleet>/. Destructive: try --dry-run first.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --clear-retained: only list the topics.")
    ] = False,
    username: Annotated[str | None, typer.Option(help="MQTT username.")] = None,
    password: Annotated[
        str | None, typer.Option(help="MQTT password.", envvar="EDGEFL_MQTT_PASSWORD")
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(help="Read the MQTT password from this file (e.g. monitor/mqtt-password)."),
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(help="CA bundle for mqtts:// (default: system trust store).")
    ] = None,
    cert_file: Annotated[Path | None, typer.Option(help="Client certificate (mqtts://).")] = None,
    key_file: Annotated[Path | None, typer.Option(help="Client key (mqtts://).")] = None,
    client_id: Annotated[
        str | None, typer.Option(help="MQTT client id (default: edgefl-monitor-<random>).")
    ] = None,
    protocol: Annotated[
        MqttProtocol, typer.Option(help="MQTT version: auto, 5 or 3.1.1.")
    ] = MqttProtocol.AUTO,
) -> None:
    """Watch a fleet live through the broker: devices, model, aggregator, topic log.

    Read-only unless --clear-retained is given.
    """
    if password_file is not None:
        if password is not None:
            raise _fail("give --password or --password-file, not both")
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _fail(f"cannot read --password-file: {exc}") from None
    overrides: dict[str, Any] = {"protocol": protocol, "start_timeout": connect_timeout}
    for key, value in (
        ("username", username),
        ("password", password),
        ("ca_file", ca_file),
        ("cert_file", cert_file),
        ("key_file", key_file),
        ("client_id", client_id),
    ):
        if value is not None:
            overrides[key] = value
    try:
        from .client import monitor_mqtt_config

        config = monitor_mqtt_config(broker, **overrides)
        options = MonitorOptions(
            config=config,
            fleet=fleet,
            include_sys=sys_topics,
            include_updates=updates,
            model=FleetModelConfig(stale_after=stale_after if stale_after > 0 else None),
            topic_filters=topics_filter(topic or []),
            settle_timeout=wait,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if dry_run and clear_retained_target is None:
        raise _fail("--dry-run needs --clear-retained")
    try:
        if clear_retained_target is not None:
            _run_clear(options, clear_retained_target, dry_run=dry_run, json_output=json_output)
        elif once:
            snapshot = asyncio.run(snapshot_once(options))
            if json_output:
                typer.echo(dump_json(snapshot.to_json()))
            else:
                from .render import snapshot_text

                typer.echo(snapshot_text(snapshot), nl=False)
        elif json_output:
            asyncio.run(_stream(options, interval=interval, count=count))
        else:
            try:
                from .tui import MonitorApp
            except ImportError as exc:  # textual is the `monitor` extra
                raise _fail(
                    f"the terminal UI needs textual ({exc}): pip install 'edgefl[monitor]';"
                    " --once and --json work without it"
                ) from None
            # interactive: the screen comes up at once and the transport keeps reconnecting
            interactive = replace(options, config=options.config.replace(start_timeout=None))
            MonitorApp(interactive).run()
    except Exception as exc:  # connection refused, bad credentials, TLS, ...
        from edgefl.transport.base import TransportError

        if isinstance(exc, TransportError | OSError | ValueError):
            raise _fail(str(exc)) from None
        raise


def _run_clear(options: MonitorOptions, target: str, *, dry_run: bool, json_output: bool) -> None:
    topics, _ = asyncio.run(clear_retained(options, target, dry_run=dry_run))
    if json_output:
        typer.echo(dump_json({"dry_run": dry_run, "target": target, "topics": topics}))
        return
    verb = "would clear" if dry_run else "cleared"
    typer.echo(f"{verb} {len(topics)} retained topic(s) for {target!r}")
    for name in topics:
        typer.echo(f"  {name}")


async def _stream(options: MonitorOptions, *, interval: float, count: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(BrokenPipeError):  # e.g. `| head`
        await stream_json(options, sys.stdout, interval=interval, count=count, stop=stop)
