"""The static-call client: inline static call sites and trampolines of the C kernel, retargeted."""

from __future__ import annotations

import pytest

import textpoke.patcher as patcher_mod
from cpus import ConfigError
from cpus.layout import TEXT_VA
from textpoke.clients import resolve_client
from textpoke.clients.static_call import RET_PADDED, chosen, static_calls, transform
from textpoke.image import FTRACE_NOP, KernelConfig, build_kernel
from textpoke.patcher import Patcher, PatchError
from textpoke.protocols import PatchRequest
from textpoke.scenario import Scenario, run_scenario

# cheap runs: 3 CPUs (2 workloads), 2 static calls (6 sites), short warmup and settle
CHEAP = {"client": "static-call", "kernel": "c", "cpus": 3, "sites": 2, "warmup": 2_000, "settle": 2_000}


@pytest.fixture(scope="module")
def ckernel():
    return build_kernel(KernelConfig(kernel="c"))


def test_static_call_sites_are_found_with_their_trampolines(ckernel):
    calls = static_calls(ckernel)
    assert [c.name for c in calls] == [f"sc{i}" for i in range(8)]
    for c in calls:
        assert c.trampoline == ckernel.symbols[f"__SCT__{c.name}"]
        assert c.key == ckernel.object_symbols[f"__SCK__{c.name}"]
        assert sorted(tail for _a, tail in c.sites) == [False, True]  # one call site, one tail site
        for addr, tail in c.patched:
            code = ckernel.text[addr - TEXT_VA : addr - TEXT_VA + 5]
            # at boot every site goes to the trampoline, and the trampoline to the first target
            want = c.trampoline if addr != c.trampoline else ckernel.symbols[f"sct_{c.name[2:]}_0"]
            assert code == transform(addr, want, tail)
            assert addr in ckernel.patchable
    # the tail site is the wrapper's only instruction
    tails = {a for c in calls for a, tail in c.sites if tail}
    assert tails == {ckernel.symbols[f"sc_tail_{i}"] for i in range(8)}


def test_sites_of_the_first_sites_static_calls_in_update_order():
    k = build_kernel(KernelConfig(kernel="c", nr_traced=2, nmi_funcs=2))
    sites = resolve_client("static-call").sites(k)
    assert [c.name for c in chosen(k)] == ["sc0", "sc1"]
    assert sites == [a for c in chosen(k) for a, _t in c.patched]
    assert sites[0] == k.symbols["__SCT__sc0"]  # the trampoline first, as static_call_update does


def test_a_site_inside_a_basic_block_is_patched_and_observed():
    """pktfilter.o computes the argument right before its static call, so code reaches the call by
    falling through: the machine still observes every execution of it (the site starts a block of
    its own while watched), and CPUs trap on it while it changes."""
    sc = Scenario(client="static-call", objects=("tests/objects/gcc/pktfilter.o",), operation="toggle")
    v = run_scenario(sc, 0).verdict
    assert v.ok, v.summary()
    workers = v.stats["cpu"][1:]
    assert all(c["site_exec"] > 0 for c in workers)
    assert v.stats["int3_hits"] > 0


def test_null_becomes_a_nop_or_a_ret_padded_with_int3():
    assert transform(0x1000, None, False) == FTRACE_NOP
    assert transform(0x1000, None, True) == RET_PADDED == bytes.fromhex("c3cccccccc")


def test_bp_batch_retarget_is_safe_and_every_target_count_matches():
    for seed in (0, 1):
        v = run_scenario(Scenario(protocol="bp-batch", operation="retarget", **CHEAP), seed).verdict
        assert v.ok, v.summary()
        assert v.accounting["exact"]
        rows = v.accounting["per_cpu"]
        assert sum(r["static_call_targets"] for r in rows) > 0
        assert all(r["static_call_targets"] == r["static_call_targets_expected"] for r in rows)
        assert all(r["static_call_returns"] == r["static_call_site_executions"] for r in rows)
        assert v.stats["int3_hits"] > 0  # CPUs did trap on the sites while they changed


def test_bp_one_site_at_a_time_is_safe():
    v = run_scenario(Scenario(protocol="bp", operation="toggle", **CHEAP), 0).verdict
    assert v.ok, v.summary()
    assert v.accounting["exact"]


def test_naive_bytes_is_caught():
    v = run_scenario(Scenario(protocol="naive-bytes", operation="toggle", **(CHEAP | {"cpus": 2})), 1).verdict
    assert {"torn-fetch", "unsynced-modification"} <= set(v.failed_classes), v.summary()


