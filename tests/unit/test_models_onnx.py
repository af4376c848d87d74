"""ONNX export (torch) against onnxruntime inference (torch-free)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgefl.models.onnx_export import OnnxPredictor, export_onnx, softmax
from edgefl.models.spec import get_model_spec
from edgefl.models.torch_models import build_module, init_weights, load_flat


@pytest.mark.parametrize("name", ["mnist1d-cnn", "digits-mlp"])
def test_onnx_matches_torch(name: str) -> None:
    spec = get_model_spec(name)
    flat = init_weights(spec, seed=3)
    onnx_bytes = export_onnx(spec, flat)
    assert 1_000 < len(onnx_bytes) < 100_000
    predictor = OnnxPredictor(onnx_bytes)
    assert predictor.input_shape == spec.input_shape
    module = build_module(spec)
    load_flat(module, flat)
    rng = np.random.default_rng(0)
    for batch in (1, 7, 64):  # dynamic batch axis
        x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        got = predictor.logits(x)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        proba = predictor.predict_proba(x)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(proba, softmax(want), atol=1e-5)
        np.testing.assert_array_equal(predictor.predict(x), want.argmax(axis=1))
    one = rng.normal(size=spec.input_shape).astype(np.float32)
    assert predictor.predict(one).shape == (1,)
    with pytest.raises(ValueError, match="input shape"):
        predictor.predict(np.zeros((2, 3), dtype=np.float32))


def test_export_rejects_bad_inputs() -> None:
    spec = get_model_spec("digits-mlp")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(spec, init_weights(spec, 0), opset=13)
    with pytest.raises(ValueError, match="shape"):
        export_onnx(spec, np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="ONNX"):
        OnnxPredictor(b"not a model")


def test_predictor_runs_without_torch(tmp_path: Path) -> None:
    spec = get_model_spec("mnist1d-cnn")
    path = tmp_path / "model.onnx"
    path.write_bytes(export_onnx(spec, init_weights(spec, 0)))
    code = (
        "import sys, numpy as np\n"
        "from edgefl.models.onnx_export import OnnxPredictor\n"
        f"p = OnnxPredictor(open({str(path)!r}, 'rb').read())\n"
        "assert p.predict(np.zeros((4, 1, 40), dtype=np.float32)).shape == (4,)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_concurrent_exports_from_threads_all_succeed() -> None:
    # torch's exporter has process-global state; export_onnx serialises callers
    from concurrent.futures import ThreadPoolExecutor

    spec = get_model_spec("digits-mlp")
    flat = init_weights(spec, 0)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: export_onnx(spec, flat), range(8)))

    assert len({len(r) for r in results}) == 1
    assert all(r for r in results)
