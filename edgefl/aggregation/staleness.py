"""Staleness weights ``s(tau)`` for asynchronous aggregation.

``tau = current_version - base_version`` (an integer >= 0): how many server steps happened since
the device fetched the model it trained on. The weight of an update is
``example_weight * s(tau)`` (see :mod:`edgefl.aggregation.weighting`).

The functions follow FedAsync (Xie, Koyejo, Gupta 2019):

* constant:    ``s(tau) = 1``
* polynomial:  ``s(tau) = (1 + tau) ** -a``             (a >= 0; FedBuff-style default a = 0.5)
* hinge:       ``s(tau) = 1`` if ``tau <= b`` else ``1 / (a * (tau - b) + 1)``     (a, b >= 0)

Every function has ``s(0) = 1``. Unlike FLSim we do **not** renormalise so that
``s(avg_staleness) = 1``: with the default ``mean`` normalisation of FedBuff only the ratios of
weights matter, so such a constant factor would cancel anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Protocol

from edgefl.kinds import split_kind


class StalenessWeight(Protocol):
    """``s(tau)``: a finite weight > 0 for a staleness ``tau >= 0``."""

    def __call__(self, tau: int) -> float: ...


class StalenessKind(StrEnum):
    """The built-in staleness functions (CLI and config names)."""

    CONSTANT = "constant"
    POLYNOMIAL = "polynomial"
    HINGE = "hinge"


def _check_tau(tau: int) -> None:
    if tau < 0:
        raise ValueError(f"staleness tau must be >= 0, got {tau}")


def _check_param(kind: StalenessKind, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{kind} staleness: parameter {name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{kind} staleness: parameter {name} must be finite and >= 0, got {value}")


@dataclass(frozen=True)
class ConstantStaleness:
    """``s(tau) = 1``: staleness is ignored (FLSim's default)."""

    kind: ClassVar[StalenessKind] = StalenessKind.CONSTANT

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        return 1.0


@dataclass(frozen=True)
class PolynomialStaleness:
    """``s(tau) = (1 + tau) ** -a``; ``a = 0.5`` gives ``1/sqrt(1 + tau)``."""

    a: float = 0.5
    kind: ClassVar[StalenessKind] = StalenessKind.POLYNOMIAL

    def __post_init__(self) -> None:
        _check_param(self.kind, "a", self.a)

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        return float((1.0 + tau) ** -self.a)


@dataclass(frozen=True)
class HingeStaleness:
    """FedAsync's hinge: full weight up to ``b`` steps old, then ``1 / (a (tau - b) + 1)``.

    Defaults ``a = 1, b = 10`` follow the FedAsync re-implementation in Plato.
    """

    a: float = 1.0
    b: float = 10.0
    kind: ClassVar[StalenessKind] = StalenessKind.HINGE

    def __post_init__(self) -> None:
        _check_param(self.kind, "a", self.a)
        _check_param(self.kind, "b", self.b)

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        if tau <= self.b:
            return 1.0
        return 1.0 / (self.a * (tau - self.b) + 1.0)


_PARAMETERS: dict[StalenessKind, tuple[str, ...]] = {
    StalenessKind.CONSTANT: (),
    StalenessKind.POLYNOMIAL: ("a",),
    StalenessKind.HINGE: ("a", "b"),
}


def make_staleness(kind: StalenessKind | str, **params: float) -> StalenessWeight:
    """Build a built-in staleness function by name, e.g. ``make_staleness("hinge", a=1, b=4)``.

    Raises ``ValueError`` naming the valid kinds or parameters when ``kind`` is unknown, a
    parameter is not accepted by that kind, or a value is out of range. Omitted parameters take
    the class defaults.
    """
    try:
        k = StalenessKind(kind)
    except ValueError:
        valid = ", ".join(m.value for m in StalenessKind)
        raise ValueError(f"unknown staleness kind {kind!r}; expected one of: {valid}") from None
    allowed = _PARAMETERS[k]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) if allowed else "no parameters"
        raise ValueError(f"{k} staleness does not take {', '.join(unknown)}; it accepts {accepted}")
    if k is StalenessKind.CONSTANT:
        return ConstantStaleness()
    if k is StalenessKind.POLYNOMIAL:
        return PolynomialStaleness(**params)
    return HingeStaleness(**params)


@dataclass(frozen=True)
class StalenessSetting:
    """A staleness function by name and parameters (``None``: the function's default), as the
    command line and the configs spell it; :meth:`weight` builds it."""

    kind: StalenessKind
    a: float | None = None
    b: float | None = None

    def params(self) -> dict[str, float]:
        """The parameters that are set, by name (what :func:`make_staleness` takes)."""
        return {name: value for name, value in (("a", self.a), ("b", self.b)) if value is not None}

    def weight(self) -> StalenessWeight:
        """The staleness function (raises ``ValueError`` for out-of-range parameters)."""
        return make_staleness(self.kind, **self.params())


def parse_staleness(text: str) -> StalenessSetting:
    """The one parser of the staleness text: ``constant`` | ``polynomial`` | ``polynomial:A`` |
    ``hinge`` | ``hinge:A,B`` (case and surrounding blanks ignored).

    Raises ``ValueError`` for an unknown kind, a parameter that is not a number, or the wrong
    number of parameters for the kind. Parameter ranges are checked by :meth:`StalenessSetting.
    weight` (``make_staleness``)."""
    kind, arg = split_kind(text, StalenessKind, "staleness kind")
    values = [float(v) for v in arg.split(",")] if arg else []
    if kind is StalenessKind.CONSTANT and values:
        raise ValueError("constant staleness takes no parameter")
    if kind is StalenessKind.POLYNOMIAL and len(values) > 1:
        raise ValueError("polynomial staleness takes one parameter: polynomial:A")
    if kind is StalenessKind.HINGE and len(values) not in (0, 2):
        raise ValueError("hinge staleness takes two parameters: hinge:A,B")
    padded = [*values, None, None]
    return StalenessSetting(kind, a=padded[0], b=padded[1])
