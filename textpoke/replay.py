"""Replay one seed of a scenario and show what happened, annotated for people.

The run is repeated with every trace record kept (same seed, same trace hash), and the listing
interleaves, in the order the machine processed them: text writes, what each CPU executed at the
sites while an operation was in flight (with capstone disassembly), decoded copies refreshed by
snoops, event deliveries and `iretq`s, IPIs, NMIs, crashes, and the oracle's violations. A CPU that
drops stale decoded copies says which serializing instruction made it (`iretq`, `cpuid`, or the
patcher's own sync_core); a delivery never does, since delivering an event does not serialize.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from cpus.delivery import Vector
from cpus.disasm import describe

from .cli_support import open_whole
from .image import KernelImage
from .scenario import Scenario, _kernel, run_scenario

__all__ = ["Symbolizer", "annotated_listing", "replay", "write_perfetto"]

_VECTORS = {int(v): v.name for v in Vector}


class Symbolizer:
    def __init__(self, kernel: KernelImage) -> None:
        items = sorted((a, n) for n, a in kernel.symbols.items())
        self.addrs = [a for a, _ in items]
        self.names = [n for _, n in items]
        self.sizes = kernel.sizes

    def __call__(self, addr: int) -> str:
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i >= 0:
            name = self.names[i]
            off = addr - self.addrs[i]
            if off < max(self.sizes.get(name, 0), 1):
                return f"{name}+{off:#x}" if off else name
        return hex(addr)


class _Recorder:
    """Collects site executions during operations and the oracle's violations, each with its
    position in the machine's trace."""

    def __init__(self) -> None:
        self.machine = None
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.in_op = False

    def pos(self) -> int:
        return len(self.machine.trace.records) if self.machine else 0

    def on_op_start(self, op, time: int) -> None:
        self.in_op = True
        self.events.append((self.pos(), {"t": time, "cpu": -1, "kind": "op-start", "sites": len(op.requests)}))

    def on_op_end(self, op, time: int) -> None:
        self.in_op = False
        self.events.append((self.pos(), {"t": time, "cpu": -1, "kind": "op-end"}))

    def on_fetch(self, cpu: int, time: int, site: int, code: bytes) -> None:
        if self.in_op:
            self.events.append((self.pos(), {"t": time, "cpu": cpu, "kind": "exec", "site": site, "code": code}))

    def violation(self, v) -> None:
        self.events.append(
            (
                self.pos(),
                {
                    "t": v.time,
                    "cpu": v.cpu,
                    "kind": "VIOLATION",
                    "class": v.kind,
                    "site": v.site,
                    "code": v.code,
                    "detail": v.detail,
                },
            )
        )


def _record_dict(rec: tuple) -> dict[str, Any]:
    t, cpu, kind, *f = rec
    d: dict[str, Any] = {"t": t, "cpu": cpu, "kind": kind}
    names = {
        "run": ("rip", "instructions"),
        "write": ("addr", "data"),
        "deliver": ("vector", "rip", "rsp", "frame"),
        "iret": ("rip", "rsp", "unblocked"),
        "ipi-send": ("target", "vector"),
        "ipi-arrive": ("vector", "if"),
        "nmi": ("source", "outcome"),
        "decode": ("site", "code"),
        "snoop": ("site", "code"),
        "serialize": ("dropped", "cause"),
        "crash": ("reason", "rip", "code"),
        "watch": ("site",),
        "unwatch": ("site",),
        "halt": ("rip",),
        "mid-site": ("addr",),
    }.get(kind, tuple(f"f{i}" for i in range(len(f))))
    for k, v in zip(names, f, strict=False):
        d[k] = v
    return d


def _fmt(d: dict[str, Any], sym: Symbolizer) -> str:
    kind = d["kind"]
    who = "      " if d["cpu"] < 0 else f"cpu{d['cpu']:<3}"
    head = f"{d['t']:>9} {who} "
    if kind == "write":
        return head + f"write     {sym(d['addr'])}  {d['data'].hex(' ')}"
    if kind in ("decode", "snoop", "exec"):
        code = d["code"]
        verb = {"decode": "decodes", "snoop": "snooped", "exec": "executes"}[kind]
        return head + f"{verb:<9} {sym(d['site'])}  {code.hex(' '):<15} {describe(code, d['site'])}"
    if kind == "deliver":
        v = _VECTORS.get(d["vector"], str(d["vector"]))
        return head + f"deliver   {v:<5} interrupting {sym(d['rip'])}  rsp={d['rsp']:#x} frame@{d['frame']:#x}"
    if kind == "iret":
        extra = "  (NMIs unblocked)" if d["unblocked"] else ""
        return head + f"iretq     -> {sym(d['rip'])}  rsp={d['rsp']:#x}{extra}"
    if kind == "ipi-send":
        return head + f"IPI       -> cpu{d['target']} vector {_VECTORS.get(d['vector'], d['vector'])}"
    if kind == "ipi-arrive":
        return (
            head + f"IPI in    vector {_VECTORS.get(d['vector'], d['vector'])} ({'IF=1' if d['if'] else 'IF=0: held'})"
        )
    if kind == "nmi":
        return head + f"NMI       from {d['source']}: {d['outcome']}"
    if kind == "crash":
        code = d["code"]
        shown = f"{code.hex(' ')} ({describe(code, d['rip'])})" if code else "<unmapped>"
        return head + f"CRASH     {d['reason']} at {sym(d['rip'])}: {shown}"
    if kind == "serialize":
        n = d["dropped"]
        return head + f"serialize {d.get('cause', '?')}: drops {n} stale decoded cop{'y' if n == 1 else 'ies'}"
    if kind == "run":
        return head + f"runs      {d['instructions']} instructions from {sym(d['rip'])}"
    if kind == "VIOLATION":
        site = f" {sym(d['site'])}" if d.get("site") is not None else ""
        code = d["code"].hex(" ") if d.get("code") else ""
        return head + f"!! {d['class']}{site} {code} -- {d['detail']}"
    if kind == "op-start":
        return head + f"== patch operation starts ({d['sites']} sites)"
    if kind == "op-end":
        return head + "== patch operation returns"
    rest = " ".join(
        f"{k}={sym(v) if isinstance(v, int) and v > 0xFFFF else v}"
        for k, v in d.items()
        if k not in ("t", "cpu", "kind")
    )
    return head + f"{kind:<9} {rest}"


