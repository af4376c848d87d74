"""Agent configuration: TOML file < environment < command-line overrides, validated at start.

Sources, lowest precedence first:

1. **TOML file** (default ``/etc/edgefl/agent.toml``; see ``device_agent/examples/agent.toml``).
   Top-level keys ``fleet``, ``device_id``, ``state_dir``, ``log_level``, ``profile`` and the
   tables ``[broker]``, ``[data]``, ``[training]``, ``[codec]``, ``[eligibility]``, ``[probes]``,
   ``[spool]``, ``[security]``, ``[privacy]``.
   Relative paths in the file are relative to the file's directory.
2. **Environment**: ``EDGEFL_<SECTION>__<KEY>`` (double underscore) for a key in a table and
   ``EDGEFL_<KEY>`` for a top-level key, upper case, e.g. ``EDGEFL_BROKER__URL``,
   ``EDGEFL_BROKER__PASSWORD_FILE``, ``EDGEFL_ELIGIBILITY__MAX_TEMP_C``, ``EDGEFL_FLEET``,
   ``EDGEFL_DEVICE_ID``. Values are text: booleans ``true/false/1/0/yes/no/on/off``; lists
   (``eligibility.windows``) comma-separated; an empty value sets an optional key to none.
   The agent owns the ``EDGEFL_`` prefix: an unknown ``EDGEFL_*`` variable is an error (typos such
   as ``EDGEFL_BROKER_URL`` get a suggestion), except ``EDGEFL_CONFIG`` (the config file path,
   read by the command line). :func:`env_var_name` gives the variable of any key.
3. **Overrides** (command-line flags): dotted keys (``broker.url``, ``fleet``); values are native
   (``int``, ``bool``, ...) or text parsed like environment values; ``None`` means "not given".

Secrets: ``broker.password_file`` names a file holding the password (trailing newline removed),
so the password need not be in the TOML or the environment; it conflicts with
``broker.password``. ``state_dir`` defaults to ``$STATE_DIRECTORY`` when systemd sets it
(``StateDirectory=``), else ``/var/lib/edgefl``.

Every problem raises :class:`ConfigError` naming the key, the bad value and where it came from.
The layering itself (reading the file, the environment and the overrides, coercion, secrets) is
:mod:`edgefl.configlayers`, shared with the aggregator; this module owns the agent's schema and
its checks.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from device_agent.eligibility.policy import EligibilityPolicy, PolicyError, TimeWindow
from device_agent.eligibility.probes import MeteredSource
from edgefl import configlayers
from edgefl.configlayers import Mismatch, Setting, SettingError
from edgefl.privacy.local import LocalDP, LocalSpend, may_train
from edgefl.privacy.spec import dp_to_text, parse_dp
from edgefl.transport.config import BrokerUrl, parse_broker_urls

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_DIR",
    "ENV_PREFIX",
    "AgentConfig",
    "BrokerConfig",
    "CodecPrefs",
    "ConfigError",
    "DataConfig",
    "DataKind",
    "PrivacyConfig",
    "ProbeConfig",
    "ReceiptMode",
    "SecurityConfig",
    "SpoolConfig",
    "TrainingIsolation",
    "TrainingLimits",
    "env_var_name",
    "known_keys",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/edgefl/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edgefl")
ENV_PREFIX = "EDGEFL_"
ENV_IGNORED = frozenset({"EDGEFL_CONFIG"})
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


ConfigError = SettingError
"""A configuration problem: ``ConfigError(key, problem, source=...)``, ``str()`` reads
``"<key>: <problem> (from <source>)"``. The one class of :mod:`edgefl.configlayers` (an
:class:`edgefl.clierror.ConfigError`, exit 78), so the layering raises it directly."""


def _check_int(key: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(key, f"expected an integer in [{low}, {high}], got {value!r}")


def _check_float(
    key: str, value: float, low: float, high: float, *, open_low: bool = False
) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (low < value if open_low else low <= value)
        and value <= high
    )
    if not ok:
        bracket = "(" if open_low else "["
        raise ConfigError(key, f"expected a number in {bracket}{low:g}, {high:g}], got {value!r}")


def _check_name(key: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ConfigError(
            key, f"expected 1-64 characters [A-Za-z0-9_.-] starting alphanumeric, got {value!r}"
        )


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """MQTT broker connection. ``url`` is ``mqtt://host[:port]``, ``mqtts://host[:port]``, or MQTT
    over WebSockets ``ws://host[:port][/path]`` / ``wss://...`` (see
    :class:`edgefl.transport.config.BrokerUrl`), or a comma list of the nodes of a clustered
    broker, tried in turn (:func:`edgefl.transport.config.parse_broker_urls`)."""

    url: str
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_insecure: bool = False
    keepalive: int = 60
    max_packet: int = 262_144  # largest MQTT payload the agent publishes (updates are chunked)
    reconnect_max_s: float = 30.0  # cap of the jittered exponential reconnect backoff

    def __post_init__(self) -> None:
        parsed = self._parsed()
        if parsed.username is not None or parsed.password is not None:
            raise ConfigError(
                "broker.url",
                "credentials do not belong in the URL; use broker.username and "
                "broker.password_file",
            )
        if not self.tls:
            for key, value in (
                ("ca_file", self.ca_file),
                ("cert_file", self.cert_file),
                ("key_file", self.key_file),
            ):
                if value is not None:
                    raise ConfigError(
                        f"broker.{key}", "TLS files need an mqtts:// or wss:// broker.url"
                    )
            if self.tls_insecure:
                raise ConfigError(
                    "broker.tls_insecure", "only meaningful with an mqtts:// or wss:// URL"
                )
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ConfigError(f"broker.{missing}", "cert_file and key_file go together")
        if self.password is not None and self.username is None:
            raise ConfigError("broker.username", "a password needs a username")
        if self.username is not None and not self.username:
            raise ConfigError("broker.username", "must not be empty")
        _check_int("broker.keepalive", self.keepalive, 5, 65535)
        _check_int("broker.max_packet", self.max_packet, 1024, 268_435_455)
        _check_float("broker.reconnect_max_s", self.reconnect_max_s, 1.0, 3600.0)

    def _parsed(self) -> BrokerUrl:
        if not isinstance(self.url, str):
            raise ConfigError("broker.url", f"expected a broker URL, got {self.url!r}")
        try:
            return parse_broker_urls(self.url)[0]  # a comma list: the nodes of a cluster
        except ValueError as exc:
            raise ConfigError("broker.url", str(exc)) from None

    @property
    def tls(self) -> bool:
        return self._parsed().tls

    @property
    def host(self) -> str:
        return self._parsed().host

    @property
    def port(self) -> int:
        return self._parsed().port


class TrainingIsolation(StrEnum):
    """Where local training runs: a worker ``thread`` of the agent (fast start; torch stays
    loaded afterwards) or a fresh child ``process`` per training (pays the torch import each
    time; the agent's memory goes back to its idle size when training ends)."""

    THREAD = "thread"
    PROCESS = "process"


class DataKind(StrEnum):
    NPZ = "npz"
    CSV = "csv"
    ENTRYPOINT = "entrypoint"


_ENTRYPOINT_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True, slots=True)
class DataConfig:
    """The device's local training data. ``npz``: arrays ``x_key``/``y_key`` in ``path``;
    ``csv``: ``path`` with a ``label_column``; ``entrypoint``: ``"package.module:function"``
    (``path`` is passed to it when given)."""

    kind: DataKind
    path: Path | None = None
    entrypoint: str | None = None
    label_column: str = "label"
    x_key: str = "x"
    y_key: str = "y"

    def __post_init__(self) -> None:
        if self.kind in (DataKind.NPZ, DataKind.CSV) and self.path is None:
            raise ConfigError("data.path", f"required for kind = {self.kind.value!r}")
        if self.kind is DataKind.ENTRYPOINT:
            if self.entrypoint is None or not _ENTRYPOINT_RE.match(self.entrypoint):
                raise ConfigError(
                    "data.entrypoint",
                    f"expected 'package.module:function', got {self.entrypoint!r}",
                )
        elif self.entrypoint is not None:
            raise ConfigError("data.entrypoint", "only used with kind = 'entrypoint'")
        for key in ("label_column", "x_key", "y_key"):
            if not getattr(self, key):
                raise ConfigError(f"data.{key}", "must not be empty")


