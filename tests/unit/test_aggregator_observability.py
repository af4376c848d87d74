"""Prometheus endpoint, torch-free ingest, and the SQLite snapshot format."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from test_aggregator_service import FLEET, Harness, delta, make_config, run
from test_prometheus_exposition import sample_value, scrape_families

from edgefl.aggregation import FedBuff, ServerOptimizerConfig
from edgefl.aggregation.fedbuff import FedBuffConfig
from edgefl.aggregator.store import decode_state, encode_state
from edgefl.protocol import update_topic
from edgefl.transport import MemoryBroker


def test_prometheus_endpoint_serves_the_counters(tmp_path: Path) -> None:
    """A real scrape of a running aggregator, read with prometheus_client's parser."""
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=2, metrics_port=0)

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("a", 1, 0, delta(1))
            await h.send("b", 1, 0, delta(2))
            await h.send("b", 1, 0, delta(2))  # duplicate
            await h.device.publish(update_topic(FLEET, "c", 1), b"x" * 40, qos=1)
            await h.until(lambda s: s.received == 4 and s.commits.acked == 4)
            port = h.agg.metrics_port
            assert port is not None
            f = await asyncio.to_thread(scrape_families, port)
        p = "edgefl_aggregator"
        assert sample_value(f[f"{p}_model_version"]) == 1
        assert f[f"{p}_steps_total"].type == "counter"
        assert sample_value(f[f"{p}_steps_total"], "_total") == 1
        assert sample_value(f[f"{p}_applied_updates_total"], "_total") == 2
        assert sample_value(f[f"{p}_received_updates_total"], "_total") == 4
        rejected = f[f"{p}_rejected_updates_total"]
        assert sample_value(rejected, "_total", reason="duplicate") == 1
        assert sample_value(rejected, "_total", reason="bad_magic") == 1
        assert sample_value(f[f"{p}_buffer_capacity_updates"]) == 2
        assert sample_value(f[f"{p}_buffered_updates"]) == 0
        assert sample_value(f[f"{p}_connected"]) == 1
        assert sample_value(f[f"{p}_reconnects_total"], "_total") == 0
        assert sample_value(f[f"{p}_discarded_updates_total"], "_total") == 0
        assert sample_value(f[f"{p}_acked_packets_total"], "_total") == 4
        assert sample_value(f[f"{p}_staleness_versions"], "_bucket", le="0.0") == 2
        assert sample_value(f[f"{p}_ingested_bytes_total"], "_total") > 2 * 2410
        assert sample_value(f[f"{p}_ingest_latency_seconds"], "_count") == 4
        assert f"{p}_updates_per_second" not in f

    run(body)


def test_ingest_never_imports_torch(tmp_path: Path) -> None:
    """A running aggregator (no eval, no ONNX) that applied updates has not imported torch."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(Path(__file__).parents[1])!r}]
        from pathlib import Path
        from test_aggregator_service import Harness, delta, make_config
        from edgefl.transport import MemoryBroker

        async def main():
            config = make_config(Path({str(tmp_path)!r}), buffer_size=1)
            async with Harness(MemoryBroker(), config) as h:
                await h.send("a", 1, 0, delta(1))
                await h.until(lambda s: s.version == 1)
        asyncio.run(main())
        leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("TORCH" if leaked else "CLEAN", leaked[:3])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.startswith("CLEAN"), out.stdout + out.stderr


def test_snapshot_blob_round_trips_optimizer_state() -> None:
    config = FedBuffConfig(buffer_size=1, server_optimizer=ServerOptimizerConfig.adam(lr=0.1))
    fb = FedBuff(config, np.zeros(5, np.float32))
    fb.add(np.arange(5, dtype=np.float32), base_version=0, num_examples=3)
    fb.step()
    state = fb.snapshot()
    import dataclasses

    state = dataclasses.replace(state, accumulator=None)
    back = decode_state(encode_state(state))
    restored = FedBuff.restore(config, back)
    for d in (np.ones(5, np.float32), np.arange(5, dtype=np.float32)):
        restored.add(d, base_version=restored.version, num_examples=2)
        fb.add(d, base_version=fb.version, num_examples=2)
        restored.step()
        fb.step()
    np.testing.assert_array_equal(restored.weights, fb.weights)
    assert back.version == 1
