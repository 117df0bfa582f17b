"""PNG plots of a run, written next to its JSON: throughput against producers (one plot
per item size), acknowledgement latency percentiles and CDFs (one each per item size),
fan-out lag and the failover timeline.

Needs matplotlib (``pip install -e '.[bench]'``); without it the run still writes its
JSON and Markdown and says that the plots were skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .failover import FAULTS, Fault, median_round
from .report import size_label

#: One colour and marker per system, the same in every plot of a run.
STYLES = ("o", "s", "^", "D", "v", "P", "X", "*", "h")


def _ran(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in run["systems"] if not s.get("skipped")]


def _style(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    colours = [cmap(i) for i in range(cmap.N)]
    return {
        s["name"]: {"color": colours[i % len(colours)], "marker": STYLES[i % len(STYLES)]}
        for i, s in enumerate(_ran(run))
    }


def _title(run: dict[str, Any], what: str) -> str:
    machine = run.get("machine", {})
    return (
        f"{what}\n{run.get('started', '')} ({run['config']['profile']}), "
        f"{machine.get('cpu_count', '?')} cores, loopback"
    )


def write_plots(run: dict[str, Any], stem: Path) -> list[Path]:
    """Write the plots of ``run`` as ``<stem>-*.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    written: list[Path] = []
    for size in run["config"]["item_sizes"]:
        if any(t.get("item_bytes") == size for s in _ran(run) for t in s.get("throughput", [])):
            written.append(_throughput(run, size, stem))
        if any(
            e.get("item_bytes") == size and "p50_ms" in e
            for s in _ran(run)
            for e in s.get("throughput", []) + s.get("paced", [])
        ):
            written.append(_latency(run, size, stem))
        if any(
            e.get("item_bytes") == size and e.get("cdf_ms")
            for s in _ran(run)
            for e in s.get("paced", [])
        ):
            written.append(_latency_cdf(run, size, stem))
    if any(s.get("fanout") for s in _ran(run)):
        written.append(_fanout(run, stem))
    for fault in FAULTS.values():
        if any(median_round(s.get(fault.key, {}).get("rounds", [])) for s in _ran(run)):
            written.append(_failover(run, stem, fault))
    return written


def _failover(run: dict[str, Any], stem: Path, fault: Fault) -> Path:
    """Acknowledged appends per bucket around the fault, the median round of each system."""
    import matplotlib.pyplot as plt

    styles = _style(run)
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for s in _ran(run):
        failover = s.get(fault.key, {})
        chosen = median_round(failover.get("rounds", []))
        if chosen is None:
            continue
        bucket = failover["bucket_s"]
        counts = chosen["timeline"]
        xs = [-failover["timeline_before_s"] + k * bucket for k in range(len(counts))]
        label = f"{s['name']} ({fault.verb} {chosen['killed']}: {chosen['failover_s']:.2f} s)"
        ax.step(
            xs, counts, where="post", label=label, linewidth=1.8, color=styles[s["name"]]["color"]
        )
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
    ax.annotate(
        f"{fault.signal} of the leader",
        (0.0, 1.0),
        xycoords=("data", "axes fraction"),
        xytext=(4, -14),
        textcoords="offset points",
        fontsize=9,
    )
    ax.set_xlabel(f"seconds from the {fault.signal}")
    ax.set_ylabel(f"acknowledged appends per {bucket * 1000:.0f} ms")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    ax.set_title(
        _title(
            run,
            f"{fault.key.capitalize()}: acknowledged appends around a {fault.signal} of the "
            "leader (median round of each system)",
        )
    )
    return _save(fig, stem, fault.key)


