"""Perfetto traces of one run, in the JSON trace-event format that ui.perfetto.dev opens natively.

The source is the machine's trace (every record kept), the oracle's violations and the patcher's
reports, the same material as the annotated listing of `textpoke replay`:

* one track (thread) per CPU. A workload CPU has a ``workload`` slice for as long as it runs its
  workload, and over it the handlers of every event it took, from the delivery to the `iretq` that
  returns from it: ``int3``, ``NMI``, ``sync IPI``, ``stopper`` (deliveries and `iretq`s are paired
  per CPU, last in first out, as the hardware stacks them), so a nested NMI is drawn inside the NMI
  it interrupted. A crash ends every open slice and starts a ``crashed`` slice;
* a track of its own beside the patcher's CPU shows each operation as a slice with its steps
  (publish, write int3, sync int3, ...; `PatchReport.phases`) inside; a step that took no cycles (a
  withdraw with no handler in flight) is an instant on the CPU's track. The patcher's CPU takes NMIs
  in the middle of its steps, so its handlers are drawn on the CPU's own track, not inside the steps;
* instants: text writes, snoops (a write reaching a CPU's decoded copy), serializations, what a CPU
  executed at a site during an operation, NMI arrivals and their hardware outcome, IPIs sent and
  arriving, and every violation with its class, site, bytes and detail as arguments;
* a counter track per workload CPU: its NMI nesting depth.

Time: the axis shows simulated cycles as nanoseconds (1 ns = 1 cycle; at the cost model's nominal
2.5 GHz a real nanosecond is 2.5 cycles). Timestamps are integers, written in microseconds with
three decimals, so nothing is rounded. Slices are complete ("X") events, written in nesting order;
one that would overlap its neighbour without nesting goes to a second lane of the same CPU
(``cpuN +1``), which never happens with the machine's LIFO handlers but keeps the file valid if it did.

The file is written whole or not at all (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpus import ConfigError
from cpus.delivery import Vector
from cpus.disasm import describe

__all__ = ["Slice", "build_trace", "write_trace"]

_PID = 1
_HANDLERS = {int(Vector.BP): "int3", int(Vector.NMI): "NMI", int(Vector.IPI): "sync IPI", int(Vector.STOP): "stopper"}
_VECTOR_NAMES = {int(v): v.name for v in Vector}
#: trace records that become no instant (quanta, decoded-copy refreshes, bookkeeping)
_QUIET = frozenset({"run", "decode", "watch", "unwatch", "deliver", "iret", "crash", "halt"})


@dataclass
class Slice:
    cpu: int
    start: int
    end: int
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    seq: int = 0  # order in which slices were opened: an outer slice opens before its inner ones


def _us(cycles: int) -> float:
    return cycles / 1000  # 1 cycle = 1 ns; three decimals are exact


class _Builder:
    def __init__(self, ncpus: int, patcher: int, sym) -> None:
        self.ncpus = ncpus
        self.patcher = patcher
        self.sym = sym
        self.slices: list[Slice] = []
        self.instants: list[dict[str, Any]] = []
        self.counters: list[dict[str, Any]] = []
        self.open: list[list[Slice]] = [[] for _ in range(ncpus)]
        self.workload: list[Slice | None] = [None] * ncpus
        self.nmi_depth = [0] * ncpus
        self.seq = 0
        self.last = 0

    def _slice(self, cpu: int, start: int, name: str, **args: Any) -> Slice:
        self.seq += 1
        return Slice(cpu, start, start, name, args, self.seq)

    def instant(self, cpu: int, t: int, name: str, **args: Any) -> None:
        ev: dict[str, Any] = {"ph": "i", "pid": _PID, "ts": _us(t), "name": name}
        if 0 <= cpu < self.ncpus:
            ev.update(tid=cpu + 1, s="t")
        else:
            ev["s"] = "p"
        if args:
            ev["args"] = args
        self.instants.append(ev)

    def depth(self, cpu: int, t: int, delta: int | None) -> None:
        self.nmi_depth[cpu] = 0 if delta is None else self.nmi_depth[cpu] + delta
        self.counters.append(
            {
                "ph": "C",
                "pid": _PID,
                "ts": _us(t),
                "name": f"cpu{cpu} NMI depth",
                "args": {"depth": self.nmi_depth[cpu]},
            }
        )

    def start_workloads(self, t: int) -> None:
        for c in range(self.ncpus):
            if c != self.patcher:
                self.workload[c] = self._slice(c, t, "workload")
                self.depth(c, t, None)

    def end_workload(self, cpu: int, t: int) -> None:
        w = self.workload[cpu]
        if w is not None:
            w.end = t
            self.slices.append(w)
            self.workload[cpu] = None

    def record(self, rec: tuple) -> None:
        t, cpu, kind, *f = rec
        self.last = max(self.last, t)
        sym = self.sym
        if kind == "deliver":
            vector, rip = f[0], f[1]
            name = _HANDLERS.get(vector, _VECTOR_NAMES.get(vector, f"vector {vector}"))
            self.open[cpu].append(self._slice(cpu, t, name, vector=vector, interrupted=sym(rip)))
            if vector == int(Vector.NMI):
                self.depth(cpu, t, +1)
        elif kind == "iret":
            if self.open[cpu]:
                s = self.open[cpu].pop()
                s.end = t
                s.args["returns_to"] = sym(f[0])
                s.args["nmis_unblocked"] = bool(f[2])
                self.slices.append(s)
                if s.args.get("vector") == int(Vector.NMI):
                    self.depth(cpu, t, -1)
        elif kind == "crash":
            reason, rip, code = f
            self.close_all(cpu, t, "crashed")
            self.end_workload(cpu, t)
            shown = f"{code.hex(' ')} ({describe(code, rip)})" if code else "<unmapped>"
            self.open[cpu].append(self._slice(cpu, t, "crashed", reason=reason, rip=sym(rip), bytes=shown))
            self.instant(cpu, t, f"crash: {reason}", rip=sym(rip), bytes=shown)
        elif kind == "halt":
            self.end_workload(cpu, t)
        elif kind == "write":
            addr, data = f
            self.instant(cpu, t, f"write {sym(addr)}: {data.hex(' ')}", addr=sym(addr), bytes=data.hex(" "))
        elif kind == "snoop":
            site, code = f
            self.instant(
                cpu, t, f"snoop {sym(site)}", site=sym(site), copy_now=code.hex(" "), insn=describe(code, site)
            )
        elif kind == "serialize":
            self.instant(cpu, t, "serialize", dropped_copies=f[0])
        elif kind == "nmi":
            self.instant(cpu, t, f"NMI from {f[0]}: {f[1]}", source=f[0], outcome=f[1])
        elif kind == "ipi-send":
            target, vector = f
            self.instant(cpu, t, f"IPI -> cpu{target}", target=target, vector=_VECTOR_NAMES.get(vector, vector))
        elif kind == "ipi-arrive":
            vector, if_on = f
            held = "" if if_on else " (IF=0: held)"
            self.instant(cpu, t, f"IPI arrives{held}", vector=_VECTOR_NAMES.get(vector, vector))
        elif kind not in _QUIET:
            args = {f"f{i}": (v.hex(" ") if isinstance(v, bytes) else v) for i, v in enumerate(f)}
            self.instant(cpu, t, kind, **args)

    def extra(self, d: dict[str, Any]) -> None:
        kind, t, cpu = d["kind"], d["t"], d["cpu"]
        sym = self.sym
        if kind == "VIOLATION":
            site = d.get("site")
            code = d.get("code") or b""
            args = {
                "class": d["class"],
                "site": sym(site) if site is not None else None,
                "address": hex(site) if site is not None else None,
                "bytes": code.hex(" "),
                "disassembly": describe(code, site or 0) if code else "",
                "detail": d.get("detail", ""),
            }
            self.instant(cpu, t, f"VIOLATION {d['class']}", **args)
        elif kind == "exec":
            code = d["code"]
            self.instant(cpu, t, f"executes {sym(d['site'])}", bytes=code.hex(" "), insn=describe(code, d["site"]))

    def close_all(self, cpu: int, t: int, why: str) -> None:
        while self.open[cpu]:
            s = self.open[cpu].pop()
            s.end = t
            if s.name != "crashed":
                s.args["unfinished"] = why
            self.slices.append(s)
            if s.args.get("vector") == int(Vector.NMI):
                self.depth(cpu, t, -1)

    def phases(self, reports: Sequence[Any]) -> None:
        for k, r in enumerate(reports, 1):
            op = self._slice(self.ncpus, r.start, f"operation {k}: {r.protocol}", sites=len(r.requests))
            if r.mutation:
                op.args["mutation"] = r.mutation
            op.end = max(r.end, r.start)
            self.slices.append(op)
            last = r.start
            for s, e, name in r.phases:
                last = e
                if e == s:  # a step that took no cycles: an instant (a zero-length slice at the
                    self.instant(self.patcher, s, name, cycles=0)  # operation's edge nests ambiguously)
                    continue
                ph = self._slice(self.ncpus, s, name)
                ph.end = e
                self.slices.append(ph)
            if r.hung:
                hung = self._slice(self.ncpus, last, f"hung: waiting for {r.hung}")
                hung.end = op.end
                self.slices.append(hung)
            self.last = max(self.last, op.end)


def _lanes(slices: list[Slice]) -> list[list[Slice]]:
    """Split one CPU's slices into lanes in which every slice nests in the one around it."""
    lanes: list[list[Slice]] = []
    stacks: list[list[Slice]] = []
    for s in sorted(slices, key=lambda s: (s.start, -s.end, s.seq)):
        for lane, stack in zip(lanes, stacks, strict=True):
            while stack and stack[-1].end <= s.start:  # ended (a slice starting at its end is a sibling)
                stack.pop()
            if not stack or s.end <= stack[-1].end:
                stack.append(s)
                lane.append(s)
                break
        else:
            lanes.append([s])
            stacks.append([s])
    return lanes


