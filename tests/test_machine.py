"""The emulated SMP machine: scheduling, x86 event semantics, fetch coherence, crashes."""

from __future__ import annotations

import itertools
import struct

import pytest

from cpus import ConfigError, Delay, Machine, MachineConfig, NmiSource, SnoopModel, Vector, WaitUntil
from cpus import layout as L
from cpus.delivery import RFLAGS_IF
from textpoke.bpdesc import OPCODE_JMP, PokeDescriptor, publish
from textpoke.image import FTRACE_NOP, Percpu, call_bytes
from textpoke.oracle import SafetyOracle
from textpoke.scenario import Scenario, run_scenario


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


class Recorder:
    """Collects what the machine reports, with a stack of the events each CPU is handling."""

    def __init__(self) -> None:
        self.fetches: list[tuple[int, int, int, bytes]] = []
        self.delivered: list[tuple[int, int, int, tuple]] = []
        self.irets: list[tuple[int, int, tuple, bool]] = []
        self.stack: dict[int, list[int]] = {}
        self.bp_iret_unblocked_inside_nmi = False

    def on_fetch(self, cpu, time, site, code):
        self.fetches.append((cpu, time, site, code))

    def on_deliver(self, cpu, time, vector, frame):
        self.delivered.append((cpu, time, vector, frame))
        self.stack.setdefault(cpu, []).append(vector)

    def on_iret(self, cpu, time, frame, unblocked):
        self.irets.append((cpu, time, frame, unblocked))
        st = self.stack.get(cpu, [])
        if st:
            leaving = st.pop()
            if leaving == Vector.BP and Vector.NMI in st and unblocked:
                self.bp_iret_unblocked_inside_nmi = True


def test_same_seed_same_trace_and_different_seed_different_interleaving(make_machine):
    """Same configuration and seed give one trace hash; another seed interleaves differently."""

    def run(seed):
        m = make_machine(cpus=4, seed=seed, keep_trace=True, nmi_sources=(NmiSource(period=3000),))
        m.run(200_000)
        runs = [(r[1], r[4]) for r in m.trace if r[2] == "run"]
        return m.trace_hash, runs, m.stats()

    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a[0] != c[0]
    assert a[1] != c[1]  # the scheduling decisions themselves differ


def test_ipi_waits_while_interrupts_are_off(make_machine, kernel):
    """An IPI that reaches a CPU with IF=0 is delivered only once it sets IF=1 (its popfq)."""
    m = make_machine(cpus=2, seed=3, keep_trace=True)
    base = m.layout.percpu_va(1)
    m.write(base + Percpu.IRQOFF_MASK, u64(1))
    m.write(base + Percpu.IRQOFF_LEN, u64(3000))
    eng = m.cpus[1].engine
    m.run(10**6, stop_when=lambda: not eng.rflags() & RFLAGS_IF)
    assert not eng.rflags() & RFLAGS_IF, "cpu1 never entered an interrupts-off section"
    m.send_ipi(0, 1)
    m.run(50_000)
    arrive = [r for r in m.trace if r[2] == "ipi-arrive" and r[1] == 1]
    deliver = [r for r in m.trace if r[2] == "deliver" and r[1] == 1 and r[3] == Vector.IPI]
    assert len(arrive) == 1 and arrive[0][4] is False  # it arrived while IF was 0
    assert len(deliver) == 1
    wl = kernel.symbols["workload_main"]
    (popf,) = [a for a in kernel.popf_sites if wl <= a < wl + kernel.sizes["workload_main"]]
    assert deliver[0][4] == popf + 1  # interrupted right after the popfq that set IF
    assert deliver[0][0] > arrive[0][0]
    assert m.percpu(1, Percpu.IPI_COUNT) == 1


def test_ipi_with_interrupts_on_is_delivered_on_arrival(make_machine):
    """With IF=1 the IPI is taken at the instruction boundary where it arrives."""
    m = make_machine(cpus=2, seed=4, keep_trace=True)
    m.run(5_000)
    m.send_ipi(0, 1)
    m.run(20_000)
    arrive = [r for r in m.trace if r[2] == "ipi-arrive"]
    deliver = [r for r in m.trace if r[2] == "deliver" and r[3] == Vector.IPI]
    assert arrive[0][4] is True
    assert deliver[0][0] == arrive[0][0]
    assert m.percpu(1, Percpu.IPI_COUNT) == 1


