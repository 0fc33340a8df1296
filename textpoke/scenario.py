"""Scenarios: one seeded run of a machine, a workload, a patch protocol and the oracle.

A scenario boots the machine with every patchable site observed, lets the workloads run, performs
its patch operations with the chosen protocol, lets the machine settle, drains every workload to the
end of an iteration (so every call in flight has completed) and returns the oracle's verdict with
the run's seed and trace hash. The same scenario and seed give the same verdict and trace hash.
"""

from __future__ import annotations

import contextlib
import gc
import shlex
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cpus import ConfigError, Machine, MachineConfig, NmiSource, SnoopModel, TimerSource, Vector
from cpus.config import DEFAULT_INTERLEAVE, DEFAULT_QUANTUM, INTERLEAVES, MAX_CPUS, NMI_CPUS
from cpus.layout import TEXT_VA

from .clients import client_names, resolve_client, steps_of
from .image import (
    BP_COMPILED_ONLY,
    BP_ENTRIES,
    KERNELS,
    KPROBE_SLOT_SIZE,
    NMI_ENTRIES,
    PREEMPT_TICK_PERIOD,
    KernelConfig,
    Percpu,
    build_kernel,
)
from .oracle import XMC_RULES, FirstViolation, SafetyOracle, Verdict, snoop_for
from .patcher import NmiReachableWarning, Patcher, PatchReport
from .plugins import resolve_mutation, resolve_protocol
from .protocols import PROBE_PROTOCOLS, build

__all__ = ["IPI_MODES", "OPERATIONS", "Outcome", "Scenario", "client_names", "replay_command", "run_scenario"]

#: what a scenario does to the sites, per client (`textpoke.clients`): operation -> its steps
OPERATIONS = {name: tuple(step for step, _ in steps) for name, steps in resolve_client("ftrace").operations.items()}
#: how a sync reaches the other CPUs: one all-but-self shorthand while every CPU is online (Linux),
#: or always one IPI per target
IPI_MODES = ("shorthand", "per-target")


