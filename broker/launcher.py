"""Start MQTT brokers for development, tests and ``edgefl broker``.

* :class:`MosquittoBroker` runs the ``mosquitto`` binary with a rendered ``conf/dev.conf`` (or
  another template) on a given or free port, with its persistence database and log in a state
  directory. It waits until the broker accepts connections and can stop (SIGTERM: the database is
  saved), kill (SIGKILL: like a crash), save (SIGUSR1) and restart on the same port.
* :class:`EmbeddedBroker` runs amqtt inside the current asyncio loop: zero setup, MQTT 3.1.1 only,
  anonymous, no persistence. It uses :mod:`broker.amqtt_broker` (no 5 s PUBACK timeout, an
  in-flight window per client); amqtt's logging is contained (each kind of record shown once, as
  one line) unless ``quiet=False``. :class:`ThreadedEmbeddedBroker` runs it on its own loop in a
  thread (``edgefl demo`` runs that in a child process).

``amqtt`` is an optional dependency, imported only when an embedded broker starts; without it
:class:`EmbeddedBrokerUnavailable` says which extra to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefl.lifecycle import AsyncLifecycle, Lifecycle

CONF_DIR = Path(__file__).resolve().parent / "conf"
DEV_CONF = CONF_DIR / "dev.conf"
_EXTRA_BIN_DIRS = (
    "/usr/sbin",
    "/usr/local/sbin",
    "/opt/homebrew/sbin",
    "/usr/local/opt/mosquitto/sbin",
)
_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


EMBEDDED_EXTRA_HINT = "pip install 'edgefl-mqtt[broker]'"
"""How to install the embedded broker's dependency (the ``broker`` extra)."""


class BrokerStartError(RuntimeError):
    """The broker process exited or did not accept connections in time."""


class EmbeddedBrokerUnavailable(BrokerStartError):
    """``amqtt`` (the embedded broker's optional dependency) is not installed."""


class PortInUse(BrokerStartError):
    """The requested listener address is taken (or cannot be bound)."""


def _import_amqtt_broker() -> Any:
    """:mod:`broker.amqtt_broker`, or :class:`EmbeddedBrokerUnavailable` naming the extra."""
    try:
        import amqtt  # noqa: F401
    except ImportError:
        raise EmbeddedBrokerUnavailable(
            f"the embedded broker needs amqtt, which is not installed: {EMBEDDED_EXTRA_HINT} "
            "(or install Mosquitto)"
        ) from None
    from broker import amqtt_broker

    return amqtt_broker


def find_mosquitto() -> Path | None:
    """The ``mosquitto`` binary from ``PATH`` or the usual sbin directories, or None."""
    found = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path=os.pathsep.join(_EXTRA_BIN_DIRS)
    )
    return Path(found) if found else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def render_config(template: str, **values: object) -> str:
    """Substitute ``${name}`` placeholders; every placeholder must be given (``$SYS`` in
    comments is left alone)."""
    missing = {m.group(1) for m in _PLACEHOLDER.finditer(template)} - values.keys()
    if missing:
        raise KeyError(f"config template needs values for: {', '.join(sorted(missing))}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float, *, alive: Any = None) -> None:
    """Poll until ``host:port`` accepts a TCP connection; ``alive()`` False aborts early."""
    deadline = time.monotonic() + timeout
    while True:
        if _accepts(host, port):
            return
        if alive is not None and not alive():
            raise BrokerStartError(f"broker on port {port} exited during start-up")
        if time.monotonic() > deadline:
            raise BrokerStartError(f"nothing accepts connections on {host}:{port} after {timeout}s")
        time.sleep(0.02)


def _connect_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "", "::") else bind


def _url(host: str, port: int) -> str:
    return f"mqtt://[{host}]:{port}" if ":" in host else f"mqtt://{host}:{port}"


