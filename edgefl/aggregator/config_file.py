"""Aggregator configuration: TOML file < environment < command-line flags, validated up front.

Sources, lowest precedence first (the device agent's scheme, ``device_agent/config.py``):

1. **TOML file** (``--config FILE``, else ``$EDGEFL_AGG_CONFIG``, else
   ``/etc/edgefl/aggregator.toml`` when it exists; see ``edgefl/aggregator/examples/
   aggregator.toml``). Top-level keys ``fleet``, ``model``, ``state_dir``, ``algorithm``, ``seed``,
   ``log_level`` and the tables ``[broker]``, ``[aggregation]``, ``[participation]``,
   ``[hints]``, ``[outputs]``, ``[limits]``, ``[security]``, ``[privacy]``. Relative paths
   are relative to the file's directory.
2. **Environment**: ``EDGEFL_AGG_<SECTION>__<KEY>`` / ``EDGEFL_AGG_<KEY>``, e.g.
   ``EDGEFL_AGG_BROKER__URL``, ``EDGEFL_AGG_AGGREGATION__BUFFER_SIZE``, ``EDGEFL_AGG_FLEET``.
   An unknown ``EDGEFL_AGG_*`` variable is an error (with a suggestion), except
   ``EDGEFL_AGG_CONFIG``. (The agent owns ``EDGEFL_*``; the aggregator's own prefix keeps the two
   apart on a machine that runs both.)
3. **Flags** (``edgefl aggregator --broker ... --buffer-size ...``): each flag sets one key
   (:data:`FLAGS`); a flag that is not given leaves the lower layers alone.

``state_dir`` defaults to ``$STATE_DIRECTORY`` when systemd sets it (``StateDirectory=``).
``broker.password_file`` holds the password (trailing newline removed) and conflicts with
``broker.password``.

Errors: a bad value that came from a **flag** raises :class:`edgefl.clierror.UsageError` (exit 2)
naming the flag; one from the file or the environment raises :class:`edgefl.clierror.ConfigError`
(exit 78) naming the key and where it came from; unknown keys get a "did you mean".

:func:`load_aggregator_config` only reads (the file, secrets, key files); :func:`preflight`
checks what the service will need from the machine (TLS files, key files, a usable state
directory) without creating anything. Both run before any state is written.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, TypeVar

from edgefl.aggregation import (
    ExampleWeighting,
    Normalisation,
    RobustMode,
    ServerOptimizerKind,
    StalenessKind,
)
from edgefl.aggregator.config import AggregatorConfig, Algorithm, NormBoundSetting
from edgefl.auth import EnvelopeSigner, UpdateAuthenticator
from edgefl.clierror import ConfigError, UsageError
from edgefl.codec import CodecConfig, Quantization
from edgefl.configlayers import (
    Setting,
    SettingError,
    coerce,
    config_error,
    env_var_name,
    from_env,
    from_overrides,
    plain,
    read_secret,
    read_toml,
)
from edgefl.participation import ParticipationConfig
from edgefl.privacy import CentralDP, dp_to_text, parse_dp
from edgefl.transport.config import MqttProtocol

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "FLAGS",
    "LOG_LEVELS",
    "SCHEMA",
    "LoadedConfig",
    "default_config_path",
    "describe",
    "known_keys",
    "load_aggregator_config",
    "preflight",
]

DEFAULT_CONFIG_PATH = Path("/etc/edgefl/aggregator.toml")
ENV_PREFIX = "EDGEFL_AGG_"
DEFAULT_FLUSH_AFTER_S = 120.0
"""The command's flush deadline: a partly filled buffer steps after two minutes (liveness of a
fleet smaller than K; docs/AGGREGATOR.md, "Participation")."""
ENV_CONFIG = "EDGEFL_AGG_CONFIG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EVAL_DATASETS = ("digits", "mnist1d")


@dataclass(frozen=True, slots=True)
class _Key:
    """One configuration key: its type, the flag that sets it, the AggregatorConfig field."""

    tp: object
    flag: str
    target: str | None  # AggregatorConfig.build's flat option; None: resolved by the loader


_T = TypeVar("_T")

_KEYS: dict[str, _Key] = {
    # top level
    "fleet": _Key(str, "--fleet", "fleet"),
    "model": _Key(str, "--model", "model"),
    "state_dir": _Key(Path, "--state-dir", "state_dir"),
    "algorithm": _Key(Algorithm, "--algorithm", "algorithm"),
    "seed": _Key(int, "--seed", "seed"),
    "log_level": _Key(str, "--log-level", None),
    # [broker]
    "broker.url": _Key(str, "--broker", "broker_url"),
    "broker.client_id": _Key(str | None, "--client-id", "client_id"),
    "broker.username": _Key(str | None, "--username", "username"),
    "broker.password": _Key(str | None, "--password", "password"),
    "broker.password_file": _Key(Path | None, "--password-file", None),
    "broker.ca_file": _Key(Path | None, "--ca-file", "ca_file"),
    "broker.cert_file": _Key(Path | None, "--cert-file", "cert_file"),
    "broker.key_file": _Key(Path | None, "--key-file", "key_file"),
    "broker.tls_insecure": _Key(bool, "--tls-insecure", "tls_insecure"),
    "broker.protocol": _Key(MqttProtocol, "--protocol", "protocol"),
    "broker.connect_timeout_s": _Key(float, "--connect-timeout", "connect_timeout_s"),
    # [aggregation]
    "aggregation.buffer_size": _Key(int, "--buffer-size", "buffer_size"),
    "aggregation.staleness": _Key(StalenessKind, "--staleness", "staleness"),
    "aggregation.staleness_a": _Key(float | None, "--staleness-a", "staleness_a"),
    "aggregation.staleness_b": _Key(float | None, "--staleness-b", "staleness_b"),
    "aggregation.max_staleness": _Key(int | None, "--max-staleness", "max_staleness"),
    "aggregation.example_weighting": _Key(
        ExampleWeighting, "--example-weighting", "example_weighting"
    ),
    "aggregation.example_cap": _Key(int | None, "--example-cap", "example_cap"),
    "aggregation.normalisation": _Key(Normalisation, "--normalisation", "normalisation"),
    "aggregation.server_optimizer": _Key(
        ServerOptimizerKind, "--server-optimizer", "server_optimizer"
    ),
    "aggregation.server_lr": _Key(float, "--server-lr", "server_lr"),
    "aggregation.server_momentum": _Key(float, "--server-momentum", "server_momentum"),
    "aggregation.norm_bound": _Key(NormBoundSetting, "--norm-bound", "norm_bound"),
    "aggregation.max_norm": _Key(float | None, "--max-norm", "max_norm"),
    "aggregation.robust": _Key(RobustMode, "--robust", "robust"),
    "aggregation.trim_beta": _Key(float, "--trim-beta", "trim_beta"),
    "aggregation.round_deadline_s": _Key(float, "--round-deadline", "round_deadline_s"),
    "aggregation.min_fraction": _Key(float, "--min-fraction", "min_fraction"),
    "aggregation.receipts": _Key(bool, "--receipts", "receipts"),
    # [participation]: leases (PROTOCOL.md 4.7); on by default for the command
    "participation.enabled": _Key(bool, "--participation", None),
    "participation.concurrency": _Key(int, "--concurrency", None),
    "participation.lease_s": _Key(float, "--lease-s", None),
    "participation.lease_grace": _Key(float, "--lease-grace", None),
    "participation.checkin_ttl_s": _Key(float, "--checkin-ttl", None),
    "participation.flush_after_s": _Key(float | None, "--flush-after", None),
    # [hints]: what devices are asked to do (published in every manifest)
    "hints.local_epochs": _Key(int, "--local-epochs", "local_epochs"),
    "hints.batch_size": _Key(int, "--batch-size", "batch_size"),
    "hints.lr": _Key(float, "--lr", "lr"),
    "hints.quantization": _Key(Quantization, "--quantization", None),
    "hints.topk_fraction": _Key(float | None, "--topk", None),
    # [outputs]
    "outputs.publish_onnx": _Key(bool, "--publish-onnx", "publish_onnx"),
    "outputs.eval_dataset": _Key(str | None, "--eval-dataset", "eval_dataset"),
    "outputs.metrics_interval_s": _Key(float, "--metrics-interval", "metrics_interval_s"),
    "outputs.metrics_port": _Key(int | None, "--metrics-port", "metrics_port"),
    "outputs.metrics_bind": _Key(str, "--metrics-bind", "metrics_bind"),
    "outputs.until_accuracy": _Key(float | None, "--until-accuracy", "until_accuracy"),
    # [limits]
    "limits.max_update_bytes": _Key(int, "--max-update-bytes", "max_update_bytes"),
    "limits.rate_limit_per_minute": _Key(float | None, "--rate-limit", "rate_limit_per_minute"),
    "limits.max_batch": _Key(int, "--max-batch", "max_batch"),
    "limits.max_inflight_mib": _Key(int, "--max-inflight-mib", None),
    "limits.fsync": _Key(bool, "--no-fsync", "fsync"),
    "limits.max_seq_jump": _Key(int, "--max-seq-jump", "max_seq_jump"),
    # [security]
    "security.device_keys": _Key(Path | None, "--device-keys", None),
    "security.signing_key_file": _Key(Path | None, "--signing-key", None),
    # [privacy]: central differential privacy (docs/PRIVACY.md), edgefl.privacy.parse_dp's text
    "privacy.dp": _Key(str | None, "--dp", None),
}

SCHEMA: dict[str, object] = {key: k.tp for key, k in _KEYS.items()}
"""Every dotted key and its type."""
FLAGS: dict[str, str] = {key: k.flag for key, k in _KEYS.items()}
"""The command-line flag of every key."""
_SECTIONS = sorted({key.split(".", 1)[0] for key in _KEYS if "." in key})
_REQUIRED = ("broker.url", "fleet", "model", "state_dir")
_LEASES = ParticipationConfig(flush_after_s=DEFAULT_FLUSH_AFTER_S)  # the command's default
_SERVICE_DEFAULTS: dict[str, object] = {
    "limits.max_batch": 512,
    "participation.enabled": True,
    **{f"participation.{f.name}": getattr(_LEASES, f.name) for f in dataclass_fields(_LEASES)},
}
"""Where the command's default differs from :class:`AggregatorConfig`'s (the library's)."""
_FIELD_TO_KEY = {k.target: key for key, k in _KEYS.items() if k.target is not None}


def known_keys() -> list[str]:
    """Every dotted configuration key, sorted."""
    return sorted(SCHEMA)


def default_config_path(env: Mapping[str, str]) -> Path | None:
    """``$EDGEFL_AGG_CONFIG``, else ``/etc/edgefl/aggregator.toml`` if it exists, else None."""
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


@dataclass(frozen=True)
class LoadedConfig:
    """The validated configuration: the service's config plus what the command line uses."""

    aggregator: AggregatorConfig
    log_level: str
    values: dict[str, object]  # effective value of every key (coerced; password as given)
    sources: dict[str, str] = field(default_factory=dict)  # key -> where its value came from


class _Errors:
    """Raise the right error for a key: UsageError naming the flag when a flag set it."""

    def __init__(self, settings: Mapping[str, Setting], has_file: bool) -> None:
        self._settings = settings
        self._has_file = has_file

    def source(self, key: str) -> str | None:
        setting = self._settings.get(key)
        return setting.source if setting is not None else None

    def __call__(self, key: str, problem: str) -> ConfigError | UsageError:
        source = self.source(key)
        if source is not None and source.startswith("command line"):
            return UsageError(f"{FLAGS[key]}: {problem}")
        return config_error(key, problem, source)

    def missing(self, key: str) -> ConfigError | UsageError:
        hint = f"{FLAGS[key]}, {key} in the config file or {env_var_name(key, ENV_PREFIX)}"
        if not self._has_file:
            return UsageError(f"missing option {FLAGS[key]} (or set {hint[len(FLAGS[key]) + 2 :]})")
        return config_error(key, f"required setting is missing (set {hint})")


def load_aggregator_config(
    path: Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object],
    *,
    authenticator: UpdateAuthenticator | None = None,
    signer: EnvelopeSigner | None = None,
) -> LoadedConfig:
    """Merge file < environment < overrides (flags: dotted key -> value, ``None`` = not given),
    validate and build the :class:`AggregatorConfig`. Reads the password file and loads the key
    files (``security.*``) unless ``authenticator`` / ``signer`` are given. Writes nothing."""
    settings = _layered_settings(path, env, overrides)
    err = _Errors(settings, path is not None)
    values = _coerced_values(settings, err)
    kwargs: dict[str, Any] = {
        k.target: values[key] for key, k in _KEYS.items() if k.target and key in values
    }
    _check_fields(values, err)
    kwargs.update(_derived_fields(values, err))
    kwargs["authenticator"] = authenticator
    kwargs["manifest_signer"] = signer
    keys_dir = values.get("security.device_keys")
    if keys_dir is not None and authenticator is None:
        kwargs["authenticator"] = _load_authenticator(cast_path(keys_dir), err)
    signing = values.get("security.signing_key_file")
    if signing is not None and signer is None:
        kwargs["manifest_signer"] = _load_signer(cast_path(signing), err)
    config = _built_config(kwargs, values, err)
    level = str(values.get("log_level", "INFO")).upper()
    if level not in LOG_LEVELS:
        raise err("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return LoadedConfig(
        aggregator=config,
        log_level=level,
        values=_effective(config, values, level),
        sources=_sources(settings, config),
    )


