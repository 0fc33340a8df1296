"""Safety benchmark: every protocol and NMI entry, with its violation rates and 95% intervals, and the
verdicts of the protocol and NMI work reproduced from one command.

    python benchmarks/safety.py [--seeds N] [--jobs J] [--only TEXT] [--row LABEL] [--json FILE [--resume]]
        [--markdown FILE]

With --json every finished seed is also logged, one line each, under FILE's name with `.seeds/`
(one file per row): a run stopped in the middle of a row (Ctrl-C, a machine shut down) and started
again with --resume runs only the seeds that did not finish.

Each row is a scenario swept over seeds; its expectation is "safe" (no seed may show a violation)
or "unsafe" (some seed must, with the listed classes among those found). The script prints a table
of the rate of every class with its Wilson 95% interval, and PASS/FAIL for every expectation.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from textpoke.executors import executor
from textpoke.oracle import CLASSES
from textpoke.report import markdown_table
from textpoke.scenario import Scenario
from textpoke.sweep import SeedResult, SweepInterrupted, SweepResult, sweep, wilson

NMI = {"nmi_rate": 500}

#: (label, scenario, expectation, classes that must be among those found when unsafe)
ROWS: list[tuple[str, Scenario, str, set[str]]] = [
    ("text_poke_bp, emulate", Scenario(protocol="bp"), "safe", set()),
    ("text_poke_bp, skip", Scenario(protocol="bp", int3="skip"), "safe", set()),
    ("text_poke_bp batched, emulate", Scenario(protocol="bp-batch"), "safe", set()),
    ("text_poke_bp batched, skip", Scenario(protocol="bp-batch", int3="skip"), "safe", set()),
    ("stop_machine", Scenario(protocol="stop-machine"), "safe", set()),
    ("unsafe: byte by byte", Scenario(protocol="naive-bytes"), "unsafe", {"torn-fetch"}),
    ("unsafe: one atomic store", Scenario(protocol="naive-atomic"), "unsafe", {"unsynced-modification"}),
    ("mutation: no sync after int3", Scenario(protocol="bp", mutation="no-sync-after-int3"), "unsafe", {"torn-fetch"}),
    ("mutation: no sync after tail", Scenario(protocol="bp", mutation="no-sync-after-tail"), "unsafe", set()),
    ("mutation: no final sync", Scenario(protocol="bp", mutation="no-final-sync"), "unsafe", set()),
    ("mutation: tail before int3", Scenario(protocol="bp", mutation="tail-before-int3"), "unsafe", set()),
    ("mutation: first byte before tail", Scenario(protocol="bp", mutation="first-before-tail"), "unsafe", set()),
    (
        "mutation: descriptors withdrawn early",
        Scenario(protocol="bp", mutation="early-withdraw"),
        "unsafe",
        {"unhandled-int3"},
    ),
    ("mutation: emulation without stack gap", Scenario(protocol="bp", int3="emulate-nogap"), "unsafe", {"crash"}),
    (
        "retarget, skip mode",
        Scenario(protocol="bp-batch", int3="skip", operation="retarget"),
        "unsafe",
        {"missed-call"},
    ),
    ("retarget, emulate mode", Scenario(protocol="bp-batch", operation="retarget"), "safe", set()),
    (
        "text_poke_bp batched, judged by the SDM's rule",
        Scenario(protocol="bp-batch", xmc_rule="sdm"),
        "unsafe",
        {"unsynced-modification"},
    ),
    # the nested NMI's frame overwrites the first one's: the CPU returns to garbage and crashes in
    # every seed; the oracle sees the wrong return itself (nmi-corruption) in about 1 seed in 20
    ("NMIs: naive entry", Scenario(protocol="bp-batch", nmi="naive", **NMI), "unsafe", {"crash"}),
    ("NMIs: nested-safe entry", Scenario(protocol="bp-batch", nmi="nested-safe", **NMI), "safe", set()),
    (
        "NMIs: nested-safe, aimed at exit window",
        Scenario(protocol="bp-batch", nmi="nested-safe", nmi_aim="exit-window", **NMI),
        "safe",
        set(),
    ),
    (
        "NMIs: nested-safe, aimed at repeat_nmi",
        Scenario(protocol="bp-batch", nmi="nested-safe", nmi_aim="repeat", **NMI),
        "safe",
        set(),
    ),
    ("NMIs: naive entry on FRED", Scenario(protocol="bp-batch", nmi="naive", fred=True, **NMI), "safe", set()),
    ("NMIs: i386 latch, cmpxchg", Scenario(protocol="bp-batch", nmi="latch-cmpxchg", **NMI), "safe", set()),
    (
        "NMIs: i386 latch, decrement, aimed",
        Scenario(protocol="bp-batch", nmi="latch-dec", nmi_aim="latch-window", **NMI),
        "safe",
        set(),
    ),
    (
        "NMIs: i386 latch, 386 cmpxchg, aimed",
        Scenario(protocol="bp-batch", nmi="latch-cmpxchg386", nmi_aim="latch-window", **NMI),
        "unsafe",
        {"lost-nmi"},
    ),
    (
        "NMI mutation: no RSP check, aimed",
        Scenario(protocol="bp-batch", nmi="nested-no-rsp-check", nmi_aim="exit-window", **NMI),
        "unsafe",
        {"nmi-corruption"},
    ),
    (
        "NMI mutation: no on-stack variable",
        Scenario(protocol="bp-batch", nmi="nested-no-variable", **NMI),
        "unsafe",
        {"nmi-corruption"},
    ),
    (
        "NMI mutation: frame from hardware copy",
        Scenario(protocol="bp-batch", nmi="nested-hw-frame", **NMI),
        "unsafe",
        {"nmi-corruption"},
    ),
    (
        "NMI mutation: no repeat_nmi check, aimed",
        Scenario(protocol="bp-batch", nmi="nested-no-rip-check", nmi_aim="repeat", **NMI),
        "unsafe",
        {"nmi-corruption"},
    ),
    (
        "stop_machine with NMIs",
        Scenario(protocol="stop-machine", nmi="nested-safe", **NMI),
        "unsafe",
        {"unsynced-modification"},
    ),
    ("stop_machine ftrace (2.6.28-3.4)", Scenario(protocol="stop-machine-ftrace"), "safe", set()),
    (
        "stop_machine ftrace with NMIs (the NMI entry window)",
        Scenario(protocol="stop-machine-ftrace", nmi="nested-safe", **NMI),
        "unsafe",
        {"unsynced-modification"},
    ),
    (
        "mutation: stop_machine ftrace without the NMI-side write",
        Scenario(protocol="stop-machine-ftrace", mutation="no-nmi-write", nmi="nested-safe", **NMI),
        "unsafe",
        {"unsynced-modification"},
    ),
    (
        "ftrace_modify_all_code sequence with NMIs",
        Scenario(operation="ftrace-linux", nmi="nested-safe", **NMI),
        "safe",
        set(),
    ),
    ("jump labels, batched", Scenario(client="jump-label", kernel="c"), "safe", set()),
    ("jump labels, byte by byte", Scenario(client="jump-label", kernel="c", protocol="naive-bytes"), "unsafe", set()),
    (
        "jump labels: no jmp8 emulation",
        Scenario(client="jump-label", kernel="c", int3="emulate-no-jmp8"),
        "unsafe",
        {"unhandled-int3"},
    ),
    ("static calls, batched", Scenario(client="static-call", kernel="c"), "safe", set()),
    ("static calls, one at a time", Scenario(client="static-call", kernel="c", protocol="bp"), "safe", set()),
    (
        "static calls: no ret emulation",
        Scenario(client="static-call", kernel="c", int3="emulate-noret"),
        "unsafe",
        {"unhandled-int3"},
    ),
    (
        "static calls: ret without int3 padding",
        Scenario(client="static-call", kernel="c", operation="retarget-unpadded"),
        "unsafe",
        {"sls-exposure"},
    ),
    ("kprobes", Scenario(client="kprobe", protocol="kprobe"), "safe", set()),
    (
        "kprobes: slot freed early",
        Scenario(client="kprobe", protocol="kprobe", mutation="kprobe-slot-freed-early"),
        "unsafe",
        set(),
    ),
    ("optprobes", Scenario(client="optprobe", protocol="optprobe"), "safe", set()),
    ("optprobes, aimed preemption", Scenario(client="optprobe", protocol="optprobe", preempt_aim=0.5), "safe", set()),
    (
        "optprobes: no wait, aimed preemption",
        Scenario(client="optprobe", protocol="optprobe", mutation="optprobe-no-wait", preempt_aim=0.5),
        "unsafe",
        set(),
    ),
    (
        "optprobes: kprobe slot freed early",
        Scenario(client="optprobe", protocol="optprobe", mutation="kprobe-slot-freed-early"),
        "unsafe",
        {"unhandled-int3"},
    ),
]


def _row(label: str, expect: str, needed: set[str], d: dict, seeds: int) -> dict:
    found = {k for k, n in d["violations"].items() if n}
    ok = not found if expect == "safe" else bool(found) and needed <= found
    first = d["failing_seeds"][0] if d["failing_seeds"] else None
    return {
        "scenario": label,
        "expected": expect,
        "check": "PASS" if ok else "FAIL",
        "seeds": seeds,
        "failing": d["seeds_with_violation"],
        "first failing seed": "-" if first is None else first,
        "classes": ", ".join(
            f"{k} {d['violations'][k] / seeds:.0%} [{wilson(d['violations'][k], seeds)[0]:.0%}-"
            f"{wilson(d['violations'][k], seeds)[1]:.0%}]"
            for k in CLASSES
            if d["violations"].get(k)
        )
        or "none",
    }


def _seed_log(json_path: Path, label: str) -> Path:
    """Where a row's finished seeds are logged, one JSON object a line."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return json_path.with_name(json_path.stem + ".seeds") / f"{slug}.jsonl"


