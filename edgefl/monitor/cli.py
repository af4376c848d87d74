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

from edgefl.clierror import BrokerUnavailable, ConfigError, UsageError, run_cli
from edgefl.transport import config as transport_config
from edgefl.transport.base import NotConnectedError, TransportError
from edgefl.transport.config import MqttProtocol

from .model import FleetModelConfig
from .modes import (
    MonitorOptions,
    clear_retained,
    dump_json,
    snapshot_once,
    stream_json,
    topics_filter,
    until_signal,
)

__all__ = ["monitor_command"]


def monitor_command(
    fleet: Annotated[str, typer.Option(help="Fleet name (the <fleet> level of the topics).")],
    broker: Annotated[
        str,
        typer.Option(
            help="Broker URL: mqtt://[user[:pass]@]host[:port], mqtts://, ws://, wss://; or a"
            " comma list of a cluster's nodes (tried in turn)"
        ),
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

    Read-only unless --clear-retained is given. When stdout is not a terminal and neither
    --once nor --json is given, it streams JSON lines (as --json does) and says so on stderr.
    """
    options = _validated_options(
        fleet=fleet,
        broker=broker,
        interval=interval,
        topic=topic or [],
        sys_topics=sys_topics,
        updates=updates,
        stale_after=stale_after,
        wait=wait,
        connect_timeout=connect_timeout,
        clear_retained_target=clear_retained_target,
        dry_run=dry_run,
        username=username,
        password=password,
        password_file=password_file,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        client_id=client_id,
        protocol=protocol,
    )
    interactive = not (once or json_output or clear_retained_target is not None)
    if interactive and not sys.stdout.isatty():
        typer.echo(
            "edgefl monitor: stdout is not a terminal: streaming JSON lines (as with --json;"
            " --once prints one snapshot)",
            err=True,
        )
        interactive, json_output = False, True
    try:
        if clear_retained_target is not None:
            _run_clear(options, clear_retained_target, dry_run=dry_run, json_output=json_output)
        elif once:
            _run_once(options, json_output=json_output)
        elif not interactive:
            asyncio.run(_stream(options, interval=interval, count=count))
        else:
            _run_interactive(options)
    except NotConnectedError as exc:
        raise BrokerUnavailable(f"--broker {broker}: {exc}") from None
    except TransportError as exc:  # refused subscription, closed, ...
        raise BrokerUnavailable(f"--broker {broker}: {exc}") from None


def _run_once(options: MonitorOptions, *, json_output: bool) -> None:
    """``--once``: one snapshot after the retained messages, as JSON or text."""
    snapshot = asyncio.run(until_signal(snapshot_once(options)))
    if snapshot is None:
        return  # stopped by SIGTERM/SIGINT before the snapshot was ready
    if json_output:
        typer.echo(dump_json(snapshot.to_json()))
    else:
        from .render import snapshot_text

        typer.echo(snapshot_text(snapshot), nl=False)


def _validated_options(
    *,
    fleet: str,
    broker: str,
    interval: float,
    topic: list[str],
    sys_topics: bool,
    updates: bool,
    stale_after: float,
    wait: float,
    connect_timeout: float,
    clear_retained_target: str | None,
    dry_run: bool,
    username: str | None,
    password: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    client_id: str | None,
    protocol: MqttProtocol,
) -> MonitorOptions:
    """Every check that needs no broker, each naming its option; raises UsageError (a bad
    option) or ConfigError (a file an option names cannot be used)."""
    parsed_url = _check_fleet_and_broker(fleet, broker)
    _check_durations(interval=interval, stale_after=stale_after, wait=wait)
    if not connect_timeout > 0:
        raise UsageError(f"--connect-timeout must be > 0, got {connect_timeout:g}")
    _check_clear_target(clear_retained_target, fleet, dry_run=dry_run)
    try:
        topic_filters = topics_filter(topic)
    except ValueError as exc:
        raise UsageError(f"--topic: {exc}") from None
    password = _resolved_password(password, password_file, username=username, broker=broker)
    _check_tls_options(parsed_url, broker, ca_file, cert_file, key_file)
    config = _mqtt_config(
        broker,
        protocol=protocol,
        start_timeout=connect_timeout,
        username=username,
        password=password,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        client_id=client_id,
    )
    return MonitorOptions(
        config=config,
        fleet=fleet,
        include_sys=sys_topics,
        include_updates=updates,
        model=FleetModelConfig(stale_after=stale_after if stale_after > 0 else None),
        topic_filters=topic_filters,
        settle_timeout=wait,
        notice=_notice,
    )


def _check_fleet_and_broker(fleet: str, broker: str) -> transport_config.BrokerUrl:
    """``--fleet`` is a valid name and ``--broker`` a broker URL (returned parsed)."""
    from edgefl.errors import ProtocolError
    from edgefl.protocol.topics import validate_name

    try:
        validate_name(fleet, "fleet name")
    except ProtocolError:
        raise UsageError(
            f"--fleet {fleet!r}: expected 1-64 characters [A-Za-z0-9_.-] starting with a letter"
            " or digit"
        ) from None
    try:
        return transport_config.parse_broker_urls(broker)[0]
    except ValueError as exc:
        raise UsageError(f"--broker {broker!r}: {exc}") from None


def _check_durations(*, interval: float, stale_after: float, wait: float) -> None:
    for name, value, low in (
        ("--interval", interval, "0 (0: one line per message)"),
        ("--stale-after", stale_after, "0 (0: never)"),
        ("--wait", wait, "0"),
    ):
        if not value >= 0:
            raise UsageError(f"{name} must be >= {low}, got {value:g}")


def _check_clear_target(target: str | None, fleet: str, *, dry_run: bool) -> None:
    """``--clear-retained`` is 'lost' or a topic filter of the fleet; ``--dry-run`` needs it."""
    if target is None:
        if dry_run:
            raise UsageError("--dry-run needs --clear-retained TARGET ('lost' or a topic filter)")
        return
    from .clear import check_target

    try:
        check_target(target, fleet)
    except ValueError as exc:
        message = str(exc).removeprefix("--clear-retained ")
        raise UsageError(f"--clear-retained {target!r}: {message} (or 'lost')") from None


def _resolved_password(
    password: str | None, password_file: Path | None, *, username: str | None, broker: str
) -> str | None:
    """The password from ``--password`` or ``--password-file`` (not both); it needs a user
    name (``--username`` or one in the URL)."""
    if password_file is not None:
        if password is not None:
            raise UsageError("give --password or --password-file, not both")
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"--password-file {str(password_file)!r}: {detail}") from None
    if password is not None and username is None and "@" not in broker:
        raise UsageError("--password (or --password-file) needs --username")
    return password


def _check_tls_options(
    parsed_url: transport_config.BrokerUrl,
    broker: str,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> None:
    """TLS files only with a TLS URL, certificate and key together, each file usable."""
    tls_files = (("--ca-file", ca_file), ("--cert-file", cert_file), ("--key-file", key_file))
    for name, path in tls_files:
        if path is not None and not parsed_url.tls:
            raise UsageError(f"{name} needs an mqtts:// or wss:// --broker, got {broker!r}")
    if (cert_file is None) != (key_file is None):
        raise UsageError("--cert-file and --key-file go together")
    _check_tls_files(ca_file, cert_file, key_file)


def _mqtt_config(
    broker: str, *, protocol: MqttProtocol, start_timeout: float, **given: object
) -> transport_config.MqttConfig:
    """The monitor's MQTT config; ``given`` settings that are None keep their default."""
    from .client import monitor_mqtt_config

    overrides: dict[str, Any] = {"protocol": protocol, "start_timeout": start_timeout}
    overrides.update({key: value for key, value in given.items() if value is not None})
    try:
        return monitor_mqtt_config(broker, **overrides)
    except ValueError as exc:
        raise UsageError(f"--broker {broker!r}: {exc}") from None


def _notice(message: str) -> None:
    typer.echo(f"edgefl monitor: {message}", err=True)


def _check_tls_files(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> None:
    """Parse the TLS files with the standard library (ConfigError naming the option)."""
    import re
    import ssl

    def reason(exc: OSError) -> str:
        if isinstance(exc, ssl.SSLError):
            return re.sub(r"\s*\(_ssl\.c:\d+\)", "", str(exc))
        return str(exc.strerror or exc)

    def context() -> ssl.SSLContext:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    for name, path in (("--ca-file", ca_file), ("--cert-file", cert_file)):
        if path is not None:
            try:
                context().load_verify_locations(cafile=path)
            except OSError as exc:
                raise ConfigError(
                    f"{name} {str(path)!r}: not a PEM certificate file ({reason(exc)})"
                ) from None
    if cert_file is not None and key_file is not None:
        try:
            context().load_cert_chain(cert_file, key_file, password=lambda: b"")
        except OSError as exc:
            raise ConfigError(
                f"--key-file {str(key_file)!r}: not an unencrypted PEM private key for"
                f" --cert-file ({reason(exc)})"
            ) from None


def _run_interactive(options: MonitorOptions) -> None:
    try:
        from .tui import MonitorApp
    except ImportError as exc:  # textual is the `monitor` extra
        raise ConfigError(
            f"the terminal UI needs textual ({exc}): pip install 'edgefl-mqtt[monitor]';"
            " --once and --json work without it"
        ) from None
    # interactive: the screen comes up at once and the transport keeps reconnecting
    app = MonitorApp(replace(options, config=options.config.replace(start_timeout=None)))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, app.exit)
        await app.run_async()

    asyncio.run(run())


def _run_clear(options: MonitorOptions, target: str, *, dry_run: bool, json_output: bool) -> None:
    result = asyncio.run(until_signal(clear_retained(options, target, dry_run=dry_run)))
    if result is None:
        return  # stopped by SIGTERM/SIGINT
    topics, _ = result
    if json_output:
        typer.echo(dump_json({"dry_run": dry_run, "target": target, "topics": topics}))
        return
    verb = "would clear" if dry_run else "cleared"
    typer.echo(f"{verb} {len(topics)} retained topic(s) for {target!r}")
    for name in topics:
        typer.echo(f"  {name}")


async def _stream(options: MonitorOptions, *, interval: float, count: int | None) -> None:
    with contextlib.suppress(BrokenPipeError):  # e.g. `| head`
        await until_signal(stream_json(options, sys.stdout, interval=interval, count=count))


def main(argv: list[str] | None = None) -> None:
    """``python -m edgefl.monitor``: ``edgefl monitor`` through the one error path."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(monitor_command)
    run_cli(
        lambda: app(args=argv, prog_name="edgefl monitor", standalone_mode=False),
        prog="edgefl monitor",
    )
