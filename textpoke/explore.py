"""Exhaustive exploration of small configurations: every interleaving, as a state graph.

Random seeds find failures; this proves their absence for a small configuration (a patcher, one or
two workload CPUs, one or two sites) by enumerating every interleaving of:

* the patcher's protocol steps -- the very step sequences of `textpoke.protocols`, mutations included;
* each workload CPU executing a site (with what its decoded copy holds), trapping on an int3 and
  returning from the handler, taking a sync IPI, entering and leaving the stop_machine stopper --
  where only serializing instructions drop stale copies: the #BP handler's `iretq`, the sync IPI
  handler's `cpuid` (do_sync_core's sync_core, before it acknowledges) and the stopper's exit `cpuid`;
  entering a handler (event delivery) does not serialize;
* each text write reaching each CPU's decoded copy on its own (byte-granular snoops), as the
  machine's coherence model does.

It is a faithful *abstract* model of the same steps, not the emulator: Unicorn context save/restore
could snapshot a machine, but a state would then be megabytes of CPU and memory state in which the
interleavings that matter (which write reached which copy, who has serialized) are buried among
millions of irrelevant instruction-level differences; the abstract state keeps exactly those, so the
graph stays small enough to be complete. The rules are the ones the machine and the oracle use
(`cpus.coherence`, `textpoke.oracle`), and the tests check that the explorer's verdicts agree with the
random sweeps on the emulator.

The state graph is a networkx DiGraph; a violation is reported with the shortest path to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import networkx as nx

from .image import FTRACE_NOP
from .protocols import (
    ModCode,
    PatchRequest,
    Poke,
    Publish,
    Release,
    Rendezvous,
    Step,
    Sync,
    Withdraw,
    build,
)

__all__ = ["ExploreResult", "explore"]

INT3 = 0xCC
# modes of a workload CPU
RUN, TRAP, STOPPED = "run", "int3", "stopped"


@dataclass(frozen=True, slots=True)
class Worker:
    mode: str
    copies: tuple  # per site: None, or (bytes, frozenset of step indices of writes not yet snooped)
    dirty: frozenset  # sites modified (per the xmc rule) since this CPU last serialized
    ipi: bool  # a sync IPI is pending
    stop: bool  # a stopper IPI is pending
    nmi: str = ""  # "", "entry" (delivered, not yet counted in nmi_running), "counted" (in the handler)
    nmis: int = 0  # NMIs that may still arrive on this CPU


@dataclass(frozen=True, slots=True)
class State:
    pc: int  # next protocol step
    waiting: frozenset  # CPUs the patcher waits for (sync, rendezvous, release)
    published: bool  # the #BP descriptors are live
    released: bool  # stop_machine released the stopped CPUs
    mem: tuple  # bytes of each site
    workers: tuple
    violation: str | None = None
    sub: int = 0  # stop-machine-ftrace: where the modifier is inside the current ModCode
    flag: bool = False  # the write flag of nmi_running: a write is pending for NMIs
    running: int = 0  # NMIs counted into nmi_running


@dataclass
class ExploreResult:
    protocol: str
    mutation: str | None
    cpus: int
    sites: int
    states: int
    transitions: int
    complete: bool  # False when the state bound cut the exploration
    violations: dict[str, list[str]] = field(default_factory=dict)  # class -> shortest path (labels)
    graph: nx.DiGraph | None = None
    scope: str = ""  # what was explored, for the report

    @property
    def safe(self) -> bool:
        return not self.violations

    def report(self) -> str:
        scope = self.scope or f"{self.cpus} workload CPU(s), {self.sites} site(s)"
        head = (
            f"{self.protocol}{' + ' + self.mutation if self.mutation else ''}: {scope}: "
            f"{self.states} states, {self.transitions} transitions"
            + ("" if self.complete else " (bound reached: not complete)")
        )
        if self.safe:
            return head + "\nno unsafe state is reachable" + ("" if self.complete else " within the bound")
        out = [head]
        for kind, path in self.violations.items():
            out.append(f"\nshortest path to {kind} ({len(path)} steps):")
            out += [f"  {i + 1:>3}. {label}" for i, label in enumerate(path)]
        return "\n".join(out)


class _Model:
    def __init__(
        self,
        steps: tuple[Step, ...],
        requests: tuple[PatchRequest, ...],
        ncpus: int,
        xmc_rule: str = "linux",
        nmis: int = 0,
    ) -> None:
        self.steps = steps
        self.reqs = requests
        self.sites = [r.site for r in requests]
        self.ncpus = ncpus
        self.sdm = xmc_rule == "sdm"
        self.nmis = nmis
        self.count_at_delivery = False  # an NMI counts itself in as it is delivered (no entry window)

    def site_name(self, i: int) -> str:
        return f"site{i}"

    # -- helpers ---------------------------------------------------------------------------------
    def _index(self, site: int) -> int:
        return self.sites.index(site)

    def initial(self) -> State:
        mem = tuple(r.old for r in self.reqs)
        copies = tuple((r.old, frozenset()) for r in self.reqs)
        w = Worker(RUN, copies, frozenset(), False, False, nmis=self.nmis)
        return State(0, frozenset(), False, False, mem, (w,) * self.ncpus)

    @staticmethod
    def _serialize(w: Worker) -> Worker:
        copies = tuple(None if c is not None and c[1] else c for c in w.copies)
        return replace(w, copies=copies, dirty=frozenset())

    def _set(self, s: State, i: int, w: Worker, **kw) -> State:
        workers = (*s.workers[:i], w, *s.workers[i + 1 :])
        return replace(s, workers=workers, violation=kw.pop("violation", None), **kw)

    def _span(self, wid) -> tuple[int, int]:
        """Bytes [lo, hi) of the site a write touched: a Poke step's index, or (tag, ..., lo, hi)."""
        if isinstance(wid, int):
            step = self.steps[wid]
            return step.offset, step.offset + len(step.data)
        return wid[-2], wid[-1]

    @staticmethod
    def _write_name(wid) -> str:
        if isinstance(wid, int):
            return f"step {wid + 1}"
        if wid[0] == "m":
            return f"cpu0's bytes {wid[-2]}..{wid[-1] - 1}"
        return f"cpu{wid[1] + 1}'s NMI"

    def _write(self, s: State, k: int, lo: int, data: bytes, wid, writer: int | None) -> tuple[tuple, tuple]:
        """Memory and workers after a store of `data` at site k + lo by `writer` (a worker index, or
        None for the patcher): the writer's own fetch is coherent with its store; every other copy
        misses the write until a snoop or a serializing event; a changed tail dirties the others."""
        old = s.mem[k]
        new = bytearray(old)
        new[lo : lo + len(data)] = data
        new_b = bytes(new)
        mem = (*s.mem[:k], new_b, *s.mem[k + 1 :])
        tail_changed = new_b != old if self.sdm else new_b[1:] != old[1:]
        workers = []
        for j, w in enumerate(s.workers):
            copies = list(w.copies)
            if j == writer:
                copies[k] = None
                workers.append(replace(w, copies=tuple(copies), dirty=w.dirty - {k}))
                continue
            c = copies[k]
            if c is not None:
                copies[k] = (c[0], c[1] | {wid})
            dirty = w.dirty | {k} if tail_changed else w.dirty
            workers.append(replace(w, copies=tuple(copies), dirty=dirty))
        return mem, tuple(workers)

    # -- transitions -----------------------------------------------------------------------------
    def successors(self, s: State) -> Iterator[tuple[str, State]]:
        if s.violation:
            return
        yield from self._patcher(s)
        for i, w in enumerate(s.workers):
            yield from self._worker(s, i, w)

    def _patcher(self, s: State) -> Iterator[tuple[str, State]]:
        if s.pc >= len(self.steps) or s.waiting:
            return
        step = self.steps[s.pc]
        nxt = s.pc + 1
        if isinstance(step, Publish):
            yield "cpu0: publishes the #BP descriptors", State(nxt, s.waiting, True, s.released, s.mem, s.workers)
        elif isinstance(step, Poke):
            k = self._index(step.site)
            mem, workers = self._write(s, k, step.offset, step.data, s.pc, None)
            label = f"cpu0: writes {step.data.hex(' ')} at {self.site_name(k)}+{step.offset} ({step.phase})"
            yield label, replace(s, pc=nxt, mem=mem, workers=workers)
        elif isinstance(step, ModCode):
            yield from self._mod_code(s, step, nxt)
        elif isinstance(step, Sync):
            workers = tuple(replace(w, ipi=True) for w in s.workers)
            yield (
                f"cpu0: sends the sync IPIs ({step.label}) and waits",
                replace(s, pc=nxt, waiting=frozenset(range(len(workers))), workers=workers),
            )
        elif isinstance(step, Withdraw):
            if all(w.mode != TRAP for w in s.workers):
                yield "cpu0: withdraws the descriptors", replace(s, pc=nxt, published=False)
        elif isinstance(step, Rendezvous):
            workers = tuple(replace(w, stop=True) for w in s.workers)
            yield (
                "cpu0: wakes every stopper and waits",
                replace(s, pc=nxt, waiting=frozenset(range(len(workers))), released=False, workers=workers),
            )
        elif isinstance(step, Release):
            yield (
                "cpu0: releases the stopped CPUs and waits for them to leave",
                replace(s, pc=nxt, waiting=frozenset(range(len(s.workers))), released=True),
            )

    def _mod_code(self, s: State, step: ModCode, nxt: int) -> Iterator[tuple[str, State]]:
        """do_ftrace_mod_code in five steps: set the flag once no NMI is counted in (cmpxchg), copy 4
        bytes, copy the last byte, clear the flag, wait until no NMI is counted in."""
        k = self._index(step.site)
        name = self.site_name(k)
        if s.sub == 0 and s.running == 0:
            what = "sets the write flag" if step.nmi_write else "publishes no write to NMIs"
            yield f"cpu0: no NMI is running: {what}", replace(s, sub=1, flag=step.nmi_write)
        elif s.sub in (1, 2):
            lo, hi = (0, 4) if s.sub == 1 else (4, 5)
            mem, workers = self._write(s, k, lo, step.data[lo:hi], ("m", s.pc, lo, hi), None)
            label = f"cpu0: writes {step.data[lo:hi].hex(' ')} at {name}+{lo}"
            yield label, replace(s, sub=s.sub + 1, mem=mem, workers=workers)
        elif s.sub == 3:
            yield "cpu0: clears the write flag", replace(s, sub=4, flag=False)
        elif s.sub == 4 and s.running == 0:
            yield "cpu0: no NMI is running: done with the site", replace(s, pc=nxt, sub=0)

    def _nmi(self, s: State, i: int, w: Worker, done: bool) -> Iterator[tuple[str, State]]:
        """NMIs on a workload CPU (stop_machine protocols): delivery (not serializing), ftrace_nmi_enter
        (count in; perform a pending write), the handler executing sites, the return."""
        cpu = f"cpu{i + 1}"
        if w.nmi == "" and w.nmis and w.mode != TRAP:
            w2 = replace(w, nmi="entry", nmis=w.nmis - 1)
            s2 = self._set(s, i, w2)
            if not self.count_at_delivery:
                yield f"{cpu}: an NMI arrives", s2
            else:
                for label, s3 in self._nmi(s2, i, w2, done):
                    yield f"{cpu}: an NMI arrives; " + label.split(": ", 1)[1], s3
        elif w.nmi == "entry":
            if s.flag:
                step = self.steps[s.pc]
                k = self._index(step.site)
                mem, workers = self._write(s, k, 0, step.data, ("n", i, s.pc, 0, 5), i)
                w2 = replace(workers[i], nmi="counted")
                s2 = replace(s, mem=mem, workers=workers, running=s.running + 1)
                label = f"{cpu}: NMI counts itself in; a write is pending: it writes {step.data.hex(' ')} itself"
                yield label, self._set(s2, i, w2)
            else:
                label = f"{cpu}: NMI counts itself in (no write pending)"
                yield label, self._set(s, i, replace(w, nmi="counted"), running=s.running + 1)
        elif w.nmi == "counted":
            for k in range(len(self.sites)):
                c = w.copies[k]
                code = c[0] if c is not None else s.mem[k]
                copies = w.copies if c is not None else (*w.copies[:k], (s.mem[k], frozenset()), *w.copies[k + 1 :])
                w2 = replace(w, copies=copies)
                verdict = self._judge(s, w2, k, code, done)
                label = f"{cpu}: the NMI handler executes {self.site_name(k)}: {code.hex(' ')}"
                if verdict and verdict != "int3":
                    yield label, self._set(s, i, w2, violation=verdict)
                elif c is None:
                    yield label + " (decodes it now)", self._set(s, i, w2)
            w2 = self._serialize(replace(w, nmi=""))
            yield f"{cpu}: NMI counts itself out, iretq (serializing)", self._set(s, i, w2, running=s.running - 1)

    def _worker(self, s: State, i: int, w: Worker) -> Iterator[tuple[str, State]]:
        cpu = f"cpu{i + 1}"
        done = s.pc >= len(self.steps) and not s.waiting
        if self.nmis:
            yield from self._nmi(s, i, w, done)
        if w.nmi:
            pass  # the NMI handler runs; the interrupted code waits
        elif w.mode == RUN:
            for k in range(len(self.sites)):
                c = w.copies[k]
                code = c[0] if c is not None else s.mem[k]
                copies = w.copies if c is not None else (*w.copies[:k], (s.mem[k], frozenset()), *w.copies[k + 1 :])
                w2 = replace(w, copies=copies)
                label = f"{cpu}: executes {self.site_name(k)}: {code.hex(' ')}"
                verdict = self._judge(s, w2, k, code, done)
                if verdict == "int3":
                    trapped = replace(w, mode=TRAP, copies=copies)
                    yield label + " -> int3 trap", self._set(s, i, trapped)
                elif verdict:
                    yield label, self._set(s, i, w2, violation=verdict)
                elif c is None:
                    yield label + " (decodes it now)", self._set(s, i, w2)
            if w.ipi:
                w2 = self._serialize(replace(w, mode=RUN, ipi=False))
                yield (
                    f"{cpu}: takes the sync IPI, serializes (cpuid) and acknowledges",
                    self._set(s, i, w2, waiting=s.waiting - {i}),
                )
            if w.stop:
                w2 = replace(w, mode=STOPPED, stop=False)
                yield f"{cpu}: enters the stopper and acknowledges", self._set(s, i, w2, waiting=s.waiting - {i})
        elif w.mode == TRAP:
            w2 = self._serialize(replace(w, mode=RUN))
            yield f"{cpu}: returns from the int3 handler (iretq, serializing)", self._set(s, i, w2)
        elif w.mode == STOPPED and s.released:
            w2 = self._serialize(replace(w, mode=RUN))
            yield f"{cpu}: leaves the stopper (cpuid, serializing)", self._set(s, i, w2, waiting=s.waiting - {i})
        # snoops: a write reaches this CPU's copy
        for k, c in enumerate(w.copies):
            if c is None:
                continue
            for wid in sorted(c[1], key=repr):
                code = bytearray(c[0])
                lo, hi = self._span(wid)
                code[lo:hi] = s.mem[k][lo:hi]
                copies = (*w.copies[:k], (bytes(code), c[1] - {wid}), *w.copies[k + 1 :])
                w2 = replace(w, copies=copies)
                what = f"the write of {self._write_name(wid)} reaches its copy of {self.site_name(k)}"
                yield f"{cpu}: {what}: {bytes(code).hex(' ')}", self._set(s, i, w2)

    def _judge(self, s: State, w: Worker, k: int, code: bytes, done: bool) -> str | None:
        r = self.reqs[k]
        if code[0] == INT3:
            if self.sdm and k in w.dirty:
                return "unsynced-modification"
            return "int3" if s.published else "unhandled-int3"
        legal = (r.old, r.new)
        if code not in legal:
            return "torn-fetch"
        if k in w.dirty:
            return "unsynced-modification"
        if done and code != r.new:
            return "stale-after-completion"
        return None


