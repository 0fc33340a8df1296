"""C objects compiled with the kernel's flags, loaded with --object: linking, sites, verdicts, bad input.

The objects under tests/objects/{gcc,zig}/ are ring.c (and flowtab.c) built by `textpoke cc` (BUILD.json says with
what); the bad objects are made here by editing bytes of the good one.
"""

from __future__ import annotations

import io
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from cpus.layout import TEXT_VA
from textpoke.cli import main
from textpoke.elfobj import FTRACE_NOP, ObjectError, link, read_object
from textpoke.image import KernelConfig, build_kernel
from textpoke.scenario import Scenario, run_scenario

OBJECTS = Path(__file__).resolve().parent / "objects"
GCC = OBJECTS / "gcc" / "ring.o"
ZIG = OBJECTS / "zig" / "ring.o"
RING_FUNCTIONS = {"ring_push", "ring_checksum", "ring_account", "textpoke_workload", "textpoke_nmi"}
QUICK = Scenario(cpus=3, warmup=2_000, settle=2_000)


def _kernel(path: Path):
    return build_kernel(KernelConfig(objects=(str(path),)))


@pytest.mark.parametrize("path", [GCC, ZIG], ids=["gcc", "zig"])
def test_ring_object_links_with_every_function_traced(path):
    """gcc's nops + __mcount_loc and clang's call __fentry__ both become nop sites, one per function."""
    k = _kernel(path)
    assert set(k.sites) == RING_FUNCTIONS
    assert k.site_table == tuple(sorted(k.sites.values()))
    for name, site in k.sites.items():
        assert k.symbols[name] <= site < k.symbols[name] + k.sizes[name]
        assert k.text[site - TEXT_VA : site - TEXT_VA + 5] == FTRACE_NOP
    # the workload loop calls the user's workload, the NMI handler the user's NMI callback
    from textpoke.callgraph import build_callgraph

    g = build_callgraph(k)
    assert g.has_edge("workload_main", "textpoke_workload")
    assert g.has_edge("nmi_handler", "textpoke_nmi")
    assert g.has_edge("textpoke_nmi", "ring_checksum")


@pytest.mark.parametrize("path", [GCC, ZIG], ids=["gcc", "zig"])
def test_jump_table_entry_is_parsed_in_linux_relative_format(path):
    k = _kernel(path)
    (entry,) = k.jump_entries
    assert entry.key == k.object_symbols["ring_stats"]
    assert not entry.branch and not entry.init
    fn = k.symbols["textpoke_workload"]
    assert fn <= entry.code < entry.target < fn + k.sizes["textpoke_workload"]
    # off: the loader made the near jmp the 2-byte nop (objtool's step)
    assert entry.length == 2
    assert k.text[entry.code - TEXT_VA : entry.code - TEXT_VA + 2] == b"\x66\x90"


@pytest.mark.parametrize("path", [GCC, ZIG], ids=["gcc", "zig"])
def test_relocations_resolve_to_the_placed_data(path):
    """Every memory operand of ring_account (R_X86_64_32S or PC32 to ring_sum/ring_max) lands on them."""
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    from capstone.x86 import X86_OP_MEM, X86_REG_RIP

    k = _kernel(path)
    cs = Cs(CS_ARCH_X86, CS_MODE_64)
    cs.detail = True
    start, size = k.symbols["ring_account"], k.sizes["ring_account"]
    targets = set()
    for insn in cs.disasm(k.text[start - TEXT_VA : start - TEXT_VA + size], start):
        for op in insn.operands:
            if op.type == X86_OP_MEM and insn.mnemonic != "nop":
                base = insn.address + insn.size if op.mem.base == X86_REG_RIP else 0
                targets.add((base + op.mem.disp) & (2**64 - 1))
    assert targets == {k.object_symbols["ring_sum"], k.object_symbols["ring_max"]}


@pytest.mark.parametrize("path", [GCC, ZIG], ids=["gcc", "zig"])
def test_bp_batch_is_safe_on_the_user_code_and_the_tracer_counts_its_calls(path):
    sc = replace(QUICK, protocol="bp-batch", objects=(str(path),), nmi="nested-safe", nmi_rate=300)
    out = run_scenario(sc, 1)
    assert out.verdict.ok, out.verdict.summary()
    acc = out.verdict.accounting
    assert acc["exact"]
    assert sum(r["ftrace_caller"] for r in acc["per_cpu"]) > 0  # enabled sites called the tracer


