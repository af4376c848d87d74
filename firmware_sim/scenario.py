"""What a simulated run is made of, shared by the virtual and the live mode.

:class:`SimConfig` is the frozen description of one run (fleet, data, model, local training,
aggregation, codec, attacks, stop conditions). :func:`build_scenario` turns it into a
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
:meth:`SimConfig.aggregation_settings` is the one translation of a run's aggregation options into
the resolved :class:`~edgefl.aggregation.AggregationSettings` that both the virtual simulator and
the live aggregator (``firmware_sim.live``) run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation import (
    AggregationSettings,
    Algorithm,
    ExampleWeighting,
    Normalisation,
    NormBound,
    RobustMode,
    ServerOptimizerConfig,
    parse_staleness,
)
from edgefl.codec import CodecConfig, Quantization
from edgefl.data import Dataset, load_dataset, partition
from edgefl.models.spec import ModelSpec, get_model_spec, init_weights_numpy
from edgefl.privacy.central import CentralDP
from edgefl.privacy.local import LocalDP
from edgefl.training import LocalTrainConfig
from firmware_sim.attacks import AttackConfig, malicious_mask
from firmware_sim.fleet import Fleet
from firmware_sim.profiles import get_mix, parse_distribution
from firmware_sim.seeding import MASK64

__all__ = [
    "DATASET_MODELS",
    "Scenario",
    "SimConfig",
    "build_scenario",
    "codec_to_text",
    "parse_codec",
    "parse_norm_bound",
    "parse_staleness",
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


def parse_norm_bound(text: str) -> NormBound:
    """``auto`` (adaptive: 5x the median of recent norms, clip), ``off``, or a static ``MAX``."""
    value = text.strip().lower()
    if value in ("auto", "adaptive", "default"):
        return NormBound()
    if value in ("off", "none", "0"):
        return NormBound.off()
    return NormBound.static(float(value))


@dataclass(frozen=True)
class SimConfig:
    """One simulated run. Times are seconds (virtual in virtual mode)."""

    devices: int = 1000
    algorithm: Algorithm = Algorithm.FEDBUFF
    profile: str = "mixed"
    speed: str | None = None  # e.g. "lognormal:0,1": overrides every profile's compute speed
    dropout: float | None = None  # overrides every profile's dropout probability
    crash: float | None = None
    dataset: str = "mnist1d"
    num_samples: int | None = None
    model: str | None = None  # default: DATASET_MODELS[dataset]
    partition: str = "dirichlet:0.5"
    min_examples: int = 160  # 16,000 mnist1d training examples: 100 slices, 10 devices each
    local: LocalTrainConfig = field(default_factory=LocalTrainConfig)
    # aggregation
    # K from bench/fedbuff_sweep.py (docs/SIMULATOR.md "Defaults"): 3 was the fastest K that
    # held on every fleet checked (K 2 won the default fleet but was 3.3x slower on lab)
    buffer_size: int = 3
    concurrency: int = 20
    staleness: str = "polynomial:0.5"
    max_staleness: int | None = 100
    server_lr: float = 1.0  # both algorithms; bench/fedbuff_sweep.py, docs/SIMULATOR.md "Defaults"
    server_momentum: float = 0.0
    # FedBuff buffer normalisation: "mean" (weighted mean, FedAvg-compatible) or "sum" (divide
    # by K with equal example weights, as in the FedBuff paper: stale buffers take smaller steps)
    normalisation: Normalisation = Normalisation.MEAN
    norm_bound: str = "auto"
    robust: RobustMode = RobustMode.NONE
    trim_beta: float = 0.2
    cohort_size: int | None = None  # FedAvg: devices selected per round, default = concurrency
    overselect: float = 1.3  # FedAvg: select this many times the reporting goal (Bonawitz 2019)
    round_deadline_s: float | None = None  # FedAvg: default automatic (see virtual.py)
    lease_s: float | None = None  # FedBuff: participation lease, default automatic (virtual.py)
    min_fraction: float = 0.5
    # codec and attacks
    codec: str = "int8"
    attack: AttackConfig = field(default_factory=AttackConfig)
    # stopping and measuring
    target: float = 0.9
    stop_at_target: bool = True
    max_time_s: float | None = None
    max_updates: int | None = None
    max_wall_s: float | None = None
    eval_every_updates: int = 20
    seed: int = 0
    threads: int = 1
    privacy: CentralDP | None = None  # central DP at the simulated aggregator (docs/PRIVACY.md)
    local_dp: LocalDP | None = None  # local DP on every device (firmware_sim/local_dp.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithm", Algorithm(self.algorithm))
        object.__setattr__(self, "robust", RobustMode(self.robust))
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.concurrency < 1 or self.buffer_size < 1:
            raise ValueError("concurrency and buffer_size must be >= 1")
        if self.cohort_size is not None and self.cohort_size < 1:
            raise ValueError("cohort_size must be >= 1")
        if not (math.isfinite(self.overselect) and self.overselect >= 1.0):
            raise ValueError(f"overselect must be >= 1, got {self.overselect}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target accuracy must be in (0, 1], got {self.target}")
        if self.dataset not in DATASET_MODELS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; known: {', '.join(DATASET_MODELS)}"
            )
        if self.eval_every_updates < 1:
            raise ValueError("eval_every_updates must be >= 1")
        parse_codec(self.codec)
        parse_norm_bound(self.norm_bound)
        parse_staleness(self.staleness).weight()
        if self.speed is not None:
            parse_distribution(self.speed)

    @property
    def model_name(self) -> str:
        return self.model or DATASET_MODELS[self.dataset]

    @property
    def effective_cohort(self) -> int:
        """FedAvg: devices selected per round (default: FedBuff's ``concurrency``, so both
        algorithms have the same number of devices training at once)."""
        return self.cohort_size or self.concurrency

    @property
    def reporting_goal(self) -> int:
        """FedAvg: accepted updates that close a round, ``ceil(cohort / overselect)``; the
        over-selected rest are stragglers whose work is discarded (Bonawitz et al. 2019)."""
        return reporting_goal(self.effective_cohort, self.overselect)

    def codec_config(self) -> CodecConfig:
        return parse_codec(self.codec)

    def server_optimizer(self) -> ServerOptimizerConfig:
        return ServerOptimizerConfig.sgd(lr=self.server_lr, momentum=self.server_momentum)

    def aggregation_settings(self) -> AggregationSettings:
        """The run's aggregation, resolved: what the virtual simulator builds its core from and
        what the live aggregator is configured with (the FedAvg cohort is
        :attr:`reporting_goal`; FedAvg weighs by examples whatever the normalisation)."""
        fedavg = self.algorithm is Algorithm.FEDAVG
        return AggregationSettings(
            algorithm=self.algorithm,
            buffer_size=self.reporting_goal if fedavg else self.buffer_size,
            staleness=parse_staleness(self.staleness),
            max_staleness=self.max_staleness,
            example_weighting=ExampleWeighting.EXAMPLES if fedavg else self.example_weighting,
            normalisation=Normalisation(self.normalisation),
            norm_bound=parse_norm_bound(self.norm_bound),
            robust=self.robust,
            trim_beta=self.trim_beta,
            server_optimizer=self.server_optimizer(),
            min_fraction=self.min_fraction,
            privacy=self.privacy,
        )

    @property
    def example_weighting(self) -> ExampleWeighting:
        """Equal weights under ``sum`` normalisation (else the step scales with the mean example
        count); example-count weights under ``mean``."""
        if Normalisation(self.normalisation) is Normalisation.SUM:
            return ExampleWeighting.EQUAL
        return ExampleWeighting.EXAMPLES

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (for ``summary.json``)."""
        out = asdict(self)
        out["algorithm"] = self.algorithm.value
        out["robust"] = self.robust.value
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
    mix = get_mix(config.profile).with_overrides(
        dropout=config.dropout, crash=config.crash, compute=config.speed
    )
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


def reporting_goal(selected: int, overselect: float) -> int:
    """``max(1, ceil(selected / overselect))`` (a tolerance keeps ``13 / 1.3`` at 10)."""
    return max(1, math.ceil(selected / overselect - 1e-9))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in [0, 100] of a non-empty list."""
    if not values:
        raise ValueError("percentile of an empty list")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
