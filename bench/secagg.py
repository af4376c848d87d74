"""Secure aggregation benchmark: bytes per update and ingest speed, with and without, side by side.

Run: ``nice .venv/bin/python bench/secagg.py [--json] [--quick] [--gaussian]``

Model ``mlp-100k`` (99,823 parameters). The delta is the real mnist1d CNN delta of
``bench/codec.py`` tiled (randomly permuted copies) to 99,823 values; ``--gaussian`` uses
``N(0, 0.01²)`` noise instead (what ``bench/ingest.py`` sends; no torch needed).

* **bytes per update** — plain: one UPDATE envelope (unsigned) whose payload is the int8 + zstd
  codec body (``CodecConfig()``, the default); secagg: the masked share (``b/8`` bytes per
  parameter, ``b = 32``) plus the 80-byte sealed seed, each in its own envelope with the same
  header (two envelopes, two MQTT messages). Signing adds 72 bytes per envelope to either.
* **leader ingest, updates/s** (sans-IO, one core) — plain: ``open_update`` (zstd, validation)
  + ``FedBuff.add``, plus ``FedBuff.step`` once per K; secagg: ``SecAggLeader.receive_masked`` +
  ``helper_report``, plus ``decide`` + ``combine`` (the weighted ring sum of the K masked shares,
  the helper's partial, decoding) once per K. Envelope decoding and MQTT are the same on both
  sides and left out.
* **helper CPU per update** — opening the sealed seed (X25519 + HKDF + AEAD), expanding the
  ChaCha20 mask (``4 P`` bytes of keystream), the weighted ring add; against ``np.copyto`` of
  the same ``4 P`` bytes.
* **device CPU per update** — ``encode_update`` (int8) against ``encode`` + ``make_shares``.

* **leader service** — ``LeaderService.handle`` (``edgefl aggregator --role leader``) of every
  share envelope and seed report, one SQLite transaction each (before the acknowledgement), a
  decision and a combined partial per K with its FedBuff step, model row and retained chunks,
  on an in-process MemoryBroker (no MQTT); with ``fsync`` off and on.

Times are the best of N runs (``time.perf_counter``); the leader service is one timed run.
With ``--json`` the last line of stdout is one JSON object with ``bytes_per_update_plain``,
``bytes_per_update_secagg``, ``updates_per_s_plain``, ``updates_per_s_secagg`` and the rest.
"""

from __future__ import annotations

# bench/codec.py first: it pins the BLAS/OpenMP pools to one thread before numpy is imported
from codec import best_of, real_model_delta, tile_permuted  # isort: skip

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefl.aggregation import FedBuff, FedBuffConfig
from edgefl.codec import CodecConfig, encode_update, max_decompressed, open_update
from edgefl.models import get_model_spec
from edgefl.protocol import UpdateHeader, encode_message
from edgefl.protocol.envelope import decode_envelope
from edgefl.secagg import (
    BufferDecision,
    HelperConfig,
    HelperKeys,
    HelperPartial,
    LeaderConfig,
    RingSpec,
    SecAggHelper,
    SecAggLeader,
    SeedReport,
    Shares,
    encode,
    expand_mask,
    make_shares,
    open_seed,
)
from edgefl.secagg.ring import weighted_add
from edgefl.secagg.wire import UpdateMeta, build_share_envelopes, coord_partial, coord_report

MODEL = "mlp-100k"
FLEET = "bench"
K = 10
W_MAX = 256  # equal weighting with weight_scale 256, or staleness weights in 1/256 steps


def header(n: int, dev: str, seq: int, codec: dict[str, Any]) -> UpdateHeader:
    return UpdateHeader(
        fleet=FLEET, device_id=dev, seq=seq, base_version=0, num_examples=32, model=MODEL,
        codec=codec, num_params=n, created_at=time.time(),
    )  # fmt: skip


def make_delta(n: int, gaussian: bool) -> NDArray[np.float32]:
    rng = np.random.default_rng(0)
    if gaussian:
        return (rng.standard_normal(n) * 0.01).astype(np.float32)
    return tile_permuted(real_model_delta(num_samples=2000, steps=20), n, rng)


def meta(dev: str, seq: int, base: int = 0) -> UpdateMeta:
    return UpdateMeta(FLEET, dev, seq, base, 32, MODEL, time.time())


