"""Exits only where a site needs one: the same traces, and what it saves.

A watched site must start a translated block (its block hook observes every execution). Unicorn
ends translation at an exit, but re-examines the translated code in front of every exit after every
`uc_emu_start`, a cost per quantum that grows with the number of exits. A site at a function's
first byte is reached only by a call or a jump, where translation starts a block anyway, so the
machine gives it no exit (`MachineConfig.site_exits="needed"`). This benchmark runs the same seeds
both ways (`"all"` puts an exit at every site, as before), seed by seed in one process, and
compares every trace hash and the CPU time.

    python benchmarks/exits.py [--seeds 50] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import textpoke.scenario as scenario_mod
from cpus import MachineConfig
from textpoke.scenario import Scenario, run_scenario

OBJECT = str(Path(__file__).resolve().parents[1] / "tests" / "objects" / "gcc" / "flowtab.o")
SCENARIOS = {
    "default (8 sites)": Scenario(),
    "nested-safe NMIs, rate 500": Scenario(nmi="nested-safe", nmi_rate=500),
    "32 sites, nested-safe NMIs, rate 300": Scenario(sites=32, nmi="nested-safe", nmi_rate=300),
    "fine scheduler": Scenario(interleave="fine"),
    "C kernel": Scenario(kernel="c"),
    "flowtab.o (gcc)": Scenario(objects=(OBJECT,)),
    "jump labels (mid-function sites)": Scenario(client="jump-label", kernel="c"),
}


def timed(sc: Scenario, seed: int, exits: str) -> tuple[str, float]:
    scenario_mod.MachineConfig = functools.partial(MachineConfig, site_exits=exits)  # type: ignore[misc]
    t0 = time.process_time()
    h = run_scenario(sc, seed).verdict.trace_hash
    return h, time.process_time() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--only", default=None, help="only scenarios whose label contains this text")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.json and not args.json.parent.is_dir():
        p.error(f"--json: directory {args.json.parent} does not exist")
    rows = []
    differ_total = 0
    print(f"{'scenario':40} {'seeds':>5} {'same':>5} {'CPU s/seed all':>15} {'needed':>8} {'speedup':>8}")
    for label, sc in SCENARIOS.items():
        if args.only and args.only not in label:
            continue
        timed(sc, 0, "needed")  # warm-up: kernel built, code paths imported
        t_all = t_needed = 0.0
        differ = []
        for seed in range(args.seeds):
            h_all, dt_all = timed(sc, seed, "all")
            h_needed, dt_needed = timed(sc, seed, "needed")
            t_all += dt_all
            t_needed += dt_needed
            if h_all != h_needed:
                differ.append(seed)
        differ_total += len(differ)
        row = {
            "scenario": label,
            "seeds": args.seeds,
            "same_hash": args.seeds - len(differ),
            "differ": differ,
            "cpu_s_per_seed_all": t_all / args.seeds,
            "cpu_s_per_seed_needed": t_needed / args.seeds,
            "speedup": t_all / t_needed if t_needed else None,
        }
        rows.append(row)
        print(
            f"{label:40} {args.seeds:>5} {row['same_hash']:>5} {row['cpu_s_per_seed_all']:>15.3f} "
            f"{row['cpu_s_per_seed_needed']:>8.3f} {row['speedup']:>7.2f}x",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print("every trace the same both ways" if not differ_total else f"DIFFERENT TRACES: {differ_total} seeds")
    return 1 if differ_total else 0


if __name__ == "__main__":
    sys.exit(main())
