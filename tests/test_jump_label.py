"""The jump-label client: static keys in the C kernel, both sizes, the protocols, the #BP handler's
jmp8 emulation (and its mutation), and the per-CPU, per-key accounting of the branches."""

from __future__ import annotations

import struct

import pytest

from cpus import ConfigError
from cpus.layout import TEXT_VA
from textpoke import patcher as patcher_module
from textpoke.clients import resolve_client
from textpoke.clients.jump_label import jump_bytes, key_index
from textpoke.elfobj import JUMP_NOPS
from textpoke.image import JL_KEYS, KernelConfig, Percpu, build_kernel
from textpoke.latency import LatencyConfig, measure
from textpoke.scenario import Scenario, run_scenario

JL = resolve_client("jump-label")


def _kernel(n: int = 64):
    return build_kernel(KernelConfig(nr_traced=n, kernel="c"))


def _scenario(**kw) -> Scenario:
    return Scenario(**({"client": "jump-label", "kernel": "c", "cpus": 3, "sites": 8} | kw))


def test_c_kernel_has_jump_labels_of_both_sizes_as_the_loader_left_them():
    k = _kernel()
    entries = {key_index(k, e): e for e in k.jump_entries}
    assert sorted(entries) == list(range(JL_KEYS))
    assert {e.length for e in entries.values()} == {2, 5}
    patchable = k.patchable
    for n, e in entries.items():
        code = k.text[e.code - TEXT_VA : e.code - TEXT_VA + e.length]
        assert patchable[e.code] == code
        fn = k.symbols[f"fn_{n:03d}"]
        assert fn < e.code < fn + k.sizes[f"fn_{n:03d}"]
        assert k.text[e.code - 2 - TEXT_VA : e.code - TEXT_VA] != b"\xeb\x00"  # no block break before it
        # off by default: unlikely branches are the nop (the loader's objtool step), likely ones the jmp
        assert code == jump_bytes(e, e.branch)
        assert e.branch == (n % 8 == 7)
        if e.length == 5:  # far: the branch was moved out of line, into .text.unlikely
            assert k.function_at(e.code) is None and not fn <= e.target < fn + k.sizes[f"fn_{n:03d}"]
    assert b"\x66\x90" in {patchable[e.code] for e in entries.values()}
    assert JUMP_NOPS[5] in {patchable[e.code] for e in entries.values()}
    # the client's sites: one per key, the first --sites keys
    assert JL.sites(_kernel(8)) == [entries[n].code for n in range(8)]


@pytest.mark.parametrize("protocol", ["bp-batch", "bp"])
def test_int3_protocols_switch_the_keys_safely_and_the_branches_add_up(protocol):
    for seed in (0, 1):
        out = run_scenario(_scenario(protocol=protocol), seed, keep_machine=True)
        v = out.verdict
        assert v.ok, v.summary()
        assert v.accounting["exact"] is True
        taken = sum(r["branches_taken"] for r in v.accounting["per_cpu"])
        assert taken > 0 and taken == sum(r["branches_taken_expected"] for r in v.accounting["per_cpu"])
        assert [len(r.syncs) for r in out.reports] == ([3, 3] if protocol == "bp-batch" else [24, 24])
        # every key was switched on and back off: the text is as it booted, the keys are off
        m, k = out.machine, _kernel(8)
        for s in JL.sites(k):
            assert m.read(s, len(k.patchable[s])) == k.patchable[s]
        m.close()


def test_the_enable_operation_leaves_the_keys_on():
    out = run_scenario(_scenario(operation="enable"), 0, keep_machine=True)
    assert out.verdict.ok, out.verdict.summary()
    m, k = out.machine, _kernel(8)
    by_site = {e.code: e for e in k.jump_entries}
    for s in JL.sites(k):
        e = by_site[s]
        assert m.read(s, e.length) == jump_bytes(e, not e.branch)
        assert struct.unpack("<i", m.read(e.key, 4))[0] == 1  # static_key_enabled
    m.close()


def test_naive_bytes_is_caught_on_a_5_byte_site():
    v = run_scenario(_scenario(protocol="naive-bytes", sites=16, patch_sites=(1, 9)), 0).verdict
    assert v.counts["torn-fetch"] and v.counts["crash"]


def test_int3_handler_without_jmp8_dies_on_2_byte_sites_only():
    """The handler from before 2-byte jump labels: emulates 5-byte instructions only."""
    k = _kernel(16)
    sites = JL.sites(k)
    lengths = [len(k.patchable[s]) for s in sites]
    two = [i for i, n in enumerate(lengths) if n == 2][:4]
    five = [i for i, n in enumerate(lengths) if n == 5]
    caught = run_scenario(_scenario(int3="emulate-no-jmp8", sites=16, patch_sites=tuple(two)), 0).verdict
    assert caught.counts["unhandled-int3"] >= 1
    assert all(len(k.patchable[v.site]) == 2 for v in caught.violations if v.kind == "unhandled-int3")
    fine = run_scenario(_scenario(int3="emulate-no-jmp8", sites=16, patch_sites=tuple(five)), 0).verdict
    assert fine.ok, fine.summary()


