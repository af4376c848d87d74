"""Local data for the agent: sources from the [data] section, a stable held-out split."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.config import DataConfig, DataKind
from device_agent.dataset import LocalDataset, load_local_dataset
from edgefl.data.sources import DataSourceError


def test_split_is_deterministic_disjoint_and_sized() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = np.arange(10, dtype=np.int64)

    a = LocalDataset.split(x, y, 0.3, seed=4)
    b = LocalDataset.split(x, y, 0.3, seed=4)

    assert (a.num_train, a.num_test) == (7, 3)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert sorted([*a.y_train.tolist(), *a.y_test.tolist()]) == list(range(10))
    np.testing.assert_array_equal(a.x_train[:, 0] / 2, a.y_train)  # rows stay paired
    assert LocalDataset.split(x[:1], y[:1], 0.9, seed=0).num_train == 1  # never empty


def test_npz_csv_and_entrypoint_with_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange
    np.savez(tmp_path / "d.npz", feats=np.ones((5, 3)), labels=np.arange(5))
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,4,1\n5,6,1\n")
    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def load(path):\n"
        "    n = len(open(path).read().split())\n"
        "    return np.zeros((n, 2)), np.zeros(n, dtype=int)\n"
    )
    (tmp_path / "words.txt").write_text("a b c d")
    monkeypatch.syspath_prepend(str(tmp_path))

    # Act
    npz = load_local_dataset(
        DataConfig(DataKind.NPZ, path=tmp_path / "d.npz", x_key="feats", y_key="labels"),
        0.2,
        "dev",
    )
    csv = load_local_dataset(DataConfig(DataKind.CSV, path=tmp_path / "d.csv"), 0.0, "dev")
    entry = load_local_dataset(
        DataConfig(DataKind.ENTRYPOINT, entrypoint="mydata:load", path=tmp_path / "words.txt"),
        0.25,
        "dev",
    )

    # Assert
    assert (npz.num_train, npz.num_test) == (4, 1)
    assert sorted(csv.y_train.tolist()) == [0, 1, 1]
    assert csv.x_train.shape == (3, 2)
    assert (entry.num_train, entry.num_test) == (3, 1)
    sys.modules.pop("mydata", None)


def test_missing_file_is_a_clear_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="not found"):
        load_local_dataset(DataConfig(DataKind.NPZ, path=tmp_path / "nope.npz"), 0.2, "dev")
