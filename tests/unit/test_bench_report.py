"""Pure helpers of the benchmark harness: statistics and the Markdown report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.core import (
    Appender,
    delivery_summary,
    fanout_item,
    fanout_seq,
    latency_summary,
    percentile,
)


def test_percentile_is_nearest_rank_and_always_observed() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 99) == 5.0
    assert percentile(values, 0) == 1.0
    assert percentile([7.0], 99.9) == 7.0
    assert math.isnan(percentile([], 50))


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary([0.001] * 99 + [0.1])
    cdf = summary.pop("cdf_ms")
    assert summary == {"p50_ms": 1.0, "p99_ms": 1.0, "p999_ms": 100.0, "max_ms": 100.0}
    assert cdf[0] == [1, 1.0] and cdf[-1] == [100, 100.0]
    assert [q for q, _ in cdf] == sorted(q for q, _ in cdf)
    assert [ms for _, ms in cdf] == sorted(ms for _, ms in cdf)


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
        "paced": [
            {
                "item_bytes": 16,
                "p50_ms": 1.0,
                "p99_ms": 3.0,
                "cdf_ms": [[1, 0.5], [50, 1.0], [99, 3.0], [100, 4.0]],
            }
        ],
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
    from benchmarks.plots import write_plots  # matplotlib is a test dependency: no skip

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
                "failover": {
                    "bucket_s": 0.05,
                    "timeline_before_s": 1.0,
                    "rounds": [
                        {"killed": "n1", "failover_s": 0.6, "timeline": [30] * 20 + [0] * 12}
                    ],
                },
                "hang": {
                    "bucket_s": 0.05,
                    "timeline_before_s": 1.0,
                    "rounds": [
                        {"killed": "n2", "failover_s": 3.1, "timeline": [30] * 20 + [0] * 62}
                    ],
                },
            },
            {"name": "absent", "skipped": "not installed"},
        ],
    }
    paths = write_plots(run, tmp_path / "run")
    assert sorted(p.name for p in paths) == [
        "run-failover.png",
        "run-fanout.png",
        "run-hang.png",
        "run-latency-16B.png",
        "run-latency-cdf-16B.png",
        "run-throughput-16B.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_failover_items_name_their_producer_and_sequence() -> None:
    from benchmarks.failover import failover_item, item_key

    item = failover_item(101, 7, 16)
    assert len(item) == 16
    assert item_key(item) == (101).to_bytes(2, "big") + (7).to_bytes(6, "big")
    assert item_key(failover_item(101, 8, 16)) != item_key(item)


def test_each_fault_checks_only_the_items_of_its_own_producers() -> None:
    from benchmarks.failover import HANG, KILL, PRODUCER_RANGE, failover_item

    killed = failover_item(3 * 100 + 3, 5, 16)  # round 3, producer 3 of the kill rounds
    hung = failover_item(HANG.first_producer + 100, 0, 16)
    assert KILL.owns(killed) and not HANG.owns(killed)
    assert HANG.owns(hung) and not KILL.owns(hung)
    assert not HANG.owns(failover_item(HANG.first_producer + PRODUCER_RANGE, 0, 16))


def test_failover_refuses_what_it_cannot_run_before_starting_a_round() -> None:
    import asyncio
    import dataclasses

    from benchmarks.core import PROFILES, System, Unsupported
    from benchmarks.failover import HANG, run_failover

    class KillOnly(System):
        name = "kill-only"

        async def open_failover(self, n: int, op_timeout: float) -> list[Appender]:
            raise AssertionError("no round may start")

    quick = PROFILES["quick"]
    with pytest.raises(Unsupported, match="hang"):
        asyncio.run(run_failover(KillOnly(), quick, 16, HANG))
    # Producer numbers are round * 100 + producer, in 2 bytes per item.
    for too_many in ({"failover_producers": 101}, {"failover_rounds": 300}):
        with pytest.raises(ValueError, match="at most 100 producers"):
            asyncio.run(run_failover(KillOnly(), dataclasses.replace(quick, **too_many), 16))


def test_check_outcomes_finds_lost_duplicated_and_unknown_appends() -> None:
    from benchmarks.failover import Attempt, check_outcomes, failover_item, item_key

    items = [failover_item(1, seq, 16) for seq in range(6)]
    attempts = [Attempt(item_key(item), 0.0, 0.1, acked=True) for item in items[:4]]
    attempts += [Attempt(item_key(item), 0.0, 1.0, acked=False, error="T") for item in items[4:]]
    stranger = failover_item(9, 0, 16)
    # Item 1 lost, item 2 stored twice, unknown item 4 stored, 5 not, one nobody appended.
    stored = [items[0], items[2], items[2], items[3], items[4], stranger]
    assert check_outcomes(attempts, stored) == {
        "appends": 6,
        "acked": 4,
        "acked_lost": 1,
        "duplicates": 1,
        "unknown": 2,
        "unknown_stored": 1,
        "unknown_not_stored": 1,
        "stored": 6,
        "unexpected": 1,
    }


def test_timeline_counts_whole_buckets_around_the_origin() -> None:
    from benchmarks.failover import BUCKET_S, median_round, timeline

    assert BUCKET_S == 0.05
    times = [9.9, 9.96, 10.0, 10.01, 10.12, 10.149, 10.2, 8.0]
    # From 9.9 to 10.175: 5 whole buckets; 10.2 and 8.0 fall outside.
    assert timeline(times, origin=10.0, before_s=0.1, after_s=0.175) == [1, 1, 2, 0, 2]
    assert timeline([], origin=0.0, before_s=1.0, after_s=0.0) == [0] * 20
    rounds = [{"failover_s": 3.0}, {"failover_s": None}, {"failover_s": 1.0}, {"failover_s": 2.0}]
    assert median_round(rounds) == {"failover_s": 2.0}
    assert median_round([{"failover_s": None}]) is None


def test_recovery_memory_figures() -> None:
    import os

    from benchmarks.recovery import per_million, rss_bytes

    assert per_million(150_000_000, 1_000_000) == 150.0
    assert per_million(10_000_000, 100_000) == 100.0
    assert per_million(None, 10) is None
    assert per_million(5, 0) is None
    own = rss_bytes(os.getpid())
    assert own is not None and own > 1_000_000
    assert rss_bytes(None) is None


def test_markdown_has_the_failover_recovery_and_futures_tables() -> None:
    run = {
        "config": {"producers": [1, 8], "item_sizes": [16]},
        "systems": [
            {
                "name": "raftchan",
                "failover": {
                    "rounds": [{"failover_s": 0.6, "first_ack_s": 0.01}],
                    "median_s": 0.6,
                    "acked": 1000,
                    "acked_lost": 0,
                    "duplicates": 0,
                    "unknown": 2,
                    "unknown_stored": 2,
                    "unknown_not_stored": 0,
                    "verified": True,
                },
                "hang": {
                    "rounds": [
                        {"failover_s": 3.1, "first_ack_s": 3.0, "all_producers_s": 3.2},
                        {"failover_s": 2.9, "first_ack_s": 2.9, "all_producers_s": None},
                    ],
                    "median_s": 3.0,
                    "acked": 900,
                    "acked_lost": 0,
                    "duplicates": 0,
                    "unknown": 12,
                    "unknown_stored": 12,
                    "unknown_not_stored": 0,
                    "verified": True,
                },
                "recovery": {
                    "items": 100000,
                    "load_items_per_s": 120000.0,
                    "follower_restart_s": 0.5,
                    "cluster_restart_serves_s": 0.7,
                    "cluster_restart_all_nodes_s": 0.8,
                    "rss_empty_mb": [40.0, 40.0, 40.0],
                    "rss_loaded_mb": [50.0, 50.0, 50.0],
                    "rss_growth_mb_per_million": [100.0, 100.0, 100.0],
                    "rss_restart_growth_mb_per_million": [101.0, 101.0, 101.0],
                    "data_dir_mb": [2.3, 2.3, 2.3],
                },
                "futures": {
                    "items": 1000,
                    "append_items_per_s": 20000.0,
                    "read_gather_items_per_s": 4000.0,
                    "results_correct": True,
                },
            },
            {
                "name": "dask-queue",
                "failover_unsupported": "nothing to fail over to",
                "futures": {
                    "items": 1000,
                    "append_items_per_s": 5000.0,
                    "read_gather_items_per_s": 4000.0,
                    "results_correct": True,
                },
            },
            {"name": "redis", "futures_unsupported": "no futures"},
        ],
    }
    text = report.markdown(run)
    # A run from before the every-producer figure existed shows "-" for it.
    assert "| raftchan | 1 | 0.60 | 0.60 | 0.01 | - | 1,000 | 0 | 0 | 2 (2 / 0) | yes |" in text
    assert "- dask-queue: nothing to fail over to" in text
    hang = text[text.index("### Hang: SIGSTOP") :]
    assert "| SIGSTOP until every producer was acknowledged again, s |" in hang
    # A producer that never got an acknowledgement again within the round: "-".
    row = "| raftchan | 2 | 3.00 | 3.10, 2.90 | 3.00, 2.90 | 3.20, - | 900 | 0 | 0 | 12 (12 / 0) |"
    assert row in hang
    assert "| raftchan | 100,000 | 120,000 | 0.50 | 0.70 | 0.80 | 40.0 / 40.0 / 40.0 |" in text
    assert "| dask-queue | 1,000 | 5,000 | 4,000 | yes | 4.00x | 1.00x |" in text
    assert "Not measured (they hold no Dask futures): redis" in text
    assert "### 16 B items" not in text  # no throughput phase ran


def test_markdown_puts_every_systems_recovery_in_one_table() -> None:
    from benchmarks.recovery import ITEM_BYTES, _figures, recovery_item

    assert len(recovery_item(5)) == ITEM_BYTES
    assert recovery_item(5)[:8] == (5).to_bytes(8, "big")

    def recovery(server: str, load_rate: float, follower_s: float, serving: str) -> dict:
        mb = 1_000_000
        return _figures(
            items=100_000,
            rate=load_rate,
            data=[3 * mb] * 3,
            empty=[20 * mb, 20 * mb, None],
            loaded=[30 * mb, 40 * mb, None],
            follower=server,
            follower_s=follower_s,
            follower_rss=25 * mb,
            cluster_s=2.0,
            every_s=2.5,
            restarted=[22 * mb, 24 * mb, None],
            serving=serving,
        )

    run = {
        "config": {"producers": [1, 8], "item_sizes": [16]},
        "systems": [
            {"name": "raftchan", "recovery": recovery("n2", 50_000.0, 0.5, "status ready")},
            {"name": "nats-js-r3", "recovery": recovery("n3", 20_000.0, 1.25, "replica current")},
            {"name": "etcd", "recovery": recovery("e1", 30_000.0, 0.4, "linearizable count")},
            {"name": "redis", "recovery": {"error": "TimeoutError: not serving"}},
            {"name": "dask-queue", "recovery_unsupported": "nothing on disk"},
        ],
    }
    text = report.markdown(run)
    assert text.count("### Recovery") == 1
    growth = "100.0 / 200.0 / - | 20.0 / 40.0 / - | 3.0 / 3.0 / 3.0 |"
    assert "| raftchan | 100,000 | 50,000 | 0.50 | 2.00 | 2.50 | 20.0 / 20.0 / - |" in text
    assert "| nats-js-r3 | 100,000 | 20,000 | 1.25 | 2.00 | 2.50 |" in text
    assert "| etcd | 100,000 | 30,000 | 0.40 | 2.00 | 2.50 | 20.0 / 20.0 / - |" in text
    assert text.count(growth) == 3
    assert "| redis | ERROR: TimeoutError: not serving |" in text
    assert "- nats-js-r3 (restarted n3): replica current" in text
    assert "- etcd (restarted e1): linearizable count" in text
    assert "- dask-queue: nothing on disk" in text
    # The legend comes right under the table, before the systems not measured.
    assert text.index("Serving means:") < text.index("- etcd (restarted e1)")
    assert text.index("- etcd (restarted e1)") < text.index("Not measured:")
