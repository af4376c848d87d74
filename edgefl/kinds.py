"""The text form ``<kind>[:<parameters>]`` of a choice and its parameters, split once.

The staleness function (``polynomial:0.5``) and the data partition (``dirichlet:0.3``) are
written this way on command lines and in config files; each parses its own parameters.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

__all__ = ["split_kind"]

K = TypeVar("K", bound=StrEnum)


def split_kind(text: str, kinds: type[K], what: str) -> tuple[K, str]:
    """The kind and the parameter text (``""`` without one) of ``"<kind>[:<parameters>]"``,
    case and surrounding blanks ignored; ``ValueError`` naming ``what`` and the known kinds for
    an unknown kind."""
    head, _, parameters = text.strip().lower().partition(":")
    try:
        return kinds(head), parameters
    except ValueError:
        known = ", ".join(k.value for k in kinds)
        raise ValueError(f"unknown {what} {head!r}; expected one of: {known}") from None
