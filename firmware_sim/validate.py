"""Checks of the ``edgefl sim`` and ``edgefl demo`` options, run before anything is written.

Every check returns the checked (parsed) value or raises :class:`edgefl.clierror.UsageError`
whose message names the option and says what is accepted (the valid choices, the range, or the
text forms), e.g. ``--profile: 'tablet' is not one of phone, sensor, vehicle, lab, mixed (or
NAME=WEIGHT,...)``. ``edgefl.cli.main`` turns that into one line on stderr and exit code 2.

Pure functions: the only side-effect-free look at the file system is :func:`output_dir`, which
checks that a directory could be created or written *without* creating it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from edgefl.clierror import UsageError, choices_hint

__all__ = [
    "at_least",
    "broker_url",
    "choice",
    "fleet_name",
    "number",
    "output_dir",
    "parsed",
    "probability",
]

T = TypeVar("T")
_ENUM_MESSAGE = re.compile(r"is not a valid [A-Z]\w*$")


def choice(option: str, value: str, choices: Iterable[str], *, extra: str = "") -> str:
    """``value`` (lower-cased) if it is one of ``choices``; ``extra`` is added to the message
    (e.g. ``"or a mix such as phone=50,sensor=50"``)."""
    options = list(choices)
    text = value.strip().lower()
    if text not in options:
        tail = f" ({extra})" if extra else ""
        raise UsageError(f"{option}: {choices_hint(value, options)}{tail}")
    return text


def at_least(option: str, value: int, minimum: int = 1) -> int:
    """An integer count ``>= minimum``."""
    if value < minimum:
        raise UsageError(f"{option} must be an integer >= {minimum}, got {value}")
    return value


def number(
    option: str,
    value: float,
    *,
    low: float = 0.0,
    high: float = math.inf,
    low_open: bool = True,
    high_open: bool = False,
) -> float:
    """A finite number in the range ``(low, high]`` (bounds open or closed as asked)."""
    left = "(" if low_open else "["
    right = ")" if high_open or math.isinf(high) else "]"
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        hi = "inf" if math.isinf(high) else f"{high:g}"
        raise UsageError(f"{option} must be a number in {left}{low:g}, {hi}{right}, got {value!r}")
    return value


def probability(option: str, value: float) -> float:
    """A probability (or fraction) in ``[0, 1]``."""
    return number(option, value, low=0.0, high=1.0, low_open=False)


def parsed(option: str, value: str, parse: Callable[[str], T], forms: str) -> T:
    """``parse(value)``; a ``ValueError``/``KeyError`` becomes a usage error listing ``forms``."""
    try:
        return parse(value)
    except (ValueError, KeyError) as exc:
        detail = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        if _ENUM_MESSAGE.search(detail):  # "... is not a valid Quantization": no class names
            detail = ""
        why = f" ({detail})" if detail else ""
        raise UsageError(f"{option}: bad value {value!r}{why}; expected {forms}") from None


def broker_url(option: str, url: str) -> str:
    """A broker URL the MQTT transport accepts (``mqtt://HOST[:PORT]``, ``mqtts://``, ``ws://``,
    ``wss://``)."""
    from edgefl.transport.config import MqttConfig

    try:
        MqttConfig.from_url(url)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    return url


def fleet_name(option: str, name: str) -> str:
    """A fleet name usable in MQTT topics (``edgefl.protocol.topics.NAME_PATTERN``)."""
    from edgefl.errors import ProtocolError
    from edgefl.protocol.topics import fleet_name as check

    try:
        check(name)
    except ProtocolError:
        raise UsageError(
            f"{option}: {name!r} is not a valid fleet name; expected 1-64 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit"
        ) from None
    return name


def output_dir(option: str, path: Path) -> Path:
    """``path`` if it is a writable directory or could be created as one; creates nothing.

    The nearest existing ancestor must be a directory the process may write into.
    """
    target = path.expanduser()
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"{option}: {str(target)!r} exists and is not a directory")
        if not os.access(target, os.W_OK | os.X_OK):
            raise UsageError(f"{option}: directory {str(target)!r} is not writable")
        return target
    ancestor = target.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(
            f"{option}: cannot create {str(target)!r}: {str(ancestor)!r} is not a directory"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(
            f"{option}: cannot create {str(target)!r}: {str(ancestor)!r} is not writable"
        )
    return target
