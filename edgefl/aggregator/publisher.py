"""Publishing versions and server state: the asyncio side of :mod:`~edgefl.aggregator.publish`.

:class:`Publisher` owns what is on the broker's retained topics:

* **releases**: the newest committed version (:meth:`Publisher.want`) is published by the
  :meth:`~Publisher.run` task, coalesced (a burst of versions publishes the newest only),
  serialised and never backwards: retained chunks first, then the manifest
  (``docs/PROTOCOL.md`` §5), each chunk set recorded in the state store;
* **old chunks**: :meth:`~Publisher.housekeeping` clears chunk sets that
  :class:`~edgefl.aggregator.publish.RetainedChunks` says are due, and forgets them in the store;
* **server state**: the retained ``server/state`` message (:meth:`~Publisher.publish_state`),
  built by the service's ``server_state`` callback, and the connection's Last Will that says
  ``lost`` (:func:`server_state_will`);
* **metrics**: a METRICS message on ``server/metrics`` (QoS 0) with the server state refreshed
  (:meth:`~Publisher.publish_metrics`), its rates from :class:`RateMeter`.

Both the single aggregator and the sharded root (:mod:`edgefl.sharding.service`) publish
through this module, so devices and monitors cannot tell them apart by these topics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.publish import Release, RetainedChunks, build_model_packets, clear_packets
from edgefl.protocol import (
    ServerMetrics,
    ServerState,
    ServerStatus,
    encode_message,
    server_metrics_topic,
    server_state_topic,
)
from edgefl.transport import Transport, TransportError, Will

__all__ = ["PublishedSets", "Publisher", "RateMeter", "server_state_will"]

log = logging.getLogger("edgefl.aggregator")

_RETRY_S = 0.5
_HOUSEKEEPING_S = 0.5


def server_state_will(lost: ServerState) -> Will:
    """The Last Will of an aggregator's connection: ``lost`` (a server state with status
    ``lost``) retained on the server state topic at QoS 1, which the broker publishes when the
    connection ends without DISCONNECT (a crash, SIGKILL, a cut network; PROTOCOL.md §4.2)."""
    return Will(server_state_topic(lost.fleet), encode_message(lost), qos=1, retain=True)


class RateMeter:
    """Per-second rates of monotone totals over the period since the previous reading:
    ``rate_i = max(0, (x_i(now) - x_i(last)) / max(now - last, 1e-9))`` (sans-IO)."""

    def __init__(self, now: float, totals: Sequence[int]) -> None:
        self._last = (now, tuple(totals))

    def read(self, now: float, totals: Sequence[int]) -> tuple[float, ...]:
        """The rates since the previous reading (or the start); this reading becomes the last."""
        then, before = self._last
        dt = max(now - then, 1e-9)
        self._last = (now, tuple(totals))
        return tuple(max(0.0, (x - x0) / dt) for x, x0 in zip(totals, before, strict=True))


class PublishedSets(Protocol):
    """Where a publisher records the chunk sets it left on the broker (a restarted process
    clears them): :class:`~edgefl.aggregator.store.StateStore`, or the sharded root's file."""

    def record_published(self, version: int, artifact: str, num_chunks: int) -> None: ...

    def forget_published(self, entries: Iterable[tuple[int, str]]) -> None: ...


