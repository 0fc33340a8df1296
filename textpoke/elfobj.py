"""Load ELF64 x86-64 relocatable objects (`.o` files compiled with the kernel's flags) into the kernel.

This is the module loader and the part of `objtool`/`recordmcount` the simulator needs, in one pass:

1. `read_object` parses a file with pyelftools and checks that it is something we can link: ELF64,
   little-endian, x86-64, relocatable, sections inside the file and not overlapping each other.
2. `link` places every allocated section (code into the kernel text, everything else into the kernel
   data, which all CPUs share), resolves symbols across the objects and the runtime the kernel
   provides, applies the relocations (with overflow checks), and finds the sites:

   * ftrace sites: gcc with `-pg -mfentry -mrecord-mcount -mnop-mcount` leaves a 5-byte nop at each
     function entry and its address in `__mcount_loc`; clang (zig cc) with `-pg -mfentry` leaves
     `call __fentry__` with a relocation, which is recorded and turned into the nop, as objtool's
     `--mcount` pass does for Linux. Either way every site boots as the nop.
   * jump labels: `__jump_table`, Linux's relative entries (code, target, key; the key's bit 0 is
     the branch direction). The instruction is a 2-byte (`eb` rel8) or 5-byte (`e9` rel32) jmp to
     the target, as the assembler chose, or a nop of the same size; an entry whose key has bit 1 set
     is a branch that is off by default: its jmp becomes the nop of its size (`66 90`,
     `0f 1f 44 00 00`) and the bit is cleared, the step Linux's objtool performs at build time.
   * static calls: `.static_call_sites`, entries of two 32-bit offsets relative to the field (the
     call instruction; the `struct static_call_key`, bit 0 = tail call, bit 1 = init), plus every
     call or jump to a `__SCT__name` trampoline, whose key is `__SCK__name` (what objtool records).

Nothing is written anywhere until every check passed: a bad object raises `ObjectError` naming the
object and the problem, and the caller's kernel is left as it was.
"""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from cpus.errors import TextpokeError

__all__ = [
    "FENTRY",
    "FTRACE_NOP",
    "RELOCATION_NAMES",
    "ElfObject",
    "JumpEntry",
    "Linked",
    "ObjectError",
    "StaticCallSite",
    "link",
    "read_object",
]

FTRACE_NOP = bytes.fromhex("0f1f440000")
FENTRY = "__fentry__"
_ENDBR64 = bytes.fromhex("f30f1efa")  # -fcf-protection puts it before the site
#: sections that take no part in the running kernel (unwind tables: the kernel builds without them)
_IGNORED = (".eh_frame",)
_MCOUNT = "__mcount_loc"
_JUMP_TABLE = "__jump_table"
_STATIC_CALLS = ".static_call_sites"
_SCT, _SCK = "__SCT__", "__SCK__"