def test_second_nmi_is_latched_and_third_dropped(make_machine):
    """NMIs are blocked in the handler: one more is latched and delivered right after the
    handler's iretq; any further one is lost."""
    rec = Recorder()
    m = make_machine(cpus=2, seed=1, keep_trace=True, instruments=[rec])
    m.run(5_000)
    m.raise_nmi(1)
    m.run(10)  # a few instructions into the handler
    m.raise_nmi(1)
    m.raise_nmi(1)
    s = m.cpus[1].stats
    assert (s["nmi_raised"], s["nmi_delivered"], s["nmi_latched"], s["nmi_dropped"]) == (3, 1, 1, 1)
    m.run(5_000)
    assert s["nmi_delivered"] == 2
    assert m.percpu(1, Percpu.NMI_COUNT) == 2
    nmis = [d for d in rec.delivered if d[0] == 1 and d[2] == Vector.NMI]
    first_iret = next(i for i in rec.irets if i[0] == 1)
    # delivered at the very boundary after that iretq completes
    assert nmis[1][1] == first_iret[1] + m.costs.iret + m.costs.instruction
    assert nmis[1][3][0] == first_iret[2][0]  # and it interrupts where that iretq returned to


def _arm_int3_on_nmi_sites(m, kernel):
    """int3 on every site the NMI handler calls, seen by every CPU: the run goes past the last snoop
    point (delivering the NMI will not serialize, so nothing else would make cpu1 see them)."""
    sites = [kernel.site_of(i) for i in range(kernel.config.nmi_funcs)]
    publish(m, [PokeDescriptor(s, s + 5, 5, OPCODE_JMP) for s in sites])
    for s in sites:
        m.write_text(s, b"\xcc")
    m.run(m.config.snoop.max_delay + 1)


@pytest.mark.parametrize("fred", [False, True])
def test_int3_iret_inside_nmi_unblocks_nmis(make_machine, kernel, fred):
    """The flaw: the iretq of an int3 taken in an NMI handler unblocks NMIs, so the next NMI
    nests on the same IST stack. With FRED-style returns it stays latched instead."""
    rec = Recorder()
    # the fine scheduler, one instruction per quantum: stop_when sees every step
    m = make_machine(cpus=2, seed=2, keep_trace=True, fred=fred, instruments=[rec], fine_quantum=1, interleave="fine")
    _arm_int3_on_nmi_sites(m, kernel)
    m.run(2_000)
    m.fine += 1  # one instruction per quantum: stop_when sees every step
    m.raise_nmi(1)
    m.run(100_000, stop_when=lambda: rec.bp_iret_unblocked_inside_nmi or len(rec.irets) > 40)
    if fred:
        assert not rec.bp_iret_unblocked_inside_nmi
        assert m.cpus[1].nmi.blocked or m.cpus[1].stats["nmi_delivered"] == 1
        # re-run the scenario up to the int3's return inside the NMI and raise a second NMI there
        m2 = make_machine(
            cpus=2,
            seed=2,
            keep_trace=True,
            fred=True,
            instruments=[rec2 := Recorder()],
            fine_quantum=1,
            interleave="fine",
        )
        _arm_int3_on_nmi_sites(m2, kernel)
        m2.run(2_000)
        m2.fine += 1
        m2.raise_nmi(1)
        m2.run(100_000, stop_when=lambda: any(i[0] == 1 for i in rec2.irets))
        assert rec2.stack[1] == [Vector.NMI]  # back in the NMI handler after the int3's iretq
        m2.raise_nmi(1)
        assert m2.cpus[1].stats["nmi_latched"] == 1
        assert m2.cpus[1].stats["nmi_delivered"] == 1
        return
    assert rec.bp_iret_unblocked_inside_nmi
    first = next(d for d in rec.delivered if d[2] == Vector.NMI)
    m.raise_nmi(1)
    nmis = [d for d in rec.delivered if d[2] == Vector.NMI]
    assert len(nmis) == 2  # delivered, not latched: it nests inside the first handler
    assert rec.stack[1] == [Vector.NMI, Vector.NMI]
    first_base = next(r for r in m.trace if r[2] == "deliver" and r[3] == Vector.NMI)[6]
    second_base = [r for r in m.trace if r[2] == "deliver" and r[3] == Vector.NMI][1][6]
    assert first_base == second_base  # same IST top: the nested frame overwrote the first one
    assert first[3] != nmis[1][3]


