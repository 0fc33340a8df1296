"""The emulated SMP machine: N x86_64 CPUs on one shared kernel text, and everything the hardware
supplies that Unicorn does not.

Theory of operation
-------------------
Each CPU is an `Engine` (one Unicorn instance) with a cycle clock. The scheduler always runs the CPU
that is furthest behind in simulated time (ties: lowest index) for one quantum of instructions drawn
from the seed; quanta are cut so that a timed event (an NMI from a source, an IPI's arrival, a snoop
point) lands exactly on an instruction boundary of its CPU at its time. Between quanta the machine
delivers what is due; during a quantum Unicorn calls back for the things only hardware does:

* `int3` and faults arrive through the interrupt hook: `int3` is delivered through its gate,
  everything else is a crash record (DESIGN.md 1.7);
* `iretq` is executed here, not by Unicorn: every `iretq` of the kernel starts a block of its own,
  and a block hook there pops the frame, checks it, unblocks NMIs, serializes, then delivers a
  latched NMI or a pending interrupt (a block hook, not a code hook: with count-sliced execution
  every code hook costs a check on every instruction of the machine);
* `popfq` is watched so that an interrupt held back by IF=0 is delivered right when IF comes back;
* the patchable sites are watched so the fetch-coherence model knows what each CPU executes there.

Serializing: only what the SDM lists as serializing drops a CPU's stale decoded copies -- here
`iretq` and `cpuid` (and an agent's own `Serialize`). Delivering an interrupt, exception or NMI does
not serialize: a handler runs whatever its CPU had decoded until it executes one of those.

Agents are Python programs that occupy a CPU instead of guest code (the patcher): generators that
yield actions (`Delay`, `WriteText`, `SendIpi`, `WaitUntil`, `Fine`, `Serialize`) costed on that
CPU's clock. An agent's CPU is still a CPU: the agent takes it over when it sits in its idle loop
(the image's `idle_range`, where the agent then "parks"), and an NMI that arrives between two of the
agent's steps (a WaitUntil poll is one step) is delivered there as anywhere else, with the parking
spot as its return address; the CPU runs the NMI entry and handler in guest code -- nesting, int3s
and latched NMIs included -- and the agent continues once the CPU is back in its idle loop, its
clock having run on meanwhile.

Time inside a quantum: events raised by the running CPU itself (int3, iretq) are stamped with the
quantum's start time plus the cycles charged so far; external events are exact.
"""

from __future__ import annotations

import heapq
import random
import struct
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from . import layout as L
from ._unicorn import Engine, HostMemory
from .boot import BootImage
from .coherence import FetchCoherence
from .config import MachineConfig
from .delivery import (
    FRED_NMI_BIT,
    RFLAGS_IF,
    Gate,
    NmiArrival,
    NmiState,
    Vector,
    decode_gate,
    encode_gate,
    entry_rflags,
    frame_base,
)
from .disasm import describe, insn_length
from .errors import AgentStuck, AgentTimeout, ConfigError, SimulatorBug
from .pool import POOL
from .scheduler import NO_HORIZON, deliver_due, hold, inside, run_exact, shared_code_hook, shared_entries
from .timer import start_timers
from .trace import Trace

__all__ = [
    "Agent",
    "Cpu",
    "Crash",
    "Delay",
    "Fine",
    "Instrument",
    "Machine",
    "SendIpi",
    "Serialize",
    "WaitUntil",
    "WriteText",
]

_EV_NMI = 0
_EV_IPI = 1
_EV_SNOOP = 2
_EV_CALL = 3

#: quanta in a row that execute nothing at the same instruction before the CPU is declared stuck
STUCK_QUANTA = 64
IST_NMI = 2  # Linux: IST_INDEX_NMI = ESTACK_NMI + 1
_GDT = struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
_CANONICAL_HI = 0xFFFF800000000000
_BP, _NMI, _STOP = int(Vector.BP), int(Vector.NMI), int(Vector.STOP)  # (enum lookups cost)
_FRAME = struct.Struct("<5Q")  # the frame event delivery pushes, lowest address first
_U64 = struct.Struct("<Q")
_words = lru_cache(maxsize=8)(lambda n: struct.Struct(f"<{n}Q"))
_decode_gate = lru_cache(maxsize=256)(decode_gate)  # a descriptor's bytes decide its gate


# --------------------------------------------------------------------------------------------
# Records and observers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Crash:
    """A CPU the guest killed: where, what it was executing, and the last things it did."""

    cpu: int
    time: int
    reason: str
    rip: int
    code: bytes  # bytes at RIP as the CPU saw them (empty when unmapped)
    disassembly: str
    tail: tuple[tuple, ...]

    def __str__(self) -> str:
        return (
            f"cpu{self.cpu} crashed at t={self.time}: {self.reason} at {self.rip:#x}: "
            f"{self.code.hex(' ') or '<unmapped>'} ({self.disassembly})"
        )


class Instrument(Protocol):
    """Observers of the machine (the safety oracle, recorders). Every method is optional."""

    def on_fetch(self, cpu: int, time: int, site: int, code: bytes) -> None: ...
    def on_text_write(self, cpu: int, time: int, addr: int, data: bytes) -> None: ...
    def on_serialize(self, cpu: int, time: int) -> None: ...
    def on_deliver(self, cpu: int, time: int, vector: int, frame: tuple[int, ...]) -> None: ...
    def on_iret(self, cpu: int, time: int, frame: tuple[int, ...], unblocked: bool) -> None: ...
    def on_nmi(self, cpu: int, time: int, outcome: str) -> None: ...
    def on_crash(self, crash: Crash) -> None: ...
    def on_probe(self, cpu: int, time: int, label: str) -> None: ...
    #: the machine hit a limit of the emulator after which the run is not the model's (`why`)
    def on_limit(self, cpu: int, time: int, why: str) -> None: ...


# --------------------------------------------------------------------------------------------
# Agent actions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Delay:
    cycles: int


@dataclass(frozen=True, slots=True)
class WriteText:
    """One store to text of `data` (atomic as a whole; split it to model a torn write)."""

    addr: int
    data: bytes
    #: cycles the store costs the agent (None: `costs.text_write`, a whole text_poke)
    cost: int | None = None


