"""The patcher on a running machine: validation, round trips, protocols judged by the oracle."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpus import Machine, MachineConfig
from textpoke.image import FTRACE_NOP, call_bytes
from textpoke.oracle import SafetyOracle
from textpoke.patcher import Patcher, PatchError
from textpoke.protocols import BP_MUTATIONS, PatchRequest
from textpoke.scenario import Scenario, run_scenario
from textpoke.sweep import run_one


@pytest.fixture
def rig(kernel):
    oracle = SafetyOracle(kernel, 4)
    m = Machine(MachineConfig(cpus=4, seed=3), kernel.boot_image("emulate"), [oracle])
    m.watch(kernel.sites.values())
    p = Patcher(m, kernel)
    p.listeners.append(oracle)
    m.run(3_000)
    return m, p, oracle


def text(m) -> bytes:
    return m.read(m.text_lo, m.text_hi - m.text_lo)


def test_enable_then_disable_restores_the_text(rig, kernel):
    """An enable-then-disable round trip restores the text byte for byte."""
    m, p, oracle = rig
    before = text(m)
    p.enable_ftrace(protocol="bp-batch")
    assert all(m.read(s, 1) == b"\xe8" for s in kernel.sites.values())
    m.run(5_000)
    p.disable_ftrace(protocol="bp")
    assert text(m) == before
    assert not oracle.counts


def bad_requests(kernel, m):
    site = kernel.site_of(2)
    call = call_bytes(site, kernel.symbols["ftrace_caller"])
    body = site + 5  # the instruction after the site: a boundary, but no patchable site
    return [
        ([PatchRequest(0xFFFFFFFF90000000, FTRACE_NOP, call)], "bp", "not inside the kernel text"),
        ([PatchRequest(site + 1, m.read(site + 1, 5), call)], "bp", "not an instruction boundary"),
        ([PatchRequest(body, m.read(body, 5), call)], "bp", "not a patchable site"),
        ([PatchRequest(site, bytes.fromhex("e800000000"), call)], "bp", "not the expected"),
        ([PatchRequest(site, FTRACE_NOP, bytes.fromhex("b801000000"))], "bp", "cannot emulate"),
        ([PatchRequest(site, FTRACE_NOP, bytes.fromhex("ffffffffff"))], "stop-machine", "not one 5-byte"),
        ([PatchRequest(site, FTRACE_NOP, call), PatchRequest(site, FTRACE_NOP, call)], "bp", "overlaps"),
        ([PatchRequest(site, FTRACE_NOP, call)], "teleport", "unknown protocol"),
        ([], "bp", "nothing to patch"),
    ]


def test_bad_requests_are_named_and_change_nothing(rig, kernel):
    """Every bad request raises a PatchError naming the problem; the text stays as it was."""
    m, p, _ = rig
    for reqs, protocol, message in bad_requests(kernel, m):
        before = text(m)
        with pytest.raises(PatchError, match=message):
            p.patch(reqs, protocol)
        assert text(m) == before
        assert p.reports == []


def test_disable_and_retarget_need_enabled_sites(rig, kernel):
    _m, p, _ = rig
    with pytest.raises(PatchError, match="not enabled"):
        p.disable_ftrace([kernel.site_of(0)])
    with pytest.raises(PatchError, match="nothing to retarget"):
        p.retarget([kernel.site_of(0)])
    with pytest.raises(PatchError, match="unknown tracer"):
        p.enable_ftrace(tracer="printk")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["patch", "--site", "fn_001", "--new", "b801000000"], "cannot emulate"),
        (["patch", "--site", "0xffffffff81000001", "--new", "e800000000"], "not an instruction boundary"),
        (["patch", "--site", "nosuch", "--new", "e800000000"], "no symbol"),
        (["safety", "--cpus", "1", "--seeds", "1"], "argument --cpus: 1 is out of range: must be between 2"),
    ],
)
def test_cli_refuses_bad_input_with_the_message(argv, message):
    r = subprocess.run([sys.executable, "-m", "textpoke.cli", *argv], capture_output=True, text=True)
    assert r.returncode == 2
    assert message in " ".join(r.stderr.split())


SAFE = [
    Scenario(protocol="bp", int3="emulate"),
    Scenario(protocol="bp", int3="skip"),
    Scenario(protocol="bp-batch", int3="emulate"),
    Scenario(protocol="bp-batch", int3="skip"),
    Scenario(protocol="stop-machine"),
]


@pytest.mark.parametrize("sc", SAFE, ids=lambda s: f"{s.protocol}-{s.int3}")
def test_safe_protocols_have_no_violation(sc):
    """text_poke_bp (both modes, single and batched) and stop_machine: no violation, and in emulate
    mode (and stop_machine) every traced call is accounted for exactly. (500 seeds: see README.)"""
    for seed in range(12):
        r = run_one(sc, seed)
        assert r.ok, (seed, r.first)
        assert r.accounting_exact
        assert r.int3_hits > 0 or sc.protocol == "stop-machine"


@pytest.mark.parametrize("protocol", ["naive-bytes", "naive-atomic"])
def test_unsafe_baselines_are_caught(protocol):
    results = [run_one(Scenario(protocol=protocol), seed) for seed in range(6)]
    assert sum(not r.ok for r in results) >= 3


#: mutation -> seeds within which the oracle must catch it (single-site text_poke_bp, 4 CPUs)
CAUGHT_WITHIN = {
    "no-sync-after-int3": 4,
    "no-sync-after-tail": 8,
    "no-final-sync": 4,
    "tail-before-int3": 2,
    "first-before-tail": 2,
    "early-withdraw": 6,  # with the all-but-self shorthand and the #BP bsearch: first caught at seed 5
}


@pytest.mark.parametrize("mutation", list(BP_MUTATIONS))
def test_oracle_catches_each_protocol_mutation(mutation):
    n = CAUGHT_WITHIN[mutation]
    caught = [s for s in range(n) if not run_one(Scenario(protocol="bp", mutation=mutation), s).ok]
    assert caught, f"{mutation} survived {n} seeds"


def test_oracle_catches_emulation_without_the_stack_gap():
    """The pre-5.2 entry: an emulated call pushes onto the int3 frame; caught within 2 seeds."""
    caught = [s for s in range(2) if not run_one(Scenario(protocol="bp", int3="emulate-nogap"), s).ok]
    assert caught


def test_skip_mode_drops_calls_during_a_retarget_and_emulate_does_not():
    """The 2019 livepatch problem: skipping a call -> call site loses the call."""
    skip = run_one(Scenario(protocol="bp-batch", int3="skip", operation="retarget"), 1)
    emulate = run_one(Scenario(protocol="bp-batch", int3="emulate", operation="retarget"), 1)
    assert skip.counts.get("missed-call", 0) > 0
    assert set(skip.counts) == {"missed-call"}
    assert emulate.ok and emulate.accounting_exact


def test_replay_reproduces_the_sweep_trace():
    sc = Scenario(protocol="naive-atomic")
    assert run_one(sc, 5).trace_hash == run_scenario(sc, 5, keep_trace=True).verdict.trace_hash


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subset=st.sets(st.integers(0, 7), min_size=1, max_size=8),
    cpus=st.integers(2, 5),
    seed=st.integers(0, 10_000),
    protocol=st.sampled_from(["bp", "bp-batch"]),
)
def test_bp_protocols_never_violate(subset, cpus, seed, protocol):
    """For any subset of sites, CPU count and seed, text_poke_bp finds no violation."""
    sc = Scenario(protocol=protocol, cpus=cpus, patch_sites=tuple(sorted(subset)), warmup=1500, settle=1500)
    r = run_one(sc, seed)
    assert r.ok, r.first
    assert r.accounting_exact


def test_safety_cli_writes_the_promised_json(tmp_path):
    """`textpoke safety --json` carries the keys users script against."""
    import json

    out = tmp_path / "s.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "textpoke.cli",
            "safety",
            "--protocol",
            "naive-atomic",
            "--seeds",
            "3",
            "--jobs",
            "1",
            "--quiet",
            "--nmi",
            "nested-safe",
            "--nmi-rate",
            "100",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    for key in (
        "protocol",
        "cpus",
        "seeds",
        "seeds_with_violation",
        "violations",
        "failing_seeds",
        "trace_hashes",
        "nmi",
        "nmi_rate",
    ):
        assert key in d
    assert d["seeds"] == 3 and d["protocol"] == "naive-atomic" and d["nmi"] == "nested-safe"
    assert d["seeds_with_violation"] == len(d["failing_seeds"]) > 0
    assert set(d["trace_hashes"]) == {"0", "1", "2"}


def test_under_the_sdm_rule_text_poke_bp_itself_is_flagged():
    """The first-byte exemption is Linux's (an informal vendor assurance), not the SDM's: judged by the
    SDM's rule, text_poke_bp executes modified sites before serializing; by Linux's rule it is safe.
    Same seed, same run (same trace hash): only the judgement differs. (50 seeds each: README.)"""
    sc = Scenario(protocol="bp-batch", sites=4, warmup=2000, settle=2000)
    for seed in range(2):
        linux = run_one(sc, seed)
        sdm = run_one(replace(sc, xmc_rule="sdm"), seed)
        assert linux.ok and set(sdm.counts) == {"unsynced-modification"}
        assert linux.trace_hash == sdm.trace_hash
