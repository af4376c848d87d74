"""Durable aggregator state in SQLite (WAL) under ``state_dir``: the crash-safety core.

Tables (``state.sqlite``)::

    meta(key, value)                 model, num_params, algorithm, started_at, session, generation
    model(id=1, version, generation, created_at, state)   last snapshot or checkpoint (encode_state;
                                     with central DP its JSON head carries ``privacy``: the
                                     participation counts and the checkpointed buffer's devices)
    buffer(id, generation, device, seq, base_version, num_examples, codec, body)
                                     accepted ENCODED updates of the current buffer generation
    seen(device, seq, version, at)   every accepted (device, seq), exactly once (primary key)
    devices(device, max_seq)         highest accepted seq per device (the sequence window's mark)
    counters(name, value)            received, applied, bytes, rejected:<reason>, staleness:<tau>
    history(version, created_at, applied, accuracy)
    published(version, artifact, num_chunks)   retained chunk sets still on the broker
    leases(lease_id, device, granted_at, expires_at, version)
                                     participation leases held (PROTOCOL.md §4.7); meta
                                     ``lease_next_id`` is the next lease id
    returned_leases(...)             the same columns: leases released (withdrawal, presence
                                     lost), still redeemable once until they expire
    checkins(device, at)             lease candidates: devices checked in, not granted since

Contract: :meth:`StateStore.commit` writes one :class:`BatchRecord` in one transaction; the service
acknowledges the batch's MQTT messages only after it returned. After a crash, :meth:`load`
returns the last committed state: the snapshot taken at the last generation change (a step, or a
*checkpoint* that includes the FedBuff accumulator) plus the encoded updates stored since, which
the service replays in ``id`` order. So every
acknowledged update is counted exactly once, and an unacknowledged one is redelivered by the
broker and treated as new (its (device, seq) is not in ``seen``).

Not thread-safe: one thread (the service's writer thread) owns a store. A second, read-only
connection (:meth:`open_reader`) may query ``seen`` concurrently (WAL).
"""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from edgefl.aggregation import FedBuffState
from edgefl.aggregator.participation import LeaseChanges
from edgefl.participation import Lease, LeaseBookState
from edgefl.privacy import PrivacyState

__all__ = [
    "DB_NAME",
    "AcceptedRow",
    "BatchRecord",
    "LoadedState",
    "StateMismatch",
    "StateStore",
    "decode_state",
    "encode_state",
    "state_blob_parts",
]

