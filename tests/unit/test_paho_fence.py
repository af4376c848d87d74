"""The fence around paho's private members: checked at import, a plain-paho fallback if missing."""

from __future__ import annotations

import logging
import types

import paho.mqtt.client as mqtt
import pytest

from edgefl.transport import _paho
from edgefl.transport._paho import (
    FAST_PATH,
    BufferedClient,
    fast_path_available,
    missing_paho_internals,
)


def test_the_pinned_paho_has_every_member_the_fast_paths_use() -> None:
    assert missing_paho_internals() == ()
    assert FAST_PATH
    assert BufferedClient.fast_path


def test_a_paho_without_a_member_is_reported_by_name() -> None:
    # Arrange: paho's module with Client lacking _sock_recv and no WebSocket wrapper
    class Client(mqtt.Client):
        _sock_recv = None  # type: ignore[assignment]

    module = types.SimpleNamespace(
        Client=Client, MQTTMessage=mqtt.MQTTMessage, time_func=mqtt.time_func, MQTTv5=mqtt.MQTTv5
    )

    # Act
    missing = missing_paho_internals(module)

    # Assert
    assert missing == ("Client._sock_recv", "_WebsocketWrapper")


def test_missing_members_warn_and_choose_the_plain_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="edgefl.transport"):
        assert not fast_path_available(("Client._sock_recv",))
    assert "Client._sock_recv" in caplog.text
    assert "plain" in caplog.text
    assert fast_path_available(())


def test_without_the_fast_path_every_override_is_paho_s_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Arrange: the fallback, and a client whose paho methods we can observe
    monkeypatch.setattr(BufferedClient, "fast_path", False)
    client = BufferedClient(mqtt.CallbackAPIVersion.VERSION2)
    calls: list[str] = []
    for name in ("_sock_recv", "_handle_publish", "_handle_pingresp"):
        monkeypatch.setattr(
            mqtt.Client, name, lambda self, *a, _n=name: calls.append(_n) or b"", raising=True
        )

    # Act
    client._sock_recv(5)
    client._handle_publish()
    client._handle_pingresp()

    # Assert: straight to paho; no ping barrier offered
    assert calls == ["_sock_recv", "_handle_publish", "_handle_pingresp"]
    assert client.pings_answered == 0
    with pytest.raises(ConnectionError, match="ping barrier"):
        client.ping()
    assert _paho.WebSocketConnection.__mro__[1] is mqtt._WebsocketWrapper
