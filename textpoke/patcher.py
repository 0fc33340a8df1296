"""The patcher: validates patch requests and performs protocol steps on the machine.

This is the one place where protocols (`textpoke.protocols`, pure step sequences) meet the machine.
Each operation runs as an agent on the patcher CPU (CPU 0 by default): every step costs cycles on
that CPU's clock, a sync really sends IPIs and really waits for each CPU to take them, and a CPU with
interrupts off really delays it.

Rules
-----
1. Validation happens before anything is written: a bad request raises `PatchError` naming the site
   and the reason, and the text is left exactly as it was.
2. The #BP descriptors are published before the first int3 and withdrawn only after the final sync
   (unless a mutation says otherwise); withdrawing waits until no handler holds a reference.
3. Operations are serialized (Linux holds text_mutex): one at a time.
4. Hung or merely slow. A wait (a sync, the stop_machine rendezvous and release, the withdrawal of
   the descriptors) that sees no progress -- no further CPU acknowledging, no reference dropped --
   for `stall` cycles is *hung*: a CPU can never answer (it died or spins with interrupts off), as a
   kernel would hang; that is reported (`PatchReport.hung`) and judged by the oracle. `stall` is
   derived from the cost model and the longest interrupts-off section a workload runs, so that one
   CPU's slowest legitimate answer always fits in it. Separately, the whole operation has a cycle
   budget that grows with its work (its steps, the CPUs, the costs); running out of it while the
   waits are still making progress leaves the operation *incomplete* (`PatchReport.incomplete`):
   no verdict either way, never a violation. The patching CPU is a CPU like any other: if it
   crashes, or never comes back from an interrupt handler to run the agent, the operation is hung.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from cpus import (
    AgentStuck,
    AgentTimeout,
    Delay,
    Fine,
    Machine,
    SendIpi,
    Serialize,
    TextpokeError,
    Vector,
    WaitUntil,
    WriteText,
)
from cpus.disasm import describe, insn_length
from cpus.layout import TEXT_ALIAS_VA, TEXT_VA

from . import bpdesc
from .image import (
    FTRACE_MODIFYING,
    FTRACE_NOP,
    KPROBE_TABLE,
    MOD_CODE_IP,
    MOD_CODE_NEW,
    MOD_CODE_WRITE_FLAG,
    NMI_RUNNING,
    STOP_DISABLE_IRQ,
    STOP_EXIT,
    STOP_NUM_THREADS,
    STOP_PREPARE,
    STOP_RUN,
    STOP_STAGE_NAMES,
    STOP_STATE,
    STOP_THREAD_ACK,
    KernelImage,
    Percpu,
    call_bytes,
)
from .kprobes import KprobeState, out_of_line_problem
from .kprobes import probe_spec as kprobe_spec
from .plugins import resolve_protocol
from .protocols import (
    INT3,
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
    ftrace_modify_all_code,
    mutate,
)
from .stepcheck import nmi_unsafe

__all__ = ["NMI_UNSAFE_PROTOCOLS", "NmiReachableWarning", "PatchError", "PatchReport", "Patcher", "SyncRecord"]

#: the built-in protocols during which an NMI can execute a site while it is being written; the
#: patcher decides from any protocol's steps (`textpoke.stepcheck.nmi_unsafe`)
NMI_UNSAFE_PROTOCOLS = frozenset({"stop-machine", "naive-bytes", "naive-atomic"})


class NmiReachableWarning(UserWarning):
    """A protocol that is not NMI-safe was asked to patch a site the NMI handler can reach."""


class PatchError(TextpokeError, ValueError):
    """A patch request was refused; nothing was written."""


@dataclass(frozen=True, slots=True)
class SyncRecord:
    label: str
    start: int
    end: int
    targets: tuple[int, ...]
    #: per target: cycles from the IPI's send to the moment the patcher saw its acknowledgement
    acked_after: tuple[int, ...]

    @property
    def wait(self) -> int:
        return self.end - self.start


@dataclass
class PatchReport:
    """What one operation cost and did."""

    protocol: str
    mutation: str | None
    requests: tuple[PatchRequest, ...]
    start: int = 0
    end: int = 0
    syncs: list[SyncRecord] = field(default_factory=list)
    ipis: int = 0
    rendezvous: int = 0  # cycles the patcher waited for every CPU to stop (stop_machine)
    release: int = 0  # cycles it waited for them to leave
    #: (stage, start, end) of every multi_cpu_stop stage, as the caller saw its barrier open and close
    stages: list[tuple[str, int, int]] = field(default_factory=list)
    ipi_sends: int = 0  # ICR writes (an all-but-self shorthand is one for every target)
    nmi_wait: int = 0  # cycles the modifier waited for NMIs to leave their handlers (stop-machine-ftrace)
    steps: tuple[Step, ...] = ()
    hung: str | None = None  # what the patcher was still waiting for when it was given up
    #: why the operation was abandoned although it was making progress (its cycle budget ran out)
    incomplete: str | None = None
    #: (start, end, what) for every step the patcher performed: its phases on a timeline
    phases: list[tuple[int, int, str]] = field(default_factory=list)
    grace_wait: int = 0  # cycles spent waiting for grace periods (kprobe slots, optprobes)

    @property
    def latency(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Operation:
    """Told to listeners (the oracle) when an operation starts and ends."""

    requests: tuple[PatchRequest, ...]
    protocol: str
    skip_mode: bool


def _decode_for_int3(req: PatchRequest) -> tuple[int, int]:
    """(opcode, target) the #BP handler emulates for the new instruction at `req.site`."""
    new, site, n = req.new, req.site, len(req.new)
    if new == FTRACE_NOP or (n == 2 and new == b"\x66\x90"):
        return bpdesc.OPCODE_JMP, site + n
    if n == 5 and new[0] == 0xE8:
        return bpdesc.OPCODE_CALL, (site + 5 + struct.unpack("<i", new[1:])[0]) & (2**64 - 1)
    if n == 5 and new[0] == 0xE9:
        return bpdesc.OPCODE_JMP, (site + 5 + struct.unpack("<i", new[1:])[0]) & (2**64 - 1)
    if n == 2 and new[0] == 0xEB:
        return bpdesc.OPCODE_JMP, (site + 2 + struct.unpack("<b", new[1:])[0]) & (2**64 - 1)
    if new[0] == 0xC3 and (new[1:] == bytes([0xCC]) * (n - 1) or _ret_over_first_byte(req)):
        return bpdesc.OPCODE_RET, 0
    raise PatchError(
        f"site {site:#x}: the int3 handler cannot emulate {new.hex(' ')} ({describe(new, site)}); "
        "text_poke_bp handles call, jmp, ret and the 5-byte nop"
    )


