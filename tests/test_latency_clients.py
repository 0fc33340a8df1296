"""`textpoke latency` and `textpoke run` for the static-call, kprobe and optprobe clients: the counts
each protocol implies, the grace-period waits, and the refusals."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import run_cli

from cpus import ConfigError
from textpoke import demo
from textpoke.latency import LatencyConfig, check, measure


def row(client: str, protocol: str, step: str, sites: int, cpus: int = 3):
    kernel = "c" if client == "static-call" else "asm"
    return measure(
        LatencyConfig(client=client, protocol=protocol, step=step, sites=sites, cpus=cpus, kernel=kernel, warmup=8000)
    )


# -- static calls: a text_poke_bp per site, or one batch ----------------------------------------------
@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("step", ["retarget", "null", "restore"])
def test_static_call_bp_is_three_syncs_per_site_and_the_batch_three(calls, step):
    one = row("static-call", "bp", step, calls)
    batch = row("static-call", "bp-batch", step, calls)
    # every static call of the C kernel has a trampoline and two call sites, and each step changes all three
    assert one.requests == batch.requests == 3 * calls
    assert one.syncs == 3 * one.requests  # static_call_update: a text_poke_bp per site
    assert batch.syncs == 3
    assert one.step == batch.step == step
    assert one.grace_wait == batch.grace_wait == 0  # no grace period anywhere
    assert one.patch_latency_cycles > batch.patch_latency_cycles


def test_static_call_under_stop_machine_syncs_nothing_and_stops_every_cpu():
    r = row("static-call", "stop-machine", "retarget", 1, cpus=4)
    assert r.syncs == 0 and r.int3_hits == 0 and r.grace_wait == 0
    assert r.rendezvous_cycles > 0 and r.max_interruption_cycles > r.patch_latency_cycles // 4


# -- probes: a sync per probe; grace periods where Linux waits -----------------------------------------
@pytest.mark.parametrize("probes", [1, 3])
def test_kprobe_register_is_a_sync_per_probe_and_waits_for_no_grace_period(probes):
    r = row("kprobe", "kprobe", "register", probes)
    assert (r.requests, r.syncs, r.operations) == (probes, probes, 1)
    assert r.grace_wait == 0


@pytest.mark.parametrize("probes", [1, 3])
def test_kprobe_unregister_waits_for_a_grace_period_before_freeing_each_slot(probes):
    r = row("kprobe", "kprobe", "unregister", probes)
    assert (r.requests, r.syncs) == (probes, probes)
    assert 0 < r.grace_wait < r.patch_latency_cycles
    # one grace period per probe: every one waits for each other CPU to finish a workload iteration
    assert r.grace_wait > (probes - 1) * 1000


def test_optprobe_steps_count_an_arm_and_an_optimization_per_probe():
    reg = row("optprobe", "optprobe", "register", 2)
    # per probe: arm (int3, sync), a grace period, then text_poke_bp of the jmp (3 syncs)
    assert (reg.operations, reg.requests, reg.syncs) == (4, 4, 8)
    assert 0 < reg.grace_wait < reg.patch_latency_cycles
    unreg = row("optprobe", "optprobe", "unregister", 2)
    # per probe: jmp -> int3 + tail (2 syncs), then disarmed as a kprobe (1 sync) and a grace period
    assert (unreg.operations, unreg.requests, unreg.syncs) == (4, 4, 6)
    assert 0 < unreg.grace_wait < unreg.patch_latency_cycles


def test_the_optprobe_mutation_without_the_wait_has_no_grace_wait():
    """The wait is what grace_wait measures: the protocol without it (the mutation) shows none."""
    from cpus import Machine, MachineConfig
    from textpoke.clients import resolve_client
    from textpoke.latency import _kernel, _StepArgs, _targets
    from textpoke.patcher import Patcher

    cfg = LatencyConfig(client="optprobe", protocol="optprobe", sites=1, cpus=2, kernel="asm")
    kernel = _kernel(cfg)
    sites = _targets(cfg, kernel)
    m = Machine(MachineConfig(cpus=2, seed=0), kernel.boot_image("emulate"), [])
    m.watch(sites)
    p = Patcher(m, kernel)
    m.run(4000)
    op = dict(resolve_client("optprobe").operations["toggle"])["register"]
    op(p, sites, _StepArgs("optprobe", "optprobe-no-wait"))
    assert [r.grace_wait for r in p.reports] == [0, 0]
    op2 = dict(resolve_client("optprobe").operations["toggle"])["unregister"]
    op2(p, sites, _StepArgs("optprobe"))
    assert p.reports[-1].grace_wait > 0
    m.close()


# -- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"client": "kprobe", "protocol": "bp", "kernel": "asm"}, "client kprobe is patched with kprobe, not bp"),
        ({"client": "static-call", "protocol": "kprobe", "kernel": "c"}, "not kprobe"),
        ({"client": "ftrace", "protocol": "optprobe"}, "protocol optprobe patches probes only"),
        ({"client": "static-call", "step": "register", "kernel": "c"}, "no step 'register'"),
        ({"client": "kprobe", "protocol": "kprobe", "rt_cpus": (1,), "kernel": "asm"}, "no RT task"),
        ({"client": "optprobe", "protocol": "optprobe", "sites": 65, "kernel": "asm"}, "at most 64 probes"),
        ({"client": "static-call", "kernel": "asm"}, "use --kernel c"),
    ],
)
def test_a_bad_latency_config_is_refused(kw, message):
    with pytest.raises(ConfigError, match=message):
        LatencyConfig(**kw)


def test_more_static_calls_than_the_kernel_has_is_refused_by_the_check():
    with pytest.raises(ConfigError, match="8 static calls; cannot retarget 9"):
        check(LatencyConfig(client="static-call", sites=9, kernel="c"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--client", "kprobe", "--protocols", "bp-batch"], "client kprobe is patched with kprobe, not bp-batch"),
        (["--client", "ftrace", "--steps", "enable"], "--steps is for static-call, kprobe and optprobe"),
        (["--client", "optprobe", "--steps", "retarget"], "no step 'retarget'"),
        (["--client", "kprobe", "--rt-cpus", "1"], "no RT task"),
        (["--client", "static-call", "--sites", "9"], "cannot retarget 9"),
        (["--client", "jump-label", "--sites", "100"], "cannot patch 100"),
        (["--client", "static-call", "--protocols", "ftrace-linux"], "ftrace-linux is ftrace's own sequence"),
    ],
)
def test_latency_refuses_before_any_output(capsys, tmp_path, argv, message):
    rc, out, err = run_cli(capsys, "latency", *argv, "--cpus", "2", "--seeds", "1", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert out == ""  # no progress line, no table before the error
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o" / "latency.png").exists()


def test_latency_cli_probe_client_rows_a_step_each_with_grace_wait(capsys, tmp_path):
    path = tmp_path / "lat.json"
    rc, out, _ = run_cli(
        capsys, "latency", "--client", "kprobe", "--cpus", "2", "--sites", "2", "--seeds", "1", "--jobs", "1",
        "--quiet", "--out", str(tmp_path), "--json", str(path),
    )  # fmt: skip
    assert rc == 0
    assert "grace wait" in out and "register" in out and "unregister" in out
    data = json.loads(path.read_text())
    rows = {r["step"]: r for r in data["rows"]}
    assert set(rows) == {"register", "unregister"}  # the default steps, the default protocol
    assert {r["protocol"] for r in data["rows"]} == {"kprobe"}
    assert rows["register"]["grace_wait"] == 0 < rows["unregister"]["grace_wait"]
    assert rows["register"]["rt_lateness"] == []  # the preemptible kernel: no RT task
    assert {s["step"] for s in data["summary"]} == {"register", "unregister"}


# -- run --client ---------------------------------------------------------------------------------------
def test_run_kprobe_has_a_column_per_step_and_catches_the_slot_freed_early(capsys, tmp_path, monkeypatch):
    small = {"cpus": 3, "sites": 2, "nmi": "none", "nmi_rate": 0, "warmup": 2000, "settle": 2000}
    rows = tuple((label, replace(sc, **small), draw) for label, sc, draw in demo.rows_for("kprobe"))
    monkeypatch.setattr(demo, "rows_for", lambda client: rows)
    path = tmp_path / "run.json"
    rc, out, _ = run_cli(
        capsys, "run", "--client", "kprobe", "--jobs", "1", "--out", str(tmp_path), "--json", str(path)
    )
    assert rc == 0
    header = next(line for line in out.splitlines() if "scenario" in line)
    assert "register" in header and "unregister" in header and "enable" not in header
    assert (tmp_path / "timeline.png").exists()
    data = json.loads(path.read_text())
    assert [r["steps"] for r in data] == [["register", "unregister"]] * len(rows)
    for r in data:
        assert r["syncs"] == [2, 2]  # a sync per probe, each way
        grace = r["grace_wait"]
        if r["scenario"]["mutation"] == "kprobe-slot-freed-early":
            assert grace == [0, 0]
            assert "unhandled-int3" in r["violations"]  # a CPU ran the poisoned slot
            assert "textpoke replay 0 --client kprobe" in out
        else:
            assert grace[0] == 0 < grace[1]
            assert r["violations"] == {}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--client", "kprobe", "--protocol", "naive-bytes"], "client kprobe is patched with kprobe, not naive-bytes"),
        (["--client", "optprobe", "--kernel", "c"], "use --kernel asm"),
        (["--client", "static-call", "--object", "tests/objects/pktfilter.c"], "drop --object"),
    ],
)
def test_run_refuses_a_client_it_cannot_run_before_any_output(capsys, tmp_path, argv, message):
    rc, out, err = run_cli(capsys, "run", *argv, "--out", str(tmp_path))
    assert rc == 2 and out == ""
    assert len(err) == 1 and message in err[0]


def test_a_spin_loop_that_ends_quanta_where_they_began_is_progress_not_a_hang():
    """multi_cpu_stop waits in a two-instruction loop; at 16 CPUs with the RT task the horizon kept
    ending that CPU's quanta on the loop's first instruction, which the machine took for an
    instruction it could not execute: the CPU 'crashed' and the operation hung at 1,135,260 cycles."""
    cfg = LatencyConfig(client="jump-label", protocol="stop-machine", cpus=16, sites=8, seed=2, kernel="c")
    row = measure(replace(cfg, rt_cpus=(1, 15)))
    assert row.patch_latency_cycles < 200_000
    assert set(row.stage_cycles) >= {"prepare", "run"}
