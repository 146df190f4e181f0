#!/usr/bin/env python3
"""Draws plot.png of a soak run from its timeseries.csv and summary.json:
RSS and open files of each node, connected clients, WebSocket deliveries/s,
p99 publish->receive, webhook requests/s, with the fault windows shaded."""
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: Path) -> None:
    rows = list(csv.DictReader(open(out / "timeseries.csv")))
    summary = json.load(open(out / "summary.json"))
    nodes = sorted({int(r["node"]) for r in rows})

    def series(node, key):
        pts = [(float(r["t"]), float(r[key])) for r in rows if int(r["node"]) == node and r[key] != ""]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    for node in nodes:
        t, v = series(node, "rss_kib")
        axes[0].plot(t, [x / 1024 for x in v], label=f"node {node}")
        t, v = series(node, "fds")
        axes[1].plot(t, v, label=f"node {node}")
    first = [r for r in rows if int(r["node"]) == nodes[0]]
    t = [float(r["t"]) for r in first]
    axes[2].plot(t, [float(r["connected"]) for r in first], color="tab:green")
    axes[3].plot(t, [float(r["ws_per_sec"]) for r in first], label="WebSocket deliveries/s")
    axes[3].plot(t, [float(r["webhook_per_sec"]) for r in first], label="webhook requests/s")
    pt = [(float(r["t"]), float(r["p99_ms"])) for r in first if r["p99_ms"] != ""]
    axes[4].plot([p[0] for p in pt], [p[1] for p in pt], color="tab:red")
    titles = ["RSS (MiB)", "open files", "connected clients (all nodes)", "per second", "p99 publish→receive (ms, per second)"]
    for ax, title in zip(axes, titles):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        for f in summary["verdict"]["faults"]:
            ax.axvspan(f["start_secs"], f["end_secs"] + 10, color="orange", alpha=0.15)
    for f in summary["verdict"]["faults"]:
        axes[0].annotate(f["fault"], (f["start_secs"], 0), rotation=90, fontsize=7, va="bottom")
    axes[0].legend()
    axes[1].legend()
    axes[3].legend()
    axes[4].set_yscale("log")
    axes[-1].set_xlabel("seconds")
    verdict = "passed" if not summary["failures"] else "FAILED"
    fig.suptitle(f"eventgate soak: {summary['nodes']} node(s), {summary['minutes']} min — {verdict}")
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=80)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