@pytest.mark.parametrize("snoop", [None, 4000])
def test_stale_decode_until_serialization_or_snoop(make_machine, kernel, snoop):
    """A CPU that decoded a site keeps executing the old bytes after another CPU rewrites it,
    until it serializes (here: an IPI) or its snoop point comes; then it executes the new bytes."""
    rec = Recorder()
    model = SnoopModel(None, None) if snoop is None else SnoopModel(snoop, snoop)
    m = make_machine(cpus=2, seed=5, snoop=model, instruments=[rec], keep_trace=True)
    fn = 5
    site = kernel.site_of(fn)
    new = call_bytes(site, kernel.symbols["ftrace_caller"])
    m.run(50_000)
    assert m.percpu(1, Percpu.WL_COUNT + 8 * fn) > 0
    m.write_text(site, new)  # one atomic store
    t_write = m.cpus[0].now()
    wl_at_write = m.percpu(1, Percpu.WL_COUNT + 8 * fn)
    m.run(3_000 if snoop else 400_000)
    assert m.percpu(1, Percpu.FT_COUNT + 8 * fn) == 0
    assert m.percpu(1, Percpu.WL_COUNT + 8 * fn) > wl_at_write  # it kept running the old nop
    if snoop is None:
        m.send_ipi(0, 1)
    m.run(400_000)
    assert m.percpu(1, Percpu.FT_COUNT + 8 * fn) > 0
    mine = [f for f in rec.fetches if f[0] == 1 and f[2] == site]
    switch = next(i for i, f in enumerate(mine) if f[3] == new)
    assert all(f[3] == bytes.fromhex("0f1f440000") for f in mine[:switch])
    assert all(f[3] == new for f in mine[switch:])
    assert any(f[1] > t_write for f in mine[:switch])  # old bytes executed after the write
    if snoop:
        assert mine[switch][1] >= t_write + snoop
    else:
        ipi = next(r for r in m.trace if r[2] == "deliver" and r[1] == 1 and r[3] == Vector.IPI)
        assert mine[switch][1] >= ipi[0]
    # the workload and ftrace agree from the switch on: every later call was traced
    calls_after = (
        m.percpu(1, Percpu.WL_COUNT + 8 * fn)
        - sum(1 for f in mine[:switch])
        - (wl_at_write - len([f for f in mine[:switch] if f[1] <= t_write]))
    )
    assert calls_after >= m.percpu(1, Percpu.FT_COUNT + 8 * fn) - 1


def test_garbage_in_text_is_a_recorded_crash(make_machine, kernel):
    """Executing bytes that do not decode ends as a crash record with a disassembly; the run
    returns normally and the other CPUs go on."""
    m = make_machine(cpus=3, seed=1)
    site = kernel.site_of(3)
    m.write_text(site, bytes.fromhex("ffffffffff"))
    m.run(300_000)
    crashes = m.crashes
    assert {c.cpu for c in crashes} == {1, 2}
    c = crashes[0]
    assert c.rip == site
    assert c.code[:5] == bytes.fromhex("ffffffffff")
    assert "(bad)" in c.disassembly
    assert c.tail  # the last events of that CPU
    assert m.cpus[0].alive and m.cpus[0].clock >= 300_000


def test_jump_to_unmapped_memory_is_a_recorded_crash(make_machine):
    m = make_machine(cpus=2, seed=1)
    m.run(1_000)
    m.set_rip(1, 0xFFFFFFFF90000000)
    m.run(1_000)
    (c,) = m.crashes
    assert c.cpu == 1 and c.rip == 0xFFFFFFFF90000000
    assert c.code == b"" and c.disassembly == "<unmapped>"
    assert "#PF" in c.reason or "UNMAPPED" in c.reason


@pytest.mark.parametrize("interleave", ["exact", "fine"])
def test_jump_into_data_is_a_no_execute_fault(make_machine, interleave):
    """Data, stacks and the text's writable alias are mapped no-execute, as Linux maps them: a CPU
    that jumps there (a torn call's target, say) takes #PF on the fetch instead of running data as
    code, and the run goes on. Without NX the CPU sat on that address forever."""
    m = make_machine(cpus=2, seed=1, interleave=interleave)
    m.run(1_000)
    m.set_rip(1, L.DATA_VA + 0x5B0)
    m.run(1_000)
    (c,) = m.crashes
    assert c.cpu == 1 and c.rip == L.DATA_VA + 0x5B0
    assert "#PF" in c.reason and "no-execute" in c.reason
    assert m.cpus[0].clock >= 2_000


