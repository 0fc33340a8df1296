"""The main job: the embedded default scenario that `textpoke run` shows.

Four CPUs (one patcher), 32 traced functions, NMIs at a high rate on every CPU, and ftrace
enabled then disabled on every site, once for each protocol and NMI entry that matters. Every row is a
seeded scenario judged by the oracle; the table shows its verdict and what the patching cost, and the
timeline shows the enable operation of three of them, CPU by CPU.

Another client (`rows_for`) has the rows that tell its story: the jump-label client the same rows
(its static keys switched on and off); static-call its update as Linux does it (a text_poke_bp per
site), batched, under stop_machine, with the unpadded NULL `ret` of Linux 5.10-5.16, with a #BP
handler that cannot emulate RET, and unsynchronized; kprobe and optprobe their own protocol with
the nested-safe NMI entry and with FRED's, with preemption aimed at the probes, and without the
grace period that protects them (aimed too, so that every seed finds it), on 8 traced functions.
The table has a column per step of the operation (enable and disable; retarget, null and restore;
register and unregister).
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

__all__ = [
    "DEFAULT_ROWS",
    "STATIC_CALL_ROWS",
    "TIMELINE_STEP",
    "DemoRow",
    "perfetto_name",
    "prepare_rows",
    "protocol_row",
    "rows_for",
    "run_demo",
    "run_row",
]

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


_STATIC_CALL: dict[str, Any] = {**_COMMON, "operation": "retarget", "kernel": "c", "client": "static-call"}
#: static-call: Linux's update, batched, stop_machine, and the two ways it was or can be broken
STATIC_CALL_ROWS: tuple[tuple[str, Scenario, bool], ...] = (
    (
        "static_call_update: text_poke_bp per site",
        Scenario(protocol="bp", nmi="nested-safe", **_STATIC_CALL),
        True,
    ),
    ("text_poke_bp, batched (not Linux)", Scenario(protocol="bp-batch", nmi="nested-safe", **_STATIC_CALL), True),
    ("stop_machine", Scenario(protocol="stop-machine", nmi="nested-safe", **_STATIC_CALL), True),
    (
        "unpadded NULL ret (Linux 5.10-5.16)",
        Scenario(protocol="bp", nmi="nested-safe", **{**_STATIC_CALL, "operation": "retarget-unpadded"}),
        False,
    ),
    (
        "#BP handler without RET emulation",
        Scenario(protocol="bp", nmi="nested-safe", int3="emulate-noret", **_STATIC_CALL),
        False,
    ),
    ("unsafe: atomic store, no sync", Scenario(protocol="naive-atomic", nmi="nested-safe", **_STATIC_CALL), False),
)


def _probe_rows(client: str, mutation: str, broken: str) -> tuple[tuple[str, Scenario, bool], ...]:
    """A probe client's rows: its protocol with the nested-safe NMI entry and, on FRED, the naive one
    (probes are hit inside the NMI handler), preemption aimed at the probes, and the mutation without
    the grace period (aimed, so that the race is found)."""
    # 8 traced functions, each with its probe: each probe is patched on its own (an unregistration, an
    # optimization waits for a grace period), so 32 would take four times as long. No row with the
    # naive NMI entry on IDT hardware: its crashed CPUs stall the operation until the patcher gives up
    # waiting, minutes of simulation
    common: dict[str, Any] = {**_COMMON, "sites": 8, "protocol": client, "client": client, "nmi": "nested-safe"}
    return (
        (f"{client} (nested-safe NMIs)", Scenario(**common), True),
        (f"{client}, FRED, naive NMI entry", Scenario(**{**common, "nmi": "naive"}, fred=True), False),
        (f"{client}, preemption aimed at the probes", Scenario(preempt_aim=0.5, **common), True),
        (f"unsafe: {broken} (aimed)", Scenario(preempt_aim=0.5, mutation=mutation, **common), True),
    )


def rows_for(client: str) -> tuple[tuple[str, Scenario, bool], ...]:
    """The default rows of `textpoke run --client C` (ftrace and jump-label: `DEFAULT_ROWS`)."""
    if client == "static-call":
        return STATIC_CALL_ROWS
    if client == "kprobe":
        return _probe_rows("kprobe", "kprobe-slot-freed-early", "slot freed before the grace period")
    if client == "optprobe":
        return _probe_rows("optprobe", "optprobe-no-wait", "jmp written without the grace period")
    return DEFAULT_ROWS


def protocol_row(protocol: str, client: str = "ftrace") -> tuple[str, Scenario, bool]:
    """A row for `textpoke run --protocol P`: any protocol (a user's too) in the default scenario (of
    `client`: its first row's), with the nested-safe NMI entry, its timeline drawn."""
    base = rows_for(client)[0][1] if client != "ftrace" else Scenario(**_COMMON)
    return (f"{protocol} (nested-safe NMIs)", replace(base, protocol=protocol, nmi="nested-safe"), True)


#: the step a client's timeline shows when not its first: a kprobe's grace period is in its unregistration
TIMELINE_STEP = {"kprobe": "unregister"}


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
    #: per step performed (`steps`): its latency, whether it hung, its syncs and IPIs
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
    steps: list[str] = field(default_factory=list)
    grace_wait: list[int] = field(default_factory=list)

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
    # per step: its reports (one, or two per probe for optprobe); a step that patched nothing is left out
    steps = [(name, out.reports[a:b]) for name, a, b in out.steps if b > a]
    # the step the timeline shows: the first, or the client's (`TIMELINE_STEP`) when it was performed
    shown = [rs for name, rs in steps if name == TIMELINE_STEP.get(sc.client)]
    first = shown[0] if shown else steps[0][1] if steps else []
    window = (first[0].start - 1500, first[-1].end + 1500) if first else (0, 0)
    return DemoRow(
        label=label,
        scenario=sc,
        seed=seed,
        trace_hash=v.trace_hash,
        verdict=dict(v.counts),
        accounting_exact=v.accounting.get("exact"),
        latencies=[rs[-1].end - rs[0].start for _, rs in steps],
        hung=[any(r.hung is not None for r in rs) for _, rs in steps],
        syncs=[sum(len(r.syncs) for r in rs) for _, rs in steps],
        ipis=[sum(r.ipis for r in rs) for _, rs in steps],
        worst_stall=max(stalls, default=0),
        mean_stall=sum(stalls) / len(stalls) if stalls else 0.0,
        int3_hits=v.stats.get("int3_hits", 0),
        nmi={k[4:]: v.stats.get(k, 0) for k in ("nmi_delivered", "nmi_nested", "nmi_repeated", "nmi_latched")},
        intervals=[i for i in meter.intervals if window[0] <= i.end and i.start <= window[1]] if record else [],
        phases=[p for r in first for p in r.phases] if record else [],
        window=window,
        violations=[(x.cpu, x.time, x.kind) for x in v.violations],
        perfetto=perfetto,
        steps=[name for name, _ in steps],
        grace_wait=[sum(r.grace_wait for r in rs) for _, rs in steps],
    )


def prepare_rows(
    rows: Sequence[tuple[str, Scenario, bool]],
    objects: tuple[str, ...] = (),
    kernel: str = "asm",
    client: str = "ftrace",
) -> list[tuple[str, Scenario, bool]]:
    """`rows` on the kernel the command asked for, patching `client`'s sites (a row that names a client
    already keeps it): every scenario is checked here (`ConfigError`), before any runs."""
    out = []
    for label, sc, draw in rows:
        mine = client if sc.client == "ftrace" else sc.client
        out.append((label, replace(sc, objects=objects, kernel=kernel, client=mine), draw))
    return out


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
    (`textpoke.clients`: the jump-label client switches the static keys of the rows' sites). A row
    whose scenario names a client already (`rows_for`) keeps it."""
    jobs = [
        (label, sc, seed, draw, perfetto_dir / perfetto_name(i, label) if perfetto_dir else None)
        for i, (label, sc, draw) in enumerate(prepare_rows(rows, objects, kernel, client), 1)
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
