"""The exhaustive explorer agrees with the random sweeps on the emulator."""

from __future__ import annotations

import pytest

from textpoke.explore import NESTED_FLAGS, explore, explore_nmi
from textpoke.protocols import BP_MUTATIONS
from textpoke.scenario import Scenario
from textpoke.sweep import run_one


@pytest.mark.parametrize("protocol", ["bp", "bp-batch", "stop-machine"])
def test_safe_protocols_have_no_reachable_unsafe_state(protocol):
    for cpus, sites in ((1, 1), (2, 1), (2, 2)):
        r = explore(protocol, None, cpus, sites)
        assert r.complete and r.safe, r.report()
        assert r.states > 5


@pytest.mark.parametrize("protocol", ["naive-bytes", "naive-atomic"])
def test_unsafe_baselines_have_a_counterexample(protocol):
    r = explore(protocol, None, 1, 1)
    assert r.violations
    path = next(iter(r.violations.values()))
    assert path[-1].startswith("=>") and any(step.startswith("cpu1: executes") for step in path)


@pytest.mark.parametrize("mutation", list(BP_MUTATIONS))
def test_every_protocol_mutation_has_a_shortest_counterexample_and_the_sweeps_catch_it(mutation):
    r = explore("bp", mutation, 1, 1)
    assert r.violations, mutation
    shortest = min(len(p) for p in r.violations.values())
    assert shortest <= 16
    # the emulator's sweeps catch the same mutation (see test_patching for the seed bounds)
    assert any(not run_one(Scenario(protocol="bp", mutation=mutation), s).ok for s in range(8))


def test_counterexample_is_a_trace_a_person_can_follow():
    path = explore("bp", "no-sync-after-int3", 1, 1).violations["torn-fetch"]
    assert path[:3] == [
        "cpu0: publishes the #BP descriptors",
        "cpu0: writes cc at site0+0 (int3)",
        "cpu0: writes fb ef ff ff at site0+1 (tail)",
    ]
    assert "reaches its copy" in path[3] and path[-1] == "=> torn-fetch"


SAFE_NMI = [("nested-safe", False), ("latch-cmpxchg", False), ("latch-dec", False), ("naive", True)]
UNSAFE_NMI = [*(e for e in NESTED_FLAGS if e != "nested-safe"), "naive", "latch-cmpxchg386"]


@pytest.mark.parametrize("entry, fred", SAFE_NMI)
def test_safe_nmi_entries(entry, fred):
    r = explore_nmi(entry, nmis=3, fred=fred)
    assert r.safe, r.report()


@pytest.mark.parametrize("entry", UNSAFE_NMI)
def test_unsafe_nmi_entries_have_a_counterexample(entry):
    r = explore_nmi(entry, nmis=3)
    expected = "lost-nmi" if entry == "latch-cmpxchg386" else "nmi-corruption"
    assert expected in r.violations, r.report()


def test_under_the_sdm_rule_text_poke_bp_itself_has_a_counterexample():
    """The SDM asks every executing CPU to serialize before it runs modified code, int3 included:
    text_poke_bp relies on the first-byte exemption, and without it (xmc_rule="sdm") it is caught."""
    r = explore("bp", None, 1, 1, xmc_rule="sdm")
    assert set(r.violations) == {"unsynced-modification"}, r.report()
    assert explore("bp", None, 1, 1, xmc_rule="linux").safe


def test_stop_machine_ftrace_explored_with_nmis():
    """With NMIs on the stopped CPUs both stop_machine protocols are unsafe. stop-machine-ftrace's
    NMI-side write keeps an NMI from running a half-written site while the write is in flight, but
    event delivery does not serialize: an NMI that starts after the write runs the site from what
    its CPU decoded before, with no serializing instruction in between (the SDM's hazard), even when
    NMIs count themselves in at delivery (no entry window)."""
    bare = explore("stop-machine", None, 1, 1, nmis=1)
    assert "unsynced-modification" in bare.violations
    real = explore("stop-machine-ftrace", None, 1, 1, nmis=1)
    path = real.violations["unsynced-modification"]
    arrive = next(i for i, p in enumerate(path) if "an NMI arrives" in p)
    cleared = next(i for i, p in enumerate(path) if "clears the write flag" in p)
    assert cleared < arrive  # the write is over before the NMI: only its stale copy is to blame
    assert any("the NMI handler executes" in p for p in path[arrive:])
    assert not explore("stop-machine-ftrace", None, 1, 1, nmis=1, count_at_delivery=True).safe
    assert not explore("stop-machine-ftrace", "no-nmi-write", 1, 1, nmis=1, count_at_delivery=True).safe
    with pytest.raises(ValueError):
        explore("bp", None, 1, 1, nmis=1)