class MosquittoBroker(Lifecycle):
    """A Mosquitto process with a rendered config in ``state_dir`` (a temp dir if not given).

    ``port=None`` picks a free port once; ``restart``/``start`` after ``stop``/``kill`` reuse it,
    so clients reconnect to the same URL. Files: ``<state_dir>/mosquitto.conf``,
    ``<state_dir>/data/`` (persistence), ``<state_dir>/mosquitto.log`` (unless ``log_to_console``).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        bind: str = "127.0.0.1",
        state_dir: Path | None = None,
        config_template: Path = DEV_CONF,
        binary: Path | None = None,
        extra_config: Sequence[str] = (),
        log_to_console: bool = False,
    ) -> None:
        binary = binary or find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto not found on PATH or in /usr/sbin")
        self.binary = binary
        self.bind = bind
        self.host = _connect_host(bind)
        self._auto_port = port is None or port == 0
        self.port = free_port(self.host) if self._auto_port else int(port or 0)
        self._own_state_dir = state_dir is None
        self.state_dir = (
            Path(tempfile.mkdtemp(prefix="edgefl-mosquitto-"))
            if state_dir is None
            else (Path(state_dir))
        )
        self.config_template = config_template
        self.extra_config = list(extra_config)
        self.log_to_console = log_to_console
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def config_path(self) -> Path:
        return self.state_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def render(self) -> str:
        """The config text for the current port, bind address and state dir."""
        text = render_config(
            self.config_template.read_text(),
            port=self.port,
            bind=self.bind,
            data_dir=self.data_dir,
        )
        extra = list(self.extra_config)
        if os.geteuid() == 0:
            # As root Mosquitto switches to user "mosquitto", which cannot write our state dir.
            extra.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if extra:
            text += "\n# --- added by broker/launcher.py\n" + "\n".join(extra) + "\n"
        return text

    def start(self, timeout: float = 10.0) -> str:
        """Start (if not running) and wait until it accepts connections; returns the URL."""
        if self.is_running():
            return self.url
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            try:
                self._spawn(timeout)
                return self.url
            except BrokerStartError as exc:
                self._reap()
                if attempt + 1 == attempts or "Address already in use" not in str(exc):
                    raise
                self.port = free_port(self.host)  # someone took our free port: pick another
        raise AssertionError("unreachable")

    def _spawn(self, timeout: float) -> None:
        if _accepts(self.host, self.port):  # else we would mistake another broker for ours
            raise PortInUse(f"port {self.port} is already in use (Address already in use)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.render())
        if self.log_to_console:
            stderr: Any = None
        else:
            self._log_file = self.log_path.open("ab")
            stderr = self._log_file
        self._proc = subprocess.Popen(
            [str(self.binary), "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,  # Ctrl-C reaches us, and we stop Mosquitto gracefully
        )
        try:
            wait_for_port(self.host, self.port, timeout, alive=self.is_running)
        except BrokerStartError as exc:
            self.kill()
            raise BrokerStartError(f"{exc}\n{self.log_tail()}") from None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait: Mosquitto saves its persistence database on the way out."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: like a crash or power loss (only what was saved before survives)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._reap()

    def save(self, timeout: float = 5.0) -> None:
        """Make Mosquitto write its persistence database now (SIGUSR1) and wait for the write."""
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("mosquitto is not running")
        db = self.data_dir / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        size_before = db.stat().st_size if db.exists() else -1
        self._proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if db.exists():
                stat = db.stat()
                if stat.st_mtime_ns != before or stat.st_size != size_before:
                    time.sleep(0.05)  # the file is renamed into place; give the rename a moment
                    return
            time.sleep(0.02)
        raise TimeoutError("mosquitto did not write its database")

    def restart(self, timeout: float = 10.0) -> str:
        """Graceful stop and start on the same port."""
        self.stop()
        return self.start(timeout)

    def wait(self) -> int:
        """Block until the process exits; its return code."""
        if self._proc is None:
            raise RuntimeError("mosquitto was not started")
        code = self._proc.wait()
        self._reap()
        return code

    def log_tail(self, lines: int = 20) -> str:
        if self.log_to_console or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cleanup(self) -> None:
        """Stop, and remove the state dir if this object created it."""
        self.stop()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _reap(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    open = start
    close = cleanup


class EmbeddedBroker(AsyncLifecycle):
    """amqtt in the running asyncio loop: MQTT 3.1.1 only, anonymous, no persistence.

    ``async with EmbeddedBroker() as broker:`` then connect to ``broker.url``.
    """

    def __init__(
        self, *, port: int | None = None, bind: str = "127.0.0.1", quiet: bool = True
    ) -> None:
        self.bind = bind
        self.host = _connect_host(bind)
        self._auto_port = port is None or port == 0
        self.port = free_port(self.host) if self._auto_port else int(port or 0)
        self.quiet = quiet
        self._broker: Any = None
        self.log_counts: Any = None  # amqtt_broker.OncePerKind once started quietly
        self.loop_errors: Any = None  # amqtt_broker.AmqttExceptionHandler once started quietly

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def start(self) -> str:
        """Start listening; returns the URL."""
        if self._broker is not None:
            return self.url
        amqtt_broker = _import_amqtt_broker()  # lazily: amqtt is optional and slow to import
        from amqtt.errors import BrokerError

        if self.quiet:
            quiet_amqtt_logging()
            self.log_counts = amqtt_broker.contain_amqtt_logging()
            self.loop_errors = amqtt_broker.AmqttExceptionHandler.install(
                asyncio.get_running_loop()
            )
        attempts = 3 if self._auto_port else 1
        for attempt in range(attempts):
            if _accepts(self.host, self.port):
                error: BrokerStartError = PortInUse(
                    f"port {self.port} is already in use (Address already in use)"
                )
            else:
                broker = amqtt_broker.EdgeflAmqttBroker(self._amqtt_config())
                try:
                    await broker.start()
                except BrokerError as exc:
                    error = _start_error(exc, self.port)
                else:
                    self._broker = broker
                    return self.url
            if attempt + 1 == attempts:
                raise error
            self.port = free_port(self.host)
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    def _amqtt_config(self) -> dict[str, Any]:
        bind = f"[{self.bind}]" if ":" in self.bind else self.bind
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{bind}:{self.port}"}},
            # no event/packet logger plugins, no $SYS plugin: just anonymous access
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    open = start
    close = stop


def _start_error(exc: BaseException, port: int) -> BrokerStartError:
    """amqtt's BrokerError wraps the OSError of ``bind``: a port in use, or an address that
    cannot be bound, is :class:`PortInUse`."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return PortInUse(f"cannot listen on port {port}: {cause.strerror or cause}")
    return BrokerStartError(f"embedded broker did not start: {exc}")


