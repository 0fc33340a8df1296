"""Latency experiments: what one patch operation costs, as CPUs and batch sizes grow.

One run boots a machine, lets the workloads run, enables ftrace on `sites` sites with one protocol
(or, with another `client`, enables that client's first `sites` sites: the jump-label client's
static keys, say) and measures, from the patcher's point of view and from every other CPU's:

patch_latency_cycles  from the operation's start to its return, on the patcher CPU
stall (per CPU)       cycles a CPU spent away from its workload because of the patch: in the sync
                      IPI's handler, in the stop_machine stopper, in int3 traps
total_lost_cycles     the patcher's latency plus every other CPU's stall
syncs, ipis (IPIs received), ipi_sends (ICR writes), int3_hits, and who the patcher waited for longest;
stop_machine's stage times; `protocol="ftrace-linux"` measures ftrace_modify_all_code's enable;
grace_wait            cycles the patcher waited for grace periods (the probe clients: a kprobe's slot
                      is freed after one, an optprobe's jmp is written after one)

Other clients measure one step of their operation (`step`, `LATENCY_STEPS`): static-call's
retarget, null or restore of the first `sites` static calls (each its trampoline and call sites),
the kprobe and optprobe clients' register or unregister of `sites` probes. The steps before the
measured one (a retarget before a null, a register before an unregister) are performed first and
the machine left to settle; they are not measured. A probe client's kernel is the assembly kernel
built with probes, which is preemptible: its local timer is the scheduler tick on every workload
CPU (as in `textpoke.scenario`), so it has no RT task (`rt_cpus` must be empty) and its
interruptions include the tick's preemptions.

and from a real-time task's point of view (`metrics.InterruptionMeter`, `textpoke.rt`):

max_interruption_cycles  per CPU, the longest stretch during the operation in which that CPU could
                         not run a newly woken task (in a handler, or interrupts off); the worst
                         over the CPUs other than the patcher
rt_lateness_*            wake-up lateness of the periodic RT task on `rt_cpus` for the timer
                         expiries that fell inside the operation: p50, p99, max
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cpus import ConfigError, CostModel, Machine, MachineConfig, SnoopModel, TextpokeError, TimerSource

from .clients import Client, resolve_client
from .image import KPROBE_MAX, PREEMPT_TICK_PERIOD, KernelConfig, KernelImage, Percpu, build_kernel
from .metrics import InterruptionMeter, StallMeter
from .patcher import NmiReachableWarning, Patcher, PatchReport
from .protocols import PROBE_PROTOCOLS
from .rt import lateness_stats, overruns, read_samples, recorded, rt_timer, setup_rt_task

__all__ = [
    "DEFAULT_PROTOCOLS",
    "LATENCY_STEPS",
    "LatencyConfig",
    "LatencyRow",
    "check",
    "default_steps",
    "measure",
    "rt_cpus_for",
    "rt_summary",
]

#: per client: the steps of its operation that can be measured (the operation they belong to)
LATENCY_STEPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ftrace": ("enable", ("enable",)),
    "jump-label": ("enable", ("enable",)),
    "static-call": ("retarget", ("retarget", "null", "restore")),
    "kprobe": ("toggle", ("register", "unregister")),
    "optprobe": ("toggle", ("register", "unregister")),
}
#: per client: the protocols measured when none are named
DEFAULT_PROTOCOLS: dict[str, tuple[str, ...]] = {
    "ftrace": ("bp", "bp-batch", "stop-machine"),
    "jump-label": ("bp", "bp-batch", "stop-machine"),
    "static-call": ("bp", "bp-batch", "stop-machine"),
    "kprobe": ("kprobe",),
    "optprobe": ("optprobe",),
}


def default_steps(client: str) -> tuple[str, ...]:
    """The steps measured when none are named: static-call's retarget, both steps of a probe client."""
    if client == "static-call":
        return ("retarget",)
    return LATENCY_STEPS[client][1] if client in LATENCY_STEPS else ("enable",)


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
    #: ELF objects to build the kernel from (their first `sites` sites are patched)
    objects: tuple[str, ...] = ()
    kernel: str = "asm"  # the built-in workload and traced functions: asm or c
    #: CPUs running the periodic RT task (not the patcher: it runs the operation as Python code)
    rt_cpus: tuple[int, ...] = ()
    rt_period: int = 10_000
    #: what is patched (`textpoke.clients`): its "enable" operation on its first `sites` sites, or
    #: (static-call, kprobe, optprobe) the step `step` of its operation
    client: str = "ftrace"
    #: the step measured (`LATENCY_STEPS`); None: the client's first
    step: str | None = None

    def __post_init__(self) -> None:
        client = resolve_client(self.client)
        if self.client not in LATENCY_STEPS:
            raise ConfigError(f"client {self.client} has no operation latency can measure")
        if self.step is not None and self.step not in LATENCY_STEPS[self.client][1]:
            raise ConfigError(
                f"client {self.client} has no step {self.step!r} to measure; choose from "
                + ", ".join(LATENCY_STEPS[self.client][1])
            )
        if self.client != "ftrace":
            if self.protocol == "ftrace-linux":
                raise ConfigError("ftrace-linux is ftrace's own sequence; measure the client with a protocol")
            if client.protocols is not None and self.protocol not in client.protocols:
                raise ConfigError(
                    f"client {self.client} is patched with {', '.join(sorted(client.protocols))}, not {self.protocol}"
                )
        if self.protocol in PROBE_PROTOCOLS and self.client != self.protocol:
            raise ConfigError(f"protocol {self.protocol} patches probes only: use it with --client {self.protocol}")
        if client.kernel is not None and not self.objects and self.kernel != client.kernel:
            raise ConfigError(
                f"client {self.client} has its sites in the {client.kernel} kernel: use --kernel {client.kernel}"
            )
        if self.probes:
            if self.objects:
                raise ConfigError(
                    f"client {self.client} probes the built-in assembly kernel's traced functions; drop --object"
                )
            if self.rt_cpus:
                raise ConfigError(
                    f"client {self.client} runs on the kernel built with probes, which is preemptible: its local "
                    "timer is the scheduler tick, and it has no RT task (use --rt-cpus with nothing after it)"
                )
            if self.sites > KPROBE_MAX:
                raise ConfigError(
                    f"client {self.client} holds at most {KPROBE_MAX} probes at once; use --sites {KPROBE_MAX} or fewer"
                )
        if self.client == "static-call" and self.objects:
            raise ConfigError("static-call latency retargets the C kernel's static calls; drop --object")
        for c in self.rt_cpus:
            if not 1 <= c < self.cpus:
                raise ConfigError(
                    f"RT task CPU {c}: choose among CPUs 1..{self.cpus - 1} (CPU 0 is the patcher, "
                    "whose work is Python code that takes no interrupts)"
                )

    @property
    def probes(self) -> bool:
        """The kernel is built with probes (a probe client's)."""
        return bool(resolve_client(self.client).extra.get("probes"))

    @property
    def measured_step(self) -> str:
        return self.step if self.step is not None else LATENCY_STEPS[self.client][1][0]


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
    #: the longest interruption of each CPU other than the patcher, and the worst of them
    interruption_by_cpu: dict[int, int] = field(default_factory=dict)
    max_interruption_cycles: int = 0
    #: lateness of every RT task wake-up whose expiry fell inside the operation, and its summary
    rt_lateness: list[int] = field(default_factory=list)
    rt_lateness_p50: float | None = None
    rt_lateness_p99: float | None = None
    rt_lateness_max: float | None = None
    rt_overruns: int = 0
    ipi_sends: int = 0
    #: stop_machine: cycles each multi_cpu_stop stage took, as the caller saw it
    stage_cycles: dict[str, int] = field(default_factory=dict)
    client: str = "ftrace"
    step: str = "enable"
    #: patch requests the step made (static-call: a trampoline and its call sites per static call)
    requests: int = 0
    #: cycles the patcher waited for grace periods (kprobe slots freed, optprobes optimized)
    grace_wait: int = 0
    #: patch operations the step took (an optprobe step: two per probe)
    operations: int = 1

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [list(p) for p in self.phases]
        return d


