"""What patching costs the other CPUs: stall accounting and timelines.

`StallMeter` is a machine instrument. It pairs every event delivery with the `iretq` that returns
from it (a stack per CPU), so it knows how long each CPU spent in each handler:

* stalls caused by patching: the sync IPI's handler, the stop_machine stopper, int3 traps;
* NMIs, with their nesting depth (for the timeline).

It keeps per-CPU totals of the patch-caused stalls, and optionally every interval, which
`textpoke.report` draws as a per-CPU timeline.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cpus import Vector

__all__ = ["PATCH_VECTORS", "Interval", "StallMeter"]

#: vectors whose handlers run because something is being patched
PATCH_VECTORS = {int(Vector.IPI): "sync IPI", int(Vector.STOP): "stopper", int(Vector.BP): "int3"}
_NAMES = {**PATCH_VECTORS, int(Vector.NMI): "NMI"}


@dataclass(frozen=True, slots=True)
class Interval:
    cpu: int
    start: int
    end: int
    kind: str  # "sync IPI", "stopper", "int3", "NMI"
    depth: int  # how many events were already being handled on that CPU


@dataclass
class StallMeter:
    """Durations run from the delivery to the end of the `iretq` (`iret_cost` cycles after the
    machine reports it). Within one scheduling quantum the machine only knows the cycles charged
    for events, not how many of the quantum's instructions a handler ran, so a short handler's own
    instructions may be missing from its duration (see README, Model and its limits)."""

    record: bool = False
    iret_cost: int = 81
    intervals: list[Interval] = field(default_factory=list)
    stall: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    by_kind: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    _open: defaultdict[int, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))

    def on_deliver(self, cpu: int, time: int, vector: int, frame: tuple[int, ...]) -> None:
        self._open[cpu].append((vector, time))

    def on_iret(self, cpu: int, time: int, frame: tuple[int, ...], unblocked: bool) -> None:
        stack = self._open.get(cpu)
        if not stack:
            return
        vector, start = stack.pop()
        time += self.iret_cost
        kind = _NAMES.get(vector)
        if kind is None:
            return
        # only the outermost patch-caused handler counts, so nested ones are not counted twice
        if vector in PATCH_VECTORS and not any(v in PATCH_VECTORS for v, _ in stack):
            self.stall[cpu] += time - start
            self.by_kind[kind] += time - start
        if self.record:
            self.intervals.append(Interval(cpu, start, time, kind, len(stack)))

    def reset(self) -> None:
        self.stall.clear()
        self.by_kind.clear()
