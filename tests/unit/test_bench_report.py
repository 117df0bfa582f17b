"""Pure helpers of the benchmark harness: statistics and the Markdown report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.core import delivery_summary, fanout_item, fanout_seq, latency_summary, percentile


def test_percentile_is_nearest_rank_and_always_observed() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.0], 99.9) == 7.0
    assert math.isnan(percentile([], 50))


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary([0.001] * 99 + [0.1])
    assert summary == {"p50_ms": 1.0, "p99_ms": 1.0, "p999_ms": 100.0, "max_ms": 100.0}


def test_size_labels() -> None:
    assert report.size_label(16) == "16 B"
    assert report.size_label(256) == "256 B"
    assert report.size_label(4096) == "4 KiB"
    assert report.size_label(1000) == "1000 B"


def test_ratio_and_missing_figures() -> None:
    assert report.ratio(3.0, 2.0) == "1.50x"
    assert report.ratio(None, 2.0) == "-"
    assert report.ratio(1.0, 0.0) == "-"
    assert report.fmt(12345.6) == "12,346"
    assert report.fmt(None) == "-"
    assert report.fmt(float("nan")) == "-"


def _system(name: str, rate: float, verified: bool = True) -> dict[str, object]:
    return {
        "name": name,
        "throughput": [
            {"producers": n, "item_bytes": 16, "items_per_s": rate * n, "p99_ms": 2.0}
            for n in (1, 8)
        ],
        "paced": [{"item_bytes": 16, "p50_ms": 1.0, "p99_ms": 3.0}],
        "acked": 10,
        "stored": 10 if verified else 9,
        "verified": verified,
    }


def test_markdown_has_a_table_per_size_ratios_and_the_check() -> None:
    run = {
        "config": {"producers": [1, 8], "item_sizes": [16]},
        "systems": [
            _system("raftchan", 200.0),
            _system("peer", 100.0, verified=False),
            {"name": "absent", "skipped": "not installed"},
        ],
    }
    text = report.markdown(run)
    assert "### 16 B items" in text
    assert "| raftchan | 200 | 1,600 | 2.00 | 1.00 | 3.00 |" in text
    assert "| peer | 2.00x | 2.00x | 1.00x | 1.00x | 1.00x |" in text
    assert "| peer | 10 | 9 | NO |" in text
    assert "Skipped absent: not installed" in text


def test_fanout_items_carry_their_sequence_number() -> None:
    item = fanout_item(1234, 16)
    assert len(item) == 16
    assert fanout_seq(item) == 1234
    assert len(fanout_item(7, 4)) == 8  # never shorter than the sequence number


def test_delivery_summary_lag_order_and_early_deliveries() -> None:
    acked = [1.0, 1.0, 2.0]
    sent = [0.5, 0.5, 1.5]
    seen = [
        ([0, 1, 2], [1.001, 0.999, 2.002]),  # complete; item 1 seen before its ack
        ([0, 2], [1.003, 2.004]),  # missed item 1
    ]
    summary = delivery_summary(seen, acked, sent, started=0.5)
    assert summary["every_item_in_order"] is False
    assert summary["subscribers_complete"] == 1
    assert summary["seen_before_ack"] == 0.2
    assert summary["lag_max_ms"] == 4.0
    assert summary["lag_p50_ms"] == 2.0
    assert summary["append_to_seen_p99_ms"] == 504.0


def test_plots_are_written_beside_the_results(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.plots import write_plots

    run = {
        "started": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu_count": 2},
        "config": {
            "profile": "quick",
            "producers": [1, 8],
            "item_sizes": [16],
            "fanout_subscribers": [1, 10],
            "fanout_rate": 1000.0,
        },
        "systems": [
            {
                **_system("raftchan", 200.0),
                "fanout": [
                    {
                        "subscribers": n,
                        "lag_p50_ms": 0.0,
                        "lag_p99_ms": 2.0,
                        "append_to_seen_p50_ms": 1.0,
                        "append_to_seen_p99_ms": 3.0,
                    }
                    for n in (1, 10)
                ],
            },
            {"name": "absent", "skipped": "not installed"},
        ],
    }
    paths = write_plots(run, tmp_path / "run")
    assert sorted(p.name for p in paths) == [
        "run-fanout.png",
        "run-latency-16B.png",
        "run-throughput-16B.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)
