"""Field validators for message headers: each returns the normalised value or raises
``ProtocolError(BAD_HEADER)`` naming the field. Internal to ``edgefl.protocol``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any, Final, TypeVar

from edgefl.errors import ProtocolError, RejectReason

from .topics import MAX_INT, NAME_PATTERN

MAX_TEXT: Final = 256
"""Longest free-text string (tensor names, eligibility reasons, metric names)."""
MAX_ENTRIES: Final = 1024
"""Most entries in a list or mapping field of a header."""

_E = TypeVar("_E", bound=Enum)
_NAME_RE: Final = re.compile(NAME_PATTERN)
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_INT_KEY_RE: Final = re.compile(r"0|[1-9][0-9]{0,18}")


def bad(field: str, why: str) -> ProtocolError:
    return ProtocolError(RejectReason.BAD_HEADER, f"{field}: {why}")


def integer(value: Any, field: str, *, minimum: int = 0, maximum: int = MAX_INT) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(field, f"expected an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise bad(field, f"{value} outside [{minimum}, {maximum}]")
    return value


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise bad(field, f"expected true or false, got {type(value).__name__}")
    return value


def opt_integer(value: Any, field: str, *, minimum: int = 0) -> int | None:
    return None if value is None else integer(value, field, minimum=minimum)


def number(
    value: Any, field: str, *, minimum: float = -math.inf, maximum: float = math.inf
) -> float:
    """A finite float (JSON integers accepted) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(field, f"expected a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result) or not minimum <= result <= maximum:
        raise bad(field, f"{value!r} is not finite or outside [{minimum}, {maximum}]")
    return result


def opt_number(
    value: Any, field: str, *, minimum: float = -math.inf, maximum: float = math.inf
) -> float | None:
    return None if value is None else number(value, field, minimum=minimum, maximum=maximum)


MAX_TIMESTAMP: Final = 4102444800.0
"""2100-01-01T00:00:00Z: the largest timestamp a header keeps (larger ones are clamped to it)."""


def timestamp(value: Any, field: str) -> float:
    """Seconds since the Unix epoch: finite and >= 0 (else BAD_HEADER), clamped to
    ``MAX_TIMESTAMP``. Device clocks are untrusted (no RTC before NTP), so an absurd future time
    is bounded, never a reason to reject."""
    return min(number(value, field, minimum=0.0), MAX_TIMESTAMP)


def text(value: Any, field: str, *, max_len: int = MAX_TEXT) -> str:
    """Non-empty printable string of at most ``max_len`` characters."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len or not value.isprintable():
        raise bad(field, f"expected 1-{max_len} printable characters, got {value!r:.80}")
    return value


def name(value: Any, field: str) -> str:
    """An edgefl name (``topics.NAME_PATTERN``)."""
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise bad(field, f"invalid name {value!r:.80}")
    return value


def sha256_hex(value: Any, field: str) -> str:
    if not isinstance(value, str) or _SHA256_RE.fullmatch(value) is None:
        raise bad(field, "expected 64 lowercase hex digits")
    return value


def json_object(value: Any, field: str) -> dict[str, Any]:
    """A JSON object (string keys); returned as a fresh shallow copy."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise bad(field, "expected a JSON object")
    return dict(value)


def opt_json_object(value: Any, field: str) -> dict[str, Any] | None:
    return None if value is None else json_object(value, field)


def number_map(value: Any, field: str) -> dict[str, float]:
    """Mapping of short text keys to finite numbers."""
    obj = json_object(value, field)
    if len(obj) > MAX_ENTRIES:
        raise bad(field, f"more than {MAX_ENTRIES} entries")
    return {text(k, f"{field} key", max_len=64): number(v, f"{field}[{k}]") for k, v in obj.items()}


def count_map(value: Any, field: str) -> dict[str, int]:
    """Mapping of short text keys (e.g. RejectReason values) to counts >= 0."""
    obj = json_object(value, field)
    if len(obj) > MAX_ENTRIES:
        raise bad(field, f"more than {MAX_ENTRIES} entries")
    return {
        text(k, f"{field} key", max_len=64): integer(v, f"{field}[{k}]") for k, v in obj.items()
    }


def int_count_map(value: Any, field: str) -> dict[int, int]:
    """Histogram: non-negative integer keys (decimal strings in JSON) to counts >= 0."""
    if not isinstance(value, Mapping):
        raise bad(field, "expected a JSON object")
    if len(value) > MAX_ENTRIES:
        raise bad(field, f"more than {MAX_ENTRIES} entries")
    out: dict[int, int] = {}
    for key, count in value.items():
        if isinstance(key, str) and _INT_KEY_RE.fullmatch(key) is not None:
            number_key = int(key)
        elif isinstance(key, int) and not isinstance(key, bool) and 0 <= key <= MAX_INT:
            number_key = key
        else:
            raise bad(field, f"key {key!r:.40} is not a canonical integer >= 0")
        out[number_key] = integer(count, f"{field}[{key}]")
    return out


def text_tuple(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or len(value) > MAX_ENTRIES:
        raise bad(field, f"expected a list of at most {MAX_ENTRIES} strings")
    return tuple(text(v, f"{field} item") for v in value)


def enum_value(enum_type: type[_E], value: Any, field: str) -> _E:
    try:
        return enum_type(value)
    except (ValueError, TypeError):
        raise bad(field, f"unknown value {value!r:.40}") from None
