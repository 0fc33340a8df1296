"""Memory over a long sweep: resident memory of one worker process running seed after seed.

A sweep's worker runs `textpoke.sweep.run_one` for seed after seed in one process (a machine and
its oracle per seed, freed when the seed ends, on Unicorn engines handed from seed to seed by
`cpus/pool.py`; a full collection every few seeds). This runs the same loop in this process over
`--seeds` seeds of the default safety scenario (or the one given) and prints the resident set size
every `--every` seeds, then the least-squares slope of RSS over the second half of the sweep in KiB
per 1000 seeds: a slope near zero is memory flat with seed count; a steady positive one is a leak.

With `--tracemalloc`, Python allocations are traced too (slower) and the source lines whose
allocations grew most between the middle and the end of the sweep are printed, which tells a leak in
Python objects from one in native memory (Unicorn), which only RSS shows.

Ctrl-C or SIGTERM stops it early with a report on the samples taken.

    python benchmarks/memory.py [--seeds 10000] [--every 250] [--nmi nested-safe --nmi-rate 500]
                                [--tracemalloc] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import signal
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textpoke.scenario import Scenario
from textpoke.sweep import run_one

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional
    psutil = None


def rss_kib() -> int:
    """Resident set size of this process now, in KiB (psutil, else /proc, else the peak)."""
    if psutil is not None:
        return psutil.Process().memory_info().rss // 1024
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak: an upper bound


def slope_kib_per_1000(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (seeds done, RSS KiB) in KiB per 1000 seeds."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return 1000 * sxy / sxx if sxx else 0.0


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=10_000, help="seeds to run (default 10000)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--every", type=int, default=250, help="print RSS every this many seeds (default 250)")
    p.add_argument("--nmi", default=None, help="NMI entry of the scenario (default: the default scenario's)")
    p.add_argument("--nmi-rate", type=int, default=None, help="NMIs per million cycles per CPU")
    p.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slower)")
    p.add_argument("--json", type=Path, help="write the samples and the slope as JSON here")
    args = p.parse_args()
    if args.seeds < 2 or args.every < 1:
        p.error("--seeds must be at least 2 and --every at least 1")

    sc = Scenario()
    changes = {k: v for k, v in (("nmi", args.nmi), ("nmi_rate", args.nmi_rate)) if v is not None}
    if changes:
        sc = dataclasses.replace(sc, **changes)
    signal.signal(signal.SIGTERM, _stop)  # `kill` stops it early, as Ctrl-C does, with a report
    if args.tracemalloc:
        tracemalloc.start(8)
    source = "psutil" if psutil is not None else "/proc/self/status"
    print(f"{sc.label()}: {args.seeds} seeds in one process, RSS ({source}) every {args.every} seeds", flush=True)
    print(f"{'seeds':>7} {'RSS MiB':>8} {'seeds/s':>8} {'elapsed s':>10}", flush=True)
    samples: list[tuple[int, int]] = [(0, rss_kib())]
    middle_snapshot = None
    t0 = time.perf_counter()
    last_t, last_n = t0, 0
    done = 0
    try:
        for k in range(args.seeds):
            run_one(sc, args.seed_start + k)
            done = k + 1
            if done % args.every == 0 or done == args.seeds:
                now = time.perf_counter()
                samples.append((done, rss_kib()))
                rate = (done - last_n) / (now - last_t)
                last_t, last_n = now, done
                print(f"{done:>7} {samples[-1][1] / 1024:>8.1f} {rate:>8.2f} {now - t0:>10.0f}", flush=True)
            if args.tracemalloc and done == args.seeds // 2:
                middle_snapshot = tracemalloc.take_snapshot()
    except KeyboardInterrupt:
        # a long sweep stopped early still reports on the samples it took
        print(f"interrupted after {done} seeds: the figures below are over the samples taken", flush=True)
    if len(samples) < 2:
        print("too few samples for a slope")
        return 1

    last = samples[-1][0]
    second_half = [(n, r) for n, r in samples if n >= last // 2]
    slope = slope_kib_per_1000(second_half)
    peak = max(r for _, r in samples)
    print(
        f"RSS: {samples[0][1] / 1024:.1f} MiB at start, {samples[1][1] / 1024:.1f} MiB after {samples[1][0]} seeds, "
        f"{samples[-1][1] / 1024:.1f} MiB after {samples[-1][0]}; peak {peak / 1024:.1f} MiB"
    )
    print(f"slope over the second half ({len(second_half)} samples): {slope:+.1f} KiB per 1000 seeds")
    growth = []
    if middle_snapshot is not None:
        end = tracemalloc.take_snapshot()
        growth = [s for s in end.compare_to(middle_snapshot, "lineno") if s.size_diff > 0][:10]
        print("Python allocations that grew most over the second half:")
        for s in growth:
            print(f"  {s.size_diff / 1024:+9.1f} KiB {s.count_diff:+7d} blocks  {s.traceback[0]}")
    if args.json:
        result = {
            "scenario": sc.as_dict(),
            "seeds": last,
            "seeds_requested": args.seeds,
            "seed_start": args.seed_start,
            "every": args.every,
            "rss_source": source,
            "samples": [{"seeds": n, "rss_kib": r} for n, r in samples],
            "second_half_slope_kib_per_1000_seeds": slope,
            "seconds": time.perf_counter() - t0,
            "tracemalloc_growth": [{"where": str(s.traceback[0]), "kib": s.size_diff / 1024} for s in growth],
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
