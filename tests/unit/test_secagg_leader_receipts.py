"""Receipts at the secure-aggregation leader (edgefl/aggregator/secagg_receipts.py): each share
pair's final verdict, published only after the write that made it durable."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from test_secagg_dp import NUM_PARAMS, _Fleet
from test_secagg_dp import _config as dp_config
from test_secagg_services import FLEET, KEYS, SETTINGS, _shares
from test_secagg_services import _config as secagg_config

from edgefl.aggregator.receipts import ReceiptQueue, ReceiptSender
from edgefl.aggregator.secagg_leader import LeaderService, leader_state_path
from edgefl.aggregator.secagg_store import LeaderStore
from edgefl.participation import ParticipationConfig
from edgefl.protocol.messages import (
    FEATURE_RECEIPTS,
    Receipt,
    ServerStatus,
    decode_message,
    encode_message,
)
from edgefl.protocol.topics import secagg_report_topic, secagg_share_topic
from edgefl.secagg import HelperPartial
from edgefl.secagg.wire import coord_partial
from edgefl.transport import InboundMessage, MemoryBroker, MemoryTransport


def _leader(
    tmp_path: Path, transport: MemoryTransport, *, dp: bool = False, **fields: Any
) -> LeaderService:
    config = (dp_config if dp else secagg_config)(tmp_path / "leader", **fields)
    service = LeaderService(config, SETTINGS, KEYS.public_key)
    service._restore(LeaderStore(leader_state_path(tmp_path / "leader"), fsync=False))
    service._transport = transport
    if config.ingest.receipts:  # what run() starts; the test reads the queue itself
        service.receipts = ReceiptSender(ReceiptQueue(64), transport)
    return service


def _resend(device: str, seq: int) -> InboundMessage:
    return InboundMessage(secagg_share_topic(FLEET, device, seq), _shares(device, seq).share)


def _verdicts(leader: LeaderService) -> dict[tuple[str, int], str]:
    """Everything queued so far, as ``{(device, seq): "committed" | reason}``."""
    assert leader.receipts is not None
    queue = leader.receipts.queue
    out: dict[tuple[str, int], str] = {}
    while len(queue):
        _topic, payload = queue._items.popleft()
        receipt = decode_message(payload, Receipt)
        # updates complete out of seq order: "through" is this receipt's highest commit only
        assert receipt.through == (receipt.committed[-1][1] if receipt.committed else None)
        for lo, hi in receipt.committed:
            out.update({(receipt.device_id, seq): "committed" for seq in range(lo, hi + 1)})
        out.update({(receipt.device_id, seq): r for seq, r in receipt.rejected.items()})
    return out


async def test_members_are_receipted_committed_only_once_their_step_is_written(
    tmp_path: Path,
) -> None:
    async with MemoryTransport(MemoryBroker(), "leader") as transport:
        # Arrange: two complete updates (both shares), a flush after 1 s
        flush = ParticipationConfig(flush_after_s=1.0)
        leader = _leader(tmp_path, transport, participation=flush)
        fleet = _Fleet(leader)
        await fleet.send("d0", 1)
        await fleet.send("d1", 1)
        await leader.tick(time.time() + 2.0)  # flushed: decided, awaiting the helper
        await leader.handle(_resend("d0", 1))  # a member of the open decision, resent
        assert _verdicts(leader) == {}  # decided, not combined: no word yet

        # Act
        await fleet.step()

        # Assert: committed, and the step is durable
        assert _verdicts(leader) == {("d0", 1): "committed", ("d1", 1): "committed"}
        _, model = LeaderStore(leader_state_path(tmp_path / "leader"), fsync=False).load()
        assert model is not None
        assert model.state.version == 1

        # a resend of a combined update is receipted committed again (its receipt was lost)
        await leader.handle(_resend("d0", 1))
        assert _verdicts(leader) == {("d0", 1): "committed"}


async def test_final_refusals_and_exclusions_are_receipted_transient_ones_are_not(
    tmp_path: Path,
) -> None:
    async with MemoryTransport(MemoryBroker(), "leader") as transport:
        # Arrange: central DP with cap 1; d0 and d1 combined in version 1; d2 holds an update
        leader = _leader(tmp_path, transport, dp=True)
        fleet = _Fleet(leader)
        await fleet.send("d0", 1)
        await fleet.send("d1", 1)
        await fleet.step()
        await fleet.send("d2", 1)
        _verdicts(leader)

        # Act: d0 at its cap; d2's second update while its first is held; d1 replays a seq;
        # d2's first update redelivered (held: no word)
        await fleet.send("d0", 2)
        await fleet.send("d2", 2)
        await fleet.send("d2", 1)
        await leader.handle(_resend("d1", 0))

        # Assert: final ones receipted; dp_one_per_buffer not (the device resends it later)
        assert _verdicts(leader) == {("d0", 2): "dp_budget_exhausted", ("d1", 0): "replay"}
        assert leader.statistics()["dp_one_per_buffer"] == 1


async def test_an_update_whose_seed_never_came_is_receipted_excluded(tmp_path: Path) -> None:
    async with MemoryTransport(MemoryBroker(), "leader") as transport:
        # Arrange: a masked share, no seed
        leader = _leader(tmp_path, transport)
        await leader.handle(_resend("d0", 3))
        assert _verdicts(leader) == {}

        # Act: the share timeout passes
        await leader.tick(time.time() + SETTINGS.share_timeout_s + 1.0)

        # Assert: refused for good, by reason; a resend of it gets the same answer
        assert _verdicts(leader) == {("d0", 3): "secagg_missing_helper_share"}
        await leader.handle(_resend("d0", 3))
        assert _verdicts(leader) == {("d0", 3): "secagg_missing_helper_share"}


async def test_the_leader_announces_receipts_unless_they_are_off(tmp_path: Path) -> None:
    async with MemoryTransport(MemoryBroker(), "leader") as transport:
        on = _leader(tmp_path / "on", transport)
        off = _leader(tmp_path / "off", transport, receipts=False)
    assert FEATURE_RECEIPTS in on._server_state(ServerStatus.ONLINE).features
    assert FEATURE_RECEIPTS not in off._server_state(ServerStatus.ONLINE).features
    assert off.receipts is None


async def test_the_members_of_a_buffer_that_fails_the_range_check_are_receipted_refused(
    tmp_path: Path,
) -> None:
    async with MemoryTransport(MemoryBroker(), "leader") as transport:
        # Arrange: a decision of two updates
        flush = ParticipationConfig(flush_after_s=1.0)
        leader = _leader(tmp_path, transport, participation=flush)
        fleet = _Fleet(leader)
        await fleet.send("d0", 1)
        await fleet.send("d1", 1)
        await leader.tick(time.time() + 2.0)
        decision = leader.leader.open_decision
        assert decision is not None

        # Act: a partial of random ring elements (a helper's or a member's garbage)
        garbage = HelperPartial(decision.buffer_id, random.Random(1).randbytes(4 * NUM_PARAMS))
        msg = encode_message(coord_partial(FLEET, garbage, 0.0), garbage.total)
        await leader.handle(InboundMessage(secagg_report_topic(FLEET), msg))

        # Assert: no step; both refused by reason, and so is a resend
        assert leader.version == 0
        lost = {("d0", 1): "secagg_overflow", ("d1", 1): "secagg_overflow"}
        assert _verdicts(leader) == lost
        await leader.handle(_resend("d0", 1))
        assert _verdicts(leader) == {("d0", 1): "secagg_overflow"}
