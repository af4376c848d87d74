"""The aggregator service: FedBuff (or synchronous FedAvg) over MQTT, crash-safe in SQLite.

Public API::

    AggregatorConfig.build(broker_url=..., fleet=..., model=..., state_dir=..., **options)
        # frozen, validated; sections aggregation, task, outputs, limits, ingest, mqtt
    Aggregator(config, *, transport=None, on_version=None)
        await run(ready=None); stop(); statistics(); history()
    run_aggregator(config) -> int        # blocking, SIGTERM/SIGINT -> clean shutdown

``edgefl.aggregator.cli.aggregator_app`` is the ``edgefl aggregator`` typer group (run, and
``check-config``); ``edgefl.aggregator.config_file.load_aggregator_config`` merges the TOML file,
the ``EDGEFL_AGG_*`` environment and the flags into an ``AggregatorConfig``. The ingest
path imports no torch: held-out evaluation (``eval_dataset``) and ONNX export (``publish_onnx``)
import it lazily, only when enabled. See ``docs/AGGREGATOR.md``.
"""

from __future__ import annotations

from edgefl.aggregator.config import AggregatorConfig, Algorithm, NormBoundSetting
from edgefl.aggregator.runner import run_aggregator
from edgefl.aggregator.service import Aggregator, OnVersion
from edgefl.aggregator.stats import AggregatorStatistics, VersionRecord

__all__ = [
    "Aggregator",
    "AggregatorConfig",
    "AggregatorStatistics",
    "Algorithm",
    "NormBoundSetting",
    "OnVersion",
    "VersionRecord",
    "run_aggregator",
]