def test_naive_bytes_breaks_the_user_code():
    sc = replace(QUICK, protocol="naive-bytes", objects=(str(GCC),))
    bad = [s for s in range(3) if not run_scenario(sc, s).verdict.ok]
    assert bad


def test_callgraph_lists_the_object_functions(capsys):
    assert main(["callgraph", "--object", str(ZIG)]) == 0
    out = capsys.readouterr().out
    for name in ("ring_push", "ring_checksum", "ring_account", "textpoke_nmi"):
        assert name in out


# ------------------------------------------------------------------------------------------------
# flowtab.c: a second module, written from the README alone (a hash table, a static call, a key)
# ------------------------------------------------------------------------------------------------
FLOWTAB = {c: OBJECTS / c / "flowtab.o" for c in ("gcc", "zig")}
FLOWTAB_FUNCTIONS = {
    "flow_hash_jhash",
    "key_eq",
    "flow_lookup",
    "flow_insert",
    "flow_trace_miss",
    "textpoke_workload",
    "textpoke_nmi",
}


@pytest.mark.parametrize("compiler", ["gcc", "zig"])
def test_flowtab_lists_its_functions_static_call_and_key(compiler, capsys):
    k = _kernel(FLOWTAB[compiler])
    assert set(k.sites) == FLOWTAB_FUNCTIONS
    assert [c.key for c in k.static_calls] == [k.object_symbols["__SCK__flow_hash"]]
    assert {e.key for e in k.jump_entries} == {k.object_symbols["flow_trace"]}
    assert main(["callgraph", "--object", str(FLOWTAB[compiler])]) == 0
    out = capsys.readouterr().out
    for name in FLOWTAB_FUNCTIONS:
        assert name in out


@pytest.mark.parametrize("compiler", ["gcc", "zig"])
def test_flowtab_is_safe_under_bp_batch(compiler):
    """key_eq dereferences rsi right after its ftrace site: an #BP entry that loses the interrupted
    rsi (as one did, loading its mode into esi before saving it) crashes here in every seed."""
    sc = replace(QUICK, protocol="bp-batch", objects=(str(FLOWTAB[compiler]),))
    out = run_scenario(sc, 0)
    assert out.verdict.ok, out.verdict.summary()
    assert out.verdict.accounting["exact"]


@pytest.mark.parametrize("client", ["ftrace", "jump-label"])
def test_flowtab_breaks_under_naive_bytes(client):
    sc = replace(QUICK, protocol="naive-bytes", client=client, objects=(str(FLOWTAB["gcc"]),))
    bad = [s for s in range(3) if not run_scenario(sc, s).verdict.ok]
    assert bad


def test_flowtab_jump_label_is_safe_under_bp_batch():
    sc = replace(QUICK, protocol="bp-batch", client="jump-label", objects=(str(FLOWTAB["zig"]),))
    out = run_scenario(sc, 0)
    assert out.verdict.ok, out.verdict.summary()


# ------------------------------------------------------------------------------------------------
# bad objects
# ------------------------------------------------------------------------------------------------
def _elf(raw: bytes) -> ELFFile:
    return ELFFile(io.BytesIO(raw))


def _section_header(raw: bytes, name: str) -> int:
    elf = _elf(raw)
    for i, sec in enumerate(elf.iter_sections()):
        if sec.name == name:
            return elf["e_shoff"] + i * elf["e_shentsize"]
    raise AssertionError(name)


def _symbol_entry(raw: bytes, name: str) -> int:
    elf = _elf(raw)
    tab = elf.get_section_by_name(".symtab")
    for i, s in enumerate(tab.iter_symbols()):
        if s.name == name:
            return tab["sh_offset"] + i * 24
    raise AssertionError(name)


def _set_rela_type(raw: bytes, section: str, symbol: str, new_type: int) -> bytes:
    elf = _elf(raw)
    rela = elf.get_section_by_name(section)
    names = [s.name for s in elf.get_section_by_name(".symtab").iter_symbols()]
    out = bytearray(raw)
    for i, r in enumerate(rela.iter_relocations()):
        if names[r["r_info_sym"]] == symbol:
            struct.pack_into("<Q", out, rela["sh_offset"] + i * 24 + 8, (r["r_info_sym"] << 32) | new_type)
            return bytes(out)
    raise AssertionError(symbol)


