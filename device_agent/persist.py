"""Small durable integers the agent keeps in its state directory.

* ``session``: the presence connection counter (``docs/PROTOCOL.md`` §4.3). :meth:`PersistentInt.
  increment` persists the new value *before* returning it, so a crash never reuses a session
  number and a late Will of an old connection can never outrank a newer state.
* ``trained_version``: the model version the agent last contributed an update for, so a restart
  does not train the same version twice.

Each value is one ASCII decimal line, written atomically (``spool.atomic_write``). A missing or
unreadable file reads as the default. Blocking (tiny file I/O).
"""

from __future__ import annotations

from pathlib import Path

from device_agent.spool import atomic_write

__all__ = ["PersistentInt"]


class PersistentInt:
    """One non-negative integer in a file. ``default`` when the file is missing or corrupt."""

    def __init__(self, path: Path, *, default: int = 0, durable: bool = True) -> None:
        self.path = path
        self._durable = durable
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._value = self._read(default)

    def _read(self, default: int) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return default
        return int(text) if text.isdigit() else default

    @property
    def value(self) -> int:
        return self._value

    def set(self, value: int) -> None:
        if value < 0:
            raise ValueError(f"{self.path.name} must be >= 0, got {value}")
        atomic_write(self.path, f"{value}\n".encode(), durable=self._durable)
        self._value = value

    def increment(self) -> int:
        """Persist ``value + 1`` and return it."""
        self.set(self._value + 1)
        return self._value
