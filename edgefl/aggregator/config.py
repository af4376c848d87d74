"""Configuration of the aggregator service: a frozen dataclass of frozen sections, validated
at construction.

:class:`AggregatorConfig` holds where the broker is, which fleet and model the service serves,
where its SQLite state lives, and one record per concern (:mod:`edgefl.aggregator.sections`):
``aggregation`` (the resolved :class:`~edgefl.aggregation.AggregationSettings`, also the
simulator's), ``task`` (what devices are asked to do), ``outputs``, ``limits``, ``ingest``,
``participation``, ``mqtt`` (the service's MQTT identity) and the optional authenticator and
manifest signer.

The command line and the config file spell every option flat (``buffer_size``, ``max_packet``,
``username``...): :meth:`AggregatorConfig.build` takes them so and puts each in its section,
:meth:`AggregatorConfig.options` gives them back, and :meth:`AggregatorConfig.replace` changes
sections or flat options. :class:`Algorithm` lives in :mod:`edgefl.aggregation` and is
re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgefl.aggregation import (
    AggregationSettings,
    Algorithm,
    FedBuffConfig,
    StalenessWeight,
    SyncFedAvgConfig,
)
from edgefl.aggregator.sections import (
    AGGREGATION_OPTIONS,
    DeviceTask,
    IngestTuning,
    Limits,
    MqttIdentity,
    NormBoundSetting,
    Outputs,
    aggregation_options,
    resolve_aggregation,
)
from edgefl.auth import EnvelopeSigner, UpdateAuthenticator
from edgefl.flat_options import flat_values, section_changes
from edgefl.models import ModelSpec, get_model_spec
from edgefl.participation import ParticipationConfig
from edgefl.protocol import TrainingHints
from edgefl.protocol.topics import fleet_name
from edgefl.transport import MqttConfig

__all__ = ["REASSEMBLY_PARTIALS", "AggregatorConfig", "Algorithm", "NormBoundSetting"]

REASSEMBLY_PARTIALS = 16
"""Incomplete chunked updates held at once; beyond that the least recently active is evicted."""

_Section = DeviceTask | Outputs | Limits | IngestTuning | MqttIdentity


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything the aggregator service needs (see ``docs/AGGREGATOR.md`` for each option).
    Build it from flat options with :meth:`build`."""

    broker_url: str
    fleet: str
    model: str
    state_dir: Path
    aggregation: AggregationSettings = field(default_factory=resolve_aggregation)
    # fedavg: a round waits for `buffer_size` updates or `round_deadline_s`
    round_deadline_s: float = 60.0
    seed: int = 0
    task: DeviceTask = field(default_factory=DeviceTask)
    outputs: Outputs = field(default_factory=Outputs)
    limits: Limits = field(default_factory=Limits)
    ingest: IngestTuning = field(default_factory=IngestTuning)
    # server-controlled participation (docs/PROTOCOL.md 4.7): None = off, every update is
    # taken as before (the config file and the CLI turn it on, with C = 20)
    participation: ParticipationConfig | None = None
    mqtt: MqttIdentity = field(default_factory=MqttIdentity)
    authenticator: UpdateAuthenticator | None = None
    manifest_signer: EnvelopeSigner | None = None

    SECTIONS: ClassVar[dict[str, type[_Section]]] = {
        "task": DeviceTask,
        "outputs": Outputs,
        "limits": Limits,
        "ingest": IngestTuning,
        "mqtt": MqttIdentity,
    }
    """The sections whose fields are flat options of the same name."""

    def __post_init__(self) -> None:
        fleet_name(self.fleet)
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        self.spec  # noqa: B018  (raises KeyError/ValueError for an unknown model)
        value = self.round_deadline_s
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"round_deadline_s must be > 0, got {value}")
        # both algorithms' configs, whichever runs: they validate the remaining knobs
        self.fedbuff_config()
        self.sync_config()

    # ------------------------------------------------------------------ flat options
    @classmethod
    def build(
        cls, broker_url: str, fleet: str, model: str, state_dir: Path, **options: Any
    ) -> AggregatorConfig:
        """A config from flat options: a field of this class (``seed``, ``participation``,
        a whole section...), an aggregation option (:data:`~edgefl.aggregator.sections.
        AGGREGATION_OPTIONS`) or a field of a section (``max_packet``, ``username``...).
        ``TypeError`` for an unknown name."""
        base = cls(broker_url=broker_url, fleet=fleet, model=model, state_dir=state_dir)
        return base.replace(**options)

    def replace(self, **changes: Any) -> AggregatorConfig:
        """A copy with ``changes`` (fields of this class, or flat options as :meth:`build`
        takes them) applied, validated again."""
        flat = {k: v for k, v in changes.items() if k not in AGGREGATION_OPTIONS}
        top = section_changes(self, self.SECTIONS, flat)
        aggregation = {k: v for k, v in changes.items() if k in AGGREGATION_OPTIONS}
        if aggregation:
            options = aggregation_options(top.get("aggregation", self.aggregation))
            top["aggregation"] = resolve_aggregation(**{**options, **aggregation})
        return dataclasses.replace(self, **top)

    def options(self) -> dict[str, object]:
        """Every flat option and its value (what :meth:`build` takes)."""
        out: dict[str, object] = aggregation_options(self.aggregation)
        out.update(flat_values(self, self.SECTIONS))
        del out["aggregation"]
        return out

    # ------------------------------------------------------------------ derived values
    @property
    def algorithm(self) -> Algorithm:
        return self.aggregation.algorithm

    @property
    def spec(self) -> ModelSpec:
        return get_model_spec(self.model)

    def staleness_weight(self) -> StalenessWeight:
        return self.aggregation.staleness.weight()

    def aggregation_settings(self) -> AggregationSettings:
        """The resolved aggregation knobs (the service's FedAvg cohort is ``buffer_size``
        anonymous slots)."""
        return self.aggregation

    def fedbuff_config(self) -> FedBuffConfig:
        return self.aggregation.fedbuff_config()

    def sync_config(self) -> SyncFedAvgConfig:
        return self.aggregation.sync_config()

    def training_hints(self) -> TrainingHints:
        return self.task.hints()

    def mqtt_config(self, **overrides: Any) -> MqttConfig:
        """The aggregator's MQTT settings: its identity (:attr:`mqtt`), a fixed client id,
        persistent session, manual acks."""
        values: dict[str, Any] = {
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
            **self.mqtt.overrides(),
            "client_id": self.mqtt.client_id or f"edgefl-aggregator-{self.fleet}",
        }
        values.update(overrides)
        return MqttConfig.from_url(self.broker_url, **values)

    def expected_update_bytes(self) -> int:
        """Estimated size of one encoded update: the hinted codec's bytes per parameter times
        the model size (plus index gaps for top-k) plus the header."""
        codec = self.task.codec
        per_param = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5, "int2": 0.25}
        bpp = per_param.get(codec.quantization.value, 4.0)
        if codec.topk_fraction is not None:
            bpp = codec.topk_fraction * (bpp + 4.0)
        return int(bpp * self.spec.num_params) + 2048

    def expected_packet_bytes(self) -> int:
        """Estimated size of one update packet (updates above ``max_packet`` are chunked)."""
        return min(self.limits.max_packet, self.expected_update_bytes())

    def inflight_window(self) -> int:
        """Unacknowledged messages the broker may push to us (MQTT 5 Receive Maximum) and the
        bound of the transport's inbound queue: ``max_inflight_bytes`` worth of expected
        packets, at most 4096. Chunks of incomplete updates stay unacknowledged (up to
        ``REASSEMBLY_PARTIALS`` updates, then the oldest is evicted), so the window is at least
        ``REASSEMBLY_PARTIALS * (chunks per update - 1) + 32``: complete updates always fit.
        """
        per_update = self.expected_update_bytes()
        chunks = -(-per_update // self.limits.max_packet)
        floor = REASSEMBLY_PARTIALS * (chunks - 1) + 32
        window = self.ingest.max_inflight_bytes // self.expected_packet_bytes()
        return max(floor, min(4096, window))

    def batch_limits(self) -> tuple[int, int]:
        """``(messages, bytes)`` of one group commit: a quarter of the window each."""
        ingest = self.ingest
        return min(ingest.max_batch, self.inflight_window() // 4), ingest.max_inflight_bytes // 4
