"""The sections of :class:`~edgefl.aggregator.AggregatorConfig`: small frozen records, each
validated at construction, plus the one translation of the aggregation options.

- :class:`DeviceTask`: what devices are asked to do (training hints and codec, published in
  every manifest).
- :class:`Outputs`: ONNX export, held-out evaluation, the metrics log and Prometheus endpoint.
- :class:`Limits`: what one device may send (update size, rate, chunk grace, sequence jumps,
  packet size).
- :class:`IngestTuning`: group commit (batch size and linger, receive window in bytes, fsync) and
  the receipts it publishes.
- :class:`MqttIdentity`: who the service is to the broker (credentials, TLS files, client id,
  protocol, how long the first connection may take); the rest of the MQTT settings are the
  service's fixed choices (:meth:`AggregatorConfig.mqtt_config`).

The aggregation knobs are not a section of their own here: the config holds the resolved
:class:`~edgefl.aggregation.AggregationSettings`, the record the fleet simulator produces too.
The command line and the config file spell them flat (a staleness kind and its parameters, a
norm-bound choice and ``max_norm``, an optimizer kind, rate and momentum);
:func:`resolve_aggregation` turns those options into the settings and
:func:`aggregation_options` gives them back (``resolve_aggregation(**aggregation_options(s)) ==
s`` for the settings the options can express).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from edgefl.aggregation import (
    AggregationSettings,
    Algorithm,
    ExampleWeighting,
    Normalisation,
    NormBound,
    NormBoundMode,
    RobustMode,
    ServerOptimizerConfig,
    ServerOptimizerKind,
    StalenessKind,
    StalenessSetting,
)
from edgefl.codec import CodecConfig
from edgefl.protocol import TrainingHints
from edgefl.protocol.sequence import DEFAULT_MAX_SEQ_JUMP
from edgefl.transport.config import MqttProtocol, TlsFiles

__all__ = [
    "AGGREGATION_OPTIONS",
    "DeviceTask",
    "IngestTuning",
    "Limits",
    "MqttIdentity",
    "NormBoundSetting",
    "Outputs",
    "aggregation_options",
    "resolve_aggregation",
]


class NormBoundSetting(StrEnum):
    """CLI-level choice of the update-norm bound (``max_norm`` adds a static bound on top)."""

    ADAPTIVE_CLIP = "adaptive-clip"  # default: 5x the running median, clip
    ADAPTIVE_REJECT = "adaptive-reject"
    STATIC_CLIP = "static-clip"  # needs max_norm
    STATIC_REJECT = "static-reject"  # needs max_norm
    OFF = "off"


def _positive(owner: object, *names: str) -> None:
    """Raise ``ValueError`` naming the first of ``names`` that is not a finite number > 0."""
    for name in names:
        value = getattr(owner, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be > 0, got {value}")


@dataclass(frozen=True)
class DeviceTask:
    """What devices are asked to do, published in every manifest as :class:`TrainingHints`."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    codec: CodecConfig = field(default_factory=CodecConfig)

    def __post_init__(self) -> None:
        self.hints()  # validates epochs, batch size and rate as the devices will

    def hints(self) -> TrainingHints:
        return TrainingHints(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            codec=self.codec.to_dict(),
        )


EVAL_DATASETS = ("digits", "mnist1d")


@dataclass(frozen=True)
class Outputs:
    """What the service produces besides the model: ONNX, accuracy, metrics."""

    publish_onnx: bool = False
    eval_dataset: str | None = None  # None | "digits" | "mnist1d"
    metrics_interval_s: float = 5.0
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    # Stop once a held-out evaluation of the newest version reaches this accuracy (the
    # service's run ends, like a stop; that version stays published). None: never.
    until_accuracy: float | None = None

    def __post_init__(self) -> None:
        if self.eval_dataset is not None and self.eval_dataset not in EVAL_DATASETS:
            raise ValueError(
                f"eval_dataset must be None, 'digits' or 'mnist1d': {self.eval_dataset}"
            )
        target = self.until_accuracy
        if target is not None:
            if not (math.isfinite(target) and 0 < target <= 1):
                raise ValueError(f"until_accuracy must be in (0, 1], got {target}")
            if self.eval_dataset is None:
                raise ValueError("until_accuracy needs eval_dataset (the held-out evaluation)")
        _positive(self, "metrics_interval_s")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"bad metrics_port {self.metrics_port}")