def _not_elf(raw: bytes) -> bytes:
    return b"!<arch>\n" + raw[8:]


def _wrong_machine(raw: bytes) -> bytes:
    return raw[:18] + struct.pack("<H", 183) + raw[20:]  # EM_AARCH64


def _undefined(raw: bytes) -> bytes:
    out = bytearray(raw)
    struct.pack_into("<H", out, _symbol_entry(raw, "ring_sum") + 6, 0)  # st_shndx = SHN_UNDEF
    return bytes(out)


def _gotpcrel(raw: bytes) -> bytes:
    return _set_rela_type(raw, ".rela.text", "ring_max", 9)  # R_X86_64_GOTPCREL


def _overflow(raw: bytes) -> bytes:
    return _set_rela_type(raw, ".rela.text", "ring_max", 10)  # R_X86_64_32: kernel addresses are above 4 GiB


def _overlap(raw: bytes) -> bytes:
    out = bytearray(raw)
    text_off = struct.unpack_from("<Q", raw, _section_header(raw, ".text") + 24)[0]
    struct.pack_into("<Q", out, _section_header(raw, "__jump_table") + 24, text_off + 8)
    return bytes(out)


def _bad_mcount(raw: bytes) -> bytes:
    elf = _elf(raw)
    text = elf.get_section_by_name(".text")["sh_offset"]
    assert raw[text : text + 5] == FTRACE_NOP  # ring_push's site, listed in __mcount_loc
    return raw[:text] + b"\x90" * 5 + raw[text + 5 :]


def _executable(raw: bytes) -> bytes:
    return raw[:16] + struct.pack("<H", 2) + raw[18:]  # ET_EXEC


BAD = {
    "not-elf": (_not_elf, "not an ELF file"),
    "not-relocatable": (_executable, "not a relocatable object"),
    "wrong-machine": (_wrong_machine, "not x86-64"),
    "undefined-symbol": (_undefined, "undefined symbol: ring_sum"),
    "unhandled-relocation": (_gotpcrel, "R_X86_64_GOTPCREL against ring_max"),
    "relocation-overflow": (_overflow, "R_X86_64_32 against ring_max"),
    "overlapping-section": (_overlap, "overlap"),
    "mcount-not-a-nop": (_bad_mcount, "not a call to __fentry__ nor the 5-byte nop"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_object_is_refused_with_a_clear_error_and_exit_2(kind, tmp_path, capsys):
    make, words = BAD[kind]
    bad = tmp_path / f"{kind}.o"
    bad.write_bytes(make(GCC.read_bytes()))
    with pytest.raises(ObjectError, match=words.replace("(", r"\(")):
        build_kernel(KernelConfig(objects=(str(bad),)))
    report = tmp_path / "out.json"
    code = main(["safety", "--object", str(bad), "--seeds", "1", "--jobs", "1", "--quiet", "--json", str(report)])
    assert code == 2
    err = capsys.readouterr().err.replace("\n", "")  # rich wraps long lines
    assert "error" in err and str(bad.name) in err and "Traceback" not in err
    assert not report.exists()  # nothing half-done


def test_clang_call_to_fentry_must_be_a_call(tmp_path):
    raw = bytearray(ZIG.read_bytes())
    text = _elf(bytes(raw)).get_section_by_name(".text")["sh_offset"]
    assert raw[text] == 0xE8  # call __fentry__, as clang leaves it
    raw[text] = 0xE9  # a jmp to __fentry__ is not a site
    with pytest.raises(ObjectError, match="not a call to it"):
        read = read_object(bytes(raw), "jmp.o")
        link([read], TEXT_VA, 0xFFFFFFFF82100000)


def test_a_failed_load_leaves_nothing_behind(tmp_path):
    """A refused object, then the good one at the same path: the error named the problem, and the
    kernel built next is the good one (no cached half-loaded kernel)."""
    path = tmp_path / "ring.o"
    path.write_bytes(_undefined(GCC.read_bytes()))
    with pytest.raises(ObjectError, match="ring_sum"):
        _kernel(path)
    path.write_bytes(GCC.read_bytes())
    assert set(_kernel(path).sites) == RING_FUNCTIONS


def test_two_objects_defining_one_symbol_is_an_error(tmp_path):
    with pytest.raises(ObjectError, match="also defined"):
        build_kernel(KernelConfig(objects=(str(GCC), str(ZIG))))


def test_object_without_textpoke_workload_is_an_error(tmp_path):
    raw = bytearray(GCC.read_bytes())
    struct.pack_into("<H", raw, _symbol_entry(bytes(raw), "textpoke_workload") + 6, 0)
    bad = tmp_path / "noworkload.o"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ObjectError, match="textpoke_workload"):
        build_kernel(KernelConfig(objects=(str(bad),)))


# ------------------------------------------------------------------------------------------------
# building: the committed objects are what the compilers make of ring.c, byte for byte
# ------------------------------------------------------------------------------------------------
def _zig() -> bool:
    try:
        import ziglang  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "compiler,present",
    [("gcc", shutil.which("gcc") is not None), ("zig", _zig())],
)
def test_committed_objects_are_reproducible(compiler, present, tmp_path):
    if not present:
        pytest.skip(f"{compiler} is not installed")
    import json

    from textpoke.cc import compile_objects, find_compiler

    cc = find_compiler(compiler)
    recorded = json.loads((OBJECTS / compiler / "BUILD.json").read_text())
    if cc.version != recorded["compiler"]["version"]:
        pytest.skip(f"{compiler} {cc.version} is not the recorded {recorded['compiler']['version']}")
    record = compile_objects([OBJECTS / s for s in recorded["sources"]], tmp_path, cc)
    for name in ("ring.o", "pktfilter.o"):
        assert (tmp_path / name).read_bytes() == (OBJECTS / compiler / name).read_bytes()
    assert json.loads(json.dumps(record)) == recorded