def _sources(settings: Mapping[str, Setting], config: AggregatorConfig) -> dict[str, str]:
    """Where each set key came from; with DP on, the keys it defaulted say so."""
    sources = {key: s.source for key, s in settings.items()}
    if config.aggregation.privacy is not None:
        for key in _DP_DEFAULTS:
            sources.setdefault(key, "default with privacy.dp")
    return sources


def _layered_settings(
    path: Path | None, env: Mapping[str, str], overrides: Mapping[str, object]
) -> dict[str, Setting]:
    """The raw settings, later layers winning: file, environment, flags; ``state_dir`` falls
    back to systemd's ``$STATE_DIRECTORY``."""
    settings: dict[str, Setting] = {}
    if path is not None:
        settings.update(read_toml(path, SCHEMA, _SECTIONS))
    settings.update(from_env(env, SCHEMA, ENV_PREFIX, ignored={ENV_CONFIG}))
    settings.update(from_overrides(overrides, SCHEMA, FLAGS))
    if "state_dir" not in settings and env.get("STATE_DIRECTORY"):
        first = env["STATE_DIRECTORY"].split(":")[0]
        settings["state_dir"] = Setting(first, "$STATE_DIRECTORY", True, None)
    return settings


def _coerced_values(settings: Mapping[str, Setting], err: _Errors) -> dict[str, object]:
    """Every setting in its schema type over the service defaults; a flag's bad value is a
    usage error naming the flag, a file's or variable's a config error naming the key."""
    values: dict[str, object] = dict(_SERVICE_DEFAULTS)
    for key, setting in settings.items():
        try:
            values[key] = coerce(key, setting, SCHEMA[key])
        except SettingError as exc:
            if setting.source.startswith("command line"):
                raise UsageError(f"{FLAGS[key]}: {exc.problem}") from None
            raise
    for key in _REQUIRED:
        if values.get(key) is None:
            raise err.missing(key)
    return values


