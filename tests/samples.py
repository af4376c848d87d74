"""Small valid protocol messages for tests: one place that knows every required field.

Each factory fills the fields a test does not care about with plain values and takes any field
as a keyword to override it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from edgefl.protocol.messages import ModelFormat, ModelManifest, UpdateHeader

CREATED_AT = 1_700_000_000.0


def update_header(**fields: Any) -> UpdateHeader:
    """An update header of device ``dev-a`` for a 4-parameter model ``tiny``; ``fields``
    override any field."""
    values: dict[str, Any] = {
        "fleet": "lab",
        "device_id": "dev-a",
        "seq": 3,
        "base_version": 0,
        "num_examples": 32,
        "model": "tiny",
        "codec": {"format": 1},
        "num_params": 4,
        "created_at": CREATED_AT,
    }
    return UpdateHeader(**{**values, **fields})


def fp32_manifest(num_params: int = 4, **fields: Any) -> ModelManifest:
    """A one-chunk ``FP32_FLAT`` manifest of a ``num_params`` model ``tiny`` whose weights are
    all zero (``sha256`` and ``size`` describe those bytes); ``fields`` override any field."""
    size = 4 * num_params
    values: dict[str, Any] = {
        "fleet": "lab",
        "version": 1,
        "model": "tiny",
        "format": ModelFormat.FP32_FLAT,
        "sha256": hashlib.sha256(bytes(size)).hexdigest(),
        "size": size,
        "chunk_size": size,
        "num_chunks": 1,
        "num_params": num_params,
        "created_at": CREATED_AT,
    }
    return ModelManifest(**{**values, **fields})