R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_32, R_X86_64_32S, R_X86_64_PC64 = 1, 2, 4, 10, 11, 24
RELOCATION_NAMES = {
    0: "R_X86_64_NONE", 1: "R_X86_64_64", 2: "R_X86_64_PC32", 3: "R_X86_64_GOT32", 4: "R_X86_64_PLT32",
    5: "R_X86_64_COPY", 6: "R_X86_64_GLOB_DAT", 7: "R_X86_64_JUMP_SLOT", 8: "R_X86_64_RELATIVE",
    9: "R_X86_64_GOTPCREL", 10: "R_X86_64_32", 11: "R_X86_64_32S", 12: "R_X86_64_16", 13: "R_X86_64_PC16",
    14: "R_X86_64_8", 15: "R_X86_64_PC8", 16: "R_X86_64_DTPMOD64", 17: "R_X86_64_DTPOFF64",
    18: "R_X86_64_TPOFF64", 19: "R_X86_64_TLSGD", 20: "R_X86_64_TLSLD", 21: "R_X86_64_DTPOFF32",
    22: "R_X86_64_GOTTPOFF", 23: "R_X86_64_TPOFF32", 24: "R_X86_64_PC64", 25: "R_X86_64_GOTOFF64",
    26: "R_X86_64_GOTPC32", 41: "R_X86_64_GOTPCRELX", 42: "R_X86_64_REX_GOTPCRELX",
}  # fmt: skip
_HANDLED = {R_X86_64_64, R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_32, R_X86_64_32S, R_X86_64_PC64}
#: relocations through a global offset table (-fPIC, -fPIE) and of thread-local storage (__thread)
_GOT_RELOCATIONS = {3, 9, 25, 26, 41, 42}
_TLS_RELOCATIONS = {16, 17, 18, 19, 20, 21, 22, 23}
#: sections of functions that run before (or after) main, which nothing calls in a kernel
_CONSTRUCTOR_TYPES = ("SHT_INIT_ARRAY", "SHT_FINI_ARRAY", "SHT_PREINIT_ARRAY")
_CONSTRUCTOR_SECTIONS = (".init_array", ".fini_array", ".preinit_array", ".ctors", ".dtors")
#: the functions the kernel calls by name (see textpoke.h)
_ENTRY_POINTS = ("textpoke_workload", "textpoke_nmi_irq", "textpoke_nmi")
#: files that are source code, not objects
_SOURCE_SUFFIXES = (".c", ".h", ".cc", ".cpp", ".cxx", ".S", ".s", ".i")
#: undefined symbols a compiler emits on its own, and the flag that stops it
_UNDEFINED_HINTS = (
    ("__stack_chk_fail", "the stack protector: build with -fno-stack-protector"),
    ("__stack_chk_guard", "the stack protector: build with -fno-stack-protector"),
    ("__ubsan_", "UBSan's runtime, which the kernel does not have: build without -fsanitize=undefined"),
    ("__asan_", "ASan's runtime, which the kernel does not have: build without -fsanitize=address"),
    ("__tsan_", "TSan's runtime, which the kernel does not have: build without -fsanitize=thread"),
    ("__sanitizer_cov_", "coverage instrumentation: build without -fsanitize-coverage"),
    ("mcount", "-pg without -mfentry calls mcount after the prologue: add -mfentry"),
    ("_GLOBAL_OFFSET_TABLE_", "position-independent code: build with -fno-pic -mcmodel=kernel"),
)


class ObjectError(TextpokeError, ValueError):
    """An object file cannot be loaded into the kernel; nothing of it was loaded."""


@dataclass(frozen=True, slots=True)
class Reloc:
    offset: int
    type: int
    symbol: int  # index into the object's symbol table
    addend: int


@dataclass(slots=True)
class Section:
    index: int
    name: str
    data: bytes  # zeros for NOBITS
    align: int
    exec: bool
    write: bool
    relocs: list[Reloc] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    value: int
    size: int
    kind: str  # STT_FUNC, STT_OBJECT, STT_SECTION, STT_NOTYPE, ...
    bind: str  # STB_LOCAL, STB_GLOBAL, STB_WEAK
    shndx: int | str  # section index, or SHN_UNDEF / SHN_ABS / SHN_COMMON


@dataclass
class ElfObject:
    """One parsed relocatable object: its allocated sections (with their relocations) and symbols."""

    name: str
    sections: dict[int, Section]
    symbols: list[Symbol]


@dataclass(frozen=True, slots=True)
class JumpEntry:
    """A `__jump_table` entry: the `length`-byte instruction at `code` (2 or 5) is a nop or a jmp to
    `target`."""

    code: int
    target: int
    key: int  # address of the struct static_key
    branch: bool  # bit 0: the jmp is the default's side (static_branch_likely)
    init: bool  # bit 1 left after loading (never, for entries whose jmp the loader made a nop)
    length: int = 5


@dataclass(frozen=True, slots=True)
class StaticCallSite:
    """A call (or tail jump) at `addr` to a static call trampoline; `key` is its static_call_key."""

    addr: int
    key: int
    tail: bool
    init: bool
    name: str  # the static call's name (`__SCK__name`), or "" when no symbol names the key


