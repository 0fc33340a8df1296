"""The call graph: which traced sites the NMI entries and the #BP handler reach; the patcher's warning."""

from __future__ import annotations

import warnings

import pytest

from cpus.layout import TEXT_VA
from textpoke.callgraph import bp_reachable_sites, build_callgraph, nmi_reachable_sites, reachable_sites
from textpoke.image import NMI_CHOICES, call_bytes
from textpoke.patcher import NmiReachableWarning


def test_nmi_entries_reach_exactly_the_nmi_handlers_functions(kernel):
    nmi_funcs = {f"fn_{i:03d}" for i in range(kernel.config.nmi_funcs)}
    for entry in NMI_CHOICES:
        assert set(nmi_reachable_sites(kernel, entry)) == nmi_funcs


def test_the_int3_handler_reaches_no_traced_site(kernel):
    """It must not: an int3 inside it would recurse (Linux says so where it calls it)."""
    for mode in ("emulate", "skip", "emulate-nogap"):
        assert bp_reachable_sites(kernel, mode) == {}


def test_enabled_sites_add_ftrace_edges(kernel):
    site = kernel.site_of(7)
    text = bytearray(kernel.text)
    off = site - TEXT_VA
    text[off : off + 5] = call_bytes(site, kernel.symbols["ftrace_caller"])
    g = build_callgraph(kernel, bytes(text))
    assert g.edges["fn_007", "ftrace_caller"]["kind"] == "ftrace"
    assert not build_callgraph(kernel).has_edge("fn_007", "ftrace_caller")
    assert reachable_sites(g, "fn_007") == {"fn_007": site}


def test_warning_for_an_nmi_reachable_site_and_not_for_a_workload_only_site(textpoke_machine, textpoke_patcher, kernel):
    """stop_machine is not NMI-safe: patching fn_000 (NMI-reachable) warns, fn_020 does not, and
    text_poke_bp never does."""
    m = textpoke_machine(cpus=2, seed=1)
    p = textpoke_patcher(m)
    m.run(1_000)
    with pytest.warns(NmiReachableWarning, match="fn_000"):
        p.enable_ftrace([kernel.site_of(0)], protocol="stop-machine")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NmiReachableWarning)
        p.enable_ftrace([kernel.site_of(20)], protocol="stop-machine")
        p.enable_ftrace([kernel.site_of(1)], protocol="bp")