def test_accounting_catches_a_tracer_that_loses_calls():
    """Mutation: drop one site from the trampoline's table; the oracle reports the calls it lost."""
    from cpus import Machine, MachineConfig
    from cpus.layout import IMAGE_DATA_VA
    from textpoke.image import SITE_TABLE
    from textpoke.oracle import SafetyOracle
    from textpoke.patcher import Patcher
    from textpoke.scenario import drain

    def run(kernel):
        oracle = SafetyOracle(kernel, 3)
        m = Machine(MachineConfig(cpus=3, seed=0), kernel.boot_image(), [oracle])
        oracle.attach(m)
        m.watch(kernel.sites.values())
        patcher = Patcher(m, kernel)
        patcher.listeners.append(oracle)
        m.run(2_000)
        patcher.enable_ftrace(sorted(kernel.sites.values()), protocol="bp-batch")
        m.run(4_000)
        assert drain(m)
        return oracle.verdict(m, 0, True)

    good = _kernel(GCC)
    assert run(good).ok
    table = SITE_TABLE - IMAGE_DATA_VA  # offset of the table in the data image
    i = good.site_table.index(good.sites["ring_push"])
    data = bytearray(good.data_init)
    data[table + 8 * i : table + 8 * i + 8] = bytes(8)
    verdict = run(replace(good, data_init=bytes(data)))
    assert verdict.counts["missed-call"] and not verdict.accounting["exact"]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_object_from_the_plain_gcc_ftrace_command_loads(tmp_path):
    """The flags without our extras (-mgeneral-regs-only, -g0, no unwind tables) give a loadable object."""
    import subprocess

    from textpoke.cc import include_dir

    obj = tmp_path / "ring.o"
    flags = "-O2 -pg -mfentry -mrecord-mcount -mnop-mcount -mcmodel=kernel -fno-pic -mno-red-zone -ffreestanding"
    cmd = ["gcc", *flags.split(), "-fno-stack-protector", f"-I{include_dir()}", "-c", str(OBJECTS / "ring.c")]
    subprocess.run([*cmd, "-o", str(obj)], check=True)
    assert set(_kernel(obj).sites) == RING_FUNCTIONS