def _throughput(run: dict[str, Any], size: int, stem: Path) -> Path:
    import matplotlib.pyplot as plt

    styles = _style(run)
    producers = run["config"]["producers"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for s in _ran(run):
        points = sorted(
            (t["producers"], t["items_per_s"])
            for t in s.get("throughput", [])
            if t.get("item_bytes") == size and "items_per_s" in t
        )
        if points:
            xs, ys = zip(*points, strict=True)
            # A batching system's producers each have ``window`` appends in flight, not one.
            window = max(t.get("window", 1) for t in s.get("throughput", []))
            label = s["name"] if window == 1 else f"{s['name']} ({window} in flight/producer)"
            ax.plot(xs, ys, label=label, linewidth=2, markersize=7, **styles[s["name"]])
    ax.set_xscale("log")
    ax.set_xticks(producers, [str(n) for n in producers])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("producers (appends in flight)")
    ax.set_ylabel("acknowledged items/s (log scale)")
    ax.set_title(_title(run, f"Append throughput, {size_label(size)} items"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, stem, f"throughput-{size}B")


def _latency(run: dict[str, Any], size: int, stem: Path) -> Path:
    import matplotlib.pyplot as plt

    styles = _style(run)
    top = max(run["config"]["producers"])
    ran = _ran(run)
    groups = [
        ("paced p50", "paced", None, "p50_ms"),
        ("paced p99", "paced", None, "p99_ms"),
        (f"{top} producers p50", "throughput", top, "p50_ms"),
        (f"{top} producers p99", "throughput", top, "p99_ms"),
        (f"{top} producers p99.9", "throughput", top, "p999_ms"),
    ]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    width = 0.8 / max(1, len(ran))
    for i, s in enumerate(ran):
        values = []
        for _, phase, producers, key in groups:
            entry: dict[str, Any] = next(
                (
                    e
                    for e in s.get(phase, [])
                    if e.get("item_bytes") == size
                    and (producers is None or e.get("producers") == producers)
                ),
                {},
            )
            values.append(entry.get(key, math.nan))
        xs = [g + (i - (len(ran) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=s["name"], color=styles[s["name"]]["color"])
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_yscale("log")
    ax.set_ylabel("ms from append to acknowledgement (log scale)")
    ax.set_title(_title(run, f"Acknowledgement latency, {size_label(size)} items"))
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    return _save(fig, stem, f"latency-{size}B")


def _latency_cdf(run: dict[str, Any], size: int, stem: Path) -> Path:
    """Acknowledgement latency CDFs: paced (left) and at the most producers (right)."""
    import matplotlib.pyplot as plt

    styles = _style(run)
    top = max(run["config"]["producers"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    panels = (("paced", None, "one producer, paced"), ("throughput", top, f"{top} producers"))
    for ax, (phase, producers, label) in zip(axes, panels, strict=True):
        for s in _ran(run):
            entry = next(
                (
                    e
                    for e in s.get(phase, [])
                    if e.get("item_bytes") == size
                    and (producers is None or e.get("producers") == producers)
                    and e.get("cdf_ms")
                ),
                None,
            )
            if entry is None:
                continue
            qs, ms = zip(*entry["cdf_ms"], strict=True)
            style = styles[s["name"]]
            ax.plot(
                ms,
                [q / 100 for q in qs],
                label=s["name"],
                color=style["color"],
                marker=style["marker"],
                markersize=4,
            )
        ax.set_xscale("log")
        ax.set_xlabel("ms from append to acknowledgement (log scale)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of appends acknowledged within")
    # One legend, on the right-hand panel unless only the left one has lines.
    legend_axes = next((ax for ax in axes[::-1] if ax.get_legend_handles_labels()[0]), None)
    if legend_axes is not None:
        legend_axes.legend(loc="lower right", fontsize=9)
    fig.suptitle(_title(run, f"Acknowledgement latency CDF, {size_label(size)} items"))
    return _save(fig, stem, f"latency-cdf-{size}B")


def _fanout(run: dict[str, Any], stem: Path) -> Path:
    import matplotlib.pyplot as plt

    styles = _style(run)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    panels = (
        ("lag after acknowledgement", "lag_p50_ms", "lag_p99_ms"),
        ("append to seen", "append_to_seen_p50_ms", "append_to_seen_p99_ms"),
    )
    counts = run["config"]["fanout_subscribers"]
    for ax, (what, p50, p99) in zip(axes, panels, strict=True):
        for s in _ran(run):
            rows = sorted(
                (f["subscribers"], f[p50], f[p99]) for f in s.get("fanout", []) if p99 in f
            )
            if not rows:
                continue
            xs = [r[0] for r in rows]
            style = styles[s["name"]]
            ax.plot(xs, [r[2] for r in rows], label=f"{s['name']} p99", linewidth=2, **style)
            ax.plot(
                xs,
                [r[1] for r in rows],
                label=f"{s['name']} p50",
                linestyle="--",
                linewidth=1,
                alpha=0.7,
                **style,
            )
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.minorticks_off()
        # Linear below 1 ms, so that a lag of 0 (seen before the acknowledgement) shows.
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("subscribers")
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms (log scale above 1 ms)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    rate = run["config"]["fanout_rate"]
    fig.suptitle(_title(run, f"Fan-out delivery lag, one producer at {rate:,.0f} items/s"))
    return _save(fig, stem, "fanout")


def _save(fig: Any, stem: Path, what: str) -> Path:
    import matplotlib.pyplot as plt

    path = stem.with_name(f"{stem.name}-{what}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
