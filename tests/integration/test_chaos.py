"""Chaos in CI: a live fleet under SIGKILLs, every update accounted exactly once (issue 15).

The bounded version of ``bench/chaos.py``: a private Mosquitto (``dev.conf``, 127.0.0.1), the
real aggregator and 3 real device agents with ``[spool] receipts = "on"``, as separate
processes. 8 seeded faults in about 45 s, two of each kind: SIGKILL + restart of the broker, of
the aggregator, of an agent, and a broker SIGKILL while the aggregator is SIGSTOPped with a
backlog the broker had acknowledged. Then the fleet drains and every update an agent spooled is
looked up in the aggregator's durable ``seen`` table (definitions in ``firmware_sim/chaos.py``).

The guarantee under test is the receipts' (docs/PROTOCOL.md section 4.6): an agent keeps an
update until the aggregator has durably recorded it, so a broker that loses acknowledged
updates only causes resends. Without receipts from the aggregator this fails: the agents keep
every update (``spooled_left`` > 0, ``drained`` false), and with ``receipts = "off"`` the
broker kills lose updates. Logs and state stay in the test's ``tmp_path`` for diagnosis.
"""

from __future__ import annotations

import json
from pathlib import Path

import needs
import pytest

from firmware_sim.chaos import ChaosConfig, run_chaos

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


def test_every_update_is_accounted_exactly_once_after_broker_aggregator_and_agent_kills(
    tmp_path: Path,
) -> None:
    needs.mosquitto()
    config = ChaosConfig(
        agents=3,
        faults=8,
        duration_s=45.0,
        recovery_s=60.0,
        seed=15,
        backlog_s=3.0,
        backlog_max_s=15.0,
        receipts=True,
        receipt_timeout_s=5.0,
        workdir=tmp_path,
    )

    result = run_chaos(config)

    summary = json.dumps(result.to_json())  # every number in the failure message
    print(summary)  # and in the captured output of a passing run (pytest -rP)
    # the faults hit a live fleet
    assert result.faults == 8, summary
    assert result.faults_by_kind["broker_backlog"] >= 1, summary
    assert result.broker_restarts >= 2, summary
    assert result.backlog_acked >= 1, summary  # the broker held acknowledged updates when killed
    # updates were produced before a broker kill, and more after the last one
    assert max(result.produced_at_broker_kills) >= 1, summary
    assert result.updates_produced > result.produced_at_broker_kills[-1], summary
    # and nothing was lost or counted twice
    assert result.lost == 0, f"{summary}\nlogs in {tmp_path}"
    assert result.double_counted == 0, summary
    assert (result.refused, result.rejected_by_aggregator) == (0, 0), summary
    assert (result.drained, result.spooled_left, result.pending) == (True, 0, 0), summary
    # accounted but never logged: spooled, then killed before its log line (not a loss)
    assert result.updates_accounted == result.updates_produced + result.unlogged, summary