def annotated_listing(records: list[tuple], extra: list[tuple[int, dict]], sym: Symbolizer, show_runs: bool):
    """Yields (dict, line) in processing order."""
    j = 0
    for i, rec in enumerate(records):
        while j < len(extra) and extra[j][0] <= i:
            yield extra[j][1], _fmt(extra[j][1], sym)
            j += 1
        d = _record_dict(rec)
        if d["kind"] == "run" and not show_runs:
            continue
        yield d, _fmt(d, sym)
    for _, d in extra[j:]:
        yield d, _fmt(d, sym)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in d.items()}


def replay(
    sc: Scenario,
    seed: int,
    out: Console,
    show_runs: bool = False,
    jsonl: Path | None = None,
    listing: Path | None = None,
    limit: int = 400,
    timeline: Path | None = None,
    perfetto: Path | None = None,
) -> int:
    from .metrics import StallMeter

    rec = _Recorder()
    meter = StallMeter(record=True)
    outcome = run_scenario(sc, seed, keep_trace=True, keep_machine=True, extra_instruments=[rec, meter])
    m = outcome.machine
    assert m is not None
    sym = Symbolizer(_kernel(sc))
    v = outcome.verdict
    out.print(f"[bold]{sc.label()}  seed {seed}[/bold]")
    out.print(f"trace hash {v.trace_hash} ({m.trace.count} records)")
    lines = 0
    # each file appears whole when the listing is done, or not at all
    with open_whole(listing) as fh, open_whole(jsonl) as jh:
        for d, line in annotated_listing(m.trace.records, rec.events, sym, show_runs):
            if jh:
                jh.write(json.dumps(_jsonable(d)) + "\n")
            if fh:
                fh.write(line + "\n")
            if limit == 0 or lines < limit:
                style = "red" if d["kind"] in ("VIOLATION", "crash") else None
                out.print(line, style=style, markup=False, highlight=False)
            lines += 1
    if limit and lines > limit:
        out.print(f"... {lines - limit} more lines (--limit 0 shows all, --out FILE writes all)")
    step_of = {i: name for name, first, end in outcome.steps for i in range(first, end)}
    for i, r in enumerate(outcome.reports):
        hung = f" -- hung, still waiting for {r.hung}" if r.hung else ""
        step = step_of.get(i, "operation")
        out.print(f"{step}: {len(r.requests)} sites, {r.latency} cycles, {len(r.syncs)} syncs, {r.ipis} IPIs{hung}")
    out.print(v.summary())
    if timeline is not None:
        from .report import plot_timeline

        panels = []
        for i, r in enumerate(outcome.reports):
            lo, hi = r.start - 1500, r.end + 1500
            panels.append(
                {
                    "label": f"operation {i + 1}: {len(r.requests)} site(s), {r.protocol}",
                    "cpus": sc.cpus,
                    "patcher": 0,
                    "start": lo,
                    "end": hi,
                    "intervals": [iv for iv in meter.intervals if lo <= iv.end and iv.start <= hi],
                    "phases": r.phases,
                    "violations": [(x.cpu, x.time, x.kind) for x in v.violations if lo <= x.time <= hi],
                }
            )
        if panels:
            out.print(f"timeline: {plot_timeline(panels, timeline, f'{sc.label()}  seed {seed}')}")
    if perfetto is not None:
        out.print(f"perfetto trace: {write_perfetto(perfetto, sc, seed, outcome, rec.events)}")
    if jsonl:
        out.print(f"wrote {jsonl}")
    if listing:
        out.print(f"wrote {listing}")
    return 0


def write_perfetto(path: Path, sc: Scenario, seed: int, outcome, events: list[tuple[int, dict[str, Any]]]) -> Path:
    """Write the Perfetto trace of a run made with `keep_trace` and `keep_machine`, whose recorder
    (`_Recorder`) collected `events`."""
    from .perfetto import build_trace, write_trace
    from .scenario import replay_command

    m = outcome.machine
    v = outcome.verdict
    trace = build_trace(
        m.trace.records,
        [d for _, d in events],
        outcome.reports,
        sc.cpus,
        Symbolizer(_kernel(sc)),
        f"textpoke: {sc.label()} seed {seed}",
        metadata={
            "scenario": sc.label(),
            "seed": seed,
            "trace_hash": v.trace_hash,
            "verdict": v.summary(),
            "replay": replay_command(sc, seed),
        },
        patcher=m.config.patcher_cpu,
    )
    return write_trace(path, trace)
