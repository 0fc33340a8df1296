"""kprobes and optprobes: the probe kernel, the kprobe/optprobe protocols, the #BP handler chain, the
slot grace period and the optprobe wait, each proven by a mutation the oracle catches."""

from __future__ import annotations

import pytest

from cpus import ConfigError, Machine, MachineConfig, SnoopModel
from cpus.layout import TEXT_VA
from textpoke.image import FTRACE_NOP, KernelConfig, Percpu, build_kernel
from textpoke.kprobes import out_of_line_problem
from textpoke.patcher import Patcher, PatchError
from textpoke.protocols import (
    FreeSlot,
    GracePeriod,
    KprobeRegister,
    KprobeUnregister,
    PatchRequest,
    Poke,
    Publish,
    Sync,
    build,
)
from textpoke.scenario import Scenario, run_scenario

MOV = bytes.fromhex("4889fb")  # mov rbx, rdi: every traced function's kprobe point
ARMED = b"\xcc" + MOV[1:]


def _probe_kernel(n: int = 4):
    return build_kernel(KernelConfig(nr_traced=n, nmi_funcs=2, probes=True))


# ------------------------------------------------------------------------------------------------
# The probe kernel
# ------------------------------------------------------------------------------------------------
def test_every_traced_function_has_a_kprobe_point_and_an_optprobe_range_off_its_ftrace_site():
    k = _probe_kernel()
    assert len(k.kprobe_points) == len(k.optprobe_ranges) == 4
    for (kp, n), (op, m), site in zip(k.kprobe_points, k.optprobe_ranges, k.site_table, strict=True):
        assert kp != site and op != site and kp in k.boundaries and op in k.boundaries
        assert n == 3 and k.text[kp - TEXT_VA : kp - TEXT_VA + n] == MOV
        assert m >= 5 and op + m <= site + 64  # whole instructions covering the jmp rel32, in the function
        assert k.patchable[kp] == MOV and len(k.patchable[op]) == 5
    plain = build_kernel(KernelConfig(nr_traced=4, nmi_funcs=2))
    assert not plain.kprobe_points and "kprobe_int3_handler" not in plain.symbols  # ftrace kernels unchanged


def test_out_of_line_rules():
    assert out_of_line_problem(MOV, 0x1000) is None
    assert "transfers control" in out_of_line_problem(b"\xc3", 0x1000)  # ret
    assert "transfers control" in out_of_line_problem(b"\xeb\x00", 0x1000)  # jmp
    assert "rip-relative" in out_of_line_problem(bytes.fromhex("488b0500000000"), 0x1000)  # mov rax, [rip]


# ------------------------------------------------------------------------------------------------
# The protocols, as steps
# ------------------------------------------------------------------------------------------------
def test_kprobe_protocol_is_linux_one_byte_path():
    arm = (PatchRequest(0x1000, MOV, ARMED),)
    assert build("kprobe", arm) == (KprobeRegister(0x1000), Poke(0x1000, 0, b"\xcc", "int3"), Sync("int3"))
    disarm = (PatchRequest(0x1000, ARMED, MOV),)
    steps = build("kprobe", disarm)
    assert steps == (
        Poke(0x1000, 0, MOV[:1], "first"),
        Sync("first"),
        KprobeUnregister(0x1000),
        GracePeriod("slots"),
        FreeSlot(0x1000),
    )
    assert GracePeriod("slots") not in build("kprobe", disarm, "kprobe-slot-freed-early")
    with pytest.raises(ValueError, match="only inserts an int3"):
        build("kprobe", (PatchRequest(0x1000, FTRACE_NOP, b"\xe8\0\0\0\0"),))


def test_optprobe_protocol_waits_then_text_poke_bp():
    opt = (PatchRequest(0x1000, b"\xcc\x89\xd8\x48\xc1", b"\xe9\0\0\0\0"),)
    steps = build("optprobe", opt)
    assert steps[0] == GracePeriod("optimize") and isinstance(steps[1], Publish)
    assert build("optprobe", opt, "optprobe-no-wait") == steps[1:]
    unopt = (PatchRequest(0x1000, b"\xe9\0\0\0\0", b"\xcc\x89\xd8\x48\xc1"),)
    assert [type(s).__name__ for s in build("optprobe", unopt)] == ["Poke", "Sync", "Poke", "Sync"]


# ------------------------------------------------------------------------------------------------
# Bad probe addresses: refused, nothing written
# ------------------------------------------------------------------------------------------------
def test_bad_probe_addresses_are_refused_with_nothing_written():
    k = _probe_kernel()
    m = Machine(MachineConfig(cpus=2, seed=0), k.boot_image())
    try:
        p = Patcher(m, k)
        fn = k.symbols["fn_001"]
        kp = k.kprobe_points[1][0]
        before = m.read(m.text_lo, m.text_hi - m.text_lo)
        cases = {
            0x1000: "not inside the kernel text",
            kp + 1: "not an instruction boundary",
            fn + k.sizes["fn_001"] - 1: "cannot run it out of line: ret",  # the function's ret
            kp - 2: "cannot run it out of line: jmp",  # the jump that starts the probe point's block
            kp + 3: "is not a probe point of this kernel",  # imul: boostable, but watched by nobody
        }
        for addr, why in cases.items():
            with pytest.raises(PatchError, match=why):
                p.kprobe_requests([kp, addr], arm=True)
        with pytest.raises(PatchError, match="holds no armed kprobe"):
            p.kprobe_requests([kp], arm=False)
        assert m.read(m.text_lo, m.text_hi - m.text_lo) == before and not p.reports
    finally:
        m.close()


