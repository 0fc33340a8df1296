"""Periodic timers: the local APIC timer in periodic mode, as the machine's `TimerSource`s configure it.

Rules
-----
1. Each target CPU has its own timer. Its first expiry is drawn from the run's seed in
   [start, start + period) (timers of different CPUs are not in phase); after that it expires every
   `period` cycles exactly, whatever the CPU does: the timer counts a clock, not instructions.
2. An expiry makes the source's vector pending on that CPU (`Machine.raise_irq`): delivered at once
   when IF=1, else when IF comes back (`popfq`, `iretq`). An expiry while the vector is still pending
   merges with it, as the APIC's one request bit per vector does; the guest sees it as an overrun.
3. Measuring aid (not hardware): while an expiry waits for IF=1, the CPU's quanta are cut at least
   every `resolution` cycles, so the moment the interrupt is finally taken is stamped (and the TSC
   read by its handler) at most `resolution` cycles early. Everything goes through the machine's
   event queue (`call_at`), so timed events stay exact and the run stays deterministic.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .config import TimerSource

if TYPE_CHECKING:
    from .machine import Cpu, Machine

__all__ = ["first_expiry", "start_timers"]


def first_expiry(seed: int, src: TimerSource, cpu: int) -> int:
    """When `src`'s timer on `cpu` first expires (the kernel's view of how it programmed the timer)."""
    return src.start + random.Random(f"{seed}/timer/{src.name}/{cpu}").randrange(src.period)


def start_timers(machine: Machine) -> None:
    """Arm every configured timer on every target CPU."""
    cfg = machine.config
    for src in cfg.timer_sources:
        for c in cfg.nmi_targets(src):
            _arm(machine, src, c, first_expiry(cfg.seed, src, c))


def _arm(machine: Machine, src: TimerSource, cpu: int, when: int) -> None:
    def expire(m: Machine, c: Cpu) -> None:
        _arm(m, src, cpu, when + src.period)
        m.raise_irq(cpu, src.vector, src.name)
        if src.vector in c.pending and not m.irq_enabled(cpu):
            _watch(m, src, cpu, when + src.resolution)

    machine.call_at(cpu, when, expire)


def _watch(machine: Machine, src: TimerSource, cpu: int, when: int) -> None:
    """Cut the CPU's quanta every `resolution` cycles while the expiry is held back."""

    def tick(m: Machine, c: Cpu) -> None:
        if src.vector in c.pending and c.runnable:
            _watch(m, src, cpu, when + src.resolution)

    machine.call_at(cpu, when, tick)
