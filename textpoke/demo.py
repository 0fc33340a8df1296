"""The main job: the embedded default scenario that `textpoke run` shows.

Four CPUs (one patcher), 32 traced functions, NMIs at a high rate on every CPU, and ftrace
enabled then disabled on every site, once for each protocol and NMI entry that matters. Every row is a
seeded scenario judged by the oracle; the table shows its verdict and what the patching cost, and the
timeline shows the enable operation of three of them, CPU by CPU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .metrics import Interval, StallMeter
from .scenario import Scenario, run_scenario

__all__ = ["DEFAULT_ROWS", "DemoRow", "perfetto_name", "protocol_row", "run_demo", "run_row"]

_COMMON: dict[str, Any] = {"cpus": 4, "sites": 32, "nmi_rate": 300, "operation": "toggle"}

#: (label, scenario, draw its timeline)
DEFAULT_ROWS: tuple[tuple[str, Scenario, bool], ...] = (
    ("text_poke_bp, batched (nested-safe NMIs)", Scenario(protocol="bp-batch", nmi="nested-safe", **_COMMON), True),
    ("text_poke_bp, one site at a time", Scenario(protocol="bp", nmi="nested-safe", **_COMMON), False),
    ("stop_machine", Scenario(protocol="stop-machine", nmi="nested-safe", **_COMMON), True),
    ("text_poke_bp, naive NMI entry", Scenario(protocol="bp-batch", nmi="naive", **_COMMON), True),
    ("text_poke_bp, i386 latch NMI entry", Scenario(protocol="bp-batch", nmi="latch-dec", **_COMMON), False),
    ("text_poke_bp, FRED, naive NMI entry", Scenario(protocol="bp-batch", nmi="naive", fred=True, **_COMMON), False),
    ("unsafe: atomic store, no sync", Scenario(protocol="naive-atomic", nmi="nested-safe", **_COMMON), False),
)


def protocol_row(protocol: str) -> tuple[str, Scenario, bool]:
    """A row for `textpoke run --protocol P`: any protocol (a user's too) in the default scenario, with
    the nested-safe NMI entry, its timeline drawn."""
    return (f"{protocol} (nested-safe NMIs)", Scenario(protocol=protocol, nmi="nested-safe", **_COMMON), True)


def perfetto_name(index: int, label: str) -> str:
    """File name of row `index`'s Perfetto trace: its number and its label, in lowercase words."""
    return f"{index:02d}-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") + ".json"


@dataclass
class DemoRow:
    label: str
    scenario: Scenario
    seed: int
    trace_hash: str
    verdict: dict[str, int]
    accounting_exact: bool | None
    latencies: list[int]
    hung: list[bool]
    syncs: list[int]
    ipis: list[int]
    worst_stall: int
    mean_stall: float
    int3_hits: int
    nmi: dict[str, int]
    intervals: list[Interval] = field(default_factory=list)
    phases: list[tuple[int, int, str]] = field(default_factory=list)
    window: tuple[int, int] = (0, 0)
    violations: list[tuple[int, int, str]] = field(default_factory=list)
    perfetto: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.verdict


def run_row(label: str, sc: Scenario, seed: int, record: bool, perfetto: Path | None = None) -> DemoRow:
    """One row; with `perfetto`, also write the run's Perfetto trace there."""
    meter = StallMeter(record=record)
    instruments: list[object] = [meter]
    if perfetto is not None:
        from .replay import _Recorder

        rec = _Recorder()
        instruments.append(rec)
    out = run_scenario(
        sc, seed, keep_trace=perfetto is not None, keep_machine=perfetto is not None, extra_instruments=instruments
    )
    if perfetto is not None:
        from .replay import write_perfetto

        write_perfetto(perfetto, sc, seed, out, rec.events)
    v = out.verdict
    others = [c for c in range(sc.cpus) if c != 0]
    stalls = [meter.stall.get(c, 0) for c in others]
    first = out.reports[0] if out.reports else None
    window = (first.start - 1500, first.end + 1500) if first else (0, 0)
    return DemoRow(
        label=label,
        scenario=sc,
        seed=seed,
        trace_hash=v.trace_hash,
        verdict=dict(v.counts),
        accounting_exact=v.accounting.get("exact"),
        latencies=[r.latency for r in out.reports],
        hung=[r.hung is not None for r in out.reports],
        syncs=[len(r.syncs) for r in out.reports],
        ipis=[r.ipis for r in out.reports],
        worst_stall=max(stalls, default=0),
        mean_stall=sum(stalls) / len(stalls) if stalls else 0.0,
        int3_hits=v.stats.get("int3_hits", 0),
        nmi={k[4:]: v.stats.get(k, 0) for k in ("nmi_delivered", "nmi_nested", "nmi_repeated", "nmi_latched")},
        intervals=[i for i in meter.intervals if window[0] <= i.end and i.start <= window[1]] if record else [],
        phases=list(first.phases) if first and record else [],
        window=window,
        violations=[(x.cpu, x.time, x.kind) for x in v.violations],
        perfetto=perfetto,
    )


def run_demo(
    seed: int = 0,
    executor: Executor | None = None,
    progress=None,
    rows: Sequence[tuple[str, Scenario, bool]] = DEFAULT_ROWS,
    perfetto_dir: Path | None = None,
    objects: tuple[str, ...] = (),
    kernel: str = "asm",
    client: str = "ftrace",
) -> list[DemoRow]:
    """Run `rows` (label, scenario, draw); with `perfetto_dir`, one Perfetto trace per row there; with
    `objects`, on a kernel built from those ELF objects; with kernel "c", on the built-in workload and
    traced functions compiled from C; with another `client`, patching its sites instead of ftrace's
    (`textpoke.clients`: the jump-label client switches the static keys of the rows' sites)."""
    jobs = [
        (
            label,
            replace(sc, objects=objects, kernel=kernel, client=client),
            seed,
            draw,
            perfetto_dir / perfetto_name(i, label) if perfetto_dir else None,
        )
        for i, (label, sc, draw) in enumerate(rows, 1)
    ]
    if executor is None:
        rows = []
        for j in jobs:
            rows.append(run_row(*j))
            if progress:
                progress(rows[-1])
        return rows
    futures = [executor.submit(run_row, *j) for j in jobs]
    rows = []
    for f in futures:
        rows.append(f.result())
        if progress:
            progress(rows[-1])
    return rows
