"""Differential privacy for edgefl (docs/PRIVACY.md). numpy only, sans-IO.

* :mod:`.central` -- :class:`CentralDP`: the aggregator clips every decoded update to ``C``,
  accepts one update per device per buffer, bounds weights to ``[0, 1]`` and adds
  ``N(0, (zC)^2 I)`` to each flush's sum (applied by :class:`~edgefl.aggregation.FedBuff`).
* :mod:`.accountant` -- per-device epsilon with ``dp-accounting`` (RDP or PLD), the
  participation cap that follows from a target epsilon.
* :mod:`.ledger` -- :class:`ParticipationLedger`: participations per device, the open buffer's
  devices, the persisted :class:`PrivacyState` and the reported :class:`PrivacyStatistics`.
* :mod:`.local` -- :class:`LocalDP`: the device clips and adds Gaussian (analytic calibration)
  or Laplace noise before encoding, and keeps its running total (:class:`LocalSpend`).
* :mod:`.analytic` -- the analytic Gaussian mechanism in plain ``math`` (devices, no scipy).
* :mod:`.spec` -- :func:`parse_dp`: the ``--dp central:z=3,C=0.3,eps=8`` / ``local:...`` text.

``dp-accounting`` is imported only when an epsilon is computed (``aggregator`` / ``sim``
extras); the device side (:mod:`.local`) never needs it.
"""

from __future__ import annotations

from edgefl.privacy.accountant import AccountantKind, calibrate_noise, epsilon, participation_cap
from edgefl.privacy.central import CentralDP, GaussianNoise
from edgefl.privacy.ledger import ParticipationLedger, PrivacyState, PrivacyStatistics
from edgefl.privacy.local import LocalDP, LocalMechanism, LocalRelease, LocalSpend, may_train
from edgefl.privacy.spec import dp_to_text, parse_dp

__all__ = [
    "AccountantKind",
    "CentralDP",
    "GaussianNoise",
    "LocalDP",
    "LocalMechanism",
    "LocalRelease",
    "LocalSpend",
    "ParticipationLedger",
    "PrivacyState",
    "PrivacyStatistics",
    "calibrate_noise",
    "dp_to_text",
    "epsilon",
    "may_train",
    "parse_dp",
    "participation_cap",
]