def _derived_fields(values: Mapping[str, object], err: _Errors) -> dict[str, Any]:
    """Config fields computed from several keys: the password (inline or from its file), the
    codec hint, the receive window in bytes."""
    fields: dict[str, Any] = {}
    password_file = values.get("broker.password_file")
    if password_file is not None:
        if values.get("broker.password") is not None:
            raise err("broker.password_file", "conflicts with broker.password (set only one)")
        fields["password"] = _secret(cast_path(password_file), err)
    codec_defaults = CodecConfig()
    try:
        fields["codec"] = CodecConfig(
            quantization=typing.cast(
                Quantization, values.get("hints.quantization", codec_defaults.quantization)
            ),
            topk_fraction=typing.cast(float | None, values.get("hints.topk_fraction")),
        )
    except ValueError as exc:
        raise err("hints.topk_fraction", str(exc)) from None
    if "limits.max_inflight_mib" in values:
        mib = typing.cast(int, values["limits.max_inflight_mib"])
        if mib < 1:
            raise err("limits.max_inflight_mib", f"expected at least 1, got {mib}")
        fields["max_inflight_bytes"] = mib * 1024 * 1024
    fields["participation"] = _participation(values, err)
    fields.update(_privacy_fields(values, err))
    return fields


_DP_DEFAULTS: dict[str, object] = {
    "aggregation.normalisation": Normalisation.SUM,
    "aggregation.norm_bound": NormBoundSetting.OFF,
    "aggregation.example_weighting": ExampleWeighting.EQUAL,
}
"""What central DP changes in the defaults (a key set in any layer keeps its value)."""
_DP_REFUSED: dict[str, tuple[tuple[object, ...], str]] = {
    "algorithm": ((Algorithm.FEDAVG,), "is implemented for fedbuff only"),
    "aggregation.normalisation": (
        (Normalisation.MEAN,),
        "needs normalisation 'sum' (under 'mean' one device's weight is in the divisor, so its "
        "influence is not bounded by the clip C)",
    ),
    "aggregation.norm_bound": (
        (NormBoundSetting.ADAPTIVE_CLIP, NormBoundSetting.ADAPTIVE_REJECT),
        "needs norm_bound 'off' or a static one (the adaptive bound follows every device's "
        "norm, so one device would change how the others are clipped)",
    ),
    "aggregation.robust": (
        (RobustMode.MEDIAN, RobustMode.TRIMMED_MEAN),
        "needs robust 'none' (a robust statistic's sensitivity is not the clip C)",
    ),
}
"""Settings central DP's sensitivity argument does not hold under (docs/PRIVACY.md)."""


