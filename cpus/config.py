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
    "MAX_CPUS",
    "CostModel",
    "MachineConfig",
    "NmiSource",
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
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"cost model: {name} must be a non-negative integer, got {v!r}")
        if self.instruction < 1:
            raise ConfigError("cost model: instruction must be at least 1 cycle")


@dataclass(frozen=True, slots=True)
class NmiSource:
    """A periodic NMI source (perf counter overflow, watchdog) on a set of CPUs.

    Each target CPU gets its own arrivals: the first uniformly in [start, start + period), then every
    `period` cycles plus a uniform jitter of +- `jitter` * period, drawn from the run's seed.
    """

    name: str = "perf"
    period: int = 20_000
    jitter: float = 0.25
    cpus: tuple[int, ...] | None = None  # None: every CPU but the patcher
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.period, int) or self.period < 1:
            raise ConfigError(f"NMI source {self.name!r}: period must be a positive integer of cycles")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"NMI source {self.name!r}: jitter must be in [0, 1), got {self.jitter}")
        if self.start < 0:
            raise ConfigError(f"NMI source {self.name!r}: start must be >= 0")


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
    costs: CostModel = field(default_factory=CostModel)
    patcher_cpu: int = 0
    #: keep every trace record in memory (the hash is always computed)
    keep_trace: bool = False
    interleave: str = DEFAULT_INTERLEAVE

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
        if not 0 <= self.patcher_cpu < self.cpus:
            raise ConfigError(f"patcher_cpu {self.patcher_cpu} is not a CPU of a {self.cpus}-CPU machine")
        s = self.snoop
        if (s.min_delay is None) != (s.max_delay is None) or (
            s.min_delay is not None and not 0 <= s.min_delay <= s.max_delay  # type: ignore[operator]
        ):
            raise ConfigError(f"snoop model needs 0 <= min_delay <= max_delay (or both None), got {s}")
        for src in self.nmi_sources:
            for c in src.cpus or ():
                if not 0 <= c < self.cpus:
                    raise ConfigError(f"NMI source {src.name!r} targets CPU {c}, which does not exist")

    def nmi_targets(self, src: NmiSource) -> tuple[int, ...]:
        if src.cpus is not None:
            return src.cpus
        return tuple(c for c in range(self.cpus) if c != self.patcher_cpu)