@dataclass(frozen=True, slots=True)
class SendIpi:
    """IPIs from the agent's CPU: one ICR write per target, or (`shorthand`) one ICR write with the
    all-but-self destination shorthand, which the APIC delivers to every other CPU (`targets` is
    then ignored)."""

    targets: tuple[int, ...]
    vector: int = int(Vector.IPI)
    shorthand: bool = False


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Spin (one poll every `costs.poll` cycles) until `predicate()` holds."""

    predicate: Callable[[], bool]
    label: str = ""


@dataclass(frozen=True, slots=True)
class Serialize:
    """The agent executes a serializing instruction (Linux's sync_core() on its own CPU)."""


@dataclass(frozen=True, slots=True)
class Fine:
    """Enter (True) or leave (False) fine-grained scheduling around a patch step."""

    on: bool


Action = Delay | WriteText | SendIpi | WaitUntil | Fine | Serialize
Agent = Generator[Action, None, Any]


class Cpu:
    """One CPU: its engine plus the state Unicorn lacks."""

    __slots__ = (
        "agent",
        "agent_done",
        "agent_result",
        "clock",
        "crash",
        "engine",
        "events",
        "extra",
        "flushes_seen",
        "halted",
        "held",
        "hold",
        "index",
        "nmi",
        "on_shared",
        "pending",
        "popf_hooks",
        "rip",
        "running",
        "stats",
        "stuck",
        "tentative",
    )

    def __init__(self, index: int, engine: Engine, fred: bool) -> None:
        self.index = index
        self.engine = engine
        self.nmi = NmiState(fred)
        self.pending: set[int] = set()  # maskable vectors waiting for IF=1
        self.clock = 0
        self.events: list[tuple[int, int, int, int, Any]] = []
        self.crash: Crash | None = None
        self.agent: Agent | None = None
        self.agent_result: Any = None
        self.agent_done = False
        self.extra = 0  # cycles charged by events during the running quantum
        self.rip: int | None = None  # RIP after the last quantum, None when it may have changed since
        self.tentative: tuple[int, int, bytes] | None = None
        self.stuck = 0  # consecutive quanta that ended where they started with nothing executed
        self.popf_hooks: list[int] = []
        self.halted = False
        self.running = False  # inside a quantum of the exact scheduler: now() counts its instructions
        self.held: int | None = None  # instructions run when the exact scheduler stopped the quantum
        self.hold = False  # the cycles charged at this boundary must pass before the next instruction
        #: the engine's count of code-buffer emptyings as the machine last accounted for it
        self.flushes_seen = engine.flush_count.value
        #: the exact scheduler's hook on shared code (None under the fine scheduler)
        self.on_shared: Callable[[object, int, int, object], None] | None = None
        self.stats = {
            "site_exec": 0,
            "instructions": 0,
            "quanta": 0,
            "nmi_raised": 0,
            "nmi_delivered": 0,
            "nmi_latched": 0,
            "nmi_dropped": 0,
            "ipi_received": 0,
            "ipi_delivered": 0,
            "int3": 0,
            "iret": 0,
            "serialize_drops": 0,
        }

    @property
    def alive(self) -> bool:
        return self.crash is None

    @property
    def runnable(self) -> bool:
        return self.crash is None and not self.halted

    def now(self) -> int:
        if self.running:
            eng = self.engine
            return self.clock + self.extra + (eng.base + eng._counter.value - eng.hook_adjust) * eng.insn_cost
        return self.clock + self.extra


class Machine:
    """N CPUs, one shared text, one shared data segment, private stacks and per-CPU areas."""

    def __init__(self, config: MachineConfig, image: BootImage, instruments: Iterable[object] = ()) -> None:
        if not isinstance(config, MachineConfig):
            raise ConfigError("Machine needs a MachineConfig")
        self.config = config
        self.image = image
        self.costs = config.costs
        n = config.cpus
        self.layout = L.Layout(n, len(image.text), L.DATA_RESERVED + len(image.data))
        lay = self.layout
        # engines kept by the last machine of this shape (`recycle`), on memories cleared here
        self._pool_key = (n, len(image.text), len(image.data), image.text)
        kept = POOL.take(self._pool_key)
        if kept is not None:
            self._mems, engines = kept
            for mem in self._mems:
                mem.clear()
            self.mem_percpu, self.mem_data, self.mem_text, self.mem_pt = self._mems
        else:
            self.mem_pt = HostMemory(L.PT_PA, len(lay.page_tables))
            self.mem_text = HostMemory(L.TEXT_PA, lay.text_size)
            self.mem_data = HostMemory(L.DATA_PA, lay.data_size)
            self.mem_percpu = HostMemory(L.PERCPU_PA, lay.percpu_size)
            self._mems = (self.mem_percpu, self.mem_data, self.mem_text, self.mem_pt)
            engines = [
                Engine(self._mems, L.PT_PA, L.GDT_VA, lay.percpu_va(i), L.KERNEL_CS, L.KERNEL_DS) for i in range(n)
            ]
        #: [lo, hi) of every text range written while the machine lives (`recycle` drops their blocks)
        self._written: list[tuple[int, int]] = []
        self._phys_cache: dict[tuple[int, int], tuple[HostMemory, int] | None] = {}
        #: each CPU's per-CPU block: (its host memory, the block's offset in it)
        self._percpu_at: list[tuple[HostMemory, int]] = []
        for i in range(n):
            loc = self._phys(lay.percpu_va(i), L.BLOCK.area_size)
            assert loc is not None  # the layout maps every block
            self._percpu_at.append((loc[0], loc[1] - loc[0].pa))
        self.mem_pt.write(L.PT_PA, lay.page_tables)
        self.mem_text.write(L.TEXT_PA, image.text)
        self.write(L.GDT_VA, _GDT)
        for vec, gate in image.gates.items():
            self.write(L.IDT_VA + 16 * int(vec), encode_gate(gate))
        self.write(L.IMAGE_DATA_VA, image.data)

        self.trace = Trace(n, keep=config.keep_trace)
        self.instruments = list(instruments)
        self._obs = {
            name: [f for i in self.instruments if (f := getattr(i, name, None))]
            for name in (
                "on_fetch",
                "on_text_write",
                "on_serialize",
                "on_deliver",
                "on_iret",
                "on_nmi",
                "on_crash",
                "on_probe",
                "on_limit",
            )
        }
        self._on_fetch = self._obs["on_fetch"]
        self._on_deliver = self._obs["on_deliver"]
        self._on_iret = self._obs["on_iret"]
        self._on_serialize = self._obs["on_serialize"]
        self._sched_rng = random.Random(f"{config.seed}/sched")
        self._snoop_rng = random.Random(f"{config.seed}/snoop")
        self._seq = 0
        self.fine = 0
        self.fine_until = 0
        self.hz_max = NO_HORIZON  # the exact scheduler's horizon for the running CPU (scheduler.py)
        self.quantum_rip = 0  # where the running quantum started (scheduler.py)
        self.closed = False
        self._pending_wait: dict[int, WaitUntil] = {}
        self._site_hooks: dict[int, list[int]] = {}  # watched site -> hook handle per CPU
        self._release: set[int] = set()  # sites to stop watching once no CPU holds them stale
        self._storing: int | None = None  # the CPU whose guest store into text is being recorded
        #: [lo, hi) of each unit of shared code, and those hooked at their entries only (a write into
        #: one hooks it at every block: `_text_written`)
        self._shared_units = [(lo, lo + n) for lo, n in image.shared_code]
        self._entry_hooked: list[tuple[int, int]] = []
        if config.interleave == "exact" and config.shared_hooks == "entries":
            self._entry_hooked = list(self._shared_units)
        self._shared_entries = shared_entries(image) if self._entry_hooked else ()
        self._deferred_drops: list[tuple[int, int, int]] = []  # (cpu, lo, hi) to drop after its quantum
        self.text_lo = L.TEXT_VA
        self.text_hi = L.TEXT_VA + len(image.text)

        self.cpus: list[Cpu] = [Cpu(i, eng, config.fred) for i, eng in enumerate(engines)]
        self.coherence = FetchCoherence(
            n,
            image.watch,
            self.read,
            self._drop_decoded,
            self._install_copy,
        )
        for cpu in self.cpus:
            self._boot(cpu)
        self._start_nmi_sources()
        start_timers(self)

    # ----------------------------------------------------------------------------------------
    # Boot
    # ----------------------------------------------------------------------------------------
    def _boot(self, cpu: Cpu) -> None:
        i = cpu.index
        lay = self.layout
        tss = bytearray(104)
        struct.pack_into("<Q", tss, 4, lay.kstack_top(i))  # RSP0
        struct.pack_into("<Q", tss, 0x24 + 8 * (IST_NMI - 1), lay.nmi_stack_top(i))
        self.write(lay.tss_va(i), bytes(tss))
        for off, value in self.image.percpu_init(i, lay).items():
            self.write(lay.percpu_va(i) + off, struct.pack("<Q", value & (2**64 - 1)))
        eng = cpu.engine
        # before any hook or block: every block translated from now on counts its instructions
        eng.start_counting(self.image.idle_entry)
        eng.insn_cost = self.costs.instruction
        if self.config.interleave == "exact":
            shared = cpu.on_shared = shared_code_hook(self, cpu)
            if self._entry_hooked:
                for a in self._shared_entries:
                    eng.hook_block_raw(a, 1, shared)
            else:
                for lo, size in self.image.shared_code:
                    eng.hook_block_raw(lo, size, shared)
        for a in self.image.iret_sites:
            eng.hook_block_raw(a, 1, self._iret_hook(cpu))
        for a in self.image.halt_sites:
            eng.hook_block_at(a, 1, self._halt_hook(cpu))
        eng.hook_interrupts_raw(self._intr_hook(cpu))
        eng.hook_invalid_insn(lambda: self._crash(cpu, "exception #UD (invalid opcode)", cpu.engine.rip()))
        eng.hook_cpuid(self._cpuid_hook(cpu))
        eng.hook_tsc(cpu.now, aux=i)  # a deterministic TSC: the CPU's cycle clock
        eng.hook_mem_write(L.TEXT_PA, L.TEXT_PA + lay.text_size, self._text_store_hook(cpu))
        eng.on_stop_block = lambda site, cpu=cpu: self._redecode_around(cpu, site, True)
        eng.on_flushed = lambda cpu=cpu: self._emptied_outside_a_run(cpu)
        eng.set_rsp(lay.kstack_top(i))
        eng.set_rflags(0x202)
        for name, value in self.image.boot_regs(i, self.config.seed).items():
            eng.set_reg(name, value)
        entry = self.image.idle_entry if i == self.config.patcher_cpu else self.image.worker_entry
        eng.set_rip(entry)

    def _start_nmi_sources(self) -> None:
        for src in self.config.nmi_sources:
            for c in self.config.nmi_targets(src):
                rng = random.Random(f"{self.config.seed}/nmi/{src.name}/{c}")
                first = src.start + rng.randrange(src.period)
                self._schedule(c, first, _EV_NMI, (src, rng))

    # ----------------------------------------------------------------------------------------
    # Memory
    # ----------------------------------------------------------------------------------------
    def _phys(self, va: int, n: int) -> tuple[HostMemory, int] | None:
        key = (va, n)
        loc = self._phys_cache.get(key, False)
        if loc is not False:
            return loc  # type: ignore[return-value]
        pa = self.layout.pa(va, n)
        loc = None
        if pa is not None:
            for m in self._mems:
                if m.contains(pa, n):
                    loc = (m, pa)
                    break
        if len(self._phys_cache) > 4096:
            self._phys_cache.clear()
        self._phys_cache[key] = loc  # the memory map never changes while the machine lives
        return loc

    def read(self, va: int, n: int) -> bytes:
        """Read kernel memory (a data read: text reads see the latest bytes)."""
        loc = self._phys(va, n)
        if loc is None:
            raise ConfigError(f"address range {va:#x}+{n} is not mapped")
        m, pa = loc
        return m.read(pa, n)

    def read_u64(self, va: int) -> int:
        loc = self._phys(va, 8)
        if loc is None:
            raise ConfigError(f"address range {va:#x}+8 is not mapped")
        m, pa = loc
        return _U64.unpack_from(m.buf, pa - m.pa)[0]

    def write(self, va: int, data: bytes) -> None:
        """Write kernel data (not text: use `write_text`, which the coherence model sees)."""
        loc = self._phys(va, len(data))
        if loc is None:
            raise ConfigError(f"address range {va:#x}+{len(data)} is not mapped")
        m, pa = loc
        if m is self.mem_text:
            raise ConfigError("text is written with write_text(), so every CPU's fetch model sees it")
        m.write(pa, data)

    def percpu(self, cpu: int, offset: int) -> int:
        """A u64 per-CPU variable of `cpu` (the patcher polls them: read straight from the block)."""
        if 0 <= offset <= L.BLOCK.area_size - 8 and 0 <= cpu < len(self._percpu_at):
            m, start = self._percpu_at[cpu]
            return _U64.unpack_from(m.buf, start + offset)[0]
        return self.read_u64(self.layout.percpu_va(cpu) + offset)

    def is_text(self, addr: int, n: int = 1) -> bool:
        return self.text_lo <= addr and addr + n <= self.text_hi

    def write_text(self, addr: int, data: bytes, writer: int | None = None) -> None:
        """One store of `data` into text by CPU `writer` (default: the patcher), visible at once to
        data reads and, per the coherence model, to each CPU's instruction fetch."""
        if not self.is_text(addr, len(data)):
            raise ConfigError(f"text write {addr:#x}+{len(data)} is outside the kernel text")
        w = self.config.patcher_cpu if writer is None else writer
        sites = self.coherence.sites_overlapping(addr, addr + len(data))
        self.watch(sites)
        now = self.cpus[w].now()
        self.mem_text.write(L.TEXT_PA + (addr - L.TEXT_VA), data)
        if not sites:
            # text no site covers (a kprobe's out-of-line slot, say): no decoded copy of it is
            # modelled, so every CPU decodes the new bytes when it next runs them
            for cpu in self.cpus:
                cpu.engine.drop_decoded(addr, addr + len(data))
        self._text_written(w, now, addr, data)

    def _text_store_hook(self, cpu: Cpu) -> Callable[[int, int, int], None]:
        """A guest store into the text (through any alias): the same bookkeeping as `write_text`.
        Unicorn performs the store itself, right after this hook, and drops the storing engine's
        own translated blocks of those bytes (a CPU's own stores are coherent with its fetch).
        Sites the store hits should already be watched (the patcher watches before it lets guest
        code write); an unwatched one is simply re-decoded from memory by every CPU."""

        def on_store(pa: int, size: int, value: int) -> None:
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self._storing = cpu.index
            try:
                self._text_written(cpu.index, cpu.now(), L.TEXT_VA + (pa - L.TEXT_PA), data)
            finally:
                self._storing = None

        return on_store

    def _drop_decoded(self, cpu: int, lo: int, hi: int) -> None:
        # the storing engine drops its own blocks (Unicorn's self-modifying-code check); removing
        # them from inside its own memory hook would crash it
        if cpu != self._storing:
            self.cpus[cpu].engine.drop_decoded(lo, hi)

    def _text_written(self, w: int, now: int, addr: int, data: bytes) -> None:
        self.fine_until = max(self.fine_until, now + self.config.fine_window)
        self._written.append((addr, addr + len(data)))
        if self._entry_hooked:
            self._hook_written_units(addr, addr + len(data))
        self.trace.add((now, w, "write", addr, bytes(data)))
        for f in self._obs["on_text_write"]:
            f(w, now, addr, bytes(data))
        for cpu, site, wid in self.coherence.written(w, addr, addr + len(data)):
            delay = self.config.snoop.draw(self._snoop_rng)
            if delay is not None:
                self._schedule(cpu, now + delay, _EV_SNOOP, (site, wid))

    def _hook_written_units(self, lo: int, hi: int) -> None:
        """Shared code written at run time (an out-of-line slot) may be entered anywhere its new
        bytes lead: its unit is hooked at every block from now on, on every CPU. A CPU storing it
        itself drops its blocks of it after its quantum (not from inside its own memory hook)."""
        for unit in [u for u in self._entry_hooked if u[0] < hi and lo < u[1]]:
            self._entry_hooked.remove(unit)
            ulo, uhi = unit
            for cpu in self.cpus:
                cpu.engine.hook_block_raw(ulo, uhi - ulo, cpu.on_shared)  # type: ignore[arg-type]
                if cpu.index == self._storing:
                    self._deferred_drops.append((cpu.index, ulo, uhi))
                else:
                    cpu.engine.drop_decoded(ulo, uhi)

    def _drop_deferred(self) -> None:
        """Drop the blocks `_hook_written_units` could not drop during a CPU's own store."""
        for i, lo, hi in self._deferred_drops:
            self.cpus[i].engine.drop_decoded(lo, hi)
        self._deferred_drops.clear()

    def _landed(self, cpu: Cpu, rip: int | None) -> None:
        """An `iretq` or `popfq` the machine executed moved `cpu` (to `rip`; None: read it) inside
        its quantum: if it landed inside shared code hooked at its entries only, it came in there
        (see `shared_code_hook`)."""
        eng = cpu.engine
        if cpu.running and self._entry_hooked and not eng.stopped:
            if rip is None:
                rip = eng.rip()
            if inside(self._shared_units, rip):
                # as the block hook there would: the instruction just executed is counted
                # (popfq) or charged (iretq), none of the next block is
                eng.hook_adjust = 0
                cpu.on_shared(None, rip, 0, None)  # type: ignore[misc]

    def _install_copy(self, cpu: int, site: int, code: bytes) -> None:
        """Make `cpu`'s translated block at `site` be decoded from `code` (its copy), whatever memory
        holds now: the bytes are put in memory just for the translation, then put back. Nothing else
        runs meanwhile, so no one else can see them."""
        eng = self.cpus[cpu].engine
        n = len(code)
        eng.drop_decoded(site, site + n)
        pa = L.TEXT_PA + (site - L.TEXT_VA)
        real = self.mem_text.read(pa, n)
        if real != code:
            self.mem_text.write(pa, code)
        try:
            eng.decode_at(site)
        finally:
            if real != code:
                self.mem_text.write(pa, real)

    def _copies_decoded_again(self, cpu: Cpu) -> list[int]:
        """Every translated block of `cpu` is gone (its engine's code buffer was emptied): decode
        every copy of a site it holds again, also one equal to memory now (memory may change while
        the CPU still holds its copy: the block must stand for the copy before that). Returns the
        sites whose copy differs from memory."""
        cpu.flushes_seen = cpu.engine.flush_count.value
        differ = []
        for site, c in list(self.coherence.copies[cpu.index].items()):
            code = bytes(c.code)
            if code != self.read(site, len(code)):
                differ.append(site)
            self._install_copy(cpu.index, site, code)
        return differ

    def _emptied_outside_a_run(self, cpu: Cpu) -> None:
        """`decode_at` emptied `cpu`'s nearly full code buffer: its copies are decoded again before
        anything runs (after reporting an emptying inside a run not seen yet, if there was one)."""
        if cpu.engine.flush_count.value - 1 != cpu.flushes_seen:
            self._after_emulator_flush(cpu)
        else:
            self._copies_decoded_again(cpu)

    def _tend_code_buffer(self, cpu: Cpu) -> None:
        """After a quantum: Unicorn emptied `cpu`'s code buffer during it (see
        `_after_emulator_flush`), or little room is left in it. Then the machine empties it now,
        between quanta, and decodes the CPU's copies again: the trace is the same as without, and
        Unicorn never has to empty it inside a run, which only a quantum translating more than the
        margin (1 MiB, thousands of blocks) could still make it do."""
        eng = cpu.engine
        if eng.flush_count.value != cpu.flushes_seen:
            self._after_emulator_flush(cpu)
        if eng.low_on_room:
            eng.empty()
            self._copies_decoded_again(cpu)

    def _after_emulator_flush(self, cpu: Cpu, sites: Iterable[int] | None = None) -> None:
        """Unicorn emptied `cpu`'s full code buffer inside the running quantum, and with it the
        blocks that stand for the CPU's copies of sites. If one of them differed from memory, the
        CPU may have run memory's bytes in its place since the emptying, which the model does not
        allow: the run goes on, but it is reported to the instruments as a simulator limit
        (`on_limit`: the oracle calls the run incomplete). Between quanta the copies are decoded
        again; from a site's block hook (`sites`: that site), before the block runs, only the
        report is made (nothing is translated inside a run)."""
        if sites is None:
            differ = self._copies_decoded_again(cpu)
        else:
            copies = self.coherence.copies[cpu.index]
            differ = [s for s in sites if s in copies and bytes(copies[s].code) != self.read(s, len(copies[s].code))]
        if not differ:
            return
        now = cpu.now()
        where = ", ".join(f"{s:#x}" for s in differ)
        why = (
            f"the emulator emptied CPU {cpu.index}'s full code buffer during a quantum while it held stale "
            f"copies of {where}: it may have run memory's bytes in their place"
        )
        self.trace.add((now, cpu.index, "emulator-flush", len(differ)))
        for f in self._obs["on_limit"]:
            f(cpu.index, now, why)

    def _redecode_around(self, cpu: Cpu, site: int, at_site: bool) -> None:
        """Drop `cpu`'s blocks at and ending at `site` (a block of size 0, the stop block Unicorn
        translates at an exit, is removed only so), then (`at_site`) decode the block at `site` now:
        its copy if the CPU holds one, else memory as it is.

        A site's block may be dropped behind the machine's back (here, with the block ending at the
        next site; by Unicorn after every run, for a block that falls through into an exit; by the
        CPU's own store): the next execution of the site then meets a stop block and comes here,
        so what runs at a site is always the CPU's copy."""
        eng = cpu.engine
        eng.drop_decoded(site - 1, site + 1)
        if at_site:
            c = self.coherence.copies[cpu.index].get(site)
            if c is not None:
                self._install_copy(cpu.index, site, bytes(c.code))
            else:
                eng.decode_at(site)

    def watch(self, sites: Iterable[int]) -> None:
        """Observe fetches of these patchable sites on every CPU (DESIGN.md 1.6; see coherence).

        From now on every CPU holds a decoded copy of each site's current bytes: its block is
        translated here, on every CPU, with the observing hook in it."""
        for site in sites:
            self._release.discard(site)
            if site in self._site_hooks:
                continue
            if site not in self.coherence.sites:
                raise ConfigError(f"{site:#x} is not a patchable site of this kernel image")
            length = self.coherence.sites[site]
            handles = [cpu.engine.hook_block_raw(site, length, self._site_hook(cpu)) for cpu in self.cpus]
            self._site_hooks[site] = handles
            if self._needs_exit(site):
                for cpu in self.cpus:
                    # every execution of the site starts a block, also one reached by falling through
                    # from the instruction before it (the copies installed next drop the blocks that
                    # ran through it)
                    cpu.engine.set_exit(site, True)
            self.coherence.watch(site)  # installs every CPU's copy, now with the hook in it
            self.trace.add((self.now(), -1, "watch", site))

    def _needs_exit(self, site: int) -> bool:
        """Whether `site` gets an exit. Unicorn re-examines the translated code in front of every
        exit after every run (a cost per quantum that grows with the exits), so a site that only a
        call or a jump reaches, where translation starts a block anyway, goes without one."""
        if not self.cpus[0].engine.exits_available:
            return False
        return self.config.site_exits == "all" or site not in self.image.block_starts

    def release(self, sites: Iterable[int]) -> None:
        """Stop observing these sites as soon as no CPU holds a stale copy of them."""
        self._release.update(s for s in sites if s in self._site_hooks)
        self._settle()

    def _settle(self) -> None:
        for site in sorted(self._release):
            if self.coherence.stale_count.get(site):
                continue
            self._release.discard(site)
            length = self.coherence.sites[site]
            for cpu, handle in zip(self.cpus, self._site_hooks.pop(site), strict=False):
                cpu.engine.hook_del(handle)
                cpu.engine.drop_decoded(site, site + length)
            self.coherence.unwatch(site)
            if self._needs_exit(site):
                for cpu in self.cpus:
                    cpu.engine.set_exit(site, False)
                    self._redecode_around(cpu, site, False)  # blocks that stop in front of it
            self.trace.add((self.now(), -1, "unwatch", site))

    @property
    def watched(self) -> frozenset[int]:
        return frozenset(self._site_hooks)

    def probe(self, addr: int, label: str) -> None:
        """Tell instruments (`on_probe(cpu, time, label)`) whenever a CPU starts running the block at
        `addr` (a function entry, say). Costs nothing elsewhere."""
        for cpu in self.cpus:

            def on_block(_a: int, _s: int, cpu: Cpu = cpu) -> None:
                for f in self._obs["on_probe"]:
                    f(cpu.index, cpu.now(), label)

            cpu.engine.hook_block_at(addr, 1, on_block)
            cpu.engine.drop_decoded(addr, addr + 1)

    def aim_nmi(self, addr: int, probability: float, label: str = "aimed", cpus: Iterable[int] | None = None) -> None:
        """An NMI source aimed at one instruction: each time a CPU is about to execute `addr`, an NMI
        arrives right there with `probability` (seeded). For tests that must hit a window a few
        instructions wide; it costs a check on every instruction of those CPUs."""
        targets = list(cpus) if cpus is not None else list(self.config.nmi_targets())
        self._aim(
            [self.cpus[c] for c in targets],
            addr,
            probability,
            f"aim/{label}",
            lambda cpu: self.raise_nmi(cpu.index, label),
        )

    def aim_irq(self, addr: int, probability: float, vector: int, label: str = "aimed-irq") -> None:
        """`aim_nmi` for a maskable interrupt: each time a workload CPU (every CPU but the patcher)
        is about to execute `addr`, `vector` arrives there with `probability` (seeded); it is taken
        right there when IF=1, else it stays pending like any other."""

        def fire(cpu: Cpu) -> None:
            self.raise_irq(cpu.index, vector, label)
            if cpu.engine.rflags() & RFLAGS_IF:
                self._deliver_pending_irq(cpu, cpu.engine.rip())

        workers = [c for c in self.cpus if c.index != self.config.patcher_cpu]
        self._aim(workers, addr, probability, f"aim-irq/{label}", fire)

    def _aim(self, cpus: list[Cpu], addr: int, probability: float, key: str, fire: Callable[[Cpu], None]) -> None:
        """A code hook at `addr` on each of `cpus` that calls `fire` with `probability`, from a
        random stream of its own per CPU (seed/key/cpu); ordered against the agents like any other
        interaction (the event it raises reaches them)."""
        for cpu in cpus:
            rng = random.Random(f"{self.config.seed}/{key}/{cpu.index}")

            def on_insn(_a: int, _s: int, cpu: Cpu = cpu, rng: random.Random = rng) -> None:
                if cpu.running and cpu.now() > self.hz_max:
                    hold(cpu)
                    return
                if rng.random() < probability:
                    fire(cpu)

            cpu.engine.hook_code_at(addr, 1, on_insn)
            cpu.engine.drop_decoded(addr, addr + 1)

    # ----------------------------------------------------------------------------------------
    # Event queue
    # ----------------------------------------------------------------------------------------
    def _schedule(self, cpu: int, time: int, kind: int, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self.cpus[cpu].events, (time, kind, self._seq, kind, arg))

    def send_ipi(self, sender: int, target: int, vector: int = int(Vector.IPI)) -> None:
        now = self.cpus[sender].now()
        arrive = now + self.costs.ipi_latency
        self.trace.add((now, sender, "ipi-send", target, vector))
        self._schedule(target, arrive, _EV_IPI, vector)

    def call_at(self, cpu: int, time: int, fn: Callable[[Machine, Cpu], None]) -> None:
        """Run `fn(machine, cpu)` when `cpu` reaches `time` (an instruction boundary)."""
        self._schedule(cpu, time, _EV_CALL, fn)

    def _due(self, cpu: Cpu) -> None:
        ev = cpu.events
        while ev and ev[0][0] <= cpu.clock and cpu.crash is None:
            t, _, _, kind, arg = heapq.heappop(ev)
            if kind == _EV_NMI:
                src, rng = arg
                nxt = t + src.period + int(rng.uniform(-src.jitter, src.jitter) * src.period)
                self._schedule(cpu.index, max(nxt, t + 1), _EV_NMI, arg)
                self.raise_nmi(cpu.index, src.name)
            elif kind == _EV_IPI:
                cpu.pending.add(arg)
                cpu.stats["ipi_received"] += 1
                if_on = bool(cpu.engine.rflags() & RFLAGS_IF)
                self.trace.add((cpu.clock, cpu.index, "ipi-arrive", arg, if_on))
                if not if_on and not cpu.popf_hooks and self.image.popf_sites:
                    self._watch_popf(cpu, True)
            elif kind == _EV_SNOOP:
                site, wid = arg
                code = self.coherence.snoop(cpu.index, site, wid)
                if code is not None:
                    self.trace.add((cpu.clock, cpu.index, "snoop", site, code))
            else:
                arg(self, cpu)
        if cpu.crash is None and cpu.pending and cpu.agent is None and cpu.engine.rflags() & RFLAGS_IF:
            self._deliver_pending_irq(cpu, cpu.engine.rip())

    def raise_irq(self, cpu_index: int, vector: int, source: str = "irq") -> None:
        """A maskable interrupt (a timer's) reaches `cpu_index`'s interrupt controller now; it stays
        pending until IF=1. Call it from a `call_at` callback: the event loop then delivers it at
        that very instruction boundary when IF is already 1."""
        cpu = self.cpus[cpu_index]
        merged = vector in cpu.pending
        cpu.pending.add(vector)
        if_on = self.irq_enabled(cpu_index)
        self.trace.add((cpu.now(), cpu_index, "irq-arrive", vector, source, if_on, merged))
        if not if_on and not cpu.popf_hooks and self.image.popf_sites:
            self._watch_popf(cpu, True)

    def irq_enabled(self, cpu_index: int) -> bool:
        """IF of `cpu_index` now (between quanta, or from a hook of that CPU)."""
        return bool(self.cpus[cpu_index].engine.rflags() & RFLAGS_IF)

    def set_rip(self, cpu_index: int, rip: int) -> None:
        """Point a CPU somewhere else (tests and fault injection)."""
        cpu = self.cpus[cpu_index]
        cpu.engine.set_rip(rip)
        cpu.rip = None

    def raise_nmi(self, cpu_index: int, source: str = "test") -> None:
        """An NMI reaches `cpu_index` now (at its current instruction boundary)."""
        cpu = self.cpus[cpu_index]
        cpu.stats["nmi_raised"] += 1
        outcome = cpu.nmi.arrive()
        now = cpu.now()
        if outcome is NmiArrival.DELIVER:
            if cpu.agent is not None and self.image.idle_range is None:
                # no idle loop to park an agent's CPU in: the NMI stays latched until the agent ends
                cpu.nmi.latched = True
                outcome = NmiArrival.LATCH
            else:
                # on an agent's CPU between two steps this is its parking spot in the idle loop
                self._deliver(cpu, Vector.NMI, cpu.engine.rip())
        if outcome is NmiArrival.LATCH:
            cpu.stats["nmi_latched"] += 1
        elif outcome is NmiArrival.DROP:
            cpu.stats["nmi_dropped"] += 1
        self.trace.add((now, cpu_index, "nmi", source, outcome.value))
        for f in self._obs["on_nmi"]:
            f(cpu_index, now, outcome.value)

    # ----------------------------------------------------------------------------------------
    # Event delivery (the hardware part)
    # ----------------------------------------------------------------------------------------
    def _gate(self, vector: int) -> Gate | None:
        m, pa = self._phys(L.IDT_VA + 16 * vector, 16)  # type: ignore[misc]
        return _decode_gate(m.read(pa, 16))

    def _deliver(self, cpu: Cpu, vector: int, ret_rip: int) -> bool:
        """Deliver `vector` to `cpu` with `ret_rip` as the saved RIP; False if the CPU died."""
        if cpu.tentative is not None:
            self._confirm_fetch(cpu)
        gate = self._gate(vector)
        if gate is None:
            self._crash(cpu, f"no IDT gate for vector {vector} (triple fault)", ret_rip)
            return False
        eng = cpu.engine
        rsp, rflags = eng.rsp_rflags()
        ist_top = None
        if gate.ist:
            ist_top = self.read_u64(self.layout.tss_va(cpu.index) + 0x24 + 8 * (gate.ist - 1))
        base = frame_base(rsp, ist_top)
        loc = self._phys(base, 40)
        if loc is None:
            self._crash(cpu, f"delivering vector {vector}: stack {base:#x} not mapped (double fault)", ret_rip)
            return False
        ss = L.KERNEL_DS | ((1 << FRED_NMI_BIT) if (vector == Vector.NMI and self.config.fred) else 0)
        frame = (ret_rip, L.KERNEL_CS, rflags, rsp, ss)
        m, pa = loc
        _FRAME.pack_into(m.buf, pa - m.pa, *frame)
        eng.set_frame(base, entry_rflags(rflags, gate), gate.handler)
        cpu.rip = None
        now = cpu.now()
        costs = self.costs
        cpu.extra += costs.event_entry
        if vector == _STOP:
            cpu.extra += costs.stopper_wakeup  # the stopper is a thread: it must be scheduled
            cpu.hold = True  # ... before its first instruction runs, in everyone's time
        if vector == _NMI:
            cpu.nmi.delivered()
            cpu.stats["nmi_delivered"] += 1
        elif vector == _BP:
            cpu.stats["int3"] += 1
        self.trace.add((now, cpu.index, "deliver", vector, ret_rip, rsp, base))
        for f in self._on_deliver:
            f(cpu.index, now, vector, frame)
        # not serializing: the SDM does not list event delivery among serializing operations (the
        # looser rule is an option)
        if self.config.delivery_serializes:
            self._serialize(cpu, "delivery")
        self._end_quantum_if_due(cpu)
        return True

    def _end_quantum_if_due(self, cpu: Cpu) -> None:
        """Exact scheduler: a delivery or an `iretq` just charged its cycles inside a running quantum,
        whose count was cut for instructions only. When that takes the CPU's time to its next event
        (a timer, an IPI, an NMI), the quantum ends at this boundary and the event is taken here, in
        its own time: an interrupt arriving while an exception is delivered finds IF=0 and waits for
        the handler's `iretq`, as on hardware, instead of being taken after the handler. Otherwise
        the rest of the quantum is cut to end at the event (its count was set before the cost)."""
        if not (cpu.running and cpu.events):
            return
        due = cpu.events[0][0]
        eng = cpu.engine
        done = eng.executed()
        insn = eng.insn_cost
        now = cpu.clock + cpu.extra + done * insn
        if now >= due:
            eng.stop()
        else:
            eng.cut(done + (due - now + insn - 1) // insn)

    def _watch_popf(self, cpu: Cpu, on: bool) -> None:
        """Hook the kernel's popfq instructions on `cpu` while an interrupt waits for IF=1 there.

        Only then: with count-sliced execution every code hook costs something on every instruction.
        """
        eng = cpu.engine
        if on:
            for a in self.image.popf_sites:
                cpu.popf_hooks.append(eng.hook_code_at(a, 1, self._popf_hook(cpu)))
        else:
            for h in cpu.popf_hooks:
                eng.hook_del(h)
            cpu.popf_hooks = []
        for a in self.image.popf_sites:
            eng.drop_decoded(a, a + 1)

    def _deliver_pending_irq(self, cpu: Cpu, ret_rip: int) -> None:
        vector = max(cpu.pending)  # the local APIC serves the highest vector first
        cpu.pending.discard(vector)
        cpu.stats["ipi_delivered"] += 1
        self._deliver(cpu, vector, ret_rip)

    def _serialize(self, cpu: Cpu, cause: str) -> None:
        """`cpu` executes a serializing instruction (`cause`: iretq, cpuid, or an agent's)."""
        dropped = self.coherence.serialize(cpu.index) if self.coherence.stale_sites[cpu.index] else 0
        if dropped:
            cpu.stats["serialize_drops"] += dropped
            self.trace.add((cpu.now(), cpu.index, "serialize", dropped, cause))
        obs = self._on_serialize
        if obs:
            now = cpu.now()
            for f in obs:
                f(cpu.index, now)

    def _crash(self, cpu: Cpu, reason: str, rip: int) -> None:
        if cpu.crash is not None:
            return
        if cpu.tentative is not None:
            self._confirm_fetch(cpu)
        loc = self._phys(rip, 1)
        code = b""
        if loc is not None:
            end = rip + 16
            while end > rip and self._phys(rip, end - rip) is None:
                end -= 1
            code = self.read(rip, end - rip)
        dis = describe(code[:16], rip) if code else "<unmapped>"
        now = cpu.now()
        self.trace.add((now, cpu.index, "crash", reason, rip, code[:16]))
        crash = Crash(cpu.index, now, reason, rip, code[:16], dis, tuple(self.trace.tails[cpu.index]))
        cpu.crash = crash
        cpu.engine.stop()
        for f in self._obs["on_crash"]:
            f(crash)

    def _stack_words(self, cpu: Cpu, rsp: int, n: int, insn: str, addr: int) -> tuple[int, ...] | None:
        """The `n` words an instruction pops at `rsp`; a #SS crash (None) when they are not mapped."""
        loc = self._phys(rsp, 8 * n)
        if loc is None:
            self._crash(cpu, f"{insn} with RSP {rsp:#x} not mapped (#SS)", addr)
            return None
        m, pa = loc
        return _words(n).unpack_from(m.buf, pa - m.pa)

    def _no_progress(self, cpu: Cpu, rip: int) -> None:
        """A quantum ended where it started. Unicorn may stop quietly, without an error or an
        interrupt, on an instruction it cannot fetch or decode: the CPU gets the fault it would take.
        It also stops quietly on some faulting instructions it decodes (a divide error, say): a CPU
        that executes nothing at the same instruction for `STUCK_QUANTA` quanta in a row dies there,
        rather than spin without progress until the run's limits."""
        reason = self._fetch_fault(rip)
        if reason:
            self._crash(cpu, reason, rip)
            return
        cpu.stuck += 1  # (a loop back to the same instruction lands here too, but not 64 times in a row)
        if cpu.stuck >= STUCK_QUANTA:
            code = self.read(rip, 15) if self._phys(rip, 15) is not None else self.read(rip, 1)
            if code[:2] == b"\xeb\xfe" or code[:5] == b"\xe9\xfb\xff\xff\xff":
                cpu.stuck = 0  # `jmp .`: it does execute, forever
                return
            what = describe(code[: insn_length(code) or 1], rip)
            self._crash(
                cpu,
                f"no progress at {rip:#x} ({what}): the emulator neither executes nor faults it "
                "(an exception it does not report, such as #DE)",
                rip,
            )

    def _fetch_fault(self, rip: int) -> str | None:
        """The fault fetching the instruction at `rip` raises, or None when it decodes."""
        if self._phys(rip, 1) is None:
            return f"exception #PF (instruction fetch from unmapped {rip:#x})"
        region = self.layout.region_of(rip)
        if region is not None and not region.executable:
            return f"exception #PF (instruction fetch from no-execute {region.name} at {rip:#x})"
        end = rip + 15
        while self._phys(rip, end - rip) is None:
            end -= 1
        code = self.read(rip, end - rip)
        if insn_length(code) is None or code[:2] in (b"\x0f\x0b", b"\x0f\xb9", b"\x0f\xff"):
            return "exception #UD (invalid opcode)"  # undecodable, or ud2 / ud1 / ud0
        return None

    # -- Unicorn callbacks ----------------------------------------------------------------------
    def _intr_hook(self, cpu: Cpu) -> Callable[[object, int, object], None]:
        eng = cpu.engine

        def on_interrupt(_h: object, intno: int, _k: object) -> None:
            # a raw hook (`Engine.hook_interrupts_raw`): called by ctypes itself
            eng.hook_adjust = 1
            try:
                if intno == _BP:
                    self._deliver(cpu, Vector.BP, eng.rip())  # RIP is already past the 0xcc: a trap
                    return
                names = {0: "#DE", 1: "#DB", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF", 12: "#SS"}
                reason = f"exception {names.get(intno, intno)}"
                rip = eng.rip()
                if intno == 14:
                    # a fault on the fetch itself (reported so with exits on) reads as a quiet stop would
                    fetch = self._fetch_fault(rip) if eng.cr2() == rip else None
                    reason = fetch or f"{reason} (cr2={eng.cr2():#x})"
                self._crash(cpu, reason, rip)
            except BaseException as err:
                eng.fail(err)

        return on_interrupt

    def _iret_hook(self, cpu: Cpu) -> Callable[[object, int, int, object], None]:
        iret_cost = self.costs.iret + self.costs.instruction
        eng = cpu.engine

        def on_iretq(_h: object, addr: int, _size: int, _k: object) -> None:
            # a raw hook (`Engine.hook_block_raw`): called by ctypes itself
            eng.hook_adjust = 0
            try:
                if cpu.tentative is not None:
                    self._confirm_fetch(cpu)
                now = cpu.now()
                if cpu.running and now > self.hz_max:
                    hold(cpu)  # a serializing instruction: ordered against the agents
                    return
                rsp = eng.rsp()
                frame = self._stack_words(cpu, rsp, 5, "iretq", addr)
                if frame is None:
                    return
                rip, cs, rflags, new_rsp, ss = frame
                if cs != L.KERNEL_CS or (ss & 0xFFFF) not in (L.KERNEL_DS, 0) or rip < _CANONICAL_HI:
                    self._crash(
                        cpu,
                        f"iretq frame invalid (#GP): rip={rip:#x} cs={cs:#x} ss={ss:#x} at rsp={rsp:#x}",
                        addr,
                    )
                    return
                eng.set_frame(new_rsp, (rflags & 0x3F7FD7) | 2, rip)
                # the count of the quantum does not include an instruction redirected from its block
                # hook: charge the iretq itself here (after `now`, its time)
                cpu.extra += iret_cost
                cpu.stats["instructions"] += 1
                cpu.stats["iret"] += 1
                unblocked = cpu.nmi.iret(ss)
                self.trace.add((now, cpu.index, "iret", rip, new_rsp, unblocked))
                for f in self._on_iret:
                    f(cpu.index, now, frame, unblocked)
                self._serialize(cpu, "iretq")
                landing: int | None = rip
                if cpu.nmi.take_latched():
                    self.trace.add((now, cpu.index, "nmi", "latched", "deliver"))
                    self._deliver(cpu, Vector.NMI, rip)
                    landing = None
                elif cpu.pending and rflags & RFLAGS_IF:
                    self._deliver_pending_irq(cpu, rip)
                    landing = None
                self._end_quantum_if_due(cpu)
                self._landed(cpu, landing)
            except BaseException as err:
                eng.fail(err)

        return on_iretq

    def _halt_hook(self, cpu: Cpu) -> Callable[[int, int], None]:
        def on_hlt(addr: int, _size: int) -> None:
            if cpu.tentative is not None:
                self._confirm_fetch(cpu)
            cpu.halted = True
            self.trace.add((cpu.now(), cpu.index, "halt", addr))
            cpu.engine.stop()

        return on_hlt

    def _popf_hook(self, cpu: Cpu) -> Callable[[int, int], None]:
        def on_popfq(addr: int, _size: int) -> None:
            if not cpu.pending:
                return  # nothing waits for IF: let Unicorn execute it
            if cpu.running and cpu.now() > self.hz_max:
                hold(cpu)  # it delivers an interrupt: ordered against the agents
                return
            eng = cpu.engine
            rsp = eng.rsp()
            words = self._stack_words(cpu, rsp, 1, "popfq", addr)
            if words is None:
                return
            (value,) = words
            eng.set_rsp(rsp + 8)
            eng.set_rflags((value & 0x3F7FD7) | 2)
            eng.set_rip(addr + 1)
            if value & RFLAGS_IF:
                self._deliver_pending_irq(cpu, addr + 1)
                self._landed(cpu, None)
            else:
                self._landed(cpu, addr + 1)

        return on_popfq

    def _site_hook(self, cpu: Cpu) -> Callable[[object, int, int, object], None]:
        """Block hook on a watched site: a translated block starting there begins to run.

        The report stays tentative until something proves the block ran (another block hook, an
        event on this CPU, or the quantum ending anywhere but at this very address): when a
        quantum's count runs out at a block start, Unicorn has fired the hook without running it."""
        sites = self.coherence.sites
        fetch = self.coherence.fetch
        decoded = self.coherence.copies[cpu.index]

        eng = cpu.engine
        counted = eng.exits_available

        counter, limit, insn = eng._counter, eng._limit, eng.insn_cost

        def on_site(_h: object, addr: int, _block_size: int, _k: object) -> None:
            # a raw hook (`Engine.hook_block_raw`): called by ctypes itself
            eng.hook_adjust = 0
            try:
                if cpu.tentative is not None:
                    self._confirm_fetch(cpu)
                if counted and counter.value >= limit.value:  # type: ignore[union-attr]
                    return  # the quantum ends in front of the site, as at an exit: it runs next quantum
                if cpu.running:
                    # `cpu.now()`, inlined: a block hook stands before the block's first count
                    now = cpu.clock + cpu.extra + (eng.base + counter.value) * insn  # type: ignore[union-attr]
                    if now > self.hz_max:
                        hold(cpu)  # executing a watched site: ordered against the agents' text writes
                        return
                else:
                    now = cpu.clock + cpu.extra
                if addr not in sites:
                    self.trace.add((now, cpu.index, "mid-site", addr))
                    return
                if eng.flush_count.value != cpu.flushes_seen:
                    # emptied by Unicorn earlier in this quantum: this block was translated from
                    # memory, which a stale copy is not (reported before the fetch is judged)
                    self._after_emulator_flush(cpu, (addr,))
                fresh = addr not in decoded
                code = fetch(cpu.index, addr)
                if fresh:
                    self.trace.add((now, cpu.index, "decode", addr, code))
                cpu.tentative = (now, addr, code)
                if insn_length(code) is None:
                    self._crash(cpu, "exception #UD (invalid opcode)", addr)
            except BaseException as err:
                eng.fail(err)

        return on_site

    def _confirm_fetch(self, cpu: Cpu) -> None:
        t, site, code = cpu.tentative  # type: ignore[misc]
        cpu.tentative = None
        cpu.stats["site_exec"] += 1
        for f in self._on_fetch:
            f(cpu.index, t, site, code)

    def _cpuid_hook(self, cpu: Cpu) -> Callable[[], bool]:
        def on_cpuid() -> bool:
            self._serialize(cpu, "cpuid")
            return False  # let Unicorn execute cpuid itself

        return on_cpuid

    # ----------------------------------------------------------------------------------------
    # Agents
    # ----------------------------------------------------------------------------------------
    def in_idle(self, cpu: int) -> bool:
        """True when `cpu` is in its idle loop, inside no handler: where an agent parks. Without an
        idle loop in the image, an agent's CPU counts as parked all the time."""
        rng = self.image.idle_range
        if rng is None:
            return True
        c = self.cpus[cpu]
        rip = c.rip if c.rip is not None else c.engine.rip()
        return rng[0] <= rip < rng[1]

    def start_agent(self, cpu: int, agent: Agent) -> None:
        """Occupy `cpu` with a Python program (the patcher) until it returns. It starts once the CPU
        is in its idle loop (a handler in progress there finishes first)."""
        c = self.cpus[cpu]
        if c.agent is not None:
            raise ConfigError(f"cpu{cpu} already runs an agent")
        c.agent = agent
        c.agent_done = False
        c.agent_result = None

    def _step_agent(self, cpu: Cpu) -> None:
        waits = self._pending_wait
        w = waits.get(cpu.index)
        if w is not None:
            if not w.predicate():
                cpu.clock += self.costs.poll
                return
            del waits[cpu.index]
        try:
            action = next(cpu.agent)  # type: ignore[arg-type]
        except StopIteration as stop:
            cpu.agent = None
            cpu.agent_done = True
            cpu.agent_result = stop.value
            self.trace.add((cpu.clock, cpu.index, "agent-done"))
            # an agent ends serialized: the patcher's last step is its own sync_core() (the final
            # sync runs do_sync_core on the sending CPU too; text_poke ends with a CR3 write)
            self._serialize(cpu, "agent")
            return
        if isinstance(action, Delay):
            cpu.clock += action.cycles
        elif isinstance(action, WriteText):
            self.write_text(action.addr, action.data, cpu.index)
            cpu.clock += self.costs.text_write if action.cost is None else action.cost
        elif isinstance(action, SendIpi):
            if action.shorthand:
                for t in range(len(self.cpus)):
                    if t != cpu.index:
                        self.send_ipi(cpu.index, t, action.vector)
                cpu.clock += self.costs.ipi_send
            else:
                for t in action.targets:
                    self.send_ipi(cpu.index, t, action.vector)
                    cpu.clock += self.costs.ipi_send
        elif isinstance(action, Serialize):
            self._serialize(cpu, "agent")  # sync_core() returns through an iret to itself
            cpu.clock += self.costs.iret
        elif isinstance(action, WaitUntil):
            if not action.predicate():
                waits[cpu.index] = action
                cpu.clock += self.costs.poll
        elif isinstance(action, Fine):
            self.fine += 1 if action.on else -1
        else:
            raise SimulatorBug(f"agent on cpu{cpu.index} yielded {action!r}, which is not an action")

    # ----------------------------------------------------------------------------------------
    # Scheduling
    # ----------------------------------------------------------------------------------------
    def run(self, cycles: int, stop_when: Callable[[], bool] | None = None) -> None:
        """Advance every live CPU by `cycles` from the furthest-behind clock (or until `stop_when`
        holds at a scheduling point)."""
        if cycles < 0:
            raise ConfigError("cycles must be >= 0")
        if self.closed:
            raise ConfigError("this machine was closed: make a new one")
        if self.config.interleave == "exact":
            run_exact(self, cycles, stop_when)
            return
        live = [c for c in self.cpus if c.runnable]
        if not live:
            return
        end = min(c.clock for c in live) + cycles
        heap = [(c.clock, c.index) for c in live]
        heapq.heapify(heap)
        rnd = self._sched_rng.random
        q_span = 2 * self.config.quantum - 1
        q_fine = self.config.fine_quantum
        insn = self.costs.instruction
        cpus = self.cpus
        trace_add = self.trace.add
        trace_settle = self.trace.settle
        while heap:
            clock, i = heap[0]
            if clock >= end:
                break
            trace_settle()
            if self._release:
                self._settle()
            if stop_when is not None and stop_when():
                break
            cpu = cpus[i]
            if cpu.events and cpu.events[0][0] <= clock and deliver_due(self, cpu, clock, heap):
                continue
            if cpu.agent is not None and self.in_idle(i):
                # the agent runs between events: an NMI due now was delivered above, and then the
                # CPU is in its handler, not parked
                self._step_agent(cpu)
                heapq.heapreplace(heap, (cpu.clock, i))
                continue
            fine = self.fine > 0 or clock < self.fine_until or cpu.agent is not None
            q = 1 + int(rnd() * (q_fine if fine else q_span))
            limit = end - clock
            if cpu.events:
                limit = min(limit, cpu.events[0][0] - clock)
            q = max(1, min(q, (limit + insn - 1) // insn))
            eng = cpu.engine
            rip = cpu.rip
            if rip is None:
                rip = eng.rip()
            # cpu.extra may already hold the cost of events delivered at this boundary
            stop = eng.run(rip, L.UNTIL, q)
            if eng.flush_count.value != cpu.flushes_seen or eng.free_ptr.value > eng.room_limit:
                self._tend_code_buffer(cpu)
            cpu.rip = after = eng.rip()
            if stop is not None and cpu.crash is None:
                self._crash(cpu, f"guest fault: {stop.error}", after)
            elif cpu.crash is None and after == rip and (not eng.exits_available or eng.completed() <= 1):
                # (a loop of two or more instructions may end a quantum where it began: that is progress)
                self._no_progress(cpu, rip)
            else:
                cpu.stuck = 0
            if cpu.tentative is not None:
                if after == cpu.tentative[1] and not eng.ended_at_exit:
                    cpu.tentative = None  # the count ran out at the block start: not executed
                else:
                    self._confirm_fetch(cpu)
            cpu.clock = clock + q * insn + cpu.extra
            cpu.extra = 0
            cpu.stats["instructions"] += q
            cpu.stats["quanta"] += 1
            trace_add((clock, i, "run", rip, q))
            if cpu.popf_hooks and not cpu.pending:
                self._watch_popf(cpu, False)  # not from inside the hook that delivered it
            if not cpu.runnable:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (cpu.clock, i))

    def run_agent(self, cpu: int, agent: Agent, limit: int = 10**9) -> Any:
        """Start `agent` on `cpu` and run the machine until it returns; returns its value."""
        self.start_agent(cpu, agent)
        c = self.cpus[cpu]
        start = c.clock
        self.run(limit, stop_when=lambda: c.agent_done or c.crash is not None)
        if not c.agent_done:
            wait = self._pending_wait.pop(cpu, None)
            c.agent = None
            self.fine = 0
            if c.crash is not None:
                self.trace.add((c.clock, cpu, "agent-lost", "crashed"))
                raise AgentStuck(cpu, f"crashed at t={c.crash.time} ({c.crash.reason})")
            if not self.in_idle(cpu):
                # its CPU is still inside an interrupt handler: the agent could not even run
                self.trace.add((c.clock, cpu, "agent-lost", "in a handler"))
                raise AgentStuck(cpu, f"has not returned from an interrupt handler (RIP {c.engine.rip():#x})")
            self.trace.add((c.clock, cpu, "agent-timeout", wait.label if wait else ""))
            raise AgentTimeout(cpu, start, limit, wait.label if wait else "")
        return c.agent_result

    def close(self) -> None:
        """Free every engine now (a sweep makes thousands of machines: memory stays flat). The
        machine's memory, trace and statistics stay readable; it cannot run again."""
        for cpu in self.cpus:
            cpu.engine.close()
        self.closed = True

    def recycle(self) -> None:
        """Like `close`, but hand the engines and memories to the next machine of the same shape
        (cpus/pool.py): it boots faster and translates again only what this one changed. The
        machine's trace and statistics stay readable; its memory does not (the next one clears it)."""
        if self.closed:
            return
        self.closed = True
        if any(cpu.engine.hook_error is not None for cpu in self.cpus):
            for cpu in self.cpus:
                cpu.engine.close()
            return
        changed = self._written + [(a, a + n) for a, n in self.image.watch]
        for cpu in self.cpus:
            cpu.engine.recycle(changed)
        POOL.give(self._pool_key, self._mems, [cpu.engine for cpu in self.cpus])

    # ----------------------------------------------------------------------------------------
    # Results
    # ----------------------------------------------------------------------------------------
    @property
    def trace_hash(self) -> str:
        return self.trace.hash

    @property
    def crashes(self) -> list[Crash]:
        return [c.crash for c in self.cpus if c.crash is not None]

    def now(self) -> int:
        return min(c.clock for c in self.cpus)

    def stats(self) -> list[dict[str, int]]:
        return [dict(c.stats, clock=c.clock) for c in self.cpus]

    def symbol(self, name: str) -> int:
        try:
            return self.image.symbols[name]
        except KeyError:
            raise ConfigError(f"the kernel image has no symbol {name!r}") from None
