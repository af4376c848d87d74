"""Configuration of the aggregator service: one frozen dataclass, validated at construction.

:class:`AggregatorConfig` holds everything the service needs: where the broker is, which fleet and
model it serves, where its SQLite state lives, the aggregation algorithm and its knobs, what it
asks devices to do (training hints and codec, published in every manifest), and the operational
limits (update size, per-device rate). :meth:`AggregatorConfig.fedbuff_config` and
:meth:`AggregatorConfig.sync_config` turn the flat knobs into the aggregation core's configs
(through :meth:`AggregatorConfig.aggregation_settings`, the resolved knobs the fleet simulator
produces too). :class:`Algorithm` lives in :mod:`edgefl.aggregation` and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from edgefl.aggregation import (
    AggregationSettings,
    Algorithm,
    ExampleWeighting,
    FedBuffConfig,
    Normalisation,
    NormBound,
    NormBoundMode,
    RobustMode,
    ServerOptimizerConfig,
    ServerOptimizerKind,
    StalenessKind,
    StalenessSetting,
    StalenessWeight,
    SyncFedAvgConfig,
)
from edgefl.auth import EnvelopeSigner, UpdateAuthenticator
from edgefl.codec import CodecConfig
from edgefl.models import ModelSpec, get_model_spec
from edgefl.participation import ParticipationConfig
from edgefl.privacy import CentralDP
from edgefl.protocol import TrainingHints
from edgefl.protocol.sequence import DEFAULT_MAX_SEQ_JUMP
from edgefl.protocol.topics import fleet_name
from edgefl.transport import MqttConfig
from edgefl.transport.config import MqttProtocol

__all__ = ["REASSEMBLY_PARTIALS", "AggregatorConfig", "Algorithm", "NormBoundSetting"]

REASSEMBLY_PARTIALS = 16
"""Incomplete chunked updates held at once; beyond that the least recently active is evicted."""


class NormBoundSetting(StrEnum):
    """CLI-level choice of the update-norm bound (``max_norm`` adds a static bound on top)."""

    ADAPTIVE_CLIP = "adaptive-clip"  # default: 5x the running median, clip
    ADAPTIVE_REJECT = "adaptive-reject"
    STATIC_CLIP = "static-clip"  # needs max_norm
    STATIC_REJECT = "static-reject"  # needs max_norm
    OFF = "off"


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything the aggregator service needs (see ``docs/AGGREGATOR.md`` for each option)."""

    broker_url: str
    fleet: str
    model: str
    state_dir: Path
    algorithm: Algorithm = Algorithm.FEDBUFF
    # --- FedBuff knobs (fedavg reuses weighting, norm bound, robust mode and the optimizer)
    buffer_size: int = 10
    staleness: StalenessKind = StalenessKind.POLYNOMIAL
    staleness_a: float | None = None  # None: the function's default (0.5 polynomial, 1 hinge)
    staleness_b: float | None = None  # hinge only (default 10)
    max_staleness: int | None = 100
    example_weighting: ExampleWeighting = ExampleWeighting.EXAMPLES
    example_cap: int | None = 1000
    # mean: a = A / W (FedAvg-compatible; uniformly stale buffers are not shrunk).
    # sum: a = A / K (FedBuff paper; stale buffers take smaller steps, robust to small K).
    normalisation: Normalisation = Normalisation.MEAN
    server_optimizer: ServerOptimizerKind = ServerOptimizerKind.SGD
    server_lr: float = 1.0
    server_momentum: float = 0.0
    norm_bound: NormBoundSetting = NormBoundSetting.ADAPTIVE_CLIP
    max_norm: float | None = None
    robust: RobustMode = RobustMode.NONE
    trim_beta: float = 0.2
    # central differential privacy (docs/PRIVACY.md): None = off; needs normalisation = sum
    privacy: CentralDP | None = None
    # --- fedavg: a round waits for `buffer_size` updates or `round_deadline_s`
    round_deadline_s: float = 60.0
    min_fraction: float = 0.5
    # --- what devices are asked to do (published in the manifest)
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    codec: CodecConfig = field(default_factory=CodecConfig)
    # --- outputs
    publish_onnx: bool = False
    eval_dataset: str | None = None  # None | "digits" | "mnist1d"
    metrics_interval_s: float = 5.0
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    # --- limits
    max_update_bytes: int = 64 * 1024 * 1024
    rate_limit_per_minute: float | None = None
    chunk_grace_s: float = 30.0
    # a seq more than this above the device's highest accepted one is refused (SEQ_JUMP)
    max_seq_jump: int = DEFAULT_MAX_SEQ_JUMP
    max_packet: int = 256 * 1024
    # --- ingest tuning
    max_batch: int = 256  # messages per group commit (also bounded by max_inflight_bytes / 4)
    batch_linger_s: float = 0.002
    max_inflight_bytes: int = 32 * 1024 * 1024  # sizes the MQTT receive window (see below)
    fsync: bool = True  # SQLite synchronous=FULL (power-loss safe) vs NORMAL (crash safe)
    seed: int = 0
    # --- receipts (docs/PROTOCOL.md 4.6): one per device per committed batch, QoS 1, retained
    receipts: bool = True
    receipt_queue: int = 4096  # receipts waiting for the broker; beyond it the oldest is dropped
    # --- server-controlled participation (docs/PROTOCOL.md 4.7): None = off, every update
    # is taken as before (the config file and the CLI turn it on, with C = 20)
    participation: ParticipationConfig | None = None
    # --- security and MQTT identity
    authenticator: UpdateAuthenticator | None = None
    manifest_signer: EnvelopeSigner | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str | None = None  # default: edgefl-aggregator-<fleet>
    tls_insecure: bool = False  # mqtts: skip certificate and host name checks (tests only)
    protocol: MqttProtocol = MqttProtocol.AUTO
    # Give up (BrokerUnavailable, exit 69) when the first connection is not up within this.
    connect_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        fleet_name(self.fleet)
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "algorithm", Algorithm(self.algorithm))
        object.__setattr__(self, "staleness", StalenessKind(self.staleness))
        object.__setattr__(self, "example_weighting", ExampleWeighting(self.example_weighting))
        object.__setattr__(self, "normalisation", Normalisation(self.normalisation))
        object.__setattr__(self, "server_optimizer", ServerOptimizerKind(self.server_optimizer))
        object.__setattr__(self, "norm_bound", NormBoundSetting(self.norm_bound))
        object.__setattr__(self, "robust", RobustMode(self.robust))
        self.spec  # noqa: B018  (raises KeyError/ValueError for an unknown model)
        if self.eval_dataset not in (None, "digits", "mnist1d"):
            raise ValueError(
                f"eval_dataset must be None, 'digits' or 'mnist1d': {self.eval_dataset}"
            )
        static = (NormBoundSetting.STATIC_CLIP, NormBoundSetting.STATIC_REJECT)
        if self.norm_bound in static and self.max_norm is None:
            raise ValueError(f"norm bound {self.norm_bound} needs max_norm")
        for name in (
            "metrics_interval_s",
            "round_deadline_s",
            "chunk_grace_s",
            "connect_timeout_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"bad metrics_port {self.metrics_port}")
        if self.max_update_bytes < 1024:
            raise ValueError("max_update_bytes must be >= 1024")
        rl = self.rate_limit_per_minute
        if rl is not None and not (math.isfinite(rl) and rl > 0):
            raise ValueError(f"rate_limit_per_minute must be None or > 0, got {rl}")
        if self.max_batch < 1 or self.batch_linger_s < 0:
            raise ValueError("max_batch must be >= 1 and batch_linger_s >= 0")
        if isinstance(self.max_seq_jump, bool) or self.max_seq_jump < 1:
            raise ValueError(f"max_seq_jump must be >= 1, got {self.max_seq_jump}")
        if self.receipt_queue < 1:
            raise ValueError(f"receipt_queue must be >= 1, got {self.receipt_queue}")
        if self.max_inflight_bytes < 64 * 1024:
            raise ValueError(f"max_inflight_bytes must be >= 64 KiB, got {self.max_inflight_bytes}")
        # build the core configs once: they validate the remaining knobs
        self.fedbuff_config()
        self.sync_config()
        self.training_hints()

    # ------------------------------------------------------------------ derived values
    @property
    def spec(self) -> ModelSpec:
        return get_model_spec(self.model)

    def staleness_weight(self) -> StalenessWeight:
        return self.aggregation_settings().staleness.weight()

    def norm_bound_config(self) -> NormBound:
        s = self.norm_bound
        if s is NormBoundSetting.OFF:
            return NormBound.off()
        if s in (NormBoundSetting.STATIC_CLIP, NormBoundSetting.STATIC_REJECT):
            assert self.max_norm is not None
            mode = NormBoundMode.CLIP if s is NormBoundSetting.STATIC_CLIP else NormBoundMode.REJECT
            return NormBound.static(self.max_norm, mode)
        mode = NormBoundMode.CLIP if s is NormBoundSetting.ADAPTIVE_CLIP else NormBoundMode.REJECT
        return NormBound(max_norm=self.max_norm, mode=mode)

    def optimizer_config(self) -> ServerOptimizerConfig:
        if self.server_optimizer is ServerOptimizerKind.ADAM:
            return ServerOptimizerConfig.adam(lr=self.server_lr)
        return ServerOptimizerConfig.sgd(lr=self.server_lr, momentum=self.server_momentum)

    def aggregation_settings(self) -> AggregationSettings:
        """The resolved aggregation knobs (the service's FedAvg cohort is ``buffer_size``
        anonymous slots): the staleness, norm bound and optimizer built from their flat options,
        every other field taken from the option of the same name."""
        resolved: dict[str, Any] = {
            "staleness": StalenessSetting(self.staleness, self.staleness_a, self.staleness_b),
            "norm_bound": self.norm_bound_config(),
            "server_optimizer": self.optimizer_config(),
        }
        same_name = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(AggregationSettings)
            if f.name not in resolved
        }
        return AggregationSettings(**same_name, **resolved)

    def fedbuff_config(self) -> FedBuffConfig:
        return self.aggregation_settings().fedbuff_config()

    def sync_config(self) -> SyncFedAvgConfig:
        return self.aggregation_settings().sync_config()

    def training_hints(self) -> TrainingHints:
        return TrainingHints(
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            codec=self.codec.to_dict(),
        )

    def mqtt_config(self, **overrides: Any) -> MqttConfig:
        """The aggregator's MQTT settings: fixed client id, persistent session, manual acks."""
        values: dict[str, Any] = {
            "client_id": self.client_id or f"edgefl-aggregator-{self.fleet}",
            "persistent_session": True,
            "manual_ack": True,
            "max_queued_messages": self.inflight_window(),
            # A Receive Maximum above the queue bound makes the transport pause reading when
            # its queue is full instead of trusting the broker's flow control: Mosquitto 2.0
            # was measured sending far more unacknowledged QoS 1 messages than the Receive
            # Maximum of an MQTT 5 client (684 with a maximum of 80), which made RSS unbounded.
            "receive_maximum": min(65535, self.inflight_window() + 1),
            "max_inflight": 100,
            "reconnect_min_delay": 0.2,
            "reconnect_max_delay": 5.0,
            "protocol": MqttProtocol(self.protocol),
            "start_timeout": self.connect_timeout_s,
        }
        if self.tls_insecure:
            values["tls_insecure"] = True
        if self.username is not None:
            values["username"] = self.username
        if self.password is not None:
            values["password"] = self.password
        for name in ("ca_file", "cert_file", "key_file"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        values.update(overrides)
        return MqttConfig.from_url(self.broker_url, **values)

    def expected_update_bytes(self) -> int:
        """Estimated size of one encoded update: the hinted codec's bytes per parameter times
        the model size (plus index gaps for top-k) plus the header."""
        per_param = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5, "int2": 0.25}
        bpp = per_param.get(self.codec.quantization.value, 4.0)
        if self.codec.topk_fraction is not None:
            bpp = self.codec.topk_fraction * (bpp + 4.0)
        return int(bpp * self.spec.num_params) + 2048

    def expected_packet_bytes(self) -> int:
        """Estimated size of one update packet (updates above ``max_packet`` are chunked)."""
        return min(self.max_packet, self.expected_update_bytes())

    def inflight_window(self) -> int:
        """Unacknowledged messages the broker may push to us (MQTT 5 Receive Maximum) and the
        bound of the transport's inbound queue: ``max_inflight_bytes`` worth of expected
        packets, at most 4096. Chunks of incomplete updates stay unacknowledged (up to
        ``REASSEMBLY_PARTIALS`` updates, then the oldest is evicted), so the window is at least
        ``REASSEMBLY_PARTIALS * (chunks per update - 1) + 32``: complete updates always fit.
        """
        per_update = self.expected_update_bytes()
        chunks = -(-per_update // self.max_packet)
        floor = REASSEMBLY_PARTIALS * (chunks - 1) + 32
        return max(floor, min(4096, self.max_inflight_bytes // self.expected_packet_bytes()))

    def batch_limits(self) -> tuple[int, int]:
        """``(messages, bytes)`` of one group commit: a quarter of the window each."""
        return min(self.max_batch, self.inflight_window() // 4), self.max_inflight_bytes // 4

    def replace(self, **changes: Any) -> AggregatorConfig:
        return dataclasses.replace(self, **changes)
