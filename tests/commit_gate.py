"""Hold the aggregator's commits on a gate: what the service does while a batch is committing.

``with gated_commits(monkeypatch, lambda batch: bool(batch.accepted)) as gate:`` makes every
``StateStore.commit`` of a matching batch set ``gate.entered`` and wait (in the writer thread)
until ``gate.opened`` is set (at most 10 s; the gate opens on exit too, so a failing test never
hangs the writer).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from edgefl.aggregator.store import BatchRecord, StateStore


@dataclass
class CommitGate:
    entered: threading.Event = field(default_factory=threading.Event)
    opened: threading.Event = field(default_factory=threading.Event)


@contextlib.contextmanager
def gated_commits(
    monkeypatch: pytest.MonkeyPatch, when: Callable[[BatchRecord], bool]
) -> Iterator[CommitGate]:
    gate = CommitGate()
    real_commit = StateStore.commit

    def gated_commit(self: StateStore, batch: BatchRecord) -> None:
        if when(batch):
            gate.entered.set()
            gate.opened.wait(10)
        real_commit(self, batch)

    monkeypatch.setattr(StateStore, "commit", gated_commit)
    try:
        yield gate
    finally:
        gate.opened.set()
