"""Configuration of an emulated machine: CPU count, seed, scheduling, costs, event sources.

Every field is validated when the object is made, so a bad configuration fails before anything runs,
with a message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .coherence import SnoopModel
from .errors import ConfigError

__all__ = [
    "DEFAULT_INTERLEAVE",
    "DEFAULT_QUANTUM",
    "INTERLEAVES",
    "MAX_COST",
    "MAX_CPUS",
    "MAX_INSTRUCTION_COST",
    "NMI_CPUS",
    "CostModel",
    "MachineConfig",
    "NmiSource",
    "TimerSource",
]

#: Each CPU is a Unicorn instance (about 3 MiB resident, 16 MiB of reserved code buffer).
MAX_CPUS = 128
#: mean scheduling quantum (instructions) outside patch steps; see README "Model and its limits"
DEFAULT_QUANTUM = 1000
#: how CPUs interleave (cpus/scheduler.py): "exact" runs each CPU coarsely up to its next interaction
#: with an agent and orders every interaction exactly; "fine" is the older scheduler, which runs
#: every CPU in quanta of 1..fine_quantum instructions while an agent asks for it
INTERLEAVES = ("exact", "fine")
DEFAULT_INTERLEAVE = "exact"
#: where a watched site gets an exit (`Engine.set_exit`, so that it starts a translated block):
#: "needed" skips the sites the image names as block starts (function entries, reached only by a
#: jump or a call); "all" puts one at every site (slower: Unicorn re-examines the translated code in
#: front of every exit after every run) and must give the same trace
SITE_EXITS = ("needed", "all")
#: where the exact scheduler hooks shared code: where control comes into a unit, or every block
SHARED_HOOKS = ("entries", "all")
#: the largest cost of one event, in cycles (400 us at 2.5 GHz, a hundred times a real text_poke):
#: beyond it a run is no longer a model of a machine, and a patch operation would take hours to simulate
MAX_COST = 1_000_000
#: the largest cost of one retired instruction
MAX_INSTRUCTION_COST = 1_000
#: which CPUs NMI sources reach by default: every one, or every one but the patcher
NMI_CPUS = ("all", "workers")


@dataclass(frozen=True, slots=True)
class CostModel:
    """Cycles charged for what is not a plain instruction (nominal 2.5 GHz core).

    Every default and where it comes from is in the README ("Cost model"); override any of them
    with `--cost NAME=CYCLES` or a `[costs]` table in a config file.
    """

    instruction: int = 1  # per retired instruction (IPC of about 1 for kernel code)
    event_entry: int = 150  # delivering an interrupt, exception or NMI through the IDT
    iret: int = 80  # executing iretq
    ipi_send: int = 300  # the sender's ICR write, per target
    ipi_latency: int = 2000  # from the ICR write to the target's interrupt controller
    text_write: int = 3000  # one text_poke(): map the page in the poking mm, copy, unmap, flush
    poll: int = 60  # one round of a spin-wait loop on a shared line
    stopper_wakeup: int = 5000  # scheduling the stop_machine stopper thread on a woken CPU

    def __post_init__(self) -> None:
        # every cost is at least one cycle: a free poll would make a spin-wait spin without time passing
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            high = MAX_INSTRUCTION_COST if name == "instruction" else MAX_COST
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"cost {name} must be a whole number of cycles, got {v!r}")
            if not 1 <= v <= high:
                raise ConfigError(f"cost {name} must be between 1 and {high:,} cycles, got {v:,}")


@dataclass(frozen=True, slots=True)
class NmiSource:
    """A periodic NMI source (perf counter overflow, watchdog) on a set of CPUs.

    Each target CPU gets its own arrivals: the first uniformly in [start, start + period), then every
    `period` cycles plus a uniform jitter of +- `jitter` * period, drawn from the run's seed.
    """

    name: str = "perf"
    period: int = 20_000
    jitter: float = 0.25
    cpus: tuple[int, ...] | None = None  # None: the machine's `nmi_cpus`
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.period, int) or self.period < 1:
            raise ConfigError(f"NMI source {self.name!r}: period must be a positive integer of cycles")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"NMI source {self.name!r}: jitter must be in [0, 1), got {self.jitter}")
        if self.start < 0:
            raise ConfigError(f"NMI source {self.name!r}: start must be >= 0")


@dataclass(frozen=True, slots=True)
class TimerSource:
    """A periodic timer on a set of CPUs: the local APIC timer in periodic mode.

    Each target CPU's timer raises the maskable interrupt `vector` every `period` cycles exactly (it
    counts a crystal clock: no jitter), from a first expiry drawn from the run's seed in
    [start, start + period). The interrupt waits while IF=0 like any other; an expiry while the
    vector is still pending merges with it (the APIC has one request bit per vector).

    `resolution` is a measuring aid, not hardware: while an expiry waits for IF=1, the machine ends
    that CPU's quanta at least every `resolution` cycles, so the moment the interrupt is finally
    taken (inside a quantum, at a `popfq` or an `iretq`) is stamped at most that many cycles early.
    """

    name: str = "apic-timer"
    period: int = 10_000
    cpus: tuple[int, ...] | None = None  # None: every CPU but the patcher
    start: int = 0
    vector: int = 0xEC  # LOCAL_TIMER_VECTOR
    resolution: int = 16

    def __post_init__(self) -> None:
        for name in ("period", "resolution"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"timer {self.name!r}: {name} must be a positive integer of cycles, got {v!r}")
        if not isinstance(self.start, int) or self.start < 0:
            raise ConfigError(f"timer {self.name!r}: start must be >= 0")
        if not 32 <= self.vector <= 255:
            raise ConfigError(f"timer {self.name!r}: vector must be an external interrupt vector (32-255)")


@dataclass(frozen=True, slots=True)
class MachineConfig:
    cpus: int = 4
    seed: int = 0
    #: mean scheduling quantum, in instructions; each quantum is drawn uniformly from [1, 2*quantum-1]
    quantum: int = DEFAULT_QUANTUM
    #: largest quantum around patch steps, down to 1 instruction: while an agent asks for it
    #: (`Fine`) and for `fine_window` cycles after every text write
    fine_quantum: int = 4
    fine_window: int = 1000
    snoop: SnoopModel = field(default_factory=SnoopModel)
    #: FRED-style NMI unblocking: only the return from the NMI's own frame unblocks NMIs
    fred: bool = False
    nmi_sources: tuple[NmiSource, ...] = ()
    timer_sources: tuple[TimerSource, ...] = ()
    costs: CostModel = field(default_factory=CostModel)
    patcher_cpu: int = 0
    #: which CPUs an NMI source without its own `cpus` reaches: "all" (the patcher is an ordinary
    #: CPU and takes NMIs too) or "workers" (every CPU but the patcher)
    nmi_cpus: str = "all"
    #: keep every trace record in memory (the hash is always computed)
    keep_trace: bool = False
    interleave: str = DEFAULT_INTERLEAVE
    #: looser than the SDM: every event delivery (interrupt, exception, NMI) also serializes the
    #: CPU, as the model once assumed; the SDM lists no delivery among serializing operations
    delivery_serializes: bool = False
    site_exits: str = "needed"
    #: the exact scheduler's hooks on code shared with agents: "entries" (where control comes into
    #: a unit) or "all" (every block of it; slower, the same traces: cpus/scheduler.py)
    shared_hooks: str = "entries"

    def __post_init__(self) -> None:
        if not isinstance(self.cpus, int) or isinstance(self.cpus, bool):
            raise ConfigError(f"cpus must be an integer, got {self.cpus!r}")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise ConfigError(f"cpus must be between 1 and {MAX_CPUS}, got {self.cpus}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.quantum, int) or self.quantum < 1:
            raise ConfigError(f"quantum must be a positive integer, got {self.quantum!r}")
        if not isinstance(self.fine_quantum, int) or self.fine_quantum < 1:
            raise ConfigError(f"fine_quantum must be a positive integer, got {self.fine_quantum!r}")
        if not isinstance(self.fine_window, int) or self.fine_window < 0:
            raise ConfigError(f"fine_window must be a non-negative integer, got {self.fine_window!r}")
        if self.interleave not in INTERLEAVES:
            raise ConfigError(f"interleave must be one of {', '.join(INTERLEAVES)}, got {self.interleave!r}")
        if self.site_exits not in SITE_EXITS:
            raise ConfigError(f"site_exits must be one of {', '.join(SITE_EXITS)}, got {self.site_exits!r}")
        if self.shared_hooks not in SHARED_HOOKS:
            raise ConfigError(f"shared_hooks must be one of {', '.join(SHARED_HOOKS)}, got {self.shared_hooks!r}")
        if not 0 <= self.patcher_cpu < self.cpus:
            raise ConfigError(f"patcher_cpu {self.patcher_cpu} is not a CPU of a {self.cpus}-CPU machine")
        s = self.snoop
        if (s.min_delay is None) != (s.max_delay is None) or (
            s.min_delay is not None and not 0 <= s.min_delay <= s.max_delay  # type: ignore[operator]
        ):
            raise ConfigError(f"snoop model needs 0 <= min_delay <= max_delay (or both None), got {s}")
        if self.nmi_cpus not in NMI_CPUS:
            raise ConfigError(f"nmi_cpus must be one of {', '.join(NMI_CPUS)}, got {self.nmi_cpus!r}")
        for src in self.nmi_sources:
            for c in src.cpus or ():
                if not 0 <= c < self.cpus:
                    raise ConfigError(f"NMI source {src.name!r} targets CPU {c}, which does not exist")
        for t in self.timer_sources:
            for c in t.cpus or ():
                if not 0 <= c < self.cpus:
                    raise ConfigError(f"timer {t.name!r} targets CPU {c}, which does not exist")

    def nmi_targets(self, src: NmiSource | TimerSource | None = None) -> tuple[int, ...]:
        """The CPUs `src` reaches (with no source: the CPUs NMI sources reach by default)."""
        if src is not None and src.cpus is not None:
            return src.cpus
        if isinstance(src, TimerSource) or self.nmi_cpus == "workers":  # a timer's default: not the patcher
            return tuple(c for c in range(self.cpus) if c != self.patcher_cpu)
        return tuple(range(self.cpus))
