"""What the sharded root publishes to devices: the single aggregator's model releases.

The root publishes each committed model version with the single aggregator's own
:class:`~edgefl.aggregator.publisher.Publisher` (retained chunks, then the retained manifest,
built by :func:`~edgefl.aggregator.publish.build_model_packets`; old chunk sets cleared by
:class:`~edgefl.aggregator.publish.RetainedChunks`) and the retained ``server/state``
(PROTOCOL.md §4.2, §4.4, §5), so a device cannot tell a sharded tree from one aggregator by
what it downloads. This module holds the root's side of that:

* :func:`release_config`: the :class:`~edgefl.aggregator.config.AggregatorConfig` the publisher
  reads (model, training hints and codec of the manifest, ``max_packet``, the manifest signer);
* :class:`PublishedFile`: where the root records the chunk sets it left on the broker (the
  single aggregator keeps them in its SQLite store) and its server-state ``session`` counter,
  one JSON file written atomically;
* :func:`root_server_state`: the root's :class:`~edgefl.protocol.ServerState` (retained, and
  with status ``lost`` the Last Will of its connection);
* :class:`RootTotals` and :func:`root_metrics`: the root's METRICS on ``server/metrics``, every
  ``metrics_interval_s`` as the single aggregator's.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgefl.aggregator.config import AggregatorConfig
from edgefl.aggregator.publish import RetainedChunks
from edgefl.codec.config import CodecConfig
from edgefl.protocol import ServerMetrics, ServerState, ServerStatus

__all__ = [
    "AGGREGATOR_NAMED",
    "ModelSettings",
    "PublishedFile",
    "RootTotals",
    "release_config",
    "root_metrics",
    "root_server_state",
]

AGGREGATOR_NAMED = ("seed", "local_epochs", "batch_size", "lr", "max_packet", "metrics_interval_s")
"""The :class:`ModelSettings` fields named as the root's command-line options and as the single
aggregator's flat options (``AggregatorConfig.build``), with the same meaning."""


@dataclass(frozen=True)
class ModelSettings:
    """The model the root serves and what its manifest asks devices to do."""

    model: str
    seed: int = 0  # version 0 is init_weights_numpy(spec, seed), as in the single aggregator
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    codec: CodecConfig = field(default_factory=CodecConfig)
    max_packet: int = 256 * 1024
    metrics_interval_s: float = 5.0  # METRICS and the refreshed server state, as the aggregator
    signing_key: Path | None = None  # an Ed25519 private key PEM: every manifest is signed


def release_config(
    settings: ModelSettings, *, broker_url: str, fleet: str, state_dir: Path, buffer_size: int
) -> AggregatorConfig:
    """The publisher's configuration: the single aggregator's fields of the same meaning."""
    signer = None
    if settings.signing_key is not None:
        from edgefl.security import load_signer

        signer = load_signer(settings.signing_key)
    return AggregatorConfig.build(
        broker_url,
        fleet,
        settings.model,
        state_dir,
        buffer_size=buffer_size,
        codec=settings.codec,
        manifest_signer=signer,
        receipts=False,
        **{name: getattr(settings, name) for name in AGGREGATOR_NAMED},
    )


class PublishedFile:
    """``{"session": n, "sets": [[version, artifact, num_chunks], ...]}`` in one file, replaced
    atomically on every change (a :class:`~edgefl.aggregator.publisher.PublishedSets`)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        self._session = int(data.get("session", 0))
        self._sets = {(int(v), str(a)): int(n) for v, a, n in data.get("sets", [])}

    def start_session(self) -> int:
        """The next server-state session (strictly increasing over restarts), recorded."""
        self._session += 1
        self._write()
        return self._session

    def retained(self, grace: float) -> RetainedChunks:
        """The chunk sets a previous run left on the broker, to be cleared after ``grace``."""
        chunks = RetainedChunks(grace)
        chunks.restore([(v, a, n) for (v, a), n in self._sets.items()], time.monotonic())
        return chunks

    def record_published(self, version: int, artifact: str, num_chunks: int) -> None:
        self._sets[(version, artifact)] = num_chunks
        self._write()

    def forget_published(self, entries: Iterable[tuple[int, str]]) -> None:
        for entry in entries:
            self._sets.pop(entry, None)
        self._write()

    def _write(self) -> None:
        sets = [[v, a, n] for (v, a), n in sorted(self._sets.items())]
        tmp = self._path.with_name(self._path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump({"session": self._session, "sets": sets}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)


def root_server_state(
    fleet: str,
    status: ServerStatus,
    *,
    session: int,
    version: int,
    buffer_fill: int,
    buffer_size: int,
    applied: int,
    started_at: float,
) -> ServerState:
    """The root's retained server state: no receipts, leases or central DP (no ``features``)."""
    return ServerState(
        fleet=fleet,
        status=status,
        session=session,
        version=version,
        buffer_fill=min(buffer_fill, buffer_size),
        buffer_size=buffer_size,
        applied=applied,
        started_at=started_at,
        at=time.time(),
    )


@dataclass
class RootTotals:
    """The root's counters since it started (the figures of its METRICS)."""

    received: int = 0  # updates in every partial read (a re-forwarded partial's again)
    applied: int = 0  # updates in the partials applied
    bytes: int = 0  # payload bytes of the partials read
    staleness_sum: int = 0  # summed over the updates of the applied partials
    staleness_max: int = 0
    steps: int = 0


def root_metrics(
    fleet: str,
    *,
    version: int,
    buffer_fill: int,
    buffer_size: int,
    totals: RootTotals,
    rates: tuple[float, float],
    verdicts: dict[str, int],
    session: int,
) -> ServerMetrics:
    """The root's METRICS message (PROTOCOL.md §4.3): the single aggregator's fields where the
    root knows them. ``received``/``applied``/``bytes_ingested`` count updates and bytes of
    partials (the shards see the devices' own bytes), ``rates`` are (applied updates/s,
    partial bytes/s). A partial carries only the sum and maximum of its updates' staleness, not
    their histogram: ``staleness`` stays empty and ``extra`` has ``staleness_mean`` and
    ``staleness_max``. Refusals of device updates happen at the shards, so ``rejected`` is empty;
    ``extra["partials"]`` counts the partials by verdict (and ``late``)."""
    mean = totals.staleness_sum / totals.applied if totals.applied else None
    return ServerMetrics(
        fleet=fleet,
        at=time.time(),
        version=version,
        buffer_fill=min(buffer_fill, buffer_size),
        buffer_size=buffer_size,
        received=totals.received,
        applied=totals.applied,
        updates_per_s=rates[0],
        bytes_ingested=totals.bytes,
        bytes_per_s=rates[1],
        extra={
            "steps": totals.steps,
            "session": session,
            "partials": verdicts,
            "staleness_mean": mean,
            "staleness_max": totals.staleness_max,
        },
    )
