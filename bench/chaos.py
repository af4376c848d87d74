"""Chaos benchmark: a live fleet of real agents under ~20 random SIGKILLs, every update reconciled.

Mosquitto, the aggregator and N device agents run as real processes on one machine; the seeded
fault schedule kills and restarts the broker, the aggregator and agents, and kills the broker
while the aggregator is paused with a backlog of broker-acknowledged updates. Afterwards the
fleet drains and every update an agent spooled is looked up in the aggregator's durable state
(see firmware_sim/chaos.py for the exact definitions).

    python bench/chaos.py [--agents 4] [--faults 20] [--duration 120] [--seed 1] [--json]
    python bench/chaos.py --no-receipts     # the same run with receipts off: shows the loss

With ``--json`` the last stdout line is the result object, with ``faults``, ``updates_produced``,
``lost`` and ``double_counted``. Exit code 1 when anything was lost or double-counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware_sim.chaos import ChaosConfig, run_chaos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of faults")
    parser.add_argument("--recovery", type=float, default=120.0, help="max seconds to drain")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-receipts", action="store_true")
    parser.add_argument(
        "--receipt-timeout", type=float, default=10.0, help="agents' first resend, seconds"
    )
    parser.add_argument("--workdir", type=Path, help="keep logs and state here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = ChaosConfig(
        agents=args.agents,
        faults=args.faults,
        duration_s=args.duration,
        recovery_s=args.recovery,
        seed=args.seed,
        receipts=not args.no_receipts,
        receipt_timeout_s=args.receipt_timeout,
        workdir=args.workdir,
    )
    result = run_chaos(config)
    print(
        f"faults {result.faults} {result.faults_by_kind}; produced {result.updates_produced}, "
        f"accounted {result.updates_accounted}, lost {result.lost}, "
        f"double-counted {result.double_counted}, unlogged {result.unlogged}, "
        f"refused {result.refused}, pending {result.pending}, "
        f"left in spools {result.spooled_left}, duplicates dropped {result.duplicates_dropped}, "
        f"drained {result.drained}; broker restarts {result.broker_restarts}, "
        f"backlog acknowledged by the broker {result.backlog_acked}, "
        f"produced at the broker kills {result.produced_at_broker_kills}; "
        f"model v{result.model_version}, {result.wall_s} s",
        file=sys.stderr,
    )
    if result.lost_examples:
        print(f"lost (first 10): {', '.join(result.lost_examples)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json()))
    return 0 if result.lost == 0 and result.double_counted == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
