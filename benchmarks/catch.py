"""Bug-finding power of the two schedulers: the catch rate of every mutation, side by side.

For each mutation of the safety benchmark (the six protocol mutations, the emulation without a
stack gap, the four mutations of the nested-safe NMI entry, the 386 cmpxchg exit of the i386
latch, stop_machine ftrace without its NMI-side write, the jump-label, static-call, kprobe and
optprobe mutations), the same seeds run once with `interleave="fine"` (the older scheduler) and
once with `interleave="exact"`; a seed catches the mutation when the oracle reports any violation.
The exact scheduler holds when its rate is not below the fine one beyond its own 95% Wilson
interval.

Each seed stops at its first violation (`Scenario.stop_at_first`): whether it is caught is the
same as in the full run, of which it is the prefix, and a caught seed costs only that prefix
(`--full` runs every seed to its end).

Every finished (mutation, scheduler) pair is written to the JSON file at once, and `--resume`
skips the pairs that file already holds, so a long comparison can be stopped and taken up again.

    python benchmarks/catch.py [--seeds 40] [--seed-start 0] [--jobs J] [--only TEXT]
                               [--modes fine,exact] [--full] [--json FILE [--resume]]
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
from textpoke.sweep import SweepInterrupted, sweep, wilson

#: int3 handler variants that are deliberately broken (a mutation of the handler, not a protocol)
BROKEN_HANDLERS = {"emulate-nogap", "emulate-no-jmp8", "emulate-noret"}
#: NMI entries that are deliberate mutations of a correct one (the naive entry is a design, not one)
BROKEN_ENTRIES = {"nested-no-rsp-check", "nested-no-variable", "nested-hw-frame", "nested-no-rip-check"}

MUTATION_ROWS = [
    (label, sc)
    for label, sc, _expect, _needed in ROWS
    if sc.mutation
    or sc.int3 in BROKEN_HANDLERS
    or sc.nmi in BROKEN_ENTRIES
    or sc.nmi == "latch-cmpxchg386"
    or sc.operation == "retarget-unpadded"
]

MODES = ("fine", "exact")


def _caught(sc, seeds: range, mode: str, ex, full: bool) -> dict:
    t0 = time.perf_counter()
    try:
        r = sweep(dataclasses.replace(sc, interleave=mode, stop_at_first=not full), seeds, executor=ex, jobs=1)
    except SweepInterrupted as e:
        r = e.partial
    k = len(r.failing)
    n = r.seeds
    return {
        "caught": k,
        "seeds_run": n,
        "complete": r.complete,
        "rate": k / n if n else 0.0,
        "ci95": wilson(k, n),
        "classes": {c: m for c, m in r.seeds_with().items() if m},
        "caught_seeds": r.failing,
        "incomplete_seeds": r.incomplete,
        "seconds": time.perf_counter() - t0,
        "stop_at_first": not full,
    }


def _verdict(row: dict) -> None:
    f, e = row.get("fine"), row.get("exact")
    if not (f and e):
        return
    # paired: seeds only one scheduler caught (each seed runs the same scenario under both)
    row["only_fine"] = sorted(set(f["caught_seeds"]) - set(e["caught_seeds"]))
    row["only_exact"] = sorted(set(e["caught_seeds"]) - set(f["caught_seeds"]))
    row["holds"] = f["rate"] <= e["ci95"][1]


def _cell(m: dict | None) -> str:
    if not m:
        return f"{'-':>18}"
    part = "" if m["complete"] else "*"
    return f"{m['caught']:>3}/{m['seeds_run']}{part} [{m['ci95'][0]:.2f}-{m['ci95'][1]:.2f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=40)
    p.add_argument("--seed-start", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--only", default=None, help="only rows whose label contains this text")
    p.add_argument("--modes", default="fine,exact", help="schedulers to run, comma-separated")
    p.add_argument("--full", action="store_true", help="run every seed to its end, not to its first violation")
    p.add_argument("--json", type=Path)
    p.add_argument("--resume", action="store_true", help="keep the pairs the JSON file already holds")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"--modes: unknown scheduler {bad[0]!r}; choose from {', '.join(MODES)}")
    if args.resume and not args.json:
        p.error("--resume needs --json FILE")
    if args.json and not args.json.parent.is_dir():
        p.error(f"--json: directory {args.json.parent} does not exist")
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    done: dict[str, dict] = {}
    if args.resume and args.json.exists():
        for row in json.loads(args.json.read_text())["rows"]:
            if row["seeds"] == args.seeds and row["seed_start"] == args.seed_start:
                done[row["mutation"]] = row

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"rows": list(done.values())}, indent=2) + "\n")

    print(f"{'mutation':55} {'fine':>18} {'exact':>18}  {'s fine':>7} {'s exact':>7}  verdict")
    stopped = False
    with executor(args.jobs) as ex:
        for label, sc in MUTATION_ROWS:
            if args.only and args.only not in label:
                continue
            row = done.setdefault(label, {"mutation": label, "seeds": args.seeds, "seed_start": args.seed_start})
            for mode in modes:
                if mode in row and row[mode]["complete"]:
                    continue
                row[mode] = _caught(sc, seeds, mode, ex, args.full)
                _verdict(row)
                save()
                if not row[mode]["complete"]:
                    stopped = True
                    break
            f, e = row.get("fine"), row.get("exact")
            verdict = "-" if "holds" not in row else ("holds" if row["holds"] else "LOWER")
            print(
                f"{label:55} {_cell(f)} {_cell(e)}  {f['seconds'] if f else 0:>7.1f} "
                f"{e['seconds'] if e else 0:>7.1f}  {verdict}",
                flush=True,
            )
            if stopped:
                print("stopped: the pairs that finished are kept", file=sys.stderr)
                return 130
    judged = [r for r in done.values() if "holds" in r]
    held = sum(r["holds"] for r in judged)
    print(f"\nexact holds on {held} of {len(judged)} mutations")
    return 0 if held == len(judged) else 1


if __name__ == "__main__":
    sys.exit(main())