def _privacy_fields(values: Mapping[str, object], err: _Errors) -> dict[str, Any]:
    """``privacy.dp`` as the config's ``privacy`` (a :class:`CentralDP`, or nothing when off),
    with the DP defaults for the aggregation keys no layer set; a setting DP cannot work with
    is an error naming that key."""
    text = values.get("privacy.dp")
    if text is None:
        return {}
    try:
        dp = parse_dp(typing.cast(str, text))  # the accountant computes the cap: dp-accounting
    except ValueError as exc:
        raise err("privacy.dp", str(exc)) from None
    except ImportError as exc:
        from edgefl.extras import install_hint

        needs = f"needs the dp-accounting package ({exc}): {install_hint('aggregator')}"
        raise err("privacy.dp", needs) from None
    if dp is None:
        return {}
    if not isinstance(dp, CentralDP):
        raise err("privacy.dp", "local DP is a device setting; the aggregator takes central:...")
    fields: dict[str, Any] = {"privacy": dp}
    for key, default in _DP_DEFAULTS.items():
        if key not in values:
            fields[_KEYS[key].target or key] = default
    for key, (refused, why) in _DP_REFUSED.items():
        if values.get(key) in refused:
            raise err(key, f"{values[key]} with privacy.dp: differential privacy {why}")
    return fields