class Publisher:
    """Releases, retained chunk sets and server state of one aggregator on one transport."""

    def __init__(
        self,
        config: AggregatorConfig,
        transport: Transport,
        *,
        store: PublishedSets,
        writer: concurrent.futures.Executor,
        retained: RetainedChunks,
        release: Release,
        server_state: Callable[[ServerStatus], ServerState],
    ) -> None:
        self._config = config
        self._transport = transport
        self._store = store
        self._writer = writer
        self._retained = retained
        self._release = release  # the newest committed version
        self._server_state = server_state
        self._wanted = asyncio.Event()
        self._lock = asyncio.Lock()
        self.published_version: int | None = None  # None until the first manifest went out

    def want(self, release: Release | None = None) -> None:
        """Publish ``release`` (a newer committed version), or republish the current one."""
        if release is not None:
            self._release = release
        self._wanted.set()

    async def run(self) -> None:
        """The publisher task: publish what :meth:`want` asked for, retrying on errors."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.publish(self._release)
                await self.publish_state(ServerStatus.ONLINE)
            except TransportError as exc:
                log.warning("publishing version failed (%s); will retry", exc)
                self._wanted.set()
                await asyncio.sleep(_RETRY_S)

    async def publish_current(self) -> None:
        """Publish the newest committed version now (at start-up)."""
        await self.publish(self._release)

    async def publish_final(self) -> None:
        """At shutdown: the newest version if it is not out yet, then server state ``offline``."""
        if self._release.version != self.published_version:
            await self.publish(self._release)
        await self.publish_state(ServerStatus.OFFLINE)

    async def publish(self, release: Release) -> None:
        """Publish one version (chunks, then manifest); serialised, never backwards."""
        async with self._lock:
            if self.published_version is not None and release.version < self.published_version:
                return
            await self._publish_locked(release)

    async def _publish_locked(self, release: Release) -> None:
        cfg, transport = self._config, self._transport
        onnx = None
        if cfg.outputs.publish_onnx:
            from edgefl.models.onnx_export import export_onnx

            onnx = await asyncio.to_thread(export_onnx, cfg.spec, release.weights)
        packets = await asyncio.to_thread(
            lambda: build_model_packets(
                fleet=cfg.fleet,
                spec=cfg.spec,
                version=release.version,
                weights=release.weights,
                created_at=release.created_at,
                hints=cfg.training_hints(),
                max_packet=cfg.limits.max_packet,
                onnx=onnx,
                signer=cfg.manifest_signer,
            )
        )
        await asyncio.gather(
            *(transport.publish(t, p, qos=1, retain=True) for t, p in packets.chunks)
        )
        await transport.publish(packets.manifest_topic, packets.manifest, qos=1, retain=True)
        self.published_version = release.version
        now = time.monotonic()
        entries = [(release.version, "weights", packets.num_chunks)]
        if packets.onnx_chunks:
            entries.append((release.version, "onnx", packets.onnx_chunks))
        loop = asyncio.get_running_loop()
        for version, artifact, n in entries:
            self._retained.published(version, artifact, n, now)
            await loop.run_in_executor(
                self._writer, self._store.record_published, version, artifact, n
            )

    async def publish_state(self, status: ServerStatus) -> None:
        """The retained server state message, with ``status``."""
        payload = encode_message(self._server_state(status))
        topic = server_state_topic(self._config.fleet)
        await self._transport.publish(topic, payload, qos=1, retain=True)

    async def publish_metrics(self, metrics: ServerMetrics) -> None:
        """One METRICS message (QoS 0, not retained), then the server state ``online`` (its
        ``at`` refreshed: a monitor sees the server alive between versions)."""
        await self._transport.publish(
            server_metrics_topic(self._config.fleet), encode_message(metrics), qos=0
        )
        await self.publish_state(ServerStatus.ONLINE)

    async def housekeeping(self) -> None:
        """The housekeeping task: clear old chunk sets every half second."""
        while True:
            await asyncio.sleep(_HOUSEKEEPING_S)
            try:
                await self.clear_old_chunks()
            except TransportError as exc:
                log.warning("clearing old model chunks failed: %s", exc)

    async def clear_old_chunks(self) -> None:
        """Clear the chunk sets that are due (empty retained payloads) and forget them."""
        due = self._retained.due(time.monotonic())
        if not due:
            return
        for version, artifact, n in due:
            topics = clear_packets(self._config.fleet, version, artifact, n)
            await asyncio.gather(
                *(self._transport.publish(t, b"", qos=1, retain=True) for t in topics)
            )
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self._store.forget_published, [(v, a) for v, a, _ in due]
        )
