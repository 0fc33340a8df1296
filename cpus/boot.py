"""What the machine needs from a kernel image to boot its CPUs.

The machine knows nothing about ftrace or patching: a kernel (built by `textpoke.image`) hands it
text and data bytes, the IDT gates, where each CPU starts, which text ranges are patchable (so the
fetch-coherence model watches them), which code touches state shared with agents, and where its
`iretq`/`popfq` instructions are (the machine executes `iretq` itself and watches `popfq` for
interrupts that become deliverable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .delivery import Gate

__all__ = ["BootImage"]


@dataclass(frozen=True)
class BootImage:
    text: bytes  # placed at layout.TEXT_VA
    data: bytes  # placed at layout.IMAGE_DATA_VA
    gates: dict[int, Gate]  # vector -> gate
    worker_entry: int  # where non-patcher CPUs start
    idle_entry: int  # where the patcher CPU starts (and returns to after its work)
    watch: tuple[tuple[int, int], ...]  # (address, length) of every patchable site
    iret_sites: tuple[int, ...]
    popf_sites: tuple[int, ...]
    #: addresses of hlt instructions, each the start of a block: a CPU that reaches one stops
    #: (and is not woken: the machine uses hlt only to end bounded runs)
    halt_sites: tuple[int, ...] = ()
    #: [start, end) of the idle loop the patcher CPU runs: an agent takes the CPU there and parks
    #: there (the return address of NMIs taken between its steps); None: agents take no NMIs
    idle_range: tuple[int, int] | None = None
    #: (cpu, seed) -> initial general registers, e.g. a per-CPU random state
    boot_regs: Callable[[int, int], dict[str, int]] = field(default=lambda cpu, seed: {})
    #: (cpu, layout) -> {offset in the per-CPU area: u64 value}
    percpu_init: Callable[[int, object], dict[int, int]] = field(default=lambda cpu, layout: {})
    symbols: dict[str, int] = field(default_factory=dict)
    #: (address, length) of code that reads or writes memory an agent reads or writes (the sync
    #: IPI's acknowledgement, the #BP handler's descriptor lookup, the stopper): the exact scheduler
    #: orders every block of it against the agents (cpus/scheduler.py)
    shared_code: tuple[tuple[int, int], ...] = ()
    #: watched sites that nothing falls through to (function entries: only a call or a jump reaches
    #: them), so every execution starts a translated block there without an exit
    block_starts: frozenset[int] = frozenset()