def _participation(values: Mapping[str, object], err: _Errors) -> ParticipationConfig | None:
    """The ``[participation]`` table as a :class:`ParticipationConfig` (None: disabled)."""
    if not values.get("participation.enabled", True):
        return None
    names = [f.name for f in dataclass_fields(ParticipationConfig)]
    kwargs = {n: values[f"participation.{n}"] for n in names if f"participation.{n}" in values}
    if kwargs.get("flush_after_s") == 0:
        kwargs["flush_after_s"] = None  # 0: only full buffers step
    try:
        return ParticipationConfig(**kwargs)  # type: ignore[arg-type]
    except ValueError as exc:
        named = [n for n in names if str(exc).startswith(n)]
        raise err(f"participation.{named[0] if named else 'concurrency'}", str(exc)) from None


def _built_config(
    kwargs: Mapping[str, Any], values: Mapping[str, object], err: _Errors
) -> AggregatorConfig:
    """The validated :class:`AggregatorConfig`, its MQTT settings checked too; a failure names
    the key that caused it."""
    try:
        config = AggregatorConfig.build(**kwargs)
    except (KeyError, ValueError, TypeError) as exc:
        raise _blame(exc, values, err) from None
    try:
        config.mqtt_config()  # the URL's scheme and port, TLS options, credentials
    except ValueError as exc:
        key = _blame_broker(str(exc), values)
        raise err(key, f"{exc}") from None
    return config


