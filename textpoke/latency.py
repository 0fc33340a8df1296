"""Latency experiments: what one patch operation costs, as CPUs and batch sizes grow.

One run boots a machine, lets the workloads run, enables ftrace on `sites` sites with one protocol and
measures, from the patcher's point of view and from every other CPU's:

patch_latency_cycles  from the operation's start to its return, on the patcher CPU
stall (per CPU)       cycles a CPU spent away from its workload because of the patch: in the sync
                      IPI's handler, in the stop_machine stopper, in int3 traps
total_lost_cycles     the patcher's latency plus every other CPU's stall
syncs, ipis (IPIs received), ipi_sends (ICR writes), int3_hits, and who the patcher waited for longest;
stop_machine's stage times; `protocol="ftrace-linux"` measures ftrace_modify_all_code's enable
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from cpus import CostModel, Machine, MachineConfig, SnoopModel

from .image import KernelConfig, Percpu, build_kernel
from .metrics import StallMeter
from .patcher import NmiReachableWarning, Patcher

__all__ = ["LatencyConfig", "LatencyRow", "measure"]


@dataclass(frozen=True)
class LatencyConfig:
    protocol: str = "bp-batch"
    cpus: int = 4
    sites: int = 8
    seed: int = 0
    #: every workload CPU runs interrupts-off sections (a loaded machine, as in Bristot's test)
    busy: bool = False
    #: this CPU runs long interrupts-off sections (0: none)
    irqoff_cpu: int = 0
    irqoff_len: int = 20_000
    functions: int = 256  # traced functions the workloads call; the first `sites` of them are patched
    warmup: int = 20_000
    costs: CostModel = field(default_factory=CostModel)
    quantum: int = 1000
    fine_quantum: int = 200
    #: sync IPIs as one all-but-self shorthand (Linux, every CPU online) or one per target
    ipi_shorthand: bool = True
    #: this CPU runs long preempt-off sections (interrupts on): a stopper woken there waits (0: none)
    preempt_off_cpu: int = 0
    preempt_off_len: int = 20_000


@dataclass
class LatencyRow:
    protocol: str
    cpus: int
    sites: int
    seed: int
    busy: bool
    irqoff_cpu: int
    patch_latency_cycles: int
    mean_stall_cycles: float
    max_stall_cycles: int
    total_lost_cycles: int
    syncs: int
    ipis: int
    int3_hits: int
    stall_by_kind: dict[str, int]
    waited_longest_for: int | None  # the CPU whose acknowledgement came last, most often
    sync_waits: list[int]
    rendezvous_cycles: int
    phases: list[tuple[int, int, str]]
    ipi_sends: int = 0
    #: stop_machine: cycles each multi_cpu_stop stage took, as the caller saw it
    stage_cycles: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [list(p) for p in self.phases]
        return d


def measure(cfg: LatencyConfig, meter: StallMeter | None = None) -> LatencyRow:
    nr = max(cfg.functions, cfg.sites)
    kernel = build_kernel(KernelConfig(nr_traced=nr))
    meter = meter or StallMeter(iret_cost=cfg.costs.iret + cfg.costs.instruction)
    mc = MachineConfig(
        cpus=cfg.cpus,
        seed=cfg.seed,
        quantum=cfg.quantum,
        fine_quantum=cfg.fine_quantum,
        costs=cfg.costs,
        snoop=SnoopModel(),
    )
    m = Machine(mc, kernel.boot_image("emulate"), [meter])
    busy_cpus = [c for c in range(1, cfg.cpus)] if cfg.busy else []
    for c in busy_cpus:
        _irqoff(m, c, mask=3, length=max(cfg.irqoff_len // 10, 1))
    if cfg.irqoff_cpu:
        _irqoff(m, cfg.irqoff_cpu, mask=1, length=cfg.irqoff_len)
    if cfg.preempt_off_cpu:
        _irqoff(m, cfg.preempt_off_cpu, mask=1, length=cfg.preempt_off_len)
        m.write(m.layout.percpu_va(cfg.preempt_off_cpu) + Percpu.PREEMPT_OFF, struct.pack("<Q", 1))
    sites = [kernel.site_of(i) for i in range(cfg.sites)]
    m.watch(sites)
    patcher = Patcher(m, kernel, timeout=2_000_000_000, ipi_shorthand=cfg.ipi_shorthand)
    m.run(cfg.warmup)
    meter.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NmiReachableWarning)  # no NMIs in latency runs
        if cfg.protocol == "ftrace-linux":  # ftrace_modify_all_code's enable
            report = patcher.ftrace_modify_all_code(True, sites)
        else:
            report = patcher.enable_ftrace(sites, protocol=cfg.protocol)
    m.run(2_000)  # let the last handlers return
    others = [c for c in range(cfg.cpus) if c != mc.patcher_cpu]
    stalls = [meter.stall.get(c, 0) for c in others]
    last: dict[int, int] = {}
    for s in report.syncs:
        if s.targets:
            slow = max(zip(s.acked_after, s.targets, strict=True))[1]
            last[slow] = last.get(slow, 0) + 1
    return LatencyRow(
        protocol=cfg.protocol,
        cpus=cfg.cpus,
        sites=cfg.sites,
        seed=cfg.seed,
        busy=cfg.busy,
        irqoff_cpu=cfg.irqoff_cpu,
        patch_latency_cycles=report.latency,
        mean_stall_cycles=sum(stalls) / len(stalls) if stalls else 0.0,
        max_stall_cycles=max(stalls, default=0),
        total_lost_cycles=report.latency + sum(stalls),
        syncs=len(report.syncs),
        ipis=report.ipis,
        int3_hits=sum(c.stats["int3"] for c in m.cpus),
        stall_by_kind=dict(meter.by_kind),
        waited_longest_for=max(last, key=lambda c: (last[c], -c)) if last else None,
        sync_waits=[s.wait for s in report.syncs],
        rendezvous_cycles=report.rendezvous,
        phases=report.phases,
        ipi_sends=report.ipi_sends,
        stage_cycles={name: end - start for name, start, end in report.stages},
    )


def _irqoff(m: Machine, cpu: int, mask: int, length: int) -> None:
    base = m.layout.percpu_va(cpu)
    m.write(base + Percpu.IRQOFF_MASK, struct.pack("<Q", mask))
    m.write(base + Percpu.IRQOFF_LEN, struct.pack("<Q", length))
