"""Prometheus endpoint, torch-free ingest, and the SQLite snapshot format."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
from test_aggregator_service import FLEET, Harness, delta, make_config, run

from edgefl.aggregation import FedBuff, ServerOptimizerConfig
from edgefl.aggregation.fedbuff import FedBuffConfig
from edgefl.aggregator.store import decode_state, encode_state
from edgefl.protocol import update_topic
from edgefl.transport import MemoryBroker


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_prometheus_endpoint_serves_the_counters(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=2, metrics_port=0)

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("a", 1, 0, delta(1))
            await h.send("b", 1, 0, delta(2))
            await h.send("b", 1, 0, delta(2))  # duplicate
            await h.device.publish(update_topic(FLEET, "c", 1), b"x" * 40, qos=1)
            await h.until(lambda s: s.received == 4)
            port = h.agg.metrics_port
            assert port is not None
            samples = await asyncio.to_thread(scrape, port)
        p = "edgefl_aggregator"
        assert samples[f"{p}_version"] == 1
        assert samples[f"{p}_applied_total"] == 2
        assert samples[f"{p}_received_total"] == 4
        assert samples[f'{p}_rejected_total{{reason="duplicate"}}'] == 1
        assert samples[f'{p}_rejected_total{{reason="bad_magic"}}'] == 1
        assert samples[f"{p}_buffer_size"] == 2
        assert samples[f'{p}_staleness_bucket{{le="0.0"}}'] == 2
        assert samples[f"{p}_bytes_ingested_total"] > 2 * 2410
        assert samples[f"{p}_ingest_latency_seconds_count"] == 4

    run(body)


def test_ingest_never_imports_torch(tmp_path: Path) -> None:
    """A running aggregator (no eval, no ONNX) that applied updates has not imported torch."""
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
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