@pytest.mark.skipif(not _zig(), reason="ziglang is not installed")
def test_object_from_the_plain_zig_command_loads(tmp_path):
    """zig cc with only the ftrace flags: debug info and unwind tables are ignored, calls become nops."""
    import subprocess
    import sys

    from textpoke.cc import include_dir

    obj = tmp_path / "ring.o"
    flags = "-target x86_64-freestanding-none -O2 -pg -mfentry -mcmodel=kernel -fno-pic -mno-red-zone"
    cmd = [sys.executable, "-m", "ziglang", "cc", *flags.split(), f"-I{include_dir()}", "-c", str(OBJECTS / "ring.c")]
    subprocess.run([*cmd, "-o", str(obj)], check=True)
    k = _kernel(obj)
    assert set(k.sites) == RING_FUNCTIONS
    assert b"\xe8" not in {k.text[s - TEXT_VA : s - TEXT_VA + 1] for s in k.sites.values()}


@pytest.mark.parametrize("compiler", ["gcc", "zig"])
def test_static_call_and_likely_branch_records(compiler):
    """pktfilter.c: a call through static_call(filter) and a static_branch_likely on a true key."""
    k = _kernel(OBJECTS / compiler / "pktfilter.o")
    (call,) = k.static_calls
    assert call.name == "filter" and not call.tail
    assert call.key == k.object_symbols["__SCK__filter"]
    tramp = k.symbols["__SCT__filter"]
    assert k.text[call.addr - TEXT_VA] == 0xE8
    rel = struct.unpack_from("<i", k.text, call.addr - TEXT_VA + 1)[0]
    assert call.addr + 5 + rel == tramp
    # the trampoline jumps to the key's function
    rel = struct.unpack_from("<i", k.text, tramp - TEXT_VA + 1)[0]
    assert k.text[tramp - TEXT_VA] == 0xE9 and tramp + 5 + rel == k.symbols["drop_telnet"]
    (jump,) = k.jump_entries
    assert jump.branch and jump.key == k.object_symbols["filter_on"]
    assert "__SCT__filter" not in k.sites  # the trampoline is notrace


def test_static_call_sites_section_is_parsed():
    """An object carrying .static_call_sites itself: (s32 call, s32 key|flags), each relative to its field."""
    from textpoke.elfobj import R_X86_64_PC32, ElfObject, Reloc, Section, Symbol

    text = Section(1, ".text", bytes.fromhex("0f1f440000 e900000000 c3"), 16, True, False)
    sites = Section(2, ".static_call_sites", bytes(8), 4, False, False)
    key = Section(3, ".data", bytes(8), 8, False, True)
    symbols = [
        Symbol("", 0, 0, "STT_NOTYPE", "STB_LOCAL", "SHN_UNDEF"),
        Symbol(".text", 0, 0, "STT_SECTION", "STB_LOCAL", 1),
        Symbol("__SCK__tick", 0, 8, "STT_OBJECT", "STB_GLOBAL", 3),
        Symbol("fn", 0, 11, "STT_FUNC", "STB_GLOBAL", 1),
    ]
    sites.relocs += [Reloc(0, R_X86_64_PC32, 1, 5), Reloc(4, R_X86_64_PC32, 2, 1)]  # key | TAIL
    text.relocs += [Reloc(6, R_X86_64_PC32, 3, -4)]
    obj = ElfObject("synthetic.o", {1: text, 2: sites, 3: key}, symbols)
    linked = link([obj], TEXT_VA, 0xFFFFFFFF82100000)
    (site,) = linked.static_calls
    assert site.addr == TEXT_VA + 5 and site.tail and not site.init
    assert site.key == linked.symbols["__SCK__tick"] and site.name == "tick"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_sse_code_is_refused_naming_function_and_instruction(tmp_path):
    """pktfilter.c with gcc's plain ftrace flags: gcc copies a struct through %xmm0."""
    import subprocess

    from textpoke.cc import include_dir

    obj = tmp_path / "pktfilter.o"
    flags = "-O2 -pg -mfentry -mrecord-mcount -mnop-mcount -mcmodel=kernel -fno-pic -mno-red-zone -ffreestanding"
    cmd = ["gcc", *flags.split(), "-fno-stack-protector", f"-I{include_dir()}", "-c", str(OBJECTS / "pktfilter.c")]
    subprocess.run([*cmd, "-o", str(obj)], check=True)
    with pytest.raises(ObjectError, match=r"make_pkt: \w+ at 0x[0-9a-f]+ uses SSE.*-mgeneral-regs-only"):
        _kernel(obj)
