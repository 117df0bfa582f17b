"""The Markdown tables of a run, with ratios raftchan / peer computed within the run."""

from __future__ import annotations

import math
from typing import Any

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
    if ran:
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
