"""``edgefl broker``: run a development MQTT broker in the foreground until Ctrl-C or SIGTERM.

``--kind auto`` (default): Mosquitto with ``conf/dev.conf`` when the binary is installed (``PATH``
or ``/usr/sbin``), otherwise the embedded amqtt broker (MQTT 3.1.1, no persistence; needs the
``broker`` extra). ``--kind mosquitto`` / ``--kind embedded`` choose one (``--embedded`` is the
older spelling of ``--kind embedded``). ``edgefl/cli.py`` mounts :func:`broker_command` as the
``broker`` subcommand.

Errors follow :mod:`edgefl.clierror` (one line on stderr, no traceback):

* exit 2 (usage): a bad option value (``--port`` outside 0..65535, ``--kind`` not a choice,
  ``--bind`` not an IP address);
* exit 78 (config): the broker cannot be set up as asked: ``--port`` already in use, ``--bind``
  an address this host does not have, ``--data-dir`` not writable, Mosquitto asked for but not
  installed, amqtt asked for but not installed (the message names the extra);
* exit 0: stopped by SIGINT/SIGTERM (within 2 s, in every phase, start-up included).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import threading
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from broker.launcher import (
    BrokerStartError,
    EmbeddedBroker,
    EmbeddedBrokerUnavailable,
    MosquittoBroker,
    PortInUse,
    find_mosquitto,
)
from edgefl.clierror import ConfigError, UsageError, choices_hint

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STOP_BUDGET_S = 1.5  # the embedded broker's shutdown is bounded so the process exits within 2 s


class BrokerKind(StrEnum):
    """Which broker ``edgefl broker`` runs."""

    AUTO = "auto"
    MOSQUITTO = "mosquitto"
    EMBEDDED = "embedded"


def parse_kind(value: str) -> BrokerKind:
    """``--kind`` as a :class:`BrokerKind`; :class:`UsageError` naming the choices."""
    try:
        return BrokerKind(value)
    except ValueError:
        raise UsageError(f"--kind: {choices_hint(value, [k.value for k in BrokerKind])}") from None


def validate_listener(port: int, bind: str) -> None:
    """``--port`` in 0..65535 and ``--bind`` an IP address, or :class:`UsageError`."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port: {port} is not a TCP port (0..65535; 0 picks a free port)")
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise UsageError(
            f"--bind: {bind!r} is not an IP address (e.g. 127.0.0.1, or 0.0.0.0 for all)"
        ) from None


def check_bindable(bind: str) -> None:
    """``--bind`` is an address of this host (a socket binds to it), else :class:`ConfigError`."""
    family = socket.AF_INET6 if ipaddress.ip_address(bind).version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((bind, 0))
    except OSError as exc:
        raise ConfigError(
            f"--bind: cannot listen on {bind}: {exc.strerror or exc} (not an address of this host?)"
        ) from None


def resolve_kind(kind: BrokerKind) -> BrokerKind:
    """``auto`` -> Mosquitto when installed, else embedded; ``mosquitto`` must be installed."""
    if kind is BrokerKind.AUTO:
        return BrokerKind.MOSQUITTO if find_mosquitto() is not None else BrokerKind.EMBEDDED
    if kind is BrokerKind.MOSQUITTO and find_mosquitto() is None:
        raise ConfigError(
            "--kind mosquitto: mosquitto is not installed (not on PATH nor in /usr/sbin); "
            "install it (Debian/Ubuntu: apt install mosquitto) or use --kind embedded"
        )
    return kind


def run_broker(
    port: int = 1883,
    bind: str = "127.0.0.1",
    kind: BrokerKind | str = BrokerKind.AUTO,
    data_dir: Path | None = None,
) -> int:
    """Run a broker until SIGINT/SIGTERM; returns 0 after a clean stop. ``port=0`` picks a free
    port. Prints the URL clients should use (``mqtt://127.0.0.1:PORT``). Raises
    :class:`UsageError` / :class:`ConfigError` (see the module docstring) before writing
    anything."""
    chosen = resolve_kind(parse_kind(str(kind)))
    validate_listener(port, bind)
    check_bindable(bind)
    if chosen is BrokerKind.EMBEDDED:
        if kind == BrokerKind.AUTO:
            _say("mosquitto not found on PATH or in /usr/sbin: using the embedded amqtt broker")
        if data_dir is not None:
            _say("note: the embedded broker keeps no state, --data-dir is ignored")
        return asyncio.run(_run_embedded(port, bind))
    return _run_mosquitto(port, bind, data_dir)


