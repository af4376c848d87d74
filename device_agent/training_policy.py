"""Sans-IO decisions of the device agent: when to train, on what job, and why a training ended.

Beside :mod:`device_agent.eligibility.policy` (whether the device may train at all), this module
decides everything else about a training from plain values, so the agent's asyncio shell
(:mod:`device_agent.agent`) only carries the decisions out:

* :func:`should_train` — a held model newer than the last one trained on, eligible, not stopping;
* :func:`training_job` — the local-training job: the manifest's hints capped by the device's
  limits, a per-device, per-version seed;
* :class:`TrainingGate` and :func:`abort_reason` — why a started training produced no update;
  :func:`marks_version_done` — whether that version is given up (error, timeout) or retried
  (a broken condition, a shutdown);
* :func:`presence_reasons` and :func:`status_line` — what the device state and systemd's status
  line say;
* server-controlled participation (protocol 1.2, PROTOCOL.md §4.7): :func:`leases_required`
  (does the aggregator grant leases), :func:`check_in_action` (check in, renew, withdraw),
  :func:`should_train_leased` (train under a held lease), :func:`lease_expired` and the
  ``LEASE_EXPIRED`` abort reason; :func:`should_fetch` (fetch a new model now, or when a lease
  needs it); :func:`training_job` takes the lease id into the seed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from device_agent.config import TrainingLimits
from device_agent.dataset import LocalDataset, device_seed
from device_agent.model_store import CurrentModel
from device_agent.trainer import TrainJob
from edgefl.models.spec import ModelSpec
from edgefl.protocol.messages import FEATURE_LEASES, DeviceStatus, ServerState, ServerStatus

__all__ = [
    "PRIVACY_BUDGET_SPENT",
    "AbortReason",
    "CheckInAction",
    "DropReason",
    "HeldLease",
    "Presence",
    "Resync",
    "TrainingGate",
    "abort_reason",
    "check_in_action",
    "lease_expired",
    "leases_mode",
    "leases_required",
    "marks_version_done",
    "presence_reasons",
    "renew_interval",
    "resync_action",
    "should_fetch",
    "should_train",
    "should_train_leased",
    "status_line",
    "training_job",
    "training_seed",
    "undecided_wait",
]


class AbortReason(StrEnum):
    """Why a started training produced no update."""

    INELIGIBLE = "ineligible"  # a condition broke mid-training
    STOPPING = "stopping"  # the agent is shutting down
    TIMEOUT = "timeout"  # longer than training.max_train_seconds
    ERROR = "error"  # the trainer raised
    LEASE_EXPIRED = "lease_expired"  # the lease ran out before the training ended (1.2)


PRIVACY_BUDGET_SPENT = "privacy_budget_spent"
"""The presence reason of a device whose local DP budget allows no more updates."""


class DropReason(StrEnum):
    """Why a finished update was lost before it could be delivered (counted, never silent)."""

    SPOOL_FULL = "spool_full"
    SPOOL_CORRUPT = "spool_corrupt"
    ENCODE_FAILED = "encode_failed"


def should_train(
    *, model_version: int | None, trained_mark: int, eligible: bool, stopping: bool
) -> bool:
    """Train iff a model is held, it is newer than the last one trained on, the device is
    eligible and the agent is not stopping. ``trained_mark`` is the last version trained on
    plus one (0: none), so every version is trained on at most once."""
    if stopping or model_version is None or not eligible:
        return False
    return model_version + 1 > trained_mark


def training_job(
    model: CurrentModel,
    spec: ModelSpec,
    limits: TrainingLimits,
    data: LocalDataset,
    device_id: str,
    lease_id: int | None = None,
) -> TrainJob:
    """The job for ``model``: the manifest's hints (epochs, batch size, learning rate) where given,
    epochs capped by ``limits.max_epochs``; seed :func:`training_seed` so a device trains a
    version (and a lease) reproducibly and differently from its neighbours."""
    hints = model.manifest.hints
    epochs = limits.max_epochs
    batch, lr = limits.batch_size, limits.lr
    if hints is not None:
        epochs = min(hints.local_epochs or epochs, limits.max_epochs)
        batch = hints.batch_size or batch
        lr = hints.lr or lr
    return TrainJob(
        spec=spec,
        base_version=model.version,
        base_weights=model.weights,
        data=data,
        epochs=epochs,
        batch_size=batch,
        lr=lr,
        max_steps=limits.max_steps,
        threads=limits.max_threads,
        nice=limits.nice,
        seed=training_seed(device_id, model.version, lease_id),
    )


_LEASE_STRIDE = 1_000_003
"""A prime: lease ids spread the seeds of one device far apart from its version steps."""


def training_seed(device_id: str, version: int, lease_id: int | None = None) -> int:
    """The seed of one local training: ``(device_seed + version) mod 2^31`` without a lease
    (one training per version), ``(device_seed + version + 1000003 * lease_id) mod 2^31`` under
    a lease (one training per lease, several per version on a small fleet): deterministic, and
    different for each lease of a device."""
    seed = device_seed(device_id) + version
    if lease_id is not None:
        seed += _LEASE_STRIDE * lease_id
    return seed % 2**31


class TrainingGate:
    """The flag a running training polls (``should_stop``) and the first reason it was raised.

    Thread-safe for the trainer's thread: ``aborted()`` reads a ``threading.Event``. Only the
    first reason raised during a training counts; ``begin()`` resets both for the next one.
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._reason: AbortReason | None = None
        self.active = False

    def begin(self) -> None:
        """A training starts: no abort requested yet."""
        self._flag.clear()
        self._reason = None
        self.active = True

    def end(self) -> None:
        """The training returned (with a result or not)."""
        self.active = False

    def abort(self, reason: AbortReason) -> None:
        """Ask a running training to stop (a no-op reason when none runs, but the flag is set)."""
        if self.active and self._reason is None:
            self._reason = reason
        self._flag.set()

    def aborted(self) -> bool:
        """Whether an abort was requested since ``begin()`` (polled from the trainer thread)."""
        return self._flag.is_set()

    @property
    def reason(self) -> AbortReason | None:
        """The first abort reason of the current training, if any."""
        return self._reason


