"""stop_machine as Linux runs it: multi_cpu_stop's stages as guest code, and the stop_machine ftrace
of 2.6.28-3.4 whose NMIs perform a pending text write themselves."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from cpus import Machine, MachineConfig
from cpus.layout import TEXT_ALIAS_VA, TEXT_VA
from textpoke.image import (
    FTRACE_MODIFYING,
    FTRACE_NOP,
    MOD_CODE_IP,
    MOD_CODE_NEW,
    MOD_CODE_WRITE_FLAG,
    NMI_RUNNING,
    NMI_UPDATES,
    STOP_EXIT,
    KernelConfig,
    Percpu,
    build_kernel,
    call_bytes,
)
from textpoke.oracle import SafetyOracle
from textpoke.patcher import Operation, Patcher
from textpoke.protocols import PatchRequest
from textpoke.scenario import Scenario, run_scenario

# bare stop_machine is asked to patch NMI-reachable sites on purpose here
pytestmark = pytest.mark.filterwarnings("ignore::textpoke.patcher.NmiReachableWarning")


class _Writes:
    def __init__(self) -> None:
        self.log: list[tuple[int, int, int, bytes]] = []

    def on_text_write(self, cpu: int, time: int, addr: int, data: bytes) -> None:
        self.log.append((cpu, time, addr, data))


def oracle_writes(m: Machine) -> list[tuple[int, int, int, bytes]]:
    return next(i for i in m.instruments if isinstance(i, _Writes)).log


def _rig(kernel, cpus: int = 4, seed: int = 1, nmi_entry: str = "nested-safe"):
    oracle = SafetyOracle(kernel, cpus)
    cfg = MachineConfig(cpus=cpus, seed=seed)
    m = Machine(cfg, kernel.boot_image("emulate", nmi_entry), [oracle, _Writes()])
    oracle.attach(m)
    m.watch(kernel.sites.values())
    p = Patcher(m, kernel)
    p.listeners.append(oracle)
    return m, p, oracle


class _StageLog:
    """Records, in execution order, every stopper acknowledgement: (cpu, stage)."""

    def __init__(self) -> None:
        self.acks: list[tuple[int, int]] = []
        self.machine: Machine | None = None

    def on_probe(self, cpu: int, time: int, label: str) -> None:
        if label == "stopper_ack" and self.machine is not None:
            ack = (cpu, self.machine.percpu(cpu, Percpu.STOP_STAGE))
            if ack not in self.acks:  # a block hook may fire twice for one run of the block
                self.acks.append(ack)


def test_stages_are_barriers_of_every_cpu(kernel):
    """No CPU acknowledges a stage before every CPU acknowledged the one before it, every CPU passes
    all four stages, and the caller records them in order."""
    log = _StageLog()
    oracle = SafetyOracle(kernel, 4)
    m = Machine(MachineConfig(cpus=4, seed=5), kernel.boot_image("emulate"), [oracle, log])
    log.machine = m
    m.probe(kernel.symbols["stopper_ack"], "stopper_ack")
    m.watch(kernel.sites.values())
    p = Patcher(m, kernel)
    p.listeners.append(oracle)
    m.run(3_000)
    report = p.enable_ftrace(protocol="stop-machine")
    assert [s[0] for s in report.stages] == ["prepare", "disable-irq", "run", "exit"]
    stages = [s for _, s in log.acks]
    assert sorted(set(stages)) == [1, 2, 3, 4]
    for cpu in (1, 2, 3):
        assert [s for c, s in log.acks if c == cpu] == [1, 2, 3, 4]
        assert m.percpu(cpu, Percpu.STOP_EXIT) == 1
    # barrier: the acks come in stage order across all CPUs (the last ack of a stage opens the next)
    assert stages == sorted(stages)
    assert not oracle.counts


def test_a_cpu_with_interrupts_off_delays_every_stage(kernel):
    """The stopper is woken by an interrupt: a CPU in a long interrupts-off section arrives late, and
    since every stage is a barrier of all CPUs, no stage opens before it arrives."""

    def run(irqoff: bool):
        m, p, oracle = _rig(kernel, cpus=3, seed=2, nmi_entry="naive")
        if irqoff:
            base = m.layout.percpu_va(2)
            m.write(base + Percpu.IRQOFF_MASK, struct.pack("<Q", 1))
            m.write(base + Percpu.IRQOFF_LEN, struct.pack("<Q", 6_000))
        m.run(6_000)
        report = p.enable_ftrace(protocol="stop-machine")
        assert not oracle.counts
        return report

    fast, slow = run(False), run(True)
    delay = slow.stages[0][2] - fast.stages[0][2]
    assert delay > 3_000  # PREPARE waited for the late CPU
    # and every later stage opened only after it: each ends at least `delay` after the fast run's
    for (name, _, end_fast), (_, _, end_slow) in zip(fast.stages, slow.stages, strict=True):
        assert end_slow - slow.start >= end_fast - fast.start + delay - 1_000, name


def test_the_nmi_side_write_is_guest_code(kernel):
    """An NMI arriving while a write is pending performs it (stores through the text's writable alias,
    seen by the machine like any text write), counts itself in and out of nmi_running, and then runs
    the handler on its own, coherent, store."""
    m, _, oracle = _rig(kernel, cpus=2, seed=3)
    m.run(2_000)
    site = kernel.site_of(0)
    new = call_bytes(site, kernel.symbols["ftrace_caller"])
    m.watch([site])
    m.write(FTRACE_MODIFYING, struct.pack("<Q", 1))
    m.write(MOD_CODE_IP, struct.pack("<Q", TEXT_ALIAS_VA + (site - TEXT_VA)))
    m.write(MOD_CODE_NEW, new.ljust(8, b"\0"))
    m.write(NMI_RUNNING, struct.pack("<Q", MOD_CODE_WRITE_FLAG))
    oracle.on_op_start(Operation((PatchRequest(site, FTRACE_NOP, new),), "stop-machine-ftrace", False), 0)
    m.raise_nmi(1)
    m.run(3_000)
    assert m.read(site, 5) == new
    assert m.read_u64(NMI_UPDATES) == 1
    assert m.read_u64(NMI_RUNNING) == MOD_CODE_WRITE_FLAG  # in, then out again
    writes = [(cpu, addr, data) for cpu, _, addr, data in oracle_writes(m)]
    assert writes == [(1, site, new[:4]), (1, site + 4, new[4:])]
    assert not oracle.counts


def _aimed_nmi_run(mutation: str | None) -> SafetyOracle:
    """stop-machine-ftrace on 4 traced functions, one NMI on CPU 1 aimed at the start of the first
    site's do_ftrace_mod_code: it is counted in while the write is pending."""
    kernel = build_kernel(KernelConfig(nr_traced=4))
    m, p, oracle = _rig(kernel, cpus=2, seed=4)
    fired = []

    orig = p._mod_code

    def aimed(step, report):
        if not fired:
            fired.append(True)
            m.call_at(1, p._now(), lambda mach, cpu: mach.raise_nmi(cpu.index, "aimed"))
        yield from orig(step, report)

    p._mod_code = aimed  # type: ignore[method-assign]
    m.run(3_000)
    # the first NMI handler run calls fn_001 and fn_003
    p.enable_ftrace([kernel.site_of(1), kernel.site_of(3)], protocol="stop-machine-ftrace", mutation=mutation)
    m.run(3_000)
    assert fired
    return oracle