def quiet_amqtt_logging(level: int = logging.ERROR) -> None:
    """amqtt logs every connection (and a warning for each refused MQTT 5 CONNECT): raise its
    loggers to ``level`` unless someone configured them already. An MQTT 5 CONNECT with
    properties also makes amqtt's connection handler fail inside asyncio (it logs "Unhandled
    exception in client_connected_cb" on the ``asyncio`` logger); that record is filtered out."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AmqttHandlerNoise) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_AmqttHandlerNoise())


class _AmqttHandlerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unhandled exception in client_connected_cb")


class ThreadedEmbeddedBroker(Lifecycle):
    """An :class:`EmbeddedBroker` on its own event loop in a daemon thread, for synchronous code
    and test fixtures whose clients run in a different loop."""

    def __init__(
        self, *, port: int | None = None, bind: str = "127.0.0.1", quiet: bool = True
    ) -> None:
        self.embedded = EmbeddedBroker(port=port, bind=bind, quiet=quiet)
        """The broker running in the thread (its ``log_counts`` and ``loop_errors``)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.embedded.url

    @property
    def port(self) -> int:
        return self.embedded.port

    def start(self, timeout: float = 10.0) -> str:
        """Start the thread and the broker; returns the URL once it listens."""
        if self._thread is not None:
            return self.url
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.embedded.start())
            except BaseException as exc:  # reported to start()
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
                loop.run_until_complete(self.embedded.stop())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="edgefl-embedded-broker", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise BrokerStartError(f"embedded broker did not start within {timeout}s")
        if errors:
            self._thread.join()
            self._thread = None
            if isinstance(errors[0], BrokerStartError):
                raise errors[0]
            raise BrokerStartError(f"embedded broker did not start: {errors[0]}") from errors[0]
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = self._loop = None

    open = start
    close = stop