def build_trace(
    records: Sequence[tuple],
    extra: Sequence[dict[str, Any]],
    reports: Sequence[Any],
    ncpus: int,
    sym,
    title: str,
    metadata: dict[str, Any] | None = None,
    window: tuple[int, int] | None = None,
    patcher: int = 0,
) -> dict[str, Any]:
    """The trace-event JSON object of one run. `records` are the machine's trace records in order,
    `extra` the replay recorder's events (violations, site executions), `reports` the patcher's
    PatchReports; `window` (start, end) keeps only what happens in it, clipping slices to it."""
    b = _Builder(ncpus, patcher, sym)
    t0 = records[0][0] if records else 0
    b.start_workloads(t0)
    for rec in records:
        if 0 <= rec[1] < ncpus or rec[2] in ("write", "ipi-send"):
            b.record(rec)
        else:
            b.last = max(b.last, rec[0])
    for d in extra:
        b.extra(d)
    b.phases(reports)
    end = b.last
    for c in range(ncpus):
        b.close_all(c, end, "still running when the trace ends")
        b.end_workload(c, end)
    lo, hi = window if window is not None else (t0, end)
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": _PID, "name": "process_name", "args": {"name": title}},
    ]
    for c in range(ncpus + 1):  # the CPUs, then the patcher's steps (pseudo-CPU `ncpus`)
        cpu_slices = [
            Slice(s.cpu, max(s.start, lo), min(s.end, hi), s.name, s.args, s.seq)
            for s in b.slices
            if s.cpu == c and s.end >= lo and s.start <= hi
        ]
        for k, lane in enumerate(_lanes(cpu_slices) or [[]]):
            tid = c + 1 + 1000 * k
            base = f"cpu{patcher} patcher steps" if c == ncpus else f"cpu{c}" + (" (patcher)" if c == patcher else "")
            name = base + (f" +{k}" if k else "")
            events.append({"ph": "M", "pid": _PID, "tid": tid, "name": "thread_name", "args": {"name": name}})
            events.append(
                {"ph": "M", "pid": _PID, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}}
            )
            for s in lane:
                ev = {
                    "ph": "X",
                    "pid": _PID,
                    "tid": tid,
                    "ts": _us(s.start),
                    "dur": _us(s.end - s.start),
                    "name": s.name,
                }
                if s.args:
                    ev["args"] = s.args
                events.append(ev)
    events += [e for e in b.counters + b.instants if lo / 1000 <= e["ts"] <= hi / 1000]
    other = {"time_axis": "1 ns on the axis = 1 simulated cycle", "window_cycles": [lo, hi]}
    other.update(metadata or {})
    return {"traceEvents": events, "otherData": other}


def write_trace(path: Path, trace: dict[str, Any]) -> Path:
    """Write `trace` to `path` whole (a temporary file in the same directory, renamed into place)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise ConfigError(f"cannot write the Perfetto trace {path}: {err}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            json.dump(trace, fh, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
