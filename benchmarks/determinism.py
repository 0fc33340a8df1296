"""Determinism across executors: the same seeds give the same trace hashes whatever runs them.

For each scenario, runs `textpoke safety ... --json` as a user would, over the same seeds:

* in one process (`--jobs 1`),
* on a pool of two worker processes (`--jobs 2`),
* on a dask.distributed cluster (`--scheduler tcp://...`): a `LocalCluster` of worker processes
  started by this script on localhost,

and compares the `trace_hashes` (and the verdict counts) of the three JSON outputs seed by seed.
Scenarios: the default safety scenario, and the same with nested-safe NMIs at 500 per million
cycles. Prints the comparison and exits 1 on any difference (2 when a run itself fails).

    python benchmarks/determinism.py [--seeds 40] [--no-dask] [--dask-workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: label -> scenario arguments of `textpoke safety`
SCENARIOS = {
    "default": [],
    "nested-safe NMIs, rate 500": ["--nmi", "nested-safe", "--nmi-rate", "500"],
}


def safety(scenario: list[str], seeds: int, where: list[str], out: Path) -> tuple[dict, float]:
    """The JSON of one `textpoke safety` sweep and its wall time; SystemExit(2) if it fails."""
    argv = [sys.executable, "-m", "textpoke.cli", "safety", *scenario, "--seeds", str(seeds), "--quiet"]
    argv += [*where, "--json", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        print(f"FAILED ({r.returncode}): {' '.join(argv[1:])}\n{r.stderr.strip()}", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(out.read_text()), dt


def digest(hashes: dict[str, str]) -> str:
    """One short digest of every seed's trace hash, in seed order."""
    text = "\n".join(f"{s}:{h}" for s, h in sorted(hashes.items(), key=lambda kv: int(kv[0])))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def compare(label: str, runs: dict[str, dict]) -> int:
    """Print how each run compares with the first; the number of differing seeds."""
    names = list(runs)
    ref_name = names[0]
    ref = runs[ref_name]
    bad = 0
    for name in names:
        d = runs[name]
        mine, theirs = d["trace_hashes"], ref["trace_hashes"]
        differ = sorted(int(s) for s in set(mine) | set(theirs) if mine.get(s) != theirs.get(s))
        verdicts_equal = d["violations"] == ref["violations"] and d["failing_seeds"] == ref["failing_seeds"]
        print(
            f"  {name:<22} {d['seeds']:>3} seeds  hashes {digest(d['trace_hashes'])}  "
            f"seeds with a violation {d['seeds_with_violation']:>3}  "
            + ("same as " + ref_name if not differ and verdicts_equal else f"DIFFERS: seeds {differ[:10]}")
        )
        if not verdicts_equal and not differ:
            print(f"  {name}: verdicts differ with equal hashes: {d['violations']} vs {ref['violations']}")
        bad += len(differ) + (0 if verdicts_equal else 1)
    return bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=40, help="seeds per scenario and executor (default 40)")
    p.add_argument("--no-dask", action="store_true", help="compare the local executors only")
    p.add_argument("--dask-workers", type=int, default=2, help="worker processes of the dask cluster (default 2)")
    args = p.parse_args()

    # the CLI runs and the dask workers import this tree's textpoke, not an installed one
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cluster = None
    if not args.no_dask:
        from dask.distributed import LocalCluster

        t0 = time.perf_counter()
        cluster = LocalCluster(
            n_workers=args.dask_workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        print(
            f"dask LocalCluster at {cluster.scheduler_address}: {args.dask_workers} worker processes, "
            f"started in {time.perf_counter() - t0:.1f} s"
        )
    executors = {"--jobs 1": ["--jobs", "1"], "--jobs 2": ["--jobs", "2"]}
    if cluster is not None:
        executors[f"dask ({args.dask_workers} workers)"] = ["--scheduler", cluster.scheduler_address]
    bad = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, scenario in SCENARIOS.items():
                runs: dict[str, dict] = {}
                times: dict[str, float] = {}
                for i, (name, where) in enumerate(executors.items()):
                    runs[name], times[name] = safety(scenario, args.seeds, where, Path(tmp) / f"{label[:7]}{i}.json")
                print(f"{label} ({' '.join(scenario) or 'textpoke safety defaults'}), seeds 0..{args.seeds - 1}:")
                bad += compare(label, runs)
                print("  wall s: " + ", ".join(f"{n} {t:.0f}" for n, t in times.items()))
    finally:
        if cluster is not None:
            cluster.close()
    print("all executors agree seed by seed" if not bad else f"DIFFERENCES: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
