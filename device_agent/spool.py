"""Crash-safe on-disk spool of finished updates, and the codec's residual store.

A finished update is written to the spool *before* it is published. Without receipts it leaves
after the broker acknowledged it (:meth:`UpdateSpool.remove`); with receipts (protocol 1.1) the
agent marks it *sent, awaiting receipt* after the broker's acknowledgement
(:meth:`UpdateSpool.mark_sent`, a small ``u-<seq>.sent`` file beside the entry holding the number
of sends) and removes it only when the aggregator's receipt names it. So a device that is
offline or restarts still delivers, and an update the broker lost after acknowledging it is
sent again. Guarantees, given a filesystem that honours ``fsync``:

* an entry is either completely there or not at all (temp file + ``fsync`` + ``os.replace`` +
  ``fsync`` of the directory); a crash mid-write leaves a ``*.tmp`` file that the next start
  deletes and counts (``torn_cleaned``);
* every entry carries a CRC-32; a corrupted entry (SD-card bit rot) is dropped and counted
  (``corrupt_dropped``) instead of crashing the agent or being sent;
* :meth:`UpdateSpool.next_seq` never hands out the same number twice, across restarts and even
  after the spool was emptied: the counter is persisted (atomically) before a number is returned,
  and at start it is raised above any sequence number still on disk;
* the spool is bounded (``max_entries``, ``max_bytes``): :meth:`UpdateSpool.put` raises
  :class:`SpoolFull` and counts it; the caller decides (drop the new one or evict the oldest);
* one process at a time: an exclusive ``flock`` on ``<directory>/.lock`` (:class:`SpoolLocked`).

* the awaiting state survives a restart: :meth:`UpdateSpool.awaiting` lists the entries marked
  sent and how often; a mark without its entry (a crash between the two deletions) is removed at
  start. Losing a mark only costs one early resend, which the aggregator de-duplicates.

Layout: ``u-<seq, 20 digits>.upd`` entries, ``u-<seq>.sent`` marks, ``next_seq`` counter,
``.lock``. Entry format (big endian): magic ``EFLSPL01``, u64 seq, f64 created (unix time), u32
meta length, u64 payload length, meta (UTF-8 JSON), payload, u32 CRC-32 of everything before it.

Not thread-safe; the methods block on disk I/O (use ``asyncio.to_thread`` from an event loop).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefl.lifecycle import Lifecycle

__all__ = [
    "ResidualStore",
    "SentMark",
    "SpoolCorrupt",
    "SpoolEntry",
    "SpoolError",
    "SpoolFull",
    "SpoolLocked",
    "SpoolStatistics",
    "UpdateSpool",
    "atomic_write",
]

_MAGIC = b"EFLSPL01"
_HEADER = struct.Struct(">8sQdIQ")  # magic, seq, created, meta_len, payload_len
_CRC = struct.Struct(">I")
_ENTRY_PREFIX, _ENTRY_SUFFIX, _SENT_SUFFIX = "u-", ".upd", ".sent"
_COUNTER = "next_seq"
_TMP_SUFFIX = ".tmp"


class SpoolError(Exception):
    """Base of spool errors."""


class SpoolFull(SpoolError):
    """The spool is at ``max_entries`` or the new entry would exceed ``max_bytes``."""

    def __init__(self, entries: int, size: int, max_entries: int, max_bytes: int) -> None:
        super().__init__(
            f"spool full: {entries}/{max_entries} entries, {size}/{max_bytes} bytes after put"
        )
        self.entries = entries
        self.size = size


class SpoolCorrupt(SpoolError):
    """An entry failed its integrity check; it has been dropped."""


class SpoolLocked(SpoolError):
    """Another process holds the spool directory."""


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    seq: int
    meta: dict[str, object]
    payload_size: int
    file_size: int
    created: float  # unix time of put()
    path: Path


@dataclass(frozen=True, slots=True)
class SentMark:
    """An entry sent (and acknowledged by the broker) ``attempts`` times, last at ``sent_at``
    (unix time), still waiting for the aggregator's receipt."""

    seq: int
    attempts: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class SpoolStatistics:
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int
    next_seq: int
    puts: int
    removed: int
    rejected_full: int
    torn_cleaned: int
    corrupt_dropped: int
    awaiting: int = 0  # entries sent and waiting for a receipt


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, *, durable: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically (temp file, ``fsync``, ``os.replace``, ``fsync``
    of the directory when ``durable``): readers see the old or the new content, never a mix."""
    _atomic_write(path, data, durable=durable)


def _encode_entry(seq: int, created: float, meta: Mapping[str, object], payload: bytes) -> bytes:
    try:
        meta_bytes = json.dumps(dict(meta), sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spool meta must be JSON-serialisable: {exc}") from None
    body = _HEADER.pack(_MAGIC, seq, created, len(meta_bytes), len(payload)) + meta_bytes + payload
    return body + _CRC.pack(zlib.crc32(body))


def _decode_entry(data: bytes) -> tuple[int, float, dict[str, object], bytes]:
    if len(data) < _HEADER.size + _CRC.size:
        raise SpoolCorrupt("truncated entry")
    body, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(body) != crc:
        raise SpoolCorrupt("checksum mismatch")
    magic, seq, created, meta_len, payload_len = _HEADER.unpack_from(body)
    if magic != _MAGIC or _HEADER.size + meta_len + payload_len != len(body):
        raise SpoolCorrupt("bad header")
    meta_end = _HEADER.size + meta_len
    try:
        meta = json.loads(body[_HEADER.size : meta_end])
    except ValueError:
        raise SpoolCorrupt("bad meta") from None
    if not isinstance(meta, dict):
        raise SpoolCorrupt("bad meta")
    return seq, created, meta, body[meta_end:]


class UpdateSpool(Lifecycle):
    """Bounded, crash-safe spool of encoded updates keyed by sequence number."""

    def __init__(
        self,
        directory: Path,
        *,
        max_entries: int = 1000,
        max_bytes: int = 64 * 1024 * 1024,
        durable: bool = True,
    ) -> None:
        """Open (creating if needed) the spool in ``directory``; cleans up torn writes and drops
        corrupt entries. ``durable=False`` skips ``fsync`` (simulations only)."""
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.directory = directory
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._durable = durable
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd: int | None = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolLocked(f"{directory} is in use by another process") from None
        self._entries: dict[int, SpoolEntry] = {}
        self._sent: dict[int, SentMark] = {}
        self._bytes = 0
        self._puts = self._removed = self._rejected_full = 0
        self._torn_cleaned = self._corrupt_dropped = 0
        try:
            self._scan()
            self._next = max(self._read_counter(), max(self._entries, default=-1) + 1)
        except BaseException:
            self.close()
            raise

    # -- lifecycle --

    def close(self) -> None:
        """Release the directory lock. The object must not be used afterwards."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    # -- sequence numbers --

    def next_seq(self) -> int:
        """Allocate a sequence number; it is persisted before it is returned, so it is never
        handed out again (a crash may leave a gap, never a repeat)."""
        seq = self._next
        self._write_counter(seq + 1)
        self._next = seq + 1
        return seq

    # -- entries --

    def put(self, seq: int, payload: bytes, meta: Mapping[str, object]) -> SpoolEntry:
        """Store an update durably. ``seq`` should come from :meth:`next_seq` (a larger one
        advances the counter past it). Raises :class:`SpoolFull`, or ``ValueError`` for a
        duplicate / negative ``seq`` or meta that is not JSON-serialisable."""
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
            raise ValueError(f"seq must be a non-negative integer, got {seq!r}")
        if seq in self._entries:
            raise ValueError(f"seq {seq} is already spooled")
        created = time.time()
        data = _encode_entry(seq, created, meta, bytes(payload))
        entries, size = len(self._entries) + 1, self._bytes + len(data)
        if entries > self.max_entries or size > self.max_bytes:
            self._rejected_full += 1
            raise SpoolFull(entries, size, self.max_entries, self.max_bytes)
        if seq >= self._next:
            self._write_counter(seq + 1)
            self._next = seq + 1
        path = self._path(seq)
        _atomic_write(path, data, durable=self._durable)
        entry = SpoolEntry(seq, dict(meta), len(payload), len(data), created, path)
        self._entries[seq] = entry
        self._bytes += len(data)
        self._puts += 1
        return entry

    def pending(self) -> list[SpoolEntry]:
        """Entries not yet acknowledged, in sequence order (oldest first)."""
        return [self._entries[seq] for seq in sorted(self._entries)]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, seq: object) -> bool:
        return seq in self._entries

    def read(self, seq: int) -> bytes:
        """The payload of entry ``seq``, integrity-checked. Raises ``KeyError`` if absent and
        :class:`SpoolCorrupt` (after dropping the entry) if it no longer verifies."""
        entry = self._entries[seq]
        try:
            stored_seq, _, _, payload = _decode_entry(entry.path.read_bytes())
            if stored_seq != seq:
                raise SpoolCorrupt("sequence number mismatch")
        except (SpoolCorrupt, OSError) as exc:
            self._corrupt_dropped += 1
            self._forget(seq)
            with contextlib.suppress(FileNotFoundError):
                entry.path.unlink()
            raise SpoolCorrupt(f"spool entry {seq} dropped: {exc}") from None
        return payload

    def mark_sent(self, seq: int, attempts: int) -> SentMark | None:
        """Record that entry ``seq`` was sent ``attempts`` times (the last send just acknowledged
        by the broker) and now waits for a receipt. None (nothing written) when the entry is gone,
        e.g. a receipt removed it while its publication was being acknowledged."""
        if seq not in self._entries:
            return None
        mark = SentMark(seq, attempts, time.time())
        text = json.dumps({"attempts": attempts, "sent_at": mark.sent_at})
        _atomic_write(self._sent_path(seq), text.encode(), durable=self._durable)
        self._sent[seq] = mark
        return mark

    def awaiting(self) -> list[SentMark]:
        """Entries marked sent, waiting for a receipt, in sequence order."""
        return [self._sent[seq] for seq in sorted(self._sent)]

    def remove(self, seq: int) -> bool:
        """Delete entry ``seq`` and its sent mark (after the broker's acknowledgement without
        receipts, or the aggregator's receipt). False if it was not there."""
        entry = self._forget(seq)
        if entry is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()
        if self._durable:
            _fsync_dir(self.directory)
        self._removed += 1
        return True

    def statistics(self) -> SpoolStatistics:
        return SpoolStatistics(
            entries=len(self._entries),
            bytes=self._bytes,
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
            next_seq=self._next,
            puts=self._puts,
            removed=self._removed,
            rejected_full=self._rejected_full,
            torn_cleaned=self._torn_cleaned,
            corrupt_dropped=self._corrupt_dropped,
            awaiting=len(self._sent),
        )

    # -- internals --

    def _path(self, seq: int) -> Path:
        return self.directory / f"{_ENTRY_PREFIX}{seq:020d}{_ENTRY_SUFFIX}"

    def _sent_path(self, seq: int) -> Path:
        return self.directory / f"{_ENTRY_PREFIX}{seq:020d}{_SENT_SUFFIX}"

    def _forget(self, seq: int) -> SpoolEntry | None:
        entry = self._entries.pop(seq, None)
        if entry is not None:
            self._bytes -= entry.file_size
        if self._sent.pop(seq, None) is not None:
            with contextlib.suppress(FileNotFoundError):
                self._sent_path(seq).unlink()  # the mark first: an orphan entry is resent
        return entry

    def _scan(self) -> None:
        changed = False
        marks: list[Path] = []
        for path in sorted(self.directory.iterdir()):
            name = path.name
            if name.endswith(_TMP_SUFFIX):
                path.unlink(missing_ok=True)
                self._torn_cleaned += 1
                changed = True
            elif name.startswith(_ENTRY_PREFIX) and name.endswith(_ENTRY_SUFFIX):
                entry = self._load_entry(path)
                if entry is None:
                    path.unlink(missing_ok=True)
                    self._corrupt_dropped += 1
                    changed = True
                else:
                    self._entries[entry.seq] = entry
                    self._bytes += entry.file_size
            elif name.startswith(_ENTRY_PREFIX) and name.endswith(_SENT_SUFFIX):
                marks.append(path)
        for path in marks:
            mark = self._load_mark(path)
            if mark is None or mark.seq not in self._entries:
                path.unlink(missing_ok=True)  # orphaned (its entry was removed) or unreadable
                changed = True
            else:
                self._sent[mark.seq] = mark
        if changed and self._durable:
            _fsync_dir(self.directory)

    def _load_entry(self, path: Path) -> SpoolEntry | None:
        digits = path.name[len(_ENTRY_PREFIX) : -len(_ENTRY_SUFFIX)]
        try:
            data = path.read_bytes()
            seq, created, meta, payload = _decode_entry(data)
        except (OSError, SpoolCorrupt):
            return None
        if not digits.isdigit() or int(digits) != seq:
            return None
        return SpoolEntry(seq, meta, len(payload), len(data), created, path)

    @staticmethod
    def _load_mark(path: Path) -> SentMark | None:
        digits = path.name[len(_ENTRY_PREFIX) : -len(_SENT_SUFFIX)]
        try:
            data = json.loads(path.read_bytes())
            attempts, sent_at = int(data["attempts"]), float(data["sent_at"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not digits.isdigit() or attempts < 1:
            return None
        return SentMark(int(digits), attempts, sent_at)

    def _read_counter(self) -> int:
        try:
            text = (self.directory / _COUNTER).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        try:
            value = int(text)
        except ValueError:
            return 0  # cannot happen with atomic writes; the on-disk entries still bound it
        return max(value, 0)

    def _write_counter(self, value: int) -> None:
        _atomic_write(self.directory / _COUNTER, f"{value}\n".encode(), durable=self._durable)


_RESIDUAL_MAGIC = b"EFLRES01"
_RESIDUAL_HEADER = struct.Struct(">8sIQ")  # magic, crc32(payload), payload length


class ResidualStore:
    """Atomically persist one opaque blob (the codec's error-feedback residual).

    :meth:`load` returns ``None`` when nothing was saved or the file does not verify (a lost
    residual only costs a little accuracy; ``corrupt`` counts those)."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.corrupt = 0
        self._durable = durable
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in path.parent.glob(f".{path.name}.*{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def save(self, data: bytes) -> None:
        blob = bytes(data)
        header = _RESIDUAL_HEADER.pack(_RESIDUAL_MAGIC, zlib.crc32(blob), len(blob))
        _atomic_write(self.path, header + blob, durable=self._durable)

    def load(self) -> bytes | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) >= _RESIDUAL_HEADER.size:
            magic, crc, length = _RESIDUAL_HEADER.unpack_from(data)
            blob = data[_RESIDUAL_HEADER.size :]
            if magic == _RESIDUAL_MAGIC and length == len(blob) and zlib.crc32(blob) == crc:
                return blob
        self.corrupt += 1
        return None

    def clear(self) -> None:
        """Forget the residual (e.g. when the model changed shape)."""
        if self.path.exists():
            self.path.unlink()
            if self._durable:
                _fsync_dir(self.path.parent)
