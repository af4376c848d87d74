"""Shipped datasets, partitioners over labels, and device data sources (numpy; no torch)."""

from __future__ import annotations

from edgefl.data.datasets import Dataset, DatasetName, default_cache_dir, load_dataset
from edgefl.data.partition import (
    PartitionKind,
    PartitionSpec,
    label_skew,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from edgefl.data.sources import (
    CsvSource,
    DataSource,
    DataSourceError,
    EntryPointSource,
    NpzSource,
    source_from_string,
)

__all__ = [
    "CsvSource",
    "DataSource",
    "DataSourceError",
    "Dataset",
    "DatasetName",
    "EntryPointSource",
    "NpzSource",
    "PartitionKind",
    "PartitionSpec",
    "default_cache_dir",
    "label_skew",
    "load_dataset",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "source_from_string",
]
