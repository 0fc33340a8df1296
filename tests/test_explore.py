"""The exhaustive explorer agrees with the random sweeps on the emulator."""

from __future__ import annotations

import pytest

from cpus import ConfigError
from textpoke.clients import resolve_client
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


# ------------------------------------------------------------------------------------------------
# clients: each one's sites and operations, the correct protocol and each broken variant
# ------------------------------------------------------------------------------------------------
CORRECT = [
    ("jump-label", "bp", ((1, 1), (2, 2))),
    ("jump-label", "bp-batch", ((2, 2),)),
    ("static-call", "bp", ((1, 1), (2, 2))),
    ("static-call", "bp-batch", ((2, 2),)),
    ("kprobe", None, ((1, 1), (2, 2))),
    ("optprobe", None, ((1, 1), (2, 1))),
]


@pytest.mark.parametrize("client, protocol, shapes", CORRECT, ids=[f"{c}-{p}" for c, p, _ in CORRECT])
def test_each_client_is_safe_with_its_correct_protocol(client, protocol, shapes):
    for cpus, sites in shapes:
        r = explore(protocol, None, cpus, sites, client=client)
        assert r.complete and r.safe, r.report()
        assert r.states > 20 and client in r.scope


#: client, protocol, operation, #BP handler, mutation -> the classes the explorer reaches (and the
#: options of the emulator's sweep that catches the same variant)
BROKEN = [
    ("jump-label", "bp", None, "emulate-no-jmp8", None, {"unhandled-int3"}, {"kernel": "c", "sites": 8}),
    ("static-call", "bp", "retarget-unpadded", "emulate", None, {"sls-exposure"}, {"kernel": "c", "sites": 2}),
    ("static-call", "bp", None, "emulate-noret", None, {"unhandled-int3"}, {"kernel": "c", "sites": 2}),
    ("kprobe", None, None, "emulate", "kprobe-slot-freed-early", {"unhandled-int3"}, {"preempt_aim": 0.5}),
    ("optprobe", None, None, "emulate", "optprobe-no-wait", {"torn-fetch"}, {"preempt_aim": 0.5}),
]


@pytest.mark.parametrize("client, protocol, operation, int3, mutation, classes, sweep", BROKEN)
def test_each_client_broken_variant_has_a_counterexample_and_the_sweep_catches_it(
    client, protocol, operation, int3, mutation, classes, sweep
):
    r = explore(protocol, mutation, 1, 1, client=client, operation=operation, int3=int3)
    assert r.complete and set(r.violations) == classes, r.report()
    assert r.shortest is not None and r.shortest <= 20
    # the same variant on the emulator, as `textpoke safety --client C` runs it (seed 0)
    kw = {"client": client, "protocol": protocol or client, "int3": int3, "mutation": mutation, "cpus": 3, **sweep}
    caught = run_one(Scenario(**kw, operation=operation or resolve_client(client).default_operation), 0)
    assert classes <= {k for k, n in caught.counts.items() if n}, caught.counts


def test_the_broken_variants_paths_show_the_hazard():
    """Each shortest counterexample ends on the hazard its variant opens: the int3 over the 2-byte
    jump label, the freed slot a CPU is still in, the return into the middle of the optprobe's jmp."""
    jl = explore("bp", None, 1, 2, client="jump-label", int3="emulate-no-jmp8").violations["unhandled-int3"]
    assert jl[-2].startswith("cpu1: executes site0: cc") and len(jl[-2].split(":")[-1].split()) == 2  # 2 bytes
    kp = explore(None, "kprobe-slot-freed-early", 1, 1, client="kprobe").violations["unhandled-int3"]
    freed = next(i for i, p in enumerate(kp) if "frees site0's slot" in p)
    inside = next(i for i, p in enumerate(kp) if "into its slot" in p)
    assert inside < freed and "runs site0's freed slot" in kp[-2]
    assert not any("quiescent" in p for p in kp)
    op = explore(None, "optprobe-no-wait", 1, 1, client="optprobe").violations["torn-fetch"]
    first = next(i for i, p in enumerate(op) if "(its first instruction)" in p)
    tail = next(i for i, p in enumerate(op) if "(tail)" in p)
    assert first < tail and "site0+3" in op[-2]
    sc = explore("bp", None, 1, 1, client="static-call", operation="retarget-unpadded").violations["sls-exposure"]
    assert sc[-2].startswith("cpu1: executes site0: c3") and "cc cc cc cc" not in sc[-2]


def test_the_explorer_refuses_what_it_does_not_model():
    with pytest.raises(ConfigError, match="patched with kprobe"):
        explore("bp", None, 1, 1, client="kprobe")
    with pytest.raises(ConfigError, match="changes nothing"):
        explore(None, "optprobe-no-wait", 1, 1, client="kprobe")
    with pytest.raises(ConfigError, match="not --int3 skip"):
        explore("bp", None, 1, 1, int3="skip")
    with pytest.raises(ConfigError, match="--int3 emulate"):
        explore(None, None, 1, 1, client="optprobe", int3="emulate-noret")
    with pytest.raises(ConfigError, match="unknown client"):
        explore("bp", None, 1, 1, client="livepatch")


def test_a_mutation_of_the_kprobe_registration_breaks_optprobes_too():
    """An optprobe is registered and unregistered as a kprobe first: freeing its slot (or detour
    buffer) before the grace period is caught there as well, by the explorer as by safety."""
    r = explore(None, "kprobe-slot-freed-early", 2, 1, client="optprobe")
    steps = r.violations["unhandled-int3"]
    assert any("frees site0's" in p for p in steps) and "freed" in steps[-2]
