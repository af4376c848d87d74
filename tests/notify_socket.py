"""A NOTIFY_SOCKET for the sd_notify tests: a real AF_UNIX datagram socket."""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def notify_socket(timeout: float | None) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in a fresh short directory (AF_UNIX paths are limited to 108
    bytes), with ``timeout`` (0.0: non-blocking), and its path; closed on the way out."""
    with tempfile.TemporaryDirectory(prefix="efn-") as directory:
        path = str(Path(directory) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(timeout)
        try:
            yield sock, path
        finally:
            sock.close()
