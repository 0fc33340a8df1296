"""The safety oracle: an observer of the machine that judges every run (DESIGN.md section 4).

It watches what each CPU executes at the patchable sites, every text write, every serializing event
and every crash, and it is told when patch operations start and end. It is not part of the
machinery: it only observes, and a run's verdict is the list of what it saw go wrong.

Classes
-------
torn-fetch              a CPU executed site bytes that are neither the old instruction, nor the new
                        one, nor an int3 followed by either tail
unsynced-modification   a CPU executed a site whose bytes changed since it last executed a
                        serializing instruction (iretq, cpuid; not an event delivery), even if the
                        bytes decode cleanly. Which changes count depends on the cross-modifying-code
                        rule (`xmc_rule`, below)
crash                   any fault of a CPU
unhandled-int3          an int3 the #BP handler could not attribute (the kernel would die)
stale-after-completion  a CPU executed a transitional or old instruction after the operation returned
missed-call             a traced call that did not reach a tracer: counted when skip mode drops a
                        call -> call site, and when a tracer (or a static call's target) saw fewer
                        calls than were executed
extra-call              a tracer (or a static call's target) saw more calls than CPUs executed
branch-miscount         a jump label's branch ran, on a CPU, a different number of times than that
                        CPU executed the site as its jmp (a jmp fetched, or an int3 the #BP handler
                        emulated as the jmp): the C kernel's per-CPU, per-key counts
nmi-corruption, lost-nmi  the NMI classes (see `textpoke.nmi_oracle`)
sls-exposure            a CPU executed a `ret` that a patch left at the start of a longer site with
                        bytes other than int3 behind it (a static call set to NULL without Linux's
                        int3 padding). Nothing goes wrong architecturally, but a CPU may run the bytes
                        after a `ret` under straight-line speculation (SLS), and these are the old
                        instruction's tail: a gadget the patch created. Linux pads with int3 (5.17 on)
                        for that reason. The model executes architecturally only, so this class flags
                        the exposure, not a speculative execution; `sls_check=False` turns it off.

Cross-modifying-code rules
--------------------------
linux (default)  the rule text_poke_bp relies on: an int3 written over a site's first byte, and then
                 the new first byte, may be executed without serializing (an informal vendor
                 assurance, not in the SDM); so an int3 execution is never flagged, and a site counts
                 as modified only when bytes other than the first changed.
sdm              the SDM's cross-modifying-code algorithm: every executing CPU serializes before it
                 runs modified code, with no exemption. Any change counts, and any execution of a
                 modified site is flagged, int3 included. text_poke_bp itself breaks this rule.
coherent         looser than both, the assumption of patching schemes that predate text_poke_bp (such
                 as stop_machine-era ftrace): instruction fetch is coherent with other CPUs' stores,
                 so a write reaches every CPU's decoded copies at once (the machine's snoop delay is
                 0) and no serialization is ever needed; only the bytes a CPU executes are judged
                 (a torn fetch, a crash), never the lack of a serializing instruction.
The CPU that wrote is exempt under the first two: text_poke ends with a serializing CR3 write.

Accounting: every call of a traced function runs its site exactly once, so after a drained run the
number of site executions per CPU and function equals the workload's plus the NMI handler's own
counts of calls, and the calls each tracer counted equal the executions whose effective instruction
was a call to it. In a kernel built from the user's objects the compiled code keeps no counts of its
own, so only the second equation is checked: each tracer's per-CPU, per-site count against the site
executions that called it. Only the sites the machine watched are reconciled (a run watches the
sites of its client). The C kernel's jump labels count the executions that took their jmp, per CPU
and key: that count equals the executions of the site whose effective instruction was the jmp.

Static calls (the C kernel's sc0..sc7): each target function counts its calls per CPU, and that count
must equal the executions of the static call's sites and trampoline whose effective instruction
called or jumped to it -- the bytes executed, or, for an int3, the instruction the #BP handler
emulates (the operation's new one). A `ret` or nop calls nothing. Only static calls whose every site
was watched from the first site execution on are checked (their executions were all seen); and the
returns counted after the plain call sites must equal those sites' executions (every call returned).
"""

from __future__ import annotations

import bisect
import struct
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from cpus import ConfigError, Crash, Machine, SnoopModel
from cpus.disasm import describe

