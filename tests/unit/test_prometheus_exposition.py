"""The aggregator's Prometheus endpoint, scraped over HTTP and read with real parsers.

A hand-made statistics snapshot is served by the real :class:`PrometheusExporter` on a free port
of 127.0.0.1; the scrape is parsed by prometheus_client's own text-format and OpenMetrics parsers
and linted by ``promtool check metrics`` (Debian's ``prometheus`` package). The end-to-end scrape
of a running aggregator is in test_aggregator_observability.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

import edgefl
from edgefl.aggregator.metrics import METRICS, PrometheusExporter
from edgefl.aggregator.participation import LeaseDeskStatistics
from edgefl.aggregator.service import _server_metrics
from edgefl.aggregator.stats import (
    AggregatorStatistics,
    CommitStatistics,
    LinkStatistics,
    ReceiptStatistics,
    RoundStatistics,
)
from edgefl.errors import RejectReason
from edgefl.privacy import PrivacyStatistics
from edgefl.protocol.messages import ServerMetrics, decode_message, encode_message

DOCS = Path(__file__).resolve().parents[2] / "docs" / "MONITOR.md"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

STATS = AggregatorStatistics(
    version=3,
    buffer_fill=1,
    buffer_size=2,
    received=7,
    applied=5,
    rejected={"duplicate": 1, "bad_magic": 1},
    bytes_ingested=12345,
    updates_per_s=99.0,  # must not be exported
    staleness={0: 3, 2: 1, 150: 1},
    last_accuracy=0.875,
    steps=2,
    session=5,
    rounds=RoundStatistics({"complete": 2, "failed": 1}, discarded=2),
    commits=CommitStatistics(batches=6, acked=9, pending_acks=4),
    link=LinkStatistics(connected=True, reconnects=1),
    receipts=ReceiptStatistics(sent=11, dropped=3),
    participation=LeaseDeskStatistics(
        in_flight=2,
        concurrency=4,
        candidates=7,
        granted=9,
        ended={"completed": 6, "expired": 1},
        verdicts={"valid": 6, "no_lease": 1},
        checkins={"available": 12, "withdrawn": 2, "presence_gone": 1},
    ),
    privacy=PrivacyStatistics(
        epsilon=4.25,
        delta=1e-5,
        noise_multiplier=3.0,
        clip_norm=0.5,
        participation_cap=22,
        participation_max=6,
        devices=9,
        participation_histogram={1: 4, 3: 4, 6: 1},
        accountant="rdp",
    ),
)


def scrape(port: int, accept: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept is not None:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


def families(text: str) -> dict[str, Metric]:
    """Parsed families by their scraped name: a counter's family is keyed ``<name>_total``."""
    out: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        key = f"{family.name}_total" if family.type == "counter" else family.name
        out[key] = family
    return out


def sample_value(family: Metric, suffix: str = "", **labels: str) -> float:
    """The value of the one sample of ``family`` named ``<name><suffix>`` with ``labels``."""
    name = family.name + suffix
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return float(found[0])


def scrape_families(port: int) -> dict[str, Metric]:
    return families(scrape(port))


@contextlib.contextmanager
def serving(
    stats: Callable[[], AggregatorStatistics | None],
) -> Iterator[tuple[PrometheusExporter, int]]:
    """An exporter over ``stats`` and the free local port it serves on; stopped on the way out."""
    exporter = PrometheusExporter(stats)
    port = exporter.start(0, "127.0.0.1")
    try:
        yield exporter, port
    finally:
        exporter.stop()


def scrape_once(stats: Callable[[], AggregatorStatistics | None]) -> dict[str, Metric]:
    """The families an exporter over ``stats`` serves."""
    with serving(stats) as (_, port):
        return scrape_families(port)


