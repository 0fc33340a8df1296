"""The only module that imports Unicorn: one `Engine` per emulated CPU.

Rules
-----
1. Everything Unicorn-specific (paging set-up, GDT, hooks, TB-cache control, error codes) lives here;
   the rest of `cpus` talks to `Engine` in terms of kernel virtual addresses and registers by name.
2. Memory is shared: the machine hands every engine the same host buffers; `mem_read`/`mem_write`
   here take *physical* addresses, because that is what Unicorn takes under paging.
3. A guest fault is never an exception for the caller: `run()` returns a `RunStop` naming the Unicorn
   error, and the machine turns it into a crash record. A Python exception raised inside one of our
   hooks is a simulator bug and is re-raised by `run()` as is.

Measured recipes (UNICORN-NOTES.md) applied here: real paging with 2 MiB-free 4-level tables and the
default TLB mode (fastest), a 16 MiB TCG buffer (the default reserves 1 GiB per instance), `until` at an
unmapped address, every hook added before the first instruction is translated, and the count hook
installed before any block is translated (`start_counting`).

Block starts at watched addresses (`set_exit`): the machine observes a patchable site with a block
hook, which fires only where a translated block *starts*, and keeps each CPU's decoded copy of the site
as the block translated there. Code that reaches a site by falling through from the instruction before
it would run the site inside an earlier block, unseen. Unicorn 2's exits end translation right before
an exit address (the block ends with a stop there, the exit itself not included in its size), so every
block that would run into a watched site ends in front of it; `run` then starts again at the site,
whose own block runs with its hook, and carries on with the rest of the quantum, so that a stop at an
exit is neither a finished quantum nor a fault. Two measured Unicorn details shape it: a block
translated *at* an exit is a stop block of size 0 that executes nothing (so `decode_at` translates a
site with it taken off the exit list for that moment, and `run` replaces such a block when it meets
one), and `ctl_remove_cache(lo, hi)` removes it only with a range that starts before it. And after
every `emu_start` Unicorn removes, for every exit, the block containing the byte before it (the one
that stops there): each run that falls through into a watched site translates that block again
(about 40 us measured), and one more exit costs every `emu_start` one such removal.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as x86
from unicorn.unicorn_py3.unicorn import (
    HOOK_CODE_CFUNC,
    HOOK_INSN_INVALID_CFUNC,
    HOOK_INTR_CFUNC,
    HOOK_MEM_ACCESS_CFUNC,
    uc_hook_h,
    uc_tb,
    uclib,
)

from .errors import SimulatorBug

__all__ = ["REGS", "Engine", "HostMemory", "RunStop", "counter_available", "engine_error_name"]

#: Register name -> Unicorn id, for the registers the machine and the tools read.
REGS: dict[str, int] = {
    "rax": x86.UC_X86_REG_RAX,
    "rbx": x86.UC_X86_REG_RBX,
    "rcx": x86.UC_X86_REG_RCX,
    "rdx": x86.UC_X86_REG_RDX,
    "rsi": x86.UC_X86_REG_RSI,
    "rdi": x86.UC_X86_REG_RDI,
    "rbp": x86.UC_X86_REG_RBP,
    "rsp": x86.UC_X86_REG_RSP,
    "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9,
    "r10": x86.UC_X86_REG_R10,
    "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12,
    "r13": x86.UC_X86_REG_R13,
    "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
    "rip": x86.UC_X86_REG_RIP,
    "rflags": x86.UC_X86_REG_RFLAGS,
}
_RIP = x86.UC_X86_REG_RIP
_RSP = x86.UC_X86_REG_RSP
_RFLAGS = x86.UC_X86_REG_RFLAGS

_TCG_BUFFER = 16 << 20
#: a recycled engine keeps its translated blocks only while they take at most this much of its
#: code buffer (`Engine.recycle`; translated code stays resident); 0 drops them every time
_KEEP_AT_MOST = 2 << 20
#: the code buffer is emptied outside any run when less than this is left (`Engine.low_on_room`)
_DECODE_MARGIN = 1 << 20

# uc_ctl requests the machine makes while it runs, encoded once (the binding's wrappers cost several
# microseconds a call): set the exit list, remove the blocks of a range, translate a block
_CTL_SET_EXITS = Uc._Uc__ctl_encode(uc_const.UC_CTL_UC_EXITS, uc_const.UC_CTL_IO_WRITE, 2)  # type: ignore[attr-defined]
_CTL_REMOVE = Uc._Uc__ctl_encode(uc_const.UC_CTL_TB_REMOVE_CACHE, uc_const.UC_CTL_IO_WRITE, 2)  # type: ignore[attr-defined]
_CTL_REQUEST = Uc._Uc__ctl_encode(uc_const.UC_CTL_TB_REQUEST_CACHE, uc_const.UC_CTL_IO_READ_WRITE, 2)  # type: ignore[attr-defined]


def _find_counter_offset() -> int | None:
    """Where Unicorn keeps the instruction counter of the running `emu_start` (`emu_counter`, next
    to `emu_count`) inside its engine structure, found by experiment on a scratch engine.

    Unicorn counts the instructions of a counted run (`count > 0`) in this field but has no call
    that reads it; the exact scheduler needs it to know, inside a hook, how many instructions of
    the quantum have run. After a run of `count = n` that used up its count the field holds n + 1
    and its neighbour n; three different n must agree on one offset, or there is none."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tcg_buffer_size(1 << 20)
    uc.mem_map(0x10000, 0x1000)
    uc.mem_write(0x10000, b"\x48\xff\xc0" * 64)  # inc rax
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    found: set[int] | None = None
    for n in (7, 13, 29):
        uc.emu_start(0x10000, 0x1000, 0, n)
        words = struct.unpack("<512Q", ctypes.string_at(base, 4096))
        hits = {8 * i for i in range(511) if words[i] == n + 1 and words[i + 1] == n}
        found = hits if found is None else found & hits
    uc.emu_start(0x10000, 0x1000, 0, 3)  # and it counts from zero again on every start
    if found is None or len(found) != 1:
        return None
    (off,) = found
    if ctypes.c_uint64.from_address(base + off).value != 4:
        return None
    return off


