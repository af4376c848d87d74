"""Offline maintenance of an aggregator state directory: ``edgefl aggregator reset-device``.

A device whose high-water mark (``devices.max_seq``) is far above its real counter is locked
out: every genuine update is a ``REPLAY``. The sequence window (``max_seq_jump``, see
:mod:`edgefl.protocol.sequence`) makes that impossible for new state, but a database written
before the window existed (or with a wider window) may hold one. :func:`reset_device` repairs
it: it reads the device's committed seqs from ``seen`` and stores
:func:`~edgefl.protocol.sequence.recovered_high_water` (or the operator's ``to``) as the mark,
deleting the row when nothing is reachable. ``seen`` is never changed, so every committed
``(device, seq)`` stays a ``DUPLICATE``: nothing can be counted twice.

It takes the state directory's lock (:mod:`~edgefl.aggregator.statelock`) and refuses while an
aggregator runs: the service keeps the marks in memory and would ignore the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefl.aggregator.statelock import StateDirLock
from edgefl.aggregator.store import DB_NAME, StateStore
from edgefl.protocol.sequence import recovered_high_water

__all__ = ["NoState", "ResetResult", "reset_device"]


class NoState(FileNotFoundError):
    """The directory holds no aggregator state."""


@dataclass(frozen=True)
class ResetResult:
    """What :func:`reset_device` did."""

    device: str
    committed: int  # committed updates of the device in ``seen`` (unchanged)
    highest_committed: int | None  # the largest of them
    before: int | None  # the mark before (None: no row)
    after: int | None  # the mark now (None: row deleted: any seq below max_seq_jump is new)

    @property
    def changed(self) -> bool:
        return self.before != self.after


def reset_device(
    state_dir: Path, device: str, *, max_seq_jump: int, to: int | None = None
) -> ResetResult:
    """Reset ``device``'s high-water mark in ``state_dir`` (see the module docstring).

    Raises :class:`NoState` when there is no ``state.sqlite``,
    :class:`~edgefl.aggregator.statelock.StateDirBusy` while an aggregator holds the lock.
    """
    if not (Path(state_dir) / DB_NAME).is_file():
        raise NoState(f"no aggregator state in {str(state_dir)!r} ({DB_NAME} missing)")
    with StateDirLock(state_dir):
        store = StateStore(Path(state_dir))
        try:
            seqs = store.device_seqs(device)
            before = store.device_max_seq(device)
            after = recovered_high_water(seqs, max_seq_jump) if to is None else to
            if after != before:
                store.set_device_max_seq(device, after)
        finally:
            store.close()
    return ResetResult(
        device=device,
        committed=len(seqs),
        highest_committed=seqs[-1] if seqs else None,
        before=before,
        after=after,
    )