@pytest.fixture
def served() -> Iterator[tuple[PrometheusExporter, str]]:
    """The exporter over :data:`STATS` with two observed latencies, and one scrape of it."""
    with serving(lambda: STATS) as (exporter, port):
        exporter.latency.observe(0.003)
        exporter.latency.observe(0.2)
        yield exporter, scrape(port)


def test_every_catalogued_family_is_served_with_its_type(
    served: tuple[PrometheusExporter, str],
) -> None:
    _, text = served
    got = families(text)
    for spec in METRICS:
        assert spec.name in got, spec.name
        assert got[spec.name].type == spec.type.value, spec.name
        assert got[spec.name].documentation == spec.help
        for sample in got[spec.name].samples:
            if not sample.name.endswith("_bucket"):
                assert set(sample.labels) == set(spec.labels), (spec.name, sample.labels)
    edgefl_names = {n for n in got if n.startswith("edgefl_")}
    assert edgefl_names == {spec.name for spec in METRICS}
    assert "process_cpu_seconds_total" in got  # the standard process metrics


def test_values_of_a_hand_made_snapshot(served: tuple[PrometheusExporter, str]) -> None:
    _, text = served
    f = families(text)
    p = "edgefl_aggregator"
    assert sample_value(f["edgefl_build_info"], version=edgefl.__version__,
                        python=platform.python_version()) == 1  # fmt: skip
    assert sample_value(f[f"{p}_model_version"]) == 3
    assert sample_value(f[f"{p}_buffered_updates"]) == 1
    assert sample_value(f[f"{p}_buffer_capacity_updates"]) == 2
    assert sample_value(f[f"{p}_held_chunk_packets"]) == 4
    assert sample_value(f[f"{p}_connected"]) == 1
    assert sample_value(f[f"{p}_accuracy_ratio"]) == 0.875
    assert sample_value(f[f"{p}_received_updates_total"], "_total") == 7
    assert sample_value(f[f"{p}_applied_updates_total"], "_total") == 5
    assert sample_value(f[f"{p}_discarded_updates_total"], "_total") == 2
    assert sample_value(f[f"{p}_ingested_bytes_total"], "_total") == 12345
    assert sample_value(f[f"{p}_steps_total"], "_total") == 2
    assert sample_value(f[f"{p}_commits_total"], "_total") == 6
    assert sample_value(f[f"{p}_acked_packets_total"], "_total") == 9
    assert sample_value(f[f"{p}_reconnects_total"], "_total") == 1
    assert sample_value(f[f"{p}_receipts_sent_total"], "_total") == 11
    assert sample_value(f[f"{p}_receipts_dropped_total"], "_total") == 3
    rejected = f[f"{p}_rejected_updates_total"]
    assert sample_value(rejected, "_total", reason="duplicate") == 1
    assert sample_value(rejected, "_total", reason="bad_magic") == 1
    # every reason is present from the start (0), so rate() sees the first rejection
    assert {s.labels["reason"] for s in rejected.samples} == {r.value for r in RejectReason}
    assert sample_value(rejected, "_total", reason="stale") == 0
    rounds = f[f"{p}_rounds_total"]
    assert {s.labels["status"]: s.value for s in rounds.samples} == {
        "complete": 2, "partial": 0, "failed": 1}  # fmt: skip
    # staleness {0: 3, 2: 1, 150: 1}: cumulative buckets, 150 only in +Inf
    staleness = f[f"{p}_staleness_versions"]
    buckets = {s.labels["le"]: s.value for s in staleness.samples if s.name.endswith("_bucket")}
    assert buckets == {"0.0": 3, "1.0": 3, "2.0": 4, "3.0": 4, "5.0": 4, "10.0": 4, "20.0": 4,
                       "50.0": 4, "100.0": 4, "+Inf": 5}  # fmt: skip
    assert sample_value(staleness, "_count") == 5
    assert sample_value(staleness, "_sum") == 0 * 3 + 2 * 1 + 150 * 1
    latency = f[f"{p}_ingest_latency_seconds"]
    assert sample_value(latency, "_count") == 2
    assert sample_value(latency, "_sum") == pytest.approx(0.203)
    assert sample_value(latency, "_bucket", le="0.005") == 1
    dp = {name: sample_value(f[f"{p}_dp_{name}"]) for name in (
        "epsilon_spent_max", "delta", "noise_multiplier", "clip_norm", "participation_cap",
        "participations_max")}  # fmt: skip
    assert dp == {"epsilon_spent_max": 4.25, "delta": 1e-5, "noise_multiplier": 3.0,
                  "clip_norm": 0.5, "participation_cap": 22, "participations_max": 6}  # fmt: skip