def _search(start, successors, max_states: int = 200_000, graph: nx.DiGraph | None = None):
    """Breadth-first search of the state graph from `start`: (states, transitions, complete,
    violations), where violations maps each class to the labels of a shortest path reaching it.
    States that violate are not expanded further."""
    parent: dict = {start: None}
    queue = deque([start])
    transitions = 0
    violations: dict[str, list[str]] = {}
    complete = True
    while queue:
        s = queue.popleft()
        for label, t in successors(s):
            transitions += 1
            if graph is not None:
                graph.add_edge(s, t, label=label)
            if t in parent:
                continue
            if len(parent) >= max_states:
                complete = False
                continue
            parent[t] = (s, label)
            if not t.violation:
                queue.append(t)
            elif t.violation not in violations:
                path, node = [], t
                while parent[node] is not None:
                    node, lab = parent[node]
                    path.append(lab)
                violations[t.violation] = [*reversed(path), f"=> {t.violation}"]
    return len(parent), transitions, complete, violations


def explore(
    protocol: str = "bp",
    mutation: str | None = None,
    cpus: int = 2,
    sites: int = 1,
    max_states: int = 200_000,
    keep_graph: bool = False,
    xmc_rule: str = "linux",
    nmis: int = 0,
    count_at_delivery: bool = False,
) -> ExploreResult:
    """Explore every interleaving of `protocol` enabling ftrace on `sites` sites while `cpus`
    workload CPUs execute them (plus the patcher), judged by the cross-modifying-code rule
    `xmc_rule` (the oracle's: "linux" or "sdm"), with up to `nmis` NMIs on each workload CPU (the
    stop_machine protocols only: their handlers execute the sites, and stop-machine-ftrace's NMIs
    count themselves in and perform a pending write). Breadth first, so the first path found to
    each violation class is a shortest one. `count_at_delivery` closes the window between an NMI's
    delivery and its ftrace_nmi_enter (a what-if: no hardware does that)."""
    if xmc_rule not in ("linux", "sdm"):
        raise ValueError(f"unknown cross-modifying-code rule {xmc_rule!r}; choose linux or sdm")
    if not 1 <= cpus <= 3:
        raise ValueError("the explorer takes 1 to 3 workload CPUs")
    if not 1 <= sites <= 2:
        raise ValueError("the explorer takes 1 or 2 sites")
    if not 0 <= nmis <= 3:
        raise ValueError("the explorer takes 0 to 3 NMIs per workload CPU")
    if nmis and protocol not in ("stop-machine", "stop-machine-ftrace"):
        raise ValueError("NMIs in the protocol explorer are for stop-machine and stop-machine-ftrace")
    target = 0xFFFFFFFF81001000
    reqs = []
    for i in range(sites):
        site = 0xFFFFFFFF81002000 + 64 * i
        rel = (target - (site + 5)).to_bytes(4, "little", signed=True)
        reqs.append(PatchRequest(site, FTRACE_NOP, b"\xe8" + rel))
    steps = build(protocol, reqs, mutation)
    model = _Model(steps, tuple(sorted(reqs, key=lambda r: r.site)), cpus, xmc_rule, nmis)
    model.count_at_delivery = count_at_delivery
    graph = nx.DiGraph() if keep_graph else None
    states, transitions, complete, violations = _search(model.initial(), model.successors, max_states, graph)
    scope = f"{cpus} workload CPU(s), {sites} site(s)" + (f", {nmis} NMI(s) each" if nmis else "")
    scope += ", NMIs counted in at delivery" if nmis and count_at_delivery else ""
    return ExploreResult(protocol, mutation, cpus, sites, states, transitions, complete, violations, graph, scope)


