"""Central DP at the secure-aggregation leader: admission, noise and per-device accounting.

The leader never sees an update, only each buffer's decoded sum ``S = Σ_i w_i x_i`` (integer
weights ``1 ≤ w_i ≤ W_max``), which it releases as ``a = (S + N(0, σ² I)) / (K · W_max)``
(``sum`` normalisation). With the settings :func:`edgefl.aggregator.secagg_config.check_compatible`
demands (``sum`` normalisation, ``equal`` example weighting, norm bound off, the ring's clip equal
to the DP clip ``C``) the plaintext sensitivity argument (:mod:`edgefl.privacy.central`) carries
over with the device's clip in place of the aggregator's:

* one device has at most one update per buffer (:meth:`LeaderPrivacy.admit`: a device with an
  accepted share that is not yet combined or excluded is refused, ``DP_ONE_PER_BUFFER``), so
  it appears at most once in a sum;
* that update enters with an integer weight ``w ≤ W_max`` and, encoded, ``‖q / s‖ ≤ C_q``
  (:meth:`~edgefl.secagg.ring.RingSpec.update_norm_bound`: the device's clip ``C`` plus the
  stochastic rounding), whatever the others send (zero-out adjacency: the honest device is the
  one whose data change; another device's cheating moves nothing that depends on it);
* so ``‖S - S'‖ ≤ W_max · C_q`` and, with ``σ = z · W_max · C_q``, each release is the Gaussian
  mechanism of noise multiplier ``z``. Dividing by ``K · W_max`` gives the plaintext release
  ``(Σ c Δ + N(0, (z C_q)² I)) / K``.

Accounting is the plaintext aggregator's: a :class:`~edgefl.privacy.ParticipationLedger` with
the cap of the :class:`~edgefl.privacy.CentralDP`; a device at its cap is refused
(``DP_BUDGET_EXHAUSTED``), and every member of a combined buffer gets one participation
(:meth:`LeaderPrivacy.release`). The one-update rule keeps at most one uncounted participation
per device, so no device passes its cap. Only :attr:`participations` are state (what is held
is the role's); the service persists them with the step that released the buffer.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefl.errors import RejectReason, UpdateRejected
from edgefl.privacy import CentralDP, ParticipationLedger, PrivacyState, PrivacyStatistics
from edgefl.secagg.decision import BufferDecision
from edgefl.secagg.noise import GaussianSumNoise
from edgefl.secagg.ring import RingSpec

__all__ = ["LeaderPrivacy"]


class LeaderPrivacy:
    """Central DP ``dp`` at a leader of ring ``spec``, ``num_params`` values per update and
    largest integer weight ``w_max``; ``participations`` restored from the store."""

    def __init__(
        self,
        dp: CentralDP,
        *,
        spec: RingSpec,
        num_params: int,
        w_max: int,
        participations: Mapping[str, int] | None = None,
    ) -> None:
        if spec.clip_norm != dp.clip_norm:
            raise ValueError(
                f"the ring's clip {spec.clip_norm:g} is not the DP clip C={dp.clip_norm:g}"
            )
        self.dp = dp
        self.sensitivity = w_max * spec.update_norm_bound(num_params)
        self.noise = GaussianSumNoise(dp.noise_multiplier * self.sensitivity, dp.seed)
        self._ledger = ParticipationLedger(dp.participation_cap)
        self.load(participations or {})

    def load(self, participations: Mapping[str, int]) -> None:
        """Replace the counts (a restore)."""
        state = PrivacyState(participations=dict(participations))
        self._ledger = ParticipationLedger(self._ledger.cap, state)

    @property
    def cap(self) -> int:
        return self._ledger.cap

    def participations(self, device_id: str) -> int:
        return self._ledger.participations(device_id)

    def admit(self, device_id: str, *, held: bool) -> None:
        """Raise ``UpdateRejected`` unless a new update of ``device_id`` may be accepted;
        ``held``: the leader holds an update of the device that is not combined or excluded."""
        if held:
            raise UpdateRejected(
                RejectReason.DP_ONE_PER_BUFFER,
                f"device {device_id!r} has an update at the leader that is not combined yet",
            )
        self._ledger.admit(device_id)  # the cap (the ledger's buffer stays empty)

    def release(self, decision: BufferDecision) -> None:
        """Buffer ``decision`` was combined and released: one participation per member."""
        for device, _ in decision.members:
            self._ledger.enter(device)
        self._ledger.flush()

    def state(self) -> PrivacyState:
        """The participation counts (no buffer: the role's held shares are its own state)."""
        return self._ledger.state(buffer=False)

    def statistics(self) -> PrivacyStatistics:
        """The plaintext aggregator's figures: epsilon of the most frequent participant, ..."""
        return self._ledger.statistics(self.dp)
