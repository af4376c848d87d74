"""The state store's model blobs (``edgefl.aggregator.store``): the raw format, the npz of earlier
releases, snapshots streamed into SQLite."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from edgefl.aggregation import FedBuff, FedBuffConfig, ServerOptimizerConfig
from edgefl.aggregator.store import BatchRecord, StateStore, decode_state, encode_state


def old_npz_blob(state: object) -> bytes:
    """How releases before the raw format stored a snapshot (np.savez with a JSON meta array)."""
    s = state
    arrays = {"weights": s.weights, "norm_history": s.norm_history}  # type: ignore[attr-defined]
    for key, value in s.optimizer_state.items():  # type: ignore[attr-defined]
        if isinstance(value, np.ndarray):
            arrays[f"opt_{key}"] = value
    scalars = {f"opt_{k}": v for k, v in s.optimizer_state.items() if not isinstance(v, np.ndarray)}  # type: ignore[attr-defined]
    meta = {
        "version": s.version, "optimizer_kind": s.optimizer_kind,  # type: ignore[attr-defined]
        "accepted_total": s.accepted_total, "clipped_total": s.clipped_total,  # type: ignore[attr-defined]
        "steps_total": s.steps_total, "rejected": s.rejected, "scalars": scalars,  # type: ignore[attr-defined]
    }  # fmt: skip
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def trained_fedbuff() -> FedBuff:
    config = FedBuffConfig(
        buffer_size=1, server_optimizer=ServerOptimizerConfig.sgd(lr=1.0, momentum=0.9)
    )
    fb = FedBuff(config, np.arange(6, dtype=np.float32))
    fb.add(np.ones(6, np.float32), base_version=0, num_examples=3)
    fb.step()
    return fb


def test_state_blob_round_trip_and_npz_of_earlier_releases() -> None:
    # Arrange
    state = trained_fedbuff().snapshot(buffer=False)

    # Act
    new = decode_state(encode_state(state))
    old = decode_state(old_npz_blob(state))

    # Assert: both formats give back the same state
    for back in (new, old):
        np.testing.assert_array_equal(back.weights, state.weights)
        np.testing.assert_array_equal(
            back.optimizer_state["momentum_buffer"], state.optimizer_state["momentum_buffer"]
        )
        assert (back.version, back.steps_total, back.accumulator) == (1, 1, None)
    assert encode_state(state)[:4] == b"EFS1"


def test_committed_snapshot_streamed_into_the_blob_loads_back_exactly(tmp_path: Path) -> None:
    # Arrange: a store at version 0, then a checkpoint (buffer included) of a later state
    fb = trained_fedbuff()
    fb.add(np.full(6, 0.5, np.float32), base_version=1, num_examples=2)
    store = StateStore(tmp_path, fsync=False)
    store.initialise(
        identity={"model": "t"},
        initial=FedBuff(fb.config, np.zeros(6, np.float32)).snapshot(buffer=False),
        now=1.0,
    )
    state = fb.snapshot()

    # Act
    store.commit(BatchRecord(generation=3, snapshot=(fb.version, 2.0, state)))
    loaded = store.load()
    blob = store.open_reader().execute("SELECT state FROM model").fetchone()[0]
    store.close()

    # Assert: the blob is byte for byte what encode_state joins, and loads back
    assert bytes(blob) == encode_state(state)
    assert (loaded.version, loaded.generation) == (fb.version, 3)
    np.testing.assert_array_equal(loaded.state.weights, state.weights)
    assert loaded.state.accumulator is not None
    assert state.accumulator is not None
    np.testing.assert_array_equal(loaded.state.accumulator, state.accumulator)
    assert loaded.state.count == 1


def test_truncated_state_blob_is_refused() -> None:
    blob = encode_state(trained_fedbuff().snapshot(buffer=False))
    with pytest.raises(ValueError, match="truncated"):
        decode_state(blob[:-5])
