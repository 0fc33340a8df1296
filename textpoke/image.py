"""Build the emulated kernel: assemble `textpoke/asm/*.S` with keystone into text with a symbol table,
lay out its data and per-CPU variables, and check every encoding that matters with capstone.

Source conventions (a small preprocessor in front of keystone, Intel syntax):

* `SYM_FUNC_START(name)` ... `SYM_FUNC_END(name)` delimit a unit; each unit is assembled on its own at
  its final address. Labels inside a unit are local (`.Lname`); a name that is another unit or a
  constant is replaced by its number before keystone sees it, because keystone's own symbol
  resolver mis-resolves rel32 targets by 4 bytes (UNICORN-NOTES 6).
* `FTRACE_NOP` is the 5-byte ftrace site `0f 1f 44 00 00`, emitted as raw bytes: keystone encodes
  memory-operand nops wrongly. `PUSH_CALLER_SAVED` / `POP_CALLER_SAVED` save and restore rax, rcx,
  rdx, rsi, rdi, r8-r11 (Linux's PUSH_REGS / POP_REGS, for the registers our handlers clobber).
* `#` starts a comment.

Two passes: the first assembles every unit against far-away placeholder addresses to learn an upper
bound of its size (branches to placeholders take their longest form); the second assembles at the
final addresses, which can only make encodings shorter; units are padded with int3.
"""

from __future__ import annotations

import bisect
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from keystone import KS_ARCH_X86, KS_MODE_64, Ks, KsError

from cpus.boot import BootImage
from cpus.delivery import Gate, Vector
from cpus.errors import TextpokeError
from cpus.layout import IMAGE_DATA_VA, TEXT_VA, Layout

from .elfobj import ElfObject, Linked, ObjectError, link, read_object

__all__ = [
    "BP_DESC",
    "BP_ENTRIES",
    "FTRACE_MODIFYING",
    "FTRACE_NOP",
    "MOD_CODE_IP",
    "MOD_CODE_NEW",
    "MOD_CODE_WRITE_FLAG",
    "NMI_CHOICES",
    "NMI_ENTRIES",
    "NMI_RUNNING",
    "NMI_UPDATES",
    "STOP_NUM_THREADS",
    "STOP_STATE",
    "STOP_THREAD_ACK",
    "ImageError",
    "KernelConfig",
    "KernelImage",
    "ObjectError",
    "Percpu",
    "build_kernel",
]

FTRACE_NOP = bytes.fromhex("0f1f440000")
#: the trampolines' patchable tracer calls (inner labels of ftrace.S)
TRAMPOLINE_SITES = ("ftrace_call", "ftrace_call_alt")
FN_SHIFT = 6  # traced functions sit every 64 bytes
MAX_TRACED = 256
BP_DESC_MAX = 256  # TP_VEC_MAX: PAGE_SIZE / 16-byte entries in Linux; ours are 32 bytes each
BP_ENTRY_SIZE = 32
RT_RING_SIZE = 256  # samples the RT task keeps (a power of two)
#: kprobes a kernel built with probes can hold at once (table entries, slots, detour buffers)
KPROBE_MAX = 64
KPROBE_ENTRY_SIZE = 32
KPROBE_SLOT_SIZE = 16  # Linux: MAX_INSN_SIZE bytes per kprobe instruction slot
OPTPROBE_SLOT_SIZE = 64  # a detour buffer: the callback part, the copied instructions, the jmp back
OPTPROBE_JMP_LEN = 5  # the jmp rel32 an optimized probe writes
#: kernels with probes are preemptible: the scheduler tick's period on every workload CPU (cycles),
#: and how long the task it switches to runs at least (iterations of a 2-instruction loop; up to
#: 128 times that, see kprobe.S)
PREEMPT_TICK_PERIOD = 40_000
PREEMPT_SPIN = 250

#: #BP entry variant -> symbol
BP_ENTRIES = {
    "emulate": "bp_entry_emulate",
    "skip": "bp_entry_skip",
    "emulate-nogap": "bp_entry_emulate_nogap",
    # a mutation for the oracle's tests: a handler from before 2-byte jump labels, which emulates
    # only 5-byte instructions and so dies on an int3 over a 2-byte site
    "emulate-no-jmp8": "bp_entry_emulate_nojmp8",
    "emulate-noret": "bp_entry_emulate_noret",
}
#: the #BP modes whose entries only kernels with compiled code have (their mutations concern its sites)
BP_COMPILED_ONLY = frozenset({"emulate-no-jmp8"})
#: NMI entry variant -> (symbol, IST index of its gate: 0 = the interrupted stack, as on i386)
NMI_ENTRIES: dict[str, tuple[str, int]] = {
    "naive": ("nmi_entry_naive", 2),
    "nested-safe": ("nmi_entry_nested", 2),
    "latch-cmpxchg": ("nmi_entry_latch_cmpxchg", 0),
    "latch-cmpxchg386": ("nmi_entry_latch_cmpxchg386", 0),
    "latch-dec": ("nmi_entry_latch_dec", 0),
    # mutations of the nested-safe entry, for the oracle's tests
    "nested-no-rsp-check": ("nmi_entry_nested_norsp", 2),
    "nested-no-variable": ("nmi_entry_nested_novar", 2),
    "nested-hw-frame": ("nmi_entry_nested_hwframe", 2),
    "nested-no-rip-check": ("nmi_entry_nested_norip", 2),
}
#: the entries users choose from (the rest are mutations)
NMI_CHOICES = ("naive", "nested-safe", "latch-cmpxchg", "latch-cmpxchg386", "latch-dec")

