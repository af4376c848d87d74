"""broker/amqtt_broker.py: amqtt's log records and asyncio error reports are shown once per kind."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
from typing import Any

import pytest

from broker.amqtt_broker import AmqttExceptionHandler, OncePerKind


def _record(name: str, msg: str, *args: object, exc: BaseException | None = None) -> Any:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args or None, exc_info)


def _raised(text: str) -> TimeoutError:
    try:
        raise TimeoutError(text)
    except TimeoutError as exc:
        return exc


def test_once_per_kind_shows_the_first_record_of_each_kind_as_one_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    counter = OncePerKind()
    handler.addFilter(counter)
    logger = logging.getLogger("test.amqtt.once")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for packet_id in (1, 2, 3):  # one kind: only the packet id differs
            logger.handle(
                _record(
                    logger.name,
                    f"Task failed: Timeout waiting for PUBACK for packet ID {packet_id}",
                    exc=_raised(f"Timeout waiting for PUBACK for packet ID {packet_id}"),
                )
            )
        logger.handle(_record(logger.name, "Received PUBACK for unknown pending message Id: %s", 7))
    finally:
        logger.removeHandler(handler)

    lines = stream.getvalue().splitlines()
    assert lines == [
        "Task failed: Timeout waiting for PUBACK for packet ID 1 "
        "(TimeoutError: Timeout waiting for PUBACK for packet ID 1) "
        "(repeats are counted, not shown)",
        "Received PUBACK for unknown pending message Id: 7 (repeats are counted, not shown)",
    ]
    assert counter.repeats() == 2
    assert sorted(counter.counts.values()) == [1, 3]


def test_never_retrieved_amqtt_task_exceptions_are_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from amqtt.codecs_amqtt import read_or_raise

    others: list[dict[str, Any]] = []

    async def main() -> AmqttExceptionHandler:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: others.append(context))
        handler = AmqttExceptionHandler.install(loop)
        assert AmqttExceptionHandler.install(loop) is handler  # idempotent
        for _ in range(3):
            reader = asyncio.StreamReader()
            reader.feed_eof()
            task = asyncio.ensure_future(read_or_raise(reader, 2))  # amqtt raises NoDataError
            await asyncio.wait([task])
            del task  # its exception was never retrieved: reported when collected
            gc.collect()
        loop.call_exception_handler({"message": "not amqtt's", "exception": ValueError("x")})
        return handler

    with caplog.at_level(logging.WARNING, logger="edgefl.broker"):
        handler = asyncio.run(main())

    assert list(handler.counts.values()) == [3]
    shown = [r.getMessage() for r in caplog.records if r.name == "edgefl.broker"]
    assert len(shown) == 1
    assert "Task exception was never retrieved NoDataError" in shown[0]
    assert [c["message"] for c in others] == ["not amqtt's"]  # delegated to the previous one