def test_sixty_four_cpus_run(make_machine):
    m = make_machine(cpus=64, seed=1, nmi_sources=(NmiSource(period=5_000),))
    m.run(20_000)
    assert not m.crashes
    assert all(c.clock >= 20_000 for c in m.cpus)
    assert sum(c.stats["nmi_delivered"] for c in m.cpus) > 63


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"cpus": 0}, "cpus must be between"),
        ({"cpus": 100_000}, "cpus must be between"),
        ({"seed": -1}, "seed"),
        ({"quantum": 0}, "quantum"),
        ({"cpus": 2, "patcher_cpu": 5}, "patcher_cpu"),
        ({"cpus": 2, "nmi_sources": (NmiSource(cpus=(7,)),)}, "CPU 7"),
        ({"snoop": SnoopModel(10, 5)}, "snoop"),
    ],
)
def test_bad_configuration_is_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MachineConfig(**kwargs)


def test_call_at_runs_at_the_exact_cycle(make_machine):
    """Timed callbacks land on the instruction boundary of their cycle (quanta are cut for them)."""
    m = make_machine(cpus=2, seed=9)
    seen = []
    m.call_at(1, 12_345, lambda mach, cpu: seen.append(cpu.clock))
    m.run(30_000)
    assert seen == [12_345]


def _nmi_after_tail_writes(make_machine, kernel, **config):
    """cpu0 changes the tail of every site the NMI handler calls; then an NMI arrives at cpu1's very
    next instruction boundary (its next sites are the handler's). Returns the machine, oracle,
    recorder and cpu1's one NMI delivery."""
    oracle = SafetyOracle(kernel, 2)
    rec = Recorder()
    m = make_machine(
        cpus=2,
        seed=6,
        nmi_entry="nested-safe",
        snoop=SnoopModel(None, None),
        instruments=[oracle, rec],
        keep_trace=True,
        **config,
    )
    oracle.attach(m)
    m.watch(kernel.sites.values())
    m.run(5_000)
    for i in range(kernel.config.nmi_funcs):
        site = kernel.site_of(i)
        m.write_text(site + 1, call_bytes(site, kernel.symbols["ftrace_caller"])[1:])
    m.raise_nmi(1)
    m.run(3_000)
    (nmi,) = [d for d in rec.delivered if d[0] == 1 and d[2] == Vector.NMI]
    return m, oracle, rec, nmi


def test_an_nmi_handler_runs_what_its_cpu_decoded_delivery_does_not_serialize(make_machine, kernel):
    """cpu0 changes the tail of every site the NMI handler calls; then an NMI is delivered to cpu1 and
    its handler executes one of them with no serializing instruction in between: it runs its old
    decoded copy, an unsynced-modification. (Delivery is not serializing; were it, the handler would
    decode the new bytes and this would be no unsynced-modification.)"""
    m, oracle, rec, nmi = _nmi_after_tail_writes(make_machine, kernel)
    first = next(v for v in oracle.violations if v.cpu == 1)
    assert first.kind == "unsynced-modification"
    assert first.code == FTRACE_NOP  # the stale copy
    iret = next(i for i in rec.irets if i[0] == 1)
    assert nmi[1] <= first.time <= iret[1]  # inside the NMI handler
    assert not [r for r in m.trace if r[2] == "serialize" and r[1] == 1 and r[0] < first.time]


def test_the_looser_rule_lets_delivery_serialize(make_machine, kernel):
    """The same case under `delivery_serializes` (looser than the SDM): the NMI's delivery drops
    cpu1's stale copies, so its handler decodes the new bytes and nothing is flagged on cpu1."""
    m, oracle, _rec, _nmi = _nmi_after_tail_writes(make_machine, kernel, delivery_serializes=True)
    assert [r for r in m.trace if r[2] == "serialize" and r[1] == 1 and r[4] == "delivery"]
    assert not [v for v in oracle.violations if v.cpu == 1 and v.kind == "unsynced-modification"]
    assert oracle.fetches  # the handler did execute sites


def test_the_sync_ipi_serializes_itself_before_it_acknowledges(make_machine, kernel):
    """do_sync_core: the IPI handler executes cpuid (sync_core) before it bumps its counter; its
    delivery alone drops nothing."""
    m = make_machine(cpus=2, seed=4, snoop=SnoopModel(None, None), keep_trace=True)
    m.watch(kernel.sites.values())
    m.run(5_000)
    site = kernel.site_of(5)
    m.write_text(site, call_bytes(site, kernel.symbols["ftrace_caller"]))
    assert m.coherence.stale_sites[1] == {site}
    m.send_ipi(0, 1)
    m.run(20_000)
    assert m.percpu(1, Percpu.IPI_COUNT) == 1
    mine = [r for r in m.trace if r[1] == 1 and r[2] in ("deliver", "serialize", "iret")]
    kinds = [(r[2], r[-1] if r[2] == "serialize" else None) for r in mine]
    assert kinds[:3] == [("deliver", None), ("serialize", "cpuid"), ("iret", None)]
    assert not m.coherence.stale_sites[1]