@dataclass(frozen=True, slots=True)
class TrainingLimits:
    """Bounds on local training. ``max_steps`` None: ``max_epochs`` decides."""

    max_threads: int = 1
    nice: int = 10
    max_epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    max_train_seconds: float = 600.0
    holdout_fraction: float = 0.2  # local examples kept aside to evaluate the global model
    isolation: TrainingIsolation = TrainingIsolation.THREAD

    def __post_init__(self) -> None:
        _check_int("training.max_threads", self.max_threads, 1, 64)
        _check_int("training.nice", self.nice, 0, 19)
        _check_int("training.max_epochs", self.max_epochs, 1, 10_000)
        if self.max_steps is not None:
            _check_int("training.max_steps", self.max_steps, 1, 1_000_000_000)
        _check_int("training.batch_size", self.batch_size, 1, 65_536)
        _check_float("training.lr", self.lr, 0.0, 100.0, open_low=True)
        _check_float(
            "training.max_train_seconds", self.max_train_seconds, 0.0, 86_400.0, open_low=True
        )
        _check_float("training.holdout_fraction", self.holdout_fraction, 0.0, 0.9)


@dataclass(frozen=True, slots=True)
class CodecPrefs:
    """What the device would like to send; ``edgefl.codec`` validates the names."""

    quantization: str = "int8"
    topk_fraction: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.quantization, str) or not re.fullmatch(
            r"[a-z0-9]+", self.quantization
        ):
            raise ConfigError(
                "codec.quantization", f"expected a name like 'int8', got {self.quantization!r}"
            )
        if self.topk_fraction is not None:
            _check_float("codec.topk_fraction", self.topk_fraction, 0.0, 1.0, open_low=True)


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """How the eligibility probes read the device (see ``device_agent.eligibility.probes``)."""

    root: Path = Path("/")
    interval_s: float = 30.0
    metered: MeteredSource = MeteredSource.NETWORKMANAGER
    nmcli_device: str | None = None
    throttle: bool = True
    command_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        _check_float("probes.interval_s", self.interval_s, 1.0, 3600.0)
        _check_float("probes.command_timeout_s", self.command_timeout_s, 0.0, 60.0, open_low=True)
        if self.nmcli_device is not None and not re.fullmatch(r"[\w.:@-]{1,64}", self.nmcli_device):
            raise ConfigError(
                "probes.nmcli_device", f"not an interface name: {self.nmcli_device!r}"
            )


