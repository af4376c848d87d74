"""Shared fixtures: real brokers for integration tests.

* ``mosquitto``: a fresh Mosquitto per test on a free port with ``broker/conf/dev.conf``, state in
  the test's tmp dir. The object has ``.url``, ``.port``, ``.start()``, ``.stop()`` (graceful,
  saves persistence), ``.kill()`` (SIGKILL), ``.save()`` (SIGUSR1: write persistence now),
  ``.restart()`` and ``.log_tail()``. Without a ``mosquitto`` binary the test fails (never
  skips): ``bash .ci/setup`` installs it (see ``tests/needs.py``).
* ``embedded_broker``: the amqtt broker (MQTT 3.1.1 only) in a background thread, ``.url``.

Async tests are plain ``async def test_...`` functions (pytest-asyncio in auto mode).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import needs
import pytest

from broker.launcher import MosquittoBroker, ThreadedEmbeddedBroker


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A running Mosquitto (dev config) on a free port, stopped after the test."""
    broker = MosquittoBroker(state_dir=tmp_path / "mosquitto", binary=Path(needs.mosquitto()))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def embedded_broker() -> Iterator[ThreadedEmbeddedBroker]:
    """The embedded amqtt broker on a free port, in its own thread and event loop."""
    broker = ThreadedEmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """Commands run in-process (``edgefl.cli.main([...])``) configure root logging with a handler
    on the test's captured stderr; put the root logger back so later tests never write to a
    closed stream."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
