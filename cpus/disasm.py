"""Capstone helpers: the machine's own view of bytes as instructions, for checks and reports."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsInsn

__all__ = ["DIRECT_BRANCHES", "describe", "disasm", "insn_length", "instructions"]

_CS = Cs(CS_ARCH_X86, CS_MODE_64)

#: mnemonics of the instructions that can transfer control to an address written in them (a
#: relative displacement): the call, the jump, every conditional jump, and the count loops
DIRECT_BRANCHES = frozenset(
    {
        "call",
        "jmp",
        "jo",
        "jno",
        "jb",
        "jae",
        "je",
        "jne",
        "jbe",
        "ja",
        "js",
        "jns",
        "jp",
        "jnp",
        "jl",
        "jge",
        "jle",
        "jg",
        "jrcxz",
        "jecxz",
        "loop",
        "loope",
        "loopne",
    }
)


def disasm(code: bytes, address: int, limit: int = 0) -> list[tuple[int, bytes, str]]:
    """(address, bytes, text) per instruction decoded from `code`, stopping at the first invalid one."""
    out = []
    for insn in _CS.disasm(code, address):
        out.append((insn.address, bytes(insn.bytes), f"{insn.mnemonic} {insn.op_str}".strip()))
        if limit and len(out) >= limit:
            break
    return out


def instructions(code: bytes, address: int) -> Iterator[CsInsn]:
    """Capstone's instructions decoded from `code` (mnemonic, op_str, address, size), stopping at
    the first invalid one: for analyses that look at many instructions at once."""
    return _CS.disasm(code, address)


@lru_cache(maxsize=4096)
def insn_length(code: bytes) -> int | None:
    """Length of the first instruction in `code`, or None when it does not decode."""
    for insn in _CS.disasm(code, 0, 1):
        return insn.size
    return None


@lru_cache(maxsize=4096)
def describe(code: bytes, address: int = 0) -> str:
    """One-line disassembly of `code` ("(bad)" for what does not decode)."""
    parts = []
    pos = 0
    for a, b, text in disasm(code, address):
        parts.append(text)
        pos = a - address + len(b)
    if pos < len(code):
        parts.append("(bad) " + code[pos:].hex(" "))
    return "; ".join(parts)