@dataclass(frozen=True)
class Limits:
    """What one device may send."""

    max_update_bytes: int = 64 * 1024 * 1024
    rate_limit_per_minute: float | None = None
    chunk_grace_s: float = 30.0
    # a seq more than this above the device's highest accepted one is refused (SEQ_JUMP)
    max_seq_jump: int = DEFAULT_MAX_SEQ_JUMP
    max_packet: int = 256 * 1024  # updates above it are chunked

    def __post_init__(self) -> None:
        if self.max_update_bytes < 1024:
            raise ValueError("max_update_bytes must be >= 1024")
        rl = self.rate_limit_per_minute
        if rl is not None and not (math.isfinite(rl) and rl > 0):
            raise ValueError(f"rate_limit_per_minute must be None or > 0, got {rl}")
        _positive(self, "chunk_grace_s")
        if isinstance(self.max_seq_jump, bool) or self.max_seq_jump < 1:
            raise ValueError(f"max_seq_jump must be >= 1, got {self.max_seq_jump}")


@dataclass(frozen=True)
class IngestTuning:
    """Group commit and the receipts of each committed batch (docs/PROTOCOL.md 4.6)."""

    max_batch: int = 256  # messages per group commit (also bounded by max_inflight_bytes / 4)
    batch_linger_s: float = 0.002
    max_inflight_bytes: int = 32 * 1024 * 1024  # sizes the MQTT receive window
    fsync: bool = True  # SQLite synchronous=FULL (power-loss safe) vs NORMAL (crash safe)
    receipts: bool = True  # one per device per committed batch, QoS 1, retained
    receipt_queue: int = 4096  # receipts waiting for the broker; beyond it the oldest is dropped

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.batch_linger_s < 0:
            raise ValueError("max_batch must be >= 1 and batch_linger_s >= 0")
        if self.receipt_queue < 1:
            raise ValueError(f"receipt_queue must be >= 1, got {self.receipt_queue}")
        if self.max_inflight_bytes < 64 * 1024:
            raise ValueError(f"max_inflight_bytes must be >= 64 KiB, got {self.max_inflight_bytes}")


