"""SQLite durability of the two secure-aggregation roles (docs/PRIVACY.md, "Persistence").

The sans-IO role (:class:`~edgefl.secagg.SecAggLeader`, :class:`~edgefl.secagg.SecAggHelper`) is
the source of truth; after every change the service calls ``write(before, after)`` with the
role's snapshots from before and after the change, and the store writes the **difference** in
one transaction (rows of shares, announcements, closed keys, seeds and answered decisions;
the small rest as JSON in ``meta``). The service acknowledges a message, or publishes what the
change enables, only after ``write`` returned: the broker redelivers anything not yet durable,
and the roles answer a redelivery idempotently (a duplicate, or the same report or partial).

The leader's file also holds the model (version and :class:`~edgefl.aggregation.FedBuffState`,
encoded as the aggregator's state store does), written **in the same transaction** as the
combine that stepped it: an accepted update is either in an open decision, or in a committed
step, never both and never neither. With central DP the participation counts
(:class:`~edgefl.privacy.PrivacyState`, ``meta.privacy``) are written in that transaction too,
so a device's count and the step that released its update are durable together. Every
committed version gets a ``history`` row (version, created_at) in that transaction too; its
held-out ``accuracy`` (``--eval-dataset``) is filled in later by :meth:`LeaderStore.set_accuracy`,
as in the plaintext aggregator's history.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefl.aggregation import FedBuffState
from edgefl.aggregator.store import decode_state, encode_state
from edgefl.privacy import PrivacyState
from edgefl.secagg import (
    BufferDecision,
    HeldSeed,
    HelperSnapshot,
    LeaderSnapshot,
    PendingShare,
    UpdateKey,
)

__all__ = ["HelperStore", "LeaderStore", "ModelRow"]

_LEADER_SCHEMA = """
CREATE TABLE IF NOT EXISTS secagg_share (
    device TEXT NOT NULL, seq INTEGER NOT NULL, weight INTEGER NOT NULL, arrived REAL NOT NULL,
    helper_ok INTEGER NOT NULL, open INTEGER NOT NULL, masked BLOB NOT NULL,
    PRIMARY KEY (device, seq));
CREATE TABLE IF NOT EXISTS secagg_announced (
    device TEXT NOT NULL, seq INTEGER NOT NULL, arrived REAL NOT NULL, PRIMARY KEY (device, seq));
CREATE TABLE IF NOT EXISTS secagg_closed (
    n INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, seq INTEGER NOT NULL,
    why TEXT NOT NULL, UNIQUE (device, seq));
