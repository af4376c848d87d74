"""The aggregator's Prometheus endpoint follows the broker connection (real Mosquitto).

The aggregator runs in-process with ``metrics_port=0``; its endpoint is scraped over HTTP and
read with prometheus_client's parser while the broker goes away and comes back.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.launcher import MosquittoBroker
from edgefl.aggregator import Aggregator, AggregatorConfig, NormBoundSetting

pytestmark = pytest.mark.integration

Samples = dict[str, float]


def scrape(port: int) -> Samples:
    """One scrape, parsed: unlabelled sample values by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def until_scraped(port: int, cond: Callable[[Samples], bool], limit: float = 20.0) -> Samples:
    """Scrape until ``cond`` holds (the endpoint refreshes once per metrics period)."""
    async with asyncio.timeout(limit):
        while True:
            samples = await asyncio.to_thread(scrape, port)
            if cond(samples):
                return samples
            await asyncio.sleep(0.05)


def connected(f: Samples) -> float:
    return f["edgefl_aggregator_connected"]


def reconnects(f: Samples) -> float:
    return f["edgefl_aggregator_reconnects_total"]


async def test_connected_and_reconnects_follow_a_broker_outage(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    config = AggregatorConfig.build(
        broker_url=mosquitto.url, fleet="prom", model="digits-mlp", state_dir=tmp_path / "state",
        buffer_size=2, norm_bound=NormBoundSetting.OFF, metrics_interval_s=0.2, metrics_port=0,
    )  # fmt: skip

    agg = Aggregator(config)
    ready = asyncio.Event()
    task = asyncio.create_task(agg.run(ready))
    await asyncio.wait_for(ready.wait(), 15)
    port = agg.metrics_port
    assert port is not None
    f = await until_scraped(port, lambda f: "edgefl_aggregator_connected" in f)
    assert (connected(f), reconnects(f)) == (1, 0)

    await asyncio.to_thread(mosquitto.stop)
    f = await until_scraped(port, lambda f: connected(f) == 0)
    assert reconnects(f) == 0

    await asyncio.to_thread(mosquitto.start)
    f = await until_scraped(port, lambda f: connected(f) == 1)
    assert reconnects(f) == 1
    agg.stop()
    await asyncio.wait_for(task, 15)
