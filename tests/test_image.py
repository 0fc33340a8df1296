"""The kernel image: assembled from the asm sources, checked by capstone, laid out as promised."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cpus.layout import TEXT_VA
from textpoke.image import (
    FN_SHIFT,
    FTRACE_NOP,
    ImageError,
    KernelConfig,
    Unit,
    _assemble,
    build_kernel,
    call_bytes,
    parse_units,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_traced_function_starts_with_the_ftrace_nop(kernel):
    """Each traced function's first five bytes are 0f 1f 44 00 00, at a fixed stride."""
    assert len(kernel.sites) == kernel.config.nr_traced
    for i, (name, site) in enumerate(sorted(kernel.sites.items())):
        assert site == kernel.traced_base + (i << FN_SHIFT)
        assert kernel.text[site - TEXT_VA : site - TEXT_VA + 5] == FTRACE_NOP
        assert kernel.symbols[name] == site


def test_keystone_misencodes_the_memory_nop_so_sites_are_raw_bytes():
    """Why FTRACE_NOP is emitted as .byte: keystone turns the 5-byte nop into something else."""
    got = _assemble(Unit("x", ""), "nop dword ptr [rax + rax*1 + 0]", TEXT_VA)
    assert got != FTRACE_NOP


def test_call_encoding_round_trips_through_capstone(kernel):
    from cpus.disasm import disasm

    site = kernel.site_of(3)
    target = kernel.symbols["ftrace_caller"]
    ((_addr, raw, text),) = disasm(call_bytes(site, target), site)
    assert raw[0] == 0xE8 and text == f"call {target:#x}"


def test_iretq_and_popfq_sites_are_found(kernel):
    for a in kernel.iret_sites:
        assert kernel.text[a - TEXT_VA : a - TEXT_VA + 2] == b"\x48\xcf"
    assert kernel.symbols["native_iret"] in kernel.iret_sites
    for a in kernel.popf_sites:
        assert kernel.text[a - TEXT_VA] == 0x9D


def _image_with(kernel, name, code: bytes):
    start = kernel.symbols[name]
    text = bytearray(kernel.text)
    text[start - TEXT_VA : start - TEXT_VA + len(code)] = code
    img = build_kernel.__wrapped__(kernel.config)
    img.text = bytes(text)
    img.sizes = dict(kernel.sizes, **{name: len(code)})
    return img


@pytest.mark.parametrize(
    "name, code, message",
    [
        ("idle_main", bytes.fromhex("fbeb00"), "sti"),  # sti; jmp
        ("idle_main", bytes.fromhex("e8000000c0c3"), "no symbol"),  # call to nowhere
        ("idle_main", bytes.fromhex("90"), "fall through"),
        ("idle_main", bytes.fromhex("48cfc3"), "only instruction"),
        ("fn_002", bytes.fromhex("0f18240090c3"), "not the ftrace nop"),  # what keystone makes of it
    ],
)
def test_verify_rejects_what_the_machine_cannot_rely_on(kernel, name, code, message):
    img = _image_with(kernel, name, code)
    with pytest.raises(ImageError, match=message):
        verify(img)


def test_source_errors_are_named():
    with pytest.raises(ImageError, match="outside SYM_FUNC"):
        parse_units("    ret\n", "x.S")
    with pytest.raises(ImageError, match="no SYM_FUNC_END"):
        parse_units("SYM_FUNC_START(f)\n ret\n", "x.S")
    with pytest.raises(ImageError, match="does not close"):
        parse_units("SYM_FUNC_START(f)\n ret\nSYM_FUNC_END(g)\n", "x.S")


def test_bad_kernel_config_is_named():
    with pytest.raises(ImageError, match="nr_traced"):
        KernelConfig(nr_traced=0)
    with pytest.raises(ImageError, match="nmi_funcs"):
        KernelConfig(nmi_funcs=3)


def test_dependency_rules():
    """Only cpus/_unicorn.py imports unicorn; cpus never imports textpoke."""
    for path in list((ROOT / "cpus").glob("*.py")) + list((ROOT / "textpoke").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        if path.name != "_unicorn.py":
            assert "unicorn" not in names, f"{path} imports unicorn"
        if path.parent.name == "cpus":
            assert "textpoke" not in names, f"{path} imports textpoke"