def wire_bytes(delta: NDArray[np.float32], spec: RingSpec, keys: HelperKeys) -> dict[str, int]:
    """Sizes of what goes on the wire: the UPDATE envelope, the two protocol-1.3 envelopes."""
    n = delta.size
    encoded, _ = encode_update(delta, CodecConfig(), rng=np.random.default_rng(1))
    plain = encode_message(header(n, "pi-1", 1, encoded.descriptor.to_dict()), encoded.body)
    built = build_share_envelopes(
        delta, meta("pi-1", 1), spec, keys.public_key, rng=np.random.default_rng(1)
    )
    masked, sealed = built.share, built.seed
    return {
        "plain": len(plain),
        "plain_body": encoded.body_size,
        "secagg": len(masked) + len(sealed),
        "secagg_masked": len(masked),
        "secagg_sealed": len(sealed),
    }


def plain_ingest(delta: NDArray[np.float32], updates: int, repeats: int) -> float:
    """updates/s of open_update + FedBuff.add (+ step per K)."""
    n = delta.size
    rng = np.random.default_rng(2)
    bodies = [encode_update(delta * (1 + 0.1 * i), CodecConfig(), rng=rng)[0] for i in range(8)]
    limit = max_decompressed(n)

    def run() -> None:
        fb = FedBuff(FedBuffConfig(buffer_size=K), np.zeros(n, np.float32))
        for i in range(updates):
            enc = bodies[i % len(bodies)]
            update = open_update(enc.descriptor, enc.body, num_params=n, max_decompressed=limit)
            fb.add(update, base_version=fb.version, num_examples=32)
            if fb.ready:
                fb.step()

    return updates / best_of(run, repeats)


def feed(
    leader: SecAggLeader,
    shares: list[Shares],
    reports: list[SeedReport | None],
    partial: Callable[[BufferDecision], HelperPartial],
) -> None:
    """The leader's ingest: receive and report per update, decide and combine per K."""
    for i, (share, report) in enumerate(zip(shares, reports, strict=True)):
        assert report is not None
        leader.receive_masked(("pi", i), share.masked, 100, 0.0)
        leader.helper_report(report, 0.0)
        if leader.ready:
            leader.combine(partial(leader.decide()))


def secagg_ingest(
    delta: NDArray[np.float32], spec: RingSpec, keys: HelperKeys, updates: int, repeats: int
) -> float:
    """updates/s of the leader: receive + report per update, decide + combine per K."""
    n = delta.size
    hcfg = HelperConfig(spec=spec, num_params=n, fleet=FLEET, model=MODEL)
    lcfg = LeaderConfig(spec=spec, num_params=n, buffer_size=K, w_max=W_MAX)
    rng = np.random.default_rng(3)
    ring = encode(delta, spec, rng)
    shares = [
        make_shares(ring, spec, keys.public_key, hcfg.context(("pi", i))) for i in range(updates)
    ]
    helper = SecAggHelper(hcfg, keys)
    reports = [helper.receive_sealed(("pi", i), s.sealed, 0.0) for i, s in enumerate(shares)]
    partials: dict[int, HelperPartial] = {}  # the helper's answers, computed ahead

    def answer(decision: BufferDecision) -> HelperPartial:
        return partials.setdefault(decision.buffer_id, helper.apply(decision))

    feed(SecAggLeader(lcfg), shares, reports, answer)  # its cost is measured separately

    def run() -> None:
        feed(SecAggLeader(lcfg), shares, reports, lambda d: partials[d.buffer_id])

    return updates / best_of(run, repeats)


