"""x86 event-delivery rules, as pure data and functions (no emulator here).

Rules
-----
1. A gate says where a vector goes: handler, IST index (0 = stay on the current stack), and whether
   it is an interrupt gate (IF cleared on entry) or a trap gate (IF kept). Gates are the 16-byte
   64-bit IDT descriptors the guest would have; `encode_gate`/`decode_gate` convert.
2. Delivery aligns the new stack pointer down to 16 bytes (64-bit mode always does) -- on the IST
   top when the gate has an IST, even if RSP is already on that stack -- and pushes SS, RSP, RFLAGS,
   CS, RIP. RFLAGS loses TF, NT and RF, and IF too for an interrupt gate.
3. NMI blocking: delivering an NMI blocks NMIs. While blocked, the first further NMI is latched and
   the rest are dropped (the latch is one bit deep). `iretq` unblocks -- *any* `iretq`, not only the
   NMI's own (the flaw at the heart of the project) -- unless the machine models FRED-style hardware,
   where only a return through a frame marked as an NMI frame unblocks (FRED marks it with bit 18 of
   the SS slot; we use the same bit). A latched NMI is delivered right after the unblocking `iretq`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

__all__ = [
    "FRED_NMI_BIT",
    "RFLAGS_DF",
    "RFLAGS_IF",
    "Gate",
    "NmiArrival",
    "NmiState",
    "Vector",
    "decode_gate",
    "encode_gate",
    "entry_rflags",
    "frame_base",
]

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
#: Bit of the saved SS slot that FRED event delivery sets for an NMI (FRED_SSX_NMI_BIT).
FRED_NMI_BIT = 18


class Vector(enum.IntEnum):
    """Vectors the machine delivers."""

    DE = 0
    NMI = 2
    BP = 3
    UD = 6
    DF = 8
    GP = 13
    PF = 14
    TIMER = 0xEC  # LOCAL_TIMER_VECTOR: the local APIC timer
    IPI = 0xFC  # CALL_FUNCTION_VECTOR: on_each_cpu(), the sync of text_poke_bp
    STOP = 0xFD  # RESCHEDULE_VECTOR: wakes the stop_machine stopper on a CPU

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Gate:
    handler: int
    ist: int = 0
    interrupt: bool = True  # interrupt gate (clears IF) rather than trap gate
    selector: int = 0x10


def encode_gate(gate: Gate) -> bytes:
    """A present, DPL-0, 64-bit interrupt or trap gate descriptor."""
    kind = 0xE if gate.interrupt else 0xF
    attrs = 0x80 | kind  # P=1, DPL=0
    h = gate.handler
    return struct.pack("<HHBBHII", h & 0xFFFF, gate.selector, gate.ist & 7, attrs, (h >> 16) & 0xFFFF, h >> 32, 0)


def decode_gate(raw: bytes) -> Gate | None:
    """The gate a descriptor encodes, or None when it is not a present 64-bit gate."""
    lo, sel, ist, attrs, mid, hi, _ = struct.unpack("<HHBBHII", raw)
    if not attrs & 0x80 or (attrs & 0xF) not in (0xE, 0xF):
        return None
    handler = lo | (mid << 16) | (hi << 32)
    return Gate(handler, ist & 7, (attrs & 0xF) == 0xE, sel)


def frame_base(rsp: int, ist_top: int | None) -> int:
    """Lowest address of the 5-word frame delivery pushes (RSP after delivery)."""
    start = ist_top if ist_top is not None else rsp
    return (start & ~0xF) - 40


def entry_rflags(rflags: int, gate: Gate) -> int:
    cleared = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | (RFLAGS_IF if gate.interrupt else 0)
    return (rflags & ~cleared) | 2


class NmiArrival(enum.Enum):
    DELIVER = "deliver"
    LATCH = "latch"
    DROP = "drop"

    def __repr__(self) -> str:
        return self.name


class NmiState:
    """One CPU's NMI blocking and its one-deep latch."""

    __slots__ = ("blocked", "fred", "latched")

    def __init__(self, fred: bool = False) -> None:
        self.blocked = False
        self.latched = False
        self.fred = fred

    def arrive(self) -> NmiArrival:
        if not self.blocked:
            return NmiArrival.DELIVER
        if not self.latched:
            self.latched = True
            return NmiArrival.LATCH
        return NmiArrival.DROP

    def delivered(self) -> None:
        self.blocked = True

    def iret(self, ss_slot: int) -> bool:
        """Apply an `iretq` that popped `ss_slot`; True when it unblocked NMIs."""
        if not self.blocked:
            return False
        if self.fred and not (ss_slot >> FRED_NMI_BIT) & 1:
            return False
        self.blocked = False
        return True

    def take_latched(self) -> bool:
        """True (and clears the latch) when a latched NMI is now deliverable."""
        if self.latched and not self.blocked:
            self.latched = False
            return True
        return False
