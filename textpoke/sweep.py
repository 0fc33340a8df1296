"""Seed sweeps: run one scenario over many seeds on an executor and gather the verdicts.

Each seed is an independent, deterministic run, so a sweep maps `run_one` over seeds on any
`concurrent.futures`-style executor (a local process pool by default) and sorts the results by seed:
the result does not depend on the executor or on the order in which seeds finish. Seeds are streamed
to the executor a few at a time, and a sweep stopped by Ctrl-C raises `SweepInterrupted` carrying the
seeds that finished.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from .executors import executor as make_executor
from .executors import stream
from .oracle import CLASSES
from .scenario import Scenario, run_scenario

__all__ = ["SeedResult", "SweepInterrupted", "SweepResult", "run_one", "sweep", "wilson"]

#: a full garbage collection after this many runs in one process: a run leaves reference cycles
#: (machine, CPUs, hooks) that hold Unicorn instances, and when Python's collector gets to them
#: would otherwise decide how much memory a long sweep takes
_COLLECT_EVERY = 5
_runs = 0


@dataclass(frozen=True)
class SeedResult:
    seed: int
    trace_hash: str
    counts: dict[str, int]
    accounting_exact: bool | None
    latencies: tuple[int, ...]
    syncs: tuple[int, ...]
    ipis: tuple[int, ...]
    int3_hits: int
    nmi_delivered: int
    nmi_nested: int
    nmi_repeated: int
    nmi_latched: int
    nmi_dropped: int
    first: dict[str, str]  # class -> one-line description of its first violation
    #: why the run is incomplete (a patch operation ran out of its cycle budget while still making
    #: progress, or the emulator hit a limit): neither safe nor unsafe, counted on its own; None for
    #: a complete run
    incomplete: str | None = None
    by_cpu: dict[int, int] = field(default_factory=dict)  # cpu -> violation events

    @property
    def ok(self) -> bool:
        return not self.counts

    def to_json(self) -> dict[str, Any]:
        """A JSON object that `from_json` turns back into an equal result (a sweep's log line)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SeedResult:
        return cls(
            **{
                **d,
                "latencies": tuple(d["latencies"]),
                "syncs": tuple(d["syncs"]),
                "ipis": tuple(d["ipis"]),
                "by_cpu": {int(c): n for c, n in d.get("by_cpu", {}).items()},
            }
        )


def run_one(sc: Scenario, seed: int) -> SeedResult:
    """One seed, reduced to what a sweep keeps (picklable, small)."""
    global _runs
    out = run_scenario(sc, seed)
    _runs += 1
    if _runs % _COLLECT_EVERY == 0:
        gc.collect()
    v = out.verdict
    first: dict[str, str] = {}
    for viol in v.violations:
        if viol.kind not in first:
            site = f" site {viol.site:#x}" if viol.site is not None else ""
            first[viol.kind] = (
                f"cpu{viol.cpu} t={viol.time}{site} {viol.code.hex(' ')} {viol.disassembly}: {viol.detail}"
            )
    return SeedResult(
        seed=seed,
        trace_hash=v.trace_hash,
        counts=dict(v.counts),
        accounting_exact=v.accounting.get("exact"),
        latencies=tuple(r.latency for r in out.reports),
        syncs=tuple(len(r.syncs) for r in out.reports),
        ipis=tuple(r.ipis for r in out.reports),
        int3_hits=v.stats.get("int3_hits", 0),
        nmi_delivered=v.stats.get("nmi_delivered", 0),
        nmi_nested=v.stats.get("nmi_nested", 0),
        nmi_repeated=v.stats.get("nmi_repeated", 0),
        nmi_latched=v.stats.get("nmi_latched", 0),
        nmi_dropped=v.stats.get("nmi_dropped", 0),
        first=first,
        incomplete=v.incomplete,
        by_cpu=dict(v.by_cpu),
    )


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass
class SweepResult:
    scenario: Scenario
    results: list[SeedResult] = field(default_factory=list)

    @property
    def seeds(self) -> int:
        return len(self.results)

    #: False when the sweep was stopped before every seed ran (Ctrl-C)
    complete: bool = True
    #: how many seeds were asked for
    requested: int | None = None

    @property
    def failing(self) -> list[int]:
        return [r.seed for r in self.results if not r.ok]

    @property
    def incomplete(self) -> list[int]:
        """Seeds whose run hit a cycle budget while still making progress (no verdict either way)."""
        return [r.seed for r in self.results if r.incomplete]

    def seeds_with(self) -> Counter:
        """class -> number of seeds in which it occurred."""
        c: Counter = Counter()
        for r in self.results:
            c.update(r.counts.keys())
        return c

    def events_by_cpu(self) -> Counter:
        """cpu -> violation events on that CPU, over every seed."""
        c: Counter = Counter()
        for r in self.results:
            c.update(r.by_cpu)
        return c

    def events(self) -> Counter:
        c: Counter = Counter()
        for r in self.results:
            c.update(r.counts)
        return c

    def as_dict(self) -> dict[str, Any]:
        sc = self.scenario
        n = self.seeds
        per_class = self.seeds_with()
        return {
            "scenario": sc.as_dict(),
            "client": sc.client,
            "protocol": sc.protocol,
            "int3": sc.int3,
            "nmi": sc.nmi,
            "nmi_rate": sc.nmi_rate,
            "nmi_aim": sc.nmi_aim,
            "fred": sc.fred,
            "cpus": sc.cpus,
            "sites": sc.sites,
            "mutation": sc.mutation,
            "seeds": n,
            "complete": self.complete,
            "seeds_requested": n if self.requested is None else self.requested,
            "seed_list": [r.seed for r in self.results],
            "seeds_with_violation": len(self.failing),
            "seeds_incomplete": len(self.incomplete),
            "incomplete_seeds": {str(r.seed): r.incomplete for r in self.results if r.incomplete},
            "violations": {k: per_class.get(k, 0) for k in CLASSES},
            "violation_events": {k: self.events().get(k, 0) for k in CLASSES},
            "violation_rate_ci95": {k: wilson(per_class.get(k, 0), n) for k in CLASSES},
            "violations_by_cpu": {str(c): k for c, k in sorted(self.events_by_cpu().items())},
            "failing_seeds": self.failing,
            "accounting_exact_seeds": sum(1 for r in self.results if r.accounting_exact),
            "trace_hashes": {str(r.seed): r.trace_hash for r in self.results},
            "first_violation": {str(r.seed): r.first for r in self.results if not r.ok},
            "mean_latency_cycles": _mean([x for r in self.results for x in r.latencies]),
            "int3_hits": sum(r.int3_hits for r in self.results),
            "nmi_delivered": sum(r.nmi_delivered for r in self.results),
            "nmi_nested": sum(r.nmi_nested for r in self.results),
            "nmi_repeated": sum(r.nmi_repeated for r in self.results),
            "nmi_latched": sum(r.nmi_latched for r in self.results),
            "nmi_dropped": sum(r.nmi_dropped for r in self.results),
            "seeds_with_nested_nmi": sum(1 for r in self.results if r.nmi_nested),
        }


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: `partial` holds the seeds that finished (sorted, `complete` False)."""

    def __init__(self, partial: SweepResult) -> None:
        super().__init__(f"interrupted after {partial.seeds} seeds")
        self.partial = partial


def sweep(
    sc: Scenario,
    seeds: Iterable[int],
    executor: Executor | None = None,
    jobs: int | None = None,
    progress: Callable[[SeedResult], None] | None = None,
) -> SweepResult:
    """Run `sc` for every seed on `executor`; with none, on `textpoke.executors.executor(jobs)`: a
    process pool of `jobs` workers (default: all cores), or this process when that is one. Seeds are
    read lazily (a range of any size is fine). Ctrl-C raises `SweepInterrupted` with what finished."""
    if executor is None:
        with make_executor(jobs) as ex:
            return _sweep(sc, seeds, ex, progress)
    return _sweep(sc, seeds, executor, progress)


def _sweep(
    sc: Scenario, seeds: Iterable[int], ex: Executor | None, progress: Callable[[SeedResult], None] | None
) -> SweepResult:
    out = SweepResult(sc, requested=len(seeds) if hasattr(seeds, "__len__") else None)  # type: ignore[arg-type]
    try:
        for _, r in stream(ex, run_one, seeds, args=lambda s: (sc, s)):
            out.results.append(r)
            if progress:
                progress(r)
    except KeyboardInterrupt:
        out.complete = False
        out.results.sort(key=lambda r: r.seed)
        raise SweepInterrupted(out) from None
    out.results.sort(key=lambda r: r.seed)
    return out
