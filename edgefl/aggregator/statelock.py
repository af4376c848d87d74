"""The state directory's lock: one aggregator (or one maintenance command) at a time.

The running service holds an exclusive ``flock`` on ``<state_dir>/lock`` for its whole life; the
kernel releases it when the process exits, however it exits (SIGKILL included), so a stale lock
never survives a crash. ``edgefl aggregator reset-device`` takes the same lock without waiting
and refuses to touch the state while an aggregator holds it: a running service keeps the
devices' high-water marks in memory and would overwrite or ignore the change.

The file holds the holder's pid (for the error message only; the lock is the ``flock``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Final

__all__ = ["LOCK_NAME", "StateDirBusy", "StateDirLock"]

LOCK_NAME: Final = "lock"


class StateDirBusy(OSError):
    """Another process holds the state directory's lock (an ``OSError``: the runner reports it
    as a ``state_dir`` problem, exit 78)."""

    def __init__(self, state_dir: Path, holder: str) -> None:
        who = f"process {holder}" if holder else "another process"
        super().__init__(f"state directory {str(state_dir)!r} is in use by {who}")
        self.state_dir = state_dir
        self.holder = holder


class StateDirLock:
    """An exclusive, non-blocking lock on a state directory (created if missing)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now or raise :class:`StateDirBusy`."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise StateDirBusy(self.state_dir, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