def leader_service(
    delta: NDArray[np.float32], keys: HelperKeys, updates: int, *, fsync: bool
) -> float:
    """updates/s of the leader *service* without MQTT: ``LeaderService.handle`` of each share
    envelope and seed report (decode, role, one SQLite transaction each, as it acknowledges),
    a decision published and a partial combined per K (the FedBuff step, the model's SQLite
    row and its retained chunks on an in-process MemoryBroker). The helper's partials are
    computed ahead (its cost is the helper's line)."""
    import asyncio
    import tempfile
    from pathlib import Path

    from edgefl.aggregator import AggregatorConfig, NormBoundSetting
    from edgefl.aggregator.secagg_config import SecAggSettings
    from edgefl.aggregator.secagg_leader import LeaderService
    from edgefl.aggregator.secagg_store import LeaderStore
    from edgefl.protocol.topics import secagg_report_topic, secagg_share_topic
    from edgefl.transport import InboundMessage, MemoryBroker, MemoryTransport

    def config(state_dir: Path) -> AggregatorConfig:
        return AggregatorConfig.build(
            broker_url="mqtt://127.0.0.1:1", fleet=FLEET, model=MODEL, state_dir=state_dir,
            buffer_size=K, norm_bound=NormBoundSetting.OFF, fsync=fsync, max_packet=1 << 20,
        )  # fmt: skip

    settings = SecAggSettings(helper_key=Path("unused"), weight_scale=W_MAX)
    spec = settings.ring(K)
    rng = np.random.default_rng(5)
    built = [
        build_share_envelopes(delta, meta(f"pi{i}", 1), spec, keys.public_key, rng=rng)
        for i in range(updates)
    ]
    helper = SecAggHelper(HelperConfig(spec, delta.size, FLEET, MODEL), keys)
    fleet = FLEET
    reports = []
    for i, b in enumerate(built):
        sealed = bytes(decode_envelope(b.seed, max_payload=1 << 10).payload)
        report = helper.receive_sealed((f"pi{i}", 1), sealed, 0.0)
        assert report is not None
        reports.append(encode_message(coord_report(fleet, report, 0.0)))
    partials: dict[int, bytes] = {}

    async def run(state_dir: Path) -> float:
        service = LeaderService(config(state_dir), settings, keys.public_key)
        service._restore(LeaderStore(state_dir / "secagg-leader.sqlite", fsync=fsync))
        async with MemoryTransport(MemoryBroker(), "leader") as transport:
            service._transport = transport
            start = time.perf_counter()
            for i, b in enumerate(built):
                await service.handle(
                    InboundMessage(secagg_share_topic(fleet, f"pi{i}", 1), b.share)
                )
                await service.handle(InboundMessage(secagg_report_topic(fleet), reports[i]))
                decision = service.leader.open_decision
                if decision is not None:
                    if decision.buffer_id not in partials:
                        partial = helper.apply(decision)
                        partials[decision.buffer_id] = encode_message(
                            coord_partial(fleet, partial, 0.0), partial.total
                        )
                    msg = InboundMessage(secagg_report_topic(fleet), partials[decision.buffer_id])
                    await service.handle(msg)
            return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "warm"))  # computes the partials
        elapsed = asyncio.run(run(Path(tmp) / "timed"))
    return updates / elapsed


def helper_costs(n: int, spec: RingSpec, keys: HelperKeys, repeats: int) -> dict[str, float]:
    """Microseconds per update: open the seed, expand the mask, add it; memcpy of 4 P bytes."""
    cfg = HelperConfig(spec=spec, num_params=n, fleet=FLEET, model=MODEL)
    ctx = cfg.context(("pi", 1))
    shares: Shares = make_shares(np.zeros(n, spec.dtype), spec, keys.public_key, ctx)
    seed = open_seed(shares.sealed, keys, ctx)
    mask = expand_mask(seed, spec, n)
    acc, scratch = np.zeros(n, spec.dtype), np.empty(n, spec.dtype)
    src = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    dst = np.empty_like(src)
    us = {
        "open_seed": best_of(lambda: open_seed(shares.sealed, keys, ctx), repeats * 20),
        "expand_mask": best_of(lambda: expand_mask(seed, spec, n), repeats * 5),
        "weighted_add": best_of(lambda: weighted_add(acc, mask, 3, scratch), repeats * 5),
        "memcpy": best_of(lambda: np.copyto(dst, src), repeats * 5),
    }
    out = {k: v * 1e6 for k, v in us.items()}
    out["total"] = out["open_seed"] + out["expand_mask"] + out["weighted_add"]
    return out