class ReceiptMode(StrEnum):
    """Whether the agent keeps a sent update until the aggregator's receipt (protocol 1.1)."""

    AUTO = "auto"  # when the retained server state lists the "receipts" feature
    ON = "on"  # always (an aggregator without receipts makes the spool fill up)
    OFF = "off"  # never: delete on the broker's PUBACK (protocol 1.0 behaviour)


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """Bounds of the on-disk update spool (``<state_dir>/spool``) and its receipts.

    Full spool: a new update is refused and counted (``spool_full``); the spooled ones are
    older but already paid for, and sent ones waiting for a receipt may be the only copy of an
    update the broker acknowledged, so none is evicted.
    ``durable = false`` skips fsync (simulations on tmpfs only).

    Receipts (``receipts``, see :class:`ReceiptMode`): an update the broker acknowledged stays
    in the spool until the aggregator's receipt names it; without one it is sent again after
    ``receipt_timeout_s``, then after twice that, and so on up to ``resend_max_s`` between sends.
    """

    max_entries: int = 1000
    max_bytes: int = 64 * 1024 * 1024
    durable: bool = True
    receipts: ReceiptMode = ReceiptMode.AUTO
    receipt_timeout_s: float = 120.0
    resend_max_s: float = 3600.0

    def __post_init__(self) -> None:
        _check_int("spool.max_entries", self.max_entries, 1, 1_000_000)
        _check_int("spool.max_bytes", self.max_bytes, 1024, 2**40)
        _check_float("spool.receipt_timeout_s", self.receipt_timeout_s, 0.01, 86400.0)
        _check_float("spool.resend_max_s", self.resend_max_s, 0.01, 7 * 86400.0)
        if self.resend_max_s < self.receipt_timeout_s:
            raise ConfigError(
                "spool.resend_max_s",
                f"{self.resend_max_s} is below spool.receipt_timeout_s {self.receipt_timeout_s}",
            )


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Optional Ed25519 keys (``edgefl.security``). ``signing_key_file``: the device's private
    key; every update envelope is signed with it. ``aggregator_public_key_file``: the fleet's
    aggregator key; manifests that it did not sign are rejected."""

    signing_key_file: Path | None = None
    aggregator_public_key_file: Path | None = None
    # secure aggregation (docs/PRIVACY.md): the helper's X25519 public key, from the bundle
    helper_public_key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    """Local differential privacy (docs/PRIVACY.md): ``dp`` is ``"off"`` or the text form of
    :func:`edgefl.privacy.parse_dp` for local DP, e.g. ``"local:gaussian,eps=1,C=1,delta=1e-5,
    budget=20"`` or ``"local:laplace,eps=2,C=1"``; ``local`` is the parsed setting (None: off).
    ``dp`` is normalised to every option written out (:func:`edgefl.privacy.dp_to_text`)."""

    dp: str = "off"
    local: LocalDP | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.dp, str):
            raise ConfigError(
                "privacy.dp", f"expected text like 'local:gaussian,eps=1,C=1', got {self.dp!r}"
            )
        central = "central DP is the aggregator's setting; a device takes local:..."
        if self.dp.strip().lower().startswith("central"):  # before parsing: no dp-accounting
            raise ConfigError("privacy.dp", central)
        try:
            parsed = parse_dp(self.dp)
        except ValueError as exc:
            raise ConfigError("privacy.dp", str(exc)) from None
        if parsed is not None and not isinstance(parsed, LocalDP):
            raise ConfigError("privacy.dp", central)
        if parsed is not None and not may_train(LocalSpend(), parsed):
            raise ConfigError(
                "privacy.dp",
                f"budget {parsed.budget_epsilon:g} allows no update of epsilon {parsed.epsilon:g}",
            )
        object.__setattr__(self, "local", parsed)
        object.__setattr__(self, "dp", dp_to_text(parsed))


@dataclass(frozen=True, slots=True)
class AgentConfig:
    broker: BrokerConfig
    fleet: str
    device_id: str
    data: DataConfig
    training: TrainingLimits = field(default_factory=TrainingLimits)
    codec: CodecPrefs = field(default_factory=CodecPrefs)
    eligibility: EligibilityPolicy = field(default_factory=EligibilityPolicy)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    state_dir: Path = DEFAULT_STATE_DIR
    log_level: str = "INFO"
    profile: str | None = None
    heartbeat_s: float = 300.0

    def __post_init__(self) -> None:
        _check_name("fleet", self.fleet)
        _check_float("heartbeat_s", self.heartbeat_s, 1.0, 86_400.0)
        _check_name("device_id", self.device_id)
        if self.profile is not None:
            _check_name("profile", self.profile)
        level = self.log_level.upper() if isinstance(self.log_level, str) else ""
        if level not in LOG_LEVELS:
            raise ConfigError(
                "log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        object.__setattr__(self, "log_level", level)

    def describe(self) -> dict[str, object]:
        """The effective configuration as plain JSON-friendly data, password redacted."""
        out: dict[str, object] = {}
        for key, value in _flatten(self).items():
            if key == "broker.password" and value is not None:
                value = "***"
            out[key] = value
        return out


# --- schema --------------------------------------------------------------------------------------

_SECTIONS: dict[str, Callable[..., Any]] = {
    "broker": BrokerConfig,
    "data": DataConfig,
    "training": TrainingLimits,
    "codec": CodecPrefs,
    "eligibility": EligibilityPolicy,
    "probes": ProbeConfig,
    "spool": SpoolConfig,
    "security": SecurityConfig,
    "privacy": PrivacyConfig,
}
_TOP_LEVEL: dict[str, object] = {
    "fleet": str,
    "device_id": str,
    "state_dir": Path,
    "log_level": str,
    "profile": str | None,
    "heartbeat_s": float,
}
_EXTRA: dict[str, object] = {"broker.password_file": Path | None}  # resolved by the loader
_REQUIRED_TOP = ("fleet", "device_id")


def _build_schema() -> tuple[dict[str, object], set[str]]:
    schema: dict[str, object] = dict(_TOP_LEVEL)
    required: set[str] = set(_REQUIRED_TOP)
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cast(Any, cls)):
            if not f.init:
                continue
            key = f"{section}.{f.name}"
            schema[key] = hints[f.name]
            if f.default is MISSING and f.default_factory is MISSING:
                required.add(key)
    schema.update(_EXTRA)
    return schema, required


_SCHEMA, _REQUIRED = _build_schema()


def known_keys() -> list[str]:
    """Every dotted configuration key, sorted."""
    return sorted(_SCHEMA)


def env_var_name(key: str, prefix: str = ENV_PREFIX) -> str:
    """``"broker.url"`` -> ``"EDGEFL_BROKER__URL"``; ``"fleet"`` -> ``"EDGEFL_FLEET"``."""
    return configlayers.env_var_name(key, prefix)


# --- loading -------------------------------------------------------------------------------------


def load_config(
    path: Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object],
    *,
    env_prefix: str = ENV_PREFIX,
) -> AgentConfig:
    """Load, merge (file < environment < overrides) and validate. Raises :class:`ConfigError`.

    ``path`` None: no file (everything from the environment and overrides).
    """
    settings: dict[str, Setting] = {}
    if path is not None:
        settings.update(configlayers.read_toml(path, _SCHEMA, _SECTIONS))
    settings.update(configlayers.from_env(env, _SCHEMA, env_prefix, ignored=ENV_IGNORED))
    settings.update(configlayers.from_overrides(overrides, _SCHEMA, {}))
    if "state_dir" not in settings and env.get("STATE_DIRECTORY"):
        first = env["STATE_DIRECTORY"].split(":")[0]
        settings["state_dir"] = Setting(first, "$STATE_DIRECTORY", True, None)
    return _build(settings, env_prefix)


class _Sources:
    """Where each key's value came from, to name it in errors raised after coercion."""

    def __init__(self, settings: Mapping[str, Setting]) -> None:
        self._settings = settings

    def of(self, key: str) -> str | None:
        setting = self._settings.get(key)
        return setting.source if setting else None

    def reraise(self, exc: ConfigError) -> ConfigError:
        """``exc`` again, now naming the source of its key."""
        return ConfigError(exc.key, exc.problem, source=self.of(exc.key))


