"""The periodic real-time task: a cyclictest-like measurement of wake-up lateness.

The machine's local APIC timer (`cpus.TimerSource`) raises LOCAL_TIMER_VECTOR on the chosen CPUs
every `period` cycles; the task (`asm/rt_task.S`) runs in that interrupt's handler, reads the TSC and
records (expected expiry, wake-up) in a per-CPU ring. Lateness = wake-up - expected expiry: the
delivery cost when nothing is in the way, and everything that held the interrupt back otherwise
(interrupts-off sections, NMI and int3 handlers, the stop_machine stopper, which spins with
interrupts off).

Why the guest reads the TSC rather than the machine noting the handler's entry: the task measures
itself, as cyclictest does, from guest code. Unicorn's own rdtsc reads host time, so the machine
supplies the TSC (the CPU's cycle clock), which keeps runs deterministic. Both see the same stamp;
see `cpus.timer` for how close to the true moment it is.

This module is the kernel's side: it tells the task its period and first expiry (as the kernel
programs the timer) and reads the samples back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cpus import ConfigError, Machine, TimerSource, Vector
from cpus.timer import first_expiry

from .image import RT_RING_SIZE, Percpu

__all__ = ["RtSample", "lateness_stats", "overruns", "read_samples", "recorded", "rt_timer", "setup_rt_task"]


@dataclass(frozen=True, slots=True)
class RtSample:
    cpu: int
    expected: int  # the expiry the task was waiting for
    woke: int  # the TSC when the task ran

    @property
    def lateness(self) -> int:
        return self.woke - self.expected


def rt_timer(cpus: Iterable[int], period: int = 10_000, resolution: int = 16) -> TimerSource:
    """The APIC timer that drives the RT task on `cpus`."""
    targets = tuple(sorted(set(cpus)))
    if not targets:
        raise ConfigError("the RT task needs at least one CPU")
    return TimerSource("rt", period=period, cpus=targets, vector=int(Vector.TIMER), resolution=resolution)


def _timer(m: Machine) -> TimerSource:
    for src in m.config.timer_sources:
        if src.vector == Vector.TIMER:
            return src
    raise ConfigError("this machine has no timer on LOCAL_TIMER_VECTOR: configure one with textpoke.rt.rt_timer")


def setup_rt_task(m: Machine) -> tuple[int, ...]:
    """Tell the RT task on each of the timer's CPUs its period and first expiry (before it runs);
    returns those CPUs."""
    src = _timer(m)
    cpus = m.config.nmi_targets(src)
    for c in cpus:
        if m.cpus[c].clock:
            raise ConfigError("set the RT task up before the machine runs")
        base = m.layout.percpu_va(c)
        m.write(base + Percpu.RT_NEXT, struct.pack("<Q", first_expiry(m.config.seed, src, c)))
        m.write(base + Percpu.RT_PERIOD, struct.pack("<Q", src.period))
    return cpus


def recorded(m: Machine, cpu: int) -> int:
    """How many samples the task on `cpu` has recorded so far."""
    return m.percpu(cpu, Percpu.RT_COUNT)


def overruns(m: Machine, cpu: int) -> int:
    return m.percpu(cpu, Percpu.RT_OVERRUNS)


def read_samples(m: Machine, cpu: int, since: int = 0, strict: bool = True) -> list[RtSample]:
    """The samples `cpu`'s task recorded after its first `since` (oldest first). When the ring no
    longer holds them all: an error, or (`strict=False`) the ones it still holds."""
    count = recorded(m, cpu)
    if count - since > RT_RING_SIZE:
        if strict:
            raise ConfigError(
                f"cpu{cpu}'s RT task recorded {count - since} samples, more than its ring of {RT_RING_SIZE}: "
                "use a longer period"
            )
        since = count - RT_RING_SIZE
    base = m.layout.percpu_va(cpu) + Percpu.RT_RING
    out = []
    for n in range(since, count):
        expected, woke = struct.unpack("<2Q", m.read(base + 16 * (n % RT_RING_SIZE), 16))
        out.append(RtSample(cpu, expected, woke))
    return out


def lateness_stats(values: Sequence[int]) -> dict[str, float | None]:
    """p50, p99 (nearest rank: always a measured value) and max of lateness samples."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(values)
    p50, p99 = np.percentile(a, [50, 99], method="inverted_cdf")
    return {"p50": float(p50), "p99": float(p99), "max": float(a.max())}
