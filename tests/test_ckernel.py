"""The C kernel (`--kernel c`): the built-in workload and traced functions compiled from textpoke/c/kernel.c."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from textpoke.cli import main
from textpoke.image import ImageError, KernelConfig, Percpu, _build_with_objects, build_kernel
from textpoke.scenario import Scenario, run_scenario

C_DIR = Path(__file__).resolve().parents[1] / "textpoke" / "c"


def test_c_sources_use_the_per_cpu_offsets_of_the_image():
    defines = dict(re.findall(r"#define PCPU_(\w+) (0x[0-9a-f]+)", (C_DIR / "kernel.c").read_text()))
    assert defines
    for name, value in defines.items():
        assert getattr(Percpu, name) == int(value, 16), name


def test_c_kernel_traces_the_first_nr_traced_functions_in_index_order():
    k = build_kernel(KernelConfig(kernel="c", nr_traced=8))
    assert list(k.sites) == [f"fn_{i:03d}" for i in range(8)]
    assert k.site_table == tuple(k.sites.values())
    assert "fn_008" in k.symbols and "fn_008" not in k.sites  # present, not traced
    assert not k.user_code  # the C workload counts its calls: the full accounting applies
    assert "textpoke_workload" not in k.sites  # notrace, as the asm workload has no site


def test_default_kernel_is_still_the_assembly_one():
    assert Scenario().kernel == "asm"
    k = build_kernel()
    assert not k.foreign and k.symbols["fn_000"] == k.traced_base


def test_c_kernel_is_safe_with_bp_batch_and_its_accounting_is_exact():
    sc = Scenario(cpus=3, kernel="c", nmi="nested-safe", nmi_rate=300, warmup=2_000, settle=2_000)
    v = run_scenario(sc, 2).verdict
    assert v.ok, v.summary()
    assert v.accounting["exact"]
    rows = v.accounting["per_cpu"]
    assert all(r["calls"] == r["site_executions"] for r in rows)
    assert sum(r["calls"] for r in rows) > 0


def test_c_kernel_calls_at_both_stack_alignments_so_a_missing_gap_is_caught():
    sc = Scenario(cpus=3, kernel="c", int3="emulate-nogap", warmup=2_000, settle=2_000)
    assert any(not run_scenario(sc, s).verdict.ok for s in range(3))


def test_c_kernel_and_objects_exclude_each_other(capsys):
    with pytest.raises(ImageError, match="pick one"):
        KernelConfig(kernel="c", objects=("x.o",))
    assert main(["safety", "--kernel", "c", "--object", "x.o", "--seeds", "1", "--quiet"]) == 2


def test_committed_c_kernel_records_how_it_was_built():
    record = json.loads((C_DIR / "BUILD.json").read_text())
    assert record["sources"] == ["kernel.c"]
    assert {"-pg", "-mfentry", "-mcmodel=kernel", "-mno-red-zone"} <= set(record["compiler"]["flags"])
    import hashlib

    assert hashlib.sha256((C_DIR / "kernel.o").read_bytes()).hexdigest() == record["objects"]["kernel.o"]


def test_c_kernel_rebuilds_to_the_same_bytes(tmp_path):
    from textpoke.cc import compile_objects, kernel_compiler

    record = json.loads((C_DIR / "BUILD.json").read_text())
    name = record["compiler"]["name"]
    if name == "gcc" and not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    cc = kernel_compiler(name)
    if cc.version != record["compiler"]["version"]:
        pytest.skip(f"{cc.version} is not the recorded {record['compiler']['version']}")
    compile_objects([C_DIR / "kernel.c"], tmp_path, cc)
    assert (tmp_path / "kernel.o").read_bytes() == (C_DIR / "kernel.o").read_bytes()


def test_c_kernel_built_by_zig_loads(tmp_path):
    pytest.importorskip("ziglang")
    from textpoke.cc import compile_objects, find_compiler

    compile_objects([C_DIR / "kernel.c"], tmp_path, find_compiler("zig"))
    blob = (tmp_path / "kernel.o").read_bytes()
    k = _build_with_objects(KernelConfig(kernel="c", nr_traced=16), (("zig/kernel.o", blob),))
    assert list(k.sites) == [f"fn_{i:03d}" for i in range(16)]