def cast_path(value: object) -> Path:
    assert isinstance(value, Path)
    return value


def _check_fields(values: Mapping[str, object], err: _Errors) -> None:
    """Checks with a precise key, before the dataclass's own (whose messages name fields)."""
    from edgefl.errors import EdgeflError
    from edgefl.models import get_model_spec
    from edgefl.protocol.topics import fleet_name

    try:
        fleet_name(values["fleet"])
    except (EdgeflError, ValueError) as exc:
        detail = getattr(exc, "detail", None) or str(exc)
        raise err("fleet", f"{detail} (1-64 characters [A-Za-z0-9_.-])") from None
    try:
        get_model_spec(typing.cast(str, values["model"]))
    except KeyError as exc:
        raise err("model", str(exc.args[0]) if exc.args else str(exc)) from None
    except ValueError as exc:
        raise err("model", str(exc)) from None
    dataset = values.get("outputs.eval_dataset")
    if dataset is not None and dataset not in EVAL_DATASETS:
        from edgefl.clierror import choices_hint

        raise err("outputs.eval_dataset", choices_hint(str(dataset), EVAL_DATASETS))
    url = typing.cast(str, values["broker.url"])
    from edgefl.transport.config import MqttConfig

    try:
        MqttConfig.from_url(url)
    except ValueError as exc:
        raise err("broker.url", str(exc)) from None
    timeout = values.get("broker.connect_timeout_s")
    if timeout is not None and not typing.cast(float, timeout) > 0:
        raise err("broker.connect_timeout_s", f"expected a number > 0, got {timeout!r}")
    for key in ("broker.ca_file", "broker.cert_file", "broker.key_file"):
        file = values.get(key)
        if file is not None and not cast_path(file).is_file():
            raise err(key, f"no such file {str(file)!r}")


def _secret(path: Path, err: _Errors) -> str:
    try:
        return read_secret("broker.password_file", path, err.source("broker.password_file"))
    except ConfigError as exc:
        problem = exc.message.split(": ", 1)[1].rsplit(" (from ", 1)[0]
        raise err("broker.password_file", problem) from None


def _load_authenticator(path: Path, err: _Errors) -> UpdateAuthenticator:
    def load() -> UpdateAuthenticator:
        from edgefl.security import load_update_authenticator

        return load_update_authenticator(path)

    return _load_security("security.device_keys", load, err)


def _load_signer(path: Path, err: _Errors) -> EnvelopeSigner:
    def load() -> EnvelopeSigner:
        from edgefl.security import load_signer

        return load_signer(path)

    return _load_security("security.signing_key_file", load, err)


def _load_security(key: str, load: Callable[[], _T], err: _Errors) -> _T:
    """``load()`` a key file with :mod:`edgefl.security` (imported lazily); a missing
    cryptography package or a bad file is a config error of ``key``."""
    try:
        return load()
    except ImportError as exc:
        raise err(
            key, f"needs the cryptography package ({exc}): pip install 'edgefl-mqtt[security]'"
        ) from None
    except ValueError as exc:
        raise err(key, str(exc)) from None


