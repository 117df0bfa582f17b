"""The Markdown tables of a run, with ratios raftchan / peer computed within the run."""

from __future__ import annotations

import math
from typing import Any

from .failover import HANG, KILL, Fault

BASELINE = "raftchan"


def size_label(n: int) -> str:
    """``16`` -> ``"16 B"``, ``4096`` -> ``"4 KiB"``."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def fmt(value: float | None, digits: int = 0) -> str:
    """A figure for a table: thousands separated, ``-`` for a missing one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(mine: float | None, theirs: float | None) -> str:
    """``mine / theirs`` as ``"1.25x"``, ``-`` when either is missing or zero."""
    if not mine or not theirs or math.isnan(mine) or math.isnan(theirs):
        return "-"
    return f"{mine / theirs:.2f}x"


def columns(result: dict[str, Any], producers: list[int], size: int) -> dict[str, float | None]:
    """One system's row for one item size: throughput per producer count, the p99 at the
    most producers, and the paced p50/p99."""
    cols: dict[str, float | None] = {}
    by_n = {
        t["producers"]: t
        for t in result.get("throughput", [])
        if "items_per_s" in t and t.get("item_bytes") == size
    }
    for n in producers:
        label = f"items/s, {n} producer" + ("" if n == 1 else "s")
        cols[label] = by_n[n]["items_per_s"] if n in by_n else None
    top = max(producers) if producers else None
    cols[f"p99 ms at {top}"] = by_n[top]["p99_ms"] if top in by_n else None
    paced: dict[str, Any] = next(
        (p for p in result.get("paced", []) if p.get("item_bytes") == size), {}
    )
    cols["paced p50 ms"] = paced.get("p50_ms")
    cols["paced p99 ms"] = paced.get("p99_ms")
    return cols


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _size_section(ran: list[dict[str, Any]], producers: list[int], size: int) -> list[str]:
    rows = {s["name"]: columns(s, producers, size) for s in ran}
    names = list(next(iter(rows.values())))
    lines = [f"### {size_label(size)} items", ""]
    lines += _table(
        ["system", *names],
        [[n, *(fmt(v, 0 if "items/s" in k else 2) for k, v in c.items())] for n, c in rows.items()],
    )
    base = rows.get(BASELINE)
    if base is not None and len(rows) > 1:
        lines += ["", f"Ratios {BASELINE} / peer, same run:", ""]
        lines += _table(
            ["peer", *names],
            [[n, *(ratio(base[k], c[k]) for k in names)] for n, c in rows.items() if n != BASELINE],
        )
    return lines + [""]


def markdown(run: dict[str, Any]) -> str:
    systems = run["systems"]
    config = run["config"]
    producers = list(config["producers"])
    ran = [s for s in systems if not s.get("skipped")]
    lines: list[str] = []
    if any(s.get("throughput") or s.get("paced") for s in ran):
        lines += [
            "Throughput: acknowledged items/s (above 1 in a ratio: raftchan is faster). "
            "Latency: ms from append to acknowledgement (below 1 in a ratio: raftchan is "
            "faster).",
            "",
        ]
        for size in config["item_sizes"]:
            lines += _size_section(ran, producers, size)
        lines += _table(
            ["system", "acknowledged", "stored", "stored = acked"],
            [[s["name"], fmt(s.get("acked")), fmt(s.get("stored")), _verdict(s)] for s in ran],
        )
    lines += _fanout_section(ran)
    lines += _failover_section(ran, KILL)
    lines += _failover_section(ran, HANG)
    lines += _recovery_section(ran)
    lines += _futures_section(ran)
    for s in systems:
        if s.get("skipped"):
            lines.append(f"\nSkipped {s['name']}: {s['skipped']}")
        if s.get("error"):
            lines.append(f"\nError in {s['name']}: {s['error']}")
    return "\n".join(lines) + "\n"


