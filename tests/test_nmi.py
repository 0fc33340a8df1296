"""NMIs during patching: the three entries, the iret flaw, FRED, and the NMI verdicts."""

from __future__ import annotations

import pytest

from textpoke.scenario import Scenario, run_scenario
from textpoke.sweep import run_one

RATE = 500  # perf NMIs per million cycles per CPU: a high rate


def nmi(entry: str, seeds: int, **kw) -> list:
    return [run_scenario(Scenario(protocol="bp-batch", nmi=entry, nmi_rate=RATE, **kw), s) for s in range(seeds)]


def test_naive_entry_breaks_when_an_nmi_hits_a_site_being_patched():
    """text_poke_bp on sites the NMI handler calls: an int3 in the handler, its iretq unblocks
    NMIs, the next NMI overwrites the first one's frame on the IST stack."""
    outs = nmi("naive", 4)
    broken = [o for o in outs if {"nmi-corruption", "crash"} & set(o.verdict.failed_classes)]
    assert len(broken) >= 3
    assert sum(o.verdict.stats["nmi_nested"] for o in outs) > 0


@pytest.mark.parametrize("aim", [None, "exit-window", "repeat"])
def test_nested_safe_entry_survives_and_nmis_really_nest(aim):
    outs = nmi("nested-safe", 6, nmi_aim=aim)
    assert all(o.verdict.ok for o in outs), [o.verdict.summary() for o in outs if not o.verdict.ok]
    assert all(o.verdict.accounting["exact"] for o in outs)
    assert sum(o.verdict.stats["nmi_nested"] for o in outs) > 10
    assert sum(o.verdict.stats["nmi_repeated"] for o in outs) > 10


def test_fred_makes_the_naive_entry_safe():
    """With FRED-style returns the int3's return does not unblock NMIs: nothing nests."""
    outs = nmi("naive", 6, fred=True)
    assert all(o.verdict.ok for o in outs)
    assert sum(o.verdict.stats["nmi_nested"] for o in outs) == 0
    assert sum(o.verdict.stats["nmi_latched"] for o in outs) > 0


#: mutation of the nested-safe entry -> (window its NMIs are aimed at, seeds within which it is caught)
MUTANTS = {
    "nested-no-rsp-check": ("exit-window", 1),  # nested NMI between clearing the variable and iretq
    "nested-no-variable": (None, 2),  # nested NMI while the handler runs on its second stack
    "nested-hw-frame": (None, 2),  # the trampoline restores the frame the nested NMI overwrote
    "nested-no-rip-check": ("repeat", 1),  # nested NMI inside repeat_nmi
}


@pytest.mark.parametrize("entry", list(MUTANTS))
def test_oracle_catches_each_nested_entry_mutation(entry):
    aim, within = MUTANTS[entry]
    outs = nmi(entry, within, nmi_aim=aim)
    assert any({"nmi-corruption", "lost-nmi", "crash"} & set(o.verdict.failed_classes) for o in outs)


def test_i386_cmpxchg_emulated_with_interrupts_off_loses_nmis():
    """On a 386 cmpxchg is emulated with interrupts disabled, which does not stop an NMI: one that
    lands between the compare and the store is latched and then overwritten."""
    outs = nmi("latch-cmpxchg386", 2, nmi_aim="latch-window")
    assert any("lost-nmi" in o.verdict.failed_classes for o in outs)
    assert all(set(o.verdict.failed_classes) <= {"lost-nmi"} for o in outs)


@pytest.mark.parametrize("entry", ["latch-dec", "latch-cmpxchg"])
def test_i386_decrement_and_real_cmpxchg_exits_lose_nothing(entry):
    aim = "latch-window" if entry == "latch-dec" else None
    outs = nmi(entry, 4, nmi_aim=aim)
    assert all(o.verdict.ok for o in outs)
    assert sum(o.verdict.stats["nmi_nested"] for o in outs) > 0


def test_stop_machine_does_not_stop_nmis():
    """NMIs still run on the stopped CPUs, and their handler executes sites while they are being
    written: a cross-modifying-code hazard stop_machine does not prevent."""
    results = [run_one(Scenario(protocol="stop-machine", nmi="nested-safe", nmi_rate=RATE), s) for s in range(10)]
    hit = [r for r in results if not r.ok]
    assert hit
    # a torn call may land anywhere, in data too (a #PF crash)
    assert all(set(r.counts) <= {"unsynced-modification", "torn-fetch", "crash"} for r in hit)


def test_the_patcher_takes_nmis_and_a_naive_entry_breaks_it_too():
    """The patching CPU is an ordinary CPU: NMIs hit it while it patches, its handler runs into the
    patcher's own int3s, and with the naive entry it is the patcher's CPU that breaks as well."""
    results = [run_one(Scenario(protocol="bp-batch", nmi="naive", nmi_rate=RATE, cpus=2), s) for s in range(2)]
    assert all(r.by_cpu.get(0) for r in results), [r.by_cpu for r in results]


def test_nested_safe_entry_survives_nmis_on_the_patcher_cpu():
    """With the nested-safe entry nothing breaks although the patcher's CPU takes NMIs whose handler
    hits its own int3s and nests; with nmi_cpus="workers" the patcher takes none (the old model)."""
    outs = [run_scenario(Scenario(protocol="bp-batch", nmi="nested-safe", nmi_rate=RATE, cpus=2), s) for s in range(2)]
    assert all(o.verdict.ok for o in outs), [o.verdict.summary() for o in outs]
    assert all(o.verdict.accounting["exact"] for o in outs)
    patcher = [o.verdict.stats["cpu"][0] for o in outs]
    assert all(c["nmi_delivered"] > 20 and c["int3"] > 20 for c in patcher), patcher
    spared = run_scenario(
        Scenario(protocol="bp-batch", nmi="nested-safe", nmi_rate=RATE, cpus=2, nmi_cpus="workers", sites=4), 0
    )
    assert spared.verdict.stats["cpu"][0]["nmi_raised"] == 0 and spared.verdict.stats["cpu"][1]["nmi_raised"] > 0