_SOURCES = ("entry_bp.S", "entry_nmi.S", "entry_ipi.S", "stopper.S", "ftrace_nmi.S", "workload.S", "rt_task.S")
#: mutations of the entries for compiled code's sites (2-byte jump labels), assembled after every
#: other fixed unit of the kernels built with objects (the C kernel's among them), so that they move
#: no address of the rest; the assembly kernel, which has no such sites, goes without them
_MUTANT_SOURCES = ("entry_bp_mutants.S",)
#: kernels built with the user's objects: extra sources, and the template replaced by another
_OBJECT_SOURCES = ("user_workload.S", "runtime.S")
_OBJECT_TEMPLATE_SWAP = {"ftrace.S": "ftrace_table.S"}
#: what the user's objects define and the kernel calls
USER_WORKLOAD = "textpoke_workload"
USER_NMI = "textpoke_nmi"
USER_NMI_IRQ = "textpoke_nmi_irq"
#: the kernel functions the user's objects may call
RUNTIME = ("memcpy", "memset", "memmove")
#: the built-in kernels: the assembly one, and the same workload and traced functions in C
KERNELS = ("asm", "c")
C_KERNEL_OBJECT = "kernel.o"  # in textpoke/c, built from kernel.c by `textpoke cc --kernel`
C_NMI_HALF_MAX = 2
#: the C kernel's static keys: textpoke_jl_keys[JL_KEYS] of struct static_key_false (4 bytes each)
JL_KEYS = 64
JL_KEYS_SYMBOL = "textpoke_jl_keys"
JL_KEY_SIZE = 4
#: the C kernel's static calls sc0 .. sc{C_NR_SC-1}, each with targets sct_K_0 .. sct_K_{C_NR_SC_TARGETS-1}
C_NR_SC = 8
C_NR_SC_TARGETS = 4
#: the name prefix of a static call's trampoline (its key is __SCK__name), as in Linux
SC_TRAMP_PREFIX = "__SCT__"
#: template sources expanded once per variant: suffix -> flags
_TEMPLATES: dict[str, dict[str, frozenset[str]]] = {
    "ftrace.S": {"": frozenset({"MAIN"}), "_alt": frozenset({"ALT"})},
    "entry_nmi_nested.S": {
        "": frozenset({"RIP", "VAR", "RSP", "SAVED"}),
        "_norsp": frozenset({"RIP", "VAR", "SAVED"}),
        "_novar": frozenset({"RIP", "RSP", "SAVED"}),
        "_hwframe": frozenset({"RIP", "VAR", "RSP"}),
        "_norip": frozenset({"VAR", "RSP", "SAVED"}),
    },
    "entry_nmi_latch.S": {
        "_cmpxchg": frozenset({"CMPXCHG"}),
        "_cmpxchg386": frozenset({"CMPXCHG386"}),
        "_dec": frozenset({"DEC"}),
    },
}


class ImageError(TextpokeError):
    """The kernel sources do not assemble into what the simulator needs."""