def _verdict(result: dict[str, Any]) -> str:
    if result.get("error"):
        return "ERROR"
    return "yes" if result.get("verified") else "NO"


#: Fan-out columns: header and the key of each figure in a fan-out result.
FANOUT_COLUMNS = (
    ("subscribers", "subscribers"),
    ("appended items/s", "publish_items_per_s"),
    ("lag p50 ms", "lag_p50_ms"),
    ("lag p99 ms", "lag_p99_ms"),
    ("append to seen p50 ms", "append_to_seen_p50_ms"),
    ("append to seen p99 ms", "append_to_seen_p99_ms"),
    ("slowest subscriber items/s", "slowest_subscriber_items_per_s"),
)


def _fanout_section(ran: list[dict[str, Any]]) -> list[str]:
    rows: list[list[str]] = []
    for s in ran:
        for f in s.get("fanout", []):
            if "error" in f:
                rows.append([s["name"], str(f["subscribers"]), f"ERROR: {f['error']}"])
                continue
            cells = [
                fmt(f.get(key), 0 if "items" in key or key == "subscribers" else 2)
                for _, key in FANOUT_COLUMNS
            ]
            rows.append([s["name"], *cells, "yes" if f.get("every_item_in_order") else "NO"])
    notes = [
        f"- {s['name']}: {s['fanout_unsupported']}" for s in ran if s.get("fanout_unsupported")
    ]
    if not rows and not notes:
        return []
    lines = ["", "### Fan-out", ""]
    if rows:
        lines += _table(["system", *(h for h, _ in FANOUT_COLUMNS), "every item, in order"], rows)
    if notes:
        lines += ["", "Not measured:", *notes]
    return lines


