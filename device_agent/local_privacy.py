"""Local differential privacy in the device agent: the noise, the persisted epsilon ledger, the
budget refusal and what the device reports (docs/PRIVACY.md, "Local DP on the device").

With ``[privacy] dp = "local:..."`` every finished training goes through :meth:`LocalPrivacy.
privatize` (clip to ``C``, add Gaussian or Laplace noise: :class:`edgefl.privacy.LocalDP`)
before it is encoded, and only the noised vector is encoded, spooled and sent; the training
metrics (loss, accuracy on local data, steps, time) are left out of the update and the device
state. The order in the agent (``DeviceAgent._train``) is: train, privatize,
:meth:`LocalPrivacy.charge` (the ledger is written, atomically and fsynced), the lease is used
up (so its next check-in already knows whether the budget allows another update), encode,
spool, send. A crash can therefore over-count the spend (charged, not spooled) but never
under-count it.

The ledger (:class:`LocalPrivacyLedger`) is ``<state_dir>/local_dp.json``: the running total
:class:`edgefl.privacy.LocalSpend` (Gaussian releases compose exactly through ``mu^2``, Laplace
ones add their epsilons). A missing file is a device that never released a noised update; an
unreadable one stops the agent at start (:class:`LedgerCorrupt`) rather than reset the
device's epsilon to 0. The totals do not depend on the settings they were spent under, so
changing ``eps``/``C``/the mechanism keeps the spend; deleting the file (or the state
directory) resets it, and the epsilon reported after that covers only the new updates.

Budget: before each training the agent asks :meth:`LocalPrivacy.refuses` whether one more
update would pass ``budget``; a refused training is counted (once per model version) and the
exhaustion is logged once. The device then stops checking in for leases and reports the
reason ``privacy_budget_spent``.

Noise comes from a fresh ``os.urandom``-seeded generator per update unless a generator is
given (tests and simulations only: anyone who knows the seed can subtract the noise).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from device_agent.spool import atomic_write
from device_agent.trainer import TrainResult
from edgefl.errors import CodecError, RejectReason
from edgefl.privacy.local import LocalDP, LocalRelease, LocalSpend, updates_left

__all__ = [
    "LEDGER_FILE",
    "LedgerCorrupt",
    "LocalPrivacy",
    "LocalPrivacyLedger",
    "LocalPrivacyReport",
    "read_report",
    "report_of",
]

log = logging.getLogger("device_agent.local_privacy")

LEDGER_FILE = "local_dp.json"
"""The ledger's file name in the state directory."""
_FORMAT = 1


class LedgerCorrupt(ValueError):
    """The ledger file exists but cannot be read: the agent refuses to start."""


