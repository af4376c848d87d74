"""The monitor's asyncio shell: one read-only MQTT connection folding into a :class:`FleetModel`.

``FleetMonitor`` connects through :class:`~edgefl.transport.MqttTransport` with its own client
id (``edgefl-monitor-<hex>``), a clean session and automatic acknowledgements, subscribes with
QoS 1 to ``edgefl/v1/<fleet>/#`` and (optionally) ``$SYS/#``, and runs one consumer task that
decodes every message (:func:`~edgefl.monitor.decode.decode_inbound`), folds it into the model
and appends a :class:`~edgefl.monitor.summary.TopicLogEntry` to a bounded log. The inbound queue
drops the newest message when full (``Backpressure.DROP_NEWEST``, counted and shown): a monitor
prefers fresh data to stalling the broker. It publishes nothing, except when
:meth:`FleetMonitor.clear_retained` is called explicitly.

Torch is never imported here (``tests/unit/test_monitor_imports.py`` checks it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from edgefl.lifecycle import AsyncLifecycle
from edgefl.protocol.topics import (
    all_fleet_filter,
    device_states_filter,
    fleet_name,
    manifest_topic,
    server_state_topic,
)
from edgefl.transport.base import (
    Backpressure,
    BrokerRefused,
    InboundMessage,
    Transport,
    topic_matches,
)
from edgefl.transport.config import MqttConfig
from edgefl.transport.mqtt import MqttTransport

from .decode import SYS_PREFIX, decode_inbound
from .model import FleetModel, FleetModelConfig
from .snapshot import ConnectionView, FleetSnapshot
from .summary import TopicLogEntry, log_entry

__all__ = ["SYS_FILTER", "FleetMonitor", "fleet_filters", "monitor_mqtt_config"]

log = logging.getLogger("edgefl.monitor")

SYS_FILTER = "$SYS/#"

Listener = Callable[[TopicLogEntry], None]


def monitor_mqtt_config(url: str, **overrides: Any) -> MqttConfig:
    """An :class:`MqttConfig` for a monitor: fresh client id, clean session, auto acks, drop the
    newest message when 10,000 are queued, first connection within 10 s. ``overrides`` are
    further :class:`MqttConfig` fields (``username``, ``ca_file``, ``client_id``, ...)."""
    settings: dict[str, Any] = {
        "client_id": f"edgefl-monitor-{secrets.token_hex(4)}",
        "persistent_session": False,
        "manual_ack": False,
        "backpressure": Backpressure.DROP_NEWEST,
        "max_queued_messages": 10_000,
        "start_timeout": 10.0,
    }
    settings.update(overrides)
    return MqttConfig.from_url(url, **settings)


def fleet_filters(fleet: str, *, updates: bool = True) -> list[str]:
    """What the monitor subscribes to: everything of the fleet (``edgefl/v1/<fleet>/#``), or
    without update and model-chunk packets (the bulk of the traffic) only the device states,
    the manifest and the server topics."""
    if updates:
        return [all_fleet_filter(fleet)]
    return [device_states_filter(fleet), manifest_topic(fleet), server_filter(fleet)]


def server_filter(fleet: str) -> str:
    """``edgefl/v1/<fleet>/server/+``: server state and metrics."""
    return server_state_topic(fleet).rsplit("/", 1)[0] + "/+"


class FleetMonitor(AsyncLifecycle):
    """Watch one fleet. Use as ``async with FleetMonitor(config, fleet) as monitor:``.

    ``include_updates=False`` leaves update and model-chunk packets out of the subscription
    (:func:`fleet_filters`), for busy fleets. ``topic_filters`` restrict the topic log (and
    listeners; by default ``$SYS`` is left out of the log), never the model: the fleet model
    always folds everything received. ``clock`` gives wall time (Unix seconds). ``transport``
    replaces the ``MqttTransport`` built from ``config`` (e.g. a ``MemoryTransport`` in tests;
    ``config`` then only names the broker in the connection panel).
    """

    def __init__(
        self,
        config: MqttConfig,
        fleet: str,
        *,
        include_sys: bool = True,
        include_updates: bool = True,
        model_config: FleetModelConfig | None = None,
        topic_filters: Sequence[str] = (),
        log_size: int = 500,
        clock: Callable[[], float] = time.time,
        transport: Transport | None = None,
    ) -> None:
        self.fleet = fleet_name(fleet)
        self.config = config
        self.model = FleetModel(self.fleet, model_config)
        self.log: deque[TopicLogEntry] = deque(maxlen=log_size)
        self.include_sys = include_sys
        self.include_updates = include_updates
        self.topic_filters = tuple(topic_filters)
        self._clock = clock
        self._transport: Transport = transport if transport is not None else MqttTransport(config)
        self.logged = 0
        self.internal_errors = 0
        """Entries appended to ``log`` so far (the log keeps the last ``log_size``)."""
        self._subscriptions: list[str] = []
        self._retained: set[str] = set()
        self._listeners: list[Listener] = []
        self._consumer: asyncio.Task[None] | None = None
        self._subscribed_at: float | None = None
        self._last_retained: float | None = None
        self._activity = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect (bounded by ``config.start_timeout``), subscribe, start consuming."""
        await self._transport.__aenter__()
        try:
            self._consumer = asyncio.get_running_loop().create_task(
                self._consume(), name="edgefl-monitor-consumer"
            )
            for topic_filter in fleet_filters(self.fleet, updates=self.include_updates):
                await self._transport.subscribe(topic_filter, qos=1)
                self._subscriptions.append(topic_filter)
            if self.include_sys:
                try:
                    await self._transport.subscribe(SYS_FILTER, qos=1)
                    self._subscriptions.append(SYS_FILTER)
                except BrokerRefused as exc:  # ACLs may forbid $SYS: the panel shows n/a
                    log.info("no broker statistics: %s", exc)
            self._subscribed_at = time.monotonic()
        except BaseException:
            await self.close()
            raise

    open = start

    async def close(self) -> None:
        await self._transport.close()
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer

    # ------------------------------------------------------------------ consuming

    async def _consume(self) -> None:
        async for message in self._transport.messages():
            try:
                self.handle(message)
            except Exception:  # a bug must not silently stop the monitor: log, go on
                self.internal_errors += 1
                log.exception("monitor: failed to handle a message on %r", message.topic[:200])

    def handle(self, message: InboundMessage) -> TopicLogEntry:
        """Decode and fold one message; returns (and logs) its topic-log entry."""
        now = self._clock()
        payload = message.payload
        obs = decode_inbound(message.topic, payload, fleet=self.fleet, now=now)
        self.model.count_message(len(payload))
        self.model.apply(obs, now=now, retained=message.retain)
        if message.retain:
            self._last_retained = time.monotonic()
        if payload and message.retain:
            self._retained.add(message.topic)
        elif not payload:
            self._retained.discard(message.topic)
        entry = log_entry(
            obs,
            topic=message.topic,
            payload=payload,
            qos=message.qos,
            retain=message.retain,
            at=now,
        )
        if self.wants(message.topic):
            self.log.append(entry)
            self.logged += 1
            for listener in self._listeners:
                listener(entry)
        self._activity.set()
        return entry

    def wants(self, topic: str) -> bool:
        """Whether ``topic`` passes the topic-log filters. Without filters: every topic but
        ``$SYS/...`` (dozens every few seconds; ask for them with a ``$SYS/#`` filter)."""
        if not self.topic_filters:
            return not topic.startswith(SYS_PREFIX)
        return any(topic_matches(f, topic) for f in self.topic_filters)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(entry)`` for every logged message (on the event loop, synchronously)."""
        self._listeners.append(listener)

    async def settle(
        self,
        *,
        quiet: float = 0.5,
        timeout: float = 5.0,  # noqa: ASYNC109
        metrics: bool = True,
    ) -> None:
        """Wait until the retained messages have arrived: no retained message for ``quiet``
        seconds since the subscription. With ``metrics``, when the retained server state says
        the aggregator is online, also wait for its first (periodic, not retained) metrics
        message, which carries rates and accuracy. Never longer than ``timeout`` seconds."""
        if self._subscribed_at is None:
            raise RuntimeError("monitor not started")
        deadline = self._subscribed_at + timeout
        while True:
            now = time.monotonic()
            last = max(self._subscribed_at, self._last_retained or 0.0)
            retained_done = now - last >= quiet
            if now >= deadline:
                return
            if retained_done and not (metrics and self.model.awaiting_metrics()):
                return
            until = deadline if retained_done else min(deadline, last + quiet)
            self._activity.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(until - now):
                    await self._activity.wait()

    # ------------------------------------------------------------------ views and actions

    def connection_view(self) -> ConnectionView:
        stats = self._transport.statistics()
        return ConnectionView(
            broker=stats.broker_url or self.config.url,  # the node in use (a URL list)
            client_id=str(getattr(self._transport, "client_id", self.config.client_id)),
            protocol=stats.protocol,
            connected=stats.connected,
            subscriptions=tuple(self._subscriptions),
            dropped=stats.dropped,
            last_error=stats.last_error,
            broker_stats=self.model.broker_stats.view(),
        )

    def snapshot(self) -> FleetSnapshot:
        return self.model.snapshot(self._clock(), connection=self.connection_view())

    @property
    def retained_topics(self) -> frozenset[str]:
        """Topics the monitor received with the retain flag and a non-empty payload."""
        return frozenset(self._retained)

    async def clear_retained(self, topics: Sequence[str]) -> None:
        """Delete retained messages: publish an empty retained payload (QoS 1) to each topic."""
        for topic in topics:
            await self._transport.publish(topic, b"", qos=1, retain=True)
