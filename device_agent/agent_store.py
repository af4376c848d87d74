"""The device agent's durable state under ``state_dir``, opened as one unit.

``AgentStore.open(config)`` (blocking; the agent runs it in a worker thread) creates the state
directory (mode 0700) and opens, in this order, the update spool (which takes the directory's
lock), the error-feedback residual, the model store, the presence-session counter, the
trained-version mark and (with local DP on) the local DP ledger. If any step fails, what was
opened is closed again, so the spool's lock is never left held by a half-opened store. All
blocking calls on it go through ``lock`` (an ``asyncio.Lock`` the agent holds around its
worker-thread I/O).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from device_agent.config import AgentConfig
from device_agent.local_privacy import LocalPrivacyLedger
from device_agent.model_store import ModelStore
from device_agent.persist import PersistentInt
from device_agent.spool import ResidualStore, UpdateSpool

__all__ = ["AgentStore"]


@dataclass
class AgentStore:
    """Spool, residual, model store, the two persistent counters and the local DP ledger of
    one agent."""

    spool: UpdateSpool
    residuals: ResidualStore
    models: ModelStore
    sessions: PersistentInt
    trained: PersistentInt
    """The last model version trained on, plus one (0: none)."""
    privacy: LocalPrivacyLedger | None = None
    """The local DP ledger (None: local DP off)."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def open(cls, config: AgentConfig) -> AgentStore:
        """Open (creating where needed) every durable file of the agent; blocking."""
        state = config.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable = config.spool.durable
        spool = UpdateSpool(
            state / "spool",
            max_entries=config.spool.max_entries,
            max_bytes=config.spool.max_bytes,
            durable=durable,
        )
        try:
            return cls(
                spool=spool,
                residuals=ResidualStore(state / "residual.bin", durable=durable),
                models=ModelStore(state / "model", durable=durable),
                sessions=PersistentInt(state / "session", durable=durable),
                trained=PersistentInt(state / "trained_version", durable=durable),
                privacy=None
                if config.privacy.local is None
                else LocalPrivacyLedger.in_state_dir(state, durable=durable),
            )
        except BaseException:
            spool.close()
            raise

    def close(self) -> None:
        """Release the spool (and its directory lock)."""
        self.spool.close()