# ------------------------------------------------------------------------------------------------
# NMI entries: every interleaving of NMI arrivals with the steps of one CPU's NMI entry
# ------------------------------------------------------------------------------------------------
#: nested-safe entry variants -> the checks they keep (see textpoke/asm/entry_nmi_nested.S)
NESTED_FLAGS = {
    "nested-safe": frozenset({"RIP", "VAR", "RSP", "SAVED"}),
    "nested-no-rsp-check": frozenset({"RIP", "VAR", "SAVED"}),
    "nested-no-variable": frozenset({"RIP", "RSP", "SAVED"}),
    "nested-hw-frame": frozenset({"RIP", "VAR", "RSP"}),
    "nested-no-rip-check": frozenset({"VAR", "RSP", "SAVED"}),
}
#: phases of the outer NMI on the nested-safe entry, in order; a nested NMI can arrive between any two
_PHASES = (
    "first",  # first_nmi: "executing" = 0, copy the hardware frame to the outermost frame
    "repeat",  # repeat_nmi: "executing" = 1
    "copy1",  # first half of the iret frame copied
    "copy2",  # second half copied: end_repeat_nmi, the handler starts
    "handler",  # handler on the NMI stack (an int3 here returns with iretq: NMIs unblocked)
    "irqstack",  # handler on the irq stack (same)
    "exit",  # std; "executing" = 0
    "window",  # the exit window: before the final iretq
)
_ON_NMI_STACK = frozenset({"first", "repeat", "copy1", "copy2", "handler", "exit", "window"})
_IN_TRAMPOLINE = frozenset({"repeat", "copy1", "copy2"})


