"""Where everything lives: physical memory, kernel virtual addresses, page tables.

Theory of operation
-------------------
Every CPU is a separate Unicorn instance, but they share *one* physical memory: each region below is
one host buffer mapped at the same physical address into every instance, so a byte written by anyone
is the same byte for all. The kernel sees that memory through one set of 4-level page tables (4 KiB
pages) that every CPU loads into CR3, at the kernel-half addresses Linux uses:

    text      0xffffffff81000000   read-only, shared (the patcher writes through the host, as
                                   text_poke writes through a private alias mapping)
    data      0xffffffff82000000   shared kernel data (IDT, GDT, patch descriptors, tables)
    per-CPU   0xffff888000000000+  direct map of each CPU's per-CPU area and TSS (GS base points here)
    alias     0xffff888000200000   the direct map of the text, writable (pre-3.5 Linux wrote text
                                   through it; guest stores there are seen by the machine)
    stacks    0xfffffe0000000000+  cpu_entry_area-like: kernel stack, NMI IST stack and a second
                                   (irq) stack per CPU, each between unmapped guard pages, so an
                                   overrun faults instead of silently corrupting a neighbour.

Physical addresses are what Unicorn's `mem_read`/`mem_write` take under paging; `Layout.pa()`
translates a kernel virtual address the same way the page tables do.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "DATA_RESERVED",
    "DATA_VA",
    "GDT_VA",
    "IDT_VA",
    "IMAGE_DATA_VA",
    "KERNEL_CS",
    "KERNEL_DS",
    "PAGE",
    "TEXT_ALIAS_VA",
    "TEXT_VA",
    "UNTIL",
    "Layout",
    "PercpuBlock",
    "Region",
]

PAGE = 0x1000
KERNEL_CS = 0x10
KERNEL_DS = 0x18

TEXT_VA = 0xFFFFFFFF81000000
DATA_VA = 0xFFFFFFFF82000000
DIRECT_MAP_VA = 0xFFFF888000000000
ENTRY_AREA_VA = 0xFFFFFE0000000000
#: emu_start's `until`: an address that is never mapped and never executed (UNICORN-NOTES 7).
UNTIL = 0x1000

PT_PA = 0x00100000
PT_MAX = 0x00100000
TEXT_PA = 0x00200000
TEXT_ALIAS_VA = DIRECT_MAP_VA + TEXT_PA  # the text's writable direct-map alias
DATA_PA = 0x00600000
PERCPU_PA = 0x01000000
#: The first DATA_RESERVED bytes of the data segment belong to the machine (GDT, IDT);
#: the kernel image's own data starts at IMAGE_DATA_VA.
DATA_RESERVED = 0x2000
GDT_VA = DATA_VA
IDT_VA = DATA_VA + 0x1000
IMAGE_DATA_VA = DATA_VA + DATA_RESERVED


@dataclass(frozen=True, slots=True)
class PercpuBlock:
    """Offsets inside one CPU's private physical block (PERCPU_STRIDE bytes)."""

    area: int = 0x0000  # per-CPU variables, 16 KiB, GS base
    area_size: int = 0x4000
    tss: int = 0x4000  # 64-bit TSS (RSP0, IST1..7), one page
    kstack: int = 0x6000  # kernel stack, 16 KiB (THREAD_SIZE), guard page below
    kstack_size: int = 0x4000
    nmi_stack: int = 0xB000  # NMI IST stack, 4 KiB (EXCEPTION_STKSZ), guard page below
    nmi_stack_size: int = 0x1000
    irq_stack: int = 0xD000  # second stack the NMI handler switches to, 16 KiB
    irq_stack_size: int = 0x4000
    stride: int = 0x12000


BLOCK = PercpuBlock()


@dataclass(frozen=True, slots=True)
class Region:
    """One virtual range mapped onto a physical range."""

    va: int
    pa: int
    size: int
    writable: bool
    name: str
    #: instruction fetch allowed (Linux maps everything but the kernel text NX, the direct map too)
    executable: bool = False


