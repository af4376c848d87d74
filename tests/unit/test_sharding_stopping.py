"""The tree's signal stop (``edgefl.sharding.stopping.run_until_signalled``), in-process with
real signals sent to this process: a graceful stop sets the event and lets the main coroutine
finish; a second signal, the grace period, or a signal while not graceful cancels it; a
cancellation no signal caused, and the main coroutine's errors, propagate."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from edgefl.sharding.stopping import run_until_signalled


def _send(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)


async def test_a_graceful_stop_lets_the_main_coroutine_finish() -> None:
    finished: list[str] = []

    async def main(stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(0.05)  # the goodbye
        finished.append("goodbye")

    asyncio.get_running_loop().call_soon(_send, signal.SIGTERM)
    got = await run_until_signalled(main, graceful=lambda: True)

    assert got is signal.SIGTERM
    assert finished == ["goodbye"]


async def test_a_second_signal_cancels() -> None:
    cancelled: list[bool] = []

    async def main(stop: asyncio.Event) -> None:
        await stop.wait()
        _send(signal.SIGINT)  # the impatient operator
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    asyncio.get_running_loop().call_soon(_send, signal.SIGINT)
    async with asyncio.timeout(5):
        got = await run_until_signalled(main, graceful=lambda: True, grace_s=60)

    assert got is signal.SIGINT
    assert cancelled == [True]


async def test_the_grace_period_ends_a_slow_stop() -> None:
    async def main(stop: asyncio.Event) -> None:
        await stop.wait()
        await asyncio.sleep(30)  # a goodbye that never ends

    loop = asyncio.get_running_loop()
    loop.call_soon(_send, signal.SIGTERM)
    started = loop.time()
    got = await run_until_signalled(main, graceful=lambda: True, grace_s=0.1)

    assert got is signal.SIGTERM
    assert loop.time() - started < 5


async def test_not_graceful_cancels_at_once() -> None:
    async def main(stop: asyncio.Event) -> None:
        await asyncio.sleep(30)  # e.g. connecting; never looks at stop

    asyncio.get_running_loop().call_soon(_send, signal.SIGTERM)
    async with asyncio.timeout(5):
        got = await run_until_signalled(main, graceful=lambda: False, grace_s=60)

    assert got is signal.SIGTERM


async def test_the_main_coroutines_error_and_an_outside_cancel_propagate() -> None:
    async def fails(stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    async def waits(stop: asyncio.Event) -> None:
        await asyncio.sleep(30)

    with pytest.raises(RuntimeError, match="boom"):
        await run_until_signalled(fails, graceful=lambda: True)
    task = asyncio.create_task(run_until_signalled(waits, graceful=lambda: True))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the handlers are gone: the default SIGTERM handler is back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


async def test_an_outside_cancel_during_a_signalled_cancel_propagates() -> None:
    async def main(stop: asyncio.Event) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # a slow cleanup
            raise

    loop = asyncio.get_running_loop()
    task = loop.create_task(run_until_signalled(main, graceful=lambda: False))
    await asyncio.sleep(0.01)
    _send(signal.SIGTERM)  # cancels main at once; its cleanup runs
    await asyncio.sleep(0.05)
    task.cancel()  # and the owner cancels the whole run meanwhile

    with pytest.raises(asyncio.CancelledError):
        await task