def _build(settings: dict[str, Setting], env_prefix: str) -> AgentConfig:
    sources = _Sources(settings)
    values = {
        key: configlayers.coerce(key, setting, _SCHEMA[key], custom=_CUSTOM)
        for key, setting in settings.items()
    }
    _require(values, env_prefix)
    _resolve_password_file(values, sources)
    sections = _build_sections(values, sources)
    _check_files_exist(sections, sources)
    top = {k: v for k, v in values.items() if "." not in k}
    try:
        return AgentConfig(**cast(dict[str, Any], sections), **cast(dict[str, Any], top))
    except ConfigError as exc:
        raise sources.reraise(exc) from None


def _require(values: Mapping[str, object], env_prefix: str) -> None:
    for key in sorted(_REQUIRED):
        if key not in values:
            raise ConfigError(
                key,
                f"required setting is missing (set it in the config file, "
                f"{env_var_name(key, env_prefix)} or --set {key}=...)",
            )


def _resolve_password_file(values: dict[str, object], sources: _Sources) -> None:
    """Replace ``broker.password_file`` by ``broker.password`` read from the file."""
    password_file = values.pop("broker.password_file", None)
    if password_file is None:
        return
    source = sources.of("broker.password_file")
    if values.get("broker.password") is not None:
        raise ConfigError(
            "broker.password_file", "conflicts with broker.password (set only one)", source=source
        )
    values["broker.password"] = configlayers.read_secret(
        "broker.password_file", cast(Path, password_file), source
    )


