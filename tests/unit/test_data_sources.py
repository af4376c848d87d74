"""Device data sources: npz, CSV, Python entry point; errors name the problem."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgefl.data.sources import (
    CsvSource,
    DataSource,
    DataSourceError,
    EntryPointSource,
    NpzSource,
    fit_to_spec,
    source_from_string,
)
from edgefl.models.spec import get_model_spec


def test_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x = np.random.default_rng(0).normal(size=(5, 1, 40))
    np.savez(path, x=x, y=np.array([0, 1, 2, 3, 4]))
    src = NpzSource(path)
    assert isinstance(src, DataSource)
    xa, ya = src.load()
    assert xa.dtype == np.float32
    assert xa.shape == (5, 1, 40)
    assert ya.dtype == np.int64
    np.savez(tmp_path / "k.npz", feats=x, labels=np.arange(5))
    assert NpzSource(tmp_path / "k.npz", x_key="feats", y_key="labels").load()[0].shape[0] == 5
    with pytest.raises(DataSourceError, match=r"missing array.*\['x', 'y'\].*feats"):
        NpzSource(tmp_path / "k.npz").load()
    with pytest.raises(DataSourceError, match="not found"):
        NpzSource(tmp_path / "nope.npz").load()
    (tmp_path / "bad.npz").write_bytes(b"nonsense")
    with pytest.raises(DataSourceError, match="not a readable"):
        NpzSource(tmp_path / "bad.npz").load()
    np.savez(tmp_path / "m.npz", x=x, y=np.arange(4))
    with pytest.raises(DataSourceError, match="5 rows but y has 4"):
        NpzSource(tmp_path / "m.npz").load()
    np.savez(tmp_path / "n.npz", x=np.full((5, 2), np.nan), y=np.arange(5))
    with pytest.raises(DataSourceError, match="NaN"):
        NpzSource(tmp_path / "n.npz").load()


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,label,b\n0.5,1,2\n1.5,0,3\n\n")
    x, y = CsvSource(path).load()
    np.testing.assert_array_equal(x, [[0.5, 2.0], [1.5, 3.0]])
    np.testing.assert_array_equal(y, [1, 0])
    x2, _ = CsvSource(path, label_column=1, shape=(2, 1)).load()
    assert x2.shape == (2, 2, 1)
    nohdr = tmp_path / "n.csv"
    nohdr.write_text("1;0.1;0.2\n0;0.3;0.4\n")
    _, y3 = CsvSource(nohdr, label_column=0, delimiter=";", has_header=False).load()
    np.testing.assert_array_equal(y3, [1, 0])
    with pytest.raises(DataSourceError, match=r"no label column 'y'.*\['a', 'label', 'b'\]"):
        CsvSource(path, label_column="y").load()
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,0\nfoo,1\n")
    with pytest.raises(DataSourceError, match=r"line 3, column 'a': 'foo' is not a number"):
        CsvSource(bad).load()
    ragged = tmp_path / "r.csv"
    ragged.write_text("a,label\n1,0\n1,2,3\n")
    with pytest.raises(DataSourceError, match="line 3 has 3 columns"):
        CsvSource(ragged).load()
    frac = tmp_path / "f.csv"
    frac.write_text("a,label\n1,0.5\n")
    with pytest.raises(DataSourceError, match="non-integer"):
        CsvSource(frac).load()
    with pytest.raises(DataSourceError, match="reshaped"):
        CsvSource(path, shape=(3,)).load()
    with pytest.raises(DataSourceError, match="not found"):
        CsvSource(tmp_path / "none.csv").load()


def test_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mydata_ep.py").write_text(
        "import numpy as np\n"
        "def good():\n    return np.ones((3, 4)), np.array([0, 1, 1])\n"
        "def wrong():\n    return [1, 2, 3]\n"
        "def boom():\n    raise RuntimeError('sensor offline')\n"
        "class Ns:\n    @staticmethod\n    def load():\n        return good()\n"
        "not_callable = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    x, _ = EntryPointSource("mydata_ep:good").load()
    assert x.shape == (3, 4)
    assert EntryPointSource("mydata_ep:Ns.load").load()[1].tolist() == [0, 1, 1]
    cases = {
        "mydata_ep": "expected 'module:function'",
        "no_such_module_xyz:f": "cannot import module",
        "mydata_ep:missing": "no attribute",
        "mydata_ep:not_callable": "not callable",
        "mydata_ep:wrong": "must return a tuple",
        "mydata_ep:boom": "RuntimeError: sensor offline",
    }
    for spec, msg in cases.items():
        with pytest.raises(DataSourceError, match=msg):
            EntryPointSource(spec).load()
    sys.modules.pop("mydata_ep", None)


def test_source_from_string_and_fit_to_spec(tmp_path: Path) -> None:
    assert isinstance(source_from_string("npz:/a/b"), NpzSource)
    assert isinstance(source_from_string("/a/b.csv"), CsvSource)
    assert isinstance(source_from_string("entrypoint:pkg.mod:fn"), EntryPointSource)
    with pytest.raises(DataSourceError, match="cannot tell"):
        source_from_string("/a/b.parquet")
    spec = get_model_spec("mnist1d-cnn")
    x = np.zeros((2, 40), dtype=np.float32)
    y = np.array([0, 9], dtype=np.int64)
    xs, _ = fit_to_spec(x, y, spec)
    assert xs.shape == (2, 1, 40)
    with pytest.raises(DataSourceError, match="expects"):
        fit_to_spec(np.zeros((2, 39), dtype=np.float32), y, spec)
    with pytest.raises(DataSourceError, match="label 10 out of range"):
        fit_to_spec(x, np.array([0, 10]), spec)
