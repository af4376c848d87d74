"""ONNX export (torch side) and ONNX inference (onnxruntime side, no torch).

:func:`export_onnx` imports torch inside the function; :class:`OnnxPredictor` imports only
numpy and onnxruntime, so a device can run inference on the current model without torch.

The exported graph has one input ``"input"`` of shape ``(batch, *spec.input_shape)`` float32 and
one output ``"logits"`` of shape ``(batch, spec.num_classes)``; the batch axis is dynamic.
Probabilities are computed from the logits in numpy (softmax), not in the graph.
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.models.spec import ModelSpec

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "OnnxPredictor", "export_onnx"]

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

# torch's TorchScript exporter keeps process-global state (GLOBALS.in_onnx_export) and asserts
# that no other export is running: exports from several threads (an aggregator's publisher, a
# test's leftover thread) must take turns.
_EXPORT_LOCK = threading.Lock()


def export_onnx(spec: ModelSpec, flat: NDArray[np.float32], *, opset: int = DEFAULT_OPSET) -> bytes:
    """Serialise the model ``spec`` with weights ``flat`` to ONNX bytes.

    Uses the TorchScript exporter (``dynamo=False``; the dynamo exporter needs ``onnxscript``).
    ``opset`` must be >= 17. Leaves torch's global RNG state untouched. Thread-safe (exports are
    serialised: torch's exporter has process-global state). Raises ``ValueError`` for a flat
    vector that does not fit the spec.
    """
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} < {DEFAULT_OPSET} is not supported")
    flat = spec.check_flat(flat)
    import torch

    from edgefl.models.torch_models import build_module, load_flat

    with torch.random.fork_rng(devices=[]):
        module = build_module(spec)
    load_flat(module, flat)
    module.eval()
    dummy = torch.zeros((1, *spec.input_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module,
            (dummy,),
            buf,  # type: ignore[arg-type]  # file-like objects are accepted at run time
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    return buf.getvalue()


def softmax(logits: NDArray[np.float32]) -> NDArray[np.float32]:
    """Numerically stable softmax over the last axis."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: NDArray[np.float32] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return out


class OnnxPredictor:
    """Inference on an exported model with onnxruntime's CPU provider (torch-free).

    ``threads`` bounds onnxruntime's intra-op thread pool (default 1: a device shares its CPU).
    Inputs are ``(batch, *input_shape)`` or one sample ``input_shape`` (treated as a batch of 1);
    outputs always have a batch axis.
    """

    def __init__(self, onnx_bytes: bytes, *, threads: int = 1) -> None:
        import onnxruntime as ort

        if threads < 1:
            raise ValueError("threads must be >= 1")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self._session: Any = ort.InferenceSession(
                onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own, unexported exception types
            raise ValueError(f"not a loadable ONNX model: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"expected a model with one input, got {len(inputs)}")
        self._input_name: str = inputs[0].name
        dims = inputs[0].shape[1:]
        if not all(isinstance(d, int) for d in dims):
            raise ValueError(f"model input must have a fixed per-sample shape, got {dims}")
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in dims)

    def _batch(self, x: NDArray[Any]) -> NDArray[np.float32]:
        arr = np.ascontiguousarray(x, dtype=np.float32)
        if arr.shape == self.input_shape:
            arr = arr[None]
        if arr.shape[1:] != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"input shape {arr.shape} does not fit (batch, {want})")
        return arr

    def logits(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Raw model outputs ``(batch, num_classes)``."""
        out = self._session.run(None, {self._input_name: self._batch(x)})[0]
        result: NDArray[np.float32] = np.asarray(out, dtype=np.float32)
        return result

    def predict_proba(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Class probabilities ``(batch, num_classes)``, rows sum to 1."""
        return softmax(self.logits(x))

    def predict(self, x: NDArray[Any]) -> NDArray[np.int64]:
        """Most likely class per sample, ``(batch,)`` int64."""
        out: NDArray[np.int64] = self.logits(x).argmax(axis=-1).astype(np.int64)
        return out
