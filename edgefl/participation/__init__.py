"""Server-controlled participation (PROTOCOL.md §4.7): the lease book that holds FedBuff's
concurrency ``C`` in the real runtime and in the simulator alike.

* :class:`ParticipationConfig` — ``C``, lease length and grace, check-in lifetime, flush deadline;
* :class:`CheckInPool` / :class:`CandidatePool` — who may be granted a lease;
* :class:`LeaseBook` — grants, expiries, verdicts on delivered updates, snapshot/restore;
* :func:`flush_due` — when a partly filled buffer steps (liveness below ``K`` devices);
* :class:`PresenceWatch` — a device whose Last Will arrived gives its check-in and lease back.
"""

from .config import (
    DEFAULT_CHECKIN_TTL_S,
    DEFAULT_CONCURRENCY,
    DEFAULT_LEASE_GRACE,
    DEFAULT_LEASE_S,
    ParticipationConfig,
)
from .flush import flush_due
from .leases import Lease, LeaseBook, LeaseBookState, LeaseStatistics, LeaseVerdict
from .pool import CandidatePool, CheckInPool
from .presence import PresenceWatch

__all__ = [
    "DEFAULT_CHECKIN_TTL_S",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_LEASE_GRACE",
    "DEFAULT_LEASE_S",
    "CandidatePool",
    "CheckInPool",
    "Lease",
    "LeaseBook",
    "LeaseBookState",
    "LeaseStatistics",
    "LeaseVerdict",
    "ParticipationConfig",
    "PresenceWatch",
    "flush_due",
]