def test_no_precomputed_rates_old_names_or_device_labels(
    served: tuple[PrometheusExporter, str],
) -> None:
    _, text = served
    for old in ("updates_per_second", "bytes_ingested", "edgefl_aggregator_version ",
                "edgefl_aggregator_accuracy ", "edgefl_aggregator_steps "):  # fmt: skip
        assert old not in text
    label_names = {
        name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for name in sample.labels
    }
    # bounded label sets only (never a device id): reasons, statuses, buckets, lease outcomes
    assert label_names <= {
        "reason",
        "status",
        "le",
        "version",
        "python",
        "how",
        "verdict",
        "outcome",
    }


def test_openmetrics_scrape_parses_strictly(served: tuple[PrometheusExporter, str]) -> None:
    """The OpenMetrics parser enforces the counter ``_total`` and histogram rules itself."""
    exporter, _ = served
    assert exporter.port is not None
    text = scrape(exporter.port, accept=OPENMETRICS)
    assert text.endswith("# EOF\n")
    got = {family.name: family for family in openmetrics_families(text)}
    assert got["edgefl_aggregator_ingested_bytes"].type == "counter"
    assert got["edgefl_aggregator_steps"].type == "counter"
    assert got["edgefl_aggregator_staleness_versions"].type == "histogram"
    assert got["edgefl_build_info"].type == "gauge"


def test_without_a_snapshot_only_build_info_and_latency_are_served() -> None:
    got = scrape_once(lambda: None)
    assert {n for n in got if n.startswith("edgefl_")} == {
        "edgefl_build_info", "edgefl_aggregator_ingest_latency_seconds"}  # fmt: skip


def test_a_disconnected_unevaluated_aggregator() -> None:
    stats = dataclasses.replace(STATS, link=LinkStatistics(), last_accuracy=None)
    got = scrape_once(lambda: stats)
    assert sample_value(got["edgefl_aggregator_connected"]) == 0
    assert "edgefl_aggregator_accuracy_ratio" not in got  # unknown, not 0


def test_without_dp_no_dp_family_is_served() -> None:
    got = scrape_once(lambda: dataclasses.replace(STATS, privacy=None))
    assert [n for n in got if "_dp_" in n] == []
    assert "edgefl_aggregator_model_version" in got


def find_promtool() -> str | None:
    """``promtool`` on PATH or next to the interpreter (``.ci/setup`` puts it in .venv/bin)."""
    beside = Path(sys.executable).parent / "promtool"
    return shutil.which("promtool") or (str(beside) if beside.is_file() else None)


def require_promtool() -> str:
    promtool = find_promtool()
    if promtool is None:
        message = "promtool is not installed (Debian: the prometheus package)"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so this fails instead of skipping)")
        pytest.skip(message)
    return promtool


def test_promtool_check_metrics_finds_no_problem(served: tuple[PrometheusExporter, str]) -> None:
    promtool = require_promtool()
    _, text = served
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_docs_metrics_reference_lists_every_metric_with_its_type() -> None:
    """docs/MONITOR.md's reference table: one row per family, name, labels and type as served."""
    section = DOCS.read_text().split("### Metric reference", 1)[1].split("\n#", 1)[0]
    rows = re.findall(
        r"^\| `(edgefl_[a-z_]+)(?:\{([a-z_,]*)\})?` \| (counter|gauge|histogram) \|", section, re.M
    )
    documented = [
        (name, tuple(labels.split(",")) if labels else (), kind) for name, labels, kind in rows
    ]
    assert documented == [(spec.name, spec.labels, spec.type.value) for spec in METRICS]