def _kernel(cfg: LatencyConfig) -> KernelImage:
    if cfg.objects:
        return build_kernel(KernelConfig(objects=cfg.objects))
    nr = max(cfg.functions, cfg.sites)
    return build_kernel(KernelConfig(nr_traced=nr, kernel=cfg.kernel, probes=cfg.probes))


def _targets(cfg: LatencyConfig, kernel: KernelImage) -> list[int]:
    """The sites the measured operation patches, or ConfigError when the kernel has too few."""
    if cfg.client == "ftrace":
        if len(kernel.sites) < cfg.sites:
            raise ConfigError(f"the objects have {len(kernel.sites)} ftrace sites; cannot patch {cfg.sites}")
        return [kernel.site_of(i) for i in range(cfg.sites)]
    if cfg.client == "static-call":  # a unit is a static call: its trampoline and its call sites
        from .clients.static_call import static_calls

        calls = static_calls(kernel)
        if len(calls) < cfg.sites:
            raise ConfigError(f"this kernel has {len(calls)} static calls; cannot retarget {cfg.sites}")
        return [addr for call in calls[: cfg.sites] for addr, _tail in call.patched]
    client_sites = resolve_client(cfg.client).sites(kernel)
    if len(client_sites) < cfg.sites:
        raise ConfigError(f"this kernel has {len(client_sites)} {cfg.client} sites; cannot patch {cfg.sites}")
    return client_sites[: cfg.sites]


