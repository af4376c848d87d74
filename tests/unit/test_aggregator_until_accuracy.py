"""``outputs.until_accuracy``: the service stops at the first version measured at the target,
and that version stays the final model (nothing booked after it; the rest is redelivered)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_aggregator_service import Harness, delta, make_config, run
from waiting import eventually

from edgefl.aggregator import Aggregator
from edgefl.aggregator.sections import Outputs
from edgefl.transport import MemoryBroker


def test_until_accuracy_needs_a_held_out_evaluation_and_a_fraction() -> None:
    with pytest.raises(ValueError, match="needs eval_dataset"):
        Outputs(until_accuracy=0.9)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        Outputs(eval_dataset="digits", until_accuracy=1.5)
    assert Outputs(eval_dataset="digits", until_accuracy=0.9).until_accuracy == 0.9


def test_only_the_newest_versions_evaluation_at_the_target_stops_the_run(tmp_path: Path) -> None:
    """Hand-checkable: target 0.9; the old version 3 at 0.95 (the model moved on to 5) and the
    newest at 0.85 do not stop; the newest at 0.91 does, once."""
    config = make_config(tmp_path, eval_dataset="digits", until_accuracy=0.9)
    agg = Aggregator(config)

    agg._check_target(3, 0.95, newest=5)
    agg._check_target(5, 0.85, newest=5)
    assert agg.reached is None
    assert not agg._stopping

    agg._check_target(5, 0.91, newest=5)
    agg._check_target(6, 0.99, newest=6)
    assert agg.reached == (5, 0.91)
    assert agg._stopping


def test_nothing_is_applied_after_the_target_and_the_rest_is_redelivered(
    tmp_path: Path,
) -> None:
    """Version 1 reached the target; two more updates arrive in the same run: neither is
    applied nor acknowledged, so the model stays at version 1, and the next run (after the
    broker redelivers them) applies both: nothing is lost."""
    config = make_config(tmp_path, buffer_size=1)
    broker = MemoryBroker()

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("a", 1, 0, delta(1))
            await h.until(lambda s: s.version == 1)
            h.agg.reached = (1, 0.95)  # what _check_target records when version 1 is measured
            before = h.transport.statistics().received
            await h.send("b", 1, 1, delta(2))
            await h.send("c", 1, 1, delta(3))
            # both handed to the service (its reader took them off the transport) before the
            # stop, so they are in its queue ahead of the stop's end marker
            await eventually(
                lambda: (
                    h.transport.statistics().received == before + 2
                    and h.transport.statistics().queued == 0
                )
            )
        assert h.stats().version == 1
        assert h.stats().applied == 1
        assert broker.queued_for("aggregator") == 2  # unacknowledged, kept by the session

        async with Harness(broker, config) as again:
            s = await again.until(lambda s: s.version == 3)
            assert s.applied == 3  # the totals are restored: 1 from the first run, 2 now

    run(body)


@pytest.mark.slow
def test_the_service_stops_itself_when_its_newest_version_is_measured_at_the_target(
    tmp_path: Path,
) -> None:
    """Real held-out evaluation (digits): any model's accuracy is above 1%, so version 0's
    evaluation ends the run by itself, with version 0 as the final model."""
    config = make_config(tmp_path, eval_dataset="digits", until_accuracy=0.01)
    broker = MemoryBroker()

    async def body() -> None:
        async with Harness(broker, config) as h:
            await asyncio.wait_for(asyncio.shield(h.task), 60)
            assert h.agg.reached is not None
            version, accuracy = h.agg.reached
            assert version == 0
            assert accuracy >= 0.01
            assert h.agg.history()[-1].accuracy == accuracy

    run(body)
