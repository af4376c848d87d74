"""The on-disk update spool and the residual store: ordering, restarts, sequence numbers,
torn writes, corruption and bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.spool import (
    ResidualStore,
    SpoolCorrupt,
    SpoolFull,
    SpoolLocked,
    UpdateSpool,
)


def test_put_pending_read_remove(tmp_path: Path) -> None:
    # Arrange
    with UpdateSpool(tmp_path / "spool") as spool:
        seqs = [spool.next_seq() for _ in range(3)]

        # Act: stored out of order
        for seq in reversed(seqs):
            spool.put(seq, f"update-{seq}".encode(), {"model_version": 7, "seq": seq})

        # Assert
        assert [e.seq for e in spool.pending()] == [0, 1, 2]
        first = spool.pending()[0]
        assert first.meta == {"model_version": 7, "seq": 0}
        assert first.payload_size == len(b"update-0")
        assert spool.read(1) == b"update-1"
        assert spool.remove(1) is True
        assert spool.remove(1) is False  # a duplicate ack is harmless
        assert [e.seq for e in spool.pending()] == [0, 2]
        assert 2 in spool
        assert 1 not in spool
        assert len(spool) == 2
        stats = spool.statistics()
        assert (stats.entries, stats.puts, stats.removed, stats.next_seq) == (2, 3, 1, 3)


def test_survives_restart(tmp_path: Path) -> None:
    # Arrange
    directory = tmp_path / "spool"
    with UpdateSpool(directory) as spool:
        spool.put(spool.next_seq(), b"\x00\x01payload", {"k": "v"})
        spool.put(spool.next_seq(), b"second", {})
        size = spool.statistics().bytes

    # Act
    with UpdateSpool(directory) as reopened:
        # Assert
        assert [(e.seq, e.meta) for e in reopened.pending()] == [(0, {"k": "v"}), (1, {})]
        assert reopened.read(0) == b"\x00\x01payload"
        assert reopened.statistics().bytes == size
        assert reopened.next_seq() == 2


def test_sequence_numbers_are_never_reused(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with UpdateSpool(directory) as spool:
        seq = spool.next_seq()
        spool.put(seq, b"x", {})
        spool.remove(seq)
        allocated_only = spool.next_seq()  # allocated, never put (crash before put)
    assert (seq, allocated_only) == (0, 1)

    with UpdateSpool(directory) as spool:  # the spool is empty now
        assert len(spool) == 0
        assert spool.next_seq() == 2


def test_counter_lost_still_above_entries_on_disk(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with UpdateSpool(directory) as spool:
        for _ in range(5):
            spool.put(spool.next_seq(), b"x", {})
    (directory / "next_seq").unlink()

    with UpdateSpool(directory) as spool:
        assert spool.next_seq() == 5


def test_put_with_a_larger_seq_advances_the_counter(tmp_path: Path) -> None:
    with UpdateSpool(tmp_path) as spool:
        spool.put(41, b"x", {})
        assert spool.next_seq() == 42


def test_torn_temp_file_is_cleaned_at_start(tmp_path: Path) -> None:
    # Arrange: a crash between writing the temp file and renaming it
    directory = tmp_path / "spool"
    with UpdateSpool(directory) as spool:
        spool.put(spool.next_seq(), b"ok", {})
    torn = directory / ".u-00000000000000000001.upd.k3j2h1.tmp"
    torn.write_bytes(b"EFLSPL01 half an upd")

    # Act
    with UpdateSpool(directory) as spool:
        # Assert
        assert not torn.exists()
        assert spool.statistics().torn_cleaned == 1
        assert [e.seq for e in spool.pending()] == [0]


def test_corrupt_entry_is_dropped_at_start_and_on_read(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with UpdateSpool(directory) as spool:
        a = spool.put(spool.next_seq(), b"A" * 100, {})
        b = spool.put(spool.next_seq(), b"B" * 100, {})
    data = bytearray(a.path.read_bytes())
    data[60] ^= 0xFF  # bit rot
    a.path.write_bytes(bytes(data))

    with UpdateSpool(directory) as spool:
        assert [e.seq for e in spool.pending()] == [1]
        assert spool.statistics().corrupt_dropped == 1
        b.path.write_bytes(b.path.read_bytes()[:-3])  # damaged while we run
        with pytest.raises(SpoolCorrupt):
            spool.read(1)
        assert len(spool) == 0
        assert spool.statistics().corrupt_dropped == 2
        assert spool.next_seq() == 2  # still never reused


def test_full_by_entries_and_by_bytes(tmp_path: Path) -> None:
    with UpdateSpool(tmp_path / "a", max_entries=2) as spool:
        spool.put(spool.next_seq(), b"1", {})
        spool.put(spool.next_seq(), b"2", {})
        with pytest.raises(SpoolFull):
            spool.put(spool.next_seq(), b"3", {})
        assert spool.statistics().rejected_full == 1
        spool.remove(0)
        spool.put(spool.next_seq(), b"4", {})  # room again
        assert [e.seq for e in spool.pending()] == [1, 3]

    with UpdateSpool(tmp_path / "b", max_bytes=200) as spool:
        spool.put(spool.next_seq(), b"x" * 100, {})
        with pytest.raises(SpoolFull):
            spool.put(spool.next_seq(), b"x" * 100, {})
        assert len(spool) == 1


def test_bad_puts(tmp_path: Path) -> None:
    with UpdateSpool(tmp_path) as spool:
        spool.put(0, b"x", {})
        with pytest.raises(ValueError, match="already spooled"):
            spool.put(0, b"y", {})
        with pytest.raises(ValueError, match="non-negative"):
            spool.put(-1, b"y", {})
        with pytest.raises(ValueError, match="JSON"):
            spool.put(1, b"y", {"bad": object()})
        assert [e.seq for e in spool.pending()] == [0]


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with UpdateSpool(tmp_path), pytest.raises(SpoolLocked):
        UpdateSpool(tmp_path)
    UpdateSpool(tmp_path).close()  # released after close


def test_unrelated_files_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("hello")
    with UpdateSpool(tmp_path) as spool:
        assert len(spool) == 0
    assert (tmp_path / "README").exists()


def test_residual_store_roundtrip_corruption_and_clear(tmp_path: Path) -> None:
    # Arrange
    path = tmp_path / "state" / "residual.bin"
    store = ResidualStore(path)

    # Act / Assert
    assert store.load() is None
    store.save(b"\x01\x02\x03" * 1000)
    assert ResidualStore(path).load() == b"\x01\x02\x03" * 1000  # survives a restart
    store.save(b"")
    assert store.load() == b""
    path.write_bytes(path.read_bytes() + b"junk")
    assert store.load() is None
    assert store.corrupt == 1
    store.clear()
    assert not path.exists()
    assert store.load() is None


def test_residual_store_cleans_stale_temp_files(tmp_path: Path) -> None:
    stale = tmp_path / ".residual.bin.abc123.tmp"
    stale.write_bytes(b"half")
    ResidualStore(tmp_path / "residual.bin")
    assert not stale.exists()
