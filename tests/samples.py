"""Small valid protocol messages for tests: one place that knows every required field.

Each factory fills the fields a test does not care about with plain values and takes any field
as a keyword to override it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from edgefl.protocol.messages import (
    CentralPrivacy,
    ModelFormat,
    ModelManifest,
    ServerState,
    ServerStatus,
    UpdateHeader,
)

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


def central_privacy(**fields: Any) -> CentralPrivacy:
    """A server state's central DP figures: z = 1.1, C = 0.3, δ = 1e-5, cap 4, and 10 devices
    of which 4 took part once, 3 twice, 2 three times and 1 four times (ε 3.21 stands for the
    accountant's); ``fields`` override any field."""
    values: dict[str, Any] = {
        "epsilon": 3.21,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
        "clip_norm": 0.3,
        "participation_cap": 4,
        "participation_max": 4,
        "devices": 10,
        "participation_histogram": {1: 4, 2: 3, 3: 2, 4: 1},
    }
    return CentralPrivacy(**{**values, **fields})


def server_state(**fields: Any) -> ServerState:
    """The retained state of an online aggregator of fleet ``lab``: session 1, version 0,
    buffer 0/5, nothing applied, started at 1.0, published at 2.0; ``fields`` override any
    field."""
    values: dict[str, Any] = {
        "fleet": "lab",
        "status": ServerStatus.ONLINE,
        "session": 1,
        "version": 0,
        "buffer_fill": 0,
        "buffer_size": 5,
        "applied": 0,
        "started_at": 1.0,
        "at": 2.0,
    }
    return ServerState(**{**values, **fields})