def device_costs(
    delta: NDArray[np.float32], spec: RingSpec, keys: HelperKeys, repeats: int
) -> dict[str, float]:
    cfg = HelperConfig(spec=spec, num_params=delta.size, fleet=FLEET, model=MODEL)
    rng = np.random.default_rng(4)

    def secagg() -> None:
        make_shares(encode(delta, spec, rng), spec, keys.public_key, cfg.context(("pi", 1)))

    return {
        "plain": best_of(lambda: encode_update(delta, CodecConfig(), rng=rng), repeats) * 1e6,
        "secagg": best_of(secagg, repeats) * 1e6,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer updates and repeats")
    parser.add_argument("--gaussian", action="store_true", help="Gaussian delta (no torch)")
    return parser


def main() -> None:
    args = _parser().parse_args()
    updates, repeats = (40, 2) if args.quick else (200, 5)
    n = get_model_spec(MODEL).num_params
    spec = RingSpec.fit(bits=32, clip_norm=1.0, buffer_size=K, w_max=W_MAX)
    keys = HelperKeys.generate()
    delta = make_delta(n, args.gaussian)
    delta *= np.float32(0.5 / float(np.linalg.norm(delta)))  # inside the clip, as a device sends
    sizes = wire_bytes(delta, spec, keys)
    plain_ups = plain_ingest(delta, updates, repeats)
    secagg_ups = secagg_ingest(delta, spec, keys, updates, repeats)
    service_ups = leader_service(delta, keys, min(updates, 100), fsync=False)
    service_fsync_ups = leader_service(delta, keys, min(updates, 50), fsync=True)
    helper = helper_costs(n, spec, keys, repeats)
    device = device_costs(delta, spec, keys, repeats)
    print(f"model {MODEL}: {n:,} parameters, K = {K}, W_max = {W_MAX}, ring b = {spec.bits}, "
          f"scale 2^{spec.scale.bit_length() - 1}, C = {spec.clip_norm}; "
          f"delta: {'gaussian' if args.gaussian else 'real mnist1d CNN delta, tiled'}")  # fmt: skip
    print(f"{'':34}{'plain (int8+zstd)':>20}{'secure aggregation':>20}{'ratio':>8}")
    rows = [
        ("bytes per update (envelopes)", sizes["plain"], sizes["secagg"], "{:,.0f}"),
        ("leader ingest, updates/s", plain_ups, secagg_ups, "{:,.0f}"),
        ("device encode, us/update", device["plain"], device["secagg"], "{:,.0f}"),
    ]
    for name, a, b, fmt in rows:
        print(f"{name:34}{fmt.format(a):>20}{fmt.format(b):>20}{b / a:>8.2f}")
    masked, sealed, body = sizes["secagg_masked"], sizes["secagg_sealed"], sizes["plain_body"]
    print(f"  secagg bytes: masked share {masked:,} + sealed seed {sealed:,} (two envelopes); "
          f"plain codec body {body:,}")  # fmt: skip
    expand, memcpy = helper["expand_mask"], helper["memcpy"]
    print(f"helper CPU per update: {helper['total']:,.0f} us = open seed "
          f"{helper['open_seed']:,.0f} + expand mask {expand:,.0f} + weighted add "
          f"{helper['weighted_add']:,.0f}; memcpy of the same {4 * n:,} B: {memcpy:,.1f} us "
          f"(mask expansion = {expand / memcpy:,.1f}x memcpy)")  # fmt: skip
    print(f"leader service (edgefl aggregator --role leader, no MQTT: decode + role + one SQLite "
          f"transaction per message + step per K): {service_ups:,.0f} updates/s, "
          f"{service_fsync_ups:,.0f} with fsync")  # fmt: skip
    if args.json:
        print(json.dumps({
            "bytes_per_update_plain": sizes["plain"],
            "bytes_per_update_secagg": sizes["secagg"],
            "updates_per_s_plain": round(plain_ups, 1),
            "updates_per_s_secagg": round(secagg_ups, 1),
            "bytes_secagg_masked": sizes["secagg_masked"],
            "bytes_secagg_sealed": sizes["secagg_sealed"],
            "helper_us_per_update": round(helper["total"], 1),
            "helper_open_seed_us": round(helper["open_seed"], 1),
            "helper_expand_mask_us": round(helper["expand_mask"], 1),
            "helper_weighted_add_us": round(helper["weighted_add"], 1),
            "memcpy_us": round(helper["memcpy"], 2),
            "device_encode_us_plain": round(device["plain"], 1),
            "device_encode_us_secagg": round(device["secagg"], 1),
            "num_params": n, "buffer_size": K, "ring_bits": spec.bits, "scale": spec.scale,
            "leader_service_updates_per_s": round(service_ups, 1),
            "leader_service_updates_per_s_fsync": round(service_fsync_ups, 1),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