CREATE TABLE IF NOT EXISTS secagg_device (device TEXT PRIMARY KEY, max_seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS model (
    id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, created_at REAL NOT NULL,
    state BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    version INTEGER PRIMARY KEY, created_at REAL NOT NULL, accuracy REAL);
"""

_HELPER_SCHEMA = """
CREATE TABLE IF NOT EXISTS secagg_seed (
    device TEXT NOT NULL, seq INTEGER NOT NULL, arrived REAL NOT NULL, sealed BLOB NOT NULL,
    PRIMARY KEY (device, seq));
CREATE TABLE IF NOT EXISTS secagg_answered (buffer_id INTEGER PRIMARY KEY, decision TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _connect(path: Path, schema: str, *, fsync: bool) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
    db.executescript(schema)
    return db


class _Store:
    """One SQLite file in WAL mode; ``meta`` is a key/value table of JSON values."""

    def __init__(self, path: Path, schema: str, *, fsync: bool) -> None:
        self.path = path
        self._db = _connect(path, schema, fsync=fsync)

    def close(self) -> None:
        self._db.close()

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def _put_meta(self, values: Mapping[str, Any]) -> None:
        self._db.executemany(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()],
        )

    def next_session(self) -> int:
        """Bump and return the session counter (one per start of the service)."""
        session = int(self.meta().get("session", 0)) + 1
        self._db.execute("BEGIN IMMEDIATE")
        self._put_meta({"session": session})
        self._db.execute("COMMIT")
        return session

    def check_identity(self, identity: Mapping[str, Any]) -> None:
        """Refuse a file made for another fleet, model or ring (``ValueError``); stamp a new one."""
        stored = self.meta().get("identity")
        if stored is None:
            self._db.execute("BEGIN IMMEDIATE")
            self._put_meta({"identity": dict(identity)})
            self._db.execute("COMMIT")
        elif stored != dict(identity):
            raise ValueError(f"{self.path} belongs to {stored}, not {dict(identity)}")


def _keys(items: Iterable[Any]) -> list[list[Any]]:
    return [[k[0], k[1]] for k in items]


def _tuple_keys(items: Iterable[Any]) -> tuple[UpdateKey, ...]:
    return tuple((str(d), int(s)) for d, s in items)


@dataclass(frozen=True)
class ModelRow:
    """The leader's committed model: ``version``, ``created_at`` (wall clock), the state."""

    version: int
    created_at: float
    state: FedBuffState


def _sync_rows(
    db: sqlite3.Connection,
    table: str,
    insert: str,
    old: Mapping[UpdateKey, Any],
    new: Mapping[UpdateKey, Any],
) -> None:
    """Delete the rows of keys only in ``old``, insert ``(device, seq, *values)`` for keys only
    in ``new`` (``insert``: the statement up to ``VALUES``; a value that is not a tuple is one
    column)."""
    db.executemany(
        f"DELETE FROM {table} WHERE device = ? AND seq = ?", [k for k in old if k not in new]
    )
    rows = [(k[0], k[1], *(v if isinstance(v, tuple) else (v,))) for k, v in new.items()]
    added = [row for row, k in zip(rows, new, strict=True) if k not in old]
    if added:
        marks = ", ".join("?" * len(added[0]))
        db.executemany(f"{insert} VALUES ({marks})", added)


class LeaderStore(_Store):
    """The leader's file (``secagg-leader.sqlite``): shares, membership state and the model."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        super().__init__(path, _LEADER_SCHEMA, fsync=fsync)

    def load(self) -> tuple[LeaderSnapshot | None, ModelRow | None]:
        """The persisted state (``None, None`` for a new file)."""
        db = self._db
        row = db.execute("SELECT version, created_at, state FROM model WHERE id = 1").fetchone()
        model = None if row is None else ModelRow(int(row[0]), float(row[1]), decode_state(row[2]))
        meta = self.meta()
        if "next_buffer_id" not in meta:
            return None, model
        shares = {
            (d, s): (PendingShare((d, s), bytes(m), w, a, bool(ok)), bool(is_open))
            for d, s, w, a, ok, is_open, m in db.execute(
                "SELECT device, seq, weight, arrived, helper_ok, open, masked FROM secagg_share"
            )
        }
        decision = meta.get("open_decision")
        open_decision = None if decision is None else BufferDecision.from_json(decision.encode())
        members = () if open_decision is None else open_decision.members
        snapshot = LeaderSnapshot(
            next_buffer_id=int(meta["next_buffer_id"]),
            pending=tuple(p for p, is_open in shares.values() if not is_open),
            complete=_tuple_keys(meta["complete"]),
            announced=tuple(
                ((d, s), a) for d, s, a in db.execute("SELECT * FROM secagg_announced")
            ),
            closed=tuple(
                ((d, s), why)
                for d, s, why in db.execute("SELECT device, seq, why FROM secagg_closed ORDER BY n")
            ),
            drops=_tuple_keys(meta["drops"]),
            open_decision=open_decision,
            open_shares=tuple(shares[k][0] for k in members),
            counts=meta["counts"],
            accepted_total=int(meta["accepted"]),
            combined_total=int(meta["combined"]),
        )
        return snapshot, model

    def _sync(
        self, table: str, insert: str, old: Mapping[UpdateKey, Any], new: Mapping[UpdateKey, Any]
    ) -> None:
        _sync_rows(self._db, table, insert, old, new)

    def max_seqs(self) -> dict[str, int]:
        """The highest seq accepted of every device (the replay rule)."""
        return dict(self._db.execute("SELECT device, max_seq FROM secagg_device"))

    def refused(self) -> dict[str, int]:
        """The leader's refusals before the role (stale, replayed, ...), by reason."""
        return {str(k): int(v) for k, v in self.meta().get("refused", {}).items()}

    def privacy(self) -> PrivacyState | None:
        """Central DP's participation counts (None: the file was never run with DP)."""
        stored = self.meta().get("privacy")
        return None if stored is None else PrivacyState.from_json(stored)

    def history(self) -> list[tuple[int, float, float | None]]:
        """The committed versions, oldest first: (version, created_at, accuracy or None)."""
        rows = self._db.execute("SELECT version, created_at, accuracy FROM history ORDER BY 1")
        return [(int(v), float(c), None if a is None else float(a)) for v, c, a in rows]

    def last_accuracy(self) -> float | None:
        """The held-out accuracy of the newest evaluated version (None: none evaluated)."""
        row = self._db.execute(
            "SELECT accuracy FROM history WHERE accuracy IS NOT NULL ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return None if row is None else float(row[0])

    def set_accuracy(self, version: int, accuracy: float) -> None:
        """Record the held-out accuracy measured for committed ``version``."""
        self._db.execute("UPDATE history SET accuracy = ? WHERE version = ?", (accuracy, version))

    def write(
        self,
        before: LeaderSnapshot | None,
        after: LeaderSnapshot,
        *,
        model: ModelRow | None = None,
        device_seq: tuple[str, int] | None = None,
        refused: Mapping[str, int] | None = None,
        privacy: PrivacyState | None = None,
    ) -> None:
        """Write the change from ``before`` to ``after`` in one transaction, with the new
        ``model``, a device's new highest seq, the refusal counters and central DP's
        participation counts when given."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if device_seq is not None:
                db.execute("INSERT OR REPLACE INTO secagg_device VALUES (?, ?)", device_seq)
            if refused is not None:
                self._put_meta({"refused": dict(refused)})
            if privacy is not None:
                self._put_meta({"privacy": privacy.to_json()})
            self._write_shares(before, after)
            old_ann = dict(before.announced) if before is not None else {}
            self._sync(
                "secagg_announced", "INSERT INTO secagg_announced", old_ann, dict(after.announced)
            )
            old_closed = dict(before.closed) if before is not None else {}
            new_closed = dict(after.closed)
            insert = "INSERT INTO secagg_closed (device, seq, why)"
            # a key closed again (an aborted decision's excluded member) moves to the end, as
            # in the role's memory: delete it, the sync below inserts it again
            again = {k for k, why in new_closed.items() if old_closed.get(k, why) != why}
            old_closed = {k: v for k, v in old_closed.items() if k not in again}
            db.executemany("DELETE FROM secagg_closed WHERE device = ? AND seq = ?", list(again))
            self._sync("secagg_closed", insert, old_closed, new_closed)
            decision = after.open_decision
            self._put_meta(
                {
                    "next_buffer_id": after.next_buffer_id,
                    "complete": _keys(after.complete),
                    "drops": _keys(after.drops),
                    "open_decision": None if decision is None else decision.to_json().decode(),
                    "counts": dict(after.counts),
                    "accepted": after.accepted_total,
                    "combined": after.combined_total,
                }
            )
            if model is not None:
                db.execute(
                    "INSERT OR REPLACE INTO model VALUES (1, ?, ?, ?)",
                    (model.version, model.created_at, encode_state(model.state)),
                )
                db.execute(
                    "INSERT OR IGNORE INTO history VALUES (?, ?, NULL)",
                    (model.version, model.created_at),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write_shares(self, before: LeaderSnapshot | None, after: LeaderSnapshot) -> None:
        def rows(snap: LeaderSnapshot | None) -> dict[UpdateKey, tuple[PendingShare, bool]]:
            if snap is None:
                return {}
            out = {p.key: (p, False) for p in snap.pending}
            out.update((p.key, (p, True)) for p in snap.open_shares)
            return out

        old, new = rows(before), rows(after)
        db = self._db
        db.executemany(
            "DELETE FROM secagg_share WHERE device = ? AND seq = ?",
            [k for k in old if k not in new],
        )
        db.executemany(
            "INSERT INTO secagg_share VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (k[0], k[1], p.weight, p.arrived, p.helper_ok, is_open, p.masked)
                for k, (p, is_open) in new.items()
                if k not in old
            ],
        )
        db.executemany(
            "UPDATE secagg_share SET helper_ok = ?, open = ? WHERE device = ? AND seq = ?",
            [
                (p.helper_ok, is_open, k[0], k[1])
                for k, (p, is_open) in new.items()
                if k in old and (old[k][0].helper_ok, old[k][1]) != (p.helper_ok, is_open)
            ],
        )


class HelperStore(_Store):
    """The helper's file (``secagg-helper.sqlite``): sealed seeds (sealed at rest), answered
    decisions, the highest decision id and counters."""

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        super().__init__(path, _HELPER_SCHEMA, fsync=fsync)

    def load(self) -> HelperSnapshot | None:
        meta = self.meta()
        if "last_buffer_id" not in meta:
            return None
        db = self._db
        return HelperSnapshot(
            seeds=tuple(
                HeldSeed((d, s), bytes(sealed), a)
                for d, s, a, sealed in db.execute("SELECT * FROM secagg_seed")
            ),
            answered=tuple(
                BufferDecision.from_json(text.encode())
                for (text,) in db.execute("SELECT decision FROM secagg_answered ORDER BY buffer_id")
            ),
            last_buffer_id=int(meta["last_buffer_id"]),
            counts=meta["counts"],
            accepted_total=int(meta["accepted"]),
        )

    def write(self, before: HelperSnapshot | None, after: HelperSnapshot) -> None:
        """Write the change from ``before`` to ``after`` in one transaction."""
        old = {h.key: h for h in before.seeds} if before is not None else {}
        new = {h.key: h for h in after.seeds}
        old_ids = {d.buffer_id for d in before.answered} if before is not None else set()
        new_ids = {d.buffer_id: d for d in after.answered}
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            _sync_rows(
                db,
                "secagg_seed",
                "INSERT INTO secagg_seed",
                old,
                {k: (h.arrived, h.sealed) for k, h in new.items()},
            )
            db.executemany(
                "DELETE FROM secagg_answered WHERE buffer_id = ?",
                [(i,) for i in old_ids if i not in new_ids],
            )
            db.executemany(
                "INSERT INTO secagg_answered VALUES (?, ?)",
                [(i, d.to_json().decode()) for i, d in new_ids.items() if i not in old_ids],
            )
            self._put_meta(
                {
                    "last_buffer_id": after.last_buffer_id,
                    "counts": dict(after.counts),
                    "accepted": after.accepted_total,
                }
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
