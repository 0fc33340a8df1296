"""What a real-time task sees: the interruption meter, the local APIC timer and the periodic RT task."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from itertools import pairwise

import pytest

from cpus import ConfigError, CostModel, TimerSource
from textpoke.image import RT_RING_SIZE, Percpu
from textpoke.latency import LatencyConfig, measure, rt_cpus_for
from textpoke.metrics import InterruptionMeter
from textpoke.rt import lateness_stats, overruns, read_samples, rt_timer, setup_rt_task

SPIN = 3  # instructions (cycles) per iteration of the workload's interrupts-off spin: pause, dec, jnz


def _irqoff(m, cpu: int, spins: int, mask: int = 1) -> None:
    base = m.layout.percpu_va(cpu)
    m.write(base + Percpu.IRQOFF_MASK, struct.pack("<Q", mask))
    m.write(base + Percpu.IRQOFF_LEN, struct.pack("<Q", spins))


def _rt_machine(make_machine, period: int, quantum: int = 1000, seed: int = 3, cpus: int = 2):
    meter = InterruptionMeter()
    m = make_machine(
        cpus=cpus,
        seed=seed,
        quantum=quantum,
        fine_quantum=quantum,
        keep_trace=True,
        timer_sources=(rt_timer([1], period=period),),
        instruments=[meter],
    )
    meter.probe_irqoff(m)
    setup_rt_task(m)
    return m, meter


def test_irqoff_section_is_an_interruption_at_least_its_length(make_machine):
    spins = 400
    n = SPIN * spins  # cycles the section's spin alone lasts
    meter = InterruptionMeter()
    m = make_machine(cpus=2, seed=1, quantum=1, fine_quantum=1, instruments=[meter])
    meter.probe_irqoff(m)
    _irqoff(m, 1, spins)
    m.run(8_000)
    assert m.percpu(1, Percpu.LOOPS) > 5
    spans = meter.intervals[1]
    assert spans, "the workload ran interrupts-off sections: the meter must see them"
    assert meter.longest(1) >= n
    # with one-instruction quanta the stamps are exact: the section lasts its spin plus pushfq, cli, mov
    assert all(e - s == n + 3 for s, e in spans)
    assert meter.longest(0) == 0  # the idle patcher CPU was never interrupted


def test_meter_sees_the_stopper_hold_every_cpu_and_int3_traps_are_short():
    costs = CostModel()
    stop = measure(LatencyConfig(protocol="stop-machine", cpus=3, sites=4, warmup=3_000))
    bp = measure(LatencyConfig(protocol="bp-batch", cpus=3, sites=4, warmup=3_000))
    # every stopped CPU is held through all four writes
    assert set(stop.interruption_by_cpu) == {1, 2}
    assert min(stop.interruption_by_cpu.values()) >= 4 * costs.text_write
    # text_poke_bp never holds a CPU for more than one handler: an IPI or an int3 trap
    assert 0 < bp.max_interruption_cycles < 2 * (costs.event_entry + costs.iret) + 500
    assert stop.max_interruption_cycles > 20 * bp.max_interruption_cycles


def test_lateness_is_the_entry_cost_when_nothing_interferes(make_machine):
    m, _ = _rt_machine(make_machine, period=4_000)
    m.run(60_000)
    samples = read_samples(m, 1)
    assert len(samples) >= 13
    lateness = [s.lateness for s in samples]
    assert all(0 <= x <= CostModel().event_entry + 8 for x in lateness), lateness
    assert overruns(m, 1) == 0
    # the task kept its own schedule: one period between consecutive expiries
    assert {b.expected - a.expected for a, b in pairwise(samples)} == {4_000}


def test_lateness_covers_the_rest_of_an_irqoff_section(make_machine):
    spins = 2_000  # 6,000-cycle sections, most of the time
    m, meter = _rt_machine(make_machine, period=7_000, quantum=2)
    _irqoff(m, 1, spins, mask=1)
    m.run(80_000)
    samples = read_samples(m, 1)
    covered = 0
    for s in samples:
        for start, end in meter.intervals[1]:
            if start <= s.expected < end:
                covered += 1
                # held back until the section ended (stamps inside a quantum of <= 3 may be early)
                assert s.lateness >= end - s.expected - 3, (s, start, end)
    assert covered >= 3
    assert lateness_stats([s.lateness for s in samples])["max"] >= SPIN * spins / 2


def test_timer_runs_are_deterministic(make_machine):
    hashes = set()
    for _ in range(2):
        m, _ = _rt_machine(make_machine, period=3_000, seed=5)
        _irqoff(m, 1, 500, mask=3)
        m.run(30_000)
        hashes.add((m.trace_hash, tuple(read_samples(m, 1))))
    assert len(hashes) == 1


def test_rdtsc_is_the_cpu_clock(make_machine):
    # with one-instruction quanta every stamp is exact: the task reads the TSC after the delivery
    # and its three pushes
    m, _ = _rt_machine(make_machine, period=2_000, quantum=1)
    m.run(10_000)
    s = read_samples(m, 1)
    assert len(s) == 5 and all(x.woke - x.expected == CostModel().event_entry + 3 for x in s)


def test_config_errors():
    with pytest.raises(ConfigError, match="period"):
        TimerSource(period=0)
    with pytest.raises(ConfigError, match="vector"):
        TimerSource(vector=3)
    with pytest.raises(ConfigError, match="patcher"):
        LatencyConfig(cpus=4, rt_cpus=(0,))
    with pytest.raises(ConfigError, match="does not exist"):
        rt_cpus_for([5], 4)
    assert rt_cpus_for([1, -1], 2) == (1,)
    assert rt_cpus_for([1, -1], 8) == (1, 7)


def test_percpu_variables_do_not_overlap():
    arrays = {"SCRATCH": 64 * 8, "WL_COUNT": 256 * 8, "FT_COUNT": 256 * 8, "FT_ALT_COUNT": 256 * 8}
    arrays |= {"NMI_CALLS": 256 * 8, "RT_RING": 16 * RT_RING_SIZE}
    spans = sorted((v, v + arrays.get(k, 8), k) for k, v in vars(Percpu).items() if k.isupper() and isinstance(v, int))
    for (_, end, a), (start, _, b) in pairwise(spans):
        assert end <= start, f"per-CPU variables {a} and {b} overlap"
    assert spans[-1][1] <= 0x4000  # the per-CPU area is 16 KiB


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "textpoke.cli", *argv], capture_output=True, text=True)


def test_latency_command_reports_interruptions_and_lateness(tmp_path):
    out = tmp_path / "lat.json"
    r = _cli(
        "latency", "--protocols", "bp-batch", "stop-machine", "--cpus", "3", "--sites", "4", "--seeds", "1",
        "--jobs", "1", "--quiet", "--out", str(tmp_path), "--json", str(out), "--rt-period", "3000",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = {s["protocol"]: s for s in json.loads(out.read_text())["summary"]}
    for s in summary.values():
        assert s["rt_samples"] > 0 and s["rt_lateness_p50"] <= s["rt_lateness_p99"] <= s["rt_lateness_max"]
    stop, bp = summary["stop-machine"], summary["bp-batch"]
    assert stop["max_interruption_cycles"] > 10 * bp["max_interruption_cycles"]
    assert stop["rt_lateness_max"] > 10 * bp["rt_lateness_max"]
    assert "worst interruption" in r.stdout and (tmp_path / "rt.png").stat().st_size > 10_000


def test_latency_command_refuses_the_patcher_as_rt_cpu():
    r = _cli("latency", "--cpus", "2", "--rt-cpus", "0")
    assert r.returncode == 2 and "patcher" in r.stderr