DB_NAME: Final = "state.sqlite"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL, generation INTEGER NOT NULL, created_at REAL NOT NULL,
    state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS buffer (
    id INTEGER PRIMARY KEY AUTOINCREMENT, generation INTEGER NOT NULL,
    device TEXT NOT NULL, seq INTEGER NOT NULL, base_version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL, codec TEXT NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seen (
    device TEXT NOT NULL, seq INTEGER NOT NULL, version INTEGER NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, max_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    version INTEGER PRIMARY KEY, created_at REAL NOT NULL, applied INTEGER NOT NULL,
    accuracy REAL);
CREATE TABLE IF NOT EXISTS published (
    version INTEGER NOT NULL, artifact TEXT NOT NULL, num_chunks INTEGER NOT NULL,
    PRIMARY KEY (version, artifact));
CREATE TABLE IF NOT EXISTS leases (
    lease_id INTEGER PRIMARY KEY, device TEXT NOT NULL, granted_at REAL NOT NULL,
    expires_at REAL NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS returned_leases (
    lease_id INTEGER PRIMARY KEY, device TEXT NOT NULL, granted_at REAL NOT NULL,
    expires_at REAL NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkins (device TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
"""


class StateMismatch(RuntimeError):
    """The state directory belongs to another model or algorithm."""


# ---------------------------------------------------------------------------------------------
# snapshot blobs


STATE_MAGIC: Final = b"EFS1"
_NPZ_MAGIC: Final = b"PK\x03\x04"
_HEAD_LEN: Final = struct.Struct("<I")


def encode_state(state: FedBuffState) -> bytes:
    """Serialise a :class:`FedBuffState` into one blob: the concatenation of
    :func:`state_blob_parts`."""
    return b"".join(state_blob_parts(state))


def state_blob_parts(state: FedBuffState) -> list[bytes | memoryview]:
    """The pieces of a :class:`FedBuffState` blob in order (no pickle), views of the arrays.

    Layout: ``b"EFS1"``, a little-endian uint32 ``n``, ``n`` bytes of JSON (``meta`` and, per
    array, name, dtype, shape, offset and length), then the raw C-order bytes of the arrays.
    The array parts are views (no copy; non-contiguous arrays are made contiguous first) and
    there is no checksum pass (SQLite's own page handling and the WAL guard the bytes);
    ``np.savez``'s zip container cost several times more CPU on the ingest path.

    The buffer is included when it is a non-robust accumulator (a *checkpoint*); robust buffers
    (kept updates) are never stored this way: their encoded updates are stored instead.
    """
    arrays: dict[str, Any] = {"weights": state.weights, "norm_history": state.norm_history}
    if state.accumulator is not None and state.count:
        arrays["accumulator"] = state.accumulator
    scalars: dict[str, Any] = {}
    for key, value in state.optimizer_state.items():
        if isinstance(value, np.ndarray):
            arrays[f"opt_{key}"] = value
        else:
            scalars[f"opt_{key}"] = value
    if state.kept_deltas is not None and len(state.kept_deltas):
        raise ValueError("encode_state does not store robust buffers (kept updates)")
    meta = {
        "version": state.version,
        "optimizer_kind": state.optimizer_kind,
        "accepted_total": state.accepted_total,
        "clipped_total": state.clipped_total,
        "steps_total": state.steps_total,
        "rejected": state.rejected,
        "scalars": scalars,
        "buffer": {
            "weight_sum": state.weight_sum,
            "count": state.count,
            "staleness_sum": state.staleness_sum,
            "staleness_max": state.staleness_max,
            "clipped_in_buffer": state.clipped_in_buffer,
        },
    }
    if state.privacy is not None:  # central DP: participation counts, the buffer's devices
        meta["privacy"] = state.privacy.to_json()
    entries, parts, offset = [], [], 0
    for name, value in arrays.items():
        array = np.ascontiguousarray(value)
        entries.append(
            {
                "name": name,
                "dtype": array.dtype.str,
                "shape": list(array.shape),
                "offset": offset,
                "nbytes": array.nbytes,
            }
        )
        parts.append(array.data.cast("B"))
        offset += array.nbytes
    head = json.dumps({"meta": meta, "arrays": entries}, separators=(",", ":")).encode()
    return [STATE_MAGIC + _HEAD_LEN.pack(len(head)) + head, *parts]


def _read_arrays(blob: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, arrays)`` of a blob: the current format, or the npz of earlier releases."""
    if blob[:4] == _NPZ_MAGIC:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        return json.loads(arrays.pop("meta").tobytes().decode()), arrays
    if blob[:4] != STATE_MAGIC:
        raise ValueError("not an edgefl state blob")
    (n,) = _HEAD_LEN.unpack_from(blob, 4)
    start = 8 + n
    head = json.loads(blob[8:start].decode())
    arrays = {}
    for entry in head["arrays"]:
        begin = start + int(entry["offset"])
        end = begin + int(entry["nbytes"])
        if end > len(blob):
            raise ValueError("truncated state blob")
        flat = np.frombuffer(blob[begin:end], dtype=np.dtype(entry["dtype"]))
        arrays[entry["name"]] = flat.reshape(entry["shape"]).copy()
    return head["meta"], arrays


def decode_state(blob: bytes) -> FedBuffState:
    """Inverse of :func:`encode_state` (also reads the npz blobs of earlier releases)."""
    meta, arrays = _read_arrays(blob)
    opt: dict[str, Any] = {k[4:]: v for k, v in arrays.items() if k.startswith("opt_")}
    opt.update({k[4:]: v for k, v in meta["scalars"].items()})
    buf = meta.get("buffer", {})
    accumulator = arrays.get("accumulator")
    privacy = meta.get("privacy")
    return FedBuffState(
        version=int(meta["version"]),
        weights=arrays["weights"].astype(np.float32),
        accumulator=None if accumulator is None else accumulator.astype(np.float32),
        kept_deltas=None,
        kept_weights=None,
        kept_clip=None,
        weight_sum=float(buf.get("weight_sum", 0.0)),
        count=int(buf.get("count", 0)),
        staleness_sum=int(buf.get("staleness_sum", 0)),
        staleness_max=int(buf.get("staleness_max", 0)),
        clipped_in_buffer=int(buf.get("clipped_in_buffer", 0)),
        optimizer_kind=str(meta["optimizer_kind"]),
        optimizer_state=opt,
        norm_history=arrays["norm_history"].astype(np.float64),
        accepted_total=int(meta["accepted_total"]),
        clipped_total=int(meta["clipped_total"]),
        steps_total=int(meta["steps_total"]),
        rejected={str(k): int(v) for k, v in meta["rejected"].items()},
        privacy=None if privacy is None else PrivacyState.from_json(privacy),
    )


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class AcceptedRow:
    """One accepted update as stored: enough to replay it into the buffer."""

    generation: int
    device: str
    seq: int
    base_version: int
    num_examples: int
    codec: str  # the header's codec object as JSON text
    body: bytes | memoryview
    version: int  # server version when it was accepted
    at: float


@dataclass
class BatchRecord:
    """Everything one batch changes; written by :meth:`StateStore.commit` in one transaction."""

    generation: int
    accepted: list[AcceptedRow] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    # (version, created_at, state): encoded by commit(), in the writer thread
    snapshot: tuple[int, float, FedBuffState] | None = None
    history: list[tuple[int, float, int]] = field(default_factory=list)
    rebuffer: list[AcceptedRow] = field(default_factory=list)  # already seen: buffer rows only
    # participation: leases granted and ended by this batch, the next lease id, candidates in
    # and out; a lease's completion commits with the update that completed it, and a lease is
    # durable before its LEASE message is published
    participation: LeaseChanges | None = None

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    @property
    def empty(self) -> bool:
        return not (
            self.accepted
            or self.counters
            or self.snapshot
            or self.history
            or self.participation is not None
        )


@dataclass(frozen=True)
class LoadedState:
    version: int
    generation: int
    created_at: float
    state: FedBuffState
    buffer: list[AcceptedRow]
    max_seq: dict[str, int]
    counters: dict[str, int]
    history: list[tuple[int, float, int, float | None]]
    published: list[tuple[int, str, int]]
    started_at: float
    session: int
    leases: LeaseBookState = field(default_factory=lambda: LeaseBookState((), 1))
    checkins: list[tuple[str, float]] = field(default_factory=list)  # (device, when)


class StateStore:
    """The SQLite state of one aggregator (see the module docstring)."""

    def __init__(self, state_dir: Path, *, fsync: bool = True) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / DB_NAME
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # 64 KiB pages (takes effect when the file is created): update bodies are 10 kB..MBs,
        # and large pages halve the CPU and write time per stored body (measured: 1 MB bodies
        # 6.1 -> 3.4 ms CPU each). Must precede journal_mode=WAL.
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def open_reader(self) -> sqlite3.Connection:
        """A second connection for read-only lookups from another thread (WAL readers)."""
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA query_only=1")
        return db

    # ------------------------------------------------------------------ initialisation
    def initialise(
        self,
        *,
        identity: Mapping[str, str],
        initial: FedBuffState,
        now: float,
    ) -> LoadedState:
        """Check the state dir's identity (model, num_params, algorithm) against ``identity``,
        create version 0 from ``initial`` on first use, bump the session counter, and load."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            for key, value in identity.items():
                if key in meta and meta[key] != value:
                    raise StateMismatch(
                        f"{self.path} holds state for {key}={meta[key]!r}, not {value!r}; "
                        "use another --state-dir"
                    )
            if "started_at" not in meta:
                rows = [(k, v) for k, v in identity.items()]
                rows += [("started_at", repr(now)), ("session", "0"), ("generation", "0")]
                db.executemany("INSERT INTO meta VALUES (?, ?)", rows)
                db.execute(
                    "INSERT INTO model VALUES (1, ?, 0, ?, ?)",
                    (initial.version, now, encode_state(initial)),
                )
                db.execute("INSERT INTO history VALUES (?, ?, 0, NULL)", (initial.version, now))
            db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'session'")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return self.load()

    def load(self) -> LoadedState:
        db = self._db
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        version, _generation, created_at, blob = db.execute(
            "SELECT version, generation, created_at, state FROM model WHERE id = 1"
        ).fetchone()
        current = int(meta["generation"])
        buffer = [
            AcceptedRow(g, d, s, b, n, c, bytes(body), v, at)
            for g, d, s, b, n, c, body, v, at in db.execute(
                "SELECT b.generation, b.device, b.seq, b.base_version, b.num_examples, b.codec,"
                " b.body, s.version, s.at FROM buffer b JOIN seen s"
                " ON s.device = b.device AND s.seq = b.seq"
                " WHERE b.generation = ? ORDER BY b.id",
                (current,),
            )
        ]
        return LoadedState(
            version=int(version),
            generation=current,
            created_at=float(created_at),
            state=decode_state(bytes(blob)),
            buffer=buffer,
            max_seq=dict(db.execute("SELECT device, max_seq FROM devices").fetchall()),
            counters=dict(db.execute("SELECT name, value FROM counters").fetchall()),
            history=list(
                db.execute("SELECT version, created_at, applied, accuracy FROM history ORDER BY 1")
            ),
            published=list(db.execute("SELECT version, artifact, num_chunks FROM published")),
            started_at=float(meta["started_at"]),
            session=int(meta["session"]),
            leases=self._load_leases(meta),
            checkins=[(str(d), float(at)) for d, at in db.execute("SELECT * FROM checkins")],
        )

    def _load_leases(self, meta: Mapping[str, str]) -> LeaseBookState:
        def rows(table: str) -> tuple[Lease, ...]:
            got = self._db.execute(
                f"SELECT device, lease_id, granted_at, expires_at, version FROM {table} ORDER BY 2"
            )
            return tuple(Lease(d, int(i), float(g), float(e), int(v)) for d, i, g, e, v in got)

        next_id = int(meta.get("lease_next_id", "1"))
        return LeaseBookState(rows("leases"), next_id, returned=rows("returned_leases"))

    # ------------------------------------------------------------------ writes
    def commit(self, batch: BatchRecord) -> None:
        """Write one batch atomically and durably (returns after the WAL commit)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = batch.accepted
            db.executemany(
                "INSERT INTO seen VALUES (?, ?, ?, ?)",
                [(r.device, r.seq, r.version, r.at) for r in rows],
            )
            db.executemany(
                "INSERT INTO devices VALUES (?, ?) ON CONFLICT(device)"
                " DO UPDATE SET max_seq = max(max_seq, excluded.max_seq)",
                [(r.device, r.seq) for r in rows],
            )
            if batch.snapshot is not None:
                version, created_at, state = batch.snapshot
                self._write_state(version, batch.generation, created_at, state)
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'generation'", (str(batch.generation),)
            )
            db.execute("DELETE FROM buffer WHERE generation < ?", (batch.generation,))
            db.executemany(
                "INSERT INTO buffer (generation, device, seq, base_version, num_examples, codec,"
                " body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (r.generation, r.device, r.seq, r.base_version, r.num_examples, r.codec, r.body)
                    for r in [*rows, *batch.rebuffer]
                    if r.generation == batch.generation
                ],
            )
            db.executemany(
                "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name)"
                " DO UPDATE SET value = value + excluded.value",
                list(batch.counters.items()),
            )
            db.executemany("INSERT OR REPLACE INTO history VALUES (?, ?, ?, NULL)", batch.history)
            self._write_leases(batch)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write_leases(self, batch: BatchRecord) -> None:
        """The batch's participation changes, in the open transaction (ended leases first: a
        device may end one lease and be granted the next in the same batch)."""
        changes = batch.participation
        if changes is None:
            return
        db = self._db
        db.executemany("DELETE FROM leases WHERE lease_id = ?", [(i,) for i in changes.ended])
        db.executemany("INSERT INTO leases VALUES (?, ?, ?, ?, ?)", _lease_rows(changes.granted))
        db.executemany(
            "DELETE FROM returned_leases WHERE lease_id = ?", [(i,) for i in changes.forgotten]
        )
        db.executemany(
            "INSERT OR REPLACE INTO returned_leases VALUES (?, ?, ?, ?, ?)",
            _lease_rows(changes.returned),
        )
        if changes.next_id is not None:
            db.execute(
                "INSERT INTO meta VALUES ('lease_next_id', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(changes.next_id),),
            )
        db.executemany("DELETE FROM checkins WHERE device = ?", [(d,) for d in changes.left])
        db.executemany("INSERT OR REPLACE INTO checkins VALUES (?, ?)", changes.checked_in)

    def forget_checkins(self, before: float) -> None:
        """Delete the check-ins made before ``before`` (expired: at start, one transaction)."""
        self._db.execute("DELETE FROM checkins WHERE at < ?", (before,))

    def _write_state(
        self, version: int, generation: int, created_at: float, state: FedBuffState
    ) -> None:
        """Store a snapshot in the open transaction, streaming its arrays into the blob
        (``zeroblob`` then incremental writes) instead of joining a state-sized copy first."""
        parts = state_blob_parts(state)
        db = self._db
        db.execute(
            "UPDATE model SET version = ?, generation = ?, created_at = ?, state = zeroblob(?)"
            " WHERE id = 1",
            (version, generation, created_at, sum(len(part) for part in parts)),
        )
        with db.blobopen("model", "state", 1) as blob:
            for part in parts:
                blob.write(part)

    def set_accuracy(self, version: int, accuracy: float) -> None:
        self._db.execute("UPDATE history SET accuracy = ? WHERE version = ?", (accuracy, version))

    def record_published(self, version: int, artifact: str, num_chunks: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO published VALUES (?, ?, ?)", (version, artifact, num_chunks)
        )

    def forget_published(self, entries: Iterable[tuple[int, str]]) -> None:
        self._db.executemany("DELETE FROM published WHERE version = ? AND artifact = ?", entries)

    # ------------------------------------------------------------------ maintenance
    def device_seqs(self, device: str) -> list[int]:
        """Every committed (accepted) seq of ``device``, ascending (from ``seen``)."""
        rows = self._db.execute("SELECT seq FROM seen WHERE device = ? ORDER BY seq", (device,))
        return [int(seq) for (seq,) in rows.fetchall()]

    def device_max_seq(self, device: str) -> int | None:
        """The device's high-water mark (``devices.max_seq``; None: no row)."""
        row = self._db.execute("SELECT max_seq FROM devices WHERE device = ?", (device,)).fetchone()
        return None if row is None else int(row[0])

    def set_device_max_seq(self, device: str, max_seq: int | None) -> None:
        """Overwrite the device's high-water mark (None deletes its row), in one transaction.
        ``seen`` is never touched: a committed ``(device, seq)`` stays a ``DUPLICATE``."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if max_seq is None:
                db.execute("DELETE FROM devices WHERE device = ?", (device,))
            else:
                db.execute(
                    "INSERT INTO devices VALUES (?, ?)"
                    " ON CONFLICT(device) DO UPDATE SET max_seq = excluded.max_seq",
                    (device, max_seq),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def seen_lookup(reader: sqlite3.Connection, device: str, seq: int) -> bool:
    """Whether ``(device, seq)`` was committed as accepted."""
    row = reader.execute("SELECT 1 FROM seen WHERE device = ? AND seq = ?", (device, seq))
    return row.fetchone() is not None


def wall_time() -> float:
    return time.time()


def _lease_rows(leases: Iterable[Lease]) -> list[tuple[int, str, float, float, int]]:
    return [(x.lease_id, x.device, x.granted_at, x.expires_at, x.version) for x in leases]