def _not_measured(ran: list[dict[str, Any]], key: str) -> list[str]:
    """One line per reason a workload was not measured, naming the systems it applies to."""
    by_reason: dict[str, list[str]] = {}
    for s in ran:
        if s.get(key + "_unsupported"):
            by_reason.setdefault(s[key + "_unsupported"], []).append(s["name"])
    notes = [f"- {', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    return ["", "Not measured:", *notes] if notes else []


def _error_rows(ran: list[dict[str, Any]], key: str) -> list[list[str]]:
    return [[s["name"], f"ERROR: {s[key]['error']}"] for s in ran if "error" in s.get(key, {})]


def _section(
    ran: list[dict[str, Any]],
    key: str,
    title: str,
    rows: list[list[str]],
    header: list[str],
    legend: list[str] | None = None,
) -> list[str]:
    """A workload's table (its rows, then a row per system whose run of it failed), the
    ``legend`` lines under it if there are rows, and the systems that do not measure it,
    with why; nothing if neither."""
    rows = rows + _error_rows(ran, key)
    notes = _not_measured(ran, key)
    if not rows and not notes:
        return []
    lines = ["", f"### {title}", ""]
    if rows:
        lines += _table(header, rows)
        if legend:
            lines += ["", *legend]
    return lines + notes


def _seconds(value: float | None) -> str:
    return fmt(value, 2)


def _failover_section(ran: list[dict[str, Any]], fault: Fault) -> list[str]:
    rows: list[list[str]] = []
    for s in ran:
        f = s.get(fault.key)
        if not f or "error" in f:
            continue
        rounds = ", ".join(_seconds(r.get("failover_s")) for r in f["rounds"])
        rows.append(
            [
                s["name"],
                str(len(f["rounds"])),
                _seconds(f.get("median_s")),
                rounds,
                ", ".join(_seconds(r.get("first_ack_s")) for r in f["rounds"]),
                # "-" also in runs from before the figure existed.
                ", ".join(_seconds(r.get("all_producers_s")) for r in f["rounds"]),
                fmt(f["acked"]),
                fmt(f["acked_lost"]),
                fmt(f["duplicates"]),
                f"{fmt(f['unknown'])} ({fmt(f['unknown_stored'])} / "
                f"{fmt(f['unknown_not_stored'])})",
                "yes" if f.get("verified") else "NO",
            ]
        )
    return _section(
        ran,
        fault.key,
        f"{fault.key.capitalize()}: {fault.title} of the leader under steady load",
        rows,
        [
            "system",
            "rounds",
            "median s",
            f"{fault.signal} to next acknowledged append, s (each round)",
            f"{fault.signal} to first acknowledgement, s",
            f"{fault.signal} until every producer was acknowledged again, s",
            "acknowledged",
            "acknowledged, lost",
            "duplicates",
            "unknown (stored / not stored)",
            "none lost or duplicated",
        ],
    )


def _mb_list(values: list[float | None] | None) -> str:
    return " / ".join(fmt(v, 1) for v in values or [])


def _recovery_section(ran: list[dict[str, Any]]) -> list[str]:
    rows: list[list[str]] = []
    for s in ran:
        r = s.get("recovery")
        if not r or "error" in r:
            continue
        rows.append(
            [
                s["name"],
                fmt(r["items"]),
                fmt(r["load_items_per_s"]),
                _seconds(r["follower_restart_s"]),
                _seconds(r["cluster_restart_serves_s"]),
                _seconds(r["cluster_restart_all_nodes_s"]),
                _mb_list(r["rss_empty_mb"]),
                _mb_list(r["rss_loaded_mb"]),
                _mb_list(r["rss_growth_mb_per_million"]),
                _mb_list(r["rss_restart_growth_mb_per_million"]),
                _mb_list(r["data_dir_mb"]),
            ]
        )
    # Each system has its own test of "serves" and restarts as its "follower" a server
    # that leads nothing: the table's times are read with these lines.
    serving = [
        f"- {s['name']} (restarted {s['recovery'].get('follower', '?')}): "
        f"{s['recovery']['serving']}"
        for s in ran
        if s.get("recovery", {}).get("serving")
    ]
    return _section(
        ran,
        "recovery",
        "Recovery: restart with many 16 B items in the log",
        rows,
        [
            "system",
            "items",
            "load items/s",
            "follower restart to serving, s",
            "cluster restart to serving, s",
            "cluster restart, every node serving, s",
            "RSS empty, MB per node",
            "RSS loaded, MB",
            "RSS growth, MB per million items",
            "after cluster restart, MB per million",
            "data folder, MB",
        ],
        ["Serving means:", *serving] if serving else None,
    )


def _futures_section(ran: list[dict[str, Any]]) -> list[str]:
    rows: list[list[str]] = []
    figures = {s["name"]: s["futures"] for s in ran if "append_items_per_s" in s.get("futures", {})}
    base = figures.get(BASELINE)
    for name, f in figures.items():
        rows.append(
            [
                name,
                fmt(f["items"]),
                fmt(f["append_items_per_s"]),
                fmt(f["read_gather_items_per_s"]),
                "yes" if f.get("results_correct") else "NO",
                "-"
                if base is None or name == BASELINE
                else ratio(base["append_items_per_s"], f["append_items_per_s"]),
                "-"
                if base is None or name == BASELINE
                else ratio(base["read_gather_items_per_s"], f["read_gather_items_per_s"]),
            ]
        )
    rows += _error_rows(ran, "futures")
    others = [s["name"] for s in ran if s.get("futures_unsupported")]
    if not rows and not others:
        return []
    lines = ["", "### Dask futures: handed over and read back", ""]
    names = ", ".join(others)
    notes = ["", f"Not measured (they hold no Dask futures): {names}"] if others else []
    if not rows:
        return lines + notes[1:]
    lines += _table(
        [
            "system",
            "futures",
            "append (+ flush) items/s",
            "read + gather items/s",
            "results correct",
            f"{BASELINE} / system, append",
            f"{BASELINE} / system, read + gather",
        ],
        rows,
    )
    return lines + notes