def _int3_padded(new: bytes) -> bool:
    """`new` is one instruction that never falls through (ret, jmp) followed only by int3 padding:
    Linux's text_poke_bp accepts such a replacement of a longer site (a static call set to NULL
    becomes `ret; int3; int3; int3; int3`), and nothing else shorter than the site."""
    n = insn_length(new)
    return n is not None and n < len(new) and new[0] in (0xC3, 0xE9, 0xEB) and set(new[n:]) == {0xCC}


def _ret_over_first_byte(req: PatchRequest) -> bool:
    """A `ret` written over the first byte alone, the old tail left behind: Linux 5.10 to 5.16 set a
    static call's tail site to NULL this way (a one-byte text_poke_bp), before the int3 padding."""
    return req.new[0] == 0xC3 and req.new[1:] == req.old[1:]


def _phase_name(step: Step) -> str:
    if isinstance(step, Poke):
        return f"write {step.phase}"
    if isinstance(step, Sync):
        return f"sync {step.label}"
    return type(step).__name__.lower()


class _Hung(Exception):
    """Raised inside the agent when a wait made no progress for `Patcher.stall` cycles."""

    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


#: cycles a wait may go without progress before it is hung, before the costs are added
_STALL_BASE = 1_000_000
#: the cycle budget of an operation is its stall window plus this many times its expected cost
_BUDGET_FACTOR = 20