def test_a_fresh_machine_counts_exactly_what_it_executes(make_machine, kernel):
    """cpu.stats["instructions"] equals an independent count (a code hook on the whole text, plus the
    iretqs the machine executes from their block hooks) over a run with watched sites, int3s inside
    NMI handlers and iretqs -- including the sites translated before the first quantum."""
    m = make_machine(cpus=2, seed=3, nmi_entry="nested-safe", nmi_sources=(NmiSource(period=3000),))
    seen = {0: 0, 1: 0}
    for cpu in m.cpus:

        def count(_a: int, _s: int, i: int = cpu.index) -> None:
            seen[i] += 1

        cpu.engine.hook_code_at(m.text_lo, m.text_hi - m.text_lo, count)
        for a in kernel.iret_sites:
            cpu.engine.hook_block_at(a, 1, count)
    m.watch(kernel.sites.values())  # the sites' blocks are translated now, before anything runs
    _arm_int3_on_nmi_sites(m, kernel)
    m.run(60_000)
    assert not m.crashes
    s = m.cpus[1].stats
    assert s["int3"] > 5 and s["iret"] > 5 and s["site_exec"] > 5
    assert [c.stats["instructions"] for c in m.cpus] == [seen[0], seen[1]]


def test_the_patcher_cpu_takes_nmis_between_agent_steps(make_machine, kernel):
    """An agent's CPU is an ordinary CPU: an NMI arriving between two of its steps (a WaitUntil poll
    is one) runs the NMI entry and handler in guest code, returns to the idle loop where the agent
    is parked, and the agent goes on; its clock has run on meanwhile."""
    rec = Recorder()
    m = make_machine(
        cpus=2, seed=8, nmi_entry="nested-safe", instruments=[rec], nmi_sources=(NmiSource(period=4000, cpus=(0,)),)
    )
    m.run(1_000)
    idle = m.image.idle_range
    polls = []

    def agent():
        yield Delay(5_000)
        t = m.cpus[0].clock
        yield WaitUntil(lambda: polls.append(m.cpus[0].clock) or m.cpus[0].clock >= t + 20_000, "20k cycles")
        return "done"

    t0 = m.cpus[0].clock
    assert m.run_agent(0, agent()) == "done"
    nmis = [d for d in rec.delivered if d[0] == 0 and d[2] == Vector.NMI and d[1] >= t0]
    assert len(nmis) >= 4
    assert all(idle[0] <= d[3][0] < idle[1] for d in nmis)  # each returns to where the agent is parked
    assert m.percpu(0, Percpu.NMI_COUNT) >= len(nmis)  # the handler ran
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert min(gaps) == m.costs.poll and max(gaps) > m.costs.poll + m.costs.event_entry  # NMIs between polls


@pytest.mark.parametrize("interleave", ["exact", "fine"])
def test_an_instruction_the_emulator_neither_runs_nor_faults_is_a_crash(make_machine, kernel, interleave):
    """A divide error inside a watched site's bytes (a torn jump can land there): the CPU must die
    there, not spin without progress until the run's limits. With exits on, Unicorn reports the #DE;
    without, it stops quietly on the idiv and the machine names the instruction."""
    m = make_machine(cpus=2, seed=1, interleave=interleave)
    m.run(2_000)
    site = kernel.site_of(0)
    m.write_text(site, bytes.fromhex("31dbf6ff90"))  # xor ebx, ebx; idiv bh
    m.run(200_000)
    crash = m.cpus[1].crash
    assert crash is not None and crash.rip == site + 2
    assert crash.reason == "exception #DE" or ("no progress" in crash.reason and "idiv bh" in crash.reason)
    assert m.cpus[1].stats["quanta"] < 2_000