def _logged(path: Path, sc, seeds: int) -> dict[int, SeedResult]:
    """The seeds of a row's log below `seeds` (a line cut short by a stop is dropped). The log's
    first line names the scenario it was written for: a log of another one is refused."""
    done: dict[int, SeedResult] = {}
    if not path.exists():
        return done
    lines = path.read_text().splitlines()
    if lines:
        try:
            head = json.loads(lines[0])
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("scenario") != json.loads(json.dumps(sc.as_dict())):
            raise SystemExit(
                f"{path} was not written for this row's scenario ({sc.as_dict()}): delete it, or run "
                "without --resume to start the row again"
            )
    for line in lines[1:]:
        try:
            r = SeedResult.from_json(json.loads(line))
        except (ValueError, TypeError, KeyError):
            continue
        if r.seed < seeds:
            done[r.seed] = r
    return done


def _sweep_row(sc, seeds: int, ex, log: Path | None, resume: bool) -> dict:
    """One row's sweep; with a log, the seeds it holds are not run again (`resume`) and every seed
    that finishes is added to it at once."""
    done = _logged(log, sc, seeds) if log is not None and resume else {}
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        if not resume or not log.exists() or not log.stat().st_size:
            log.write_text(json.dumps({"scenario": sc.as_dict()}) + "\n")
    todo = [s for s in range(seeds) if s not in done]
    if done:
        print(f"  {len(done)} of {seeds} seeds kept from {log}", flush=True)
    out = log.open("a") if log is not None else None
    if out is not None and log.stat().st_size and not log.read_bytes().endswith(b"\n"):
        out.write("\n")  # after a line a stop cut short

    def keep(r: SeedResult) -> None:
        if out is not None:
            out.write(json.dumps(r.to_json()) + "\n")
            out.flush()

    try:
        part = sweep(sc, todo, executor=ex, jobs=1, progress=keep)
    finally:
        if out is not None:
            out.close()
    whole = SweepResult(sc, sorted([*done.values(), *part.results], key=lambda r: r.seed), requested=seeds)
    return whole.as_dict()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="seeds per row (default 20)")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--only", action="append", default=[], help="run only the rows whose label contains this")
    p.add_argument("--row", action="append", default=[], help="run only the row with exactly this label")
    p.add_argument("--json", type=Path, help="results, rewritten after every row")
    p.add_argument(
        "--resume", action="store_true", help="keep the rows already in --json (same seed count) and run the rest"
    )
    p.add_argument("--markdown", type=Path)
    args = p.parse_args()
    if args.resume and not args.json:
        p.error("--resume needs --json")
    unknown = [r for r in args.row if r not in {row[0] for row in ROWS}]
    if unknown:
        p.error(f"no row labelled {unknown[0]!r}")
    wanted = {
        r[0] for r in ROWS if (not args.only and not args.row) or any(o in r[0] for o in args.only) or r[0] in args.row
    }
    done: dict[str, dict] = {}
    if args.resume and args.json.exists():
        old = json.loads(args.json.read_text())
        if old.get("seeds") == args.seeds:
            done = {r["row"]["scenario"]: r for r in old["rows"]}
    t0 = time.perf_counter()
    results = []

    def save() -> None:
        if args.json:
            # the rows kept from --resume that the loop has not reached yet are saved too: a run
            # stopped in the middle of a row loses only that row
            have = {r["row"]["scenario"] for r in results}
            rows = results + [r for label, r in done.items() if label not in have]
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")
            tmp.replace(args.json)

    with executor(args.jobs, args.scheduler) as ex:
        for label, sc, expect, needed in ROWS:
            if label in done:  # kept from --resume, whether or not --only names it
                d = done[label]["sweep"]
            elif label not in wanted:
                continue
            else:
                t1 = time.perf_counter()
                log = _seed_log(args.json, label) if args.json else None
                try:
                    d = _sweep_row(sc, args.seeds, ex, log, args.resume)
                except SweepInterrupted as stop:
                    kept = f"; its finished seeds are in {log}: --resume carries on" if log else ""
                    print(f"interrupted in row {label!r} after {stop.partial.seeds} seeds{kept}", file=sys.stderr)
                    return 130
                d["wall_s"] = round(time.perf_counter() - t1, 1)
            row = _row(label, expect, needed, d, args.seeds)
            results.append({"row": row, "sweep": d})
            save()
            print(f"{row['check']}  {label:45} {row['failing']:>4}/{args.seeds}  {row['classes']}", flush=True)
    failures = sum(r["row"]["check"] != "PASS" for r in results)
    table = markdown_table(
        [r["row"] for r in results],
        ["scenario", "expected", "check", "failing", "seeds", "first failing seed", "classes"],
    )
    print()
    print(table)
    print(f"\n{len(results) - failures} of {len(results)} verdicts reproduced; {time.perf_counter() - t0:.0f} s")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