@dataclass(frozen=True, slots=True)
class NmiState:
    phase: str  # "none" (the interrupted context C1), or one of _PHASES; latch entries: their own
    blocked: bool  # NMIs blocked by hardware
    latched: bool  # one NMI latched by hardware
    left: int  # NMIs still to arrive (the bound)
    hw: str  # what the hardware frame slot holds: "C1", or "C2" (a nested NMI's frame)
    outermost: str  # "C1", "C2" or "-"
    iret: tuple  # the two halves of the iret frame: "C1", "repeat", "C2" or "-"
    var: int  # "NMI executing", or the i386 nmi_state
    uncovered: bool  # an NMI arrived since the handler last started
    violation: str | None = None


def _nmi_successors(s: NmiState, entry: str, fred: bool) -> Iterator[tuple[str, NmiState]]:
    if s.violation:
        return
    latch = entry.startswith("latch")
    # an NMI arrives
    if s.left:
        if s.blocked:
            if not s.latched:
                yield "an NMI arrives while NMIs are blocked: latched", _r(s, latched=True, left=s.left - 1)
        else:
            yield from _nmi_arrives(_r(s, left=s.left - 1), entry)
    if latch:
        yield from _latch_steps(s, entry, fred)
        return
    p = s.phase
    if p == "none":
        return
    flags = NESTED_FLAGS.get(entry, frozenset())
    if entry == "naive":
        if p == "handler":
            if not fred:
                yield "the handler hits an int3; its iretq unblocks NMIs", _r(s, blocked=False)
            yield "the handler ends; iretq returns through the hardware frame", _ret(s, s.hw, fred)
        return
    nxt = _PHASES[_PHASES.index(p) + 1] if p != "window" else None
    if p == "first":
        yield (
            "first_nmi: executing = 0, copy the hardware frame to the outermost frame",
            _r(s, phase="repeat", outermost=s.hw, var=0),
        )
    elif p == "repeat":
        yield "repeat_nmi: executing = 1", _r(s, phase="copy1", var=1)
    elif p in ("copy1", "copy2"):
        src = s.outermost if "SAVED" in flags else s.hw
        half = 0 if p == "copy1" else 1
        iret = (src, s.iret[1]) if half == 0 else (s.iret[0], src)
        what = "outermost" if "SAVED" in flags else "hardware"
        done = " (the handler starts)" if p == "copy2" else ""
        yield (
            f"repeat_nmi copies half {half + 1} of the {what} frame into the iret frame{done}",
            _r(s, phase=nxt, iret=iret, uncovered=s.uncovered and p != "copy2"),
        )
    elif p in ("handler", "irqstack"):
        if not fred and s.blocked:
            yield (
                f"the handler ({'irq' if p == 'irqstack' else 'NMI'} stack) hits an int3; its iretq unblocks NMIs",
                _r(s, blocked=False),
            )
        yield ("the handler switches to the irq stack" if p == "handler" else "the handler returns"), _r(s, phase=nxt)
    elif p == "exit":
        yield "std; executing = 0", _r(s, phase="window", var=0)
    elif p == "window":
        if s.iret == ("repeat", "repeat"):
            t = _r(s, phase="repeat", blocked=False if not fred else s.blocked)
            yield "the final iretq lands in repeat_nmi: the handler runs again", _deliver_latched(t, entry)
        else:
            yield "the final iretq", _ret(s, s.iret[0] if s.iret[0] == s.iret[1] else "mixed", fred)