def test_a_handler_that_cannot_emulate_ret_is_caught():
    """Linux's #BP handler learnt to emulate RET with static calls; without it, a CPU trapping on a
    tail site or trampoline that is becoming `ret` finds no handler, and the kernel dies."""
    sc = Scenario(protocol="bp-batch", operation="toggle", int3="emulate-noret", **CHEAP)
    v = run_scenario(sc, 0).verdict
    assert "unhandled-int3" in v.failed_classes, v.summary()


def test_accounting_catches_a_descriptor_with_the_old_target(monkeypatch):
    """The retarget race: a CPU trapping on the int3 must be sent to the new target. A descriptor
    that still names the old one sends it there, and the targets' counts no longer match what the
    oracle saw executed."""
    real = patcher_mod._decode_for_int3

    def stale(req):
        opcode, target = real(req)
        if req.old[0] == req.new[0] and req.old[0] in (0xE8, 0xE9):
            return real(PatchRequest(req.site, req.new, req.old))  # the old instruction's target
        return opcode, target

    monkeypatch.setattr(patcher_mod, "_decode_for_int3", stale)
    v = run_scenario(Scenario(protocol="bp-batch", operation="retarget", **CHEAP), 0).verdict
    assert {"missed-call", "extra-call"} <= set(v.failed_classes), v.summary()
    assert not v.accounting["exact"]


def test_a_ret_shorter_than_its_site_needs_int3_padding_or_the_old_tail(ckernel):
    """text_poke_bp accepts a ret shorter than the site when int3 pads the rest (Linux since 5.17), or
    when it is written over the first byte alone, the old tail left (5.10 to 5.16); nothing else."""
    from cpus import Machine, MachineConfig

    m = Machine(MachineConfig(cpus=2, seed=0), ckernel.boot_image())
    try:
        p = Patcher(m, ckernel)
        tramp = ckernel.symbols["__SCT__sc0"]
        old = m.read(tramp, 5)
        with pytest.raises(PatchError, match="padded with int3"):
            p.validate([PatchRequest(tramp, old, bytes.fromhex("c390909090"))], "bp")
        assert p.validate([PatchRequest(tramp, old, RET_PADDED)], "bp")
        assert p.validate([PatchRequest(tramp, old, b"\xc3" + old[1:])], "bp")
        assert patcher_mod._decode_for_int3(PatchRequest(tramp, old, RET_PADDED)) == (0xC3, 0)
    finally:
        m.close()


def test_client_needs_the_c_kernel_and_its_protocols():
    with pytest.raises(ConfigError, match="--kernel c"):
        Scenario(client="static-call", kernel="asm")
    with pytest.raises(ConfigError, match="patched with"):
        Scenario(client="static-call", kernel="c", protocol="stop-machine-ftrace")


def test_without_the_int3_padding_the_ret_is_an_sls_exposure_and_nothing_else():
    """The padding after a NULL static call's `ret` is never executed architecturally: Linux adds it
    against straight-line speculation. A lone `ret` over the first byte (Linux 5.10-5.16) leaves the
    old call's tail behind it, which the oracle flags as `sls-exposure`, and only that: the same
    run without the check is safe, with the same accounting and the same trace."""
    sc = Scenario(protocol="bp-batch", operation="retarget-unpadded", **CHEAP)
    o = run_scenario(sc, 0)
    v = o.verdict
    assert v.failed_classes == ["sls-exposure"], v.summary()
    assert all(x.code[0] == 0xC3 and x.code[1:] != b"\xcc" * 4 for x in v.violations)
    assert v.accounting["exact"]
    loose = run_scenario(Scenario(**{**sc.as_dict(), "sls_check": False}), 0)
    assert loose.verdict.ok and loose.verdict.trace_hash == v.trace_hash, loose.verdict.summary()
    padded = run_scenario(Scenario(protocol="bp-batch", operation="retarget", **CHEAP), 0).verdict
    assert padded.ok, padded.summary()


def test_a_protocol_from_outside_is_checked_against_the_requests_each_step_makes():
    """Scenario checks a user's protocol before any run, with the requests of every step of the
    operation (retarget, null, restore), each from the bytes the previous step left."""
    from textpoke.clients import resolve_client

    client = resolve_client("static-call")
    k = build_kernel(KernelConfig(kernel="c", nr_traced=2, nmi_funcs=2))
    sites = client.targets(Scenario(**CHEAP), k)
    now = {s: k.patchable[s] for s in sites}
    seen = []
    for step, _ in client.operations["retarget"]:
        reqs = client.requests[step](k, sites, now)
        assert reqs and all(r.old == now[r.site] for r in reqs)
        seen.append({r.new[0] for r in reqs})
        now |= {r.site: r.new for r in reqs}
    assert seen == [{0xE8, 0xE9}, {0x0F, 0xC3}, {0xE8, 0xE9}]
    Scenario(protocol="textpoke.protocols:text_poke_bp_batch", operation="retarget", **CHEAP)
