"""What patching costs the other CPUs: stall accounting, interruptions and timelines.

`StallMeter` is a machine instrument. It pairs every event delivery with the `iretq` that returns
from it (a stack per CPU), so it knows how long each CPU spent in each handler:

* stalls caused by patching: the sync IPI's handler, the stop_machine stopper, int3 traps;
* NMIs, with their nesting depth (for the timeline).

It keeps per-CPU totals of the patch-caused stalls, and optionally every interval, which
`textpoke.report` draws as a per-CPU timeline.

`InterruptionMeter` answers a real-time question instead of a throughput one: how long, at most,
was each CPU unable to run a task that became runnable? That is the longest stretch during which the
CPU was in any handler (int3, IPI, the stopper, NMI: whatever the trace delivers) or had interrupts
off in its workload, with back-to-back pieces joined. A total of lost cycles cannot say this: many
short int3 traps add up to a large total but never hold a CPU for long.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from cpus import Vector

__all__ = ["IRQOFF_LABELS", "PATCH_VECTORS", "InterruptionMeter", "Interval", "StallMeter"]

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


#: the workload's interrupts-off section: kernel symbols (block starts) of its pushfq and its popfq
IRQOFF_LABELS = ("workload_irqoff", "workload_irqon")


@dataclass
class InterruptionMeter:
    """Per CPU, every maximal interval during which the CPU could not run a newly woken task.

    The CPU is unavailable while it handles an event (from its delivery to the end of the `iretq`
    that returns from it, `iret_cost` cycles after the machine reports the `iretq`) and while its
    workload runs with interrupts off (between the probes `IRQOFF_LABELS`, when `probe_irqoff` put
    them in). Pieces with not one instruction of the workload between them (an interrupt taken by
    the `iretq` or the `popfq` that ended the previous piece, at the very RIP it returned to) are one
    interruption. Vectors in `exclude` (the RT task's own timer) are the task running, not an
    interruption. It relies only on deliveries, `iretq`s and the probes, not on any protocol's code,
    so it measures whatever stop_machine or text_poke_bp do. Times are the machine's stamps (see
    README, Model and its limits: inside a quantum they may be early by up to that quantum)."""

    iret_cost: int = 81
    exclude: frozenset[int] = frozenset({int(Vector.TIMER)})
    #: closed interruptions per CPU: (start, end)
    intervals: defaultdict[int, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    _vectors: defaultdict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    _busy: defaultdict[int, int] = field(default_factory=lambda: defaultdict(int))
    _since: dict[int, int] = field(default_factory=dict)
    _resume: dict[int, int] = field(default_factory=dict)  # where the last interruption returned to
    _irqoff: set[int] = field(default_factory=set)
    _labels: dict[str, int] = field(default_factory=dict)

    def probe_irqoff(self, machine: object) -> None:
        """Watch the workload's interrupts-off sections on every CPU of `machine` (a cpus.Machine)."""
        for label in IRQOFF_LABELS:
            self._labels[label] = machine.symbol(label)  # type: ignore[attr-defined]
            machine.probe(self._labels[label], label)  # type: ignore[attr-defined]

    # -- machine instrument ---------------------------------------------------------------------
    def on_deliver(self, cpu: int, time: int, vector: int, frame: tuple[int, ...]) -> None:
        self._vectors[cpu].append(vector)
        if vector not in self.exclude:
            self._enter(cpu, time, frame[0])

    def on_iret(self, cpu: int, time: int, frame: tuple[int, ...], unblocked: bool) -> None:
        stack = self._vectors.get(cpu)
        if not stack:
            return
        if stack.pop() not in self.exclude:
            self._leave(cpu, time + self.iret_cost, frame[0])

    def on_probe(self, cpu: int, time: int, label: str) -> None:
        if label == IRQOFF_LABELS[0] and cpu not in self._irqoff and not self._vectors.get(cpu):
            self._irqoff.add(cpu)
            self._enter(cpu, time, self._labels[label])
        elif label == IRQOFF_LABELS[1] and cpu in self._irqoff:
            self._irqoff.discard(cpu)
            self._leave(cpu, time, self._labels[label] + 1)  # after the one-byte popfq

    def _enter(self, cpu: int, time: int, rip: int) -> None:
        self._busy[cpu] += 1
        if self._busy[cpu] > 1:
            return
        done = self.intervals[cpu]
        if done and time <= done[-1][1] and self._resume.get(cpu) == rip:
            self._since[cpu] = done.pop()[0]  # no instruction of the workload ran in between: join
        else:
            self._since[cpu] = time

    def _leave(self, cpu: int, time: int, rip: int) -> None:
        self._busy[cpu] -= 1
        if self._busy[cpu] == 0:
            self.intervals[cpu].append((self._since.pop(cpu), time))
            self._resume[cpu] = rip

    # -- results --------------------------------------------------------------------------------
    def longest(self, cpu: int, lo: int = 0, hi: int | None = None) -> int:
        """The longest interruption of `cpu` that overlaps [lo, hi] (whole length, not clipped: a
        task woken at its start waited all of it); one still going on at `hi` counts up to `hi`."""
        spans = [(s, e) for s, e in self.intervals.get(cpu, ()) if e > lo and (hi is None or s < hi)]
        if hi is not None and self._busy.get(cpu) and cpu in self._since and self._since[cpu] < hi:
            spans.append((self._since[cpu], hi))
        return max((e - s for s, e in spans), default=0)