_COUNTER_OFFSET: list[int | None] = []

# TCG's bookkeeping of an engine's code buffer, seen as seven words in its code-generation context:
# buffer start, two words Unicorn adds, size, next free byte, data pointer, high-water mark, where
# the mark is 1 KiB before the end (QEMU's TCG_HIGHWATER); `_find_codegen` checks all of that
_CODEGEN = struct.Struct("<7Q")


def _codegen_words(words: tuple[int, ...]) -> bool:
    start, size, free, mark = words[0], words[3], words[4], words[6]
    return bool(start) and size > 4096 and mark == start + size - 1024 and start <= free <= mark


def _codegen_offsets() -> tuple[int, int, int] | None:
    if not _CODEGEN_OFFSETS:
        try:
            found = _find_codegen()
        except Exception:  # an emulator that does not behave as expected: do without
            found = None
        _CODEGEN_OFFSETS.append(found)
    return _CODEGEN_OFFSETS[0]


def _find_codegen() -> tuple[int, int, int] | None:
    """Where an engine's code-buffer bookkeeping is: (offset in Unicorn's engine structure of the
    pointer to TCG's context, offset of the seven words in that context, offset there of the 32-bit
    count of buffer flushes), found by experiment on a scratch engine, or None.

    Unicorn has no call that tells how full the buffer is, or whether it emptied it during a run;
    a translation requested from outside a run crashes the process when it is full (see
    `Engine.recycle`), and an emptying inside a run drops the blocks that stand for CPUs' stale
    copies of sites (see `Machine._after_emulator_flush`). The context is found through the engine
    structure's pointers, each read through /proc/self/mem so that a word that is not a pointer
    cannot fault; the finding must then behave: the free pointer moves on when code is translated
    and back to the start when every block is dropped, and the count goes up by one with each
    emptying and not with a translation."""
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None

    def read(addr: int, n: int) -> bytes | None:
        try:
            data = os.pread(fd, n, addr)
        except (OSError, OverflowError):
            return None
        return data if len(data) == n else None

    try:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tcg_buffer_size(1 << 20)
        uc.mem_map(0x10000, 0x10000)
        uc.mem_write(0x10000, b"\x48\xff\xc0\xeb\x00" * 64 + b"\xf4")  # inc rax; jmp to the next
        uc.emu_start(0x10000, 0x10000 + 5 * 64, 0, 0)
        base = ctypes.cast(uc._uch, ctypes.c_void_p).value or 0
        raw = read(base, 8 * 1024) or b""
        found = set()
        for i, ptr in enumerate(struct.unpack(f"<{len(raw) // 8}Q", raw)):
            if ptr < 0x10000 or ptr >= 1 << 47 or ptr % 8:
                continue
            blob = read(ptr, 8 * 64)
            if blob is None:
                continue
            words = struct.unpack("<64Q", blob)
            for j in range(64 - 6):
                if _codegen_words(words[j : j + 7]):
                    found.add((8 * i, 8 * j))
        if len(found) != 1:
            return None
        ((uc_off, ctx_off),) = found
        ctx = ctypes.c_uint64.from_address(base + uc_off).value
        span = 1 << 16  # the context and what follows it (the count is some 40 KiB in)

        def counts() -> tuple[int, ...]:
            raw = read(ctx, span) or bytes(span)
            return struct.unpack(f"<{span // 4}I", raw)

        before = _codegen_at(base, uc_off, ctx_off)
        c0 = counts()
        uc.emu_start(0x10000 + 5 * 64, 0x10000 + 5 * 64 + 1, 0, 0)  # one more block (the hlt)
        grown = _codegen_at(base, uc_off, ctx_off)
        c1 = counts()
        uc.ctl_flush_tb()
        flushed = _codegen_at(base, uc_off, ctx_off)
        c2 = counts()
        uc.ctl_flush_tb()
        c3 = counts()
        if not (before and grown and flushed and before[0] < before[4] < grown[4] and flushed[4] == flushed[0]):
            return None
        flush_offs = [4 * i for i in range(span // 4) if c1[i] == c0[i] and c2[i] == c1[i] + 1 and c3[i] == c2[i] + 1]
        if len(flush_offs) != 1:
            return None
        return uc_off, ctx_off, flush_offs[0]
    finally:
        os.close(fd)


def _codegen_at(base: int, uc_off: int, ctx_off: int) -> tuple[int, ...] | None:
    ctx = ctypes.c_uint64.from_address(base + uc_off).value
    words = _CODEGEN.unpack(ctypes.string_at(ctx + ctx_off, _CODEGEN.size))
    return words if _codegen_words(words) else None


_CODEGEN_OFFSETS: list[tuple[int, int, int] | None] = []


def _counter_offset() -> int | None:
    if not _COUNTER_OFFSET:
        _COUNTER_OFFSET.append(_find_counter_offset())
    return _COUNTER_OFFSET[0]


def counter_available() -> bool:
    """Whether this Unicorn build lets the machine read the running quantum's instruction count."""
    return _counter_offset() is not None


class HostMemory:
    """One host buffer standing for a range of physical memory, shared by every engine."""

    def __init__(self, pa: int, size: int) -> None:
        self.pa = pa
        self.size = size
        self.buf = mmap.mmap(-1, size)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))

    def contains(self, pa: int, n: int = 1) -> bool:
        return self.pa <= pa and pa + n <= self.pa + self.size

    def read(self, pa: int, n: int) -> bytes:
        off = pa - self.pa
        return self.buf[off : off + n]

    def write(self, pa: int, data: bytes) -> None:
        off = pa - self.pa
        self.buf[off : off + len(data)] = data

    def clear(self) -> None:
        """All zero, as a new one (for a machine that reuses it)."""
        ctypes.memset(self.addr, 0, self.size)


