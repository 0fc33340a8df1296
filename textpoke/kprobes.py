"""Kprobes on the kernel side: which instructions can run out of line, the code of an out-of-line
slot and of an optprobe detour buffer, the kprobe table the #BP handler reads, and the slot caches.

How Linux does it (arch/x86/kernel/kprobes/core.c, opt.c; kernel/kprobes.c), and this model:

* A kprobe is an int3 on the first byte of an instruction. Its #BP handler runs the probe's
  callback, then executes the displaced instruction out of line. Linux single-steps the copy (TF set)
  or, for a "boostable" instruction, runs the copy followed by a jmp back to the next instruction
  without a second trap. This model boosts every probe: an instruction that cannot be boosted
  (branches, calls, returns, rip-relative operands, IF changers, traps) is refused.
* The copy lives in an instruction slot of an executable page (Linux's kprobe_insn_cache); filling
  it is a text write. Removing a probe restores the original byte, syncs, unlinks the probe, and
  frees the slot only after a grace period, since a CPU may still be in it (interrupted there, say).
* An optimized probe replaces the whole instructions covering 5 bytes at the probe point with a
  jmp rel32 to a detour buffer: the callback (flags saved around it), the copied instructions, a jmp
  back after them. While the probe is armed but not yet optimized, its int3 already sends CPUs to
  the detour's copied instructions (Linux's setup_detour_execution), so no CPU enters the range after
  its first instruction. Before writing the jmp, Linux waits (synchronize_rcu_tasks) until no CPU can
  still be interrupted inside the range: one that is would return into the middle of the jmp.

The grace period is modelled as a patcher wait until every other online CPU has passed a quiescent
point (`Percpu.LOOPS`: the workload finished an iteration, so its base context has left every probed
function and returned from every interrupt, NMI or #BP it was in when the wait began; see
`textpoke.patcher`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone.x86 import X86_OP_MEM, X86_REG_RIP

from cpus.layout import TEXT_VA

from .image import (
    KPROBE_ENTRY_SIZE,
    KPROBE_MAX,
    KPROBE_SLOT_SIZE,
    KPROBE_TABLE,
    OPTPROBE_SLOT_SIZE,
    KernelImage,
    Percpu,
)

__all__ = [
    "KprobeState",
    "ProbeSpec",
    "SlotCache",
    "boosted_slot",
    "detour_buffer",
    "insn_len",
    "out_of_line_problem",
    "pack_entry",
    "probe_spec",
    "table_entry",
]

INT3 = 0xCC
JMP32 = 0xE9

_CS = Cs(CS_ARCH_X86, CS_MODE_64)
_CS.detail = True

#: mnemonics kprobes cannot run as a boosted copy: control transfers (their targets are relative to
#: where they run, or they leave the copy before its jmp back), interrupt-flag changers and traps
_NOT_BOOSTABLE_PREFIXES = ("j", "loop")
_NOT_BOOSTABLE = frozenset(
    {
        "call", "ret", "retf", "iret", "iretd", "iretq", "int", "int1", "int3", "into", "syscall", "sysret",
        "sysenter", "sysexit", "cli", "sti", "pushfq", "popfq", "pushf", "popf", "hlt", "ud2", "jrcxz",
        "jecxz", "enter", "leave",
    }
)  # fmt: skip


def out_of_line_problem(code: bytes, address: int) -> str | None:
    """Why the first instruction of `code` (at `address`) cannot run as a boosted out-of-line copy,
    or None when it can."""
    insns = list(_CS.disasm(code[:15], address, count=1))
    if not insns:
        return f"{code[:8].hex(' ')} does not decode"
    insn = insns[0]
    m = insn.mnemonic
    what = f"{m} {insn.op_str}".strip()
    if m in _NOT_BOOSTABLE or m.startswith(_NOT_BOOSTABLE_PREFIXES):
        return f"{what} transfers control or changes the interrupt flag (Linux single-steps or emulates it)"
    for op in insn.operands:
        if op.type == X86_OP_MEM and op.mem.base == X86_REG_RIP:
            return f"{what} is rip-relative (its displacement would need fixing up in the copy)"
    return None


def insn_len(code: bytes, address: int) -> int:
    insns = list(_CS.disasm(code[:15], address, count=1))
    return insns[0].size if insns else 0


def _jmp_back(at: int, target: int) -> bytes:
    rel = target - (at + 5)
    if not -(2**31) <= rel < 2**31:
        raise ValueError(f"jmp from {at:#x} cannot reach {target:#x}")
    return bytes([JMP32]) + struct.pack("<i", rel)


def boosted_slot(insn: bytes, site: int, slot: int) -> bytes:
    """A boosted kprobe's slot at `slot`: the displaced instruction, then a jmp back after it."""
    code = insn + _jmp_back(slot + len(insn), site + len(insn))
    if len(code) > KPROBE_SLOT_SIZE:
        raise ValueError(f"a {len(insn)}-byte instruction and its jmp back do not fit a {KPROBE_SLOT_SIZE}-byte slot")
    return code


def _callback(index: int) -> bytes:
    """The detour's callback part: pushfq; inc qword ptr gs:[KP_HITS + 8*index]; popfq."""
    disp = Percpu.KP_HITS + 8 * index
    return b"\x9c" + b"\x65\x48\xff\x04\x25" + struct.pack("<i", disp) + b"\x9d"


