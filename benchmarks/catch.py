"""Bug-finding power of the two schedulers: the catch rate of every mutation, side by side.

For each mutation of the safety benchmark (the six protocol mutations, the emulation without a
stack gap, the four mutations of the nested-safe NMI entry and the 386 cmpxchg exit of the i386
latch), the same seeds run once with `interleave="fine"` (the older scheduler) and once with
`interleave="exact"`; a seed catches the mutation when the oracle reports any violation. The exact
scheduler holds when its rate is not below the fine one beyond its own 95% Wilson interval.

    python benchmarks/catch.py [--seeds 40] [--seed-start 0] [--jobs J] [--only TEXT] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from safety import ROWS

from textpoke.executors import executor
from textpoke.sweep import sweep, wilson

MUTATION_ROWS = [
    (label, sc)
    for label, sc, _expect, _needed in ROWS
    if sc.mutation
    or sc.int3 == "emulate-nogap"
    or sc.nmi.startswith("nested-no")
    or sc.nmi == "nested-hw-frame"
    or sc.nmi == "latch-cmpxchg386"
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--only", default=None, help="only rows whose label contains this text")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    rows = []
    held = 0
    print(f"{'mutation':45} {'fine':>18} {'exact':>18}  {'s fine':>7} {'s exact':>7}  verdict")
    with executor(args.jobs) as ex:
        for label, sc in MUTATION_ROWS:
            if args.only and args.only not in label:
                continue
            row: dict = {"mutation": label, "seeds": args.seeds, "seed_start": args.seed_start}
            for mode in ("fine", "exact"):
                t0 = time.perf_counter()
                r = sweep(dataclasses.replace(sc, interleave=mode), seeds, executor=ex, jobs=1)
                k = len(r.failing)
                row[mode] = {
                    "caught": k,
                    "rate": k / args.seeds,
                    "ci95": wilson(k, args.seeds),
                    "classes": {c: n for c, n in r.seeds_with().items() if n},
                    "caught_seeds": r.failing,
                    "seconds": time.perf_counter() - t0,
                }
            f, e = row["fine"], row["exact"]
            # paired: seeds only one scheduler caught (each seed runs the same scenario under both)
            row["only_fine"] = sorted(set(f["caught_seeds"]) - set(e["caught_seeds"]))
            row["only_exact"] = sorted(set(e["caught_seeds"]) - set(f["caught_seeds"]))
            row["holds"] = f["rate"] <= e["ci95"][1]
            held += row["holds"]
            rows.append(row)
            print(
                f"{label:45} {f['caught']:>3}/{args.seeds} [{f['ci95'][0]:.2f}-{f['ci95'][1]:.2f}] "
                f"{e['caught']:>3}/{args.seeds} [{e['ci95'][0]:.2f}-{e['ci95'][1]:.2f}]  "
                f"{f['seconds']:>7.1f} {e['seconds']:>7.1f}  {'holds' if row['holds'] else 'LOWER'}",
                flush=True,
            )
    print(f"\nexact holds on {held} of {len(rows)} mutations")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