@dataclass(frozen=True)
class Scenario:
    protocol: str = "bp-batch"
    int3: str = "emulate"  # skip | emulate | emulate-nogap
    cpus: int = 4
    sites: int = 8  # traced functions, every one of them patched
    operation: str = "toggle"
    mutation: str | None = None
    nmi: str = "none"  # "none", or the NMI entry: naive, nested-safe, latch-cmpxchg, ...
    #: perf-like NMIs per million cycles on each CPU `nmi_cpus` names (a watchdog adds one eighth of that)
    nmi_rate: int = 0
    #: aim extra NMIs at a window of the entry: "exit-window", "repeat" or "latch-window"
    nmi_aim: str | None = None
    aim_probability: float = 0.5
    fred: bool = False
    warmup: int = 4_000
    settle: int = 4_000
    quantum: int = DEFAULT_QUANTUM
    snoop: tuple[int, int] | None = (200, 10_000)
    irqoff_len: int = 0  # > 0: workloads run interrupts-off sections of this many spins
    #: indices of the traced functions to patch (None: all of them)
    patch_sites: tuple[int, ...] | None = None
    #: "exact" or "fine": how the CPUs interleave (cpus/scheduler.py)
    interleave: str = DEFAULT_INTERLEAVE
    #: ELF objects (paths) whose functions are the traced functions and whose textpoke_workload the
    #: workload CPUs call (`sites` then does not apply: every site of the objects is patched)
    objects: tuple[str, ...] = ()
    #: the built-in workload and traced functions: "asm" or "c" (the same, compiled from C)
    kernel: str = "asm"
    #: which CPUs the NMI sources reach: "all" (the patcher too, as in Linux) or "workers"
    nmi_cpus: str = "all"
    #: the cross-modifying-code rule the oracle judges by: "linux" (text_poke_bp's) or "sdm"
    xmc_rule: str = "linux"
    #: sync IPIs: one all-but-self shorthand (Linux, every CPU online) or one per target
    ipi: str = "shorthand"
    #: looser than the SDM: every event delivery serializes the CPU that takes it
    delivery_serializes: bool = False
    #: flag a `ret` a patch left with bytes other than int3 behind it (see oracle: sls-exposure)
    sls_check: bool = True
    #: what is patched (`textpoke.clients`): ftrace sites, jump labels, static calls, kprobes ...
    client: str = "ftrace"
    #: probe clients: the probability that a workload CPU is preempted (the scheduler tick, aimed)
    #: right after a probe's first instruction -- inside an optprobe's range, or in a kprobe's slot
    preempt_aim: float = 0.0
    #: end each run at its first violation: the same seeds are caught, by the same first class, and
    #: a caught seed costs only its prefix (later events and counts are not simulated)
    stop_at_first: bool = False

    def __post_init__(self) -> None:
        protocol = resolve_protocol(self.protocol)  # a built-in, an entry point or module:function
        if self.int3 not in BP_ENTRIES:
            raise ConfigError(f"unknown int3 mode {self.int3!r}; choose from {', '.join(BP_ENTRIES)}")
        if self.int3 in BP_COMPILED_ONLY and self.kernel == "asm" and not self.objects:
            raise ConfigError(f"int3 mode {self.int3} exists in kernels with compiled code only: use --kernel c")
        client = resolve_client(self.client)
        steps_of(client, self.operation)
        if client.protocols is not None and protocol.builtin and self.protocol not in client.protocols:
            raise ConfigError(
                f"client {client.name} is patched with {', '.join(sorted(client.protocols))}, not {self.protocol}"
            )
        if self.protocol in PROBE_PROTOCOLS and self.protocol not in (client.protocols or ()):
            raise ConfigError(f"protocol {self.protocol} patches probes only: use it with --client {self.protocol}")
        if client.kernel is not None and not self.objects and self.kernel != client.kernel:
            raise ConfigError(
                f"client {client.name} has its sites in the {client.kernel} kernel: use --kernel {client.kernel}"
            )
        if client.check is not None:
            client.check(self)
        if not 0.0 <= self.preempt_aim <= 1.0:
            raise ConfigError(f"preempt_aim is a probability, between 0 and 1, got {self.preempt_aim}")
        if self.preempt_aim and not client.extra.get("probes"):
            raise ConfigError("preempt_aim aims the preemptible kernel's tick at probes: use a probe client")
        if self.ipi not in IPI_MODES:
            raise ConfigError(f"unknown IPI mode {self.ipi!r}; choose from {', '.join(IPI_MODES)}")
        if self.nmi != "none" and self.nmi not in NMI_ENTRIES:
            raise ConfigError(f"unknown NMI entry {self.nmi!r}; choose none or {', '.join(NMI_ENTRIES)}")
        if self.nmi_rate < 0 or self.nmi_rate > 200_000:
            raise ConfigError(f"nmi_rate must be between 0 and 200000 per million cycles, got {self.nmi_rate}")
        if self.nmi_aim is not None:
            if self.nmi_aim not in AIMS:
                raise ConfigError(f"unknown NMI aim {self.nmi_aim!r}; choose from {', '.join(AIMS)}")
            if self.nmi == "none" or aim_symbol(self) is None:
                raise ConfigError(f"NMI aim {self.nmi_aim!r} needs an NMI entry that has that window")
        if self.interleave not in INTERLEAVES:
            raise ConfigError(f"unknown interleave {self.interleave!r}; choose from {', '.join(INTERLEAVES)}")
        if self.kernel not in KERNELS:
            raise ConfigError(f"unknown kernel {self.kernel!r}; choose from {', '.join(KERNELS)}")
        if self.kernel != "asm" and self.objects:
            raise ConfigError("objects replace the built-in workload and traced functions; the kernel must be asm")
        if self.nmi_cpus not in NMI_CPUS:
            raise ConfigError(f"unknown NMI CPU set {self.nmi_cpus!r}; choose from {', '.join(NMI_CPUS)}")
        if self.xmc_rule not in XMC_RULES:
            raise ConfigError(
                f"unknown cross-modifying-code rule {self.xmc_rule!r}; choose from {', '.join(XMC_RULES)}"
            )
        mutation = resolve_mutation(self.mutation) if self.mutation is not None else None
        if not 2 <= self.cpus <= MAX_CPUS:
            raise ConfigError(f"cpus must be between 2 and {MAX_CPUS} (one patcher, one workload at least)")
        if not 2 <= self.sites <= 256:
            raise ConfigError(f"sites must be between 2 and 256, got {self.sites}")
        if self.patch_sites is not None and (
            not self.patch_sites or any(not 0 <= i < self.sites for i in self.patch_sites)
        ):
            raise ConfigError(f"patch_sites must name sites 0..{self.sites - 1}")
        if not protocol.builtin or (mutation is not None and not mutation.builtin):
            check_operations(self)  # a user's steps are checked before any run starts

    def label(self) -> str:
        parts = [
            *([f"client={self.client}"] if self.client != "ftrace" else []),
            self.protocol,
            f"int3={self.int3}",
            f"cpus={self.cpus}",
            f"sites={self.sites}",
            self.operation,
        ]
        if self.mutation:
            parts.append(f"mutation={self.mutation}")
        if self.preempt_aim:
            parts.append(f"preempt-aim={self.preempt_aim}")
        if self.nmi != "none":
            parts.append(f"nmi={self.nmi} rate={self.nmi_rate}")
            if self.nmi_aim:
                parts.append(f"aim={self.nmi_aim}")
            if self.nmi_cpus != "all":
                parts.append(f"nmi-cpus={self.nmi_cpus}")
        if self.fred:
            parts.append("fred")
        if self.objects:
            parts[3 + (self.client != "ftrace")] = "objects=" + ",".join(Path(o).name for o in self.objects)
        if self.kernel != "asm":
            parts.append(f"kernel={self.kernel}")
        if self.xmc_rule != "linux":
            parts.append(f"xmc={self.xmc_rule}")
        if self.delivery_serializes:
            parts.append("delivery-serializes")
        if not self.sls_check:
            parts.append("no-sls-check")
        if self.ipi != "shorthand":
            parts.append(f"ipi={self.ipi}")
        return " ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outcome:
    """A scenario's run: the verdict plus what the operations cost."""

    scenario: Scenario
    verdict: Verdict
    reports: list[PatchReport] = field(default_factory=list)
    machine: Machine | None = None
    #: (step, first report, end) per step performed: that step's reports are reports[first:end] (one
    #: per step for most clients; an optprobe step makes two per probe)
    steps: list[tuple[str, int, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "seed": v.seed,
            "trace_hash": v.trace_hash,
            "ok": v.ok,
            "incomplete": v.incomplete,
            "violations": dict(v.counts),
            "accounting_exact": v.accounting.get("exact"),
            "operations": [
                {
                    "protocol": r.protocol,
                    "sites": len(r.requests),
                    "latency": r.latency,
                    "syncs": len(r.syncs),
                    "ipis": r.ipis,
                    "ipi_sends": r.ipi_sends,
                    "hung": r.hung,
                    "incomplete": r.incomplete,
                }
                for r in self.reports
            ],
        }


AIMS = {"exit-window": "nmi_exit_window", "repeat": "repeat_nmi_copy", "latch-window": "nmi_latch_window"}


def aim_symbol(sc: Scenario) -> str | None:
    """The inner label of the chosen NMI entry that `sc.nmi_aim` names, if the entry has it."""
    if sc.nmi_aim is None or sc.nmi == "none":
        return None
    entry = NMI_ENTRIES[sc.nmi][0]
    for family in ("nmi_entry_nested", "nmi_entry_latch"):
        if entry.startswith(family):
            name = AIMS[sc.nmi_aim] + entry[len(family) :]
            return name if name in _kernel(sc).symbols else None
    return None


def _kernel(sc: Scenario):
    if sc.objects:
        kernel = build_kernel(KernelConfig(objects=tuple(sc.objects)))
        if not kernel.sites:
            raise ConfigError("the objects have no ftrace sites: compile them with -pg -mfentry")
        return kernel
    nmi_funcs = min(4, 1 << (sc.sites.bit_length() - 1))
    probes = bool(resolve_client(sc.client).extra.get("probes"))  # CONFIG_KPROBES
    return build_kernel(KernelConfig(nr_traced=sc.sites, nmi_funcs=nmi_funcs, kernel=sc.kernel, probes=probes))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a machine runs. A seed allocates tens of thousands of
    short-lived records and frames, which trigger a collection every few hundred allocations, each
    walking every object of the process; what a seed leaves in cycles (a machine and its hooks) is
    collected once it is back on. About 3% of a seed (measured on the default scenario)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def run_scenario(
    sc: Scenario,
    seed: int,
    keep_trace: bool = False,
    keep_machine: bool = False,
    extra_instruments: Sequence[object] = (),
) -> Outcome:
    with _collector_paused():
        return _run_scenario(sc, seed, keep_trace, keep_machine, extra_instruments)


def _run_scenario(
    sc: Scenario,
    seed: int,
    keep_trace: bool,
    keep_machine: bool,
    extra_instruments: Sequence[object],
) -> Outcome:
    kernel = _kernel(sc)
    sources: tuple[NmiSource, ...] = ()
    if sc.nmi != "none" and sc.nmi_rate:
        period = max(1, 1_000_000 // sc.nmi_rate)
        sources = (NmiSource("perf", period=period, jitter=0.3), NmiSource("watchdog", period=8 * period, jitter=0.05))
    snoop = snoop_for(sc.xmc_rule, SnoopModel(*sc.snoop) if sc.snoop else SnoopModel(None, None))
    # a kernel built with probes is preemptible: a scheduler tick on every workload CPU
    ticks = (TimerSource("preempt", period=PREEMPT_TICK_PERIOD),) if kernel.config.probes else ()
    cfg = MachineConfig(
        cpus=sc.cpus,
        seed=seed,
        quantum=sc.quantum,
        fred=sc.fred,
        nmi_sources=sources,
        snoop=snoop,
        keep_trace=keep_trace,
        nmi_cpus=sc.nmi_cpus,
        interleave=sc.interleave,
        delivery_serializes=sc.delivery_serializes,
        timer_sources=ticks,
    )
    oracle = SafetyOracle(kernel, sc.cpus, xmc_rule=sc.xmc_rule, sls_check=sc.sls_check, stop_at_first=sc.stop_at_first)
    nmi_entry = sc.nmi if sc.nmi != "none" else "naive"
    m = Machine(cfg, kernel.boot_image(sc.int3, nmi_entry), [oracle, *extra_instruments])
    oracle.attach(m)
    aim = aim_symbol(sc)
    if aim is not None:
        m.aim_nmi(kernel.symbols[aim], sc.aim_probability, label=sc.nmi_aim or "aimed")
    for extra in extra_instruments:
        if hasattr(extra, "machine"):
            extra.machine = m
        if hasattr(extra, "violation"):
            oracle.sinks.append(extra.violation)
    if sc.irqoff_len:
        for c in range(sc.cpus):
            m.write(m.layout.percpu_va(c) + Percpu.IRQOFF_MASK, struct.pack("<Q", 7))
            m.write(m.layout.percpu_va(c) + Percpu.IRQOFF_LEN, struct.pack("<Q", sc.irqoff_len))
    m.watch(resolve_client(sc.client).sites(kernel))
    if sc.preempt_aim:
        for addr in preempt_aims(kernel, len(_targets(sc, kernel)), sc.client):
            m.aim_irq(addr, sc.preempt_aim, int(Vector.TIMER), label="preempt-aim")
    # a wait without progress for the patcher's stall window is hung (a CPU never answers); an
    # operation that runs out of its budget (scaled with its work) while progressing is incomplete
    patcher = Patcher(m, kernel, skip_mode=sc.int3 == "skip", ipi_shorthand=sc.ipi == "shorthand")
    patcher.listeners.append(oracle)
    patcher.listeners.extend(e for e in extra_instruments if hasattr(e, "on_op_start"))

    targets = _targets(sc, kernel)
    steps: list[tuple[str, int, int]] = []
    try:
        m.run(sc.warmup)
        with warnings.catch_warnings():
            # the oracle judges what NMIs do to the sites; the patcher's warning would only repeat it
            warnings.simplefilter("ignore", NmiReachableWarning)
            _operate(sc, m, patcher, targets, steps)
        drained = drain(m)
    except FirstViolation as first:
        m.trace.add((m.now(), -1, "stopped", first.kind))
        drained = False
    verdict = oracle.verdict(m, seed, drained)
    verdict.stats = {
        "cpu": m.stats(),
        "int3_hits": sum(oracle.int3_hits.values()),
        "nmi_delivered": sum(c.stats["nmi_delivered"] for c in m.cpus),
        "nmi_raised": sum(c.stats["nmi_raised"] for c in m.cpus),
        "nmi_latched": sum(c.stats["nmi_latched"] for c in m.cpus),
        "nmi_dropped": sum(c.stats["nmi_dropped"] for c in m.cpus),
        "nmi_nested": oracle.nmi_counts["nested"],
        "nmi_repeated": oracle.nmi_counts["repeated"],
        "nmi_handler_runs": oracle.nmi_counts["handler_runs"],
    }
    if not keep_machine:
        m.recycle()
    return Outcome(sc, verdict, list(patcher.reports), m if keep_machine else None, steps)


def preempt_aims(kernel, count: int, client: str) -> list[int]:
    """Where aimed preemption strikes: the second instruction of every optprobe range (optprobe),
    or the jmp back of each of the first `count` kprobe slots (kprobe: slots are handed out in order)."""
    from .kprobes import insn_len

    text = kernel.text
    base = kernel.symbols.get("kprobe_insn_slots", 0)
    if client == "optprobe":
        return [a + insn_len(text[a - TEXT_VA :], a) for a, _n in kernel.optprobe_ranges]
    lengths = sorted({n for _a, n in kernel.kprobe_points})
    return sorted({base + i * KPROBE_SLOT_SIZE + n for i in range(count) for n in lengths})


def check_operations(sc: Scenario) -> None:
    """Build the steps of every operation `sc` performs, for the requests it will make, so that a
    protocol or mutation from outside the package is refused (`ProtocolError`) before any run."""
    kernel = _kernel(sc)
    client = resolve_client(sc.client)
    sites = client.targets(sc, kernel)
    now = {s: kernel.patchable[s] for s in sites}
    for op, _ in steps_of(client, sc.operation):
        make = client.requests.get(op)
        if make is None:
            continue
        reqs = make(kernel, sites, now)
        build(sc.protocol, reqs, sc.mutation)
        now = {r.site: r.new for r in reqs}


def _targets(sc: Scenario, kernel) -> list[int]:
    return resolve_client(sc.client).targets(sc, kernel)


def replay_command(sc: Scenario, seed: int) -> str:
    """The `textpoke replay` command line that reruns this scenario and seed."""
    parts = ["textpoke replay", str(seed)]
    if sc.client != "ftrace":
        parts.append(f"--client {sc.client}")
    parts += [f"--protocol {shlex.quote(sc.protocol)}", f"--int3 {sc.int3}"]
    parts += [f"--cpus {sc.cpus}"]
    parts += [f"--object {shlex.quote(o)}" for o in sc.objects] or [f"--sites {sc.sites}"]
    parts += [f"--operation {sc.operation}"]
    if sc.mutation:
        parts.append(f"--mutation {shlex.quote(sc.mutation)}")
    if sc.nmi != "none":
        parts.append(f"--nmi {sc.nmi} --nmi-rate {sc.nmi_rate}")
        if sc.nmi_aim:
            parts.append(f"--nmi-aim {sc.nmi_aim}")
        if sc.nmi_cpus != "all":
            parts.append(f"--nmi-cpus {sc.nmi_cpus}")
    if sc.fred:
        parts.append("--fred")
    if sc.kernel != "asm":
        parts.append(f"--kernel {sc.kernel}")
    if sc.xmc_rule != "linux":
        parts.append(f"--xmc-rule {sc.xmc_rule}")
    if sc.delivery_serializes:
        parts.append("--delivery-serializes")
    if not sc.sls_check:
        parts.append("--no-sls-check")
    if sc.quantum != Scenario().quantum:
        parts.append(f"--quantum {sc.quantum}")
    if sc.irqoff_len:
        parts.append(f"--irqoff {sc.irqoff_len}")
    if sc.interleave != DEFAULT_INTERLEAVE:
        parts.append(f"--interleave {sc.interleave}")
    if sc.ipi != "shorthand":
        parts.append(f"--ipi {sc.ipi}")
    if sc.preempt_aim:
        parts.append(f"--preempt-aim {sc.preempt_aim}")
    if sc.stop_at_first:
        parts.append("--stop-at-first")
    return " ".join(parts)


def _operate(sc: Scenario, m: Machine, patcher: Patcher, targets: list[int], done: list[tuple[str, int, int]]) -> None:
    """Perform the operation's steps; appends (step, first report, end) to `done` for each step
    performed (kept when the run stops at a violation)."""
    for name, op in steps_of(resolve_client(sc.client), sc.operation):
        first = len(patcher.reports)
        report = op(patcher, targets, sc)
        done.append((name, first, len(patcher.reports)))
        m.run(sc.settle)
        if report is None or report.hung or report.incomplete:
            break


def drain(m: Machine, limit: int = 400_000) -> bool:
    """Let every workload finish its current iteration and stop (hlt), and the patcher CPU finish any
    handler it is in (it takes NMIs too): every call in flight completes. True when all of that
    happened within `limit` cycles."""
    patcher = m.config.patcher_cpu
    workers = [c for c in m.cpus if c.index != patcher and c.runnable]
    for c in workers:
        loops = m.percpu(c.index, Percpu.LOOPS)
        m.write(m.layout.percpu_va(c.index) + Percpu.LOOP_LIMIT, struct.pack("<Q", loops + 1))

    def settled() -> bool:
        return all(not c.runnable for c in workers) and (not m.cpus[patcher].runnable or m.in_idle(patcher))

    m.run(limit, stop_when=settled)
    return all(c.halted for c in workers) and (not m.cpus[patcher].alive or m.in_idle(patcher))