def test_stop_machine_ftrace_nmi_counted_during_the_write_is_safe():
    """The NMI counted in while the write is pending performs it itself: nothing to flag."""
    oracle = _aimed_nmi_run(None)
    assert not oracle.counts


def test_no_nmi_write_is_caught():
    """The same NMI without the NMI-side write executes a site another CPU rewrote since it last
    serialized."""
    oracle = _aimed_nmi_run("no-nmi-write")
    assert oracle.counts["unsynced-modification"] >= 1


def test_stop_machine_ftrace_beats_bare_stop_machine_with_nmis():
    """At the README's NMI rate, the NMI-side write removes most of bare stop_machine's violations
    over the same seeds (what remains is NMIs delivered before a write but counted after it)."""
    seeds = range(4)

    def bad(protocol: str) -> int:
        sc = Scenario(protocol=protocol, nmi="nested-safe", nmi_rate=500, sites=4, cpus=3)
        return sum(run_scenario(sc, s).verdict.counts["unsynced-modification"] for s in seeds)

    assert bad("stop-machine-ftrace") < bad("stop-machine")


def test_stopper_state_is_left_clean(kernel):
    m, p, oracle = _rig(kernel, cpus=3, seed=7, nmi_entry="naive")
    m.run(2_000)
    p.enable_ftrace(protocol="stop-machine-ftrace")
    assert m.read_u64(NMI_RUNNING) == 0
    assert m.read_u64(FTRACE_MODIFYING) == 0
    assert all(m.percpu(c, Percpu.STOP_STAGE) == STOP_EXIT for c in (1, 2))
    assert not oracle.counts


@pytest.mark.parametrize("protocol", ["stop-machine", "stop-machine-ftrace"])
def test_stop_machine_variants_round_trip(kernel, protocol):
    m, p, oracle = _rig(kernel, cpus=3, seed=11, nmi_entry="naive")
    before = m.read(m.text_lo, m.text_hi - m.text_lo)
    m.run(2_000)
    p.enable_ftrace(protocol=protocol)
    m.run(2_000)
    p.disable_ftrace(protocol=protocol)
    assert m.read(m.text_lo, m.text_hi - m.text_lo) == before
    assert not oracle.counts


def test_a_preempt_off_section_delays_the_stopper_but_not_the_ipi():
    """With preemption off the woken stopper cannot run: the IPI is taken (interrupts are on) and
    marks a reschedule, and preempt_enable switches to the stopper; PREPARE waits for it."""
    from textpoke.latency import LatencyConfig, measure

    base = dict(protocol="stop-machine", cpus=3, sites=1, functions=8, warmup=6_000)
    fast = measure(LatencyConfig(**base))
    slow = measure(LatencyConfig(**base, preempt_off_cpu=2, preempt_off_len=6_000))
    assert slow.stage_cycles["prepare"] > fast.stage_cycles["prepare"] + 3_000


def test_under_coherent_fetch_only_the_nmi_side_write_closes_the_torn_window():
    """`xmc_rule="coherent"` (fetch coherent with stores, the era's assumption): seed 71 has an NMI
    land on the modifying CPU between the two stores of its copy; without the NMI-side write the site
    stays half-written while handlers run it (a torn fetch), with it the NMI finishes the write first."""
    base = Scenario(protocol="stop-machine-ftrace", nmi="nested-safe", nmi_rate=500, xmc_rule="coherent")
    broken = run_scenario(dataclasses.replace(base, mutation="no-nmi-write"), 71).verdict
    assert broken.counts["torn-fetch"] >= 1
    assert not broken.counts["unsynced-modification"]  # the coherent rule judges bytes only
    assert run_scenario(base, 71).verdict.ok
