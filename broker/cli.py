"""``edgefl broker``: run a development MQTT broker in the foreground until Ctrl-C or SIGTERM.

Mosquitto with ``conf/dev.conf`` when the binary is installed (``PATH`` or ``/usr/sbin``);
otherwise, or with ``--embedded``, the in-process amqtt broker (MQTT 3.1.1, no persistence).
``edgefl/cli.py`` mounts :func:`broker_command` as the ``broker`` subcommand.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from broker.launcher import BrokerStartError, EmbeddedBroker, MosquittoBroker, find_mosquitto


def run_broker(
    port: int = 1883, bind: str = "127.0.0.1", embedded: bool = False, data_dir: Path | None = None
) -> int:
    """Run a broker until SIGINT/SIGTERM; returns the process exit code. ``port=0`` picks a free
    port. Prints the URL clients should use (``mqtt://127.0.0.1:PORT``)."""
    binary = None if embedded else find_mosquitto()
    if binary is None:
        if not embedded:
            _say("mosquitto not found on PATH or in /usr/sbin: using the embedded amqtt broker")
        if data_dir is not None:
            _say("note: the embedded broker keeps no state, --data-dir is ignored")
        return asyncio.run(_run_embedded(port, bind))
    return _run_mosquitto(binary, port, bind, data_dir)


def broker_command(
    port: Annotated[int, typer.Option(help="TCP port to listen on (0: pick a free port).")] = 1883,
    bind: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 for all interfaces).")] = (
        "127.0.0.1"
    ),
    embedded: Annotated[
        bool,
        typer.Option(
            help="Run the in-process amqtt broker (MQTT 3.1.1) even if Mosquitto is installed."
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="State directory for Mosquitto (config, persistence, default: a temp dir)."
        ),
    ] = None,
) -> None:
    """Run a development MQTT broker in the foreground (Ctrl-C to stop).

    Mosquitto with edgefl's dev config when it is installed, else the embedded amqtt broker.
    Prints the URL for `edgefl agent`, `edgefl aggregator` and `edgefl monitor`.
    """
    code = run_broker(port=port, bind=bind, embedded=embedded, data_dir=data_dir)
    if code:
        raise typer.Exit(code)


def _run_mosquitto(binary: Path, port: int, bind: str, data_dir: Path | None) -> int:
    broker = MosquittoBroker(
        port=port or None, bind=bind, state_dir=data_dir, binary=binary, log_to_console=True
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            broker.start()
        except BrokerStartError as exc:
            _say(f"mosquitto did not start: {exc}")
            return 1
        _announce(broker.url, f"Mosquitto ({binary}), dev config", broker.state_dir)
        while not stop.wait(0.5):
            if not broker.is_running():
                code = broker.wait()
                _say(f"mosquitto exited with code {code}")
                return code or 1
        _say("stopping mosquitto")
        return 0
    finally:
        broker.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _run_embedded(port: int, bind: str) -> int:
    broker = EmbeddedBroker(port=port or None, bind=bind)
    try:
        await broker.start()
    except Exception as exc:
        _say(f"embedded broker did not start: {exc}")
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        _announce(broker.url, "embedded amqtt broker (MQTT 3.1.1, no persistence)", None)
        await stop.wait()
        _say("stopping the embedded broker")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await broker.stop()
    return 0


def _announce(url: str, what: str, state_dir: Path | None) -> None:
    _say(f"edgefl broker: {what}")
    if state_dir is not None:
        _say(f"  state: {state_dir}")
    _say(f"  listening on {url}   (Ctrl-C to stop)")


def _say(text: str) -> None:
    print(text, flush=True)
