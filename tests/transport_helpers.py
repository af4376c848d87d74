"""What the transport tests share: a fast-reconnecting configuration and reading messages."""

from __future__ import annotations

import asyncio

from edgefl.transport import InboundMessage, MqttConfig, Transport

FAST = {
    "reconnect_min_delay": 0.05,
    "reconnect_max_delay": 0.5,
    "start_timeout": 10.0,
    "protocol_probe_timeout": 0.5,
}
"""Reconnect and probe quickly (a test's broker is local), and wait up to 10 s to connect."""


def config(url: str, **overrides: object) -> MqttConfig:
    """:data:`FAST` settings for ``url``; ``overrides`` replace any setting."""
    return MqttConfig.from_url(url, **{**FAST, **overrides})


def consumer_config(url: str, client_id: str, **overrides: object) -> MqttConfig:
    """:func:`config` of a consumer like the aggregator: a persistent session that acknowledges
    each message itself (``manual_ack``)."""
    return config(url, client_id=client_id, persistent_session=True, manual_ack=True, **overrides)


async def receive(
    transport: Transport, count: int = 1, within: float = 5.0
) -> list[InboundMessage]:
    """The next ``count`` messages (TimeoutError if they do not all come ``within`` seconds)."""
    out: list[InboundMessage] = []
    stream = transport.messages()
    try:
        async with asyncio.timeout(within):
            async for message in stream:
                out.append(message)
                if len(out) == count:
                    break
    finally:
        await stream.aclose()
    return out
