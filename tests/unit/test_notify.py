"""sd_notify over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from notify_socket import notify_socket

from device_agent.notify import SystemdNotifier


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    with notify_socket(2.0) as bound:
        yield bound


def test_messages_reach_the_socket(listener: tuple[socket.socket, str]) -> None:
    # Arrange
    sock, path = listener
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})

    # Act
    sent = [
        notifier.ready(status="connected to broker"),
        notifier.watchdog(),
        notifier.status("training\nround 3"),
        notifier.extend_timeout(1.5),
        notifier.reloading(),
        notifier.stopping(),
    ]
    received = [sock.recv(4096).decode() for _ in sent]
    notifier.close()

    # Assert
    assert notifier.enabled
    assert all(sent)
    assert received == [
        "READY=1\nSTATUS=connected to broker",
        "WATCHDOG=1",
        "STATUS=training round 3",
        "EXTEND_TIMEOUT_USEC=1500000",
        "RELOADING=1",
        "STOPPING=1",
    ]


def test_abstract_namespace_socket() -> None:
    name = f"edgefl-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        with SystemdNotifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"


def test_no_op_outside_systemd() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.watchdog() is False


def test_unsupported_socket_kind_disables() -> None:
    assert not SystemdNotifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert SystemdNotifier(env).watchdog_interval() == expected


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert SystemdNotifier().watchdog_interval() == 10.0


def test_a_full_receiver_queue_never_blocks_the_sender(tmp_path: Path) -> None:
    # Arrange: a receiver that never reads (its datagram queue fills up)
    path = str(tmp_path / "stuck.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})

    # Act: far more than net.unix.max_dgram_qlen datagrams
    results = [notifier.watchdog() for _ in range(2000)]

    # Assert: the first ones were delivered, the rest dropped instead of blocking
    assert results[0] is True
    assert results[-1] is False
    receiver.close()
    notifier.close()