@dataclass(frozen=True, slots=True)
class RunStop:
    """Why a quantum ended early: the Unicorn error a guest fault produced."""

    error: str
    errno: int


def engine_error_name(errno: int) -> str:
    import unicorn.unicorn_const as uc_const

    for name in dir(uc_const):
        if name.startswith("UC_ERR_") and getattr(uc_const, name) == errno:
            return name
    return f"UC_ERR_{errno}"


CodeHook = Callable[[int, int], None]  # (address, instruction size)
RawBlockHook = Callable[[object, int, int, object], None]  # (handle, address, block size, user)
IntrHook = Callable[[int], None]  # (interrupt number)
CpuidHook = Callable[[], bool]
#: `uint32_t (*)(uc_engine *, void *)`: Unicorn's callback type for cpuid, rdtsc and rdtscp hooks
_INSN_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)


# Ctrl-C while Unicorn runs: Python runs a signal handler at the next bytecode it executes, which is
# usually inside one of our hook callbacks, and an exception raised there would be printed by ctypes
# and lost. A handler that calls `defer_interrupt()` instead has `Engine.run` raise the
# KeyboardInterrupt once Unicorn has returned (at the end of the quantum).
_emulating = False
_interrupt_deferred = False


def defer_interrupt() -> bool:
    """For a SIGINT handler: True when an engine is running on this thread, in which case
    `Engine.run` raises KeyboardInterrupt as soon as it returns; False when the caller should raise
    it itself."""
    global _interrupt_deferred
    if _emulating:
        _interrupt_deferred = True
        return True
    return False


_MSR_EFER = 0xC0000080
_EFER_NXE = 1 << 11

MemWriteHook = Callable[[int, int, int], None]  # (physical address, size, value)