def check(cfg: LatencyConfig) -> None:
    """Everything `measure` would refuse about `cfg` before it runs the machine (the kernel is built)."""
    _targets(cfg, _kernel(cfg))


@dataclass(frozen=True)
class _StepArgs:
    """What a client's step reads of its scenario: the protocol and the mutation."""

    protocol: str
    mutation: str | None = None


def _run_step(client: Client, name: str, patcher: Patcher, sites: list[int], args: _StepArgs) -> list[PatchReport]:
    """Perform the client's step `name` on `sites`; its reports (an optprobe step makes two per probe)."""
    op = dict(client.operations[LATENCY_STEPS[client.name][0]])[name]
    before = len(patcher.reports)
    op(patcher, sites, args)  # type: ignore[arg-type]  # a step reads only protocol and mutation
    reports = patcher.reports[before:]
    if not reports:
        raise TextpokeError(f"{client.name} {name}: the step patched nothing")
    for r in reports:
        if r.hung or r.incomplete:
            raise TextpokeError(f"{client.name} {name} with {args.protocol} did not finish: {r.hung or r.incomplete}")
    return reports


def _merge(reports: list[PatchReport]) -> PatchReport:
    """The operations of one step as one report: from the first's start to the last's end."""
    if len(reports) == 1:
        return reports[0]
    first = reports[0]
    return replace(
        first,
        requests=tuple(q for r in reports for q in r.requests),
        end=reports[-1].end,
        syncs=[s for r in reports for s in r.syncs],
        ipis=sum(r.ipis for r in reports),
        rendezvous=sum(r.rendezvous for r in reports),
        release=sum(r.release for r in reports),
        stages=[s for r in reports for s in r.stages],
        ipi_sends=sum(r.ipi_sends for r in reports),
        nmi_wait=sum(r.nmi_wait for r in reports),
        phases=[p for r in reports for p in r.phases],
        grace_wait=sum(r.grace_wait for r in reports),
    )


