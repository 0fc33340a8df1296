"""The exact scheduler: CPUs run coarse quanta of private work and meet the agents exactly.

Theory of operation
-------------------
The fine scheduler (`Machine.run` with `interleave="fine"`) makes the interleaving of a CPU with the
patcher exact to within a few instructions by running every CPU in quanta of 1..4 instructions while
a patch is in flight: most of a sweep's time goes to the Python loop around those quanta. Most
of those instructions are private work whose order against the patcher cannot change any outcome.
This scheduler runs every CPU as far as it can go alone and orders exactly the few places where
it meets an agent (a Python program occupying a CPU, such as the patcher):

* **Interaction points.** The execution of a watched site (its bytes depend on the agent's text
  writes); a serializing instruction (`iretq`, `cpuid`); an interrupt delivered by `popfq`; an
  aimed NMI; and every instruction of the code that touches memory an agent reads or writes
  (`BootImage.shared_code`: the sync acknowledgement, the #BP handler's descriptor lookup, the
  stopper and its stages, ftrace's NMI-side enter/exit). An agent's own steps are its
  interactions. Event delivery does not serialize and reads nothing an agent writes: the machine
  performs it at quantum boundaries or right after the interaction that raises it.
* **Exact time inside a quantum.** Every engine counts instructions exactly (`Engine.start_counting`
  at boot) and a hook reads how many instructions of the running quantum have completed
  (`Engine.executed`), so a CPU knows its time at every hook, not just at quantum boundaries.
* **The rule.** A CPU may perform an interaction at time t only when every agent has reached t
  (ties: the lower CPU index first, as in the fine scheduler's furthest-behind order). Otherwise the
  hook stops the quantum right before the interaction (`hold`): the CPU waits there with its clock
  at t until it is the furthest behind, and performs it then. A quantum that enters or starts in
  shared code is cut at the horizon, so no instruction of it passes an agent. The cut is made
  where control comes into a unit (`shared_entries`: its first byte, the return points of its
  calls, branch targets from outside, and wherever an `iretq` lands), not at each of its blocks:
  inside a unit a CPU's time follows its instruction count, so the cut stays right.
* **Events in their time.** A quantum's count is cut for instructions only; a delivery or an
  `iretq` inside it charges its own cycles, and when those take the CPU's time to its next event
  (a timer, an IPI, an NMI), the machine ends the quantum right there (`_end_quantum_if_due`), so
  the event is taken at that boundary: an interrupt that arrives while an exception is delivered
  finds IF=0 and waits for the handler's `iretq`, as on hardware. When they do not reach it, the
  rest of the quantum is cut to end at the event: every event is taken within one delivery's cost
  of its time.
* **Lookahead.** Between interactions a CPU may run ahead of every agent by at most the IPI latency:
  the earliest an agent's next action can reach another CPU as an event. A write's snoop reaching a
  CPU that has run ahead is applied before its next site execution, which is all the snoop can
  change.

* **The agent's own CPU.** An agent steps only while its CPU is parked in its idle loop (as in the
  fine scheduler); an NMI that reaches it there runs its entry and handler in guest code. Meanwhile
  the CPU still counts as an agent for every other CPU's horizon, and it runs no further than the
  furthest-behind other CPU (the lower index first on a tie): it may touch what they touch (the #BP
  handler's descriptors, ftrace's `nmi_running`), so no CPU passes it and it passes none.
* **The end of a run.** No interaction is performed past the end of the running `run` call: an
  agent may start right there (`run_agent` after a warmup), and must come first.

An interaction takes effect at its start: an event delivery or `iretq` serializes at the instruction
boundary where it happens, and the cycles it costs follow (as in the fine scheduler).

So every interaction happens in the order of its exact time, as if every CPU ran one instruction at
a time, while the engine runs quanta of up to `2 * quantum - 1` instructions. Outside agents' work
the scheduler runs coarse quanta exactly like the fine one.

Limit: a CPU that crashes between interactions may do so up to one IPI latency ahead of an agent,
which then sees it crashed (not runnable) that much early.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from . import layout as L
from .disasm import DIRECT_BRANCHES, instructions
from .errors import ConfigError

if TYPE_CHECKING:
    from .boot import BootImage
    from .machine import Cpu, Machine

__all__ = ["NO_HORIZON", "deliver_due", "hold", "inside", "run_exact", "shared_code_hook", "shared_entries"]

#: the horizon when no agent runs: nothing to order against
NO_HORIZON = 1 << 62


def hold(cpu: Cpu) -> None:
    """Stop `cpu`'s quantum right before the instruction being hooked: it interacts beyond the
    horizon, so it must wait until every agent has caught up."""
    cpu.held = cpu.engine.executed()
    cpu.engine.stop()


def shared_code_hook(m: Machine, cpu: Cpu) -> Callable[[object, int, int, object], None]:
    """Block hook where a quantum comes into a unit of code touching agents' state: while an agent
    runs, the quantum is cut so that it ends at the horizon (`Engine.cut`), and a quantum that
    starts inside such a unit is cut there too (`run_exact`): none of its instructions passes an
    agent. Code reached beyond the horizon is held.

    Where it is hooked (`MachineConfig.shared_hooks`): "all" hooks every block of every unit;
    "entries" (the default) only the blocks where control comes in from outside the unit
    (`shared_entries`), and the machine runs it itself after each `iretq` or `popfq` that lands
    inside one. Inside a unit, the cut made at its entry stays right: a CPU's time moves off its
    instruction count only by a delivery or an `iretq`, and control comes back into the unit from
    those through an `iretq` only. The two give the same traces (tests/test_scheduler.py)."""
    insn = m.costs.instruction
    eng = cpu.engine

    def on_shared_entry(_h: object, _addr: int, _size: int, _k: object) -> None:
        # a raw hook (`Engine.hook_block_raw`): called by ctypes itself
        hz = m.hz_max
        if not cpu.running or hz == NO_HORIZON:
            return
        eng.hook_adjust = 0
        try:
            done = eng.executed()
            t = cpu.clock + cpu.extra + done * insn
            if t > hz:
                hold(cpu)
            else:
                eng.cut(done + (hz - t) // insn + 1)
        except BaseException as err:
            eng.fail(err)

    return on_shared_entry


def shared_entries(image: BootImage) -> tuple[int, ...]:
    """The addresses where control can come into a unit of `image.shared_code` from outside it,
    other than by an `iretq` or `popfq` (which the machine checks itself): each unit's first byte,
    the instruction after every `call` and every watched site in it (a site may hold a call), the
    direct branch targets inside it of code outside it, and interrupt gates into it. Units written
    at run time (out-of-line slots) are hooked at every block once written (`Machine`)."""
    return _entries(
        image.text,
        image.shared_code,
        tuple(sorted(set(image.symbols.values()) | {g.handler for g in image.gates.values()})),
        image.watch,
        (*(g.handler for g in image.gates.values()), image.worker_entry, image.idle_entry),
    )


@lru_cache(maxsize=64)
def _entries(
    text: bytes,
    units: tuple[tuple[int, int], ...],
    starts: tuple[int, ...],
    watch: tuple[tuple[int, int], ...],
    landings: tuple[int, ...],
) -> tuple[int, ...]:
    def unit_of(addr: int) -> int | None:
        for lo, n in units:
            if lo <= addr < lo + n:
                return lo
        return None

    out: set[int] = {lo for lo, _n in units}
    out.update(a for a in landings if unit_of(a) is not None)
    for site, n in watch:
        if unit_of(site) is not None:
            out.add(site + n)
    # decode every symbol's code from its start (code between two symbols is decoded as one run:
    # data in it may decode as branches, which only adds hooks)
    bounds = sorted({a for a in starts if L.TEXT_VA <= a < L.TEXT_VA + len(text)} | {lo for lo, _n in units})
    bounds.append(L.TEXT_VA + len(text))
    for lo, hi in itertools.pairwise(bounds):
        code = text[lo - L.TEXT_VA : hi - L.TEXT_VA]
        for insn in instructions(code, lo):
            src = unit_of(insn.address)
            if insn.mnemonic == "call" and src is not None:
                out.add(insn.address + insn.size)
            if insn.mnemonic in DIRECT_BRANCHES and insn.op_str.startswith("0x"):
                target = int(insn.op_str, 16)
                dst = unit_of(target)
                if dst is not None and dst != src:
                    out.add(target)
    return tuple(sorted(a for a in out if unit_of(a) is not None))


def deliver_due(m: Machine, cpu: Cpu, clock: int, heap: list[tuple[int, int]]) -> bool:
    """Deliver the events due at `cpu`'s boundary (it is at the top of `heap`, at `clock`). Returns
    True when the CPU does not run now: it crashed (it leaves the heap), or what was charged at this
    boundary (the stopper's wakeup) must pass first, in everyone's time; both schedulers share it."""
    m._due(cpu)
    if cpu.crash is not None:
        heapq.heappop(heap)
        return True
    if cpu.hold:
        cpu.hold = False
        cpu.clock = clock + cpu.extra
        cpu.extra = 0
        heapq.heapreplace(heap, (cpu.clock, cpu.index))
        return True
    return False


def inside(ranges: list[tuple[int, int]], addr: int) -> bool:
    for lo, hi in ranges:  # noqa: SIM110 - a plain loop: no generator on the scheduler's hot path
        if lo <= addr < hi:
            return True
    return False


def run_exact(m: Machine, cycles: int, stop_when: Callable[[], bool] | None = None) -> None:
    """`Machine.run` with the exact interleaving (see the module docstring); same contract."""
    if cycles < 0:
        raise ConfigError("cycles must be >= 0")
    cpus = m.cpus
    live = [c for c in cpus if c.runnable]
    if not live:
        return
    end = min(c.clock for c in live) + cycles
    heap = [(c.clock, c.index) for c in live]
    heapq.heapify(heap)
    rnd = m._sched_rng.random
    q_span = 2 * m.config.quantum - 1
    insn = m.costs.instruction
    lookahead = m.costs.ipi_latency
    trace_add = m.trace.add
    shared = m._shared_units
    agents = [c for c in cpus if c.agent is not None]
    heappop, heapreplace = heapq.heappop, heapq.heapreplace
    trace_settle = m.trace.settle
    while heap:
        clock, i = heap[0]
        if clock >= end:
            break
        trace_settle()
        if m._release:
            m._settle()
        if stop_when is not None and stop_when():
            break
        cpu = cpus[i]
        if cpu.events and cpu.events[0][0] <= clock and deliver_due(m, cpu, clock, heap):
            continue
        if cpu.agent is not None and m.in_idle(i):
            # the agent runs between events: an NMI due now was delivered above, and then the CPU
            # is in its handler, not parked (as in the fine scheduler)
            m._step_agent(cpu)
            if cpu.agent is None:
                agents = [c for c in cpus if c.agent is not None]
            heapreplace(heap, (cpu.clock, i))
            continue
        q = 1 + int(rnd() * q_span)
        limit = end - clock
        events = cpu.events
        if events and events[0][0] - clock < limit:
            limit = events[0][0] - clock
        hz = NO_HORIZON
        for a in agents:
            if a is cpu:
                continue
            h = a.clock if a.index > i else a.clock - 1
            if h < hz:
                hz = h
            if a.clock + lookahead - clock < limit:
                limit = a.clock + lookahead - clock
        if hz >= end:
            # nor past the end of this run: an agent may start where it ends (run_agent after a
            # warmup), and an interaction performed beyond would precede the agent's first step
            hz = end - 1
        if cpu.agent is not None:
            # an agent's CPU running guest code (an NMI handler it took while parked) still counts
            # as an agent for the others' horizon: it may touch what they touch, so it never
            # passes another CPU; the furthest-behind CPU runs next
            for c in cpus:
                if c is not cpu and c.runnable:
                    t = c.clock if c.index > i else c.clock - 1
                    if t - clock < limit:
                        limit = t - clock
            if limit < insn:
                limit = insn
        room = (limit + insn - 1) // insn
        if room < q:
            q = room if room > 1 else 1
        eng = cpu.engine
        rip = cpu.rip
        if rip is None:
            rip = eng.rip()
        if hz != NO_HORIZON and inside(shared, rip):
            room = (hz - clock - cpu.extra) // insn + 1
            if room <= 0:
                # events delivered at this boundary took it past the horizon: nothing runs now
                cpu.clock = clock + cpu.extra
                cpu.extra = 0
                heapreplace(heap, (cpu.clock, i))
                continue
            if room < q:
                q = room
        m.hz_max = hz
        m.quantum_rip = rip
        cpu.held = None
        cpu.running = True
        stop = eng.run(rip, L.UNTIL, q)
        cpu.running = False
        m.hz_max = NO_HORIZON
        if m._deferred_drops:
            m._drop_deferred()
        if eng.flush_count.value != cpu.flushes_seen or eng.free_ptr.value > eng.room_limit:
            m._tend_code_buffer(cpu)
        cpu.rip = after = eng.rip()
        held = cpu.held
        done = held if held is not None else eng.completed()
        if stop is not None and cpu.crash is None:
            m._crash(cpu, f"guest fault: {stop.error}", after)
        elif cpu.crash is None and after == rip and held is None and done <= 1:
            # (a loop of two or more instructions may end a quantum where it began: that is progress)
            m._no_progress(cpu, rip)
        else:
            cpu.stuck = 0
        if cpu.tentative is not None:
            if after == cpu.tentative[1] and not eng.ended_at_exit:
                cpu.tentative = None  # the count ran out at the block start: not executed
            else:
                m._confirm_fetch(cpu)
        cpu.clock = clock + done * insn + cpu.extra
        cpu.extra = 0
        stats = cpu.stats
        stats["instructions"] += done
        stats["quanta"] += 1
        trace_add((clock, i, "run", rip, done))
        if cpu.popf_hooks and not cpu.pending:
            m._watch_popf(cpu, False)
        if not cpu.runnable:
            heappop(heap)
        else:
            heapreplace(heap, (cpu.clock, i))
