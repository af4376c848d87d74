"""Which shard owns which partition: rendezvous hashing with per-partition owner epochs.

The root (the coordinator) publishes the :class:`Assignment` retained on
``edgefl/v1/<fleet>/shards/assignment``; shards read it and own exactly the partitions it
gives them (``shard --own assigned``: :meth:`Assignment.claims`).
``owner(k) = argmax_s H(s, k)`` over the live shards (highest random weight, HRW),
with ``H`` the first 8 bytes of SHA-256 over ``"<shard>/<k>"``. So:

* the assignment is a pure function of the set of live shards (every reader computes the same);
* when a shard dies only *its* partitions move, each to the next shard in its own HRW order,
  spreading the load of the dead shard over all survivors; when a shard joins it takes only
  the partitions for which it ranks first (about ``P / S`` of them);
* every partition carries the epoch at which its current owner got it. The epoch of a moved
  partition becomes ``assignment.epoch`` (which increases by one per change); an unmoved
  partition keeps its epoch. The root accepts partials of partition ``k`` only with ``k``'s
  current epoch (fencing: a dead or deposed owner's late partials are refused).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgefl.protocol.topics import validate_name
from edgefl.sharding.partitions import check_partitions


def _score(shard: str, partition: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{shard}/{partition}".encode()).digest()[:8], "big")


def hrw_owner(partition: int, shards: Iterable[str]) -> str:
    """The live shard ranking first for ``partition`` (ties, never seen in practice, by name)."""
    live = sorted(set(shards))
    if not live:
        raise ValueError("no live shard")
    return max(live, key=lambda s: (_score(s, partition), s))


@dataclass(frozen=True)
class Assignment:
    """Owners and owner epochs of ``partitions`` partitions, at assignment ``epoch``."""

    partitions: int
    epoch: int
    owners: tuple[str, ...]
    owner_epochs: tuple[int, ...]

    def __post_init__(self) -> None:
        check_partitions(self.partitions)
        if len(self.owners) != self.partitions or len(self.owner_epochs) != self.partitions:
            raise ValueError("owners and owner_epochs need one entry per partition")
        for shard in self.owners:
            validate_name(shard, "shard id")
        if any(not 0 <= e <= self.epoch for e in self.owner_epochs):
            raise ValueError("an owner epoch is outside [0, epoch]")

    @classmethod
    def initial(cls, partitions: int, shards: Iterable[str]) -> Assignment:
        """Epoch 0: every partition to its HRW owner among ``shards``."""
        live = sorted(set(shards))
        owners = tuple(hrw_owner(k, live) for k in range(check_partitions(partitions)))
        return cls(partitions, 0, owners, (0,) * partitions)

    @property
    def shards(self) -> frozenset[str]:
        return frozenset(self.owners)

    def owned_by(self, shard: str) -> tuple[int, ...]:
        """The partitions ``shard`` owns, ascending."""
        return tuple(k for k, owner in enumerate(self.owners) if owner == shard)

    def claims(self, shard: str) -> dict[int, int]:
        """The take-overs ``shard`` asks for when it starts from this assignment: each partition
        it owns, at its owner epoch + 1. The root grants only an epoch after a partition's
        current one and this assignment records the granted ones, so the claim is granted, and a
        shard started again under the same name fences its previous run's late partials."""
        return {k: self.owner_epochs[k] + 1 for k in self.owned_by(shard)}

    def rebalance(self, live: Iterable[str]) -> Assignment:
        """The assignment for the live shards ``live``; ``self`` if nothing moves.

        A partition moves only when its HRW owner among ``live`` differs from its owner now,
        i.e. its owner died or a new shard ranks first for it; moved partitions get the new
        epoch ``self.epoch + 1``.
        """
        shards = sorted(set(live))
        owners = tuple(hrw_owner(k, shards) for k in range(self.partitions))
        if owners == self.owners:
            return self
        epoch = self.epoch + 1
        epochs = tuple(
            old_epoch if new == old else epoch
            for new, old, old_epoch in zip(owners, self.owners, self.owner_epochs, strict=True)
        )
        return Assignment(self.partitions, epoch, owners, epochs)

    def taken_over(self, partition: int, shard: str, owner_epoch: int) -> Assignment:
        """The assignment after the root granted ``partition`` to ``shard`` at ``owner_epoch``
        (a take-over: the record of who owns what follows the grants); ``self`` if that is
        already so. A change bumps ``epoch`` to ``max(epoch + 1, owner_epoch)``, so every owner
        epoch stays within ``[0, epoch]``."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} is not below {self.partitions}")
        validate_name(shard, "shard id")
        if self.owners[partition] == shard and self.owner_epochs[partition] == owner_epoch:
            return self
        epoch = max(self.epoch + 1, owner_epoch)
        owners = list(self.owners)
        epochs = list(self.owner_epochs)
        owners[partition], epochs[partition] = shard, owner_epoch
        return Assignment(self.partitions, epoch, tuple(owners), tuple(epochs))

    def to_json(self) -> bytes:
        """The retained message: canonical JSON."""
        body = {
            "partitions": self.partitions,
            "epoch": self.epoch,
            "owners": list(self.owners),
            "owner_epochs": list(self.owner_epochs),
        }
        return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Assignment:
        """Parse :meth:`to_json`; ``ValueError`` for anything else."""
        try:
            body: Mapping[str, Any] = json.loads(data)
            return cls(
                partitions=_int(body["partitions"]),
                epoch=_int(body["epoch"]),
                owners=tuple(str(s) for s in body["owners"]),
                owner_epochs=tuple(_int(e) for e in body["owner_epochs"]),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"bad assignment message: {exc}") from None


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an int >= 0, got {value!r}")
    return value
