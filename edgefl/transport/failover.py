"""``FailoverTransport``: one :class:`~edgefl.transport.base.Transport` over the nodes of a
clustered broker, given as a list of broker URLs.

It wraps :class:`~edgefl.transport.mqtt.MqttTransport` (which reconnects to one host only):
exactly one member transport, connected to one node, is current at a time. When the current
member has been disconnected for ``failover_after`` seconds (or cannot connect at start within
``node_timeout``), it is closed abruptly and the next URL in the list (cyclically) becomes the
current member, with the same client id, session settings, Will and ``on_connect`` hook, and
with every remembered subscription renewed. A clustered broker keeps a persistent session
cluster-wide (NATS: in JetStream), so the new node resumes it: messages not acknowledged on the
old node are redelivered (at-least-once; consumers deduplicate, e.g. by ``(device_id, seq)``).

Delivery contract, as for ``Transport``:

* ``publish`` returns once some node acknowledged the message (QoS 1: PUBACK). A publish cut off
  by a failover (the member was closed before its PUBACK) is sent again on the next member, so
  a message may arrive twice, never zero times once ``publish`` returned.
* ``messages()`` yields from the current member and continues with the next after a failover.
* ``ack`` forwards to the member that delivered the message; an ack for a message of a member
  already replaced is not sent (``stale_acks``): the broker redelivers that message.

What the transport itself should gain instead of this wrapper (see docs/SCALING.md): a list of
URLs in ``MqttConfig`` tried by the supervisor on reconnect, so paho's unacknowledged outbound
QoS 1 messages are retransmitted on the new node instead of being published again here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any, Self

from edgefl.transport.base import (
    BrokerUnreachable,
    InboundMessage,
    OnConnect,
    TransportClosed,
    TransportStatistics,
)
from edgefl.transport.config import MqttConfig
from edgefl.transport.mqtt import MqttTransport

log = logging.getLogger("edgefl.transport.failover")


@dataclasses.dataclass(frozen=True)
class FailoverStatistics:
    """Counters of the failover layer (the current member's own are in ``statistics()``)."""

    current_url: str
    failovers: int
    """Members replaced because their node was unreachable."""
    republished: int
    """Publishes sent again on a new member after the old one was closed before the PUBACK."""
    stale_acks: int
    """Acks for messages of a replaced member: not sent, the broker redelivers them."""


class FailoverTransport:
    """A transport over a list of broker nodes; see the module docstring."""

    def __init__(
        self,
        configs: Sequence[MqttConfig],
        *,
        on_connect: OnConnect | None = None,
        failover_after: float = 3.0,
        node_timeout: float = 10.0,
        start_timeout: float | None = 60.0,
    ) -> None:
        if not configs:
            raise ValueError("FailoverTransport needs at least one broker")
        if failover_after <= 0 or node_timeout <= 0:
            raise ValueError("failover_after and node_timeout must be > 0")
        client_id = configs[0].client_id
        if any(c.client_id != client_id for c in configs):
            raise ValueError("every node's config must use the same client_id")
        self._configs = [c.replace(start_timeout=None) for c in configs]
        self._on_connect = on_connect
        self._failover_after = failover_after
        self._node_timeout = node_timeout
        self._start_timeout = start_timeout
        self._index = 0
        self._member: MqttTransport | None = None
        self._changed = asyncio.Event()
        self._subscriptions: dict[str, int] = {}
        self._unacked: dict[int, tuple[MqttTransport, InboundMessage]] = {}
        self._tokens = itertools.count(1)
        self._closed = False
        self._watchdog: asyncio.Task[None] | None = None
        self._failovers = self._republished = self._stale_acks = 0

    @classmethod
    def from_urls(cls, urls: Sequence[str], **overrides: Any) -> FailoverTransport:
        """Configs from broker URLs; ``overrides`` go to every :meth:`MqttConfig.from_url`
        except the failover settings ``failover_after``, ``node_timeout``, ``start_timeout``
        and ``on_connect``, which go to the constructor."""
        own = {k: overrides.pop(k) for k in list(overrides) if k in _OWN_SETTINGS}
        return cls([MqttConfig.from_url(url, **overrides) for url in urls], **own)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Self:
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._connect_some_node()
        except TimeoutError:
            await self.close()
            urls = ", ".join(c.url for c in self._configs)
            raise BrokerUnreachable(urls, "no node answered", self._start_timeout) from None
        except BaseException:
            await self.close()
            raise
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, *, abrupt: bool = False) -> None:
        """Close the current member (``abrupt``: without DISCONNECT, the Will fires)."""
        self._closed = True
        self._changed.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        member, self._member = self._member, None
        if member is not None:
            await member.close(abrupt=abrupt)

    @property
    def current_url(self) -> str:
        return self._configs[self._index].url

    @property
    def connected(self) -> bool:
        return self._member is not None and self._member.connected

    # ------------------------------------------------------------------ Transport API
    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the current member; again on the next one if a failover cut it off."""
        while True:
            member = await self._current()
            try:
                await member.publish(topic, payload, qos=qos, retain=retain)
                return
            except TransportClosed:
                if self._closed:
                    raise
            self._republished += 1

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe on the current member; renewed on every member after a failover."""
        self._subscriptions[topic_filter] = qos
        while True:
            member = await self._current()
            try:
                await member.subscribe(topic_filter, qos=qos)
                return
            except TransportClosed:
                if self._closed:
                    raise

    async def messages(self) -> AsyncGenerator[InboundMessage, None]:
        """Inbound messages of the current member, then of the next, until closed."""
        while not self._closed:
            member = self._member
            if member is None:
                await self._wait_changed()
                continue
            async for message in member.messages():
                if message.ack_token:
                    token = next(self._tokens)
                    self._unacked[token] = (member, message)
                    message = dataclasses.replace(message, ack_token=token)
                yield message
            if member is self._member and not self._closed:
                await self._wait_changed()  # closed under us: a failover is about to swap

    async def ack(self, message: InboundMessage) -> None:
        entry = self._unacked.pop(message.ack_token, None)
        if entry is None:
            return
        member, original = entry
        if member is not self._member:
            self._stale_acks += 1
            return
        await member.ack(original)

    async def ack_many(self, messages: Iterable[InboundMessage]) -> None:
        for message in messages:
            await self.ack(message)

    def statistics(self) -> TransportStatistics:
        """The current member's counters (a fresh member starts from zero)."""
        if self._member is None:
            return _NO_MEMBER
        return self._member.statistics()

    def failover_statistics(self) -> FailoverStatistics:
        return FailoverStatistics(
            self.current_url, self._failovers, self._republished, self._stale_acks
        )

    # ------------------------------------------------------------------ members
    async def _connect_some_node(self) -> None:
        """Try the nodes in order from the current index until one connects."""
        while not self._closed:
            member = MqttTransport(self._configs[self._index], on_connect=self._on_connect)
            await member.start()
            try:
                await member.wait_connected(self._node_timeout)
            except BrokerUnreachable as exc:
                log.warning("failover: %s unreachable (%s)", self.current_url, exc.reason)
                await member.close(abrupt=True)
                self._index = (self._index + 1) % len(self._configs)
                continue
            self._install(member)
            return
        raise TransportClosed("transport closed")

    def _install(self, member: MqttTransport) -> None:
        self._member = member
        for topic_filter, qos in self._subscriptions.items():
            asyncio.get_running_loop().create_task(self._renew(member, topic_filter, qos))
        self._changed.set()

    async def _renew(self, member: MqttTransport, topic_filter: str, qos: int) -> None:
        with contextlib.suppress(TransportClosed):
            await member.subscribe(topic_filter, qos=qos)

    async def _watch(self) -> None:
        """Replace the member once it has been disconnected for ``failover_after`` s."""
        down_since: float | None = None
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(min(0.1, self._failover_after / 4))
            member = self._member
            if member is None or member.connected:
                down_since = None
                continue
            down_since = down_since if down_since is not None else loop.time()
            if loop.time() - down_since < self._failover_after:
                continue
            log.warning("failover: leaving %s", self.current_url)
            self._failovers += 1
            self._member = None
            self._drop_unacked(member)
            await member.close(abrupt=True)
            self._index = (self._index + 1) % len(self._configs)
            await self._connect_some_node()
            down_since = None

    def _drop_unacked(self, member: MqttTransport) -> None:
        for token in [t for t, (m, _) in self._unacked.items() if m is member]:
            del self._unacked[token]
            self._stale_acks += 1

    async def _current(self) -> MqttTransport:
        while True:
            if self._closed:
                raise TransportClosed("transport closed")
            if self._member is not None:
                return self._member
            await self._wait_changed()

    async def _wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()


_NO_MEMBER = TransportStatistics(
    connected=False,
    protocol=None,
    connects=0,
    reconnects=0,
    connect_failures=0,
    published=0,
    published_bytes=0,
    received=0,
    received_bytes=0,
    acked=0,
    stale_acks=0,
    queued=0,
    queue_high_water=0,
    read_pauses=0,
)
_OWN_SETTINGS = frozenset({"failover_after", "node_timeout", "start_timeout", "on_connect"})