class Percpu:
    """Offsets of the per-CPU variables (GS-relative), shared by the asm sources and Python."""

    CPU_ID = 0x00
    NMI_COUNT = 0x08  # NMI handler runs
    IPI_COUNT = 0x10  # call-function IPIs taken (sync acknowledgements)
    BP_COUNT = 0x18  # int3 traps the handler consumed
    BP_MISS = 0x20  # int3 traps nobody owned
    LOOPS = 0x28  # workload iterations
    IRQ_STACK_TOP = 0x30
    NMI_STACK_TOP = 0x38
    IRQOFF_MASK = 0x40  # 0: no interrupts-off sections; else one when (lcg >> 20) & mask == 0
    IRQOFF_LEN = 0x48  # iterations of the interrupts-off spin
    WORK_MASK = 0x50  # busy-work iterations per call: (lcg >> 48) & mask
    LOOP_LIMIT = 0x58  # 0: run forever; else hlt after this many workload iterations
    NMI_STATE = 0x70  # i386-style entry: NOT_RUNNING 0 / EXECUTING 1 / LATCHED 2
    RANDOM = 0x78  # kernels with C code: this workload iteration's random number (textpoke_random)
    STOP_ACK = 0x60  # times this CPU entered the stop_machine stopper
    STOP_EXIT = 0x68  # times it left it
    # the periodic RT task (rt_task.S), set up by textpoke.rt
    RT_NEXT = 0x1E0  # expiry the task expects next (TSC cycles)
    RT_PERIOD = 0x1E8  # its period
    RT_COUNT = 0x1F0  # samples recorded so far
    RT_OVERRUNS = 0x1F8  # ticks merged into a later one while the interrupt was held back
    SAVE_MODIFYING = 0x80  # ftrace_nmi_enter's copy of modifying_code, for ftrace_nmi_exit
    STOP_STAGE = 0x88  # the last multi_cpu_stop state this CPU acted on
    FT_FUNC = 0x90  # calls of the function tracer (reached through the trampoline's ftrace_call)
    FT_LIST = 0x98  # calls of ftrace_ops_list_func
    PREEMPT_COUNT = 0xA0  # > 0 inside a preempt-off section
    NEED_RESCHED = 0xA8  # a woken stopper waits for preempt_enable
    PREEMPT_OFF = 0xB0  # non-zero: the IRQOFF_MASK/IRQOFF_LEN sections are preempt-off sections instead
    SCRATCH = 0x200  # u64[64]: the workload's busy-work array
    WL_COUNT = 0x400  # u64[MAX_TRACED]: calls the workload made, per traced function
    FT_COUNT = 0xC00  # u64[MAX_TRACED]: calls ftrace_caller saw, per traced function
    FT_ALT_COUNT = 0x1400  # u64[MAX_TRACED]: calls ftrace_caller_alt saw
    NMI_CALLS = 0x1C00  # u64[MAX_TRACED]: calls the NMI handler made, per traced function
    JL_TAKEN = 0x2C00  # u64[JL_KEYS]: the C kernel's jump labels: executions that took the jmp, per key
    SC_COUNT = 0x2E00  # u64[NR_SC * NR_SC_TARGETS]: calls each static-call target saw (C kernel)
    SC_RETURNS = 0x2F00  # u64[NR_SC]: returns from each static call's plain call sites (C kernel)
    KP_HITS = 0x2400  # u64[KPROBE_MAX]: kprobe callbacks run on this CPU, per probe index
    KP_RETRY = 0x2600  # int3 traps sent back to an instruction whose int3 was already removed
    PREEMPT_TICKS = 0x2608  # kernels with probes: scheduler ticks that preempted this CPU's task
    PREEMPT_SPIN = 0x2610  # ... and how long the other task runs (loop iterations, 2 instructions each)
    PREEMPT_ACTIVE = 0x2618  # another task runs (the tick handler's spin)
    RT_RING = 0x3000  # (expected, woke) u64 pairs [RT_RING_SIZE]: the RT task's last samples


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Shape of the emulated kernel."""

    nr_traced: int = 32
    #: the NMI handler calls traced functions 0 .. nmi_funcs-1 (a power of two, >= 2)
    nmi_funcs: int = 4
    #: busy work per workload call: up to `work_mask` loop iterations (a power of two minus 1)
    work_mask: int = 15
    #: ELF objects (paths) whose functions replace the built-in traced functions and workload
    objects: tuple[str, ...] = ()
    #: the built-in workload and traced functions: "asm" (textpoke/asm) or "c" (textpoke/c/kernel.c)
    kernel: str = "asm"
    #: CONFIG_KPROBES (asm kernel only): the kprobe handler in the #BP chain, the kprobe table, the
    #: instruction slot areas, and a kprobe point and an optprobe range in every traced function
    probes: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.objects, (str, bytes)) or not all(isinstance(o, str) for o in self.objects):
            raise ImageError("objects must be a tuple of paths")
        if self.kernel not in KERNELS:
            raise ImageError(f"unknown kernel {self.kernel!r}; choose from {', '.join(KERNELS)}")
        if self.kernel == "c" and self.objects:
            raise ImageError("the C kernel has its own workload and traced functions; --object replaces them: pick one")
        if self.probes and (self.kernel != "asm" or self.objects):
            raise ImageError("kprobe points exist in the built-in assembly kernel only")
        if self.kernel == "c" and self.nmi_funcs > 2 * C_NMI_HALF_MAX:
            raise ImageError(f"the C kernel's NMI handler calls at most {2 * C_NMI_HALF_MAX} functions")
        if not 1 <= self.nr_traced <= MAX_TRACED:
            raise ImageError(f"nr_traced must be between 1 and {MAX_TRACED}, got {self.nr_traced}")
        n = self.nmi_funcs
        if n < 2 or n & (n - 1) or n > self.nr_traced:
            raise ImageError(f"nmi_funcs must be a power of two in [2, nr_traced], got {n}")
        if self.work_mask < 0 or self.work_mask & (self.work_mask + 1) or self.work_mask > 63:
            raise ImageError(f"work_mask must be a power of two minus one below 64, got {self.work_mask}")


@dataclass(frozen=True)
class Unit:
    name: str
    body: str
    align: int = 16
    inner: tuple[str, ...] = ()  # SYM_INNER_LABEL names: global labels inside the unit


@dataclass
class KernelImage:
    """The assembled kernel: text, symbols, sites, and how to boot it."""

    config: KernelConfig
    text: bytes
    data_size: int
    symbols: dict[str, int]
    sizes: dict[str, int]
    sites: dict[str, int]  # traced function name -> site address
    iret_sites: tuple[int, ...]
    popf_sites: tuple[int, ...]
    halt_sites: tuple[int, ...] = ()
    boundaries: frozenset[int] = frozenset()  # every instruction start in the text
    constants: dict[str, int] = field(default_factory=dict)
    #: the ftrace sites in index order (the index of the per-CPU call counters)
    site_table: tuple[int, ...] = ()
    #: units loaded from the user's objects (compiled code: checked more loosely than ours)
    foreign: frozenset[str] = frozenset()
    #: initial contents of the kernel data (zeros beyond)
    data_init: bytes = b""
    #: records parsed from the objects: jump labels and static call sites (see `textpoke.elfobj`)
    jump_entries: tuple = ()
    static_calls: tuple = ()
    #: every global symbol of the objects (data too: read it with Machine.read after a run)
    object_symbols: dict[str, int] = field(default_factory=dict)
    #: kernels built with probes: per traced function, its kprobe point (address, instruction length)
    kprobe_points: tuple[tuple[int, int], ...] = ()
    #: ... and its optprobe range (address, length of the whole instructions it covers, >= 5)
    optprobe_ranges: tuple[tuple[int, int], ...] = ()

    @property
    def user_code(self) -> bool:
        """Built from the user's objects: the workload does not count calls per traced function
        (the C kernel's does, as the assembly one's)."""
        return bool(self.config.objects)

    #: the trampolines' patchable calls of the tracer function (ftrace_call, ftrace_call_alt)
    trampoline_sites: dict[str, int] = field(default_factory=dict)

    @property
    def patchable(self) -> dict[int, bytes]:
        """Every patchable site -> its bytes at boot (traced sites, the ftrace trampolines' calls, the
        jump labels (2 or 5 bytes each), the static call sites and the static call trampolines'
        jumps)."""
        out = {site: FTRACE_NOP for site in self.sites.values()}
        for site in self.trampoline_sites.values():
            out[site] = self.text[site - TEXT_VA : site - TEXT_VA + 5]
        for e in self.jump_entries:
            out[e.code] = self.text[e.code - TEXT_VA : e.code - TEXT_VA + e.length]
        for site in [c.addr for c in self.static_calls] + list(self.static_call_trampolines.values()):
            out[site] = self.text[site - TEXT_VA : site - TEXT_VA + 5]
        # a kprobe site is its one instruction; an optprobe site the 5 bytes its jmp rel32 replaces
        for site, n in self.kprobe_points:
            out[site] = self.text[site - TEXT_VA : site - TEXT_VA + n]
        for site, _n in self.optprobe_ranges:
            out[site] = self.text[site - TEXT_VA : site - TEXT_VA + OPTPROBE_JMP_LEN]
        return out

    @property
    def jump_label_counters(self) -> dict[int, int]:
        """The C kernel's jump labels: site -> the per-CPU offset of its key's branch-taken counter
        (Percpu.JL_TAKEN[key index]). Empty for other kernels: their code keeps no such counts."""
        base = self.object_symbols.get(JL_KEYS_SYMBOL) if self.config.kernel == "c" else None
        if base is None:
            return {}
        out = {}
        for e in self.jump_entries:
            index = (e.key - base) // JL_KEY_SIZE
            if 0 <= index < JL_KEYS:
                out[e.code] = Percpu.JL_TAKEN + 8 * index
        return out

    @property
    def static_call_trampolines(self) -> dict[str, int]:
        """Static call name -> its trampoline (`__SCT__name`), which is patched like a tail call site."""
        n = len(SC_TRAMP_PREFIX)
        return {k[n:]: a for k, a in sorted(self.symbols.items()) if k.startswith(SC_TRAMP_PREFIX)}

    @property
    def traced_base(self) -> int:
        return self.symbols["fn_000"]

    def site_of(self, index: int) -> int:
        if self.site_table:
            return self.site_table[index]
        return self.traced_base + (index << FN_SHIFT)

    def function_at(self, site: int) -> str | None:
        for name, addr in self.sites.items():
            if addr == site:
                return name
        return None

    def boot_image(self, bp_mode: str = "emulate", nmi_entry: str = "naive") -> BootImage:
        """The machine's view of this kernel, with the #BP and NMI entries chosen for this run."""
        if bp_mode not in BP_ENTRIES:
            raise ImageError(f"unknown int3 mode {bp_mode!r}; choose from {', '.join(BP_ENTRIES)}")
        if nmi_entry not in NMI_ENTRIES:
            raise ImageError(f"unknown NMI entry {nmi_entry!r}; choose from {', '.join(NMI_ENTRIES)}")
        sym = self.symbols
        if BP_ENTRIES[bp_mode] not in sym:
            raise ImageError(f"int3 mode {bp_mode} exists in kernels with compiled code only (--kernel c, --object)")
        nmi_symbol, nmi_ist = NMI_ENTRIES[nmi_entry]
        cfg = self.config
        gates = {
            int(Vector.BP): Gate(sym[BP_ENTRIES[bp_mode]]),
            int(Vector.NMI): Gate(sym[nmi_symbol], ist=nmi_ist),
            int(Vector.IPI): Gate(sym["ipi_entry"]),
            int(Vector.STOP): Gate(sym["stopper_entry"]),
            # a kernel built with probes is preemptible: its tick preempts (kprobe.S); else the RT task
            int(Vector.TIMER): Gate(sym["preempt_tick_entry" if cfg.probes else "rt_timer_entry"]),
        }

        def percpu_init(cpu: int, layout: Layout) -> dict[int, int]:
            return {
                Percpu.CPU_ID: cpu,
                Percpu.IRQ_STACK_TOP: layout.irq_stack_top(cpu),
                Percpu.NMI_STACK_TOP: layout.nmi_stack_top(cpu),
                Percpu.WORK_MASK: cfg.work_mask,
                Percpu.PREEMPT_SPIN: PREEMPT_SPIN if cfg.probes else 0,
            }

        def boot_regs(cpu: int, seed: int) -> dict[str, int]:
            # a distinct, seed-dependent LCG state per CPU (splitmix64 of seed and cpu)
            z = (seed * 0x9E3779B97F4A7C15 + (cpu + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
            return {"r12": z ^ (z >> 31), "r13": 0, "r14": 0}

        return BootImage(
            text=self.text,
            data=self.data_init.ljust(self.data_size, b"\0"),
            gates=gates,
            worker_entry=sym["workload_main"],
            idle_entry=sym["idle_main"],
            idle_range=(sym["idle_main"], sym["idle_main"] + self.sizes["idle_main"]),
            watch=tuple((addr, len(code)) for addr, code in self.patchable.items()),
            iret_sites=self.iret_sites,
            popf_sites=self.popf_sites,
            halt_sites=self.halt_sites,
            boot_regs=boot_regs,
            percpu_init=percpu_init,  # type: ignore[arg-type]
            symbols=dict(sym),
            shared_code=tuple((sym[n], self.sizes[n]) for n in SHARED_CODE if n in self.sizes),
            # an ftrace site that is its function's first byte (no endbr64 or the like before it)
            block_starts=frozenset(a for n, a in self.sites.items() if sym.get(n) == a),
        )


#: units that read or write what the patcher reads or writes: the sync IPI's acknowledgement, the
#: descriptor lookup of the #BP handler (bp_desc, its reference count, the binary search), the
#: stopper's entry and its stage handshake (multi_cpu_stop, also reached from preempt_schedule),
#: stop_machine-era ftrace's NMI side (nmi_running, the pending write it stores into the text), and
#: in kernels with probes the kprobe table's lookup and the code the patcher writes and frees: the
#: out-of-line slots and the detour buffers (a CPU that ran through a slot ahead of the patcher would
#: miss the poison a slot freed too early holds)
SHARED_CODE = (
    "ipi_entry",
    "poke_int3_handler",
    "stopper_entry",
    "multi_cpu_stop",
    "ftrace_nmi_enter",
    "ftrace_nmi_exit",
    "kprobe_int3_handler",
    "kprobe_insn_slots",
    "optprobe_insn_slots",
)


# ------------------------------------------------------------------------------------------------
# Data layout (kernel data segment, after the machine's GDT/IDT)
# ------------------------------------------------------------------------------------------------
#: multi_cpu_stop's shared state (u64 each): the stage, the acks still missing, the thread count
STOP_STATE = IMAGE_DATA_VA
STOP_THREAD_ACK = IMAGE_DATA_VA + 0x08
STOP_NUM_THREADS = IMAGE_DATA_VA + 0x10
#: multi_cpu_stop's stages (MULTI_STOP_*)
STOP_NONE, STOP_PREPARE, STOP_DISABLE_IRQ, STOP_RUN, STOP_EXIT = range(5)
STOP_STAGE_NAMES = {STOP_PREPARE: "prepare", STOP_DISABLE_IRQ: "disable-irq", STOP_RUN: "run", STOP_EXIT: "exit"}
#: stop_machine ftrace (2.6.28-3.4): modifying_code, nmi_running (bit 31: a write is pending), the
#: pending write's address (in the text's writable alias) and bytes, and how many NMIs performed it
FTRACE_MODIFYING = IMAGE_DATA_VA + 0x18
NMI_RUNNING = IMAGE_DATA_VA + 0x20
MOD_CODE_IP = IMAGE_DATA_VA + 0x28
MOD_CODE_NEW = IMAGE_DATA_VA + 0x30
NMI_UPDATES = IMAGE_DATA_VA + 0x38
MOD_CODE_WRITE_FLAG = 1 << 31
BP_DESC = IMAGE_DATA_VA + 0x40  # refs u64, nr_entries u64, entries[BP_DESC_MAX] of 32 bytes
DATA_SIZE = 0x40 + 16 + BP_DESC_MAX * BP_ENTRY_SIZE
#: kernels built with the user's objects: the sorted ftrace site table, then the objects' data
SITE_TABLE = IMAGE_DATA_VA + (DATA_SIZE + 63) // 64 * 64
USER_DATA = SITE_TABLE + MAX_TRACED * 8
#: kernels built with probes (never with objects): the kprobe table (kprobe.S) where the site table
#: would be: nr u64, pad u64, then KPROBE_MAX entries of KPROBE_ENTRY_SIZE bytes
KPROBE_TABLE = SITE_TABLE
PROBE_DATA_SIZE = KPROBE_TABLE - IMAGE_DATA_VA + 16 + KPROBE_MAX * KPROBE_ENTRY_SIZE


def _constants(cfg: KernelConfig, traced_base: int) -> dict[str, int]:
    c = {f"PCPU_{k}": v for k, v in vars(Percpu).items() if k.isupper()}
    c.update(
        BP_DESC=BP_DESC,
        KPROBE_TABLE=KPROBE_TABLE,
        STOP_STATE=STOP_STATE,
        MULTI_STOP_DISABLE_IRQ=STOP_DISABLE_IRQ,
        MULTI_STOP_EXIT=STOP_EXIT,
        FTRACE_MOD=FTRACE_MODIFYING,  # base of the stop_machine ftrace variables
        FTRACE_MOD_RUNNING=NMI_RUNNING - FTRACE_MODIFYING,
        FTRACE_MOD_IP=MOD_CODE_IP - FTRACE_MODIFYING,
        FTRACE_MOD_NEW=MOD_CODE_NEW - FTRACE_MODIFYING,
        FTRACE_MOD_UPDATES=NMI_UPDATES - FTRACE_MODIFYING,
        NR_TRACED=cfg.nr_traced,
        FN_SHIFT=FN_SHIFT,
        TRACED_BASE=traced_base,
        TRACED_BASE_PLUS_5=traced_base + 5,
        NMI_FUNCS_HALF_MASK=cfg.nmi_funcs // 2 - 1,
        RT_RING_MASK=RT_RING_SIZE - 1,
        IRQ_STACK_SIZE=0x4000,
        NMI_STACK_SIZE=0x1000,
        KERNEL_CS=0x10,
        KERNEL_DS=0x18,
    )
    return c


# ------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------
_START = re.compile(r"^\s*SYM_FUNC_START\((\w+)\)\s*$")
_INNER = re.compile(r"^\s*SYM_INNER_LABEL\((\w+)\)\s*$")
_END = re.compile(r"^\s*SYM_FUNC_END\((\w+)\)\s*$")
_WORD = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def _read_source(name: str) -> str:
    return resources.files("textpoke.asm").joinpath(name).read_text()


def parse_units(source: str, filename: str) -> list[Unit]:
    units: list[Unit] = []
    current: str | None = None
    lines: list[str] = []
    inner: list[str] = []
    for lineno, raw in enumerate(source.splitlines(), 1):
        line = raw.split("#", 1)[0].rstrip()
        m = _START.match(line)
        if m:
            if current is not None:
                raise ImageError(f"{filename}:{lineno}: {m.group(1)} starts inside {current}")
            current, lines, inner = m.group(1), [], []
            continue
        m = _INNER.match(line)
        if m:
            if current is None:
                raise ImageError(f"{filename}:{lineno}: SYM_INNER_LABEL({m.group(1)}) outside a function")
            inner.append(m.group(1))
            lines.append(f"{m.group(1)}:")
            continue
        m = _END.match(line)
        if m:
            if current != m.group(1):
                raise ImageError(f"{filename}:{lineno}: SYM_FUNC_END({m.group(1)}) does not close {current}")
            units.append(Unit(current, "\n".join(lines), inner=tuple(inner)))
            current = None
            continue
        if line.strip():
            if current is None:
                raise ImageError(f"{filename}:{lineno}: code outside SYM_FUNC_START/END: {line.strip()}")
            lines.append(line)
    if current is not None:
        raise ImageError(f"{filename}: {current} has no SYM_FUNC_END")
    return units


def _substitute(
    body: str, values: dict[str, int], unit: str, own: tuple[str, ...] = (), macros: dict[str, list[str]] | None = None
) -> str:
    macros = MACROS if macros is None else macros

    def repl(m: re.Match[str]) -> str:
        w = m.group(0)
        if w == unit:
            raise ImageError(f"{unit} refers to itself by name; use a local .L label")
        if w in own:
            return w  # a label of this very unit: keystone resolves it
        v = values.get(w)
        # hex, not decimal: keystone intermittently rejects decimal literals of 2**63 and above
        # ("Literal value out of range"), depending on memory it does not initialise
        return hex(v) if v is not None else w

    out = []
    for line in body.splitlines():
        macro = macros.get(line.strip())
        if macro is not None:
            out.extend(_WORD.sub(repl, m) if not m.lstrip().startswith(".byte") else m for m in macro)
            continue
        # keep label definitions and directives intact, substitute words elsewhere
        out.append(_WORD.sub(repl, line))
    return "\n".join(out)


#: the caller-saved registers an entry saves around a call into C-like code (Linux: PUSH_REGS)
_CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
#: one-line macros of the sources, expanded before assembly
MACROS: dict[str, list[str]] = {
    "FTRACE_NOP": ["    .byte " + ", ".join(f"0x{b:02x}" for b in FTRACE_NOP)],
    "PUSH_CALLER_SAVED": [f"    push {r}" for r in _CALLER_SAVED],
    "POP_CALLER_SAVED": [f"    pop {r}" for r in reversed(_CALLER_SAVED)],
    "KPROBE_CHAIN": ["    jz bp_unhandled"],  # without kprobes: an int3 the descriptors miss is nobody's
}


def _int3_fill(n: int) -> list[str]:
    return [".byte " + ", ".join(["0xcc"] * min(64, n - i)) for i in range(0, n, 64)]


#: the macros of a kernel built with probes
PROBE_MACROS: dict[str, list[str]] = {
    "KPROBE_CHAIN": [
        "    jnz .Lhandled",
        "    call kprobe_int3_handler",
        "    test rax, rax",
        "    jz bp_unhandled",
    ],
    "KPROBE_SLOT_AREA": _int3_fill(KPROBE_MAX * KPROBE_SLOT_SIZE),
    "OPTPROBE_SLOT_AREA": _int3_fill(KPROBE_MAX * OPTPROBE_SLOT_SIZE),
}


def _callback_chain(name: str, first: int, count: int) -> list[str]:
    """Count the call in NMI_CALLS, then call fn_{first + rbx} through direct calls only."""
    out = [f"    inc qword ptr gs:[PCPU_NMI_CALLS+{8 * first}+rbx*8]"]
    for i in range(count - 1):
        out += [
            f"    cmp rbx, {i}",
            f"    jne .L{name}_{i + 1}",
            f"    call fn_{first + i:03d}",
            f"    jmp .L{name}_done",
            f".L{name}_{i + 1}:",
        ]
    out += [f"    call fn_{first + count - 1:03d}", f".L{name}_done:"]
    return out


def _macros(cfg: KernelConfig) -> dict[str, list[str]]:
    half = cfg.nmi_funcs // 2
    return (
        MACROS
        | (PROBE_MACROS if cfg.probes else {})
        | {
            "NMI_CALLBACKS_LOW": _callback_chain("nmilow", 0, half),
            "NMI_CALLBACKS_HIGH": _callback_chain("nmihigh", half, half),
        }
    )


_KS = Ks(KS_ARCH_X86, KS_MODE_64)
_CS = Cs(CS_ARCH_X86, CS_MODE_64)
_CS.detail = True


def _assemble(unit: Unit, body: str, address: int) -> bytes:
    try:
        encoding, _ = _KS.asm(body, address)
    except KsError as err:
        raise ImageError(f"keystone cannot assemble {unit.name}: {err}") from None
    return bytes(encoding or b"")


def expand_template(source: str, suffix: str, flags: frozenset[str]) -> str:
    """Keep a "?FLAG " line when FLAG is set, a "?!FLAG " line when it is not; {V} -> suffix."""
    out = []
    for line in source.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("?"):
            token, _, rest = stripped.partition(" ")
            negate = token.startswith("?!")
            flag = token[2:] if negate else token[1:]
            if (flag in flags) == negate:
                continue
            line = "    " + rest.strip() if not rest.strip().endswith(":") else rest.strip()
        out.append(line.replace("{V}", suffix))
    return "\n".join(out)


def _units(cfg: KernelConfig) -> tuple[list[Unit], list[Unit]]:
    fixed: list[Unit] = []
    for src in _SOURCES:
        fixed.extend(parse_units(_read_source(src), src))
    for src, variants in _TEMPLATES.items():
        text = _read_source(src)
        for suffix, flags in variants.items():
            fixed.extend(parse_units(expand_template(text, suffix, flags), f"{src}{{{suffix}}}"))
    if cfg.probes:
        fixed.extend(parse_units(_read_source("kprobe.S"), "kprobe.S"))
    flags = frozenset({"PROBES"}) if cfg.probes else frozenset()
    template = parse_units(expand_template(_read_source("traced.S"), "", flags), "traced.S")
    if len(template) != 1:
        raise ImageError("traced.S must hold exactly one function template")
    traced = []
    for i in range(cfg.nr_traced):
        body = template[0].body.replace("FN_INDEX", str(i)).replace("FN_MUL", str(2 * i + 3))
        traced.append(Unit(f"fn_{i:03d}", body, 1 << FN_SHIFT))
    return fixed, traced


def _c_kernel_fixups(config: KernelConfig, linked: Linked) -> None:
    """The C kernel's shape for `config`: its first nr_traced functions are the traced ones (site
    index i is fn_i, so the workload's per-function counters line up with the site table), and its
    knobs in data get their values (the static calls it runs: the first min(nr_traced, 8))."""
    want = [f"fn_{i:03d}" for i in range(config.nr_traced)]
    missing = [n for n in want if n not in linked.sites]
    if missing:
        raise ImageError(f"the C kernel object has no ftrace site for {missing[0]}: rebuild it (textpoke cc --kernel)")
    sites = {n: linked.sites[n] for n in want}
    if sorted(sites.values()) != list(sites.values()):
        raise ImageError("the C kernel's traced functions are not laid out in index order")
    linked.sites = sites
    data = bytearray(linked.data)
    knobs = (
        ("textpoke_nr_traced", config.nr_traced),
        ("textpoke_nmi_half", config.nmi_funcs // 2),
        ("textpoke_nr_sc", min(config.nr_traced, C_NR_SC)),  # the static calls the workload runs
    )
    for name, value in knobs:
        struct.pack_into("<Q", data, linked.symbols[name] - USER_DATA, value)
    linked.data = bytes(data)


def _object_units() -> list[Unit]:
    """The asm units of a kernel built with the user's objects: the entries and the stopper as
    always, the user workload loop instead of the built-in one, the table-driven trampolines, the
    runtime. No built-in traced functions."""
    fixed: list[Unit] = []
    for src in (*_SOURCES, *_OBJECT_SOURCES):
        fixed.extend(u for u in parse_units(_read_source(src), src) if (u.name, src) != ("workload_main", "workload.S"))
    for src, variants in _TEMPLATES.items():
        src = _OBJECT_TEMPLATE_SWAP.get(src, src)
        text = _read_source(src)
        for suffix, flags in variants.items():
            fixed.extend(parse_units(expand_template(text, suffix, flags), f"{src}{{{suffix}}}"))
    for src in _MUTANT_SOURCES:
        fixed.extend(parse_units(_read_source(src), src))
    return fixed


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _inner_labels(unit: Unit, body: str, address: int) -> dict[str, int]:
    """Addresses of the unit's SYM_INNER_LABELs: keystone reports none, so assemble the unit once
    more with `.quad label` after it and read them back."""
    if not unit.inner:
        return {}
    code = _assemble(unit, body + "\n" + "\n".join(f".quad {n}" for n in unit.inner), address)
    tail = code[-8 * len(unit.inner) :]
    return dict(zip(unit.inner, struct.unpack(f"<{len(unit.inner)}Q", tail), strict=True))


def build_kernel(config: KernelConfig = KernelConfig()) -> KernelImage:
    """Assemble the kernel for `config` (cached per configuration, and per object contents)."""
    return _dispatch(config, cached=True)


def _build_fresh(config: KernelConfig = KernelConfig()) -> KernelImage:
    """`build_kernel` without its cache: a new image each call (for tests that alter one)."""
    return _dispatch(config, cached=False)


build_kernel.__wrapped__ = _build_fresh  # type: ignore[attr-defined]  # as functools.lru_cache offers


def _dispatch(config: KernelConfig, cached: bool) -> KernelImage:
    with_objects = _build_with_objects if cached else _build_with_objects.__wrapped__
    if config.kernel == "c":
        blob = resources.files("textpoke.c").joinpath(C_KERNEL_OBJECT).read_bytes()
        return with_objects(config, ((f"textpoke/c/{C_KERNEL_OBJECT}", blob),))
    if not config.objects:
        return _build_asm(config) if cached else _build_asm.__wrapped__(config)
    blobs = []
    for path in config.objects:
        try:
            with open(path, "rb") as f:
                blobs.append((path, f.read()))
        except OSError as err:
            raise ObjectError(f"{path}: cannot read: {err.strerror or err}") from None
    return with_objects(config, tuple(blobs))


@lru_cache(maxsize=8)
def _build_asm(config: KernelConfig) -> KernelImage:
    fixed, traced = _units(config)
    return _build(config, fixed, traced, _macros(config), None)


@lru_cache(maxsize=8)
def _build_with_objects(config: KernelConfig, blobs: tuple[tuple[str, bytes], ...]) -> KernelImage:
    objects = [read_object(b, name=p) for p, b in blobs]
    defined = {
        s.name for o in objects for s in o.symbols if s.shndx != "SHN_UNDEF" and s.bind != "STB_LOCAL" and s.name
    }
    if USER_WORKLOAD not in defined:
        raise ObjectError(f"no object defines {USER_WORKLOAD}(), which every workload CPU calls in its loop")
    fixed = _object_units()
    nmi = [f"    call {USER_NMI}"] if USER_NMI in defined else []
    nmi_irq = [f"    call {USER_NMI_IRQ}"] if USER_NMI_IRQ in defined else []
    macros = MACROS | {"NMI_CALLBACKS_LOW": nmi, "NMI_CALLBACKS_HIGH": nmi_irq}
    return _build(config, fixed, [], macros, objects)


def _build(
    config: KernelConfig,
    fixed: list[Unit],
    traced: list[Unit],
    macros: dict[str, list[str]],
    objects: list[ElfObject] | None,
) -> KernelImage:
    units = fixed + traced
    names = [u.name for u in units] + [n for u in units for n in u.inner]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ImageError(f"symbols defined twice: {', '.join(sorted(dupes))}")
    far = TEXT_VA + 0x40000000
    user_globals = (USER_WORKLOAD, USER_NMI, USER_NMI_IRQ) if objects is not None else ()
    placeholder = dict.fromkeys([*names, *user_globals], far)
    consts_far = _constants(config, far)
    if objects is not None:
        consts_far |= {"FTRACE_SITE_TABLE": SITE_TABLE, "NR_SITES": MAX_TRACED}

    def subst(u: Unit, values: dict[str, int]) -> str:
        return _substitute(u.body, values, u.name, u.inner, macros)

    # pass 1: sizes (references to other units take their longest encodings)
    addr = TEXT_VA
    starts: dict[str, int] = {}
    for u in fixed:
        addr = _align(addr, u.align)
        starts[u.name] = addr
        addr += len(_assemble(u, subst(u, placeholder | consts_far), addr))
    addr = _align(addr, 1 << FN_SHIFT)
    for u in traced:
        starts[u.name] = addr
        size = len(_assemble(u, subst(u, placeholder | consts_far), addr))
        if size > 1 << FN_SHIFT:
            raise ImageError(f"{u.name} is {size} bytes; traced functions must fit in {1 << FN_SHIFT}")
        addr += 1 << FN_SHIFT
    asm_end = addr
    linked: Linked | None = None
    if objects is not None:
        runtime = {n: starts[n] for n in RUNTIME}
        linked = link(objects, asm_end, USER_DATA, runtime, frozenset(names))
        if config.kernel == "c":
            _c_kernel_fixups(config, linked)
        if len(linked.sites) > MAX_TRACED:
            raise ObjectError(f"the objects have {len(linked.sites)} ftrace sites; at most {MAX_TRACED} are supported")
        addr = asm_end + len(linked.text)
    end = _align(addr, 0x1000)

    # pass 2: inner labels to a fixed point (their units' encodings depend on other symbols), then
    # the final encodings
    consts = _constants(config, starts["fn_000"] if traced else 0)
    user_values: dict[str, int] = {}
    if linked is not None:
        consts |= {"FTRACE_SITE_TABLE": SITE_TABLE, "NR_SITES": len(linked.sites)}
        user_values = {n: linked.symbols[n] for n in user_globals if n in linked.symbols}
    inner: dict[str, int] = {n: far for u in units for n in u.inner}
    for _ in range(6):
        values = starts | inner | consts | user_values
        found = {}
        for u in units:
            found.update(_inner_labels(u, subst(u, values), starts[u.name]))
        if found == inner:
            break
        inner = found
    else:
        raise ImageError("inner label addresses do not settle")
    values = starts | inner | consts | user_values
    text = bytearray(b"\xcc" * (end - TEXT_VA))
    sizes: dict[str, int] = {}
    order = list(starts.items())
    for idx, (unit, (name, start)) in enumerate(zip(units, order, strict=True)):
        code = _assemble(unit, subst(unit, values), start)
        limit = order[idx + 1][1] if idx + 1 < len(order) else (end if linked is None else asm_end)
        if start + len(code) > limit:
            raise ImageError(f"{name} grew between passes ({len(code)} bytes)")
        text[start - TEXT_VA : start - TEXT_VA + len(code)] = code
        sizes[name] = len(code)

    symbols = starts | inner
    sites = {u.name: starts[u.name] for u in traced}
    data_size, data_init, extra = PROBE_DATA_SIZE if config.probes else DATA_SIZE, b"", {}
    if linked is not None:
        text[asm_end - TEXT_VA : asm_end - TEXT_VA + len(linked.text)] = linked.text
        symbols |= {n: a for n, (a, _size) in linked.functions.items()}
        sizes |= {n: size for n, (_a, size) in linked.functions.items()}
        sites = dict(linked.sites)
        table = sorted(sites.values())
        padded = [*table, *[0] * (MAX_TRACED - len(table))]
        data_init = bytes(SITE_TABLE - IMAGE_DATA_VA) + struct.pack(f"<{MAX_TRACED}Q", *padded)
        data_init += linked.data
        data_size = len(data_init)
        extra = {
            "site_table": tuple(table),
            "foreign": frozenset(linked.functions),
            "data_init": data_init,
            "jump_entries": linked.jump_entries,
            "static_calls": linked.static_calls,
            "object_symbols": dict(linked.symbols),
        }
    elif traced:
        extra = {"site_table": tuple(starts[u.name] for u in traced)}

    image = KernelImage(
        config=config,
        text=bytes(text),
        data_size=data_size,
        symbols=symbols,
        sizes=sizes,
        sites=sites,
        iret_sites=(),
        popf_sites=(),
        constants=consts,
        **extra,
        # kernels with the user's objects use table-driven trampolines without a patchable call
        trampoline_sites={n: inner[n] for n in TRAMPOLINE_SITES if n in inner},
    )
    found_ = verify(image)
    image.iret_sites = found_.irets
    image.popf_sites = found_.popfs
    image.halt_sites = found_.halts
    image.boundaries = found_.boundaries
    if config.probes:
        image.kprobe_points, image.optprobe_ranges = probe_points(image, [u.name for u in traced])
    return image


#: the kprobe point of a traced function: its instruction at this index (the first of its body,
#: after the ftrace site, the prologue's push and the jump that starts a block); its optprobe range:
#: whole instructions from this index on, until they cover OPTPROBE_JMP_LEN bytes
KPROBE_INSN_INDEX = 3
OPTPROBE_INSN_INDEX = 7


def probe_points(image: KernelImage, functions: list[str]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """(kprobe points, optprobe ranges) of the traced `functions`, found by disassembly (see the
    indices above); every instruction chosen must be one kprobes can run out of line."""
    from .kprobes import out_of_line_problem

    kp, opt = [], []
    for name in functions:
        start = image.symbols[name]
        code = image.text[start - TEXT_VA : start - TEXT_VA + image.sizes[name]]
        insns = list(_CS.disasm(code, start))
        k = insns[KPROBE_INSN_INDEX]
        chosen = [k]
        kp.append((k.address, k.size))
        covered = []
        for insn in insns[OPTPROBE_INSN_INDEX:]:
            covered.append(insn)
            if sum(i.size for i in covered) >= OPTPROBE_JMP_LEN:
                break
        chosen += covered
        opt.append((covered[0].address, sum(i.size for i in covered)))
        for insn in chosen:
            why = out_of_line_problem(bytes(insn.bytes), insn.address)
            if why:
                raise ImageError(f"{name}: probe instruction at {insn.address:#x} cannot be probed: {why}")
    return tuple(kp), tuple(opt)


@dataclass(frozen=True)
class Found:
    irets: tuple[int, ...]
    popfs: tuple[int, ...]
    halts: tuple[int, ...]
    boundaries: frozenset[int]


def verify(image: KernelImage) -> Found:
    """Disassemble every unit back with capstone and check what the simulator relies on.

    Returns the addresses of every `iretq`, `popfq` and `hlt`, and every instruction boundary.
    """
    irets: list[int] = []
    popfs: list[int] = []
    halts: list[int] = []
    boundaries: set[int] = set()
    starts = set(image.symbols.values())
    spans = sorted((image.symbols[n], image.symbols[n] + size) for n, size in image.sizes.items())
    for name, size in image.sizes.items():
        start = image.symbols[name]
        code = image.text[start - TEXT_VA : start - TEXT_VA + size]
        pos = 0
        last = ""
        foreign = name in image.foreign
        for insn in _CS.disasm(code, start):
            last = insn.mnemonic
            boundaries.add(insn.address)
            pos = insn.address - start + insn.size
            m = insn.mnemonic
            if foreign:
                _check_compiled(name, insn, spans)
                if m == "popfq":
                    popfs.append(insn.address)
                continue
            if m == "iretq":
                if bytes(insn.bytes) != b"\x48\xcf":
                    raise ImageError(f"{name}: iretq at {insn.address:#x} is not 48 cf")
                if insn.address != start or image.sizes[name] != 2:
                    raise ImageError(
                        f"{name}: iretq at {insn.address:#x} must be the only instruction of its "
                        "unit (the machine executes iretq from a hook on the block that starts there)"
                    )
                irets.append(insn.address)
            elif m == "popfq":
                popfs.append(insn.address)
            elif m == "hlt":
                if insn.address != start:
                    raise ImageError(f"{name}: hlt at {insn.address:#x} must start its unit")
                halts.append(insn.address)
            elif m == "sti":
                raise ImageError(
                    f"{name}: sti at {insn.address:#x}: the machine does not model the sti shadow; "
                    "restore interrupts with popfq"
                )
            elif m in ("call", "jmp") and insn.operands and insn.operands[0].type == 2:  # immediate
                target = insn.operands[0].imm & (2**64 - 1)
                inside = start <= target < start + image.sizes[name]
                if not inside and target not in starts:
                    raise ImageError(f"{name}: {m} at {insn.address:#x} goes to {target:#x}, which is no symbol")
        if pos != len(code) and foreign:
            raise ObjectError(
                f"{name}: capstone stops decoding at +{pos:#x} of {len(code)} bytes: "
                f"{code[pos : pos + 8].hex(' ')} (data inside a function?)"
            )
        if pos != len(code):
            raise ImageError(
                f"{name}: capstone stops decoding at +{pos:#x} of {len(code)} bytes: {code[pos : pos + 8].hex(' ')}"
            )
        if last not in ("jmp", "ret", "iretq", "ud2") and not foreign:
            raise ImageError(f"{name} ends with {last!r}: it could fall through into the next unit")
    for fn, site in image.sites.items():
        got = image.text[site - TEXT_VA : site - TEXT_VA + 5]
        if got != FTRACE_NOP:
            raise ImageError(f"{fn}: site at {site:#x} holds {got.hex(' ')}, not the ftrace nop")
    for name, site in image.trampoline_sites.items():
        got = image.text[site - TEXT_VA : site - TEXT_VA + 5]
        if got != call_bytes(site, image.symbols["ftrace_stub"]):
            raise ImageError(f"{name}: site at {site:#x} holds {got.hex(' ')}, not a 5-byte call of ftrace_stub")
    return Found(tuple(irets), tuple(popfs), tuple(halts), frozenset(boundaries))


#: instructions compiled code may not contain: the machine needs each of these where it can see it
_FORBIDDEN = {
    "iretq": "returns from interrupts are the entry code's",
    "iret": "returns from interrupts are the entry code's",
    "hlt": "the machine uses hlt only to end bounded runs",
    "sti": "the machine does not model the sti shadow; restore interrupts with popfq (local_irq_restore)",
}
_VECTOR_REGS = re.compile(r"\b([xyz]mm\d+|mm\d|k[0-7])\b")


def _check_compiled(name: str, insn, spans: list[tuple[int, int]]) -> None:
    """What compiled code must not do in this kernel (a loaded object's function)."""
    m = insn.mnemonic
    where = f"{name}: {m} at {insn.address:#x}"
    if m in _FORBIDDEN:
        raise ObjectError(f"{where}: {_FORBIDDEN[m]}")
    if _VECTOR_REGS.search(insn.op_str):
        raise ObjectError(
            f"{where} uses SSE/AVX/MMX registers ({insn.op_str}); kernel code may not: "
            "compile with -mgeneral-regs-only (gcc) or -mno-sse -mno-mmx -mno-sse2 -mno-avx (clang and zig cc, "
            "whose -mgeneral-regs-only does not stop it on x86), as `textpoke cc` does"
        )
    if m in ("call", "jmp") and insn.operands and insn.operands[0].type == 2:
        target = insn.operands[0].imm & (2**64 - 1)
        i = bisect.bisect_right(spans, (target, 2**64)) - 1
        if i < 0 or not spans[i][0] <= target < spans[i][1]:
            raise ObjectError(f"{where} goes to {target:#x}, which is in no function")


def call_bytes(site: int, target: int) -> bytes:
    """`call target` encoded at `site`: e8 rel32."""
    rel = target - (site + 5)
    if not -(2**31) <= rel < 2**31:
        raise ImageError(f"call from {site:#x} cannot reach {target:#x}")
    return b"\xe8" + struct.pack("<i", rel)
