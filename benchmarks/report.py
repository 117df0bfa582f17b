"""The Markdown table of a run, with ratios raftchan / peer computed within the run."""

from __future__ import annotations

import math
from typing import Any

BASELINE = "raftchan"


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _columns(result: dict[str, Any]) -> dict[str, float | None]:
    cols: dict[str, float | None] = {}
    by_n = {t["producers"]: t for t in result.get("throughput", []) if "items_per_s" in t}
    for n in result.get("producer_counts", []):
        cols[f"items/s, {n} producers"] = by_n[n]["items_per_s"] if n in by_n else None
    top = max(by_n) if by_n else None
    cols["p99 ms at max producers"] = by_n[top]["p99_ms"] if top is not None else None
    paced = result.get("paced") or {}
    cols["paced p50 ms"] = paced.get("p50_ms")
    cols["paced p99 ms"] = paced.get("p99_ms")
    return cols


def markdown(run: dict[str, Any]) -> str:
    systems = run["systems"]
    for s in systems:
        s["producer_counts"] = run["config"]["producers"]
    ran = [s for s in systems if not s.get("skipped")]
    lines: list[str] = []
    if ran:
        names = list(_columns(ran[0]))
        lines.append("| system | " + " | ".join(names) + " | stored = acked |")
        lines.append("|---|" + "---:|" * len(names) + "---|")
        for s in ran:
            cols = _columns(s)
            cells = [_fmt(v, 0 if "items/s" in k else 2) for k, v in cols.items()]
            note = "yes" if s.get("verified") else ("ERROR" if s.get("error") else "no")
            lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {note} |")
        base = next((s for s in ran if s["name"] == BASELINE and not s.get("error")), None)
        if base is not None and len(ran) > 1:
            lines.append("")
            lines.append(
                f"Ratios {BASELINE} / peer, same run (throughput: above 1 means "
                f"{BASELINE} is faster; latency: below 1 means {BASELINE} is faster)."
            )
            lines.append("")
            lines.append("| peer | " + " | ".join(names) + " |")
            lines.append("|---|" + "---:|" * len(names))
            mine = _columns(base)
            for s in ran:
                if s is base:
                    continue
                theirs = _columns(s)
                cells = []
                for k in names:
                    a, b = mine.get(k), theirs.get(k)
                    cells.append(f"{a / b:.2f}x" if a and b else "-")
                lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    for s in systems:
        if s.get("skipped"):
            lines.append(f"\nSkipped {s['name']}: {s['skipped']}")
        if s.get("error"):
            lines.append(f"\nError in {s['name']}: {s['error']}")
    return "\n".join(lines) + "\n"