def _build_sections(values: Mapping[str, object], sources: _Sources) -> dict[str, object]:
    """Each table's dataclass from its ``<section>.*`` values; their checks name the source."""
    sections: dict[str, object] = {}
    for section, cls in _SECTIONS.items():
        prefix = section + "."
        kwargs = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
        try:
            sections[section] = cls(**kwargs)
        except ConfigError as exc:
            raise sources.reraise(exc) from None
        except PolicyError as exc:
            key = f"{section}.{exc.field}"
            raise ConfigError(key, exc.problem, source=sources.of(key)) from None
    return sections


_FILE_KEYS = (
    "broker.ca_file",
    "broker.cert_file",
    "broker.key_file",
    "security.signing_key_file",
    "security.aggregator_public_key_file",
    "security.helper_public_key_file",
)


def _check_files_exist(sections: Mapping[str, object], sources: _Sources) -> None:
    for key in _FILE_KEYS:
        section, name = key.split(".")
        file = cast(Path | None, getattr(sections[section], name))
        if file is not None and not file.is_file():
            raise ConfigError(key, f"no such file {str(file)!r}", source=sources.of(key))


# --- coercion of the agent's own types -----------------------------------------------------------


def _to_windows(key: str, setting: Setting) -> tuple[TimeWindow, ...]:
    """``eligibility.windows``: a list, or comma-separated text, of ``'HH:MM-HH:MM'``."""
    value = setting.value
    items: list[object]
    if setting.textual and isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise Mismatch("a list of 'HH:MM-HH:MM' windows")
    windows: list[TimeWindow] = []
    for index, item in enumerate(items):
        if isinstance(item, TimeWindow):
            windows.append(item)
            continue
        try:
            windows.append(TimeWindow(cast(str, item)))
        except PolicyError as exc:
            raise ConfigError(f"{key}[{index}]", exc.problem, source=setting.source) from None
    return tuple(windows)


_CUSTOM: dict[object, configlayers.Coercer] = {tuple[TimeWindow, ...]: _to_windows}


def _flatten(config: AgentConfig) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in _TOP_LEVEL:
        out[key] = _plain(getattr(config, key))
    for section in _SECTIONS:
        obj = getattr(config, section)
        for f in fields(obj):
            if f.init:
                out[f"{section}.{f.name}"] = _plain(getattr(obj, f.name))
    return out


def _plain(value: object) -> object:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, TimeWindow):
        return value.spec
    return configlayers.plain(value)