def _blame(exc: BaseException, values: Mapping[str, object], err: _Errors) -> Exception:
    """Turn the dataclass's error into one naming the key whose field the message mentions."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    named = [f for f in _FIELD_TO_KEY if f in text]
    if "norm bound" in text:
        named.append("norm_bound")
    if named:
        key = _FIELD_TO_KEY[max(named, key=len)]
        return err(key, text)
    for key in sorted(values, key=lambda k: k.count("."), reverse=True):
        if key.rsplit(".", 1)[-1] in text:
            return err(key, text)
    return config_error("aggregation", text, None)


def _blame_broker(text: str, values: Mapping[str, object]) -> str:
    """The broker key a transport-config error is about (the URL unless another one is set)."""
    lower = text.lower()
    for key in ("tls_insecure", "ca_file", "cert_file", "key_file", "password", "username"):
        word = key.removesuffix("_file").replace("_", " ")
        given = values.get(f"broker.{key}") not in (None, False)
        if given and (word in lower or key in lower):
            return f"broker.{key}"
    if "tls" in lower:
        for key in ("tls_insecure", "ca_file", "cert_file", "key_file"):
            if values.get(f"broker.{key}") not in (None, False):
                return f"broker.{key}"
    return "broker.url"


def _effective(
    config: AggregatorConfig, values: Mapping[str, object], level: str
) -> dict[str, object]:
    out: dict[str, object] = {}
    options = config.options()
    for key, k in _KEYS.items():
        if k.target is not None:
            value: object = options[k.target]
        elif key == "log_level":
            value = level
        elif key == "hints.quantization":
            value = config.task.codec.quantization
        elif key == "hints.topk_fraction":
            value = config.task.codec.topk_fraction
        elif key == "limits.max_inflight_mib":
            value = config.ingest.max_inflight_bytes // (1024 * 1024)
        elif key == "privacy.dp":
            value = dp_to_text(config.aggregation.privacy)
        else:
            value = values.get(key)
        out[key] = plain(value)
    return out


def describe(loaded: LoadedConfig) -> dict[str, object]:
    """The effective configuration as JSON-friendly data, the password redacted."""
    out = dict(loaded.values)
    if out.get("broker.password") is not None:
        out["broker.password"] = "***"
    return out


def preflight(loaded: LoadedConfig) -> None:
    """Check what the service needs from the machine, creating nothing: the state directory is
    a writable directory, or can be created (its nearest existing parent is writable). Raises
    :class:`UsageError` naming ``--state-dir`` when the flag set it, else :class:`ConfigError`
    naming ``state_dir``; and the optional packages the outputs need are installed
    (:class:`ConfigError` naming the extra). (The other files were checked by the loader.)"""
    from edgefl.extras import ensure_installed

    config = loaded.aggregator
    if config.outputs.publish_onnx:
        ensure_installed("torch", "onnx", feature="outputs.publish_onnx", extra="onnx")
    if config.outputs.eval_dataset is not None:
        data_module = "sklearn" if config.outputs.eval_dataset == "digits" else "mnist1d"
        ensure_installed("torch", data_module, feature="outputs.eval_dataset", extra="eval")
    problem = state_dir_problem(loaded.aggregator.state_dir)
    if problem is not None:
        source = loaded.sources.get("state_dir")
        if source is not None and source.startswith("command line"):
            raise UsageError(f"{FLAGS['state_dir']}: {problem}")
        raise config_error("state_dir", problem, source)


def state_dir_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold the aggregator's state, or None. Touches nothing."""
    path = path.absolute()
    if path.exists():
        if not path.is_dir():
            return f"{str(path)!r} is not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{str(path)!r} is not writable"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {str(path)!r}: {str(parent)!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {str(path)!r}: {str(parent)!r} is not writable"
    return None
