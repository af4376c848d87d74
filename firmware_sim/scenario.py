"""What a simulated run is made of, shared by the virtual and the live mode.

:class:`SimConfig` is the frozen description of one run: fleet size, data, model, local
training, codec, attacks, seed, and the sections of :mod:`firmware_sim.sim_sections` (the fleet
mix, the aggregation options, the stop rule). :func:`build_scenario` turns it into a
:class:`Scenario`: the dataset and held-out test set, the model spec and version-0 weights, the
lazy :class:`~firmware_sim.fleet.Fleet`, each device's data slice and the attacker mask.

Data slices. The training set is partitioned (IID, Dirichlet(α) over labels, shards) into
``S = min(N, num_train // min_examples)`` slices and device ``d`` trains on slice ``d mod S``.
For ``N ≤ num_train / min_examples`` every device has its own slice; beyond that devices share
slices, so 100,000 simulated devices on a 16,000-example dataset still train on realistic
amounts of data, and the cost of a run depends on the updates, not on ``N``.

Also here: the text forms the command line uses, :func:`parse_codec` (``int8``,
``int4+topk=0.1``, ``fp16+clip=5``) and :func:`parse_norm_bound` (``auto``, ``off``, ``3.5``);
the staleness text is parsed by :func:`edgefl.aggregation.parse_staleness` (re-exported here).
:meth:`SimConfig.aggregation_settings` (:meth:`~firmware_sim.sim_sections.RunAggregation.
settings`) is the one translation of a run's aggregation options into
the resolved :class:`~edgefl.aggregation.AggregationSettings` that both the virtual simulator and
the live aggregator (``firmware_sim.live``) run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation import AggregationSettings, Algorithm, parse_staleness
from edgefl.codec import CodecConfig, Quantization
from edgefl.data import Dataset, load_dataset, partition
from edgefl.flat_options import flat_values, replace_flat
from edgefl.models.spec import ModelSpec, get_model_spec, init_weights_numpy
from edgefl.privacy.local import LocalDP
from edgefl.training import LocalTrainConfig
from firmware_sim.attacks import AttackConfig, malicious_mask
from firmware_sim.fleet import Fleet
from firmware_sim.profiles import get_mix
from firmware_sim.seeding import MASK64
from firmware_sim.sim_sections import (
    FleetMix,
    RunAggregation,
    StopRule,
    parse_norm_bound,
    reporting_goal,
)

__all__ = [
    "DATASET_MODELS",
    "Scenario",
    "SimConfig",
    "build_scenario",
    "codec_to_text",
    "parse_codec",
    "parse_norm_bound",
    "parse_staleness",
    "reporting_goal",
]

DATASET_MODELS: dict[str, str] = {"digits": "digits-mlp", "mnist1d": "mnist1d-cnn"}
"""The model each shipped dataset trains by default."""

_STREAM_PARTITION = 0x9A27_1710


def parse_codec(text: str) -> CodecConfig:
    """``QUANT[+topk=F][+clip=C][+zstd=L][+block=B]`` with ``QUANT`` one of fp32, fp16, int8,
    int4, int2; e.g. ``int8``, ``int4+topk=0.1``, ``fp16+clip=5``."""
    parts = [p for p in text.strip().lower().replace(" ", "").split("+") if p]
    if not parts:
        raise ValueError("empty codec spec")
    kwargs: dict[str, Any] = {"quantization": Quantization(parts[0])}
    names = {"topk": "topk_fraction", "clip": "clip_norm", "zstd": "zstd_level"}
    for item in parts[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in (*names, "block"):
            raise ValueError(f"bad codec option {item!r}; expected topk=F, clip=C, zstd=L, block=B")
        if key == "zstd":
            kwargs["zstd_level"] = int(value)
        elif key == "block":
            kwargs["block_size"] = int(value)
        else:
            kwargs[names[key]] = float(value)
    return CodecConfig(**kwargs)


def codec_to_text(config: CodecConfig) -> str:
    """Inverse of :func:`parse_codec` (only non-default options are written)."""
    out = [config.quantization.value]
    if config.topk_fraction is not None:
        out.append(f"topk={config.topk_fraction:g}")
    if config.clip_norm is not None:
        out.append(f"clip={config.clip_norm:g}")
    if config.zstd_level != 1:
        out.append(f"zstd={config.zstd_level}")
    if config.block_size != 4096:
        out.append(f"block={config.block_size}")
    return "+".join(out)


_FLAT_ORDER = (
    "devices", "algorithm", "profile", "speed", "dropout", "crash", "dataset", "num_samples",
    "model", "partition", "min_examples", "local", "buffer_size", "concurrency", "staleness",
    "max_staleness", "server_lr", "server_momentum", "normalisation", "norm_bound", "robust",
    "trim_beta", "cohort_size", "overselect", "round_deadline_s", "lease_s", "min_fraction",
    "codec", "attack", "target", "stop_at_target", "max_time_s", "max_updates", "max_wall_s",
    "eval_every_updates", "seed", "threads", "privacy", "local_dp",
)  # fmt: skip
"""Every flat option, in the order ``summary.json`` has always written them."""


@dataclass(frozen=True)
class SimConfig:
    """One simulated run. Times are seconds (virtual in virtual mode). Build it from the
    command line's flat options with :meth:`build`; each lives in one section (``fleet``,
    ``aggregation``, ``stop``) or at the top level."""

    devices: int = 1000
    fleet: FleetMix = field(default_factory=FleetMix)
    dataset: str = "mnist1d"
    num_samples: int | None = None
    model: str | None = None  # default: DATASET_MODELS[dataset]
    partition: str = "dirichlet:0.5"
    min_examples: int = 160  # 16,000 mnist1d training examples: 100 slices, 10 devices each
    local: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    aggregation: RunAggregation = field(default_factory=RunAggregation)
    codec: str = "int8"
    attack: AttackConfig = field(default_factory=AttackConfig)
    stop: StopRule = field(default_factory=StopRule)
    seed: int = 0
    threads: int = 1
    local_dp: LocalDP | None = None  # local DP on every device (firmware_sim/local_dp.py)

    SECTIONS: ClassVar[dict[str, type[FleetMix | RunAggregation | StopRule]]] = {
        "fleet": FleetMix,
        "aggregation": RunAggregation,
        "stop": StopRule,
    }
    """The sections whose fields are flat options of the same name."""

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.dataset not in DATASET_MODELS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; known: {', '.join(DATASET_MODELS)}"
            )
        parse_codec(self.codec)

    @classmethod
    def build(cls, devices: int = 1000, **options: Any) -> SimConfig:
        """A run from flat options (a field of this class or of one of its sections, e.g.
        ``SimConfig.build(devices=100, buffer_size=5, target=0.8)``); ``TypeError`` for an
        unknown name."""
        return cls(devices=devices).replace(**options)

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with ``changes`` (fields of this class or flat options) applied, validated
        again."""
        return replace_flat(self, self.SECTIONS, changes)

    def options(self) -> dict[str, Any]:
        """Every flat option and its value (what :meth:`build` takes), in
        :data:`_FLAT_ORDER`."""
        values = flat_values(self, self.SECTIONS)
        return {name: values[name] for name in _FLAT_ORDER}

    @property
    def algorithm(self) -> Algorithm:
        return self.aggregation.algorithm

    @property
    def model_name(self) -> str:
        return self.model or DATASET_MODELS[self.dataset]

    def codec_config(self) -> CodecConfig:
        return parse_codec(self.codec)

    def aggregation_settings(self) -> AggregationSettings:
        """The run's aggregation, resolved (:meth:`RunAggregation.settings`)."""
        return self.aggregation.settings()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for ``summary.json``): the flat options."""
        out = {
            name: asdict(value)
            if dataclasses.is_dataclass(value) and not isinstance(value, type)
            else value
            for name, value in self.options().items()
        }
        out["algorithm"] = self.algorithm.value
        out["robust"] = self.aggregation.robust.value
        out["model"] = self.model_name
        out["local"] = {k: (str(v) if k == "optimizer" else v) for k, v in out["local"].items()}
        out["attack"] = {
            "fraction": self.attack.fraction,
            "kind": self.attack.kind.value,
            "scale": self.attack.scale,
        }
        return out


@dataclass(frozen=True, eq=False)
class Scenario:
    """Everything a run needs, built once from a :class:`SimConfig` (see module docstring)."""

    config: SimConfig
    dataset: Dataset
    spec: ModelSpec
    initial_weights: NDArray[np.float32]
    fleet: Fleet
    slices: tuple[NDArray[np.int64], ...]
    malicious: NDArray[np.bool_]

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    def slice_of(self, device: int) -> NDArray[np.int64]:
        """Indices into the training set that ``device`` owns."""
        return self.slices[device % len(self.slices)]

    def device_data(self, device: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """``(x, y)`` of ``device`` (copies)."""
        idx = self.slice_of(device)
        return self.dataset.x_train[idx], self.dataset.y_train[idx]

    def num_examples(self, device: int) -> int:
        return len(self.slice_of(device))


def build_scenario(config: SimConfig, dataset: Dataset | None = None) -> Scenario:
    """Load data (or use ``dataset``), partition it, draw the fleet and the attackers."""
    ds = (
        dataset
        if dataset is not None
        else load_dataset(config.dataset, seed=config.seed, num_samples=config.num_samples)
    )
    spec = get_model_spec(config.model_name)
    fm = config.fleet
    mix = get_mix(fm.profile).with_overrides(dropout=fm.dropout, crash=fm.crash, compute=fm.speed)
    fleet = Fleet(config.devices, mix, seed=config.seed)
    n_slices = max(1, min(config.devices, ds.num_train // max(1, config.min_examples)))
    rng = np.random.default_rng([config.seed & MASK64, _STREAM_PARTITION])
    parts = partition(ds.y_train, n_slices, config.partition, rng)
    slices = tuple(np.asarray(p, dtype=np.int64) for p in parts)
    if any(len(s) == 0 for s in slices):
        raise ValueError(f"partition {config.partition!r} left a device slice empty")
    return Scenario(
        config=config,
        dataset=ds,
        spec=spec,
        initial_weights=init_weights_numpy(spec, config.seed),
        fleet=fleet,
        slices=slices,
        malicious=malicious_mask(config.devices, config.attack.fraction, config.seed),
    )


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty list."""
    if not values:
        raise ValueError("percentile of an empty list")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