class Patcher:
    """Runs patch operations on the patcher CPU.

    `timeout`: the cycle budget of each operation (None: derived from its work, see rule 4);
    `stall`: cycles without progress after which a wait is hung (None: derived from the cost model
    and the workloads' interrupts-off sections); `ipi_shorthand`: when every CPU is online, a sync is
    one all-but-self ICR write, as Linux sends it; otherwise (or with False) one ICR write per target
    CPU."""

    def __init__(
        self,
        machine: Machine,
        kernel: KernelImage,
        skip_mode: bool = False,
        timeout: int | None = None,
        stall: int | None = None,
        ipi_shorthand: bool = True,
    ) -> None:
        self.m = machine
        self.timeout = timeout
        self._stall = stall
        self.kernel = kernel
        self.cpu = machine.config.patcher_cpu
        self.skip_mode = skip_mode
        self.ipi_shorthand = ipi_shorthand
        self._stop_exit_before: dict[int, int] = {}
        self.reports: list[PatchReport] = []
        self.listeners: list[object] = []
        self._busy = False
        self._kprobes: KprobeState | None = None

    # ------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------
    def validate(self, requests: Sequence[PatchRequest], protocol: str) -> tuple[PatchRequest, ...]:
        try:
            resolve_protocol(protocol)
        except ValueError as err:
            raise PatchError(str(err)) from None
        if not requests:
            raise PatchError("nothing to patch: no sites given")
        sites = self.m.coherence.sites
        seen: list[tuple[int, int]] = []
        for r in requests:
            where = f"site {r.site:#x}"
            if not isinstance(r, PatchRequest):
                raise PatchError(f"{r!r} is not a PatchRequest")
            if not self.m.is_text(r.site, len(r.new)):
                raise PatchError(f"{where} is not inside the kernel text")
            if r.site not in self.kernel.boundaries:
                raise PatchError(f"{where} is not an instruction boundary")
            if r.site not in sites:
                raise PatchError(f"{where} ({self._first_insn(r.site)}) is not a patchable site")
            if len(r.new) != sites[r.site]:
                raise PatchError(f"{where}: replacement is {len(r.new)} bytes, the site is {sites[r.site]}")
            for lo, hi in seen:
                if lo < r.site + len(r.new) and r.site < hi:
                    raise PatchError(f"{where} overlaps the request at {lo:#x}")
            seen.append((r.site, r.site + len(r.new)))
            here = self.m.read(r.site, len(r.old))
            if here != r.old:
                raise PatchError(
                    f"{where} holds {here.hex(' ')} ({describe(here, r.site)}), not the expected {r.old.hex(' ')}"
                )
            if (
                insn_length(r.new) != len(r.new)
                and not _int3_padded(r.new)
                and not _ret_over_first_byte(r)
                and not self._probe_bytes(r)
            ):
                raise PatchError(
                    f"{where}: {r.new.hex(' ')} is not one {len(r.new)}-byte instruction "
                    "(nor a ret or jmp padded with int3)"
                )
        return tuple(requests)

    def _probe_bytes(self, r: PatchRequest) -> bool:
        """The new bytes of a probe site are legal without being one instruction: an int3 over the
        first byte of what is there (a kprobe), or the site's original bytes restored."""
        boot = self.kernel.patchable.get(r.site)
        return r.new == boot or (r.new[0] == INT3 and r.new[1:] in (r.old[1:], (boot or b"")[1:]))

    def _first_insn(self, site: int) -> str:
        """The disassembly of the one instruction at `site` (text permitting: at most 15 bytes)."""
        code = self.m.read(site, max(1, min(15, self.m.text_hi - site)))
        return describe(code[: insn_length(code) or len(code)], site)

    def _warn_nmi_reachable(self, reqs: Sequence[PatchRequest], protocol: str) -> None:
        from .callgraph import build_callgraph, reachable_sites

        text = self.m.read(self.m.text_lo, self.m.text_hi - self.m.text_lo)
        reach = reachable_sites(build_callgraph(self.kernel, text), "nmi_handler")
        hit = sorted(name for name, site in reach.items() if any(r.site == site for r in reqs))
        if hit:
            warnings.warn(
                NmiReachableWarning(
                    f"{protocol} is not NMI-safe, and the NMI handler can reach {', '.join(hit)}: an NMI may "
                    "execute a site while it is being written"
                ),
                stacklevel=3,
            )

    # ------------------------------------------------------------------------------------------
    # Operations users expect
    # ------------------------------------------------------------------------------------------
    def tracer(self, name: str) -> int:
        if name not in ("ftrace_caller", "ftrace_caller_alt"):
            raise PatchError(f"unknown tracer {name!r}; choose ftrace_caller or ftrace_caller_alt")
        return self.kernel.symbols[name]

    def _sites(self, sites: Iterable[int] | None) -> list[int]:
        return sorted(self.kernel.sites.values()) if sites is None else list(sites)

    def enable_ftrace(
        self,
        sites: Iterable[int] | None = None,
        protocol: str = "bp-batch",
        tracer: str = "ftrace_caller",
        **kw,
    ) -> PatchReport:
        target = self.tracer(tracer)
        reqs = [PatchRequest(s, FTRACE_NOP, call_bytes(s, target)) for s in self._sites(sites)]
        return self.patch(reqs, protocol, **kw)

    def disable_ftrace(self, sites: Iterable[int] | None = None, protocol: str = "bp-batch", **kw) -> PatchReport:
        reqs = [PatchRequest(s, self.m.read(s, 5), FTRACE_NOP) for s in self._sites(sites)]
        for r in reqs:
            if r.old == FTRACE_NOP or r.old[0] != 0xE8:
                raise PatchError(f"site {r.site:#x} is not enabled ({describe(r.old, r.site)})")
        return self.patch(reqs, protocol, **kw)

    def retarget(
        self,
        sites: Iterable[int] | None = None,
        tracer: str = "ftrace_caller_alt",
        protocol: str = "bp-batch",
        **kw,
    ) -> PatchReport:
        target = self.tracer(tracer)
        reqs = []
        for s in self._sites(sites):
            old = self.m.read(s, 5)
            if old[0] != 0xE8:
                raise PatchError(f"site {s:#x} is not enabled ({describe(old, s)}): nothing to retarget")
            reqs.append(PatchRequest(s, old, call_bytes(s, target)))
        return self.patch(reqs, protocol, **kw)

    def patch(
        self, requests: Sequence[PatchRequest], protocol: str = "bp-batch", mutation: str | None = None
    ) -> PatchReport:
        """Validate, then perform `protocol` (optionally mutated) for `requests`; returns its report."""
        if self._busy:
            raise PatchError("an operation is already in progress (text_mutex is held)")
        reqs = self.validate(requests, protocol)
        try:
            steps = build(protocol, reqs, mutation)
        except ValueError as err:
            raise PatchError(str(err)) from None
        for step in steps:  # the #BP handler must be able to emulate every instruction it stands in for
            if isinstance(step, Publish):
                for r in step.requests:
                    _decode_for_int3(r)
        if nmi_unsafe(steps, reqs):
            self._warn_nmi_reachable(reqs, protocol)
        return self._run([(reqs, steps)], protocol, mutation)

    def patch_in_turn(
        self, parts: Sequence[Sequence[PatchRequest]], protocol: str = "bp", mutation: str | None = None
    ) -> PatchReport:
        """Perform `protocol` for each list of requests in turn, as one report; listeners see each
        list as an operation of its own. What static_call_update does: the trampoline, then every
        site, each its own text_poke_bp. Every list is validated before anything is written."""
        if self._busy:
            raise PatchError("an operation is already in progress (text_mutex is held)")
        parts = [tuple(p) for p in parts if p]
        if not parts:
            raise PatchError("nothing to patch: no sites given")
        built: list[tuple[tuple[PatchRequest, ...], tuple[Step, ...]]] = []
        seen: set[int] = set()
        for part in parts:
            reqs = self.validate(part, protocol)
            again = seen.intersection(r.site for r in reqs)
            if again:
                raise PatchError(f"site {min(again):#x} is patched twice in one operation")
            seen.update(r.site for r in reqs)
            try:
                steps = build(protocol, reqs, mutation)
            except ValueError as err:
                raise PatchError(str(err)) from None
            for step in steps:
                if isinstance(step, Publish):
                    for r in step.requests:
                        _decode_for_int3(r)
            if nmi_unsafe(steps, reqs):
                self._warn_nmi_reachable(reqs, protocol)
            built.append((reqs, steps))
        return self._run(built, protocol, mutation)

    def ftrace_modify_all_code(
        self,
        enable: bool,
        sites: Iterable[int] | None = None,
        mutation: str | None = None,
    ) -> PatchReport:
        """Enable (or disable) ftrace on `sites` as Linux's ftrace_modify_all_code sequences it on x86:
        the trampoline's ftrace_call is pointed at ftrace_ops_list_func, the sites are patched in
        queued text_poke_bp batches, and, since the final tracer function is not the list function,
        a sync round on the other CPUs precedes pointing ftrace_call at it (the function tracer when
        enabling, ftrace_stub when disabling). Each piece is an operation of its own for listeners."""
        site_list = self._sites(sites)
        call = self.kernel.trampoline_sites.get("ftrace_call")
        if call is None:
            raise PatchError(
                "this kernel's ftrace trampoline has no patchable ftrace_call (kernels built with --object)"
            )
        sym = self.kernel.symbols
        now = self.m.read(call, 5)
        to_list = call_bytes(call, sym["ftrace_ops_list_func"])
        final = call_bytes(call, sym["function_tracer" if enable else "ftrace_stub"])
        first = PatchRequest(call, now, to_list)
        last = PatchRequest(call, to_list, final)
        if enable:
            reqs = [PatchRequest(s, FTRACE_NOP, call_bytes(s, sym["ftrace_caller"])) for s in site_list]
        else:
            reqs = [PatchRequest(s, self.m.read(s, 5), FTRACE_NOP) for s in site_list]
            for r in reqs:
                if r.old[0] != 0xE8:
                    raise PatchError(f"site {r.site:#x} is not enabled ({describe(r.old, r.site)})")
        if self._busy:
            raise PatchError("an operation is already in progress (text_mutex is held)")
        self.validate([first], "bp")
        self.validate(reqs, "bp-batch")
        steps = ftrace_modify_all_code(first, reqs, last)
        if mutation:
            try:
                steps = mutate(steps, mutation)
            except ValueError as err:
                raise PatchError(str(err)) from None
        # listeners see three operations: ftrace_call, the sites, ftrace_call again
        parts: list[tuple[tuple[PatchRequest, ...], tuple[Step, ...]]] = []
        cut = [i + 1 for i, st in enumerate(steps) if isinstance(st, Withdraw)]
        first_end = cut[0]
        last_start = next(i for i, st in enumerate(steps) if isinstance(st, Sync) and not st.local)
        parts.append(((first,), steps[:first_end]))
        parts.append((tuple(reqs), steps[first_end:last_start]))
        parts.append(((last,), steps[last_start:]))
        return self._run(parts, "ftrace-linux", mutation)

    def _run(
        self,
        parts: Sequence[tuple[tuple[PatchRequest, ...], tuple[Step, ...]]],
        protocol: str,
        mutation: str | None,
    ) -> PatchReport:
        """Perform the steps of each part in turn, as one report; listeners are told when each
        part's operation (its requests) starts and ends."""
        all_reqs = tuple(r for reqs, _ in parts for r in reqs)
        all_steps = tuple(st for _, steps in parts for st in steps)
        report = PatchReport(protocol, mutation, all_reqs, steps=all_steps)
        ops = [Operation(reqs, protocol, self.skip_mode) for reqs, _ in parts]
        self._busy = True
        current: list[Operation] = []

        def agent():
            report.start = self._now()
            modifying = any(isinstance(st, ModCode) for st in all_steps)
            if modifying:
                self.m.write(FTRACE_MODIFYING, struct.pack("<Q", 1))  # ftrace_arch_code_modify_prepare
            for op, (_, steps) in zip(ops, parts, strict=True):
                current[:] = [op]
                for li in self.listeners:
                    getattr(li, "on_op_start", lambda *_: None)(op, self._now())
                yield from self._agent(steps, report)
                if report.hung is not None:
                    break  # a wait without progress: the operation is hung here
                for li in self.listeners:
                    getattr(li, "on_op_end", lambda *_: None)(op, self._now())
            if modifying:
                self.m.write(FTRACE_MODIFYING, struct.pack("<Q", 0))
            report.end = self._now()

        budget = self.timeout if self.timeout is not None else self.budget(all_steps)
        try:
            try:
                self.m.run_agent(self.cpu, agent(), limit=budget)
            except AgentStuck as lost:
                # the patching CPU itself died or hangs in a handler: the operation never ends
                report.hung = lost.why
                report.end = self._now()
                for op in current:
                    for li in self.listeners:
                        getattr(li, "on_op_hang", lambda *_: None)(op, report.end, str(lost))
            except AgentTimeout as timeout:
                report.incomplete = f"{timeout} while still making progress"
                report.end = self._now()
                for op in current:
                    for li in self.listeners:
                        getattr(li, "on_op_incomplete", lambda *_: None)(op, report.end, report.incomplete)
            else:
                if report.hung is not None:
                    why = f"no progress for {self.stall:,} cycles (waiting for {report.hung})"
                    for op in current:
                        for li in self.listeners:
                            getattr(li, "on_op_hang", lambda *_: None)(op, report.end, why)
        finally:
            self._busy = False
        self.reports.append(report)
        return report

    # ------------------------------------------------------------------------------------------
    # Limits (rule 4)
    # ------------------------------------------------------------------------------------------
    @property
    def stall(self) -> int:
        """Cycles a wait may go without progress before the operation is hung: room for one CPU's
        slowest legitimate answer (the IPI on its way, the longest interrupts-off section of any
        workload, the stopper's wakeup, the handler's entry and return), many times over."""
        if self._stall is not None:
            return self._stall
        c = self.m.costs
        ncpu = len(self.m.cpus)
        irqoff = max(
            self.m.percpu(i, Percpu.IRQOFF_LEN) if self.m.percpu(i, Percpu.IRQOFF_MASK) else 0 for i in range(ncpu)
        )
        answer = c.ipi_send * ncpu + c.ipi_latency + c.stopper_wakeup + 2 * (c.event_entry + c.iret + c.poll)
        return _STALL_BASE + 10 * answer + 4 * irqoff * 3 * c.instruction

    def budget(self, steps: Sequence[Step]) -> int:
        """The cycle budget of an operation made of `steps`: its stall window plus many times what
        the steps are expected to cost (every text write, every wait of every CPU)."""
        c = self.m.costs
        ncpu = len(self.m.cpus)
        wait = c.ipi_send * ncpu + c.ipi_latency + c.stopper_wakeup + 4 * (c.event_entry + c.iret + c.poll)
        wait += 4 * self.m.config.quantum * c.instruction
        expected = 0
        for step in steps:
            if isinstance(step, Poke):
                expected += c.text_write
            elif isinstance(step, Publish):
                expected += c.poll * (1 + len(step.requests))
            else:
                expected += wait
        return self.stall + _BUDGET_FACTOR * expected

    # ------------------------------------------------------------------------------------------
    # The agent: steps -> machine actions
    # ------------------------------------------------------------------------------------------
    def _wait(self, done: Callable[[], bool], label: str, progress: Callable[[], object]):
        """Spin until `done()`; raise `_Hung` when `progress()` has not changed for `stall` cycles.
        While the wait goes on, the predicate answers exactly as `done()` does, so a run that does
        not hang is the same run, cycle for cycle, whatever the limits."""
        limit = self.stall
        state = {"key": progress(), "since": self._now(), "hung": False}

        def predicate() -> bool:
            if done():
                return True
            now, key = self._now(), progress()
            if key != state["key"]:
                state["key"], state["since"] = key, now
            elif now - state["since"] >= limit:
                state["hung"] = True
                return True
            return False

        yield WaitUntil(predicate, label)
        if state["hung"]:
            raise _Hung(label)

    def _counter(self, offset: int, cpus: tuple[int, ...]) -> Callable[[], int]:
        """The sum of a per-CPU counter over `cpus`: a wait's progress."""
        m = self.m
        return lambda: sum(m.percpu(c, offset) for c in cpus)

    def _targets(self) -> tuple[int, ...]:
        return tuple(c.index for c in self.m.cpus if c.index != self.cpu and c.runnable)

    def _now(self) -> int:
        return self.m.cpus[self.cpu].clock

    def _wait_all(self, offset: int, before: dict[int, int], label: str) -> Callable[[], bool]:
        m = self.m

        def done() -> bool:
            return all(m.percpu(c, offset) > n or not m.cpus[c].runnable for c, n in before.items())

        return done

    def _agent(self, steps: Sequence[Step], report: PatchReport):
        yield Fine(True)
        try:
            yield from self._steps(steps, report)
        except _Hung as hang:
            report.hung = hang.label
        yield Fine(False)
        report.end = self._now()

    def _steps(self, steps: Sequence[Step], report: PatchReport):
        m = self.m
        for i, step in enumerate(steps):
            t_step = self._now()
            if isinstance(step, Publish):
                descs = []
                for r in step.requests:
                    opcode, target = _decode_for_int3(r)
                    descs.append(bpdesc.PokeDescriptor(r.site, target, len(r.new), opcode))
                bpdesc.publish(m, descs)
                yield Delay(m.costs.poll * (1 + len(descs) // 4))
            elif isinstance(step, Poke):
                yield WriteText(step.addr, step.data, cost=self._poke_cost(steps, i))
            elif isinstance(step, Sync):
                yield from self._sync(step.label, Percpu.IPI_COUNT, Vector.IPI, report, local=step.local)
            elif isinstance(step, ModCode):
                yield from self._mod_code(step, report)
            elif isinstance(step, Withdraw):
                if not bpdesc.drop_ref(m):
                    m.trace.add((self._now(), self.cpu, "refs-corrupt", "bp_desc refs already 0 at withdrawal"))
                yield from self._wait(lambda: bpdesc.read_refs(m) == 0, "bp_desc refs", lambda: bpdesc.read_refs(m))
            elif isinstance(step, (KprobeRegister, KprobeUnregister, GracePeriod, FreeSlot)):
                yield from self._probe_step(step, report)
            elif isinstance(step, Rendezvous):
                t0 = self._now()
                yield from self._rendezvous(report)
                report.rendezvous += self._now() - t0
            elif isinstance(step, Release):
                t0 = self._now()
                yield from self._release(report)
                report.release += self._now() - t0
            else:  # pragma: no cover - the Step union is closed
                raise PatchError(f"unknown step {step!r}")
            report.phases.append((t_step, self._now(), _phase_name(step)))

    def _poke_cost(self, steps: Sequence[Step], i: int) -> int | None:
        """What the store of `steps[i]` costs the agent, paid after it: a whole text_poke, or, for a
        copy stored in pieces, a couple of instructions between the pieces and the rest of the
        text_poke after the last one (so the pieces are stored back to back, as memcpy does)."""
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        more = isinstance(nxt, Poke) and nxt.part
        if not more and not steps[i].part:  # type: ignore[union-attr]
            return None
        insn = 2 * self.m.costs.instruction
        if more:
            return insn
        pieces = 1
        while steps[i - pieces].part:  # type: ignore[union-attr]
            pieces += 1
        return max(insn, self.m.costs.text_write - pieces * insn)

    # -- kprobes ------------------------------------------------------------------------------------
    @property
    def kprobes(self) -> KprobeState:
        if self._kprobes is None:
            self._kprobes = KprobeState(self.kernel)
        return self._kprobes

    def _probe_step(self, step, report: PatchReport):
        m = self.m
        kp = self.kprobes
        if isinstance(step, KprobeRegister):
            spec = kp.spec(step.site)
            slot, code, resume = kp.prepare(spec, self.m.read(step.site, max(spec.insn_len, spec.copy_len)))
            yield WriteText(slot, code)  # text_poke of the out-of-line copy
            entry, data = kp.link(spec, resume)
            m.write(entry + 8, data[8:])
            m.write(KPROBE_TABLE, struct.pack("<Q", kp.in_use))
            m.write(entry, data[:8])  # the address last: the entry is live once it matches
            yield Delay(m.costs.poll)
        elif isinstance(step, KprobeUnregister):
            m.write(kp.unlink(step.site), bytes(8))
            yield Delay(m.costs.poll)
        elif isinstance(step, FreeSlot):
            slot, size = kp.free(step.site)
            yield WriteText(slot, bytes([INT3]) * size)
        else:
            yield from self._grace_period(step.label, report)

    def _grace_period(self, label: str, report: PatchReport):
        """synchronize_rcu_tasks, as this machine can tell it: every other online CPU has passed a
        quiescent point since now -- its workload finished an iteration (`Percpu.LOOPS`), so its base
        context left every probed function and every interrupt, NMI or #BP it was inside has
        returned --, or it went offline. The patching CPU is in its base context while it waits."""
        m = self.m
        targets = self._targets()
        before = {c: m.percpu(c, Percpu.LOOPS) for c in targets}
        t0 = self._now()
        done = self._wait_all(Percpu.LOOPS, before, label)
        yield from self._wait(done, f"grace period ({label})", self._counter(Percpu.LOOPS, targets))
        report.grace_wait += self._now() - t0

    def kprobe_requests(self, addresses: Iterable[int], arm: bool) -> list[PatchRequest]:
        """The requests that arm (or disarm) kprobes at `addresses`, after the checks Linux's
        register_kprobe makes that apply here: raise `PatchError`, with nothing written, for an
        address outside the text, not at an instruction boundary, at an instruction a kprobe cannot
        run out of line, or that is no probe point this kernel watches."""
        out = []
        for a in addresses:
            where = f"address {a:#x}"
            if not self.m.is_text(a):
                raise PatchError(f"{where} is not inside the kernel text")
            if a not in self.kernel.boundaries:
                raise PatchError(f"{where} is not an instruction boundary")
            spec = kprobe_spec(self.kernel, a)
            boot = self.kernel.patchable.get(a) if spec is not None else None
            code = boot if boot is not None else self.m.read(a, max(1, min(15, self.m.text_hi - a)))
            why = out_of_line_problem(code, a)
            if why:
                raise PatchError(f"{where}: kprobes cannot run it out of line: {why}")
            if spec is None or boot is None:
                raise PatchError(
                    f"{where} ({self._first_insn(a)}) is not a probe point of this kernel: build it with "
                    "probes (each traced function has a kprobe point and an optprobe range)"
                )
            now = self.m.read(a, len(boot))
            if arm:
                if now != boot:
                    raise PatchError(f"{where} is already probed or patched ({now.hex(' ')})")
                out.append(PatchRequest(a, boot, bytes([INT3]) + boot[1:]))
            else:
                if now != bytes([INT3]) + boot[1:]:
                    raise PatchError(f"{where} holds no armed kprobe ({now.hex(' ')})")
                out.append(PatchRequest(a, now, boot))
        return out

    def optprobe_requests(self, addresses: Iterable[int], optimize: bool) -> list[PatchRequest]:
        """The requests that optimize armed probes at `addresses` (int3 + tail -> jmp rel32 to the
        detour buffer) or unoptimize them (jmp -> int3 + the original tail)."""
        out = []
        for a in addresses:
            spec = kprobe_spec(self.kernel, a)
            if spec is None or not spec.optimizable:
                raise PatchError(f"address {a:#x} is not an optprobe range of this kernel")
            boot = self.kernel.patchable[a]
            armed = bytes([INT3]) + boot[1:]
            now = self.m.read(a, len(boot))
            buf = self.kprobes.slot_of(a)
            if buf is None:
                raise PatchError(f"address {a:#x}: no probe is registered there (register it first)")
            jmp = b"\xe9" + struct.pack("<i", buf - (a + 5))
            if optimize:
                if now != armed:
                    raise PatchError(f"address {a:#x} holds no armed kprobe ({now.hex(' ')})")
                out.append(PatchRequest(a, armed, jmp))
            else:
                if now != jmp:
                    raise PatchError(f"address {a:#x} is not optimized ({now.hex(' ')})")
                out.append(PatchRequest(a, jmp, armed))
        return out

    # -- stop_machine: multi_cpu_stop with the caller taking part ---------------------------------
    def _stop_ack(self, state: int) -> None:
        """The caller's ack_state: an atomic decrement of the shared count; the last CPU to ack re-arms
        it and publishes the next stage (an agent step is atomic against guest instructions)."""
        m = self.m
        left = m.read_u64(STOP_THREAD_ACK) - 1
        m.write(STOP_THREAD_ACK, struct.pack("<Q", left))
        if left == 0:
            m.write(STOP_THREAD_ACK, struct.pack("<Q", m.read_u64(STOP_NUM_THREADS)))
            m.write(STOP_STATE, struct.pack("<Q", state + 1))

    def _stage(self, state: int, report: PatchReport, t_open: int):
        """Act on `state` as a stopper does (ack it), then wait for its barrier to open."""
        m = self.m
        self._stop_ack(state)
        yield from self._wait(
            lambda: m.read_u64(STOP_STATE) != state,
            f"stop_machine {STOP_STAGE_NAMES[state]} barrier",
            lambda: m.read_u64(STOP_THREAD_ACK),
        )
        report.stages.append((STOP_STAGE_NAMES[state], t_open, self._now()))

    def _rendezvous(self, report: PatchReport):
        """stop_machine's start: arm the barrier for every online CPU, queue the work on each other
        CPU's stopper (a wakeup IPI each), then run multi_cpu_stop here too: PREPARE, DISABLE_IRQ, up
        to RUN, where the function (the writes) runs on this, the active, CPU."""
        m = self.m
        targets = self._targets()
        threads = len(targets) + 1
        self._stop_exit_before = {c: m.percpu(c, Percpu.STOP_EXIT) for c in targets}
        m.write(STOP_NUM_THREADS, struct.pack("<Q", threads))
        m.write(STOP_THREAD_ACK, struct.pack("<Q", threads))
        m.write(STOP_STATE, struct.pack("<Q", STOP_PREPARE))
        t0 = self._now()
        yield SendIpi(targets, int(Vector.STOP))
        report.ipis += len(targets)
        report.ipi_sends += len(targets)
        yield from self._stage(STOP_PREPARE, report, t0)
        yield from self._stage(STOP_DISABLE_IRQ, report, report.stages[-1][2])

    def _release(self, report: PatchReport):
        """The function has run: ack RUN, pass EXIT, and wait until every stopper has returned
        (the caller of stop_machine waits for every queued work to complete)."""
        m = self.m
        t_run = report.stages[-1][2] if report.stages else self._now()
        yield from self._stage(STOP_RUN, report, t_run)
        t_exit = self._now()
        self._stop_ack(STOP_EXIT)
        left = self._wait_all(Percpu.STOP_EXIT, self._stop_exit_before, "release")
        yield from self._wait(left, "stop_machine exit", self._counter(Percpu.STOP_EXIT, tuple(self._stop_exit_before)))
        report.stages.append((STOP_STAGE_NAMES[STOP_EXIT], t_exit, self._now()))
        m.write(STOP_STATE, struct.pack("<Q", 0))

    # -- stop_machine ftrace: do_ftrace_mod_code ---------------------------------------------------
    def _mod_code(self, step: ModCode, report: PatchReport):
        """Write one site with NMIs in mind (x86 ftrace, 2.6.28-3.4): publish the write, wait until
        no NMI is inside its handler while setting the write flag (cmpxchg 0 -> flag), write the
        bytes (a 5-byte copy through the writable alias: 4 bytes, then 1), clear the flag, and wait
        again until no NMI runs. NMIs that start meanwhile perform the same write themselves
        (ftrace_nmi_enter). Without `nmi_write` the flag is never set: NMIs are only waited for."""
        m = self.m
        m.watch([step.site])  # before any NMI may store into it
        alias = TEXT_ALIAS_VA + (step.site - TEXT_VA)
        m.write(MOD_CODE_IP, struct.pack("<Q", alias))
        m.write(MOD_CODE_NEW, step.data.ljust(8, b"\0"))
        flag = MOD_CODE_WRITE_FLAG if step.nmi_write else 0
        shared = m.costs.poll  # a barrier or an atomic on the shared line
        yield Delay(shared)  # smp_mb: the pending write is visible before NMIs may perform it
        t0 = self._now()

        def set_flag() -> bool:  # wait_for_nmi_and_set_mod_flag: one cmpxchg(0 -> flag) per poll
            if m.read_u64(NMI_RUNNING) != 0:
                return False
            m.write(NMI_RUNNING, struct.pack("<Q", flag))
            return True

        def progress() -> object:
            # a CPU that died may have died inside its NMI handler: its count in nmi_running never
            # drops, and the others' NMIs coming and going are no progress towards zero
            if any(c.crash is not None for c in m.cpus):
                return "a CPU crashed"
            return m.read_u64(NMI_RUNNING)

        yield from self._wait(set_flag, "NMIs to leave before the write", progress)
        report.nmi_wait += self._now() - t0
        yield Delay(2 * shared)  # the cmpxchg that succeeded, smp_mb
        insn = m.costs.instruction
        yield WriteText(step.site, step.data[:4], cost=2 * insn)  # probe_kernel_write: a 5-byte copy
        yield WriteText(step.site + 4, step.data[4:], cost=2 * insn)
        yield Delay(shared)  # smp_mb: the write happens before the flag is cleared
        m.write(NMI_RUNNING, struct.pack("<Q", m.read_u64(NMI_RUNNING) & ~MOD_CODE_WRITE_FLAG))  # clear_mod_flag
        yield Delay(shared)
        t1 = self._now()
        yield from self._wait(lambda: m.read_u64(NMI_RUNNING) == 0, "NMIs to leave after the write", progress)
        report.nmi_wait += self._now() - t1

    # -- syncs --------------------------------------------------------------------------------------
    def _sync(
        self,
        label: str,
        offset: int,
        vector: int,
        report: PatchReport,
        record: bool = True,
        local: bool = True,
    ):
        """on_each_cpu(do_sync_core) (or, without `local`, smp_call_function): IPI every other online
        CPU -- one all-but-self shorthand when every CPU is online, else one send per target --, run
        the function here too, and wait until every target has run it."""
        m = self.m
        targets = self._targets()
        before = {c: m.percpu(c, offset) for c in targets}
        t0 = self._now()
        everyone = len(targets) == len(m.cpus) - 1
        if targets and everyone and self.ipi_shorthand:
            yield SendIpi(targets, int(vector), shorthand=True)
            report.ipi_sends += 1
        elif targets:
            yield SendIpi(targets, int(vector))
            report.ipi_sends += len(targets)
        report.ipis += len(targets)
        if local:
            yield Serialize()  # do_sync_core on the sending CPU
        acked: dict[int, int] = {}

        def done() -> bool:
            now = self._now()
            for c, n in before.items():
                if c not in acked and (m.percpu(c, offset) > n or not m.cpus[c].runnable):
                    acked[c] = now - t0
            return len(acked) == len(before)

        yield from self._wait(done, label, lambda: len(acked))
        if record:
            report.syncs.append(SyncRecord(label, t0, self._now(), targets, tuple(acked.get(c, 0) for c in targets)))
