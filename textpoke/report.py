"""Pictures and tables: the per-CPU timeline of a run, latency plots, Markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.patches import Patch

from .rt import lateness_stats

__all__ = ["markdown_table", "plot_latency", "plot_rt", "plot_timeline"]

COLORS = {
    "workload": "#d9e6f2",
    "int3": "#e8702a",
    "sync IPI": "#2a9d8f",
    "stopper": "#9b2226",
    "NMI": "#6a4c93",
    "patcher": "#264653",
}
PHASE_COLORS = {
    "publish": "#8d99ae",
    "write int3": "#e8702a",
    "write tail": "#f4a261",
    "write first": "#e9c46a",
    "write write": "#e76f51",
    "sync int3": "#2a9d8f",
    "sync tail": "#52b69a",
    "sync first": "#76c893",
    "sync write": "#99d98c",
    "sync ftrace-sync-ipi": "#b5e48c",
    "withdraw": "#adb5bd",
    "rendezvous": "#9b2226",
    "release": "#ae2012",
}
#: the probe protocols' own steps (in the legend only when a panel has them)
PROBE_PHASE_COLORS = {
    "kproberegister": "#577590",
    "kprobeunregister": "#4d908e",
    "graceperiod": "#f9c74f",
    "freeslot": "#90be6d",
}
_PROBE_PHASE_NAMES = {
    "kproberegister": "register (slot, table)",
    "kprobeunregister": "unlink",
    "graceperiod": "grace period",
    "freeslot": "free slot",
}


def _bars(ax, xs: Sequence[tuple[float, float]], y: float, h: float, color: str) -> None:
    """`broken_barh` without its data-limit update (the axes' limits are set by hand): with a few
    hundred collections a timeline, that update was a third of the plot's time."""
    verts = [((x, y), (x, y + h), (x + w, y + h), (x + w, y)) for x, w in xs]
    ax.add_collection(PolyCollection(verts, facecolors=color, edgecolors="face", linewidths=0), autolim=False)


def plot_timeline(
    panels: Sequence[dict[str, Any]],
    path: Path,
    title: str = "",
) -> Path:
    """One panel per run: a lane per CPU. Workload time is the light background; handlers are drawn
    over it (int3 traps, sync IPIs, the stopper, NMIs stacked by nesting depth); the patcher's lane
    shows its phases. Each panel dict has: label, cpus, patcher, start, end, intervals (metrics.Interval),
    phases [(start, end, name)], violations [(cpu, time, kind)]."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 1.1 + 0.55 * max(p["cpus"] for p in panels) * len(panels)))
    if len(panels) == 1:
        axes = [axes]
    for ax, p in zip(axes, panels, strict=True):
        start, end = p["start"], p["end"]
        span = max(end - start, 1)
        ncpu = p["cpus"]
        for cpu in range(ncpu):
            y = ncpu - 1 - cpu
            if cpu == p["patcher"]:
                for s, e, name in p["phases"]:
                    if e < start or s > end:
                        continue
                    _bars(
                        ax,
                        [(max(s, start), max(min(e, end) - max(s, start), span / 2000))],
                        y - 0.4,
                        0.8,
                        PHASE_COLORS.get(name, PROBE_PHASE_COLORS.get(name, COLORS["patcher"])),
                    )
                continue
            _bars(ax, [(start, span)], y - 0.4, 0.8, COLORS["workload"])
        bars: dict[tuple[int, float, str], list[tuple[int, float]]] = {}  # one collection per lane and kind
        for iv in p["intervals"]:
            if iv.end < start or iv.start > end or iv.cpu == p["patcher"]:
                continue
            y = ncpu - 1 - iv.cpu
            h = 0.8 if iv.kind != "NMI" else 0.8 / (1 + iv.depth)
            w = max(min(iv.end, end) - max(iv.start, start), span / 1500)
            bars.setdefault((y, h, COLORS.get(iv.kind, "black")), []).append((max(iv.start, start), w))
        for (y, h, color), xs in bars.items():
            _bars(ax, xs, y - 0.4, h, color)
        labelled: set[tuple[int, str]] = set()
        for cpu, t, kind in p.get("violations", []):
            if not start <= t <= end:
                continue
            if kind == "crash" and cpu != p["patcher"]:
                _bars(ax, [(t, end - t)], ncpu - 1 - cpu - 0.4, 0.8, "#495057")
            ax.plot([t], [ncpu - 1 - cpu], marker="x", color="red", markersize=9, mew=2)
            if (cpu, kind) not in labelled:  # name each class once per CPU
                labelled.add((cpu, kind))
                ax.annotate(kind, (t, ncpu - 1 - cpu + 0.45), color="red", fontsize=7)
        ax.set_yticks(range(ncpu))
        ax.set_yticklabels([f"cpu{c}" + (" (patcher)" if c == p["patcher"] else "") for c in reversed(range(ncpu))])
        ax.set_xlim(start, end)
        ax.set_ylim(-0.6, ncpu - 0.4)
        ax.set_title(p["label"], fontsize=10, loc="left")
        ax.set_xlabel("simulated cycles")
    handles = [Patch(color=COLORS[k], label=k) for k in ("workload", "int3", "sync IPI", "stopper", "NMI")]
    handles.append(Patch(color="#495057", label="crashed"))
    handles += [Patch(color=c, label=f"patcher: {k}") for k, c in PHASE_COLORS.items() if k != "write write"]
    seen = {name for p in panels for _s, _e, name in p["phases"]}
    handles += [
        Patch(color=c, label=f"patcher: {_PROBE_PHASE_NAMES[k]}") for k, c in PROBE_PHASE_COLORS.items() if k in seen
    ]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(rows: Sequence[dict[str, Any]], metrics: Sequence[str], path: Path, title: str = "") -> Path:
    """One subplot per metric, against the CPU count, a line per (protocol, sites); means over seeds,
    log-log axes."""
    groups: dict[tuple[str, int], dict[int, list[float]]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["sites"]), {}).setdefault(r["cpus"], []).append(r)
    n = len(metrics)
    cols = 3 if n > 4 else 2
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.2 * cols, 3.6 * ((n + cols - 1) // cols)))
    axes = list(getattr(axes, "flat", [axes]))
    styles = {"bp": "o-", "bp-batch": "s-", "stop-machine": "^-", "naive-atomic": "x--", "naive-bytes": "x:"}
    for ax, metric in zip(axes, metrics, strict=False):
        for (protocol, sites), by_cpu in sorted(groups.items()):
            xs = sorted(by_cpu)
            ys = [sum(float(r[metric]) for r in by_cpu[x]) / len(by_cpu[x]) for x in xs]
            style = styles.get(protocol.split()[0], "o-")  # "bp retarget": a protocol and a step
            ax.plot(xs, ys, style, label=f"{protocol}, {sites} site(s)", markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("CPUs")
        ax.set_title(metric.replace("_", " "), fontsize=10)
        ax.grid(True, alpha=0.3)
    for ax in axes[n:]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rt(rows: Sequence[dict[str, Any]], path: Path, title: str = "what a real-time task sees") -> Path:
    """The real-time figures of `textpoke latency` rows (LatencyRow.as_dict): the worst interruption
    and the RT task's lateness p99, each against the CPU count (a line per protocol and batch size)
    and against the batch size (a line per protocol and CPU count), worst or pooled over seeds; and
    a histogram of every lateness sample per protocol."""
    styles = {"bp": "o-", "bp-batch": "s-", "stop-machine": "^-", "naive-atomic": "x--", "naive-bytes": "x:"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))

    def pooled(key: str, a: str, b: str) -> dict[tuple[str, int], dict[int, float]]:
        """(protocol, a) -> {b: the worst (`max_interruption_cycles`) or the pooled p99 (lateness)}"""
        cells: dict[tuple[str, int], dict[int, list]] = {}
        for r in rows:
            cells.setdefault((r["protocol"], r[a]), {}).setdefault(r[b], []).append(r)
        out: dict[tuple[str, int], dict[int, float]] = {}
        for k, by in cells.items():
            for x, rs in by.items():
                if key == "max_interruption_cycles":
                    v = float(max(r[key] for r in rs))
                else:
                    p99 = lateness_stats([s for r in rs for s in r["rt_lateness"]])["p99"]
                    if p99 is None:
                        continue
                    v = p99
                out.setdefault(k, {})[x] = v
        return out

    panels = [
        (axes[0][0], "max_interruption_cycles", "sites", "cpus", "worst interruption (cycles) vs CPUs"),
        (axes[0][1], "max_interruption_cycles", "cpus", "sites", "worst interruption (cycles) vs sites per batch"),
        (axes[1][0], "rt_lateness", "sites", "cpus", "RT task lateness p99 (cycles) vs CPUs"),
        (axes[1][1], "rt_lateness", "cpus", "sites", "RT task lateness p99 (cycles) vs sites per batch"),
    ]
    for ax, key, line, x, name in panels:
        for (protocol, v), by in sorted(pooled(key, line, x).items()):
            xs = sorted(by)
            label = f"{protocol}, {v} {'site(s)' if line == 'sites' else 'CPUs'}"
            ax.plot(xs, [by[k] for k in xs], styles.get(protocol.split()[0], "o-"), label=label, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("CPUs" if x == "cpus" else "sites patched in one operation")
        ax.set_title(name, fontsize=10)
        ax.grid(True, alpha=0.3)
        if ax.lines:  # no RT task (a probe client's kernel): nothing to tell apart
            ax.legend(fontsize=6)
    ax = axes[0][2]
    by_protocol: dict[str, list[int]] = {}
    for r in rows:
        by_protocol.setdefault(r["protocol"], []).extend(r["rt_lateness"])
    samples = [v for vs in by_protocol.values() for v in vs]
    if samples:
        low = max(min(samples), 1) / 1.2
        bins = np.geomspace(low, max(max(samples), 2) * 1.2, 48)
        for protocol, vs in sorted(by_protocol.items()):
            if vs:
                ax.hist([max(v, low) for v in vs], bins=bins, histtype="step", label=f"{protocol} ({len(vs)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    ax.set_xlabel("lateness (cycles)")
    ax.set_title("RT task wake-ups during the operation, every run", fontsize=10)
    ax = axes[1][2]
    worst = pooled("max_interruption_cycles", "cpus", "sites")
    cpus = sorted({c for protocol, c in worst if protocol in ("stop-machine", "bp-batch")})
    for c in cpus:
        stop, bp = worst.get(("stop-machine", c), {}), worst.get(("bp-batch", c), {})
        xs = sorted(set(stop) & set(bp))
        if xs:
            ax.plot(xs, [stop[x] / max(bp[x], 1) for x in xs], "o-", label=f"{c} CPUs", markersize=4)
    if ax.lines:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sites patched in one operation")
        ax.set_title("worst interruption, stop_machine / batched text_poke_bp", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)
