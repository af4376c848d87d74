"""Connecting can be cut short: cancelling ``async with MqttTransport(...)`` or closing the
transport returns promptly in every phase of a connection attempt, and giving up is a typed
:class:`BrokerUnreachable`.

The brokers here are silent listening sockets on 127.0.0.1 that never accept: the kernel
completes the TCP handshake (the connection waits in the backlog), then nothing is ever said.
So an mqtt:// attempt waits for a CONNACK (on the event loop), while mqtts:// and ws:// attempts
hang inside paho's blocking connect (TLS handshake, WebSocket upgrade) in the connect thread.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.launcher import free_port
from edgefl.transport import (
    BrokerUnreachable,
    MqttConfig,
    MqttProtocol,
    MqttTransport,
    NotConnectedError,
    TransportClosed,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PROMPT = (
    3.0  # seconds: far below the 30 s connect timeout below, far above a loaded machine's jitter
)


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A listening socket that never accepts and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def silent_url(sock: socket.socket, scheme: str) -> str:
    return f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"


def hanging_config(url: str, **overrides: object) -> MqttConfig:
    values: dict[str, object] = {
        "connect_timeout": 30.0,
        "start_timeout": 60.0,
        "protocol": MqttProtocol.V5,
        "tls_insecure": url.startswith(("mqtts", "wss")),
    }
    values.update(overrides)
    return MqttConfig.from_url(url, **values)


async def entered(transport: MqttTransport) -> None:
    async with transport:
        pytest.fail("connected to a silent listener")


def connection_pending(listener: socket.socket, timeout: float = 10.0) -> bool:
    """True once a client's TCP connection waits in the listener's backlog."""
    readable, _, _ = select.select([listener], [], [], timeout)
    return bool(readable)


async def until_attempting(listener: socket.socket) -> None:
    """Wait until the transport's attempt reached the silent broker (then it hangs there)."""
    assert await asyncio.to_thread(connection_pending, listener)


async def hanging(
    silent: socket.socket, scheme: str, **overrides: object
) -> tuple[MqttTransport, asyncio.Task[None]]:
    """A transport entering ``async with`` (in a task) whose attempt hangs at ``silent``."""
    transport = MqttTransport(hanging_config(silent_url(silent, scheme), **overrides))
    task = asyncio.create_task(entered(transport))
    await until_attempting(silent)
    return transport, task


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts", "ws"])
async def test_cancelling_a_hanging_connect_returns_promptly(
    silent: socket.socket, scheme: str
) -> None:
    # Arrange
    transport, task = await hanging(silent, scheme)
    assert not task.done()

    # Act
    task.cancel()
    async with asyncio.timeout(PROMPT):
        await asyncio.wait({task})

    # Assert
    assert task.cancelled()
    assert transport.statistics().connects == 0


@pytest.mark.parametrize("scheme", ["mqtt", "mqtts", "ws"])
async def test_closing_from_another_task_ends_the_wait_with_transport_closed(
    silent: socket.socket, scheme: str
) -> None:
    transport, task = await hanging(silent, scheme)

    async with asyncio.timeout(PROMPT):
        await transport.close()
        await asyncio.wait({task})

    with pytest.raises(TransportClosed):
        task.result()


async def test_an_abandoned_connect_closes_its_socket_when_it_returns(
    silent: socket.socket,
) -> None:
    """The connect thread outlives the cancellation; once its TLS handshake times out it
    closes the socket it opened (the listener sees EOF after the ClientHello)."""

    _, task = await hanging(silent, "mqtts", connect_timeout=1)
    task.cancel()
    await asyncio.wait({task})
    conn, _ = silent.accept()
    with conn:
        conn.settimeout(15)
        received = b""
        while chunk := conn.recv(65536):  # ends with EOF, or raises on timeout
            received += chunk
    assert received[:1] == b"\x16"  # a TLS handshake record: the ClientHello


async def test_the_backoff_sleep_is_cut_short_by_cancellation() -> None:
    closed_port = free_port()  # nothing listens: every attempt is refused at once

    cfg = MqttConfig.from_url(
        f"mqtt://127.0.0.1:{closed_port}",
        start_timeout=120.0,
        reconnect_min_delay=60.0,
        reconnect_max_delay=60.0,
    )
    transport = MqttTransport(cfg)
    task = asyncio.create_task(entered(transport))
    async with asyncio.timeout(10):
        while transport.statistics().connect_failures == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    task.cancel()
    async with asyncio.timeout(PROMPT):
        await asyncio.wait({task})
    assert task.cancelled()


async def test_giving_up_raises_broker_unreachable_with_url_and_reason() -> None:
    closed_port = free_port()

    cfg = MqttConfig.from_url(
        f"mqtt://user:secret@127.0.0.1:{closed_port}",
        start_timeout=0.5,
        reconnect_min_delay=0.05,
    )
    with pytest.raises(BrokerUnreachable) as caught:
        async with MqttTransport(cfg):
            pass
    error = caught.value
    assert error.url == f"mqtt://127.0.0.1:{closed_port}"
    assert error.reason is not None
    assert "Connection refused" in error.reason
    assert isinstance(error, NotConnectedError)  # earlier callers keep working
    assert "secret" not in str(error)


def test_a_process_stopped_while_connecting_exits_without_waiting_for_the_connect(
    silent: socket.socket, tmp_path: Path
) -> None:
    """``asyncio.run`` joins the default executor at exit: a connect running there held a
    SIGTERM-ed process for up to ``connect_timeout``. The connect thread is a daemon."""
    script = tmp_path / "connect.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, signal, sys
            from edgefl.transport import MqttConfig, MqttTransport

            async def main():
                cfg = MqttConfig.from_url(
                    {silent_url(silent, "mqtts")!r}, tls_insecure=True,
                    connect_timeout=120.0, start_timeout=300.0,
                )
                task = asyncio.current_task()
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
                print("connecting", flush=True)
                try:
                    async with MqttTransport(cfg):
                        pass
                except asyncio.CancelledError:
                    print("cancelled", flush=True)

            asyncio.run(main())
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connecting"
        assert connection_pending(silent)  # TCP is up, the TLS handshake hangs
    except BaseException:
        proc.kill()
        raise
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)  # without the daemon thread: 120 s
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process waited for the hanging connect")
    assert proc.returncode == 0
    assert "cancelled" in out
