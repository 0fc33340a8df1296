"""The patch-descriptor table the #BP handler reads (`bp_desc` in kernel data).

Layout (all little-endian): refs u64, nr_entries u64, then `nr_entries` entries of 32 bytes:
address u64, target u64, length u8, opcode u8, 14 bytes of padding. Entries are sorted by address,
so the handler can binary-search them (Linux: bsearch for more than one entry, a direct compare for
one); a batch holds at most BP_DESC_MAX (Linux's TEXT_POKE_ARRAY_MAX) entries.

Like Linux's `bp_desc`/`text_poke_array`: the patcher fills the entries, then publishes by setting
refs to 1 (the store that makes the table live, after the entries: the smp_wmb of the kernel); the
handler takes a reference only while refs is not zero. To withdraw, the patcher drops its own
reference and waits until the handlers that still hold one have returned.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cpus.errors import ConfigError

from .image import BP_DESC, BP_DESC_MAX, BP_ENTRY_SIZE

__all__ = ["BP_DESC", "PokeDescriptor", "drop_ref", "pack_entries", "publish", "read_refs"]

OPCODE_CALL = 0xE8
OPCODE_JMP = 0xE9
OPCODE_RET = 0xC3  # target unused: the return address is on the interrupted stack


@dataclass(frozen=True, slots=True)
class PokeDescriptor:
    """How the #BP handler emulates the new instruction at `address` while it is being written."""

    address: int
    target: int  # where execution continues (for a nop: address + length)
    length: int
    opcode: int  # OPCODE_CALL, OPCODE_JMP (also for nops), OPCODE_RET, 0xCC (not consumed)


def pack_entries(entries: list[PokeDescriptor]) -> bytes:
    if len(entries) > BP_DESC_MAX:
        raise ConfigError(f"at most {BP_DESC_MAX} descriptors per batch, got {len(entries)}")
    out = bytearray()
    for e in sorted(entries, key=lambda d: d.address):
        out += struct.pack("<QQBB14x", e.address, e.target, e.length, e.opcode)
    return bytes(out)


def publish(machine, entries: list[PokeDescriptor]) -> None:  # machine: cpus.Machine
    """Fill the table, then make it live (refs = 1)."""
    machine.write(BP_DESC + 16, pack_entries(entries))
    machine.write(BP_DESC + 8, struct.pack("<Q", len(entries)))
    machine.write(BP_DESC, struct.pack("<Q", 1))


def read_refs(machine) -> int:
    return machine.read_u64(BP_DESC)


def drop_ref(machine) -> bool:
    """The patcher's atomic decrement of its own reference. False when refs was already 0: only a
    corrupted kernel (a handler that dropped a reference it never took) gets there; refs stays 0."""
    refs = read_refs(machine)
    if refs == 0:
        return False
    machine.write(BP_DESC, struct.pack("<Q", refs - 1))
    return True


assert struct.calcsize("<QQBB14x") == BP_ENTRY_SIZE