class Layout:
    """Address map of a machine with `ncpus` CPUs, `text_size` bytes of text and `data_size` of data."""

    def __init__(self, ncpus: int, text_size: int, data_size: int) -> None:
        self.ncpus = ncpus
        self.text_size = _round_up(text_size, PAGE)
        self.data_size = _round_up(data_size, PAGE)
        if TEXT_PA + self.text_size > DATA_PA:
            raise ValueError(f"kernel text of {text_size} bytes does not fit below the data segment")
        if DATA_PA + self.data_size > PERCPU_PA:
            raise ValueError(f"kernel data of {data_size} bytes does not fit below the per-CPU blocks")
        self.percpu_size = ncpus * BLOCK.stride
        regions = [
            Region(TEXT_VA, TEXT_PA, self.text_size, False, "text", executable=True),
            Region(DATA_VA, DATA_PA, self.data_size, True, "data"),
            # the direct map's writable alias of the text (Linux before 3.5 wrote text through
            # __va(__pa(ip)); the NMI-side write of stop_machine ftrace stores through it)
            Region(TEXT_ALIAS_VA, TEXT_PA, self.text_size, True, "text-alias"),
        ]
        for cpu in range(ncpus):
            base = PERCPU_PA + cpu * BLOCK.stride
            regions.append(Region(self.percpu_va(cpu), base, BLOCK.area_size, True, f"percpu{cpu}"))
            regions.append(Region(self.tss_va(cpu), base + BLOCK.tss, PAGE, True, f"tss{cpu}"))
            for name, off, size in (
                ("kstack", BLOCK.kstack, BLOCK.kstack_size),
                ("nmistack", BLOCK.nmi_stack, BLOCK.nmi_stack_size),
                ("irqstack", BLOCK.irq_stack, BLOCK.irq_stack_size),
            ):
                regions.append(Region(self._stack_va(cpu, off), base + off, size, True, f"{name}{cpu}"))
        self.regions = tuple(regions)
        self._sorted = sorted(regions, key=lambda r: r.va)
        self._starts = [r.va for r in self._sorted]
        self.page_tables = _build_page_tables(tuple(self._sorted))
        if len(self.page_tables) > PT_MAX:
            raise ValueError("page tables do not fit their reserved physical area")

    # -- per-CPU addresses -------------------------------------------------------------------
    @staticmethod
    def percpu_va(cpu: int) -> int:
        return DIRECT_MAP_VA + PERCPU_PA + cpu * BLOCK.stride + BLOCK.area

    @staticmethod
    def tss_va(cpu: int) -> int:
        return DIRECT_MAP_VA + PERCPU_PA + cpu * BLOCK.stride + BLOCK.tss

    @staticmethod
    def _stack_va(cpu: int, off: int) -> int:
        return ENTRY_AREA_VA + cpu * BLOCK.stride + off

    def kstack_top(self, cpu: int) -> int:
        return self._stack_va(cpu, BLOCK.kstack) + BLOCK.kstack_size

    def nmi_stack_top(self, cpu: int) -> int:
        return self._stack_va(cpu, BLOCK.nmi_stack) + BLOCK.nmi_stack_size

    def irq_stack_top(self, cpu: int) -> int:
        return self._stack_va(cpu, BLOCK.irq_stack) + BLOCK.irq_stack_size

    # -- translation -------------------------------------------------------------------------
    def region_of(self, va: int) -> Region | None:
        i = bisect.bisect_right(self._starts, va) - 1
        if i >= 0:
            r = self._sorted[i]
            if va < r.va + r.size:
                return r
        return None

    def pa(self, va: int, size: int = 1) -> int | None:
        """Physical address of `va`, or None when [va, va+size) is not wholly mapped in one region."""
        r = self.region_of(va)
        if r is None or va + size > r.va + r.size:
            return None
        return r.pa + (va - r.va)


def _round_up(x: int, to: int) -> int:
    return (x + to - 1) // to * to


#: a page-table entry's no-execute bit (honoured with EFER.NXE set, as every engine boots)
PTE_NX = 1 << 63


@lru_cache(maxsize=16)
def _build_page_tables(regions: tuple[Region, ...]) -> bytes:
    """4-level page tables with 4 KiB pages, laid out from PT_PA; returns the bytes to place there
    (the same for every machine of a sweep: built once)."""
    tables: list[bytearray] = [bytearray(PAGE)]  # index 0 = PML4

    def child(table: int, index: int) -> int:
        entry = struct.unpack_from("<Q", tables[table], index * 8)[0]
        if entry & 1:
            return ((entry & ~0xFFF) - PT_PA) // PAGE
        tables.append(bytearray(PAGE))
        new = len(tables) - 1
        struct.pack_into("<Q", tables[table], index * 8, (PT_PA + new * PAGE) | 0x3)
        return new

    for r in regions:
        for off in range(0, r.size, PAGE):
            va = r.va + off
            pdpt = child(0, (va >> 39) & 0x1FF)
            pd = child(pdpt, (va >> 30) & 0x1FF)
            pt = child(pd, (va >> 21) & 0x1FF)
            flags = 0x1 | (0x2 if r.writable else 0) | (0 if r.executable else PTE_NX)
            struct.pack_into("<Q", tables[pt], ((va >> 12) & 0x1FF) * 8, (r.pa + off) | flags)
    return b"".join(bytes(t) for t in tables)