@pytest.mark.parametrize("interleave", ["exact", "fine"])
def test_a_site_reached_by_falling_through_is_observed_every_time(interleave):
    """The C kernel's jump labels sit in the middle of their functions, right after an instruction
    that falls through into them, so without help Unicorn translates each inside the block before
    it, where no block hook fires. Watching a site makes it start a block of its own on every CPU:
    each execution is reported (compared with an independent code hook on the sites), also when a
    quantum stops right in front of one."""
    from collections import Counter

    from cpus import Machine
    from cpus.disasm import disasm
    from textpoke.clients import resolve_client
    from textpoke.image import KernelConfig, build_kernel

    k = build_kernel(KernelConfig(kernel="c", nr_traced=8))
    sites = resolve_client("jump-label").sites(k)
    for n, site in enumerate(sites):  # fn_NNN holds jump label n
        lo = k.symbols[f"fn_{n:03d}"]
        before = [t for a, b, t in disasm(k.text[lo - L.TEXT_VA : site - L.TEXT_VA], lo) if a + len(b) == site]
        assert len(before) == 1 and not before[0].startswith(("j", "ret", "call")), before
    rec = Recorder()
    m = Machine(MachineConfig(cpus=3, seed=1, interleave=interleave), k.boot_image(), [rec])
    executed: Counter = Counter()
    for cpu in m.cpus:  # before anything is translated: a later code hook misses cached blocks
        for s in sites:
            cpu.engine.hook_code_at(s, 1, lambda a, _n, i=cpu.index: executed.update([(i, a)]))
    m.watch(sites)
    m.run(200_000)
    assert not m.crashes
    fetched = Counter((cpu, site) for cpu, _t, site, _code in rec.fetches)
    assert {s for _c, s in executed} == set(sites)  # the workers ran every one of them
    assert fetched == executed


def test_a_stale_copy_of_a_site_reached_by_falling_through_lasts_until_serialization():
    """The decoded-copy model holds for a site in the middle of a function too: after another CPU
    switches a jump label (snoops off), a worker keeps running the nop it decoded, though Unicorn
    drops the block in front of the site after every run, until an IPI serializes it."""
    from cpus import Machine
    from textpoke.clients import resolve_client
    from textpoke.clients.jump_label import jump_bytes
    from textpoke.image import KernelConfig, build_kernel

    k = build_kernel(KernelConfig(kernel="c", nr_traced=8))
    site = resolve_client("jump-label").sites(k)[0]
    entry = next(e for e in k.jump_entries if e.code == site)
    old, new = jump_bytes(entry, False), jump_bytes(entry, True)
    taken = k.jump_label_counters[site]
    rec = Recorder()
    m = Machine(MachineConfig(cpus=2, seed=5, snoop=SnoopModel(None, None)), k.boot_image(), [rec])
    m.run(50_000)
    m.write_text(site, new)
    t_write = m.cpus[0].now()
    m.run(300_000)
    assert m.percpu(1, taken) == 0  # the branch was never taken: it still runs the nop
    assert m.read(site, len(new)) == new
    m.send_ipi(0, 1)
    m.run(300_000)
    assert m.percpu(1, taken) > 0
    mine = [(t, code) for cpu, t, s, code in rec.fetches if cpu == 1 and s == site]
    switch = next(i for i, (_t, code) in enumerate(mine) if code == new)
    assert sum(1 for t, code in mine[:switch] if t > t_write and code == old) > 10
    assert all(code == new for _t, code in mine[switch:])
    assert not m.crashes


POOL_CASES = [
    Scenario(),
    Scenario(nmi="nested-safe", nmi_rate=500, sites=4),
    Scenario(client="optprobe", protocol="optprobe", preempt_aim=0.5),
    Scenario(protocol="stop-machine", sites=4),
    Scenario(protocol="bp", interleave="fine", sites=2),
]


def _pool_hashes(cases, seed: int = 2) -> list[str]:
    return [run_scenario(sc, seed).verdict.trace_hash for sc in cases]


@pytest.mark.parametrize("keep_at_most", [0, 1 << 40])
def test_recycled_engines_give_the_same_traces(keep_at_most, monkeypatch):
    """A machine on engines a finished one handed back (cpus/pool.py) keeps nothing of the last
    machine but, at most, translated blocks of unchanged bytes: every trace is the one new engines
    give, with the blocks dropped at every hand-over and with them kept (as they are by default while
    they take little of the code buffer)."""
    import cpus._unicorn as unicorn_mod
    from cpus.pool import POOL

    monkeypatch.setattr(unicorn_mod, "_KEEP_AT_MOST", keep_at_most)

    fresh = []
    for sc in POOL_CASES:
        POOL.clear()
        fresh.append(run_scenario(sc, 2).verdict.trace_hash)
    POOL.clear()
    run_scenario(POOL_CASES[2], 5)  # leave the pool with blocks of patched sites and slots
    assert _pool_hashes(POOL_CASES) == fresh
    assert _pool_hashes(POOL_CASES[::-1]) == fresh[::-1]