def test_accounting_catches_a_handler_that_emulates_the_jmp_as_a_nop(monkeypatch):
    real = patcher_module._decode_for_int3

    def jmp_as_nop(req):
        opcode, target = real(req)
        if req.new[0] in (0xEB, 0xE9):
            return opcode, req.site + len(req.new)  # continue after the site: the branch is lost
        return opcode, target

    monkeypatch.setattr(patcher_module, "_decode_for_int3", jmp_as_nop)
    v = run_scenario(_scenario(cpus=4), 0).verdict
    assert v.counts["branch-miscount"] >= 1
    assert set(v.counts) == {"branch-miscount"}, v.summary()


def test_accounting_catches_a_corrupted_count():
    class Corrupt:
        """An instrument that adds one to CPU 1's count of key 0 when the first operation ends."""

        machine = None
        done = False

        def on_op_start(self, op, time):
            pass

        def on_op_end(self, op, time):
            if not self.done:
                self.done = True
                m = self.machine
                va = m.layout.percpu_va(1) + Percpu.JL_TAKEN
                m.write(va, struct.pack("<Q", m.read_u64(va) + 1))

    v = run_scenario(_scenario(), 0, extra_instruments=[Corrupt()]).verdict
    assert v.counts["branch-miscount"] == 1
    (bad,) = [x for x in v.violations if x.kind == "branch-miscount"]
    assert bad.cpu == 1 and bad.site == JL.sites(_kernel(8))[0]


def test_bad_configurations_are_refused():
    with pytest.raises(ConfigError, match="64 static keys"):
        _scenario(sites=65)
    with pytest.raises(ConfigError, match="patched with"):
        _scenario(protocol="stop-machine-ftrace")
    with pytest.raises(ConfigError, match="--kernel c"):
        Scenario(client="jump-label", kernel="asm")
    with pytest.raises(ConfigError, match="ftrace-linux"):
        LatencyConfig(client="jump-label", protocol="ftrace-linux")
    with pytest.raises(ConfigError, match="compiled code only"):
        Scenario(int3="emulate-no-jmp8")  # the assembly kernel has no 2-byte sites, nor this entry


@pytest.mark.parametrize("protocol,syncs", [("bp", 15), ("bp-batch", 3)])
def test_latency_counts_three_syncs_per_key_one_by_one_and_three_batched(protocol, syncs):
    row = measure(LatencyConfig(client="jump-label", kernel="c", protocol=protocol, cpus=3, sites=5, functions=8))
    assert row.syncs == syncs and row.client == "jump-label"
    assert row.ipis == 2 * syncs


def test_latency_command_takes_the_client_and_its_json_says_so(tmp_path):
    import json

    from textpoke.cli import main

    out = tmp_path / "lat.json"
    argv = ["latency", "--client", "jump-label", "--protocols", "bp", "bp-batch", "--cpus", "2", "--sites", "2"]
    argv += ["--seeds", "1", "--jobs", "1", "--quiet", "--json", str(out), "--out", str(tmp_path / "plots")]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert data["client"] == "jump-label"
    assert [(r["protocol"], r["syncs"], r["client"]) for r in data["rows"]] == [
        ("bp", 6, "jump-label"),
        ("bp-batch", 3, "jump-label"),
    ]


def _ring_with_jump_label_bytes(new: bytes) -> bytes:
    """tests/objects/gcc/ring.o with the instruction of its one jump label (a near jmp `eb rel8`,
    where the code field of its `__jump_table` entry points) replaced by `new`."""
    import io
    from pathlib import Path

    from elftools.elf.elffile import ELFFile

    raw = bytearray((Path(__file__).resolve().parent / "objects" / "gcc" / "ring.o").read_bytes())
    elf = ELFFile(io.BytesIO(bytes(raw)))
    text = elf.get_section_by_name(".text")
    (code,) = [r for r in elf.get_section_by_name(".rela__jump_table").iter_relocations() if r["r_offset"] == 0]
    at = text["sh_offset"] + code["r_addend"]
    assert raw[at] == 0xEB
    raw[at : at + 2] = new
    return bytes(raw)


@pytest.mark.parametrize(
    "new,words",
    [
        (b"\x90\x90", "holds 90 90 .*: not a jmp to its target 0x[0-9a-f]+ nor a 2- or 5-byte nop"),
        (b"\x66\x90", "asks for its jmp to become a nop, but it is not a jmp"),
    ],
)
def test_loader_refuses_a_jump_label_that_does_not_hold_its_instruction(new, words):
    from textpoke.elfobj import ObjectError, link, read_object

    obj = read_object(_ring_with_jump_label_bytes(new), "bad.o")
    with pytest.raises(ObjectError, match=words):
        link([obj], TEXT_VA, 0xFFFFFFFF82100000)
