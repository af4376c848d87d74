"""Local inference on the kept ONNX export matches torch; a model without ONNX says so; the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from agent_files import run_edgefl
from typer.testing import CliRunner

from device_agent.cli import agent_app
from device_agent.fetch import ModelFetch
from device_agent.model_store import CurrentModel, ModelStore
from device_agent.predict import LocalModel, NoModel, NoOnnxModel, load_input, predict
from device_agent.release import model_release
from edgefl.models.onnx_export import export_onnx
from edgefl.models.spec import get_model_spec, init_weights_numpy
from edgefl.protocol.topics import ModelChunkTopic, parse_topic

SPEC = get_model_spec("digits-mlp")


def install(state: Path, *, with_onnx: bool) -> np.ndarray:
    weights = init_weights_numpy(SPEC, 5)
    onnx = export_onnx(SPEC, weights) if with_onnx else None
    rel = model_release("f", 3, "digits-mlp", weights, onnx=onnx)
    fetch = ModelFetch(rel.manifest, rel.messages[-1][1], max_packet=1 << 18)
    model: CurrentModel | None = None
    for topic, payload in rel.messages[:-1]:
        parsed = parse_topic(topic)
        assert isinstance(parsed, ModelChunkTopic)
        model = fetch.offer(parsed, payload) or model
    assert model is not None
    ModelStore(state / "model").install(model)
    return weights


def torch_logits(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    import torch

    from edgefl.models.torch_models import build_module, load_flat

    module = build_module(SPEC)
    load_flat(module, weights)
    module.eval()
    with torch.no_grad():
        out: np.ndarray = module(torch.from_numpy(x)).numpy()
    return out


def test_onnx_inference_on_the_held_model_matches_torch(tmp_path: Path) -> None:
    # Arrange
    weights = install(tmp_path, with_onnx=True)
    x = np.random.default_rng(0).random((7, 64), dtype=np.float32)

    # Act
    model = LocalModel(tmp_path)
    result = model.predict(x)

    # Assert
    expected = torch_logits(weights, x)
    np.testing.assert_allclose(model.logits(x), expected, atol=1e-5)
    np.testing.assert_array_equal(result.labels, expected.argmax(axis=1))
    assert result.model_version == 3
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert predict(tmp_path, x[0]).labels.shape == (1,)  # one sample is a batch of one


def test_model_without_onnx_is_reported_clearly(tmp_path: Path) -> None:
    with pytest.raises(NoModel):
        LocalModel(tmp_path)
    install(tmp_path, with_onnx=False)
    with pytest.raises(NoOnnxModel, match=r"v3 .*no ONNX export"):
        LocalModel(tmp_path)


def test_load_input_reads_npy_and_csv_with_header(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, 64), dtype=np.float64))
    (tmp_path / "x.csv").write_text("a,b,c\n1,2,3\n4,5,6\n")
    (tmp_path / "bad.csv").write_text("1,2\n3,oops\n")

    assert load_input(tmp_path / "x.npy").shape == (2, 64)
    np.testing.assert_array_equal(load_input(tmp_path / "x.csv"), [[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="non-numeric"):
        load_input(tmp_path / "bad.csv")


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "EDGEFL_FLEET": "f",
        "EDGEFL_DEVICE_ID": "d1",
        "EDGEFL_BROKER__URL": "mqtt://127.0.0.1:1883",
        "EDGEFL_DATA__KIND": "npz",
        "EDGEFL_DATA__PATH": str(tmp_path / "data.npz"),
        "EDGEFL_STATE_DIR": str(tmp_path),
    }


def test_cli_predict_prints_one_label_per_row(tmp_path: Path) -> None:
    # Arrange
    weights = install(tmp_path, with_onnx=True)
    x = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)

    # Act
    out = CliRunner().invoke(
        agent_app, ["predict", "--input", str(tmp_path / "x.npy")], env=_env(tmp_path)
    )

    # Assert
    assert out.exit_code == 0, out.output
    labels = [int(line) for line in out.stdout.split()]
    assert labels == list(torch_logits(weights, x).argmax(axis=1))


def test_cli_check_config_names_the_bad_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    np.savez(tmp_path / "data.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))

    ok = run_edgefl(["agent", "check-config", "--json"], _env(tmp_path), monkeypatch, capsys)
    bad = run_edgefl(
        ["agent", "check-config", "--set", "training.max_threads=0"],
        _env(tmp_path),
        monkeypatch,
        capsys,
    )

    assert ok[0] == 0, ok[2]
    assert '"fleet": "f"' in ok[1]
    assert bad[0] == 78
    assert "training.max_threads" in bad[2]


def test_cli_run_refuses_a_bad_config_with_status_78(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    env = _env(tmp_path) | {"EDGEFL_TRAINING__ISOLATION": "container"}

    default = run_edgefl(["agent"], env, monkeypatch, capsys)
    explicit = run_edgefl(["agent", "run"], env, monkeypatch, capsys)

    for code, _, err in (default, explicit):
        assert code == 78
        assert "training.isolation" in err
        assert "'thread', 'process'" in err