from .image import C_NR_SC, C_NR_SC_TARGETS, KPROBE_MAX, KernelImage, Percpu

__all__ = ["CLASSES", "COUNTED", "XMC_RULES", "FirstViolation", "SafetyOracle", "Verdict", "Violation", "snoop_for"]

CLASSES = (
    "torn-fetch",
    "unsynced-modification",
    "crash",
    "unhandled-int3",
    "stale-after-completion",
    "nmi-corruption",
    "lost-nmi",
    "missed-call",
    "extra-call",
    "branch-miscount",
    "sls-exposure",
)
#: classes that are counted, and are violations only where the scenario says the call must not drop
COUNTED = ("missed-call", "extra-call")
INT3 = 0xCC
RET = 0xC3
#: cross-modifying-code rules the oracle can judge by (see the module docstring)
XMC_RULES = ("linux", "sdm", "coherent")
_MAX_KEPT = 50  # violations kept with details per class (all are counted)


@dataclass(slots=True)
class _Context:
    vector: int
    rip: int
    rsp: int
    rflags: int
    stack: bytes  # words above the interrupted RSP, when they belong to the interrupted context


_STACK_WORDS = 16
_FLAGS_COMPARED = 0xCD5  # CF PF AF ZF SF DF OF TF-less: the arithmetic flags and DF, IF


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    cpu: int
    time: int
    site: int | None
    code: bytes
    disassembly: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["code"] = self.code.hex(" ")
        d["site"] = None if self.site is None else hex(self.site)
        return d


@dataclass
class Verdict:
    seed: int
    trace_hash: str
    violations: list[Violation] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    accounting: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    #: why the run has no full verdict (a patch operation ran out of its cycle budget while still
    #: making progress, or the emulator hit a limit: `on_limit`); what was seen before that is
    #: kept, nothing after it is judged
    incomplete: str | None = None
    by_cpu: Counter = field(default_factory=Counter)  # cpu -> violation events

    @property
    def failed_classes(self) -> list[str]:
        return [k for k in CLASSES if self.counts.get(k)]

    @property
    def ok(self) -> bool:
        return not self.counts

    def summary(self) -> str:
        if self.incomplete and self.ok:
            return f"seed {self.seed}: incomplete, {self.incomplete} (trace {self.trace_hash})"
        if self.ok:
            return f"seed {self.seed}: ok (trace {self.trace_hash})"
        parts = ", ".join(f"{k} x{self.counts[k]}" for k in self.failed_classes)
        return f"seed {self.seed}: {parts} (trace {self.trace_hash})"


def snoop_for(xmc_rule: str, snoop: SnoopModel) -> SnoopModel:
    """The machine's snoop model a rule judges: `coherent` assumes fetch coherent with stores, so
    every write reaches every decoded copy at once; the other rules keep `snoop`."""
    return SnoopModel(0, 0) if xmc_rule == "coherent" else snoop