def abort_reason(
    *,
    failed: bool,
    requested: AbortReason | None,
    timed_out: bool,
    lease_expired: bool = False,
) -> AbortReason:
    """Why a training returned no result: the trainer raised (``ERROR``), else the reason it was
    asked to stop for, else its lease ran out (``LEASE_EXPIRED``), else its own deadline passed
    (``TIMEOUT``), else a shutdown (``STOPPING``)."""
    if failed:
        return AbortReason.ERROR
    if requested is not None:
        return requested
    if lease_expired:
        return AbortReason.LEASE_EXPIRED
    return AbortReason.TIMEOUT if timed_out else AbortReason.STOPPING


def marks_version_done(reason: AbortReason) -> bool:
    """A failed or timed-out version is not retried in a loop (the next model gets a fresh
    chance); a training cut short by a broken condition or a shutdown is retried."""
    return reason in (AbortReason.ERROR, AbortReason.TIMEOUT)


def presence_reasons(
    *,
    probe_failed: bool,
    decision_reasons: Sequence[str] | None,
    training: bool,
    has_model: bool,
    budget_spent: bool = False,
) -> tuple[str, ...]:
    """Why the device does not train, as its device state says it: ``probe_failed`` when the
    probes could not be read, else the eligibility reasons (``None``: no decision yet), else
    ``no_model`` for an eligible, idle device without a model; ``privacy_budget_spent`` is
    added when its local DP budget allows no more updates."""
    spent = (PRIVACY_BUDGET_SPENT,) if budget_spent else ()
    if probe_failed:
        return ("probe_failed", *spent)
    reasons = tuple(decision_reasons) if decision_reasons is not None else ()
    if not reasons and decision_reasons is not None and not training and not has_model:
        return ("no_model", *spent)
    return reasons + spent


def status_line(
    *,
    status: DeviceStatus,
    model_version: int | None,
    connected: bool,
    spool_depth: int,
    updates_sent: int,
    reasons: Sequence[str],
    awaiting_receipt: int = 0,
    waiting_for_slot: bool = False,
) -> str:
    """systemd's one-line status, e.g. ``idle; model v3; connected; spool 0; sent 12``
    (``spool 3 (2 awaiting receipt)`` when sent updates wait for the aggregator's receipt;
    ``; waiting for a training slot`` when checked in with a leasing aggregator)."""
    model = "no model" if model_version is None else f"model v{model_version}"
    link = "connected" if connected else "disconnected"
    spool = f"spool {spool_depth}"
    if awaiting_receipt:
        spool += f" ({awaiting_receipt} awaiting receipt)"
    text = f"{status.value}; {model}; {link}; {spool}; sent {updates_sent}"
    if waiting_for_slot:
        text += "; waiting for a training slot"
    return f"{text}; not eligible: {','.join(reasons)}" if reasons else text


# ----------------------------------------------------------------------------- participation


def leases_required(state: ServerState) -> bool:
    """Whether the aggregator of ``state`` grants training leases: its ``features`` list
    ``leases`` and it publishes its participation settings. Otherwise (an older aggregator, or
    one without participation) the agent trains on every new version as in protocol 1.1."""
    return FEATURE_LEASES in state.features and state.participation is not None


def leases_mode(state: ServerState, current: bool | None) -> bool | None:
    """The leases mode after ``state``: what an online aggregator says
    (:func:`leases_required`); an offline or lost one (a clean stop, its Last Will) changes
    nothing, since it grants nothing and takes no update until it is back, and says again."""
    return leases_required(state) if state.status is ServerStatus.ONLINE else current


