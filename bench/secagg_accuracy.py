"""Secure aggregation against plaintext: accuracy on the demo workload (virtual simulator).

Runs the virtual fleet simulator on the demo workload (mnist1d, 100 devices of the ``mixed``
profile, Dirichlet(0.5) data, K = 5, 20 training at once) three times with the same seed and
update budget:

* **plaintext** — the simulator's defaults: int8 codec, adaptive norm bound, ``mean``;
* **secure aggregation** — what the two roles compute: every update clipped to ``C`` on the
  device and encoded on the ring ``Z_(2^32)`` with stochastic rounding (``edgefl.secagg.encode``,
  the scale ``RingSpec.fit`` picks for K and a weight scale of 256), decoded as the leader
  decodes it (the masks cancel exactly: ``tests/unit/test_secagg_roles.py`` checks the sum bit
  for bit, ``tests/integration/test_secagg_broker.py`` the model through both services), sent
  as ``4 P`` bytes (the share), with the norm bound off (it cannot run on shares);
* **plaintext, fp32 codec** — a control with the share's upload size (4 bytes per parameter)
  and no secure aggregation: it separates the cost of the bigger upload (longer uploads,
  staler updates, fewer applied in the same budget) from the secure-aggregation arithmetic.

Not modelled: the fixed-point weights (``round(w · 256)``, a relative error below 0.2% per
weight), and the exclusion of updates whose other share is lost.

    nice python bench/secagg_accuracy.py [--json] [--updates 3000] [--clip 1.0] [--seed 0]

With ``--json`` the last line is ``{"accuracy_plain": ..., "accuracy_secagg": ...,
"clipped_fraction": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np

from edgefl.secagg import RingSpec, encode
from firmware_sim.scenario import Scenario, SimConfig, build_scenario
from firmware_sim.virtual import VirtualSimulator

WEIGHT_SCALE = 256


class SecAggSimulator(VirtualSimulator):
    """The virtual simulator whose devices send what the secure-aggregation leader decodes."""

    def __init__(self, scenario: Scenario, spec: RingSpec, **kwargs: Any) -> None:
        super().__init__(scenario, **kwargs)
        self.spec = spec
        self.clipped = 0
        self.encoded = 0

    def _encode(self, tr: Any) -> None:
        delta = tr.delta
        rng = np.random.default_rng([self.cfg.seed, 0x5EC, tr.tid])
        if float(np.linalg.norm(delta)) > self.spec.clip_norm:
            self.clipped += 1
        codes = encode(delta, self.spec, rng).view(self.spec.signed).astype(np.float64)
        tr.delta = (codes / self.spec.scale).astype(np.float32)
        self.encoded += 1
        super()._encode(tr)  # the fp32 codec: lossless, 4 P bytes as the share


def _run(sim: VirtualSimulator) -> dict[str, Any]:
    t0 = time.perf_counter()
    sim.run()
    counts = sim.record.outcome_counts()
    return {
        "accuracy": float(sim.record.evals().accuracy[-1]),
        "versions": sim.core.version,
        "applied": counts.get("applied", 0),
        "refused": {k: v for k, v in sorted(counts.items()) if k != "applied"},
        "wall": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = SimConfig.build(
        devices=args.devices,
        dataset="mnist1d",
        stop_at_target=False,
        max_updates=args.updates,
        eval_every_updates=max(1, args.updates // 10),
        seed=args.seed,
    )
    scenario = build_scenario(base)
    plain = _run(VirtualSimulator(scenario, label="plain"))
    spec = RingSpec.fit(
        bits=32, clip_norm=args.clip, buffer_size=base.aggregation.buffer_size, w_max=WEIGHT_SCALE
    )
    secagg_sc = replace(scenario, config=base.replace(codec="fp32", norm_bound="off"))
    sim = SecAggSimulator(secagg_sc, spec, label="secagg")
    secagg = _run(sim)
    fp32_sc = replace(scenario, config=base.replace(codec="fp32"))
    fp32 = _run(VirtualSimulator(fp32_sc, label="plain-fp32"))
    clipped = sim.clipped / max(1, sim.encoded)
    print(
        f"mnist1d, {args.devices} devices, K = {base.aggregation.buffer_size}, "
        f"{args.updates} updates, "
        f"seed {args.seed}; ring b = 32, scale 2^{spec.scale.bit_length() - 1}, C = {args.clip}"
    )
    cols = (("plaintext (int8)", plain), ("plaintext (fp32)", fp32), ("secure aggregation", secagg))
    print(f"{'':16}" + "".join(f"{name:>28}" for name, _ in cols))
    print(f"{'final accuracy':16}" + "".join(f"{100 * r['accuracy']:>27.1f}%" for _, r in cols))
    for key in ("applied", "versions"):
        print(f"{key:16}" + "".join(f"{r[key]:>28}" for _, r in cols))
    print(f"{'wall (s)':16}" + "".join(f"{r['wall']:>28.1f}" for _, r in cols))
    for name, r in cols:
        print(f"  {name}: not applied {r['refused']}")
    print(f"updates clipped to C on the device: {100 * clipped:.1f}%")
    if args.json:
        print(
            json.dumps(
                {
                    "accuracy_plain": round(plain["accuracy"], 4),
                    "accuracy_secagg": round(secagg["accuracy"], 4),
                    "accuracy_plain_fp32": round(fp32["accuracy"], 4),
                    "applied_plain": plain["applied"],
                    "applied_secagg": secagg["applied"],
                    "applied_plain_fp32": fp32["applied"],
                    "clipped_fraction": round(clipped, 4),
                    "updates": args.updates,
                    "devices": args.devices,
                    "clip_norm": args.clip,
                    "scale": spec.scale,
                    "seed": args.seed,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