def _nmi_arrives(s: NmiState, entry: str) -> Iterator[tuple[str, NmiState]]:
    """An NMI is delivered: hardware blocks NMIs and writes its frame; then the entry decides."""
    if s.phase == "none":
        if entry == "naive":  # the handler starts at once
            yield "an NMI interrupts the workload (C1)", _r(s, phase="handler", blocked=True, hw="C1", uncovered=False)
            return
        first = "l_entry" if entry.startswith("latch") else "first"
        yield "an NMI interrupts the workload (C1)", _r(s, phase=first, blocked=True, hw="C1", uncovered=True)
        return
    s = _r(s, blocked=True, hw="C2", uncovered=True)
    if entry == "naive":
        yield "a nested NMI: the hardware overwrites the outer NMI's frame on the IST stack", s
        return
    if entry.startswith("latch"):
        if s.var != 0:
            yield (
                "a nested NMI on the interrupted stack: state was not NOT_RUNNING, set LATCHED and return",
                _r(s, var=2, blocked=False),
            )
        else:  # it runs the whole handler itself on top of the outer one, and returns
            yield (
                "a nested NMI finds NOT_RUNNING: it runs the handler itself and returns",
                _r(s, blocked=False, uncovered=False),
            )
        return
    flags = NESTED_FLAGS[entry]
    p = s.phase
    if "RIP" in flags and p in _IN_TRAMPOLINE:
        yield f"a nested NMI inside repeat_nmi ({p}): returns at once", _r(s, blocked=False)
        return
    nested = ("VAR" in flags and s.var == 1) or (
        "RSP" in flags and p in _ON_NMI_STACK and p in ("exit", "window")  # DF is set only there
    )
    if nested:
        iret = ("repeat", "repeat")
        label = f"a nested NMI ({p}): points the iret frame at repeat_nmi and returns"
        yield label, _deliver_latched(_r(s, iret=iret, blocked=False), entry)
        return
    yield (
        f"a nested NMI ({p}) is taken for a first NMI: it copies its own frame over the outer one's",
        _r(s, violation="nmi-corruption"),
    )


