"""Layered configuration, generic part: TOML file < environment < command-line flags.

A service declares a flat **schema**: dotted keys (``broker.url``, ``fleet``) mapped to a type
(``str``, ``int``, ``float``, ``bool``, ``Path``, a ``StrEnum``, or ``X | None``). This module
reads the three sources into :class:`Setting` values (the raw value, where it came from, whether it
is text to parse, the directory relative paths resolve against), and :func:`coerce` turns each into
its type. Every problem raises :class:`SettingError` (an :class:`edgefl.clierror.ConfigError`,
exit 78) worded ``"<key>: <problem> (from <source>)"``; unknown keys and variables get a "did you
mean". A schema may name types of its own: ``coerce(..., custom={tp: coercer})``.

The aggregator (``edgefl/aggregator/config_file.py``) and the device agent
(``device_agent/config.py``) both load through this module.

Conventions (shared by every service that loads through this module):

* TOML: top-level keys and one level of tables (``[broker]`` holds ``broker.*``); relative paths
  are relative to the file's directory.
* Environment: ``<PREFIX><SECTION>__<KEY>`` (double underscore) for a key in a table,
  ``<PREFIX><KEY>`` for a top-level key, upper case. Values are text: booleans
  ``true/false/1/0/yes/no/on/off``; an empty value sets an optional key to none. The service owns
  its prefix: an unknown variable with it is an error (except the ``ignored`` names).
* Flags: native values (``None`` means "not given") or text parsed like the environment's.

Sans-IO apart from reading the file (:func:`read_toml`) and secrets (:func:`read_secret`).
"""

from __future__ import annotations

import difflib
import math
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from edgefl.clierror import ConfigError

__all__ = [
    "CONFIG_KEY",
    "Coercer",
    "Mismatch",
    "Setting",
    "SettingError",
    "coerce",
    "config_error",
    "env_var_name",
    "from_env",
    "from_overrides",
    "plain",
    "read_secret",
    "read_toml",
    "suggest",
]

CONFIG_KEY = "config"
"""The key named by errors about the file itself (unreadable, not TOML)."""


class SettingError(ConfigError):
    """A problem with one setting. ``str()`` reads ``"<key>: <problem> (from <source>)"``.

    A :class:`edgefl.clierror.ConfigError` (so a ``ValueError``): raised out of a command, the
    one error path prints it on one line and exits 78 (``EX_CONFIG``). ``key``, ``problem`` and
    ``source`` stay readable, so a caller can re-raise it with the source it knows.
    """

    def __init__(self, key: str, problem: str, *, source: str | None = None) -> None:
        message = f"{key}: {problem}"
        if source:
            message += f" (from {source})"
        super().__init__(message)
        self.key = key
        self.problem = problem
        self.source = source


def config_error(key: str, problem: str, source: str | None = None) -> SettingError:
    """A :class:`SettingError` worded ``"<key>: <problem> (from <source>)"``."""
    return SettingError(key, problem, source=source)


@dataclass(frozen=True, slots=True)
class Setting:
    """One value of one key, with its provenance."""

    value: object
    source: str  # "FILE", "environment variable X", "command line (--flag)"
    textual: bool  # came as text (environment, string flag): parse it
    base_dir: Path | None = None  # relative paths resolve against this (the file's directory)


