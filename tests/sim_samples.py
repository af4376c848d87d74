"""Small simulator configurations for tests that need a real (seconds-long) virtual run."""

from __future__ import annotations

from typing import Any

from edgefl.aggregation import Normalisation
from edgefl.privacy import CentralDP
from firmware_sim.scenario import SimConfig


def private_sim_config(privacy: CentralDP | None, **fields: Any) -> SimConfig:
    """FedBuff under central DP (``sum`` normalisation, no adaptive norm bound) on 8 lab devices
    with digits, K = 2, C = 4, 40 updates, the target ignored; ``fields`` override any field."""
    values: dict[str, Any] = {
        "devices": 8,
        "dataset": "digits",
        "num_samples": 400,
        "min_examples": 16,
        "profile": "lab",
        "buffer_size": 2,
        "concurrency": 4,
        "normalisation": Normalisation.SUM,
        "norm_bound": "off",
        "stop_at_target": False,
        "max_updates": 40,
        "eval_every_updates": 40,
        "privacy": privacy,
    }
    values.update(fields)
    return SimConfig.build(**values)