def broker_command(
    port: Annotated[int, typer.Option(help="TCP port to listen on (0: pick a free port).")] = 1883,
    bind: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for all interfaces).")] = (
        "127.0.0.1"
    ),
    kind: Annotated[
        str,
        typer.Option(
            help="auto (Mosquitto when installed, else embedded), mosquitto, or embedded "
            "(amqtt, MQTT 3.1.1, no persistence; needs the 'broker' extra)."
        ),
    ] = BrokerKind.AUTO.value,
    embedded: Annotated[bool, typer.Option(help="Same as --kind embedded.", hidden=True)] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="State directory for Mosquitto (config, persistence, default: a temp dir)."
        ),
    ] = None,
) -> None:
    """Run a development MQTT broker in the foreground (Ctrl-C to stop).

    Mosquitto with edgefl's dev config when it is installed, else the embedded amqtt broker.
    Prints the URL for `edgefl agent`, `edgefl aggregator` and `edgefl monitor`. Exit codes:
    2 bad option, 78 port in use / address not available / broker not installed, 0 stopped.
    """
    if embedded:
        if kind not in (BrokerKind.AUTO.value, BrokerKind.EMBEDDED.value):
            raise UsageError(f"--embedded contradicts --kind {kind}")
        kind = BrokerKind.EMBEDDED.value
    code = run_broker(port=port, bind=bind, kind=kind, data_dir=data_dir)
    if code:
        raise typer.Exit(code)


def _listen_error(exc: BrokerStartError, port: int, bind: str) -> ConfigError:
    text = str(exc)
    if "Cannot assign requested address" in text or "Errno 99" in text:
        return ConfigError(f"--bind: cannot listen on {bind}: this host has no such address")
    if isinstance(exc, PortInUse) or "Address already in use" in text:
        return ConfigError(
            f"--port: {port} is already in use on {bind} (another broker?); "
            "choose another port, or --port 0 for a free one"
        )
    if "Permission denied" in text or "Errno 13" in text:
        return ConfigError(
            f"--port: not allowed to listen on {bind}:{port} (ports below 1024 need root)"
        )
    first = text.splitlines()[0] if text else type(exc).__name__
    return ConfigError(f"the broker did not start: {first}")


def _run_mosquitto(port: int, bind: str, data_dir: Path | None) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    broker: MosquittoBroker | None = None
    try:
        if data_dir is not None:
            _check_writable(data_dir)
        broker = MosquittoBroker(
            port=port or None, bind=bind, state_dir=data_dir, log_to_console=True
        )
        if stop.is_set():
            return 0
        try:
            broker.start()
        except BrokerStartError as exc:
            if stop.is_set():
                return 0
            raise _listen_error(exc, broker.port, bind) from None
        _announce(broker.url, f"Mosquitto ({broker.binary}), dev config", broker.state_dir)
        while not stop.wait(0.2):
            if not broker.is_running():
                code = broker.wait()
                _say(f"mosquitto exited with code {code}")
                return code or 1
        _say("stopping mosquitto")
        return 0
    finally:
        if broker is not None:
            broker.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_writable(data_dir: Path) -> None:
    """``--data-dir`` exists as a writable directory or can be created, else ConfigError."""
    probe = data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--data-dir: {data_dir} is not a writable directory")


async def _run_embedded(port: int, bind: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    broker = EmbeddedBroker(port=port or None, bind=bind)
    try:
        starting = asyncio.create_task(broker.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a signal during start-up (importing amqtt takes a while)
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            return 0
        stopping.cancel()
        try:
            starting.result()
        except EmbeddedBrokerUnavailable as exc:
            raise ConfigError(f"--kind embedded: {exc}") from None
        except BrokerStartError as exc:
            raise _listen_error(exc, broker.port, bind) from None
        _announce(broker.url, "embedded amqtt broker (MQTT 3.1.1, no persistence)", None)
        await stop.wait()
        _say("stopping the embedded broker")
        return 0
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_BUDGET_S):
                await broker.stop()
        _report_contained(broker)


def _report_contained(broker: EmbeddedBroker) -> None:
    repeats = broker.log_counts.repeats() if broker.log_counts is not None else 0
    if repeats:
        _say(f"note: {repeats} repeated amqtt log records were counted, not shown")


def _announce(url: str, what: str, state_dir: Path | None) -> None:
    _say(f"edgefl broker: {what}")
    if state_dir is not None:
        _say(f"  state: {state_dir}")
    _say(f"  listening on {url}   (Ctrl-C to stop)")


def _say(text: str) -> None:
    print(text, flush=True)
