"""Linux's sequencing: all-but-self sync IPIs, ftrace_modify_all_code, the batch limits of the text_poke
queue and the #BP handler's binary search."""

from __future__ import annotations

import struct

import pytest

from cpus import Machine, MachineConfig
from textpoke import bpdesc
from textpoke.image import FTRACE_NOP, KernelConfig, Percpu, build_kernel, call_bytes
from textpoke.oracle import SafetyOracle
from textpoke.patcher import Patcher
from textpoke.protocols import TEXT_POKE_ARRAY_MAX, PatchRequest, Publish, Sync, text_poke_bp_batch
from textpoke.scenario import Scenario, run_scenario


class _Serializations:
    def __init__(self) -> None:
        self.count: dict[int, int] = {}

    def on_serialize(self, cpu: int, time: int) -> None:
        self.count[cpu] = self.count.get(cpu, 0) + 1


@pytest.fixture(scope="module")
def small_kernel():
    return build_kernel(KernelConfig(nr_traced=8))


def _rig(kernel, cpus=4, seed=3, shorthand=True):
    oracle = SafetyOracle(kernel, cpus)
    ser = _Serializations()
    m = Machine(MachineConfig(cpus=cpus, seed=seed), kernel.boot_image("emulate"), [oracle, ser])
    m.watch(kernel.sites.values())
    p = Patcher(m, kernel, ipi_shorthand=shorthand)
    p.listeners.append(oracle)
    m.run(3_000)
    return m, p, oracle, ser


def test_a_sync_is_one_shorthand_send_and_runs_on_the_sender_too(small_kernel):
    """Every CPU online: one ICR write per sync reaches all three other CPUs, and the sender
    serializes itself (do_sync_core runs locally)."""
    kernel = small_kernel
    _, p, oracle, ser = _rig(kernel)
    before = ser.count.get(0, 0)
    report = p.enable_ftrace(protocol="bp-batch")
    assert len(report.syncs) == 3
    assert report.ipi_sends == 3 and report.ipis == 9
    assert ser.count.get(0, 0) - before >= 3
    assert not oracle.counts


def test_per_target_sends_when_asked_or_when_a_cpu_is_not_online(small_kernel):
    kernel = small_kernel
    _, p, oracle, _ = _rig(kernel, shorthand=False)
    assert p.enable_ftrace(protocol="bp-batch").ipi_sends == 9
    # a CPU that is not online (stopped here) leaves a mask that is not everyone: one send per target
    m2, p2, oracle2, _ = _rig(kernel, seed=4)
    m2.write(m2.layout.percpu_va(3) + Percpu.LOOP_LIMIT, struct.pack("<Q", 1))
    m2.run(20_000, stop_when=lambda: m2.cpus[3].halted)
    assert m2.cpus[3].halted
    report = p2.enable_ftrace(protocol="bp-batch")
    assert report.ipi_sends == 6 and report.ipis == 6
    assert not oracle.counts and not oracle2.counts


def test_the_shorthand_costs_the_sender_one_send():
    """The sender's clock pays ipi_send once per sync with the shorthand, once per target without."""
    from textpoke.latency import LatencyConfig, measure

    rows = {
        sh: measure(LatencyConfig(protocol="bp-batch", cpus=8, sites=1, functions=8, ipi_shorthand=sh))
        for sh in (True, False)
    }
    assert rows[True].ipi_sends == 3 and rows[False].ipi_sends == 21
    assert rows[True].ipis == rows[False].ipis == 21


def test_ftrace_modify_all_code_sequence(small_kernel):
    """Enable: ftrace_call -> the list function (3 syncs), the sites (3), a sync round on the others
    (1), ftrace_call -> the tracer (3); disable mirrors it, back to ftrace_stub; the text returns to
    its boot bytes and the tracer ran in between."""
    kernel = small_kernel
    m, p, oracle, _ = _rig(kernel)
    boot = m.read(m.text_lo, m.text_hi - m.text_lo)
    call = kernel.trampoline_sites["ftrace_call"]
    sym = kernel.symbols
    report = p.ftrace_modify_all_code(True)
    assert len(report.syncs) == 10
    assert [s.label for s in report.syncs][6] == "ftrace-sync-ipi"
    assert m.read(call, 5) == call_bytes(call, sym["function_tracer"])
    assert all(m.read(s, 5) == call_bytes(s, sym["ftrace_caller"]) for s in kernel.sites.values())
    m.run(20_000)
    assert sum(m.percpu(c, Percpu.FT_FUNC) for c in range(1, 4)) > 0
    report = p.ftrace_modify_all_code(False)
    assert len(report.syncs) == 10
    assert m.read(m.text_lo, m.text_hi - m.text_lo) == boot
    assert not oracle.counts


