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

The sites and operations are a client's (`client_plan`): ftrace's 5-byte nop <-> call, jump labels of
2 and 5 bytes, a static call's trampoline and call site (retargeted, set to NULL, restored), kprobes
(an int3 on one instruction, run out of line from a slot that a grace period protects) and optprobes
(a jmp rel32 over two instructions, where a CPU may stop between them). For the probe clients the
workload CPUs also trap to the kprobe handler, run slots and detour buffers, stop inside a range and
pass quiescent points; the README's explorer section says what each client's model includes and
leaves out.

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

from cpus import ConfigError

from .clients.static_call import transform
from .elfobj import JUMP_NOPS
from .image import FTRACE_NOP
from .protocols import (
    PROBE_PROTOCOLS,
    PROTOCOLS,
    FreeSlot,
    GracePeriod,
    KprobeRegister,
    KprobeUnregister,
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

__all__ = ["EXPLORE_OPERATIONS", "INT3_MODES", "ExploreResult", "explore", "explore_nmi"]


INT3 = 0xCC
RET = 0xC3
JMP32 = 0xE9
# modes of a workload CPU
RUN, TRAP, STOPPED = "run", "int3", "stopped"
KTRAP = "kprobe-int3"  # trapped on an int3 no descriptor covers: the kprobe handler decides when it runs
SLOT = "slot"  # in a probe's out-of-line slot (a kprobe's boosted copy, an optprobe's detour buffer)
MID = "mid"  # between the first and the second instruction of an optprobe range
#: the #BP handlers the explorer models (`textpoke.image.BP_ENTRIES`): Linux's emulating handler and
#: its two mutations that do not know an instruction kind (the 2-byte jmp, the ret)
INT3_MODES = ("emulate", "emulate-no-jmp8", "emulate-noret")


@dataclass(frozen=True, slots=True)
class Worker:
    mode: str
    copies: tuple  # per site: None, or (bytes, frozenset of step indices of writes not yet snooped)
    dirty: frozenset  # sites modified (per the xmc rule) since this CPU last serialized
    ipi: bool  # a sync IPI is pending
    stop: bool  # a stopper IPI is pending
    nmi: str = ""  # "", "entry" (delivered, not yet counted in nmi_running), "counted" (in the handler)
    nmis: int = 0  # NMIs that may still arrive on this CPU
    at: int = -1  # the site a KTRAP, SLOT or MID mode (and an optprobe's TRAP) is about
    qs: bool = False  # a grace period waits for this CPU's next quiescent point


@dataclass(frozen=True, slots=True)
class State:
    pc: int  # next protocol step
    waiting: frozenset  # CPUs the patcher waits for (sync, rendezvous, release, grace period)
    published: frozenset  # the sites whose #BP descriptors are live
    released: bool  # stop_machine released the stopped CPUs
    mem: tuple  # bytes of each site
    workers: tuple
    violation: str | None = None
    sub: int = 0  # stop-machine-ftrace: where the modifier is inside the current ModCode
    flag: bool = False  # the write flag of nmi_running: a write is pending for NMIs
    running: int = 0  # NMIs counted into nmi_running
    table: frozenset = frozenset()  # sites with an entry in the kprobe table
    slots: frozenset = frozenset()  # sites whose out-of-line slot (or detour buffer) is allocated


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
    client: str = "ftrace"
    operation: str = "enable"

    @property
    def safe(self) -> bool:
        return not self.violations

    @property
    def shortest(self) -> int | None:
        """Steps of the shortest counterexample, its verdict line included as the report counts
        them, or None when no unsafe state is reachable."""
        return min((len(p) for p in self.violations.values()), default=None)

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


# ------------------------------------------------------------------------------------------------
# Clients: each one's abstract sites and the operations a run performs on them
# ------------------------------------------------------------------------------------------------
SITE_BASE = 0xFFFFFFFF81002000  # site i is at SITE_BASE + 64 * i
FTRACE_TARGET = 0xFFFFFFFF81001000  # ftrace_caller
FTRACE_ALT = 0xFFFFFFFF81001100  # ftrace_caller_alt (--operation retarget)
JL_COLD = 0xFFFFFFFF81100000  # a 5-byte jump label's branch, moved out of line (.text.unlikely)
SC_TARGETS = (0xFFFFFFFF81003000, 0xFFFFFFFF81003040)  # a static call's functions A and B
DETOUR_BASE = 0xFFFFFFFFA0000000  # optprobe detour buffers, 0x80 apart
KPROBE_INSN = bytes.fromhex("4889fb")  # mov rbx, rdi: a kprobe point (the first instruction of a body)
OPTPROBE_RANGE = bytes.fromhex("4889d848c1")  # mov rax, rbx; then shr rax, 7 (48 c1 e8 07), its first 2 bytes
OPTPROBE_SECOND = 3  # offset of the range's second instruction
#: operations the explorer performs per client (the first is the default), as `--operation` names them
EXPLORE_OPERATIONS: dict[str, tuple[str, ...]] = {
    "ftrace": ("enable", "toggle", "retarget"),
    "jump-label": ("toggle", "enable"),
    "static-call": ("retarget", "toggle", "retarget-unpadded"),
    "kprobe": ("toggle", "enable"),
    "optprobe": ("toggle", "enable"),
}


def _rel32(opcode: int, site: int, target: int) -> bytes:
    return bytes([opcode]) + (target - (site + 5)).to_bytes(4, "little", signed=True)


def _site(i: int) -> int:
    return SITE_BASE + 64 * i


@dataclass(frozen=True)
class _OpSpec:
    name: str
    protocol: str
    requests: tuple[PatchRequest, ...]


@dataclass(frozen=True)
class _Op:
    name: str
    first: int  # index of its first step
    end: int  # index after its last step
    changes: dict  # site index -> (old, new)


def client_plan(
    client: str, operation: str, protocol: str, sites: int
) -> tuple[tuple[int, ...], tuple[bytes, ...], list[_OpSpec], str]:
    """(site addresses, their boot bytes, the operations in order, a description of the sites) of
    `client` performing `operation` with `protocol` on `sites` abstract sites."""
    addrs = tuple(_site(i) for i in range(sites))
    now: dict[int, bytes] = {}
    ops: list[_OpSpec] = []

    def op(name: str, proto: str, want: dict[int, bytes], parts: bool = False) -> None:
        reqs = [PatchRequest(a, now[a], b) for a, b in sorted(want.items()) if now[a] != b]
        groups = [[r] for r in reqs] if parts else [reqs]
        for g in groups:
            if g:
                label = name if not parts else f"{name} {', '.join(f'site{addrs.index(r.site)}' for r in g)}"
                ops.append(_OpSpec(label, proto, tuple(g)))
        now.update(want)

    if client == "ftrace":
        boot = tuple(FTRACE_NOP for _ in addrs)
        now.update(zip(addrs, boot, strict=True))
        on = {a: _rel32(0xE8, a, FTRACE_TARGET) for a in addrs}
        op("enable", protocol, on)
        if operation == "retarget":
            op("retarget", protocol, {a: _rel32(0xE8, a, FTRACE_ALT) for a in addrs})
        if operation in ("toggle", "retarget"):
            op("disable", protocol, {a: FTRACE_NOP for a in addrs})
        what = "5-byte ftrace sites, nop <-> call"
    elif client == "jump-label":
        # site0: a 2-byte entry (eb rel8 <-> 66 90); site1: a 5-byte one (e9 rel32 <-> the 5-byte nop)
        sizes = (2, 5)[:sites]
        boot = tuple(JUMP_NOPS[n] for n in sizes)
        now.update(zip(addrs, boot, strict=True))
        jmp = {}
        for a, n in zip(addrs, sizes, strict=True):
            jmp[a] = bytes([0xEB, 0x20]) if n == 2 else _rel32(JMP32, a, JL_COLD)
        op("enable", protocol, jmp)
        if operation == "toggle":
            op("disable", protocol, {a: JUMP_NOPS[n] for a, n in zip(addrs, sizes, strict=True)})
        what = "jump labels: " + " and ".join(f"{n}-byte" for n in sizes) + ", nop <-> jmp"
    elif client == "static-call":
        # site0: the trampoline (jmp A, a tail site); site1: a call site (call A)
        tails = (True, False)[:sites]
        boot = tuple(transform(a, SC_TARGETS[0], t) for a, t in zip(addrs, tails, strict=True))
        now.update(zip(addrs, boot, strict=True))
        parts = protocol != "bp-batch"  # static_call_update: one text_poke_bp per site, the trampoline first
        pairs = list(zip(addrs, tails, strict=True))
        if operation != "toggle":
            op("retarget", protocol, {a: transform(a, SC_TARGETS[1], t) for a, t in pairs}, parts)
        padded = operation != "retarget-unpadded"
        op("null", protocol, {a: transform(a, None, t, None if padded else now[a]) for a, t in pairs}, parts)
        op("restore", protocol, {a: transform(a, SC_TARGETS[0], t) for a, t in pairs}, parts)
        what = "static call: " + " and ".join("trampoline (jmp)" if t else "call site" for t in tails)
    elif client == "kprobe":
        boot = tuple(KPROBE_INSN for _ in addrs)
        now.update(zip(addrs, boot, strict=True))
        op("register", "kprobe", {a: bytes([INT3]) + KPROBE_INSN[1:] for a in addrs})
        if operation == "toggle":
            op("unregister", "kprobe", {a: KPROBE_INSN for a in addrs})
        what = "kprobes on a 3-byte instruction"
    elif client == "optprobe":
        boot = tuple(OPTPROBE_RANGE for _ in addrs)
        now.update(zip(addrs, boot, strict=True))
        for i, a in enumerate(addrs):
            op(f"register site{i}", "kprobe", {a: bytes([INT3]) + OPTPROBE_RANGE[1:]})
            op(f"optimize site{i}", protocol, {a: _rel32(JMP32, a, DETOUR_BASE + 0x80 * i)})
        if operation == "toggle":
            for i, a in enumerate(addrs):
                op(f"unoptimize site{i}", protocol, {a: bytes([INT3]) + OPTPROBE_RANGE[1:]})
                op(f"unregister site{i}", "kprobe", {a: OPTPROBE_RANGE})
        what = "optprobes over 2 instructions (5 bytes)"
    else:  # pragma: no cover - the caller checked the name
        raise ConfigError(f"unknown client {client!r}")
    return addrs, boot, ops, what


class _Model:
    def __init__(
        self,
        steps: tuple[Step, ...],
        ops: list[_Op],
        addrs: tuple[int, ...],
        boot: tuple[bytes, ...],
        ncpus: int,
        xmc_rule: str = "linux",
        nmis: int = 0,
        int3: str = "emulate",
        probes: bool = False,
        detour: bool = False,
    ) -> None:
        self.steps = steps
        self.ops = ops
        self.sites = list(addrs)
        self.boot = boot
        self.ops_of = [[op for op in ops if k in op.changes] for k in range(len(addrs))]
        self.ncpus = ncpus
        self.sdm = xmc_rule == "sdm"
        self.nmis = nmis
        self.int3 = int3
        self.probes = probes  # int3s no descriptor covers go to the kprobe handler (a kernel with kprobes)
        self.detour = detour  # optprobes: the jmp leads into a detour buffer; CPUs stop between instructions
        self.count_at_delivery = False  # an NMI counts itself in as it is delivered (no entry window)

    def site_name(self, i: int) -> str:
        return f"site{i}"

    # -- helpers ---------------------------------------------------------------------------------
    def _index(self, site: int) -> int:
        return self.sites.index(site)

    def initial(self) -> State:
        copies = tuple((b, frozenset()) for b in self.boot)
        w = Worker(RUN, copies, frozenset(), False, False, nmis=self.nmis)
        return State(0, frozenset(), frozenset(), False, self.boot, (w,) * self.ncpus)

    def _status(self, s: State, k: int) -> tuple[bytes, bytes, bool]:
        """(old, new, ended) of the last operation on site k that has started (the oracle's active
        or finished request), or the boot bytes twice when none has."""
        cur = None
        for op in self.ops_of[k]:
            if s.pc > op.first or (s.pc == op.first and not s.waiting):
                cur = op
            else:
                break
        if cur is None:
            return self.boot[k], self.boot[k], True
        old, new = cur.changes[k]
        return old, new, s.pc > cur.end or (s.pc == cur.end and not s.waiting)

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
            live = frozenset(self._index(r.site) for r in step.requests)
            yield "cpu0: publishes the #BP descriptors", replace(s, pc=nxt, published=live)
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
                yield "cpu0: withdraws the descriptors", replace(s, pc=nxt, published=frozenset())
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
        elif isinstance(step, KprobeRegister):
            k = self._index(step.site)
            yield (
                f"cpu0: prepares the probe at {self.site_name(k)}: copies it into its {self._slot_name()}, "
                "enters it in the kprobe table",
                replace(s, pc=nxt, table=s.table | {k}, slots=s.slots | {k}),
            )
        elif isinstance(step, KprobeUnregister):
            k = self._index(step.site)
            yield (
                f"cpu0: unlinks {self.site_name(k)}'s probe from the kprobe table",
                replace(s, pc=nxt, table=s.table - {k}),
            )
        elif isinstance(step, GracePeriod):
            workers = tuple(replace(w, qs=True) for w in s.workers)
            yield (
                f"cpu0: waits for a grace period ({step.label})",
                replace(s, pc=nxt, waiting=frozenset(range(len(workers))), workers=workers),
            )
        elif isinstance(step, FreeSlot):
            k = self._index(step.site)
            yield (
                f"cpu0: frees {self.site_name(k)}'s {self._slot_name()} (int3 poison)",
                replace(s, pc=nxt, slots=s.slots - {k}),
            )
        else:  # pragma: no cover - every built-in step kind is handled
            raise ConfigError(f"the explorer has no model of the step {type(step).__name__}")

    def _slot_name(self) -> str:
        return "detour buffer" if self.detour else "slot"

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

    def _nmi(self, s: State, i: int, w: Worker) -> Iterator[tuple[str, State]]:
        """NMIs on a workload CPU (stop_machine protocols): delivery (not serializing), ftrace_nmi_enter
        (count in; perform a pending write), the handler executing sites, the return."""
        cpu = f"cpu{i + 1}"
        if w.nmi == "" and w.nmis and w.mode != TRAP:
            w2 = replace(w, nmi="entry", nmis=w.nmis - 1)
            s2 = self._set(s, i, w2)
            if not self.count_at_delivery:
                yield f"{cpu}: an NMI arrives", s2
            else:
                for label, s3 in self._nmi(s2, i, w2):
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
                verdict = self._judge(s, w2, k, code)
                label = f"{cpu}: the NMI handler executes {self.site_name(k)}: {code.hex(' ')}"
                if verdict and verdict not in ("int3", "kprobe"):
                    yield label, self._set(s, i, w2, violation=verdict)
                elif c is None:
                    yield label + " (decodes it now)", self._set(s, i, w2)
            w2 = self._serialize(replace(w, nmi=""))
            yield f"{cpu}: NMI counts itself out, iretq (serializing)", self._set(s, i, w2, running=s.running - 1)

    def _fetch(self, s: State, w: Worker, k: int) -> tuple[bytes, Worker, bool]:
        """What the CPU executes at site k (its decoded copy, or memory, decoding it now), the
        worker with that copy, and whether it decoded now."""
        c = w.copies[k]
        if c is not None:
            return c[0], w, False
        copies = (*w.copies[:k], (s.mem[k], frozenset()), *w.copies[k + 1 :])
        return s.mem[k], replace(w, copies=copies), True

    def _worker(self, s: State, i: int, w: Worker) -> Iterator[tuple[str, State]]:
        cpu = f"cpu{i + 1}"
        if self.nmis:
            yield from self._nmi(s, i, w)
        if w.nmi:
            pass  # the NMI handler runs; the interrupted code waits
        elif w.mode == RUN:
            for k in range(len(self.sites)):
                code, w2, fresh = self._fetch(s, w, k)
                label = f"{cpu}: executes {self.site_name(k)}: {code.hex(' ')}"
                verdict = self._judge(s, w2, k, code)
                if verdict == "int3":
                    trapped = replace(w2, mode=TRAP, at=k if self.detour else -1)
                    yield label + " -> int3 trap", self._set(s, i, trapped)
                elif verdict == "kprobe":
                    yield label + " -> int3 trap", self._set(s, i, replace(w2, mode=KTRAP, at=k))
                elif verdict:
                    yield label, self._set(s, i, w2, violation=verdict)
                elif self.detour and code[0] == JMP32:
                    yield (
                        label + f" (the jmp to its {self._slot_name()})",
                        self._set(s, i, replace(w2, mode=SLOT, at=k)),
                    )
                elif self.detour and code[:OPTPROBE_SECOND] == self.boot[k][:OPTPROBE_SECOND]:
                    yield label + " (its first instruction)", self._set(s, i, replace(w2, mode=MID, at=k))
                elif fresh:
                    yield label + " (decodes it now)", self._set(s, i, w2)
            yield from self._ipi(s, i, w)
            if w.stop:
                w2 = replace(w, mode=STOPPED, stop=False)
                yield f"{cpu}: enters the stopper and acknowledges", self._set(s, i, w2, waiting=s.waiting - {i})
            if w.qs:
                w2 = replace(w, qs=False)
                yield (
                    f"{cpu}: passes a quiescent point (a workload iteration ends)",
                    self._set(s, i, w2, waiting=s.waiting - {i}),
                )
        elif w.mode == TRAP:
            if w.at >= 0:  # an optprobe's jmp, emulated: on into the detour buffer
                w2 = self._serialize(replace(w, mode=SLOT))
                label = f"{cpu}: returns from the int3 handler into {self.site_name(w.at)}'s detour buffer (iretq)"
                yield label, self._set(s, i, w2)
            else:
                w2 = self._serialize(replace(w, mode=RUN))
                yield f"{cpu}: returns from the int3 handler (iretq, serializing)", self._set(s, i, w2)
        elif w.mode == KTRAP:
            name = self.site_name(w.at)
            if w.at in s.table:
                w2 = self._serialize(replace(w, mode=SLOT))
                label = f"{cpu}: the kprobe handler finds {name}'s probe: callback, iretq into its {self._slot_name()}"
                yield label, self._set(s, i, w2)
            elif s.mem[w.at][0] != INT3:
                w2 = self._serialize(replace(w, mode=RUN, at=-1))
                yield f"{cpu}: the kprobe handler finds the int3 gone: iretq back to {name}", self._set(s, i, w2)
            else:
                label = f"{cpu}: the kprobe handler finds no probe for the int3 at {name}"
                yield label, self._set(s, i, w, violation="unhandled-int3")
        elif w.mode == SLOT:
            name = self.site_name(w.at)
            if w.at in s.slots:
                what = "the copied instructions" if self.detour else "the copied instruction"
                yield (
                    f"{cpu}: runs {name}'s {self._slot_name()}: {what}, the jmp back",
                    self._set(s, i, replace(w, mode=RUN, at=-1)),
                )
            else:
                label = f"{cpu}: runs {name}'s freed {self._slot_name()}: its int3 poison"
                yield label, self._set(s, i, w, violation="unhandled-int3")
            yield from self._ipi(s, i, w)
        elif w.mode == MID:
            k = w.at
            code, w2, _fresh = self._fetch(s, w, k)
            part = code[OPTPROBE_SECOND:]
            label = f"{cpu}: executes {self.site_name(k)}+{OPTPROBE_SECOND}: {part.hex(' ')} (the second instruction)"
            if part != self.boot[k][OPTPROBE_SECOND:]:
                yield label, self._set(s, i, w2, violation="torn-fetch")
            else:
                yield label, self._set(s, i, replace(w2, mode=RUN, at=-1))
            yield from self._ipi(s, i, w)
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

    def _ipi(self, s: State, i: int, w: Worker) -> Iterator[tuple[str, State]]:
        """The CPU takes a pending sync IPI (interrupts are on: running, in a slot, or between an
        optprobe range's instructions, where the IPI's iretq lands back inside the range)."""
        if not w.ipi:
            return
        w2 = self._serialize(replace(w, ipi=False))
        label = f"cpu{i + 1}: takes the sync IPI, serializes (cpuid) and acknowledges"
        bad = None
        if w.mode == MID:
            now = s.mem[w.at]
            label += f"; its iretq returns to {self.site_name(w.at)}+{OPTPROBE_SECOND}, which holds {now.hex(' ')}"
            if now[1:] != self.boot[w.at][1:]:
                bad = "torn-fetch"  # the oracle's landing check: a return inside a site whose tail changed
        yield label, self._set(s, i, w2, waiting=s.waiting - {i}, violation=bad)

    def _judge(self, s: State, w: Worker, k: int, code: bytes) -> str | None:
        """The oracle's verdict on executing `code` at site k, or "int3" (a trap the #BP handler's
        descriptors cover), or "kprobe" (a trap for the kprobe handler)."""
        old, new, ended = self._status(s, k)
        if code[0] == INT3:
            if self.sdm and k in w.dirty:
                return "unsynced-modification"
            if k in s.published:
                if self.int3 == "emulate-no-jmp8" and len(new) != 5:
                    return "unhandled-int3"  # a handler that knows 5-byte instructions only
                if self.int3 == "emulate-noret" and new[0] == RET:
                    return "unhandled-int3"  # a handler that does not emulate ret
                return "int3"
            return "kprobe" if self.probes else "unhandled-int3"
        if code not in (old, new):
            return "torn-fetch"
        if code[0] == RET and code[1:].strip(bytes([INT3])):
            return "sls-exposure"
        if k in w.dirty:
            return "unsynced-modification"
        if ended and code != new:
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
    protocol: str | None = "bp",
    mutation: str | None = None,
    cpus: int = 2,
    sites: int = 1,
    max_states: int = 200_000,
    keep_graph: bool = False,
    xmc_rule: str = "linux",
    nmis: int = 0,
    count_at_delivery: bool = False,
    client: str = "ftrace",
    operation: str | None = None,
    int3: str = "emulate",
) -> ExploreResult:
    """Explore every interleaving of `protocol` performing `client`'s `operation` (by default the
    first of `EXPLORE_OPERATIONS[client]`: ftrace enables, the other clients toggle or, for static
    calls, retarget) on `sites` abstract sites while `cpus` workload CPUs execute them (plus the
    patcher), with the #BP handler `int3` (Linux's emulating one, or a mutation of it), judged by the
    cross-modifying-code rule `xmc_rule` (the oracle's: "linux" or "sdm"), with up to `nmis` NMIs on
    each workload CPU (the stop_machine protocols only: their handlers execute the sites, and
    stop-machine-ftrace's NMIs count themselves in and perform a pending write). Breadth first, so
    the first path found to each violation class is a shortest one. `count_at_delivery` closes the
    window between an NMI's delivery and its ftrace_nmi_enter (a what-if: no hardware does that).
    `protocol` None is the client's own default (bp, or the probe clients' own protocol)."""
    from .clients import resolve_client

    if xmc_rule not in ("linux", "sdm"):
        raise ConfigError(f"unknown cross-modifying-code rule {xmc_rule!r}; choose linux or sdm")
    if not 1 <= cpus <= 3:
        raise ConfigError("the explorer takes 1 to 3 workload CPUs")
    if not 1 <= sites <= 2:
        raise ConfigError("the explorer takes 1 or 2 sites")
    if not 0 <= nmis <= 3:
        raise ConfigError("the explorer takes 0 to 3 NMIs per workload CPU")
    c = resolve_client(client)  # ConfigError for an unknown name
    if protocol is None:
        protocol = "bp" if c.protocols is None or "bp" in c.protocols else c.default_protocol
    if nmis and protocol not in ("stop-machine", "stop-machine-ftrace"):
        raise ConfigError("NMIs in the protocol explorer are for stop-machine and stop-machine-ftrace")
    operations = EXPLORE_OPERATIONS[client]
    operation = operation or operations[0]
    if operation not in operations:
        raise ConfigError(
            f"the explorer performs {', '.join(operations)} for client {client}, not {operation!r}"
            + (" (the abstract model has no ftrace trampoline)" if operation == "ftrace-linux" else "")
        )
    if c.protocols is not None and protocol in PROTOCOLS and protocol not in c.protocols:
        raise ConfigError(f"client {client} is patched with {', '.join(sorted(c.protocols))}, not {protocol}")
    if protocol in PROBE_PROTOCOLS and protocol not in (c.protocols or ()):
        raise ConfigError(f"protocol {protocol} patches probes only: use it with --client {protocol}")
    if int3 not in INT3_MODES:
        raise ConfigError(
            f"the explorer models the emulating #BP handler and its mutations ({', '.join(INT3_MODES)}), "
            f"not --int3 {int3}"
        )
    probes = client in ("kprobe", "optprobe")
    if probes and int3 != "emulate":
        raise ConfigError(f"client {client} runs with the #BP entry Linux has (--int3 emulate), not {int3}")
    addrs, boot, specs, what = client_plan(client, operation, protocol, sites)

    def steps_of(m: str | None) -> tuple[tuple[Step, ...], list[_Op]]:
        steps: list[Step] = []
        ops: list[_Op] = []
        for spec in specs:
            try:
                part = build(spec.protocol, spec.requests, m)
            except ValueError as err:
                raise ConfigError(f"{spec.name}: {err}") from None
            changes = {addrs.index(r.site): (r.old, r.new) for r in spec.requests}
            ops.append(_Op(spec.name, len(steps), len(steps) + len(part), changes))
            steps += part
        return tuple(steps), ops

    steps, ops = steps_of(mutation)
    if mutation is not None:
        # judged on the operations of `protocol` and of those the client runs besides it (optprobe's
        # registrations use the kprobe protocol), as safety judges it
        runs = {protocol} | resolve_client(client).also_runs
        own = [i for i, spec in enumerate(specs) if spec.protocol in runs]
        base, plain = steps_of(None)
        if all(steps[ops[i].first : ops[i].end] == base[plain[i].first : plain[i].end] for i in own):
            raise ConfigError(f"--mutation {mutation} changes nothing in --protocol {protocol} (client {client})")
    model = _Model(steps, ops, addrs, boot, cpus, xmc_rule, nmis, int3, probes, client == "optprobe")
    model.count_at_delivery = count_at_delivery
    graph = nx.DiGraph() if keep_graph else None
    states, transitions, complete, violations = _search(model.initial(), model.successors, max_states, graph)
    scope = f"{cpus} workload CPU(s), {sites} site(s)" + (f", {nmis} NMI(s) each" if nmis else "")
    scope += ", NMIs counted in at delivery" if nmis and count_at_delivery else ""
    if client != "ftrace" or operation != "enable":
        scope = f"{client} {operation} ({what}), " + scope
    if int3 != "emulate":
        scope += f", #BP handler {int3}"
    return ExploreResult(
        protocol, mutation, cpus, sites, states, transitions, complete, violations, graph, scope, client, operation
    )


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
