"""Model registry and flat-vector layouts (torch-free).

Import :mod:`edgefl.models.torch_models` for torch modules and flat <-> state-dict conversion,
and :mod:`edgefl.models.onnx_export` for ONNX export (torch) and inference (onnxruntime only).
Importing this package never imports torch.
"""

from __future__ import annotations

from edgefl.models.spec import (
    ModelSpec,
    TensorSpec,
    get_model_spec,
    init_weights_numpy,
    list_models,
    suggested_dataset,
)

__all__ = [
    "ModelSpec",
    "TensorSpec",
    "get_model_spec",
    "init_weights_numpy",
    "list_models",
    "suggested_dataset",
]