def _deliver_latched(s: NmiState, entry: str) -> NmiState:
    if not s.blocked and s.latched:
        s = _r(s, latched=False)
        for _, t in _nmi_arrives(s, entry):
            return t
    return s


def _ret(s: NmiState, target: str, fred: bool) -> NmiState:
    """The outermost return: it must land in C1, and every NMI since the handler started must
    have been handled."""
    if target != "C1":
        return _r(s, violation="nmi-corruption")
    if s.uncovered:
        return _r(s, violation="lost-nmi")
    return _r(s, phase="none", blocked=False, hw="-", outermost="-", iret=("-", "-"), var=0)


def _latch_steps(s: NmiState, entry: str, fred: bool) -> Iterator[tuple[str, NmiState]]:
    p = s.phase
    if p == "l_entry":
        yield "nmi_state = EXECUTING; the handler starts", _r(s, phase="l_handler", var=1, uncovered=False)
    elif p == "l_handler":
        if not fred and s.blocked:
            yield "the handler hits an int3; its iretq unblocks NMIs", _r(s, blocked=False)
        if entry == "latch-cmpxchg386":
            if s.var == 2:
                yield (
                    "exit: interrupts off, the compare sees LATCHED: the handler runs again",
                    _r(s, phase="l_handler", var=1, uncovered=False),
                )
            else:
                yield "exit: interrupts off, load nmi_state, compare: EXECUTING", _r(s, phase="l_store")
        else:
            how = "dec" if entry == "latch-dec" else "cmpxchg(EXECUTING -> NOT_RUNNING)"
            if s.var == 2:
                yield (
                    f"exit: {how} finds LATCHED: the handler runs again",
                    _r(s, phase="l_handler", var=1, uncovered=False),
                )
            else:
                yield f"exit: {how}: NOT_RUNNING", _ret(_r(s, var=0), "C1", fred)
    elif p == "l_store":  # the compare is done: the store happens whatever nmi_state is now
        yield "exit: store NOT_RUNNING, interrupts back on, return", _ret(_r(s, var=0), "C1", fred)


def _r(s: NmiState, **kw) -> NmiState:
    d = {f: getattr(s, f) for f in NmiState.__slots__}
    d.update(kw)
    return NmiState(**d)


def explore_nmi(
    entry: str = "nested-safe", nmis: int = 3, fred: bool = False, max_states: int = 200_000
) -> ExploreResult:
    """Every interleaving of up to `nmis` NMI arrivals with the steps of one CPU's NMI entry, where
    the handler may hit an int3 (a site being patched) whose iretq unblocks NMIs."""
    if entry not in ("naive", *NESTED_FLAGS, "latch-cmpxchg", "latch-cmpxchg386", "latch-dec"):
        raise ValueError(f"unknown NMI entry {entry!r}")
    start = NmiState("none", False, False, nmis, "-", "-", ("-", "-"), 0, False)
    states, transitions, complete, violations = _search(start, lambda st: _nmi_successors(st, entry, fred), max_states)
    label = entry + (" (FRED)" if fred else "")
    return ExploreResult(
        f"NMI entry {label}",
        None,
        1,
        0,
        states,
        transitions,
        complete,
        violations,
        scope=f"one CPU, up to {nmis} NMIs, the handler may hit int3s",
    )