def test_probe_scenarios_refuse_what_does_not_apply():
    with pytest.raises(ConfigError, match="patched with kprobe, not naive-bytes"):
        Scenario(client="kprobe", protocol="naive-bytes")
    with pytest.raises(ConfigError, match="patches probes only"):
        Scenario(client="ftrace", protocol="kprobe")
    with pytest.raises(ConfigError, match="--int3 emulate"):
        Scenario(client="optprobe", protocol="optprobe", int3="skip")
    with pytest.raises(ConfigError, match="use a probe client"):
        Scenario(preempt_aim=0.5)


# ------------------------------------------------------------------------------------------------
# Runs: probes hit and accounted; the retry path; the mutations caught
# ------------------------------------------------------------------------------------------------
def _probe_rows(outcome):
    return [r for r in outcome.verdict.accounting["per_cpu"] if r["cpu"] != 0]


@pytest.mark.parametrize("client", ["kprobe", "optprobe"])
def test_probes_hit_and_are_accounted(client):
    o = run_scenario(Scenario(client=client, protocol=client, cpus=3, sites=4), 0)
    assert o.verdict.ok, o.verdict.summary()
    assert o.verdict.accounting["exact"] is True
    for row in _probe_rows(o):
        assert row["probe_hits"] > 0
        assert row["probe_hits"] + row["probe_retries"] == row["probe_executions"]


def test_an_int3_removed_after_the_trap_is_retried():
    """A CPU that still executes a probe's int3 after the original byte is back and the probe is
    unlinked (its decoded copy is stale: no snoops, no serialization yet) finds no owner, sees the
    original byte, and is sent back to run it (an int3 nobody owns that is still there dies: see the
    freed-slot test)."""
    k = _probe_kernel(2)
    m = Machine(MachineConfig(cpus=3, seed=0, snoop=SnoopModel(None, None)), k.boot_image())
    try:
        p = Patcher(m, k)
        m.run(2_000)
        kp = k.kprobe_points[0][0]
        m.watch([kp])
        assert not p.patch(p.kprobe_requests([kp], arm=True), "kprobe").hung
        m.run(3_000)  # every workload CPU now runs the int3 (the sync serialized them)
        hits = sum(m.percpu(c, Percpu.KP_HITS) for c in (1, 2))
        assert hits > 0
        m.write_text(kp, MOV[:1])  # the byte back, no sync: decoded copies keep the int3
        m.write(p.kprobes.unlink(kp), bytes(8))  # and the probe unlinked
        m.run(3_000)
        assert all(c.crash is None for c in m.cpus)
        assert sum(m.percpu(c, Percpu.KP_RETRY) for c in (1, 2)) > 0
        assert sum(m.percpu(c, Percpu.KP_HITS) for c in (1, 2)) == hits  # no callback for a retry
    finally:
        m.close()


def test_kprobe_slot_freed_early_is_caught():
    sc = Scenario(client="kprobe", protocol="kprobe", cpus=3, sites=4, preempt_aim=0.5)
    assert run_scenario(sc, 0).verdict.ok
    bad = run_scenario(Scenario(**{**sc.as_dict(), "mutation": "kprobe-slot-freed-early"}), 0).verdict
    assert bad.counts.get("unhandled-int3"), bad.summary()
    assert any("freed out-of-line slot" in v.detail for v in bad.violations)


def test_optprobe_without_the_wait_is_caught():
    sc = Scenario(client="optprobe", protocol="optprobe", cpus=3, sites=4, preempt_aim=0.5)
    assert run_scenario(sc, 0).verdict.ok
    bad = run_scenario(Scenario(**{**sc.as_dict(), "mutation": "optprobe-no-wait"}), 0).verdict
    assert bad.counts.get("torn-fetch"), bad.summary()
    assert any("inside the site" in v.detail for v in bad.violations)


def test_optprobe_with_its_kprobe_slot_freed_early_is_caught():
    """The optprobe client registers and unregisters through the kprobe protocol: the kprobe
    mutation reaches those steps (safety accepted it only for kprobes before)."""
    sc = Scenario(client="optprobe", protocol="optprobe", mutation="kprobe-slot-freed-early", stop_at_first=True)
    v = run_scenario(sc, 3).verdict
    assert list(v.counts) == ["unhandled-int3"]
    assert "freed out-of-line slot" in v.violations[0].detail