@dataclass
class Linked:
    """The objects, placed and relocated: bytes for the kernel's text and data, and what they hold."""

    text: bytes  # from the text base given to `link`
    data: bytes  # from the data base given to `link`
    symbols: dict[str, int]  # every function and every global symbol
    functions: dict[str, tuple[int, int]]  # name -> (address, size)
    sites: dict[str, int]  # function name -> ftrace site
    jump_entries: tuple[JumpEntry, ...] = ()
    static_calls: tuple[StaticCallSite, ...] = ()
    #: (object, section name) -> address, for messages and the call graph
    placement: dict[tuple[str, str], int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------
def read_object(source: str | Path | bytes, name: str | None = None) -> ElfObject:
    """Parse one relocatable object from a path or its bytes."""
    if isinstance(source, bytes):
        raw, label = source, name or "<object>"
    else:
        path = Path(source)
        label = name or str(path)
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise ObjectError(f"{label}: cannot read: {err.strerror or err}") from None
    try:
        return _parse(raw, label)
    except ObjectError:
        raise
    except (ELFError, struct.error, ValueError, KeyError, IndexError, UnicodeDecodeError) as err:
        raise ObjectError(f"{label}: malformed ELF object: {err}") from None


def _parse(raw: bytes, label: str) -> ElfObject:
    if raw[:4] != b"\x7fELF":
        hint = ""
        if Path(label).suffix in _SOURCE_SUFFIXES or b"#include" in raw[:4096]:
            hint = f": it is source code; compile it first (`textpoke cc {label} -o DIR`, then --object DIR/NAME.o)"
        raise ObjectError(f"{label}: not an ELF file (it starts with {raw[:4].hex(' ') or 'nothing'}){hint}")
    elf = ELFFile(io.BytesIO(raw))
    if elf.elfclass != 64 or not elf.little_endian:
        raise ObjectError(f"{label}: not a little-endian ELF64 object (class {elf.elfclass})")
    machine = elf.header["e_machine"]
    if machine != "EM_X86_64":
        raise ObjectError(f"{label}: built for {machine}, not x86-64 (EM_X86_64)")
    if elf.header["e_type"] != "ET_REL":
        raise ObjectError(f"{label}: {elf.header['e_type']} is not a relocatable object (compile with -c)")
    _check_extents(elf, len(raw), label)

    sections: dict[int, Section] = {}
    symtab: SymbolTableSection | None = None
    rela: list[RelocationSection] = []
    for index, sec in enumerate(elf.iter_sections()):
        t = sec["sh_type"]
        if isinstance(sec, SymbolTableSection) and t == "SHT_SYMTAB":
            symtab = sec
        elif t == "SHT_REL":
            raise ObjectError(f"{label}: section {sec.name} has REL relocations; x86-64 objects use RELA")
        elif t == "SHT_RELA":
            rela.append(sec)  # type: ignore[arg-type]
        flags = sec["sh_flags"]
        if not flags & SH_FLAGS.SHF_ALLOC or sec.name in _IGNORED or sec["sh_size"] == 0:
            continue
        if t not in ("SHT_PROGBITS", "SHT_NOBITS", "SHT_INIT_ARRAY", "SHT_FINI_ARRAY"):
            continue  # notes, groups, unwind tables and the like take no space in the kernel
        data = bytes(sec["sh_size"]) if t == "SHT_NOBITS" else sec.data()
        sections[index] = Section(
            index,
            sec.name,
            data,
            max(1, sec["sh_addralign"]),
            bool(flags & SH_FLAGS.SHF_EXECINSTR),
            bool(flags & SH_FLAGS.SHF_WRITE),
        )
    if symtab is None:
        raise ObjectError(f"{label}: no symbol table")
    symbols = [
        Symbol(s.name, s["st_value"], s["st_size"], s["st_info"]["type"], s["st_info"]["bind"], s["st_shndx"])
        for s in symtab.iter_symbols()
    ]
    _check_build(elf, symbols, rela, label)
    for sec in rela:
        target = sec["sh_info"]
        if target not in sections:
            continue  # relocations of a section we do not load (debug info, unwind tables)
        for r in sec.iter_relocations():
            sym = r["r_info_sym"]
            if not 0 <= sym < len(symbols):
                where = sections[target].name
                raise ObjectError(f"{label}: relocation in {where} names symbol #{sym}, not in the table")
            sections[target].relocs.append(Reloc(r["r_offset"], r["r_info_type"], sym, r["r_addend"]))
    return ElfObject(label, sections, symbols)


def _check_build(elf: ELFFile, symbols: list[Symbol], rela: list[RelocationSection], label: str) -> None:
    """Refuse, with the flag or change that fixes it, what a compiler leaves when it was not given the
    kernel's flags, or when the code asks for something a kernel does not have."""
    for sec in elf.iter_sections():
        if not sec["sh_flags"] & SH_FLAGS.SHF_ALLOC or sec["sh_size"] == 0:
            continue
        if sec["sh_flags"] & SH_FLAGS.SHF_TLS:
            tls = sorted({s.name for s in symbols if s.kind == "STT_TLS" and s.name}) or [sec.name]
            raise ObjectError(
                f"{label}: thread-local storage ({sec.name}: {', '.join(tls)}): the kernel has no threads' TLS; "
                "drop __thread and keep per-CPU state in an array indexed by textpoke_cpu()"
            )
        if sec["sh_type"] in _CONSTRUCTOR_TYPES or sec.name.startswith(_CONSTRUCTOR_SECTIONS):
            raise ObjectError(
                f"{label}: {sec.name} lists constructors or destructors (__attribute__((constructor)), C++ static "
                "initializers), which nothing runs here: initialize the data statically, or on the first "
                "call of textpoke_workload"
            )
    for s in symbols:
        if s.name.startswith("_Z") and isinstance(s.shndx, int) and s.bind != "STB_LOCAL":
            for entry in _ENTRY_POINTS:
                if f"{len(entry)}{entry}" in s.name:
                    raise ObjectError(
                        f"{label}: {s.name} is {entry} with a C++ mangled name, which the kernel does not call: "
                        f'compile as C, or declare it extern "C"'
                    )
    for sec in rela:
        for r in sec.iter_relocations():
            t = r["r_info_type"]
            sym = symbols[r["r_info_sym"]].name if 0 <= r["r_info_sym"] < len(symbols) else "?"
            if t in _TLS_RELOCATIONS:
                raise ObjectError(
                    f"{label}: {RELOCATION_NAMES[t]} against {sym}: thread-local storage, which the kernel does not "
                    "have; drop __thread and keep per-CPU state in an array indexed by textpoke_cpu()"
                )
            if t in _GOT_RELOCATIONS:
                raise ObjectError(
                    f"{label}: {RELOCATION_NAMES[t]} against {sym}: position-independent code (it goes through a "
                    "GOT, which the kernel does not have); build with -fno-pic -mcmodel=kernel"
                )


def _check_extents(elf: ELFFile, size: int, label: str) -> None:
    """Every section with contents lies inside the file, and no two of them overlap."""
    spans = []
    for sec in elf.iter_sections():
        if sec["sh_type"] in ("SHT_NULL", "SHT_NOBITS") or sec["sh_size"] == 0:
            continue
        lo, hi = sec["sh_offset"], sec["sh_offset"] + sec["sh_size"]
        if hi > size:
            name = sec.name or "#?"
            raise ObjectError(f"{label}: section {name} ends at byte {hi}, past the end of the file ({size})")
        spans.append((lo, hi, sec.name))
    spans.sort()
    for (_lo1, hi1, n1), (lo2, _hi2, n2) in itertools.pairwise(spans):
        if lo2 < hi1:
            raise ObjectError(f"{label}: sections {n1} and {n2} overlap in the file")


# ------------------------------------------------------------------------------------------------
# Linking
# ------------------------------------------------------------------------------------------------
def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def link(
    objects: Sequence[ElfObject],
    text_base: int,
    data_base: int,
    provided: Mapping[str, int] | None = None,
    taken: frozenset[str] = frozenset(),
    text_align: int = 16,
) -> Linked:
    """Place and relocate `objects`: code from `text_base`, data from `data_base`.

    `provided` are the kernel's own symbols the objects may use (the runtime); `taken` are names the
    kernel already defines, which the objects must not define again.
    """
    provided = dict(provided or {})
    # 1. placement
    where: dict[tuple[int, int], int] = {}  # (object index, section index) -> address
    text_pos, data_pos = text_base, data_base
    placement: dict[tuple[str, str], int] = {}
    for oi, obj in enumerate(objects):
        for si, sec in obj.sections.items():
            if sec.exec:
                text_pos = _align(text_pos, max(sec.align, text_align))
                where[(oi, si)] = text_pos
                text_pos += len(sec.data)
            else:
                data_pos = _align(data_pos, sec.align)
                where[(oi, si)] = data_pos
                data_pos += len(sec.data)
            placement[(obj.name, sec.name)] = where[(oi, si)]
    common: dict[str, int] = {}
    for obj in objects:
        for s in obj.symbols:
            if s.shndx == "SHN_COMMON" and s.name not in common:
                data_pos = _align(data_pos, max(1, s.value))
                common[s.name] = data_pos
                data_pos += s.size

    # 2. symbols: globals across objects, then each object's own view
    globals_: dict[str, int] = {}
    weak: set[str] = set()
    owner: dict[str, str] = {}
    for oi, obj in enumerate(objects):
        for s in obj.symbols:
            if s.bind == "STB_LOCAL" or s.shndx == "SHN_UNDEF" or not s.name:
                continue
            addr = _address(s, oi, obj, where, common)
            if addr is None:
                continue
            if s.name in taken or s.name in provided:
                raise ObjectError(f"{obj.name}: defines {s.name}, which the kernel already defines")
            if s.name in globals_ and s.name not in weak:
                if s.bind == "STB_WEAK":
                    continue
                raise ObjectError(f"{obj.name}: {s.name} is also defined in {owner[s.name]}")
            globals_[s.name] = addr
            owner[s.name] = obj.name
            if s.bind == "STB_WEAK":
                weak.add(s.name)
            else:
                weak.discard(s.name)
    missing = sorted(
        {
            f"{s.name} (in {obj.name})"
            for obj in objects
            for s in obj.symbols
            if s.shndx == "SHN_UNDEF" and s.name and s.name != FENTRY
            and s.name not in globals_ and s.name not in provided and s.bind != "STB_WEAK"
        }
    )  # fmt: skip
    if missing:
        hints = sorted({h for m in missing for p, h in _UNDEFINED_HINTS if m.split(" ")[0].startswith(p)})
        raise ObjectError(
            "undefined symbol: "
            + ", ".join(missing)
            + " (the kernel provides "
            + _names(provided)
            + ")"
            + "".join(f"; {h}" for h in hints)
        )

    # 3. section bytes, the __fentry__ calls recorded and turned into nops, relocations applied
    images: dict[tuple[int, int], bytearray] = {k: bytearray(objects[k[0]].sections[k[1]].data) for k in where}
    fentry_sites: list[tuple[int, int]] = []  # (object index, address)
    for oi, obj in enumerate(objects):
        for si, sec in obj.sections.items():
            buf = images[(oi, si)]
            base = where[(oi, si)]
            for r in sec.relocs:
                sym = obj.symbols[r.symbol]
                name = sym.name or f"section symbol #{r.symbol}"
                if sym.shndx == "SHN_UNDEF" and sym.name == FENTRY:
                    fentry_sites.append((oi, _fentry_site(obj, sec, buf, base, r)))
                    continue
                if r.type not in _HANDLED:
                    kind = RELOCATION_NAMES.get(r.type, f"relocation type {r.type}")
                    raise ObjectError(f"{obj.name}: {kind} against {name} in {sec.name} is not handled")
                s_val = _address(sym, oi, obj, where, common)
                if s_val is None and isinstance(sym.shndx, int):
                    raise ObjectError(
                        f"{obj.name}: {sec.name}+{r.offset:#x} refers to {name} in a section that is not loaded"
                    )
                if s_val is None:
                    s_val = globals_.get(sym.name, provided.get(sym.name, 0))  # an undefined weak is 0
                _apply(obj, sec, buf, base, r, s_val, name)

    # 4. functions
    functions: dict[str, tuple[int, int]] = {}
    for oi, obj in enumerate(objects):
        for s in obj.symbols:
            if s.kind != "STT_FUNC" or not isinstance(s.shndx, int) or (oi, s.shndx) not in where:
                continue
            if not obj.sections[s.shndx].exec:
                raise ObjectError(f"{obj.name}: function {s.name} lies in {obj.sections[s.shndx].name}, not in code")
            addr = where[(oi, s.shndx)] + s.value
            size = s.size or _extent(obj, s, len(obj.sections[s.shndx].data))
            name = s.name
            if s.bind == "STB_LOCAL" and (name in functions or name in globals_ or name in taken or name in provided):
                name = f"{s.name}@{Path(obj.name).name}"
            if name in functions:
                if functions[name][0] == addr:
                    continue
                raise ObjectError(f"{obj.name}: function {name} is defined twice")
            functions[name] = (addr, size)

    text = bytearray(b"\xcc" * (_align(text_pos, 16) - text_base))
    data = bytearray(data_pos - data_base)
    for (oi, si), buf in images.items():
        addr = where[(oi, si)]
        if objects[oi].sections[si].exec:
            text[addr - text_base : addr - text_base + len(buf)] = buf
        else:
            data[addr - data_base : addr - data_base + len(buf)] = buf

    def function_at(addr: int) -> str | None:
        for n, (a, size) in functions.items():
            if a <= addr < a + size:
                return n
        return None

    def in_text(addr: int, n: int) -> bool:
        return text_base <= addr and addr + n <= text_base + len(text)

    # 5. ftrace sites
    sites: dict[str, int] = {}
    mcount = [(oi, addr) for oi, addr in _table_u64(objects, where, images, _MCOUNT)]
    for oi, addr in fentry_sites + mcount:
        obj = objects[oi]
        fn = function_at(addr)
        if fn is None or not in_text(addr, 5):
            raise ObjectError(f"{obj.name}: ftrace site at {addr:#x} is not inside any function")
        got = bytes(text[addr - text_base : addr - text_base + 5])
        off = addr - functions[fn][0]
        if off and not (off == len(_ENDBR64) and text[addr - text_base - off : addr - text_base] == _ENDBR64):
            raise ObjectError(
                f"{obj.name}: the ftrace site of {fn} is at {fn}+{off:#x}, not at its entry: built with -pg "
                "but without -mfentry (the mcount call comes after the prologue); add -mfentry"
            )
        if got != FTRACE_NOP:
            raise ObjectError(
                f"{obj.name}: {_MCOUNT} entry {fn}+{off:#x} holds {got.hex(' ')}: not a call to {FENTRY} "
                "nor the 5-byte nop"
            )
        if fn in sites and sites[fn] != addr:
            raise ObjectError(f"{obj.name}: {fn} has two ftrace sites ({sites[fn]:#x} and {addr:#x})")
        sites[fn] = addr
    if len(set(sites.values())) != len(sites):
        raise ObjectError("two functions share one ftrace site")

    symbols = dict(globals_) | {n: a for n, (a, _s) in functions.items()}
    key_names = {a: n[len(_SCK) :] for n, a in symbols.items() if n.startswith(_SCK)}
    jumps = _jump_entries(objects, where, images, in_text, text, text_base)
    calls = _static_calls(objects, where, images, in_text, key_names)
    calls += _derived_static_calls(objects, where, images, symbols, calls)
    return Linked(
        bytes(text),
        bytes(data),
        symbols,
        functions,
        dict(sorted(sites.items(), key=lambda kv: kv[1])),
        tuple(jumps),
        tuple(sorted(calls, key=lambda c: c.addr)),
        placement,
    )


def _names(provided: Mapping[str, int]) -> str:
    return ", ".join(sorted(provided)) if provided else "nothing"


def _address(s: Symbol, oi: int, obj: ElfObject, where: dict, common: dict[str, int]) -> int | None:
    if s.shndx == "SHN_ABS":
        return s.value
    if s.shndx == "SHN_COMMON":
        return common[s.name]
    if isinstance(s.shndx, int):
        base = where.get((oi, s.shndx))
        return None if base is None else base + s.value
    return None


def _extent(obj: ElfObject, s: Symbol, section_size: int) -> int:
    """Size of a symbol without one: up to the next symbol of its section, or the section's end."""
    later = [t.value for t in obj.symbols if t.shndx == s.shndx and t.value > s.value and t.kind != "STT_SECTION"]
    return (min(later) if later else section_size) - s.value


def _fentry_site(obj: ElfObject, sec: Section, buf: bytearray, base: int, r: Reloc) -> int:
    """A `call __fentry__` (clang's -pg -mfentry): record its address and make it the nop."""
    op = r.offset - 1
    if not sec.exec or r.type not in (R_X86_64_PC32, R_X86_64_PLT32) or op < 0 or buf[op] != 0xE8:
        found = buf[op] if 0 <= op < len(buf) else None
        raise ObjectError(
            f"{obj.name}: {sec.name}+{r.offset:#x} refers to {FENTRY} but is not a call to it "
            f"(opcode {found if found is None else hex(found)}, {RELOCATION_NAMES.get(r.type, r.type)})"
        )
    buf[op : op + 5] = FTRACE_NOP
    return base + op


def _apply(obj: ElfObject, sec: Section, buf: bytearray, base: int, r: Reloc, s_val: int, name: str) -> None:
    p = base + r.offset
    kind = RELOCATION_NAMES[r.type]
    width = 8 if r.type in (R_X86_64_64, R_X86_64_PC64) else 4
    if r.offset < 0 or r.offset + width > len(buf):
        raise ObjectError(f"{obj.name}: {kind} against {name} at {sec.name}+{r.offset:#x} lies outside the section")
    if r.type == R_X86_64_64:
        value, fmt = (s_val + r.addend) & (2**64 - 1), "<Q"
    elif r.type == R_X86_64_PC64:
        value, fmt = (s_val + r.addend - p) & (2**64 - 1), "<Q"
    elif r.type in (R_X86_64_PC32, R_X86_64_PLT32):
        value, fmt = s_val + r.addend - p, "<i"
        _fits(-(2**31) <= value < 2**31, obj, sec, r, name, value)
    elif r.type == R_X86_64_32:
        value, fmt = (s_val + r.addend) & (2**64 - 1), "<I"
        _fits(value < 2**32, obj, sec, r, name, value)
    else:  # R_X86_64_32S
        v = (s_val + r.addend) & (2**64 - 1)
        value = v - 2**64 if v >= 2**63 else v
        fmt = "<i"
        _fits(-(2**31) <= value < 2**31, obj, sec, r, name, value)
    struct.pack_into(fmt, buf, r.offset, value)


def _fits(ok: bool, obj: ElfObject, sec: Section, r: Reloc, name: str, value: int) -> None:
    if not ok:
        raise ObjectError(
            f"{obj.name}: {RELOCATION_NAMES[r.type]} against {name} at {sec.name}+{r.offset:#x} overflows "
            f"(value {value:#x}); kernel code needs -mcmodel=kernel -fno-pic"
        )


def _sections_named(objects: Sequence[ElfObject], where: dict, name: str):
    for oi, obj in enumerate(objects):
        for si, sec in obj.sections.items():
            if sec.name == name and (oi, si) in where:
                yield oi, obj, si, sec


def _table_u64(objects, where, images, name: str):
    for oi, obj, si, _sec in _sections_named(objects, where, name):
        buf = images[(oi, si)]
        if len(buf) % 8:
            raise ObjectError(f"{obj.name}: {name} is {len(buf)} bytes, not a whole number of 8-byte entries")
        for (addr,) in struct.iter_unpack("<Q", buf):
            yield oi, addr


#: the nops of a jump label, by length (Linux's x86 BYTES_NOP2 and BYTES_NOP5)
JUMP_NOPS = {2: bytes.fromhex("6690"), 5: FTRACE_NOP}


def _jump_entries(objects, where, images, in_text, text: bytearray, text_base: int) -> list[JumpEntry]:
    """The `__jump_table` entries, each checked against the instruction it names; the jmps of the
    entries marked off by default (key bit 1) become nops in `text` (objtool's step)."""
    out = []
    for oi, obj, si, _sec in _sections_named(objects, where, _JUMP_TABLE):
        buf, base = images[(oi, si)], where[(oi, si)]
        if len(buf) % 16:
            raise ObjectError(f"{obj.name}: {_JUMP_TABLE} is {len(buf)} bytes, not a whole number of 16-byte entries")
        for i in range(0, len(buf), 16):
            code, target, key = struct.unpack_from("<iiq", buf, i)
            e = base + i
            k = (e + 8 + key) & (2**64 - 1)
            at, to = e + code, e + 4 + target
            if not in_text(at, 2) or not in_text(to, 1):
                raise ObjectError(f"{obj.name}: {_JUMP_TABLE} entry {i // 16} points outside the kernel text")
            n = _jump_label_length(text, text_base, at, to, in_text)
            if n is None:
                got = bytes(text[at - text_base : at - text_base + 5])
                raise ObjectError(
                    f"{obj.name}: {_JUMP_TABLE} entry {i // 16} at {at:#x} holds {got.hex(' ')}: not a jmp to "
                    f"its target {to:#x} nor a 2- or 5-byte nop"
                )
            if k & 2:
                if text[at - text_base] not in (0xEB, 0xE9):
                    raise ObjectError(
                        f"{obj.name}: {_JUMP_TABLE} entry {i // 16} at {at:#x} asks for its jmp to become a nop, "
                        "but it is not a jmp"
                    )
                text[at - text_base : at - text_base + n] = JUMP_NOPS[n]
                k &= ~2
            out.append(JumpEntry(at, to, k & ~3, bool(k & 1), bool(k & 2), n))
    return out


def _jump_label_length(text: bytearray, text_base: int, at: int, to: int, in_text) -> int | None:
    """The length of the jump label instruction at `at`: a jmp to `to` or a nop, 2 or 5 bytes."""
    off = at - text_base
    if text[off] == 0xEB and in_text(at, 2) and at + 2 + struct.unpack_from("<b", text, off + 1)[0] == to:
        return 2
    if text[off] == 0xE9 and in_text(at, 5) and at + 5 + struct.unpack_from("<i", text, off + 1)[0] == to:
        return 5
    for n, nop in JUMP_NOPS.items():
        if in_text(at, n) and bytes(text[off : off + n]) == nop:
            return n
    return None


def _static_calls(objects, where, images, in_text, key_names) -> list[StaticCallSite]:
    out = []
    for oi, obj, si, _sec in _sections_named(objects, where, _STATIC_CALLS):
        buf, base = images[(oi, si)], where[(oi, si)]
        if len(buf) % 8:
            raise ObjectError(f"{obj.name}: {_STATIC_CALLS} is {len(buf)} bytes, not a whole number of 8-byte entries")
        for i in range(0, len(buf), 8):
            addr_off, key_off = struct.unpack_from("<ii", buf, i)
            addr = base + i + addr_off
            k = base + i + 4 + key_off
            if not in_text(addr, 5):
                raise ObjectError(f"{obj.name}: {_STATIC_CALLS} entry {i // 8} points outside the kernel text")
            out.append(StaticCallSite(addr, k & ~3, bool(k & 1), bool(k & 2), key_names.get(k & ~3, "")))
    return out


def _derived_static_calls(objects, where, images, symbols, known) -> list[StaticCallSite]:
    """Calls and tail jumps to `__SCT__name` trampolines, recorded as objtool records them."""
    seen = {c.addr for c in known}
    out = []
    for oi, obj in enumerate(objects):
        for si, sec in obj.sections.items():
            if not sec.exec or (oi, si) not in where:
                continue
            for r in sec.relocs:
                sym = obj.symbols[r.symbol]
                if not sym.name.startswith(_SCT) or r.type not in (R_X86_64_PC32, R_X86_64_PLT32):
                    continue
                op = r.offset - 1
                opcode = images[(oi, si)][op] if op >= 0 else None
                if opcode not in (0xE8, 0xE9):
                    continue  # taking the trampoline's address, not calling it
                addr = where[(oi, si)] + op
                if addr in seen or sec.name == ".static_call.text":
                    continue
                name = sym.name[len(_SCT) :]
                key = symbols.get(_SCK + name)
                if key is None:
                    raise ObjectError(f"{obj.name}: a call to {sym.name} has no key {_SCK}{name}")
                out.append(StaticCallSite(addr, key, opcode == 0xE9, False, name))
                seen.add(addr)
    return out