def suggest(word: str, candidates: Collection[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest candidate, or ``""``."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def env_var_name(key: str, prefix: str) -> str:
    """``("broker.url", "EDGEFL_AGG_")`` -> ``"EDGEFL_AGG_BROKER__URL"``."""
    return prefix + key.replace(".", "__").upper()


def read_toml(
    path: Path, schema: Mapping[str, object], sections: Collection[str]
) -> dict[str, Setting]:
    """Read a TOML file into settings; unknown keys and sections are errors."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise config_error(
            CONFIG_KEY, f"cannot read {str(path)!r}: {exc.strerror or exc}"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise config_error(CONFIG_KEY, f"{str(path)!r} is not valid TOML: {exc}") from None
    source, base = str(path), path.parent
    out: dict[str, Setting] = {}
    for name, value in document.items():
        if name in sections:
            if not isinstance(value, dict):
                raise config_error(name, f"expected a table [{name}], got {value!r}", source)
            for sub, subvalue in value.items():
                key = _checked(f"{name}.{sub}", schema, source)
                out[key] = Setting(subvalue, source, False, base)
        elif isinstance(value, dict):
            match = difflib.get_close_matches(name, list(sections), n=1, cutoff=0.6)
            hint = f"; did you mean [{match[0]}]?" if match else ""
            raise config_error(name, f"unknown section [{name}]{hint}", source)
        else:
            out[_checked(name, schema, source)] = Setting(value, source, False, base)
    return out


def _checked(key: str, schema: Mapping[str, object], source: str) -> str:
    if key not in schema:
        raise config_error(key, "unknown key" + suggest(key, schema), source)
    return key


def from_env(
    env: Mapping[str, str],
    schema: Mapping[str, object],
    prefix: str,
    *,
    ignored: Collection[str] = (),
) -> dict[str, Setting]:
    """The settings of every ``<prefix>*`` variable; an unknown one is an error."""
    by_var = {env_var_name(key, prefix): key for key in schema}
    out: dict[str, Setting] = {}
    for var in sorted(env):
        if not var.startswith(prefix) or var in ignored:
            continue
        key = by_var.get(var)
        if key is None:
            raise config_error(
                var, "unknown environment variable" + suggest(var, by_var), "environment"
            )
        out[key] = Setting(env[var], f"environment variable {var}", True, None)
    return out


def from_overrides(
    overrides: Mapping[str, object], schema: Mapping[str, object], flags: Mapping[str, str]
) -> dict[str, Setting]:
    """Command-line values (``None``: not given). ``flags`` maps a key to its option name, used
    as the source (``"command line (--broker)"``)."""
    out: dict[str, Setting] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        flag = flags.get(key)
        source = f"command line ({flag})" if flag else "command line"
        _checked(key, schema, source)
        out[key] = Setting(value, source, isinstance(value, str), None)
    return out


def read_secret(key: str, path: Path, source: str | None) -> str:
    """The text of a secret file without its trailing newline; empty or unreadable: error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise config_error(key, f"cannot read {str(path)!r}: {detail}", source) from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise config_error(key, f"{str(path)!r} is empty", source)
    return secret


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


class Mismatch(Exception):
    """Raised by a coercer when the value is not of its type; :func:`coerce` words it
    ``"<key>: expected <expected>, got <value> (from <source>)"``."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


Coercer = Callable[[str, Setting], object]
"""A schema type's own coercion: ``(key, setting) -> value``; raises :class:`Mismatch` or a
:class:`SettingError`."""


def coerce(
    key: str, setting: Setting, tp: object, *, custom: Mapping[object, Coercer] | None = None
) -> object:
    """Turn one setting into ``tp`` (see the module docstring); :class:`SettingError` if it
    cannot be. ``custom`` maps schema types this module does not know to their coercer."""
    tp, optional = _unwrap_optional(tp)
    if optional and _blank_text(setting):
        return None
    convert = _coercer_for(tp, custom or {})
    try:
        return convert(key, setting)
    except Mismatch as exc:
        raise config_error(
            key, f"expected {exc.expected}, got {setting.value!r}", setting.source
        ) from None


def _unwrap_optional(tp: object) -> tuple[object, bool]:
    """``X | None`` -> ``(X, True)``; any other type -> ``(tp, False)``."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return tp, False
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0], True


def _blank_text(setting: Setting) -> bool:
    """An empty text value: sets an optional key to none."""
    return setting.textual and isinstance(setting.value, str) and setting.value.strip() == ""


def _coercer_for(tp: object, custom: Mapping[object, Coercer]) -> Coercer:
    if tp in custom:
        return custom[tp]
    if tp in _SCALARS:
        return _SCALARS[tp]
    if isinstance(tp, type) and issubclass(tp, StrEnum):
        return lambda key, setting: _to_enum(key, setting, tp)
    raise AssertionError(f"no coercion for {tp!r}")  # pragma: no cover - schema bug


def _text(setting: Setting) -> str | None:
    """The stripped value when it came as text to parse, else ``None``."""
    if setting.textual and isinstance(setting.value, str):
        return setting.value.strip()
    return None


def _to_bool(_key: str, setting: Setting) -> bool:
    if isinstance(setting.value, bool):
        return setting.value
    word = (_text(setting) or "").lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise Mismatch("true or false")


def _to_int(_key: str, setting: Setting) -> int:
    value = setting.value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = _text(setting)
    if text is not None:
        try:
            return int(text)
        except ValueError:
            pass
    raise Mismatch("an integer")


def _to_float(_key: str, setting: Setting) -> float:
    value, text = setting.value, _text(setting)
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif text is not None:
        try:
            number = float(text)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise Mismatch("a number")
    return number


def _to_str(_key: str, setting: Setting) -> str:
    if isinstance(setting.value, str):
        return setting.value
    raise Mismatch("a string")


def _to_path(_key: str, setting: Setting) -> Path:
    value = setting.value
    if not (isinstance(value, str | Path) and str(value).strip()):
        raise Mismatch("a path")
    candidate = Path(str(value).strip() if setting.textual else value)
    if setting.base_dir is not None and not candidate.is_absolute():
        candidate = setting.base_dir / candidate
    return candidate


_SCALARS: dict[object, Coercer] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
}


def _to_enum(key: str, setting: Setting, tp: type[StrEnum]) -> StrEnum:
    value = setting.value
    choices = [m.value for m in tp]
    if isinstance(value, StrEnum | str) and str(value).strip().lower() in choices:
        return tp(str(value).strip().lower())
    text = str(value) if isinstance(value, str) else repr(value)
    close = difflib.get_close_matches(text, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise config_error(
        key,
        f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}",
        setting.source,
    )


def plain(value: object) -> object:
    """JSON-friendly form of a coerced value (paths and enums as text)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, StrEnum):
        return value.value
    return value