class Engine:
    """One x86_64 CPU core in long mode, ring 0, paging on, sharing `memories` with its siblings."""

    def __init__(
        self,
        memories: Iterable[HostMemory],
        cr3: int,
        gdt_va: int,
        gs_base: int,
        kernel_cs: int,
        kernel_ds: int,
    ) -> None:
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tcg_buffer_size(_TCG_BUFFER)
        self.uc = uc
        for mem in memories:
            uc.mem_map_ptr(mem.pa, mem.size, UC_PROT_ALL, mem.addr)
        uc.reg_write(x86.UC_X86_REG_CR3, cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, uc.reg_read(x86.UC_X86_REG_CR4) | 0x20)  # PAE
        # NXE before paging: a fetch from a no-execute page (data, stacks, the text's writable alias)
        # raises #PF, where Unicorn would otherwise run data as code
        uc.msr_write(_MSR_EFER, uc.msr_read(_MSR_EFER) | _EFER_NXE)
        uc.reg_write(x86.UC_X86_REG_CR0, uc.reg_read(x86.UC_X86_REG_CR0) | 0x80010001)  # PG WP PE
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, gdt_va, 31, 0))
        uc.reg_write(x86.UC_X86_REG_CS, kernel_cs)
        uc.reg_write(x86.UC_X86_REG_SS, kernel_ds)
        uc.reg_write(x86.UC_X86_REG_GS_BASE, gs_base)
        self._reg_read = uc.reg_read
        self._reg_write = uc.reg_write
        self._uch = uc._uch
        self._u64 = ctypes.c_uint64()
        self._u64_ref = ctypes.byref(self._u64)
        # RSP and RFLAGS in one call each way (an event delivery or an iretq moves both; RIP goes
        # alone: `set_frame`)
        self._frame_ids = (ctypes.c_int * 2)(_RSP, _RFLAGS)
        self._frame_vals = (ctypes.c_uint64 * 2)()
        self._frame_ptrs = (ctypes.c_void_p * 2)(*(ctypes.addressof(self._frame_vals) + 8 * i for i in range(2)))
        self._callbacks: dict[int, object] = {}
        self._binding_hooks: list[int] = []  # hooks added through the binding (`hook_cpuid`)
        self._spans: dict[int, tuple[int, int, int]] = {}  # handle -> (type, first, last address)
        #: the spans hooked when the engine was recycled: its blocks there call hooks of that span
        self._hooked_before: frozenset[tuple[int, int, int]] = frozenset()
        self.hook_error: BaseException | None = None
        self._counter: ctypes.c_uint64 | None = None
        self._limit: ctypes.c_uint64 | None = None
        #: 1 while a code, interrupt or instruction hook runs (Unicorn has already counted the
        #: instruction it stands at), 0 in block hooks (called before the block's first count)
        self.hook_adjust = 0
        self.insn_cost = 1  # cycles per instruction (the machine's cost model)
        #: instructions the running quantum completed in its earlier segments (runs split at exits)
        self.base = 0
        self._exits: set[int] = set()
        self._tb = uc_tb()
        self._stopped = False  # `stop()` was called: the quantum ends where it is, even at an exit
        self._in_emu = False  # inside `uc_emu_start` (a hook of this engine's own run is running)
        self._refilling = False  # inside `on_flushed`
        #: the last quantum's count ran out right at an exit, in front of it: unlike a count running
        #: out at a block start, no block hook fired there
        self.ended_at_exit = False
        #: called with an exit address whose block is a stop block (translated while the address was
        #: an exit): it must leave a proper block there (`replace_stop_block` by default)
        self.on_stop_block: Callable[[int], None] = self.replace_stop_block
        #: the engine ran for an earlier machine (`recycle`): its translated blocks are kept, so a
        #: hook added now must drop the blocks it covers (they were translated without it)
        self.recycled = False
        self.lives = 0  # machines this engine served before the current one
        self._initial = uc.context_save()  # every register as a new engine has them
        #: address of the code buffer's bookkeeping (`_find_codegen`), None where it is not known
        self._codegen: int | None = None
        self._used_at_start = 0  # code buffer used when this life began
        self._flushes_at_start = 0  # and its count of emptyings
        self._most_used = 0  # the most code buffer one life used
        #: how many times the code buffer was emptied (by `recycle`, by `empty`, or by Unicorn
        #: itself inside a run when it filled); a constant 0 where it cannot be seen
        self.flush_count = ctypes.c_uint32(0)
        #: the buffer's next free byte, and the address past which `low_on_room` (constants where
        #: the bookkeeping is not known: never low)
        self.free_ptr = ctypes.c_uint64(0)
        self.room_limit = 1 << 64
        #: called after `decode_at` emptied a nearly full buffer, outside any run: every block went,
        #: so the machine must translate again every block that stands for a CPU's copy
        self.on_flushed: Callable[[], None] = _nothing
        offsets = _codegen_offsets()
        if offsets is not None:
            uc_off, ctx_off, flush_off = offsets
            base = ctypes.cast(self._uch, ctypes.c_void_p).value or 0
            words = _codegen_at(base, uc_off, ctx_off)
            if words is not None:
                ctx = ctypes.c_uint64.from_address(base + uc_off).value
                self._codegen = ctx + ctx_off
                self.flush_count = ctypes.c_uint32.from_address(ctx + flush_off)
                self.free_ptr = ctypes.c_uint64.from_address(ctx + ctx_off + 32)
                self.room_limit = words[0] + words[3] - _DECODE_MARGIN

    @property
    def low_on_room(self) -> bool:
        """Less than `_DECODE_MARGIN` is left in the code buffer: the machine empties it (`empty`)
        between quanta, so that Unicorn never has to inside a run (where it would drop the blocks
        that stand for CPUs' copies of sites while they run) nor, worse, for a translation outside
        one (where it crashes the process)."""
        return self.free_ptr.value > self.room_limit

    def empty(self) -> None:
        """Drop every translated block (outside any run: the machine then translates its copies
        again)."""
        self.uc.ctl_flush_tb()

    def _codegen_start(self) -> int:
        return _CODEGEN.unpack(ctypes.string_at(self._codegen, _CODEGEN.size))[0] if self._codegen else 0

    def code_buffer(self) -> tuple[int, int] | None:
        """(bytes used, size) of the engine's code buffer, where translated blocks go; None on a
        Unicorn build where it cannot be seen."""
        if self._codegen is None:
            return None
        start, _, _, size, free, _, _ = _CODEGEN.unpack(ctypes.string_at(self._codegen, _CODEGEN.size))
        return free - start, size

    def executed(self) -> int:
        """Instructions of the running quantum completed before the one being hooked (exact only
        after `start_counting`, on a build where `counter_available()`)."""
        return self.base + self._counter.value - self.hook_adjust  # type: ignore[union-attr]

    def cut(self, count: int) -> None:
        """End the running quantum after `count` instructions in all (if that is sooner): Unicorn
        checks its count before every instruction, against the field next to its counter."""
        count -= self.base  # the running segment's own count
        if count < self._limit.value:  # type: ignore[union-attr]
            self._limit.value = count  # type: ignore[union-attr]

    def completed(self) -> int:
        """Instructions the last quantum completed, when it ended by its count or stopped in a
        block hook (the counter is one past the count when the count ran out)."""
        return self.base + min(self._counter.value, self._limit.value)  # type: ignore[union-attr]

    # -- hooks ----------------------------------------------------------------------------------
    # Callbacks go straight from ctypes to ours (the binding's generic wrappers cost several
    # microseconds a call). An exception in a callback stops the engine and is re-raised by run().
    def _guard(self, fn: Callable[..., object], adjust: int = 1) -> Callable[..., object]:
        def guarded(*args: object) -> object:
            self.hook_adjust = adjust
            try:
                return fn(*args)
            except BaseException as err:
                if self.hook_error is None:
                    self.hook_error = err
                uclib.uc_emu_stop(self._uch)
                return None

        return guarded

    def _code_cfunc(self, fn: CodeHook, adjust: int) -> object:
        """One C-callable frame for a code or block hook (no wrapper between ctypes and `fn`)."""

        def hook(_h: object, addr: int, size: int, _k: object) -> None:
            self.hook_adjust = adjust
            try:
                fn(addr, size)
            except BaseException as err:
                if self.hook_error is None:
                    self.hook_error = err
                uclib.uc_emu_stop(self._uch)

        return HOOK_CODE_CFUNC(hook)

    def _add(self, htype: int, fptr: object, begin: int, end: int) -> int:
        span = (htype, begin, end)
        if self.recycled and htype in (UC_HOOK_CODE, UC_HOOK_BLOCK) and span not in self._hooked_before:
            self.drop_decoded(begin, end + 1)
        handle = uc_hook_h()
        status = uclib.uc_hook_add(
            self._uch,
            ctypes.byref(handle),
            htype,
            fptr,
            ctypes.c_void_p(0),
            ctypes.c_uint64(begin),
            ctypes.c_uint64(end),
        )
        if status:
            raise UcError(status)
        self._callbacks[handle.value] = fptr
        self._spans[handle.value] = span
        return handle.value

    def hook_code_at(self, address: int, size: int, callback: CodeHook) -> int:
        """Call `callback(address, size)` before each instruction starting in [address, address+size).

        A hook added after code was translated only sees blocks translated afterwards: callers drop
        the decoded range (`drop_decoded`) after adding one to a running machine."""
        return self._add(UC_HOOK_CODE, self._code_cfunc(callback, 1), address, address + max(size, 1) - 1)

    def hook_block_at(self, address: int, size: int, callback: CodeHook) -> int:
        """Call `callback(address, block_size)` when a translated block starting in
        [address, address+size) begins to run.

        Unlike a code hook, a block hook costs nothing per instruction elsewhere: with `count`
        slicing Unicorn checks every code hook before every instruction, so the machine keeps code
        hooks to the few `iretq`/`popfq` sites. Caveat: when a quantum's count runs out right at
        a block start, the hook has fired but the block does not run (the machine discounts it)."""
        return self._add(UC_HOOK_BLOCK, self._code_cfunc(callback, 0), address, address + max(size, 1) - 1)

    def hook_block_raw(self, address: int, size: int, callback: RawBlockHook) -> int:
        """`hook_block_at` without the engine's wrapper, for the machine's hottest hooks (every
        layer between ctypes and the hook is a Python call): ctypes calls `callback(handle,
        address, block_size, user)` itself, which must set `hook_adjust = 0` and hand any
        exception to `fail`."""
        return self._add(UC_HOOK_BLOCK, HOOK_CODE_CFUNC(callback), address, address + max(size, 1) - 1)

    def hook_interrupts_raw(self, callback: Callable[[object, int, object], None]) -> None:
        """`hook_interrupts` without the wrapper: `callback(handle, intno, user)`, which must set
        `hook_adjust = 1` and hand any exception to `fail`."""
        self._add(UC_HOOK_INTR, HOOK_INTR_CFUNC(callback), 1, 0)

    def fail(self, err: BaseException) -> None:
        """A raw hook's exception: the engine stops, and `run` raises it once Unicorn returns."""
        if self.hook_error is None:
            self.hook_error = err
        uclib.uc_emu_stop(self._uch)

    def hook_del(self, handle: int) -> None:
        status = uclib.uc_hook_del(self._uch, uc_hook_h(handle))
        if status:
            raise UcError(status)
        del self._callbacks[handle]
        self._spans.pop(handle, None)
        # a span hooked again after this may have blocks translated meanwhile without the hook
        self._hooked_before = frozenset()

    def hook_interrupts(self, callback: IntrHook) -> None:
        inner = self._guard(callback)
        fptr = HOOK_INTR_CFUNC(lambda _h, intno, _k: inner(intno))
        self._add(UC_HOOK_INTR, fptr, 1, 0)

    def hook_invalid_insn(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when the CPU meets an instruction it cannot decode (#UD); emulation stops.

        Without this hook Unicorn sometimes reports UC_ERR_INSN_INVALID and sometimes (when the bad
        instruction is reached through a chained block) returns quietly with RIP stuck on it."""
        inner = self._guard(callback)

        def on_invalid(_h: object, _k: object) -> bool:
            inner()
            return False

        self._add(UC_HOOK_INSN_INVALID, HOOK_INSN_INVALID_CFUNC(on_invalid), 1, 0)

    def hook_mem_write(self, pa_lo: int, pa_hi: int, callback: MemWriteHook) -> int:
        """Call `callback(pa, size, value)` before each guest store into physical [pa_lo, pa_hi).

        Under paging Unicorn reports (and filters) memory hooks by physical address, so a store
        through any virtual alias of the range is seen. Costs nothing until a store hits the range.
        The storing engine invalidates its own translated blocks of the stored bytes by itself."""
        inner = self._guard(callback)
        fptr = HOOK_MEM_ACCESS_CFUNC(lambda _h, _t, addr, size, value, _k: inner(addr, size, value))
        return self._add(UC_HOOK_MEM_WRITE, fptr, pa_lo, pa_hi - 1)

    def hook_cpuid(self, callback: CpuidHook) -> None:
        def trampoline(_uc: Uc, _user: object) -> bool:
            self.hook_adjust = 1
            return callback()

        self._binding_hooks.append(self.uc.hook_add(UC_HOOK_INSN, trampoline, None, 1, 0, x86.UC_X86_INS_CPUID))

    def hook_tsc(self, read: Callable[[], int], aux: int) -> None:
        """Make `rdtsc` and `rdtscp` return `read()` (and `rdtscp` also `aux` in ecx, as TSC_AUX).

        Unicorn's own rdtsc reads host time, so two identical runs would see different values. The
        Python binding only hooks in/out/syscall/cpuid; the library hooks rdtsc too, so this goes
        through ctypes. Costs nothing until one of them executes."""

        def make(with_aux: bool) -> object:
            def on_rdtsc(_h: object, _k: object) -> int:
                self.hook_adjust = 1  # Unicorn has counted the rdtsc already: `read` sees it as current
                try:
                    value = read() & (2**64 - 1)
                    self._reg_write(x86.UC_X86_REG_RAX, value & 0xFFFFFFFF)
                    self._reg_write(x86.UC_X86_REG_RDX, value >> 32)
                    if with_aux:
                        self._reg_write(x86.UC_X86_REG_RCX, aux & 0xFFFFFFFF)
                except BaseException as err:
                    if self.hook_error is None:
                        self.hook_error = err
                    uclib.uc_emu_stop(self._uch)
                return 1  # skip Unicorn's own implementation

            return _INSN_CFUNC(on_rdtsc)

        for insn, with_aux in ((x86.UC_X86_INS_RDTSC, False), (x86.UC_X86_INS_RDTSCP, True)):
            fptr = make(with_aux)
            handle = uc_hook_h()
            status = uclib.uc_hook_add(
                self._uch,
                ctypes.byref(handle),
                UC_HOOK_INSN,
                fptr,
                ctypes.c_void_p(0),
                ctypes.c_uint64(1),
                ctypes.c_uint64(0),
                ctypes.c_int(insn),
            )
            if status:
                raise UcError(status)
            self._callbacks[handle.value] = fptr

    # -- execution ------------------------------------------------------------------------------
    def start_counting(self, at: int) -> None:
        """Install Unicorn's instruction-count hook now, before any block is translated.

        Unicorn adds that hook at the first `emu_start` with a count, and only blocks translated
        afterwards carry it: a block translated earlier (a watched site, decoded ahead of time) would
        run uncounted forever. A start at `at` that ends at `at` installs the hook and executes
        nothing (RIP is left at `at`: the caller sets it afterwards)."""
        if self._counter is not None:
            return  # a recycled engine: counting since its first machine
        status = uclib.uc_emu_start(self._uch, at, at, 0, 1)
        if status:
            raise UcError(status)
        self.drop_decoded(at, at + 1)
        off = _counter_offset()  # and where the running quantum's count can be read (`executed`)
        if off is not None:
            base = ctypes.cast(self._uch, ctypes.c_void_p).value
            self._counter = ctypes.c_uint64.from_address(base + off)
            self._limit = ctypes.c_uint64.from_address(base + off + 8)
            # from now on `until` is ignored (it is an unmapped address anyway) and the exit list,
            # empty until a site is watched, is what ends translation (`set_exit`)
            self.uc.ctl_exits_enabled(True)
            self._set_exits(())

    @property
    def exits_available(self) -> bool:
        """Whether `set_exit` works: it needs the running quantum's count (`counter_available`) to
        carry on with a quantum stopped at an exit."""
        return self._counter is not None

    def set_exit(self, address: int, on: bool) -> None:
        """Make translation end right before `address` (on), so that every execution of it starts a
        block (and fires a block hook there), or stop doing so. Blocks translated earlier keep their
        shape: the caller drops those that run through `address` (on), or end at it (off)."""
        if self._counter is None:
            raise SimulatorBug("exits need the running quantum's count (check exits_available)")
        if on:
            self._exits.add(address)
        else:
            self._exits.discard(address)
        self._set_exits(self._exits)

    def _set_exits(self, exits: Iterable[int]) -> None:
        addrs = sorted(exits)
        arr = (ctypes.c_uint64 * max(len(addrs), 1))(*addrs)
        self._ctl(_CTL_SET_EXITS, ctypes.cast(arr, ctypes.c_void_p), ctypes.c_size_t(len(addrs)))

    def _ctl(self, code: int, *args: object) -> None:
        status = uclib.uc_ctl(self._uch, code, *args)
        if status:
            raise UcError(status)

    def replace_stop_block(self, address: int) -> None:
        """Drop the stop block at exit `address` and translate a proper one from memory. The removal
        range starts one byte before it (a block of size 0 overlaps no range starting at it), so it
        also drops the block ending at `address` (the machine's version decodes its copy instead)."""
        self.drop_decoded(address - 1, address + 1)
        self.decode_at(address)

    def run(self, rip: int, until: int, count: int) -> RunStop | None:
        """Execute up to `count` instructions from `rip`; a guest fault ends it early.

        A stop at an exit (`set_exit`) with count left starts the engine again right there, for the
        rest of the count: one quantum may take several `emu_start` calls (`base` counts the
        instructions of the earlier ones). `stop()`, a fault or a hook's exception end it for good."""
        global _emulating, _interrupt_deferred
        _emulating = True
        self.base = 0
        self._stopped = False
        self.ended_at_exit = False
        self._in_emu = True
        status = uclib.uc_emu_start(self._uch, rip, until, 0, count)
        self._in_emu = False
        if self._exits:
            status = self._through_exits(rip, until, status)
        _emulating = False
        if _interrupt_deferred:
            _interrupt_deferred = False
            raise KeyboardInterrupt
        if self.hook_error is not None:
            err, self.hook_error = self.hook_error, None
            raise err
        if status:
            return RunStop(engine_error_name(status), status)
        return None

    def _through_exits(self, rip: int, until: int, status: int) -> int:
        """Carry on with a quantum that stopped at an exit (see `run`); returns the last status."""
        counter, limit = self._counter, self._limit
        replaced = False
        while not status and self.hook_error is None and not self._stopped and not _interrupt_deferred:
            done = counter.value  # type: ignore[union-attr]
            left = limit.value - done  # type: ignore[union-attr]
            if left < 0:
                break  # the count ran out (the counter is then one past it)
            at = self.rip()
            if at not in self._exits:
                break  # some other quiet stop: the machine deals with it
            if left == 0:
                self.ended_at_exit = True  # the count ends right at the exit: no block started there
                break
            if done == 0 and at == rip:
                # started at the exit and ran nothing: the block there is a stop block
                if replaced:
                    break
                self.on_stop_block(at)
                replaced = True
            else:
                replaced = False
            self.base += done
            rip = at
            self._in_emu = True
            status = uclib.uc_emu_start(self._uch, at, until, 0, left)
            self._in_emu = False
        return status

    def stop(self) -> None:
        self._stopped = True
        uclib.uc_emu_stop(self._uch)

    @property
    def stopped(self) -> bool:
        """`stop()` was called in the running quantum: nothing more of it runs."""
        return self._stopped

    def recycle(self, written: Iterable[tuple[int, int]]) -> None:
        """Make the engine as a new one for the next machine on the same memories and text, but for
        its translated blocks: every hook goes, every register is as it was, no exit is left, and
        the blocks of `written` ([lo, hi) ranges whose bytes changed, now restored by the caller)
        and of the exits (stop blocks, blocks cut short) are dropped. The blocks that stay were
        translated from the same bytes, so they are what a new engine would translate: only their
        cost is saved. Blocks translated with a hook that is gone call nothing; a hook added on a
        span hooked at the end of the last life finds its blocks calling hooks there already (until
        a hook is deleted in this life), elsewhere it drops them (`_add`)."""
        spans = frozenset(self._spans.values())
        for handle in list(self._callbacks):
            self.hook_del(handle)
        for handle in self._binding_hooks:
            self.uc.hook_del(handle)
        self._binding_hooks.clear()
        self._hooked_before = spans
        self.lives += 1
        # Unicorn translates into a fixed code buffer; a translation requested from outside a run
        # (`decode_at`) that finds it full jumps to a stale stack and crashes the process (QEMU
        # leaves for the run's exit point, and there is no run): measured after about 220 default
        # seeds into one engine. Every block goes when the kept ones take more than `_KEEP_AT_MOST`
        # (what stays resident), when less room is left than three times the most a machine used
        # yet (an optprobe seed: 3.3 MiB; a life in which the buffer was emptied counts as using
        # all of it), and every time where its use cannot be seen.
        use = self.code_buffer()
        if use is not None:
            grown = use[1] if self.flush_count.value != self._flushes_at_start else use[0] - self._used_at_start
            self._most_used = max(self._most_used, grown)
        flush = use is None or use[0] > _KEEP_AT_MOST or use[1] - use[0] < 3 * self._most_used
        if flush:
            self.uc.ctl_flush_tb()
        else:
            for lo, hi in _merged(written):
                self.drop_decoded(lo, hi)
            for address in self._exits:
                self.drop_decoded(address - 1, address + 1)
        if self._exits:
            self._exits = set()
            self._set_exits(())
        self.uc.context_restore(self._initial)
        self.hook_error = None
        self.hook_adjust = 0
        self.insn_cost = 1
        self.base = 0
        self._stopped = False
        self.ended_at_exit = False
        self.on_stop_block = self.replace_stop_block
        self.on_flushed = _nothing  # (the machine that set it is done)
        self.recycled = not flush  # with no block left, a new hook has nothing to drop
        self._used_at_start = 0 if flush or use is None else use[0]
        self._flushes_at_start = self.flush_count.value

    def close(self) -> None:
        """Free the engine's native memory (code buffer, translated blocks) now rather than whenever
        the garbage collector gets to its reference cycles; the engine is not usable afterwards."""
        self._counter = self._limit = None
        # (these point into the engine's native memory: nothing may read them once it is freed)
        self._codegen = None
        self.flush_count = ctypes.c_uint32(0)
        self.free_ptr = ctypes.c_uint64(0)
        self.room_limit = 1 << 64
        self.on_flushed = _nothing
        self.uc._Uc__finalizer()  # the binding's own release, which runs at most once
        self._callbacks.clear()
        self.uc._callbacks.clear()

    # -- registers ------------------------------------------------------------------------------
    def rip(self) -> int:
        uclib.uc_reg_read(self._uch, _RIP, self._u64_ref)
        return self._u64.value

    def _set(self, reg: int, value: int) -> None:
        self._u64.value = value
        status = uclib.uc_reg_write(self._uch, reg, self._u64_ref)
        if status:
            raise UcError(status)

    def set_rip(self, value: int) -> None:
        self._set(_RIP, value)

    def rsp_rflags(self) -> tuple[int, int]:
        vals = self._frame_vals
        uclib.uc_reg_read_batch(self._uch, self._frame_ids, self._frame_ptrs, 2)
        return vals[0], vals[1]

    def set_frame(self, rsp: int, rflags: int, rip: int) -> None:
        """Set RSP, RFLAGS and RIP (what an event delivery or an `iretq` changes). RIP goes alone
        through `uc_reg_write`: only that path makes Unicorn keep a RIP set from inside a hook
        when it leaves the block (the batch call does not: measured on 2.1.4)."""
        vals = self._frame_vals
        vals[0] = rsp
        vals[1] = rflags
        status = uclib.uc_reg_write_batch(self._uch, self._frame_ids, self._frame_ptrs, 2)
        if status:
            raise UcError(status)
        self._set(_RIP, rip)

    def rsp(self) -> int:
        uclib.uc_reg_read(self._uch, _RSP, self._u64_ref)
        return self._u64.value

    def set_rsp(self, value: int) -> None:
        self._set(_RSP, value)

    def rflags(self) -> int:
        uclib.uc_reg_read(self._uch, _RFLAGS, self._u64_ref)
        return self._u64.value

    def set_rflags(self, value: int) -> None:
        self._set(_RFLAGS, value)

    def cr2(self) -> int:
        return self._reg_read(x86.UC_X86_REG_CR2)

    def reg(self, name: str) -> int:
        return self._reg_read(REGS[name])

    def set_reg(self, name: str, value: int) -> None:
        self._reg_write(REGS[name], value)

    def registers(self) -> dict[str, int]:
        return {name: self._reg_read(rid) for name, rid in REGS.items()}

    # -- memory and decoded-code cache ----------------------------------------------------------
    def mem_read(self, pa: int, n: int) -> bytes:
        return bytes(self.uc.mem_read(pa, n))

    def mem_write(self, pa: int, data: bytes) -> None:
        self.uc.mem_write(pa, data)

    def drop_decoded(self, lo: int, hi: int) -> None:
        """Forget every translated block overlapping [lo, hi): the next fetch decodes memory again."""
        self._ctl(_CTL_REMOVE, ctypes.c_uint64(lo), ctypes.c_uint64(hi))

    def decode_at(self, address: int) -> None:
        """Translate the block at `address` from current memory now (the CPU "decodes" it). At an
        exit the exit is lifted for the translation: a block translated at an exit is a stop block.

        With the code buffer nearly full (`low_on_room`) every block is dropped first, and
        `on_flushed` tells the machine, which translates every CPU copy again: Unicorn would crash
        the process translating into a full buffer from outside a run (see `recycle`)."""
        if not self._refilling and self.low_on_room:
            use = self.code_buffer() or (0, 0)
            if self._in_emu:
                # (from a hook of this engine's own run: no emptying the buffer under it)
                raise SimulatorBug(
                    f"the engine's code buffer is full ({use[0]} of {use[1]} bytes) and a block must be "
                    f"translated at {address:#x} from inside its run"
                )
            self.empty()
            self._refilling = True  # (the buffer is empty: what the machine translates again fits)
            try:
                self.on_flushed()
            finally:
                self._refilling = False
        if address not in self._exits:
            self._ctl(_CTL_REQUEST, ctypes.c_uint64(address), ctypes.byref(self._tb))
            return
        self._set_exits(self._exits - {address})
        try:
            self._ctl(_CTL_REQUEST, ctypes.c_uint64(address), ctypes.byref(self._tb))
        finally:
            self._set_exits(self._exits)


def _nothing() -> None:
    pass


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) ranges, overlapping or touching ones joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out