class FirstViolation(Exception):
    """Raised through the machine at the first violation when the oracle stops there: the run ends
    at that instant (the hooks carry it out of the engine, as any hook's exception)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"stopped at the first violation ({kind})")
        self.kind = kind


class SafetyOracle:
    """Instrument of the machine and listener of the patcher.

    With `stop_at_first` the first violation ends the run (`FirstViolation`): whether a seed is
    caught, and by what first, is the same as in the full run, whose prefix it is, and a sweep
    that asks only that no longer pays for the rest of every caught seed (a broken NMI entry
    otherwise runs millions of cycles until the hung patcher's budget runs out)."""

    def __init__(
        self,
        kernel: KernelImage,
        ncpus: int,
        xmc_rule: str = "linux",
        sls_check: bool = True,
        stop_at_first: bool = False,
    ) -> None:
        if xmc_rule not in XMC_RULES:
            raise ConfigError(f"unknown cross-modifying-code rule {xmc_rule!r}; choose from {', '.join(XMC_RULES)}")
        self.kernel = kernel
        self.ncpus = ncpus
        self.xmc_rule = xmc_rule
        self.sls_check = sls_check
        self.stop_at_first = stop_at_first
        self.tracers = {
            kernel.symbols["ftrace_caller"]: "ftrace_caller",
            kernel.symbols["ftrace_caller_alt"]: "ftrace_caller_alt",
        }
        self.unhandled_lo = kernel.symbols["bp_unhandled"]
        self.unhandled_hi = self.unhandled_lo + kernel.sizes["bp_unhandled"]
        self.mem: dict[int, bytes] = dict(kernel.patchable)
        self.stable: dict[int, bytes] = dict(self.mem)
        self.active: dict[int, tuple[bytes, bytes]] = {}
        self._legal: dict[int, frozenset[bytes]] = {}  # per active site: the bytes a fetch may see
        self._effects: dict[tuple[int, bytes], tuple[str | None, int | None, bool]] = {}
        self.finished: dict[int, tuple[bytes, bytes, int]] = {}
        self.skip_mode = False
        self.dirty: defaultdict[int, set[int]] = defaultdict(set)
        self.violations: list[Violation] = []
        self.counts: Counter = Counter()
        self.by_cpu: Counter = Counter()  # cpu -> violation events
        self.fetches: Counter = Counter()  # (cpu, site) -> executions
        self.traced: Counter = Counter()  # (cpu, site, tracer) -> executions that call the tracer
        self.int3_hits: Counter = Counter()  # cpu -> site executions that trapped
        #: the C kernel's jump labels: site -> per-CPU offset of its branch-taken counter
        self.jump_counters: dict[int, int] = kernel.jump_label_counters
        self.jumped: Counter = Counter()  # (cpu, site) -> executions whose effective instruction was the jmp
        self.ops = 0
        self.sinks: list = []  # called with every violation kept (replay listings)
        # NMI verdicts: per CPU, the contexts interrupted by events not yet returned from
        self.contexts: defaultdict[int, list[_Context]] = defaultdict(list)
        self.pending_nmi: dict[int, int] = {}  # cpu -> time of an NMI no handler run has started for
        self.repeat_starts = {
            a for n, a in kernel.symbols.items() if n.startswith("repeat_nmi") and not n.startswith("repeat_nmi_copy")
        }
        self.machine: Machine | None = None
        # probes (a kernel built with kprobes): executions of probe sites that trapped or jumped
        self.probe_sites = frozenset(a for a, _n in kernel.kprobe_points) | frozenset(
            a for a, _n in kernel.optprobe_ranges
        )
        self.probe_execs: Counter = Counter()  # cpu -> probe-site executions that reach a callback
        self.slot_areas = tuple(
            (kernel.symbols[n], kernel.symbols[n] + kernel.sizes[n])
            for n in ("kprobe_insn_slots", "optprobe_insn_slots")
            if n in kernel.symbols
        )
        self._site_starts = sorted(self.mem)
        self.nmi_counts: Counter = Counter()
        self.incomplete: str | None = None  # set when an operation is abandoned before its end
        # static calls (C kernel): target function -> its counter index; (cpu, target) -> entries
        self.sc_targets: dict[int, int] = {}
        if kernel.config.kernel == "c":
            for k in range(C_NR_SC):
                for j in range(C_NR_SC_TARGETS):
                    addr = kernel.symbols.get(f"sct_{k}_{j}")
                    if addr is not None:
                        self.sc_targets[addr] = k * C_NR_SC_TARGETS + j
        self.sc_entries: Counter = Counter()
        self._watched_from_start: frozenset[int] | None = None

    def attach(self, m: Machine) -> None:
        """Give the oracle the machine it judges (stack snapshots) and the handler probe."""
        self.machine = m
        m.probe(self.kernel.symbols["nmi_handler"], "nmi_handler")

    # -- reporting ---------------------------------------------------------------------------------
    def _flag(self, kind: str, cpu: int, time: int, site: int | None, code: bytes, detail: str) -> None:
        if self.incomplete is not None:
            return  # an abandoned operation: what follows is not the protocol's doing
        self.counts[kind] += 1
        self.by_cpu[cpu] += 1
        if sum(1 for v in self.violations if v.kind == kind) < _MAX_KEPT:
            where = site if site is not None else 0
            v = Violation(kind, cpu, time, site, code, describe(code, where) if code else "", detail)
            self.violations.append(v)
            for sink in self.sinks:
                sink(v)
        if self.stop_at_first:
            raise FirstViolation(kind)

    # -- patcher listener --------------------------------------------------------------------------
    def on_op_start(self, op, time: int) -> None:
        self.skip_mode = op.skip_mode
        self.ops += 1
        for r in op.requests:
            self.active[r.site] = (r.old, r.new)
            # what a fetch may see meanwhile: either version, or either with the int3 in front
            self._legal[r.site] = frozenset((r.old, r.new, bytes([INT3]) + r.old[1:], bytes([INT3]) + r.new[1:]))
            self.finished.pop(r.site, None)

    def on_op_end(self, op, time: int) -> None:
        for r in op.requests:
            self.active.pop(r.site, None)
            self.stable[r.site] = r.new
            self.finished[r.site] = (r.old, r.new, time)

    def on_op_hang(self, op, time: int, why: str) -> None:
        self._flag("crash", 0, time, None, b"", f"patch operation hung: {why}")

    def on_op_incomplete(self, op, time: int, why: str) -> None:
        self.incomplete = why

    def on_limit(self, cpu: int, time: int, why: str) -> None:
        """The machine met a limit of the emulator (cpus: `Instrument.on_limit`): what follows
        cannot be judged, and the run is incomplete rather than safe or unsafe."""
        if self.incomplete is None:
            self.incomplete = why

    # -- machine instrument ------------------------------------------------------------------------
    def on_text_write(self, cpu: int, time: int, addr: int, data: bytes) -> None:
        for site, cur in self.mem.items():
            n = len(cur)
            if addr < site + n and site < addr + len(data):
                new = bytearray(cur)
                for i, b in enumerate(data):
                    j = addr + i - site
                    if 0 <= j < n:
                        new[j] = b
                new_b = bytes(new)
                modified = (new_b != cur) if self.xmc_rule == "sdm" else (new_b[1:] != cur[1:])
                if modified and self.xmc_rule != "coherent":
                    for c in range(self.ncpus):
                        if c != cpu:
                            self.dirty[c].add(site)
                # a CPU's own store is coherent with its own instruction fetch (self-modifying code)
                self.dirty[cpu].discard(site)
                self.mem[site] = new_b

    def on_serialize(self, cpu: int, time: int) -> None:
        d = self.dirty.get(cpu)
        if d:
            d.clear()

    def on_fetch(self, cpu: int, time: int, site: int, code: bytes) -> None:
        if self._watched_from_start is None and self.machine is not None:
            self._watched_from_start = self.machine.watched
        self.fetches[(cpu, site)] += 1
        first = code[0]
        act = self.active.get(site)
        if first == INT3 and self.xmc_rule == "sdm" and site in self.dirty.get(cpu, ()):
            self._flag(
                "unsynced-modification",
                cpu,
                time,
                site,
                code,
                "executed (an int3) after its bytes changed without a serializing instruction since (SDM rule)",
            )
        # what the execution does for the tracers and the jump labels' branches
        if site in self.probe_sites and first in (INT3, 0xE9):
            self.probe_execs[cpu] += 1  # a trap (kprobe, descriptor, retry) or the jmp to a detour
        if first == INT3:
            self.int3_hits[cpu] += 1
            if act is not None:
                old, new = act
                if self.skip_mode:
                    if old[0] == 0xE8 and new[0] == 0xE8:
                        self._flag("missed-call", cpu, time, site, code, "int3 skipped a call -> call site")
                else:
                    self._count_call(cpu, site, new)
        else:
            self._count_call(cpu, site, code)
            if first == RET and self.sls_check and code[1:].strip(b"\xcc"):
                self._flag(
                    "sls-exposure",
                    cpu,
                    time,
                    site,
                    code,
                    f"a `ret` followed by {code[1:].hex(' ')}, not int3: straight-line speculation runs them",
                )
            if site in self.dirty.get(cpu, ()):
                self._flag(
                    "unsynced-modification",
                    cpu,
                    time,
                    site,
                    code,
                    "executed after its bytes changed without a serializing instruction since",
                )
        # legality of the bytes
        if act is not None:
            old, new = act
            if code not in self._legal[site]:
                self._flag("torn-fetch", cpu, time, site, code, f"during the patch {old.hex()} -> {new.hex()}")
            return
        if code == self.stable[site]:
            return
        fin = self.finished.get(site)
        if fin is not None:
            old, new, end = fin
            transitional = (old, bytes([INT3]) + old[1:], bytes([INT3]) + new[1:])
            if code in transitional:
                if time > end:
                    self._flag(
                        "stale-after-completion",
                        cpu,
                        time,
                        site,
                        code,
                        f"operation ended at t={end}; the site should be {new.hex(' ')}",
                    )
                return
        self._flag("torn-fetch", cpu, time, site, code, f"expected {self.stable[site].hex(' ')}")

    def _count_call(self, cpu: int, site: int, insn: bytes) -> None:
        effect = self._effects.get((site, insn))
        if effect is None:
            effect = self._effects[(site, insn)] = self._effect(site, insn)
        tracer, sc_target, jumps = effect
        if tracer:
            self.traced[(cpu, site, tracer)] += 1
        if sc_target is not None:
            self.sc_entries[(cpu, sc_target)] += 1
        if jumps:
            self.jumped[(cpu, site)] += 1

    def _effect(self, site: int, insn: bytes) -> tuple[str | None, int | None, bool]:
        """What executing `insn` at `site` counts: the tracer it calls, the static-call target it
        enters, whether it takes a jump label's branch (kept per site and bytes: a sweep executes
        the same few thousands of times)."""
        tracer = sc_target = None
        if insn[0] in (0xE8, 0xE9) and len(insn) == 5:
            target = (site + 5 + struct.unpack("<i", insn[1:])[0]) & (2**64 - 1)
            tracer = self.tracers.get(target) if insn[0] == 0xE8 else None
            if target in self.sc_targets:
                sc_target = target
        return tracer, sc_target, insn[0] in (0xEB, 0xE9) and site in self.jump_counters

    # -- NMI verdicts --------------------------------------------------------------------------------
    def _nmi_stack(self, cpu: int) -> tuple[int, int]:
        lay = self.machine.layout  # type: ignore[union-attr]
        top = lay.nmi_stack_top(cpu)
        return top - 0x1000, top

    def on_deliver(self, cpu: int, time: int, vector: int, frame: tuple[int, ...]) -> None:
        rip, _cs, rflags, rsp, _ss = frame
        stack = b""
        if vector == 2:
            self.nmi_counts["delivered"] += 1
            if cpu not in self.pending_nmi:
                self.pending_nmi[cpu] = time
            if any(c.vector == 2 for c in self.contexts[cpu]):
                self.nmi_counts["nested"] += 1
            if self.machine is not None:
                lo, hi = self._nmi_stack(cpu)
                if not lo <= rsp < hi:
                    try:
                        stack = self.machine.read(rsp, 8 * _STACK_WORDS)
                    except Exception:
                        stack = b""
        self.contexts[cpu].append(_Context(vector, rip, rsp, rflags, stack))

    def on_probe(self, cpu: int, time: int, label: str) -> None:
        if label == "nmi_handler":
            self.nmi_counts["handler_runs"] += 1
            self.pending_nmi.pop(cpu, None)

    def on_iret(self, cpu: int, time: int, frame: tuple[int, ...], unblocked: bool) -> None:
        rip, _cs, rflags, rsp, _ss = frame
        self._check_landing(cpu, time, rip)
        stack = self.contexts.get(cpu)
        if not stack:
            return
        top = stack[-1]
        if rip in self.repeat_starts and not (top.rip == rip and top.rsp == rsp):
            self.nmi_counts["repeated"] += 1
            return  # the nested-safe entry's trampoline: the outer NMI runs its handler again
        ctx = stack.pop()
        if ctx.vector != 2:
            return  # #BP returns where its handler decided; IPIs are checked through the NMIs
        bad = []
        if rip != ctx.rip:
            bad.append(f"RIP {rip:#x} instead of {ctx.rip:#x}")
        if rsp != ctx.rsp:
            bad.append(f"RSP {rsp:#x} instead of {ctx.rsp:#x}")
        if (rflags ^ ctx.rflags) & _FLAGS_COMPARED:
            bad.append(f"RFLAGS {rflags:#x} instead of {ctx.rflags:#x}")
        if ctx.stack and self.machine is not None:
            now = self.machine.read(ctx.rsp, len(ctx.stack))
            changed = [i for i in range(0, len(now), 8) if now[i : i + 8] != ctx.stack[i : i + 8]]
            if changed:
                bad.append(f"{len(changed)} stack word(s) above the interrupted RSP changed")
        if bad:
            self._flag("nmi-corruption", cpu, time, None, b"", "NMI returned with " + "; ".join(bad))
        if not any(c.vector == 2 for c in stack) and cpu in self.pending_nmi:
            since = self.pending_nmi.pop(cpu)
            self._flag(
                "lost-nmi",
                cpu,
                time,
                None,
                b"",
                f"an NMI delivered at t={since} was never handled: the CPU left NMI context without "
                "running the handler again",
            )

    def _check_landing(self, cpu: int, time: int, rip: int) -> None:
        """A return strictly inside a site whose bytes after the first changed since boot lands in
        the middle of a new instruction (an optprobe's jmp written while a CPU was interrupted in
        the range it replaces): the CPU executes the tail of that instruction as code."""
        i = bisect.bisect_right(self._site_starts, rip) - 1
        if i < 0:
            return
        site = self._site_starts[i]
        cur = self.mem[site]
        if site < rip < site + len(cur) and cur[1:] != self.kernel.patchable[site][1:]:
            code = cur[rip - site :]
            self._flag(
                "torn-fetch",
                cpu,
                time,
                site,
                cur,
                f"returned to {rip:#x}, inside the site (+{rip - site}), which now holds {cur.hex(' ')}: "
                f"the CPU runs {code.hex(' ')} as an instruction",
            )

    def on_crash(self, crash: Crash) -> None:
        if self.unhandled_lo <= crash.rip < self.unhandled_hi:
            # the trapping address is in the #BP frame: the last int3 delivery of that CPU
            traps = [r for r in crash.tail if r[2] == "deliver" and r[3] == 3]
            site = traps[-1][4] - 1 if traps else None
            code = self.mem.get(site, b"") if site is not None else b""
            why = "the #BP handler found no descriptor for this int3 (the kernel would die)"
            if site is not None and any(lo <= site < hi for lo, hi in self.slot_areas):
                why = "a CPU ran a freed out-of-line slot (its int3 poison): the slot was freed while in use"
            self._flag("unhandled-int3", crash.cpu, crash.time, site, code, why)
        else:
            self._flag("crash", crash.cpu, crash.time, None, crash.code, f"{crash.reason} at {crash.rip:#x}")

    # -- end of run --------------------------------------------------------------------------------
    def reconcile(self, m: Machine) -> dict[str, Any]:
        """Compare what the CPUs executed with what the workloads and tracers counted."""
        k = self.kernel
        rows = []
        exact = True
        if self._watched_from_start is None:
            self._watched_from_start = m.watched
        watched = self._watched_from_start
        for cpu in m.cpus:
            if cpu.crash is not None:
                continue
            calls = fetched = ft = ft_alt = exp_ft = exp_alt = taken = exp_taken = 0
            for site, offset in self.jump_counters.items():
                if site not in watched:
                    continue
                got, want = m.percpu(cpu.index, offset), self.jumped[(cpu.index, site)]
                taken += got
                exp_taken += want
                if got != want:
                    exact = False
                    self._flag(
                        "branch-miscount",
                        cpu.index,
                        cpu.clock,
                        site,
                        b"",
                        f"the branch ran {got} times; the site executed its jmp {want} times",
                    )
            for i, site in enumerate(k.site_table):
                if site not in watched:
                    continue  # not observed (another client's run): its executions were not seen
                f = self.fetches[(cpu.index, site)]
                if k.user_code:
                    # compiled code counts nothing itself: each execution of a site is one call
                    wl, nm = f, 0
                else:
                    wl = m.percpu(cpu.index, Percpu.WL_COUNT + 8 * i)
                    nm = m.percpu(cpu.index, Percpu.NMI_CALLS + 8 * i)
                a = m.percpu(cpu.index, Percpu.FT_COUNT + 8 * i)
                b = m.percpu(cpu.index, Percpu.FT_ALT_COUNT + 8 * i)
                ea = self.traced[(cpu.index, site, "ftrace_caller")]
                eb = self.traced[(cpu.index, site, "ftrace_caller_alt")]
                calls += wl + nm
                fetched += f
                ft += a
                ft_alt += b
                exp_ft += ea
                exp_alt += eb
                for got, want in ((a, ea), (b, eb)):
                    if got < want:
                        self._flag("missed-call", cpu.index, cpu.clock, site, b"", f"tracer saw {got} of {want}")
                    elif got > want:
                        self._flag("extra-call", cpu.index, cpu.clock, site, b"", f"tracer saw {got}, ran {want}")
                if (site in watched and f != wl + nm) or a != ea or b != eb:
                    exact = False  # (a site nobody watched was not counted: only the tracers compare)
            probe = {}
            if self.probe_sites:
                # every trap on a probe site ran a callback (the kprobe handler's, or the detour's
                # after a descriptor emulated the jmp) or was sent back (retry); every jmp ran one
                hits = sum(m.percpu(cpu.index, Percpu.KP_HITS + 8 * i) for i in range(KPROBE_MAX))
                retry = m.percpu(cpu.index, Percpu.KP_RETRY)
                want = self.probe_execs[cpu.index]
                if hits + retry < want:
                    self._flag("missed-call", cpu.index, cpu.clock, None, b"", f"probe callbacks {hits} + retries "
                               f"{retry} for {want} trapped or jumped probe-site executions")  # fmt: skip
                elif hits + retry > want:
                    self._flag("extra-call", cpu.index, cpu.clock, None, b"", f"probe callbacks {hits} + retries "
                               f"{retry} for {want} trapped or jumped probe-site executions")  # fmt: skip
                if hits + retry != want:
                    exact = False
                probe = {"probe_hits": hits, "probe_retries": retry, "probe_executions": want}
            row = {
                **probe,
                "cpu": cpu.index,
                "calls": calls,
                "site_executions": fetched,
                "int3_hits": self.int3_hits[cpu.index],
                "ftrace_caller": ft,
                "ftrace_caller_expected": exp_ft,
                "ftrace_caller_alt": ft_alt,
                "ftrace_caller_alt_expected": exp_alt,
                "branches_taken": taken,
                "branches_taken_expected": exp_taken,
            }
            if self.sc_targets:
                sc = self._reconcile_static_calls(m, cpu.index)
                exact = exact and sc.pop("exact")
                row |= sc
            rows.append(row)
        return {"exact": exact, "per_cpu": rows}

    def _static_calls_checked(self) -> list[tuple[int, list[int], list[int]]]:
        """(index, call sites, every site and the trampoline) of each static call whose sites were
        all watched from the first site execution on (so every execution of them was seen)."""
        k = self.kernel
        watched = self._watched_from_start or frozenset()
        tramps = k.static_call_trampolines
        out = []
        for i in range(C_NR_SC):
            name = f"sc{i}"
            if name not in tramps:
                continue
            calls = [c.addr for c in k.static_calls if c.name == name and not c.tail]
            every = [c.addr for c in k.static_calls if c.name == name] + [tramps[name]]
            if all(s in watched for s in every):
                out.append((i, calls, every))
        return out

    def _reconcile_static_calls(self, m: Machine, cpu: int) -> dict[str, Any]:
        """Each checked static call's targets' counts against the executions that entered them, and
        its call sites' returns against their executions."""
        got_all = want_all = returns_all = call_execs = 0
        exact = True
        for i, calls, _every in self._static_calls_checked():
            for j in range(C_NR_SC_TARGETS):
                name = f"sct_{i}_{j}"
                addr = self.kernel.symbols[name]
                got = m.percpu(cpu, Percpu.SC_COUNT + 8 * (i * C_NR_SC_TARGETS + j))
                want = self.sc_entries[(cpu, addr)]
                got_all += got
                want_all += want
                if got < want:
                    self._flag("missed-call", cpu, m.cpus[cpu].clock, None, b"", f"{name} saw {got} of {want} calls")
                elif got > want:
                    self._flag("extra-call", cpu, m.cpus[cpu].clock, None, b"", f"{name} saw {got}, entered {want}")
                exact = exact and got == want
            returns = m.percpu(cpu, Percpu.SC_RETURNS + 8 * i)
            execs = sum(self.fetches[(cpu, s)] for s in calls)
            returns_all += returns
            call_execs += execs
            exact = exact and returns == execs
        return {
            "exact": exact,
            "static_call_targets": got_all,
            "static_call_targets_expected": want_all,
            "static_call_returns": returns_all,
            "static_call_site_executions": call_execs,
        }

    def verdict(self, m: Machine, seed: int, drained: bool) -> Verdict:
        self.stop_at_first = False  # the accounting below judges a finished run: nothing to stop
        accounting = self.reconcile(m) if drained and self.incomplete is None else {"exact": None, "per_cpu": []}
        verdict = Verdict(
            seed, m.trace_hash, list(self.violations), Counter(self.counts), accounting, by_cpu=Counter(self.by_cpu)
        )
        verdict.incomplete = self.incomplete
        return verdict