@dataclass(frozen=True)
class MqttIdentity:
    """Who the service is to the broker: the settings of :class:`~edgefl.transport.MqttConfig`
    a deployment chooses (same names and the same :class:`~edgefl.transport.config.TlsFiles`
    there, except ``connect_timeout_s``, which is its ``start_timeout``)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_files: TlsFiles = field(default_factory=TlsFiles)
    client_id: str | None = None  # default: edgefl-aggregator-<fleet>
    protocol: MqttProtocol = MqttProtocol.AUTO
    # Give up (BrokerUnavailable, exit 69) when the first connection is not up within this.
    connect_timeout_s: float = 30.0

    SECTIONS: ClassVar[dict[str, type[TlsFiles]]] = {"tls_files": TlsFiles}

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", MqttProtocol(self.protocol))
        _positive(self, "connect_timeout_s")

    def overrides(self) -> dict[str, Any]:
        """The :class:`~edgefl.transport.MqttConfig` keyword arguments this identity sets
        (credentials left at None leave the URL's alone)."""
        values: dict[str, Any] = {
            "protocol": self.protocol,
            "start_timeout": self.connect_timeout_s,
            "tls_files": self.tls_files,
        }
        for name in ("username", "password"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return values


AGGREGATION_OPTIONS: dict[str, object] = {
    "algorithm": Algorithm.FEDBUFF,
    "buffer_size": 10,
    "staleness": StalenessKind.POLYNOMIAL,
    "staleness_a": None,  # None: the function's default (0.5 polynomial, 1 hinge)
    "staleness_b": None,  # hinge only (default 10)
    "max_staleness": 100,
    "example_weighting": ExampleWeighting.EXAMPLES,
    "example_cap": 1000,
    # mean: a = A / W (FedAvg-compatible; uniformly stale buffers are not shrunk).
    # sum: a = A / K (FedBuff paper; stale buffers take smaller steps, robust to small K).
    "normalisation": Normalisation.MEAN,
    "server_optimizer": ServerOptimizerKind.SGD,
    "server_lr": 1.0,
    "server_momentum": 0.0,
    "norm_bound": NormBoundSetting.ADAPTIVE_CLIP,
    "max_norm": None,
    "robust": RobustMode.NONE,
    "trim_beta": 0.2,
    "privacy": None,  # central DP (docs/PRIVACY.md): needs normalisation = sum
    "min_fraction": 0.5,  # fedavg: the share of the cohort a round needs at its deadline
}
"""The flat aggregation options of the command line and the config file, with their defaults."""

_RESOLVED = ("staleness", "norm_bound", "server_optimizer")
"""Settings fields built from several options; every other field is the option of its name."""
_ENUMS: dict[str, type[StrEnum]] = {
    "algorithm": Algorithm,
    "example_weighting": ExampleWeighting,
    "normalisation": Normalisation,
    "robust": RobustMode,
}
"""Options given as text are coerced to these."""


def resolve_aggregation(**options: Any) -> AggregationSettings:
    """The :class:`AggregationSettings` of flat options (names and defaults:
    :data:`AGGREGATION_OPTIONS`). Raises ``TypeError`` for an unknown option and ``ValueError``
    for a bad value (a static norm bound without ``max_norm``, or what the core configs
    refuse)."""
    unknown = sorted(set(options) - set(AGGREGATION_OPTIONS))
    if unknown:
        raise TypeError(f"unknown aggregation option(s): {', '.join(unknown)}")
    o = {**AGGREGATION_OPTIONS, **options}
    o.update({name: enum(o[name]) for name, enum in _ENUMS.items()})
    staleness = StalenessSetting(StalenessKind(o["staleness"]), o["staleness_a"], o["staleness_b"])
    same_name = {
        f.name: o[f.name]
        for f in dataclasses.fields(AggregationSettings)
        if f.name not in _RESOLVED
    }
    return AggregationSettings(
        staleness=staleness,
        norm_bound=_norm_bound(NormBoundSetting(o["norm_bound"]), o["max_norm"]),
        server_optimizer=_optimizer(
            ServerOptimizerKind(o["server_optimizer"]), o["server_lr"], o["server_momentum"]
        ),
        **same_name,
    )


def _norm_bound(setting: NormBoundSetting, max_norm: float | None) -> NormBound:
    if setting is NormBoundSetting.OFF:
        return NormBound.off()
    clip = setting in (NormBoundSetting.STATIC_CLIP, NormBoundSetting.ADAPTIVE_CLIP)
    mode = NormBoundMode.CLIP if clip else NormBoundMode.REJECT
    if setting in (NormBoundSetting.STATIC_CLIP, NormBoundSetting.STATIC_REJECT):
        if max_norm is None:
            raise ValueError(f"norm bound {setting} needs max_norm")
        return NormBound.static(max_norm, mode)
    return NormBound(max_norm=max_norm, mode=mode)


def _optimizer(kind: ServerOptimizerKind, lr: float, momentum: float) -> ServerOptimizerConfig:
    if kind is ServerOptimizerKind.ADAM:
        return ServerOptimizerConfig.adam(lr=lr)
    return ServerOptimizerConfig.sgd(lr=lr, momentum=momentum)


def aggregation_options(settings: AggregationSettings) -> dict[str, object]:
    """The flat options of ``settings`` (the inverse of :func:`resolve_aggregation`)."""
    bound = settings.norm_bound
    clip = bound.mode is NormBoundMode.CLIP
    if not bound.enabled:
        setting = NormBoundSetting.OFF
    elif bound.adaptive_multiplier is None:
        setting = NormBoundSetting.STATIC_CLIP if clip else NormBoundSetting.STATIC_REJECT
    else:
        setting = NormBoundSetting.ADAPTIVE_CLIP if clip else NormBoundSetting.ADAPTIVE_REJECT
    resolved: dict[str, object] = {
        "staleness": settings.staleness.kind,
        "staleness_a": settings.staleness.a,
        "staleness_b": settings.staleness.b,
        "norm_bound": setting,
        "max_norm": bound.max_norm,
        "server_optimizer": settings.server_optimizer.kind,
        "server_lr": settings.server_optimizer.lr,
        "server_momentum": settings.server_optimizer.momentum,
    }
    same_name = {
        name: getattr(settings, name) for name in AGGREGATION_OPTIONS if name not in resolved
    }
    return {**same_name, **resolved}