def measure(cfg: LatencyConfig, meter: StallMeter | None = None) -> LatencyRow:
    kernel = _kernel(cfg)
    sites = _targets(cfg, kernel)
    client = resolve_client(cfg.client)
    step = cfg.measured_step
    meter = meter or StallMeter(iret_cost=cfg.costs.iret + cfg.costs.instruction)
    interruptions = InterruptionMeter(iret_cost=cfg.costs.iret + cfg.costs.instruction)
    timers: tuple[TimerSource, ...] = (rt_timer(cfg.rt_cpus, cfg.rt_period),) if cfg.rt_cpus else ()
    if cfg.probes:  # the kernel with probes is preemptible: the scheduler tick on every workload CPU
        timers = (TimerSource("preempt", period=PREEMPT_TICK_PERIOD),)
    mc = MachineConfig(
        cpus=cfg.cpus,
        seed=cfg.seed,
        quantum=cfg.quantum,
        fine_quantum=cfg.fine_quantum,
        costs=cfg.costs,
        snoop=SnoopModel(),
        timer_sources=timers,
    )
    m = Machine(mc, kernel.boot_image("emulate"), [meter, interruptions])
    interruptions.probe_irqoff(m)
    rt_cpus = setup_rt_task(m) if cfg.rt_cpus else ()
    busy_cpus = [c for c in range(1, cfg.cpus)] if cfg.busy else []
    for c in busy_cpus:
        _irqoff(m, c, mask=3, length=max(cfg.irqoff_len // 10, 1))
    if cfg.irqoff_cpu:
        _irqoff(m, cfg.irqoff_cpu, mask=1, length=cfg.irqoff_len)
    if cfg.preempt_off_cpu:
        _irqoff(m, cfg.preempt_off_cpu, mask=1, length=cfg.preempt_off_len)
        m.write(m.layout.percpu_va(cfg.preempt_off_cpu) + Percpu.PREEMPT_OFF, struct.pack("<Q", 1))
    m.watch(sites)
    patcher = Patcher(m, kernel, timeout=2_000_000_000, ipi_shorthand=cfg.ipi_shorthand)
    m.run(cfg.warmup)
    args = _StepArgs(cfg.protocol)
    steps = LATENCY_STEPS[cfg.client][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NmiReachableWarning)  # no NMIs in latency runs
        if cfg.client not in ("ftrace", "jump-label") and steps.index(step):
            for name in steps[: steps.index(step)]:  # the steps before the measured one, unmeasured
                _run_step(client, name, patcher, sites, args)
            m.run(cfg.warmup)
        meter.reset()
        rt_before = {c: recorded(m, c) for c in rt_cpus}
        rt_overruns = sum(overruns(m, c) for c in rt_cpus)
        int3_before = sum(c.stats["int3"] for c in m.cpus)
        reports: list[PatchReport]
        if cfg.protocol == "ftrace-linux":  # ftrace_modify_all_code's enable
            reports = [patcher.ftrace_modify_all_code(True, sites)]
        elif cfg.client == "jump-label":
            reqs = client.requests["enable"](kernel, sites, {})
            reports = [patcher.patch(reqs, protocol=cfg.protocol)]
        elif cfg.client == "ftrace":
            reports = [patcher.enable_ftrace(sites, protocol=cfg.protocol)]
        else:
            reports = _run_step(client, step, patcher, sites, args)
    report = _merge(reports)
    unfinished = [r.hung or r.incomplete for r in reports if r.hung or r.incomplete]
    if unfinished:  # a latency of an operation that never finished is no figure
        raise TextpokeError(
            f"{cfg.client} {step} with {cfg.protocol} on {cfg.cpus} CPUs (seed {cfg.seed}) "
            f"did not finish: {unfinished[0]}"
        )
    m.run(2_000)  # let the last handlers return
    drained = m.now()
    others = [c for c in range(cfg.cpus) if c != mc.patcher_cpu]
    worst = {c: interruptions.longest(c, report.start, drained) for c in others}
    # a tick that expired during the operation may be taken a little after it: read until drained
    lateness = [
        x.lateness
        for c in rt_cpus
        for x in read_samples(m, c, rt_before[c], strict=False)  # a very long operation keeps its last
        if report.start <= x.expected <= report.end
    ]
    rt = lateness_stats(lateness)
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
        int3_hits=sum(c.stats["int3"] for c in m.cpus) - int3_before,
        stall_by_kind=dict(meter.by_kind),
        waited_longest_for=max(last, key=lambda c: (last[c], -c)) if last else None,
        sync_waits=[s.wait for s in report.syncs],
        rendezvous_cycles=report.rendezvous,
        phases=report.phases,
        interruption_by_cpu=worst,
        max_interruption_cycles=max(worst.values(), default=0),
        rt_lateness=lateness,
        rt_lateness_p50=rt["p50"],
        rt_lateness_p99=rt["p99"],
        rt_lateness_max=rt["max"],
        rt_overruns=sum(overruns(m, c) for c in rt_cpus) - rt_overruns,
        ipi_sends=report.ipi_sends,
        stage_cycles={name: end - start for name, start, end in report.stages},
        client=cfg.client,
        step=step,
        requests=len(report.requests),
        grace_wait=report.grace_wait,
        operations=len(reports),
    )


def _irqoff(m: Machine, cpu: int, mask: int, length: int) -> None:
    base = m.layout.percpu_va(cpu)
    m.write(base + Percpu.IRQOFF_MASK, struct.pack("<Q", mask))
    m.write(base + Percpu.IRQOFF_LEN, struct.pack("<Q", length))


def rt_cpus_for(spec: Sequence[int], cpus: int) -> tuple[int, ...]:
    """The RT task's CPUs on a `cpus`-CPU machine: negative entries count from the end (-1 is the
    last CPU), so one list fits every CPU count of a sweep."""
    out = set()
    for c in spec:
        real = cpus + c if c < 0 else c
        if not 1 <= real < cpus:
            raise ConfigError(f"RT task CPU {c} does not exist (or is the patcher) on a {cpus}-CPU machine")
        out.add(real)
    return tuple(sorted(out))


def rt_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The real-time figures of one configuration over its seeds: the worst interruption over CPUs
    and seeds (a worst case is not averaged), and lateness percentiles over every sample pooled."""
    stats = lateness_stats([x for r in rows for x in r["rt_lateness"]])
    return {
        "max_interruption_cycles": max(r["max_interruption_cycles"] for r in rows),
        "rt_samples": sum(len(r["rt_lateness"]) for r in rows),
        "rt_lateness_p50": stats["p50"],
        "rt_lateness_p99": stats["p99"],
        "rt_lateness_max": stats["max"],
        "rt_overruns": sum(r["rt_overruns"] for r in rows),
    }