def test_ftrace_linux_scenario_is_safe_with_nmis():
    sc = Scenario(operation="ftrace-linux", nmi="nested-safe", nmi_rate=500, cpus=3, sites=4)
    outcome = run_scenario(sc, 1)
    assert outcome.verdict.ok, outcome.verdict.summary()
    assert outcome.verdict.accounting["exact"]


def _reqs(sites):
    return [PatchRequest(s, FTRACE_NOP, b"\xe8" + struct.pack("<i", 0x100)) for s in sites]


def test_the_queue_flushes_at_the_array_limit():
    base = 0xFFFFFFFF81000000
    steps = text_poke_bp_batch(_reqs(base + 64 * i for i in range(TEXT_POKE_ARRAY_MAX + 44)))
    publishes = [s for s in steps if isinstance(s, Publish)]
    assert [len(p.requests) for p in publishes] == [TEXT_POKE_ARRAY_MAX, 44]
    assert sum(isinstance(s, Sync) for s in steps) == 6
    one = text_poke_bp_batch(_reqs(base + 64 * i for i in range(TEXT_POKE_ARRAY_MAX)))
    assert sum(isinstance(s, Publish) for s in one) == 1


def test_the_queue_flushes_when_addresses_descend():
    base = 0xFFFFFFFF81000000
    steps = text_poke_bp_batch(_reqs([base, base + 0x80, base + 0x40, base + 0xC0]))
    publishes = [[r.site - base for r in s.requests] for s in steps if isinstance(s, Publish)]
    assert publishes == [[0, 0x80], [0x40, 0xC0]]


@pytest.fixture(scope="module")
def big_kernel():
    return build_kernel(KernelConfig(nr_traced=64))


def _lookup(m: Machine, kernel, ip: int) -> tuple[int, int, int]:
    """Call poke_int3_handler on CPU 1 for a trap at `ip` (skip mode): (rax, new RIP, instructions)."""
    cpu = m.cpus[1]
    top = m.layout.kstack_top(1) - 0x800
    frame = top - 0x100
    m.write(frame, struct.pack("<6Q", 2**64 - 1, ip + 1, 0x10, 0x2, top, 0x18))
    m.write(top - 8, struct.pack("<Q", kernel.symbols["cpu_halt"]))
    eng = cpu.engine
    eng.set_reg("rdi", frame)
    eng.set_reg("rsi", 0)
    eng.set_rsp(top - 8)
    m.set_rip(1, kernel.symbols["poke_int3_handler"])
    cpu.halted = False
    n0 = cpu.stats["instructions"]
    m.run(5_000, stop_when=lambda: cpu.halted)
    assert cpu.halted
    return eng.reg("rax"), m.read_u64(frame + 8), cpu.stats["instructions"] - n0


def test_bp_handler_binary_search_finds_every_entry_of_a_large_batch(big_kernel):
    k = big_kernel
    m = Machine(MachineConfig(cpus=2, seed=1, quantum=1), k.boot_image("skip"))  # exact counts
    m.run(1_000)
    sites = sorted(k.sites.values())
    descs = [bpdesc.PokeDescriptor(s, s + 5, 5, bpdesc.OPCODE_JMP) for s in reversed(sites)]  # any order
    bpdesc.publish(m, descs)
    worst = 0
    for s in sites:
        found, rip, n = _lookup(m, k, s)
        assert (found, rip) == (1, s + 5)
        worst = max(worst, n)
    assert worst < 120  # log2(64) halvings, not a linear scan of 64 entries
    for miss in (sites[0] - 64, sites[10] + 1, sites[10] + 32, sites[-1] + 3, sites[-1] + 64):
        found, rip, _ = _lookup(m, k, miss)
        assert (found, rip) == (0, miss + 1)
    assert bpdesc.read_refs(m) == 1  # every lookup put its reference back


def test_bp_handler_single_entry_is_a_direct_compare(big_kernel):
    k = big_kernel
    m = Machine(MachineConfig(cpus=2, seed=1), k.boot_image("skip"))
    m.run(1_000)
    s = k.site_of(7)
    bpdesc.publish(m, [bpdesc.PokeDescriptor(s, s + 5, 5, bpdesc.OPCODE_JMP)])
    assert _lookup(m, k, s)[:2] == (1, s + 5)
    assert _lookup(m, k, s + 64)[:2] == (0, s + 65)
    assert _lookup(m, k, s - 64)[:2] == (0, s - 63)