def test_code_buffer_is_watched(monkeypatch):
    """The engine sees how full its code buffer is and how often it was emptied (Unicorn has no
    call for either: `_find_codegen` finds TCG's bookkeeping), so that a recycled engine drops its
    blocks before they take too much, and a translation outside a run that would crash the
    emulator on a full buffer empties it first (refused from inside the engine's own run)."""
    import cpus._unicorn as unicorn_mod
    from cpus import Machine
    from cpus.errors import SimulatorBug
    from cpus.pool import POOL
    from textpoke.image import build_kernel

    boot = build_kernel().boot_image()
    POOL.clear()
    m = Machine(MachineConfig(cpus=1, seed=1), boot)
    eng = m.cpus[0].engine
    use = eng.code_buffer()
    assert use is not None and use[1] > 8 << 20
    m.run(20_000)
    used = eng.code_buffer()[0]
    assert used > use[0]
    assert eng.free_ptr.value == eng._codegen_start() + used and not eng.low_on_room
    monkeypatch.setattr(unicorn_mod, "_KEEP_AT_MOST", used)
    eng.recycle(())
    assert eng.code_buffer()[0] == used  # kept: not more than it may keep
    monkeypatch.setattr(unicorn_mod, "_KEEP_AT_MOST", used - 1)
    eng.recycle(())
    assert eng.code_buffer()[0] == 0
    POOL.clear()

    m = Machine(MachineConfig(cpus=1, seed=1), boot)
    eng = m.cpus[0].engine
    m.run(20_000)
    flushes = eng.flush_count.value
    refilled = []
    monkeypatch.setattr(eng, "on_flushed", lambda: refilled.append(eng.code_buffer()[0]))
    limit = eng.room_limit
    eng.room_limit = eng.free_ptr.value - 1  # "nearly full" now
    assert eng.low_on_room
    eng.decode_at(boot.worker_entry)  # empties the buffer first, then tells the machine
    assert eng.flush_count.value == flushes + 1 and refilled == [0]
    eng._in_emu = True  # as from a hook of its own run: no emptying under it
    eng.room_limit = eng.free_ptr.value - 1
    with pytest.raises(SimulatorBug, match="code buffer is full"):
        eng.decode_at(boot.worker_entry)
    eng._in_emu = False
    eng.room_limit = limit
    m.run(20_000)
    monkeypatch.setattr(unicorn_mod, "_KEEP_AT_MOST", 1 << 40)
    eng.recycle(())
    assert eng.code_buffer()[0] == 0  # a life that emptied its buffer counts as having filled it
    POOL.clear()


def test_the_emulator_counts_the_emptyings_it_does_inside_a_run():
    """The count the machine watches (`Engine.flush_count`, found by `_find_codegen`) also counts
    what Unicorn does by itself when its buffer fills in the middle of a run, on an engine with
    the smallest buffer running one long chain of blocks."""
    import ctypes

    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    from unicorn.x86_const import UC_X86_REG_RAX

    import cpus._unicorn as unicorn_mod

    offsets = unicorn_mod._codegen_offsets()
    assert offsets is not None
    uc_off, _ctx_off, flush_off = offsets
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.ctl_set_tcg_buffer_size(1 << 20)
    n = 20_000
    uc.mem_map(0x10000, 0x100000)
    uc.mem_write(0x10000, b"\x48\xff\xc0\xeb\x00" * n)  # inc rax; jmp to the next: a block each
    base = ctypes.cast(uc._uch, ctypes.c_void_p).value
    count = ctypes.c_uint32.from_address(ctypes.c_uint64.from_address(base + uc_off).value + flush_off)
    uc.emu_start(0x10000, 0x10000 + 5 * n)
    assert uc.reg_read(UC_X86_REG_RAX) == n and count.value >= 2


