"""The blocking half of a connection attempt, run where the event loop need not wait for it.

paho's ``Client.reconnect`` blocks: name resolution, TCP connect, TLS handshake and the
WebSocket upgrade, each bounded only by ``connect_timeout`` (10 s by default, longer for a slow
DNS). :class:`ConnectJob` runs it in a daemon thread of its own instead of the loop's default
executor, so that

* :meth:`ConnectJob.abandon` (closing the transport, a cancelled task) lets the awaiting side go
  on at once; the thread finishes in the background and closes whatever it connected;
* ``asyncio.run`` does not wait for it at exit (it joins the default executor's threads, which
  would hold a SIGTERM-ed process for up to ``connect_timeout``); a daemon thread does not hold
  the interpreter either.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class ConnectAbandoned(Exception):
    """The awaiting side gave up on the attempt (:meth:`ConnectJob.abandon`)."""


class ConnectJob(Generic[T]):
    """Run ``connect`` in a daemon thread; ``await job.result()`` gives its return value or
    raises its exception, or :class:`ConnectAbandoned` once :meth:`abandon` was called.

    ``discard`` closes what ``connect`` opened. It runs exactly when the attempt's outcome was
    not taken: on the worker thread if the job was abandoned before ``connect`` returned, else
    on the loop thread (abandoned in between, or the loop already closed: then on the worker).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        connect: Callable[[], T],
        discard: Callable[[], None],
        *,
        name: str = "edgefl-connect",
    ) -> None:
        self._loop = loop
        self._connect = connect
        self._discard = discard
        self._future: asyncio.Future[T] = loop.create_future()
        self._lock = threading.Lock()
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        """The outcome is known on the loop (connected, failed or abandoned)."""
        return self._future.done()

    async def result(self) -> T:
        """The value of ``connect()``; its exception; or :class:`ConnectAbandoned`. Cancelling
        the awaiting task abandons the job."""
        try:
            return await asyncio.shield(self._future)
        except asyncio.CancelledError:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Stop waiting (loop thread only): :meth:`result` raises :class:`ConnectAbandoned`
        now; the thread discards its connection when it finishes. No effect once done."""
        with self._lock:
            self._abandoned = True
        if not self._future.done():
            self._future.set_exception(ConnectAbandoned("connection attempt abandoned"))
            self._future.exception()  # retrieved: nobody may await it any more

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (tests); True if it finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- worker thread

    def _run(self) -> None:
        ok = True
        value: T | BaseException
        try:
            value = self._connect()
        except BaseException as exc:  # delivered to the awaiting side
            ok, value = False, exc
        with self._lock:
            abandoned = self._abandoned
        if abandoned:
            self._discard_quietly()
            if isinstance(value, BaseException):
                # paho's half-made socket (e.g. a TLS handshake that timed out) is referenced
                # only by the frames of this traceback: drop them, and it closes now
                value.__traceback__ = None
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, ok, value)
        except RuntimeError:  # the loop is closed: nobody will take the connection
            self._discard_quietly()

    def _deliver(self, ok: bool, value: T | BaseException) -> None:
        if self._future.done():  # abandoned after the thread finished
            self._discard_quietly()
            return
        if ok:
            self._future.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            self._future.set_exception(value)

    def _discard_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._discard()