def undecided_wait(
    *, leases: bool | None, connected_at: float | None, now: float, grace_s: float
) -> float | None:
    """Seconds the agent still waits before it trains without knowing whether the aggregator
    grants leases (``leases`` None: no server state seen, and none remembered); None: no wait.
    An aggregator publishes its retained state when it starts, but possibly after its first
    manifest, so a device that connected at ``connected_at`` waits up to ``grace_s`` for it
    (and, never connected, until it connects: its model comes from the broker anyway) rather
    than train an update a leasing aggregator would refuse (``no_lease``). After that it
    trains as with a protocol 1.1 aggregator."""
    if leases is not None:
        return None
    if connected_at is None:
        return math.inf
    left = connected_at + grace_s - now
    return left if left > 0 else None


def renew_interval(checkin_ttl_s: float) -> float:
    """Seconds between two check-ins of a waiting device: half the aggregator's check-in
    lifetime, so one lost check-in does not drop the device from the candidates."""
    return checkin_ttl_s / 2.0


class Presence(StrEnum):
    """What the aggregator knows of the device's participation (as far as the device knows)."""

    IDLE = "idle"  # not a candidate: never checked in, withdrew, or its lease ended
    CHECKED_IN = "checked_in"  # a candidate: waiting for a lease (``waiting_for_slot``)
    LEASED = "leased"  # holds a lease: waiting for its model, or training under it


class CheckInAction(StrEnum):
    """What the agent publishes on its check-in topic now."""

    NONE = "none"
    CHECK_IN = "check_in"  # CheckIn(available=True): a candidate, or still one (renewal)
    WITHDRAW = "withdraw"  # CheckIn(available=False): no longer a candidate; gives a lease back


def check_in_action(
    *, presence: Presence, eligible: bool, stopping: bool, has_model: bool, renew_due: bool
) -> CheckInAction:
    """The participation rule of a device under a leasing aggregator:

    * a device that is eligible, holds a model and is not stopping checks in when it is not a
      candidate yet (``IDLE``), and again when its renewal is due (``CHECKED_IN``);
    * a candidate or a lease holder that turns ineligible, or stops, withdraws (the aggregator
      frees the slot at once instead of at the lease's expiry);
    * a lease holder otherwise stays quiet: it trains, or waits for the lease's model."""
    wants = eligible and not stopping
    if presence is Presence.IDLE:
        return CheckInAction.CHECK_IN if wants and has_model else CheckInAction.NONE
    if not wants:
        return CheckInAction.WITHDRAW
    if presence is Presence.CHECKED_IN and renew_due:
        return CheckInAction.CHECK_IN
    return CheckInAction.NONE


class Resync(StrEnum):
    """What a waiting candidate does after a reconnect or an aggregator restart."""

    NONE = "none"
    RENEW = "renew"  # check in again now
    REJOIN = "rejoin"  # withdraw (releasing a lease it never received), then check in again


def resync_action(*, presence: Presence, reconnected: bool, update_pending: bool) -> Resync:
    """A candidate (``CHECKED_IN``) checks in again after it ``reconnected`` or after the
    aggregator restarted (its check-ins are not durable). It also withdraws first, to release a
    lease the aggregator may have granted it whose LEASE message was lost (published while the
    device was away: MQTT keeps nothing for a clean session; or granted just before the
    aggregator stopped), which would otherwise hold a slot, and keep the device waiting, until
    it expires; except while one of its updates is still on its way (``update_pending``): the
    lease the aggregator holds for it is then that update's, and a withdrawal would release it
    before the update arrives (``no_lease``)."""
    if presence is not Presence.CHECKED_IN or not reconnected:
        return Resync.NONE
    return Resync.RENEW if update_pending else Resync.REJOIN


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A lease as the device holds it: ``lease_id``, the oldest model ``version`` to train on,
    and ``deadline``, the device's own monotonic clock when it arrived plus its ``ttl_s``
    (device and aggregator clocks are never compared)."""

    lease_id: int
    version: int
    deadline: float


def lease_expired(lease: HeldLease, now: float) -> bool:
    """The lease ran out (``now`` on the device's monotonic clock): an update under it would be
    refused, so a training under it stops and an unused one is dropped."""
    return now >= lease.deadline


def should_train_leased(
    *,
    model_version: int | None,
    lease: HeldLease | None,
    eligible: bool,
    stopping: bool,
    now: float,
) -> bool:
    """Under leases: train iff a lease is held and not expired, the held model is the lease's
    version or newer (else wait for that model), the device is eligible and not stopping. A
    lease allows one training, whatever versions the device trained on before."""
    if lease is None or model_version is None or stopping or not eligible:
        return False
    return model_version >= lease.version and not lease_expired(lease, now)


def should_fetch(*, leases: bool, held_version: int | None, lease_version: int | None) -> bool:
    """Whether to fetch a newer model as soon as its manifest arrives. Without leases, always
    (the device trains on every version). Under leases only a device that will train needs the
    newest model: fetch when no model is held (the device needs one to check in) or when the
    held lease names a newer version than the one held; otherwise keep the manifest and fetch
    when a lease asks for it. A fleet of ``N`` devices then downloads a version about ``C``
    times instead of ``N`` times."""
    if not leases or held_version is None:
        return True
    return lease_version is not None and lease_version > held_version
