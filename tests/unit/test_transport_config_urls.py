"""Broker URLs: schemes, default ports and paths, WebSocket paths, display_url round trip; lists
of the nodes of a clustered broker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from agent_files import agent_config
from hypothesis import given
from hypothesis import strategies as st
from test_aggregator_service import make_config

from device_agent.agent import mqtt_transport_factory
from device_agent.config import BrokerConfig, ConfigError
from edgefl.monitor.cli import _check_fleet_and_broker
from edgefl.transport import (
    DEFAULT_WEBSOCKET_PATH,
    BrokerUrl,
    ConnectInfo,
    MqttConfig,
    MqttTransport,
    Will,
    parse_broker_urls,
)


@pytest.mark.parametrize(
    ("url", "host", "port", "tls", "path"),
    [
        ("mqtt://broker", "broker", 1883, False, None),
        ("tcp://broker:1884", "broker", 1884, False, None),
        ("mqtts://broker", "broker", 8883, True, None),
        ("ssl://broker", "broker", 8883, True, None),
        ("tls://broker/", "broker", 8883, True, None),
        ("ws://broker", "broker", 80, False, "/mqtt"),
        ("wss://broker", "broker", 443, True, "/mqtt"),
        ("ws://broker:9001", "broker", 9001, False, "/mqtt"),
        ("wss://broker:8884/mqtt", "broker", 8884, True, "/mqtt"),
        ("ws://broker/", "broker", 80, False, "/"),
        ("ws://broker:8083/a/b%20c", "broker", 8083, False, "/a/b%20c"),
        ("WSS://Broker.Example:443/ws", "broker.example", 443, True, "/ws"),
        ("ws://[::1]:8080/mqtt", "::1", 8080, False, "/mqtt"),
    ],
)
def test_parse_gives_host_port_tls_and_path(
    url: str, host: str, port: int, tls: bool, path: str | None
) -> None:
    # Act
    parsed = BrokerUrl.parse(url)

    # Assert
    assert (parsed.host, parsed.port, parsed.tls, parsed.websocket_path) == (host, port, tls, path)


def test_websocket_default_path_is_mqtt() -> None:
    assert DEFAULT_WEBSOCKET_PATH == "/mqtt"
    assert BrokerUrl.parse("wss://b").websocket_path == "/mqtt"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "unsupported broker URL scheme 'ftp'"),
        ("http://x", "use one of: mqtt, tcp, mqtts, ssl, tls, ws, wss"),
        ("ws://", "without host"),
        ("ws://:80/mqtt", "without host"),
        ("ws://x:0", "bad port"),
        ("ws://x:65536", "bad port"),
        ("ws://x:port", "bad port"),
        ("mqtt://x/path", "only ws:// and wss:// broker URLs take a path"),
        ("ws://x/mqtt?token=1", "no query or fragment"),
        ("ws://x/mqtt#frag", "no query or fragment"),
        ("mqtt://x?", "no query or fragment"),
        ("ws://x/a b", "bad WebSocket path"),
        ("ws://x/a\r\nHost: evil", "bad WebSocket path"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        BrokerUrl.parse(url)


def test_credentials_are_percent_decoded_and_kept_out_of_display_url() -> None:
    # Act
    parsed = BrokerUrl.parse("wss://dev%401:p%3Ass@broker:8884/mqtt")

    # Assert
    assert (parsed.username, parsed.password) == ("dev@1", "p:ss")
    assert parsed.display_url == "wss://broker:8884/mqtt"
    assert "p:ss" not in repr(parsed)


def test_mqtt_config_from_url_carries_websocket_path_and_tls_options() -> None:
    # Act
    cfg = MqttConfig.from_url("wss://broker/custom", tls_insecure=True, client_id="c")

    # Assert
    assert (cfg.host, cfg.port, cfg.tls, cfg.websocket_path) == ("broker", 443, True, "/custom")
    assert cfg.tls_files.tls_insecure
    assert cfg.url == "wss://broker:443/custom"


def test_tls_options_on_plain_websockets_are_rejected() -> None:
    with pytest.raises(ValueError, match="TLS options given for a plain"):
        MqttConfig.from_url("ws://broker", tls_insecure=True)


def test_mqtt_config_validates_a_websocket_path_given_as_override() -> None:
    with pytest.raises(ValueError, match="bad WebSocket path"):
        MqttConfig.from_url("ws://broker", websocket_path="no-slash")


def test_explicit_port_wins_over_every_scheme_default() -> None:
    for scheme in ("mqtt", "mqtts", "ws", "wss"):
        assert BrokerUrl.parse(f"{scheme}://b:1234").port == 1234


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=4).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_paths = st.one_of(
    st.none(),
    st.from_regex(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]{0,20}", fullmatch=True),
)


@given(
    host=_hosts,
    port=st.integers(1, 65535),
    tls=st.booleans(),
    path=_paths,
)
def test_display_url_round_trips(host: str, port: int, tls: bool, path: str | None) -> None:
    # Arrange
    url = BrokerUrl(host=host, port=port, tls=tls, websocket_path=path)

    # Act
    again = BrokerUrl.parse(url.display_url)

    # Assert
    assert again == url
    assert MqttConfig.from_url(url.display_url).url == url.display_url


# --------------------------------------------------------------------------- lists of nodes


def test_a_comma_list_gives_the_first_node_and_fallbacks_in_order() -> None:
    # Act
    config = MqttConfig.from_url("mqtt://user:pw@a:1884, mqtt://b ,mqtt://user:pw@c:1999")

    # Assert: credentials from the URLs, nodes in the given order, display without credentials
    assert (config.host, config.port, config.username, config.password) == ("a", 1884, "user", "pw")
    assert config.fallbacks == (BrokerUrl("b", 1883), BrokerUrl("c", 1999))
    assert [n.display_url for n in config.endpoints] == [
        "mqtt://a:1884", "mqtt://b:1883", "mqtt://c:1999",
    ]  # fmt: skip
    assert config.urls == "mqtt://a:1884,mqtt://b:1883,mqtt://c:1999"
    assert config.url == "mqtt://a:1884"
    assert parse_broker_urls("wss://a/x,wss://b:8884")[1].websocket_path == "/mqtt"
    assert parse_broker_urls("ws://a/p,q , ws://b")[0].websocket_path == "/p,q"  # a path's comma


def test_one_url_has_no_fallbacks() -> None:
    config = MqttConfig.from_url("mqtts://a")
    assert (config.fallbacks, config.endpoints) == ((), (BrokerUrl("a", 8883, tls=True),))


@pytest.mark.parametrize(
    ("urls", "message"),
    [
        ("mqtt://a,mqtts://b", "'mqtts://b' is mqtts:// but the first broker URL is mqtt://"),
        ("ws://a,mqtt://b", "every node of a list is reached the same way"),
        ("mqtt://u:p@a,mqtt://v:p@b", "the same credentials"),
        ("mqtt://a,", "bad host 'a,' in 'mqtt://a,'"),
        ("mqtt://a,,mqtt://b", "empty entry in the broker URL list"),
        ("mqtt://a,b:1883", "bad host 'a,b' in 'mqtt://a,b:1883': each URL of a list starts"),
    ],
)
def test_a_bad_list_is_refused_naming_the_url(urls: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        MqttConfig.from_url(urls)


def test_fallbacks_given_directly_must_match_the_connection_kind() -> None:
    with pytest.raises(ValueError, match="every node of a list is reached the same way"):
        MqttConfig(host="a", fallbacks=(BrokerUrl("b", 8883, tls=True),))


async def _no_hook(info: ConnectInfo) -> None:
    pass


def test_the_aggregator_agent_and_monitor_configs_take_a_list(tmp_path: Path) -> None:
    # Arrange
    urls = "mqtt://a:1883,mqtt://b:1884"
    nodes = (BrokerUrl("a", 1883), BrokerUrl("b", 1884))

    # Act
    aggregator = make_config(tmp_path, broker_url=urls).mqtt_config()
    agent = agent_config(tmp_path, urls, fleet="f", device="d", state_dir=tmp_path / "s")
    transport = mqtt_transport_factory(agent)(Will("w", b""), _no_hook)
    monitor_url = _check_fleet_and_broker("f", urls)

    # Assert: the aggregator's and the agent's transports get every node; the monitor's check
    # accepts the list (its transport config goes through the same MqttConfig.from_url)
    assert aggregator.endpoints == nodes
    assert (agent.broker.host, agent.broker.port) == ("a", 1883)
    assert isinstance(transport, MqttTransport)
    assert transport.config.endpoints == nodes
    assert monitor_url == nodes[0]
    with pytest.raises(ConfigError, match="every node of a list"):
        BrokerConfig(url="mqtt://a,mqtts://b")