def test_an_emptied_code_buffer_keeps_the_stale_copies(make_machine, kernel, monkeypatch):
    """Unicorn empties a CPU's full code buffer by itself inside a run, and with it the blocks that
    stand for the CPU's copies of sites. The machine sees it (the engine's count of emptyings) after
    the quantum and decodes every copy again, so the CPU goes on running its stale copy; the bytes
    it may have run from memory meanwhile make the run hit a limit (`on_limit`), not a verdict.
    Without the decoding again, the CPU would run the new bytes from then on."""

    class Limits:
        def __init__(self) -> None:
            self.seen: list[tuple[int, str]] = []

        def on_limit(self, cpu, time, why):
            self.seen.append((cpu, why))

    fn = 5
    site = kernel.site_of(fn)

    def traced_after_emptying() -> tuple[int, int, list]:
        lim = Limits()
        m = make_machine(cpus=2, seed=5, snoop=SnoopModel(None, None), instruments=[lim])
        m.watch(kernel.sites.values())
        m.run(50_000)
        m.write_text(site, call_bytes(site, kernel.symbols["ftrace_caller"]))
        m.run(3_000)
        assert m.coherence.stale_sites[1] == {site}
        m.cpus[1].engine.uc.ctl_flush_tb()  # as Unicorn does when the buffer fills in a run
        m.run(3_000)
        ft = m.percpu(1, Percpu.FT_COUNT + 8 * fn)
        wl = m.percpu(1, Percpu.WL_COUNT + 8 * fn)
        m.run(200_000)
        assert m.coherence.stale_sites[1] == {site}  # nothing serialized cpu1 meanwhile
        return m.percpu(1, Percpu.FT_COUNT + 8 * fn) - ft, m.percpu(1, Percpu.WL_COUNT + 8 * fn) - wl, lim.seen

    traced, called, seen = traced_after_emptying()
    assert called > 0 and traced == 0  # the stale nop ran on
    assert seen and seen[0][0] == 1 and f"{site:#x}" in seen[0][1]
    monkeypatch.setattr(Machine, "_copies_decoded_again", lambda self, cpu: [])
    traced, called, _ = traced_after_emptying()
    assert called > 0 and traced > 0  # the new call ran: the copy was lost


@pytest.mark.parametrize("interleave", ["exact", "fine"])
def test_a_code_buffer_emptied_between_quanta_changes_no_trace(interleave, monkeypatch):
    """The machine empties a CPU's code buffer between quanta, and before a translation outside a
    run, when little room is left (here: always, after every quantum and before every such
    translation) and refills it with every copy the CPU holds before anything runs: the trace is
    the one without emptying. Without the refill it is not (a CPU runs memory's bytes where it
    held a copy)."""
    import cpus._unicorn as unicorn_mod
    from cpus.pool import POOL

    sc = (
        Scenario(protocol="bp-batch")
        if interleave == "exact"
        else Scenario(protocol="bp", interleave="fine", cpus=2, sites=2, warmup=1000, settle=1000)
    )
    try:
        POOL.clear()
        normal = run_scenario(sc, 2).verdict.trace_hash
        POOL.clear()
        monkeypatch.setattr(unicorn_mod, "_DECODE_MARGIN", 1 << 40)  # engines made now are always low
        assert run_scenario(sc, 2).verdict.trace_hash == normal
        POOL.clear()
        monkeypatch.setattr(Machine, "_copies_decoded_again", lambda self, cpu: [])
        assert run_scenario(sc, 2).verdict.trace_hash != normal
    finally:
        POOL.clear()


def test_recycling_must_drop_the_blocks_of_written_text(monkeypatch):
    """Engines handed back keep no block translated from bytes their machine wrote (when they keep
    blocks, as they do while the kept ones take little of the code buffer): a machine whose
    workload's first instruction was rewritten (a new constant) hands its engines over, and the next
    machine, on the original text, runs as one on new engines. Without that drop it runs the old
    block (the comparison above could not see this: a patch's sites are hooked, and their blocks
    dropped, by every machine that watches them)."""
    import cpus._unicorn as unicorn_mod
    from cpus import Machine
    from cpus.pool import POOL
    from textpoke.image import build_kernel

    monkeypatch.setattr(unicorn_mod, "_KEEP_AT_MOST", 1 << 40)  # blocks kept across hand-overs
    boot = build_kernel().boot_image()
    cfg = MachineConfig(cpus=2, seed=1)
    new_bytes = b"\x48\xb8" + (7).to_bytes(8, "little")  # mov rax, 7

    def after_a_rewriting_machine() -> str:
        m = Machine(cfg, boot)
        m.write_text(boot.worker_entry, new_bytes)
        m.run(20_000)
        m.recycle()
        m = Machine(cfg, boot)
        m.run(20_000)
        return m.trace_hash

    POOL.clear()
    fresh = Machine(cfg, boot)
    fresh.run(20_000)
    assert after_a_rewriting_machine() == fresh.trace_hash
    recycle = unicorn_mod.Engine.recycle
    monkeypatch.setattr(unicorn_mod.Engine, "recycle", lambda self, written: recycle(self, ()))
    assert after_a_rewriting_machine() != fresh.trace_hash
    POOL.clear()
