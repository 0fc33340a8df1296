"""The exact scheduler: interactions with the patcher happen in the order of their exact times."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from cpus import ConfigError, MachineConfig
from textpoke.scenario import Scenario, run_scenario

SC = Scenario(protocol="bp-batch", cpus=3, sites=4, warmup=2000, settle=2000)


class OrderRecorder:
    """Every interaction in the order the machine performs it: the patcher's text writes, and each
    other CPU's site executions and `iretq`s (serializing), at the time they take effect (the cycles
    an `iretq` costs follow, so serialize records carry the time after them and are not compared
    here). Event deliveries do not serialize and touch nothing the patcher writes: not compared."""

    def __init__(self, patcher: int = 0) -> None:
        self.patcher = patcher
        self.events: list[tuple[str, int, int]] = []  # (kind, time, cpu)

    def on_text_write(self, cpu, time, addr, data):
        self.events.append(("write", time, cpu))

    def on_fetch(self, cpu, time, site, code):
        self.events.append(("fetch", time, cpu))

    def on_iret(self, cpu, time, frame, unblocked):
        self.events.append(("iret", time, cpu))

    def misordered(self) -> list[tuple]:
        """Pairs (a patcher write, another CPU's interaction) performed against the order of their
        times (ties: the lower CPU index first)."""
        bad = []
        last_write = None
        latest_other = None
        for kind, t, cpu in self.events:
            key = (t, cpu)
            if kind == "write":
                if latest_other is not None and latest_other >= key:
                    bad.append((latest_other, key))
                last_write = key
            elif cpu != self.patcher:
                if last_write is not None and key <= last_write:
                    bad.append((last_write, key))
                if latest_other is None or key > latest_other:
                    latest_other = key
        return bad


@pytest.mark.parametrize("seed", [1, 2])
def test_exact_interleaving_orders_every_interaction_by_its_time(seed):
    """With interleave="exact", every site execution, delivery and iretq of a workload CPU
    happens before every patcher write with a later time and after every one with an earlier time,
    although the CPUs run quanta of hundreds of instructions."""
    rec = OrderRecorder()
    out = run_scenario(dataclasses.replace(SC, interleave="exact"), seed, extra_instruments=[rec])
    assert out.verdict.ok, out.verdict.summary()
    writes = sum(1 for e in rec.events if e[0] == "write")
    others = sum(1 for e in rec.events if e[0] != "write")
    assert writes >= 16 and others > 100
    assert rec.misordered() == []
    quanta = sum(c["quanta"] for c in out.verdict.stats["cpu"])
    instructions = sum(c["instructions"] for c in out.verdict.stats["cpu"])
    assert instructions / quanta > 50  # coarse quanta, not the fine scheduler's 1..4


def test_the_order_check_can_fail():
    """The check finds a site execution performed before a patcher write with an earlier time, and
    a write performed after another CPU's later interaction."""
    rec = OrderRecorder()
    rec.events = [("write", 100, 0), ("fetch", 90, 1)]
    assert rec.misordered() == [((100, 0), (90, 1))]
    rec.events = [("iret", 120, 2), ("write", 110, 0)]
    assert rec.misordered() == [((120, 2), (110, 0))]
    rec.events = [("write", 100, 0), ("fetch", 100, 1), ("iret", 130, 2), ("write", 130, 0)]
    assert rec.misordered() == [((130, 2), (130, 0))]


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_interleaving_with_nmis_on_every_cpu(seed):
    """NMIs reach the patcher's CPU too: it runs their handlers in guest code between the patcher's
    steps and still counts as the agent the others are ordered against."""
    rec = OrderRecorder()
    sc = dataclasses.replace(SC, interleave="exact", nmi="nested-safe", nmi_rate=500, nmi_cpus="all")
    out = run_scenario(sc, seed, extra_instruments=[rec])
    assert out.verdict.ok, out.verdict.summary()
    assert out.verdict.stats["cpu"][0]["nmi_delivered"] > 0
    assert rec.misordered() == []


def test_exact_runs_are_deterministic():
    """Same scenario and seed, same trace hash; another seed, another hash."""
    sc = dataclasses.replace(SC, interleave="exact")
    a, b, c = (run_scenario(sc, s).verdict.trace_hash for s in (5, 5, 6))
    assert a == b != c


def test_exact_interleaving_catches_a_broken_protocol():
    """The oracle still catches a mutation under the exact scheduler."""
    out = run_scenario(dataclasses.replace(SC, protocol="bp", mutation="no-sync-after-int3", interleave="exact"), 0)
    assert not out.verdict.ok


def test_unknown_interleave_is_refused():
    with pytest.raises(ConfigError, match="interleave"):
        MachineConfig(interleave="coarse")
    with pytest.raises(ConfigError, match="interleave"):
        Scenario(interleave="coarse")


def test_a_closed_machine_refuses_to_run():
    """run_scenario frees its machine's engines at once (memory stays flat over a sweep); a closed
    machine says so instead of touching freed engines."""
    out = run_scenario(dataclasses.replace(SC, protocol="naive-atomic"), 0, keep_machine=True)
    m = out.machine
    m.run(100)
    m.close()
    with pytest.raises(ConfigError, match="closed"):
        m.run(100)


@pytest.mark.parametrize(
    "sc",
    [
        Scenario(nmi="nested-safe", nmi_rate=500, sites=4),
        Scenario(protocol="bp", interleave="fine", sites=2),
        Scenario(kernel="c", protocol="bp", mutation="no-final-sync", sites=4),
        Scenario(objects=("tests/objects/gcc/flowtab.o",), nmi="nested-safe", nmi_rate=300),
        Scenario(client="jump-label", kernel="c", sites=4),
    ],
    ids=["nmis", "fine", "c-kernel", "object", "jump-label"],
)
def test_sites_at_function_entries_need_no_exit(sc, monkeypatch):
    """A site only a call reaches starts a block without an exit: putting one there anyway (the
    older, slower way) changes nothing, trace for trace. A site some code fell through to would be
    fetched unobserved without its exit, and the traces would differ."""
    import textpoke.scenario as scenario_mod

    seeds = (1,)
    needed = [run_scenario(sc, s).verdict.trace_hash for s in seeds]
    monkeypatch.setattr(scenario_mod, "MachineConfig", functools.partial(MachineConfig, site_exits="all"))
    everywhere = [run_scenario(sc, s).verdict.trace_hash for s in seeds]
    assert needed == everywhere


def test_site_exits_is_checked():
    with pytest.raises(ConfigError, match="site_exits"):
        MachineConfig(site_exits="some")


SHARED_CASES = {
    "nmis": Scenario(nmi="nested-safe", nmi_rate=500, sites=4),
    "stop-machine-ftrace": Scenario(protocol="stop-machine-ftrace", nmi="nested-safe", nmi_rate=300, sites=4),
    "optprobe": Scenario(client="optprobe", protocol="optprobe", preempt_aim=0.5),
}


def _hashes(sc: Scenario, monkeypatch, shared_hooks: str) -> list[str]:
    import textpoke.scenario as scenario_mod

    monkeypatch.setattr(scenario_mod, "MachineConfig", functools.partial(MachineConfig, shared_hooks=shared_hooks))
    return [run_scenario(sc, s).verdict.trace_hash for s in (1,)]


@pytest.mark.parametrize("case", sorted(SHARED_CASES))
def test_shared_code_hooked_at_its_entries_only(case, monkeypatch):
    """The exact scheduler cuts a quantum where it comes into shared code (the #BP handler's lookup,
    the stopper, ftrace's NMI side, the out-of-line slots the patcher writes) and keeps the cut
    inside it: hooking every block of it (the older, slower way) changes nothing, trace for trace."""
    sc = SHARED_CASES[case]
    assert _hashes(sc, monkeypatch, "entries") == _hashes(sc, monkeypatch, "all")


def test_shared_code_entered_by_iretq_is_checked(monkeypatch):
    """An `iretq` back into the middle of the #BP handler or the stopper (an NMI taken there) comes
    into shared code without a hooked block: without the machine's own check there, the traces
    differ, so the comparison above can see a missing entry."""
    import cpus.machine as machine_mod

    sc = SHARED_CASES["nmis"]
    all_blocks = _hashes(sc, monkeypatch, "all")
    monkeypatch.setattr(machine_mod.Machine, "_landed", lambda self, cpu, rip: None)
    assert _hashes(sc, monkeypatch, "entries") != all_blocks


def test_shared_hooks_is_checked():
    with pytest.raises(ConfigError, match="shared_hooks"):
        MachineConfig(shared_hooks="some")