class LocalPrivacyLedger:
    """The device's local DP spend in one JSON file, written atomically. Blocking."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self._durable = durable
        self._spend = self._read()

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, durable: bool = True) -> LocalPrivacyLedger:
        return cls(state_dir / LEDGER_FILE, durable=durable)

    def _read(self) -> LocalSpend:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return LocalSpend()
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerCorrupt(f"cannot read the local DP ledger {self.path}: {exc}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError(f"not a format-{_FORMAT} ledger")
            spend = LocalSpend.from_json(data["spend"])
            values = (spend.gaussian_mu_squared, spend.laplace_epsilon)
            if not all(math.isfinite(v) for v in values):
                raise ValueError("not finite")
        except (ValueError, TypeError, KeyError) as exc:
            raise LedgerCorrupt(
                f"the local DP ledger {self.path} is unreadable ({exc}); refusing to start "
                "(deleting it resets this device's epsilon to 0)"
            ) from None
        return spend

    @property
    def spend(self) -> LocalSpend:
        return self._spend

    def record(self, spend: LocalSpend) -> None:
        """Persist ``spend`` (atomically; fsynced when durable), then hold it."""
        data = {"format": _FORMAT, "spend": spend.to_json()}
        atomic_write(
            self.path, (json.dumps(data, sort_keys=True) + "\n").encode(), durable=self._durable
        )
        self._spend = spend


@dataclass(frozen=True)
class LocalPrivacyReport:
    """What the device says about its local DP (statistics, device state, check-config)."""

    mechanism: str
    epsilon_per_update: float
    delta: float  # of the total (and of each Gaussian update); 0 for Laplace alone
    clip_norm: float
    noise_scale: float  # Gaussian: the noise std per value; Laplace: the scale b
    epsilon_spent: float  # total over the noised updates, at ``delta``
    epsilon_budget: float | None
    updates: int  # noised updates released (charged)
    updates_left: int | None  # within the budget (None: no budget)
    refused: int  # trainings refused for the budget since the agent started

    @property
    def exhausted(self) -> bool:
        return self.updates_left == 0

    def device_state_fields(self) -> dict[str, Any]:
        """The ``local_*`` fields of :class:`edgefl.protocol.messages.DeviceState`."""
        return {
            "local_dp": self.mechanism,
            "local_epsilon_per_update": self.epsilon_per_update,
            "local_epsilon_spent": self.epsilon_spent,
            "local_epsilon_budget": self.epsilon_budget,
            "local_delta": self.delta,
            "local_dp_updates": self.updates,
            "local_budget_exhausted": self.exhausted,
        }

    def summary(self) -> str:
        """One line for people (``check-config``, logs)."""
        laplace = self.mechanism == "laplace"
        clip = "L1" if laplace else "L2"
        noise = (
            f"Laplace scale {self.noise_scale:.4g}" if laplace else f"std {self.noise_scale:.4g}"
        )
        at = "" if laplace else f" at delta {self.delta:g}"
        budget = "no budget"
        if self.epsilon_budget is not None:
            budget = f"budget {self.epsilon_budget:g}: {self.updates_left} more updates"
        return (
            f"{self.mechanism}, epsilon {self.epsilon_per_update:g} per update{at}, {clip} clip "
            f"{self.clip_norm:g}, noise {noise} per value; spent epsilon "
            f"{self.epsilon_spent:.4g} in {self.updates} updates; {budget}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **self.device_state_fields(),
            "clip_norm": self.clip_norm,
            "noise_scale": self.noise_scale,
            "updates_left": self.updates_left,
            "refused": self.refused,
        }


def read_report(config: LocalDP, state_dir: Path) -> LocalPrivacyReport:
    """The report from the ledger in ``state_dir``, read only (``check-config``); a missing
    ledger is a device without noised updates. Raises :class:`LedgerCorrupt`."""
    return report_of(config, LocalPrivacyLedger.in_state_dir(state_dir).spend)


def report_of(config: LocalDP, spend: LocalSpend, refused: int = 0) -> LocalPrivacyReport:
    """The report of ``spend`` under ``config``."""
    gaussian_spent = spend.gaussian_mu_squared > 0.0 or config.mechanism == "gaussian"
    delta = config.delta if gaussian_spent else 0.0
    return LocalPrivacyReport(
        mechanism=str(config.mechanism),
        epsilon_per_update=config.epsilon,
        delta=delta,
        clip_norm=config.clip_norm,
        noise_scale=config.noise_scale,
        epsilon_spent=spend.epsilon(config.delta),
        epsilon_budget=config.budget_epsilon,
        updates=spend.updates,
        updates_left=updates_left(spend, config),
        refused=refused,
    )


class LocalPrivacy:
    """Local DP of one agent: its settings, its ledger and its refusals (see the module)."""

    def __init__(
        self,
        config: LocalDP,
        ledger: LocalPrivacyLedger,
        *,
        device_id: str,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self._ledger = ledger
        self._device = device_id
        self._rng = rng
        self._refused = 0
        self._refused_version: int | None = None
        self._report = report_of(config, ledger.spend)
        if self.exhausted:
            self._tell_exhausted()

    @property
    def exhausted(self) -> bool:
        """One more update would pass the budget: the device does not train any more (from the
        report computed at the last charge: the agent asks this often)."""
        return self._report.exhausted

    def report(self) -> LocalPrivacyReport:
        return self._report

    def privatize(self, delta: ArrayLike) -> LocalRelease:
        """Clip and noise ``delta`` (ValueError when it is not finite)."""
        return self.config.privatize(delta, self._rng)

    def privatize_result(self, result: TrainResult) -> tuple[TrainResult, LocalRelease]:
        """``result`` as it may leave the device: its delta clipped and noised, and no training
        metrics (loss, accuracy, steps and time are computed from the local data and would be
        sent without noise). ``CodecError(NON_FINITE)`` when the delta is not finite."""
        try:
            release = self.privatize(result.delta)
        except ValueError as exc:
            raise CodecError(RejectReason.NON_FINITE, str(exc)) from None
        return dataclasses.replace(result, delta=release.update, metrics={}), release

    def charge(self, release: LocalRelease) -> None:
        """Persist the spend of ``release`` (blocking): before the update is spooled."""
        self._ledger.record(self._ledger.spend.add(release))
        self._report = report_of(self.config, self._ledger.spend, self._refused)
        if self.exhausted:  # this update spent it: no update is charged after it
            self._tell_exhausted()

    def refuses(self, version: int) -> bool:
        """Whether training on model ``version`` is refused for the budget; each refused
        version is counted once."""
        if not self.exhausted:
            return False
        if version != self._refused_version:
            self._refused_version = version
            self._refused += 1
            self._report = report_of(self.config, self._ledger.spend, self._refused)
            log.debug("%s: not training on v%d: local DP budget spent", self._device, version)
        return True

    def _tell_exhausted(self) -> None:
        """Logged once per agent run: at start when the ledger is spent, or by the update that
        spent it (refusals are then counted, at debug level)."""
        r = self._report
        log.warning(
            "%s: local DP budget spent: epsilon %.4g of %.4g (delta %g) after %d noised "
            "updates; this device trains no more (raise budget= in privacy.dp to continue)",
            self._device,
            r.epsilon_spent,
            r.epsilon_budget,
            r.delta,
            r.updates,
        )