def test_docs_promql_and_alert_rules_pass_promtool(tmp_path: Path) -> None:
    """Every query of the ``promql`` block (as a recording rule) and the alert rules of
    docs/MONITOR.md pass ``promtool check rules``, and only use served metric names."""
    promtool = require_promtool()
    text = DOCS.read_text().split("## Prometheus", 1)[1].split("\n## ", 1)[0]
    promql = text.split("```promql\n", 1)[1].split("```", 1)[0]
    queries = [q for q in promql.splitlines() if q.strip() and not q.startswith("#")]
    alerts = text.split("Alert rules worth having:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    recording = "\n".join(
        f"      - record: docs:query{i}\n        expr: {json.dumps(q)}"
        for i, q in enumerate(queries)
    )
    rules = tmp_path / "rules.yml"
    rules.write_text(f"{alerts}  - name: docs-queries\n    rules:\n{recording}\n")
    out = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr + rules.read_text()
    assert f"SUCCESS: {len(queries) + 5} rules found" in out.stdout
    served = {spec.name for spec in METRICS} | {"up"}
    used = set(re.findall(r"\b(edgefl_[a-z_]+|up)\b", promql + alerts))
    suffixes = ("_bucket", "_sum", "_count")
    assert {next((u.removesuffix(x) for x in suffixes if u.endswith(x)), u) for u in used} <= served


def test_docs_ratio_and_rate_queries_give_values_per_instance(tmp_path: Path) -> None:
    """``promtool test rules`` evaluates two of the documented queries on hand-made series:
    received +8/min, rejected +1/min for each of two reasons, applied +8/min. The rejection
    ratio must keep the instance (a plain ``sum()`` on one side matches nothing)."""
    promtool = require_promtool()
    text = DOCS.read_text().split("```promql\n", 1)[1].split("```", 1)[0]
    queries = [q for q in text.splitlines() if q.strip() and not q.startswith("#")]
    ratio = next(q for q in queries if "rejected_updates_total" in q and " / " in q)
    rate = next(q for q in queries if q.startswith("rate(edgefl_aggregator_applied_updates_total"))
    target = 'instance="a:9108",job="edgefl-aggregator"'
    series = [
        ("edgefl_aggregator_received_updates_total", "", 8),
        ("edgefl_aggregator_applied_updates_total", "", 8),
        ("edgefl_aggregator_rejected_updates_total", ',reason="duplicate"', 1),
        ("edgefl_aggregator_rejected_updates_total", ',reason="stale"', 1),
    ]
    inputs = "\n".join(
        f"      - series: '{name}{{{target}{extra}}}'\n        values: '0+{step}x20'"
        for name, extra, step in series
    )
    tests = tmp_path / "tests.yml"
    tests.write_text(
        f"""tests:
  - interval: 1m
    input_series:
{inputs}
    promql_expr_test:
      - expr: {json.dumps(ratio)}
        eval_time: 15m
        exp_samples:
          - labels: '{{{target}}}'
            value: 0.25
      - expr: {json.dumps(rate)}
        eval_time: 15m
        exp_samples:
          - labels: '{{{target}}}'
            value: {8 / 60!r}
"""
    )
    out = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr + tests.read_text()


def test_the_metrics_message_of_the_same_snapshot_keeps_its_json_names() -> None:
    message = decode_message(encode_message(_server_metrics("lab", STATS)), ServerMetrics)

    figures = ("steps", "pending_acks", "session", "receipts_sent", "receipts_dropped")
    assert [message.extra[k] for k in figures] == [2, 4, 5, 11, 3]
