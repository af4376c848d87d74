"""MqttConfig's sections: flat overrides go to the right record and come back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.transport import MqttConfig
from edgefl.transport.base import Backpressure


def test_flat_overrides_land_in_their_sections() -> None:
    config = MqttConfig.from_url(
        "mqtts://u:p@broker:8884", ca_file=Path("ca.pem"), max_inflight=7,
        backpressure=Backpressure.DROP_NEWEST, connect_timeout=3.0, client_id="c",
    )  # fmt: skip

    assert (config.host, config.port, config.username, config.client_id) == (
        "broker",
        8884,
        "u",
        "c",
    )
    assert config.tls_files.ca_file == Path("ca.pem")
    assert (config.flow.max_inflight, config.flow.backpressure) == (7, Backpressure.DROP_NEWEST)
    assert config.timing.connect_timeout == 3.0
    assert MqttConfig.build(**config.options()) == config


def test_replace_changes_one_option_and_keeps_the_rest() -> None:
    config = MqttConfig.from_url("mqtt://broker", max_queued_messages=50, start_timeout=None)

    changed = config.replace(max_queued_messages=9, keepalive=5)

    assert (changed.flow.max_queued_messages, changed.keepalive) == (9, 5)
    assert changed.timing.start_timeout is None


def test_section_and_cross_section_checks_still_hold() -> None:
    with pytest.raises(ValueError, match="TLS options given for a plain"):
        MqttConfig.from_url("mqtt://broker", tls_insecure=True)
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        MqttConfig.from_url("mqtts://broker", cert_file=Path("c.pem"))
    with pytest.raises(ValueError, match="reconnect_min_delay"):
        MqttConfig.from_url("mqtt://broker", reconnect_min_delay=5.0, reconnect_max_delay=1.0)
    with pytest.raises(TypeError):
        MqttConfig.from_url("mqtt://broker", max_inflights=3)
