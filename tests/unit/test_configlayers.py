"""edgefl.configlayers: the coercion shared by the aggregator's and the agent's config loaders."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import pytest

from device_agent.config import ConfigError, load_config
from edgefl import clierror
from edgefl.configlayers import Mismatch, Setting, SettingError, coerce


class Colour(StrEnum):
    RED = "red"
    GREEN = "green"


def env(value: object) -> Setting:
    return Setting(value, "environment variable X", True, None)


def native(value: object, base: Path | None = None) -> Setting:
    return Setting(value, "FILE", False, base)


@pytest.mark.parametrize(
    ("setting", "tp", "expected"),
    [
        (env(" yes "), bool, True),
        (env("off"), bool, False),
        (native(False), bool, False),
        (env(" 42"), int, 42),
        (native(7), int, 7),
        (env("2.5"), float, 2.5),
        (native(3), float, 3.0),
        (env("abc"), str, "abc"),
        (env(""), int | None, None),
        (env("5"), int | None, 5),
        (env("GREEN"), Colour, Colour.GREEN),
        (native("a/b", Path("/etc")), Path, Path("/etc/a/b")),
        (native("/abs", Path("/etc")), Path, Path("/abs")),
    ],
)
def test_coerce_builtin_types(setting: Setting, tp: object, expected: object) -> None:
    assert coerce("k", setting, tp) == expected


@pytest.mark.parametrize(
    ("setting", "tp", "message"),
    [
        (
            env("maybe"),
            bool,
            "k: expected true or false, got 'maybe' (from environment variable X)",
        ),
        (native(True), int, "k: expected an integer, got True (from FILE)"),
        (env("nan"), float, "k: expected a number, got 'nan' (from environment variable X)"),
        (native(3), str, "k: expected a string, got 3 (from FILE)"),
        (native(" "), Path, "k: expected a path, got ' ' (from FILE)"),
        (native(""), int | None, "k: expected an integer, got '' (from FILE)"),
        (
            env("gren"),
            Colour,
            "k: expected one of 'red', 'green', got 'gren'; did you mean 'green'? "
            "(from environment variable X)",
        ),
    ],
)
def test_coerce_names_key_value_and_source(setting: Setting, tp: object, message: str) -> None:
    with pytest.raises(SettingError) as info:
        coerce("k", setting, tp)
    assert str(info.value) == message
    assert info.value.key == "k"
    assert isinstance(info.value, clierror.ConfigError)


def _pair(_key: str, setting: Setting) -> tuple[int, int]:
    if not isinstance(setting.value, str) or setting.value.count(",") != 1:
        raise Mismatch("two integers 'a,b'")
    left, right = setting.value.split(",")
    return int(left), int(right)


def test_custom_coercer_owns_its_type_also_when_optional() -> None:
    custom = {tuple[int, int]: _pair}
    assert coerce("k", env("1,2"), tuple[int, int], custom=custom) == (1, 2)
    assert coerce("k", env("3,4"), tuple[int, int] | None, custom=custom) == (3, 4)
    assert coerce("k", env(""), tuple[int, int] | None, custom=custom) is None
    with pytest.raises(SettingError, match=r"^k: expected two integers 'a,b', got '1' \(from"):
        coerce("k", env("1"), tuple[int, int], custom=custom)


def test_agent_config_error_is_the_shared_setting_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            env={
                "EDGEFL_BROKER__URL": "mqtt://b",
                "EDGEFL_FLEET": "f",
                "EDGEFL_DEVICE_ID": "d",
                "EDGEFL_DATA__KIND": "csv",
                "EDGEFL_DATA__PATH": str(tmp_path / "x.csv"),
                "EDGEFL_ELIGIBILITY__WINDOWS": "08:00-09:00, 25:00-26:00",
            },
            overrides={},
        )
    assert ConfigError is SettingError
    assert info.value.key == "eligibility.windows[1]"
    assert info.value.source == "environment variable EDGEFL_ELIGIBILITY__WINDOWS"
