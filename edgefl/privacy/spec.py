"""The text form of the privacy options (what ``--dp`` takes on a command line).

::

    central:z=3,C=0.3,eps=8,delta=1e-5        central DP (CentralDP); also cap=N, accountant=pld
    local:gaussian,eps=8,C=0.3,delta=1e-5     local DP (LocalDP); also budget=E
    local:laplace,eps=2,C=1,budget=20
    off                                       no DP (None)

Keys: ``z`` (noise multiplier), ``C`` (clip norm), ``eps`` (central: the target epsilon;
local: per update), ``delta``, ``cap`` (central: participations per device), ``accountant``
(``rdp``/``pld``), ``budget`` (local: total epsilon), ``seed`` (central, tests and simulations
only). Omitted keys take the defaults of :class:`CentralDP` / :class:`LocalDP`.
:func:`dp_to_text` is the inverse (for run records).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from edgefl.privacy.central import CentralDP
from edgefl.privacy.local import LocalDP, LocalMechanism

__all__ = ["dp_to_text", "parse_dp"]

_Options = Mapping[str, tuple[str, Callable[[str], Any]]]

_CENTRAL: Final[_Options] = {
    "z": ("noise_multiplier", float),
    "c": ("clip_norm", float),
    "eps": ("target_epsilon", float),
    "delta": ("delta", float),
    "cap": ("max_participations", int),
    "accountant": ("accountant", str),
    "seed": ("seed", int),
}
_LOCAL: Final[_Options] = {
    "c": ("clip_norm", float),
    "eps": ("epsilon", float),
    "delta": ("delta", float),
    "budget": ("budget_epsilon", float),
}


def parse_dp(text: str) -> CentralDP | LocalDP | None:
    """Parse ``central:...``, ``local:...`` or ``off``; raises ``ValueError`` naming the problem."""
    mode, _, rest = text.strip().partition(":")
    mode = mode.lower()
    if mode in ("off", "none", ""):
        if rest:
            raise ValueError(f"dp 'off' takes no options, got {rest!r}")
        return None
    items = [item.strip() for item in rest.split(",") if item.strip()]
    if mode == "central":
        kwargs = _options(items, _CENTRAL)
        if "max_participations" in kwargs and "target_epsilon" not in kwargs:
            kwargs["target_epsilon"] = None  # an explicit cap alone
        return CentralDP(**kwargs)
    if mode == "local":
        mechanism = LocalMechanism.GAUSSIAN
        if items and "=" not in items[0]:
            mechanism = LocalMechanism(items.pop(0).lower())
        return LocalDP(mechanism=mechanism, **_options(items, _LOCAL))
    raise ValueError(f"dp mode must be central, local or off, got {mode!r}")


def _options(items: list[str], known: _Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        spec = known.get(key.strip().lower())
        if not sep or spec is None:
            raise ValueError(f"bad dp option {item!r}; expected one of {', '.join(known)}")
        name, kind = spec
        try:
            out[name] = kind(value.strip())
        except ValueError:
            raise ValueError(f"dp option {key}: {value!r} is not a {name} value") from None
    return out


def dp_to_text(dp: CentralDP | LocalDP | None) -> str:
    """Inverse of :func:`parse_dp` (every option written)."""
    if dp is None:
        return "off"
    if isinstance(dp, LocalDP):
        parts = [str(dp.mechanism), f"eps={dp.epsilon:g}", f"C={dp.clip_norm:g}"]
        parts.append(f"delta={dp.delta:g}")
        if dp.budget_epsilon is not None:
            parts.append(f"budget={dp.budget_epsilon:g}")
        return "local:" + ",".join(parts)
    parts = [f"z={dp.noise_multiplier:g}", f"C={dp.clip_norm:g}", f"delta={dp.delta:g}"]
    if dp.target_epsilon is not None:
        parts.append(f"eps={dp.target_epsilon:g}")
    if dp.max_participations is not None:
        parts.append(f"cap={dp.max_participations}")
    parts.append(f"accountant={dp.accountant}")
    if dp.seed is not None:
        parts.append(f"seed={dp.seed}")
    return "central:" + ",".join(parts)