def detour_buffer(index: int, copied: bytes, site: int, buf: int) -> tuple[bytes, int]:
    """An optimized probe's detour buffer at `buf`: the callback (flags kept), the instructions
    copied from the range [site, site + len(copied)), a jmp back after the range. Returns the code
    and the offset of the copied instructions (where an int3 hit continues: its callback already ran)."""
    head = _callback(index)
    code = head + copied + _jmp_back(buf + len(head) + len(copied), site + len(copied))
    if len(code) > OPTPROBE_SLOT_SIZE:
        raise ValueError(f"a detour of {len(code)} bytes does not fit a {OPTPROBE_SLOT_SIZE}-byte buffer")
    return code, len(head)


def pack_entry(address: int, resume: int, length: int, index: int) -> bytes:
    """A kprobe table entry (kprobe.S): address, resume, length, index."""
    return struct.pack("<QQBB14x", address, resume, length, index)


assert struct.calcsize("<QQBB14x") == KPROBE_ENTRY_SIZE


def table_entry(i: int) -> int:
    """The address of entry `i` of the kprobe table."""
    return KPROBE_TABLE + 16 + i * KPROBE_ENTRY_SIZE


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    """A probe point of the kernel: where, its index (the callback's counter), how long its first
    instruction is, how many bytes of whole instructions an optimized probe copies (0: a plain
    kprobe, boosted from a slot)."""

    site: int
    index: int
    insn_len: int
    copy_len: int = 0

    @property
    def optimizable(self) -> bool:
        return self.copy_len > 0


def probe_spec(kernel: KernelImage, site: int) -> ProbeSpec | None:
    """The probe point at `site`: a kprobe point, or the start of an optprobe range (its kprobe
    sits on the range's first instruction)."""
    for i, (addr, n) in enumerate(kernel.kprobe_points):
        if addr == site:
            return ProbeSpec(site, i, n)
    for i, (addr, n) in enumerate(kernel.optprobe_ranges):
        if addr == site:
            first = insn_len(kernel.text[addr - TEXT_VA :], addr)
            return ProbeSpec(site, i, first, n)
    return None


class SlotCache:
    """Fixed-size slots of an executable area (Linux's kprobe_insn_cache, one page): the lowest free
    slot is handed out first; a freed slot is reused."""

    def __init__(self, base: int, size: int, count: int = KPROBE_MAX) -> None:
        self.base = base
        self.size = size
        self.free = list(range(count))
        self.used: dict[int, int] = {}  # site -> slot number

    def get(self, site: int) -> int:
        if site in self.used:
            raise ValueError(f"{site:#x} already holds a slot")
        if not self.free:
            raise ValueError("no free instruction slot")
        n = self.free.pop(0)
        self.used[site] = n
        return self.base + n * self.size

    def put(self, site: int) -> int:
        n = self.used.pop(site)
        self.free.append(n)
        self.free.sort()
        return self.base + n * self.size

    def address(self, site: int) -> int | None:
        n = self.used.get(site)
        return None if n is None else self.base + n * self.size


class KprobeState:
    """What the kernel keeps about its probes outside the #BP handler's table: the slot caches, which
    table entry and slot each probe holds (kernel/kprobes.c's kprobe hash list and insn caches)."""

    def __init__(self, kernel: KernelImage) -> None:
        self.kernel = kernel
        self.slots = SlotCache(kernel.symbols["kprobe_insn_slots"], KPROBE_SLOT_SIZE)
        self.buffers = SlotCache(kernel.symbols["optprobe_insn_slots"], OPTPROBE_SLOT_SIZE)
        self.entries: dict[int, int] = {}  # site -> table entry
        self.in_use = 0  # table entries the handler scans (a high-water mark)
        self.unlinked: set[int] = set()  # sites whose slot awaits freeing

    def spec(self, site: int) -> ProbeSpec:
        spec = probe_spec(self.kernel, site)
        if spec is None:
            raise ValueError(f"{site:#x} is not a probe point of this kernel")
        return spec

    def _cache(self, spec: ProbeSpec) -> SlotCache:
        return self.buffers if spec.optimizable else self.slots

    def prepare(self, spec: ProbeSpec, code: bytes) -> tuple[int, bytes, int]:
        """Allocate the probe's slot and build what goes in it: (slot, its code, where a hit resumes)."""
        slot = self._cache(spec).get(spec.site)
        if spec.optimizable:
            body, offset = detour_buffer(spec.index, code[: spec.copy_len], spec.site, slot)
            return slot, body, slot + offset
        return slot, boosted_slot(code[: spec.insn_len], spec.site, slot), slot

    def link(self, spec: ProbeSpec, resume: int) -> tuple[int, bytes]:
        """A free table entry for the probe: (its address, its bytes)."""
        used = set(self.entries.values())
        i = next(i for i in range(KPROBE_MAX) if i not in used)
        self.entries[spec.site] = i
        self.in_use = max(self.in_use, i + 1)
        return table_entry(i), pack_entry(spec.site, resume, spec.insn_len, spec.index)

    def unlink(self, site: int) -> int:
        """The address of the probe's table entry, now free (the caller clears it)."""
        self.unlinked.add(site)
        return table_entry(self.entries.pop(site))

    def free(self, site: int) -> tuple[int, int]:
        """Free the probe's slot: (its address, its size)."""
        self.unlinked.discard(site)
        spec = self.spec(site)
        cache = self._cache(spec)
        return cache.put(site), cache.size

    def slot_of(self, site: int) -> int | None:
        spec = probe_spec(self.kernel, site)
        return None if spec is None else self._cache(spec).address(site)
