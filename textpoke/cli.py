"""The `textpoke` command line: thin argparse front-end over the library.

Exit status: 0 when the command did its job (a sweep that found violations did its job: it reports
them), 1 when `--strict` was given and a violation was found, 2 on bad input (with a message naming
the problem; nothing was patched).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cpus import ConfigError, Machine, MachineConfig, NmiSource, TextpokeError
from cpus.config import DEFAULT_INTERLEAVE, DEFAULT_QUANTUM, INTERLEAVES

from .image import KernelConfig, Percpu, build_kernel

__all__ = ["main"]


def _at_least(low: int, words: str):
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{v} {words}")
        return v

    return parse


_positive = _at_least(1, "must be at least 1")
_nonneg = _at_least(0, "must be >= 0")


def cmd_machine(args: argparse.Namespace, out: Console) -> int:
    """Boot the machine and run its workloads (no patching): a smoke test of the hardware model."""
    kernel = build_kernel(KernelConfig(nr_traced=args.functions))
    sources = (NmiSource("perf", period=args.nmi_period),) if args.nmi_period else ()
    cfg = MachineConfig(cpus=args.cpus, seed=args.seed, quantum=args.quantum, nmi_sources=sources)
    m = Machine(cfg, kernel.boot_image())
    t0 = time.perf_counter()
    m.run(args.cycles)
    dt = time.perf_counter() - t0
    table = Table(title=f"{args.cpus} CPUs, {args.cycles} cycles, seed {args.seed}")
    for col in ("cpu", "instructions", "loops", "traced calls", "NMIs", "latched", "dropped", "state"):
        table.add_column(col, justify="right")
    total = 0
    for cpu in m.cpus:
        s = cpu.stats
        total += s["instructions"]
        calls = sum(m.percpu(cpu.index, Percpu.WL_COUNT + 8 * i) for i in range(kernel.config.nr_traced))
        table.add_row(
            str(cpu.index),
            str(s["instructions"]),
            str(m.percpu(cpu.index, Percpu.LOOPS)),
            str(calls),
            str(s["nmi_delivered"]),
            str(s["nmi_latched"]),
            str(s["nmi_dropped"]),
            "crashed" if cpu.crash else ("patcher" if cpu.index == cfg.patcher_cpu else "workload"),
        )
    out.print(table)
    for c in m.crashes:
        out.print(f"[red]{c}[/red]")
    out.print(f"trace hash {m.trace_hash}  ({m.trace.count} records)")
    out.print(f"{total / dt / 1e6:.1f} M simulated instructions/s ({dt:.2f} s)")
    return 1 if m.crashes else 0


def scenario_args(sp: argparse.ArgumentParser) -> None:
    from .image import BP_ENTRIES
    from .protocols import MUTATIONS, PROTOCOLS
    from .scenario import OPERATIONS

    g = sp.add_argument_group("scenario")
    g.add_argument("--protocol", choices=list(PROTOCOLS), default="bp-batch", help="patch protocol")
    g.add_argument("--int3", choices=list(BP_ENTRIES), default="emulate", help="#BP handler mode")
    g.add_argument("--cpus", type=_positive, default=4, help="CPUs, the patcher included (default 4)")
    g.add_argument("--sites", type=_positive, default=8, help="traced functions, all patched (default 8)")
    g.add_argument("--operation", choices=list(OPERATIONS), default="toggle", help="what to do to the sites")
    g.add_argument("--mutation", choices=list(MUTATIONS), default=None, help="break the protocol this way")
    g.add_argument("--quantum", type=_positive, default=DEFAULT_QUANTUM, help="mean scheduling quantum")
    g.add_argument("--irqoff", type=_nonneg, default=0, help="interrupts-off sections of this many spins")
    g.add_argument(
        "--interleave",
        choices=list(INTERLEAVES),
        default=DEFAULT_INTERLEAVE,
        help="exact: CPUs run coarse up to their next interaction with the patcher, ordered exactly; "
        "fine: the older scheduler (1..4-instruction quanta around patch steps)",
    )
    from .image import NMI_ENTRIES
    from .scenario import AIMS

    g.add_argument("--nmi", choices=["none", *NMI_ENTRIES], default="none", help="NMI entry (none: no NMIs)")
    g.add_argument("--nmi-rate", type=_nonneg, default=50, help="perf NMIs per million cycles per CPU")
    g.add_argument("--nmi-aim", choices=list(AIMS), default=None, help="also aim NMIs at this window")
    g.add_argument("--fred", action="store_true", help="FRED-style NMI unblocking")


def make_scenario(args: argparse.Namespace):
    from .scenario import Scenario

    return Scenario(
        protocol=args.protocol,
        int3=args.int3,
        cpus=args.cpus,
        sites=args.sites,
        operation=args.operation,
        mutation=args.mutation,
        quantum=args.quantum,
        irqoff_len=args.irqoff,
        interleave=args.interleave,
        nmi=args.nmi,
        nmi_rate=args.nmi_rate if args.nmi != "none" else 0,
        nmi_aim=args.nmi_aim,
        fred=args.fred,
    )


def _replay_command(args: argparse.Namespace, seed: int) -> str:
    from .scenario import replay_command

    return replay_command(make_scenario(args), seed)


def cmd_safety(args: argparse.Namespace, out: Console) -> int:
    """Sweep seeds for one scenario and tabulate the oracle's verdicts."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .executors import executor
    from .oracle import CLASSES
    from .sweep import sweep, wilson

    sc = make_scenario(args)
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    t0 = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[bad]} failing"),
        TimeRemainingColumn(),
        console=out,
        transient=False,
        disable=args.quiet,
    ) as bar:
        task = bar.add_task(sc.label(), total=len(seeds), bad=0)
        bad = 0

        def tick(r) -> None:
            nonlocal bad
            bad += 0 if r.ok else 1
            bar.update(task, advance=1, bad=bad)

        with executor(args.jobs, args.scheduler) as ex:
            result = sweep(sc, seeds, executor=ex, jobs=1, progress=tick)
    dt = time.perf_counter() - t0
    data = result.as_dict()
    table = Table(title=f"{sc.label()}: {result.seeds} seeds from {args.seed_start}")
    for col in ("class", "seeds", "rate", "95% CI", "events"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for k in CLASSES:
        n = data["violations"][k]
        lo, hi = wilson(n, result.seeds)
        style = "red" if n else "green"
        table.add_row(
            f"[{style}]{k}[/{style}]",
            str(n),
            f"{n / result.seeds:.1%}",
            f"{lo:.1%} - {hi:.1%}",
            str(data["violation_events"][k]),
        )
    out.print(table)
    exact = data["accounting_exact_seeds"]
    out.print(
        f"seeds with a violation: {data['seeds_with_violation']} of {result.seeds}; "
        f"traced-call accounting exact in {exact} of {result.seeds}; "
        f"{result.seeds / dt:.2f} seeds/s ({dt:.1f} s)"
    )
    if sc.nmi != "none":
        out.print(
            f"NMIs: {data['nmi_delivered']} delivered, {data['nmi_nested']} nested (in "
            f"{data['seeds_with_nested_nmi']} seeds), {data['nmi_repeated']} repeats, "
            f"{data['nmi_latched']} latched and {data['nmi_dropped']} dropped by hardware"
        )
    if result.failing:
        out.print(
            "failing seeds: " + " ".join(map(str, result.failing[:40])) + (" ..." if len(result.failing) > 40 else "")
        )
        first = result.failing[0]
        for k, line in data["first_violation"][str(first)].items():
            out.print(f"  seed {first} {k}: {line}")
        out.print(f"replay: {_replay_command(args, first)}")
    if args.json:
        data["seconds"] = dt
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        out.print(f"wrote {args.json}")
    return 1 if args.strict and result.failing else 0


def cmd_replay(args: argparse.Namespace, out: Console) -> int:
    """Rerun one seed and print its annotated trace."""
    from .replay import replay

    sc = make_scenario(args)
    return replay(
        sc,
        args.seed,
        out,
        show_runs=args.all,
        jsonl=args.jsonl,
        listing=args.out,
        limit=args.limit,
        timeline=args.timeline,
    )


def _hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text.replace(":", " "))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex bytes (e.g. e8 00 00 00 00)") from None


def cmd_patch(args: argparse.Namespace, out: Console) -> int:
    """Boot a machine, patch the given sites while the workloads run, report cost and verdict."""
    from .oracle import SafetyOracle
    from .patcher import Patcher, PatchError
    from .protocols import PatchRequest
    from .scenario import drain

    kernel = build_kernel(KernelConfig(nr_traced=args.functions))
    if len(args.site) != len(args.new):
        raise PatchError(f"give one --new per --site ({len(args.site)} sites, {len(args.new)} replacements)")
    if args.old and len(args.old) != len(args.site):
        raise PatchError(f"give one --old per --site, or none ({len(args.site)} sites, {len(args.old)} --old)")
    oracle = SafetyOracle(kernel, args.cpus)
    cfg = MachineConfig(cpus=args.cpus, seed=args.seed)
    m = Machine(cfg, kernel.boot_image(args.int3), [oracle])
    m.watch(kernel.sites.values())
    patcher = Patcher(m, kernel, skip_mode=args.int3 == "skip")
    patcher.listeners.append(oracle)
    requests = []
    for i, (where, new) in enumerate(zip(args.site, args.new, strict=False)):
        try:
            site = int(where, 0)
        except ValueError:
            if where not in kernel.symbols:
                raise PatchError(f"no symbol {where!r} in the kernel (traced functions are fn_000 ...)") from None
            site = kernel.symbols[where]
        old = args.old[i] if args.old else (m.read(site, len(new)) if m.is_text(site, len(new)) else b"")
        try:
            requests.append(PatchRequest(site, old, new))
        except ValueError as err:
            raise PatchError(str(err)) from None
    m.run(args.warmup)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = patcher.patch(requests, args.protocol)
    for w in caught:
        Console(stderr=True).print(f"[yellow]textpoke: warning:[/yellow] {w.message}")
    m.run(args.warmup)
    drain(m)
    verdict = oracle.verdict(m, args.seed, True)
    out.print(
        f"patched {len(requests)} site(s) with {args.protocol}: {report.latency} cycles, "
        f"{len(report.syncs)} syncs, {report.ipis} IPIs"
    )
    for r in requests:
        now = m.read(r.site, len(r.new))
        out.print(f"  {r.site:#x}: {r.old.hex(' ')} -> {now.hex(' ')}")
    out.print(verdict.summary())
    for v in verdict.violations[:10]:
        out.print(f"  {v.kind}: cpu{v.cpu} t={v.time} {v.code.hex(' ')} {v.disassembly} {v.detail}")
    return 1 if args.strict and not verdict.ok else 0


def cmd_run(args: argparse.Namespace, out: Console) -> int:
    """The default scenario: each protocol and NMI entry, a verdict table and a per-CPU timeline."""
    import json

    from .demo import DEFAULT_ROWS, run_demo
    from .executors import executor
    from .report import plot_timeline

    t0 = time.perf_counter()
    out.print(
        f"[bold]textpoke[/bold]: {len(DEFAULT_ROWS)} runs of 4 CPUs (cpu0 patches), 32 traced functions, "
        "NMIs on cpu1-3; ftrace enabled then disabled on every site. seed "
        f"{args.seed}"
    )
    with out.status("running the scenarios...") as status:

        def tick(row) -> None:
            status.update(f"done: {row.label}")

        with executor(args.jobs) as ex:
            rows = run_demo(args.seed, ex, tick)
    table = Table(title="verdicts and costs (cycles)")
    for col in ("scenario", "verdict", "enable", "disable", "syncs", "IPIs", "worst stall", "int3", "NMIs nested"):
        table.add_column(col, justify="left" if col in ("scenario", "verdict") else "right")
    for r in rows:
        verdict = (
            "[green]ok[/green]" if r.ok else "[red]" + ", ".join(f"{k} x{n}" for k, n in r.verdict.items()) + "[/red]"
        )
        lat = [("hung" if h else f"{x:,}") for x, h in zip(r.latencies, r.hung, strict=True)] + ["-", "-"]
        table.add_row(
            r.label,
            verdict,
            lat[0],
            lat[1],
            "+".join(map(str, r.syncs)),
            str(sum(r.ipis)),
            f"{r.worst_stall:,}",
            str(r.int3_hits),
            f"{r.nmi['nested']}/{r.nmi['delivered']}",
        )
    out.print(table)
    panels = [
        {
            "label": f"{r.label}: {'ok' if r.ok else ', '.join(r.verdict)}",
            "cpus": r.scenario.cpus,
            "patcher": 0,
            "start": r.window[0],
            "end": r.window[1],
            "intervals": r.intervals,
            "phases": r.phases,
            "violations": [v for v in r.violations if r.window[0] <= v[1] <= r.window[1]],
        }
        for r, (_, _, draw) in zip(rows, DEFAULT_ROWS, strict=True)
        if draw
    ]
    path = plot_timeline(panels, args.out / "timeline.png", "enabling ftrace on 32 sites while the workloads run")
    out.print(f"timeline of the enable operation: {path}")
    out.print("hashes: " + " ".join(f"{r.trace_hash[:12]}" for r in rows) + f"  ({time.perf_counter() - t0:.1f} s)")
    out.print("replay any row with: textpoke replay SEED --protocol P --nmi ENTRY --sites 32 --nmi-rate 300")
    if args.json:
        data = [
            {
                "label": r.label,
                "scenario": r.scenario.as_dict(),
                "seed": r.seed,
                "trace_hash": r.trace_hash,
                "violations": r.verdict,
                "accounting_exact": r.accounting_exact,
                "latencies": r.latencies,
                "syncs": r.syncs,
                "ipis": r.ipis,
                "worst_stall": r.worst_stall,
                "mean_stall": r.mean_stall,
                "int3_hits": r.int3_hits,
                "nmi": r.nmi,
            }
            for r in rows
        ]
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


LATENCY_METRICS = (
    "patch_latency_cycles",
    "mean_stall_cycles",
    "max_stall_cycles",
    "total_lost_cycles",
    "ipis",
    "int3_hits",
)


def cmd_latency(args: argparse.Namespace, out: Console) -> int:
    """Protocols x CPU counts x batch sizes x seeds: what one patch operation costs."""
    import json
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .costs import load_costs
    from .executors import executor
    from .latency import LatencyConfig, measure
    from .protocols import PROTOCOLS
    from .report import markdown_table, plot_latency

    costs = load_costs(args.config, args.cost)
    for p in args.protocols:
        if p not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
    for c in args.cpus:
        if not 2 <= c <= 128:
            raise ConfigError(f"CPU counts must be between 2 and 128, got {c}")
    if args.irqoff_cpu and any(args.irqoff_cpu >= c for c in args.cpus):
        raise ConfigError(f"--irqoff-cpu {args.irqoff_cpu} does not exist on a {min(args.cpus)}-CPU machine")
    configs = [
        LatencyConfig(
            protocol=p,
            cpus=c,
            sites=n,
            seed=s,
            busy=args.busy,
            irqoff_cpu=args.irqoff_cpu,
            irqoff_len=args.irqoff_len,
            costs=costs,
        )
        for p in args.protocols
        for c in args.cpus
        for n in args.sites
        for s in range(args.seed_start, args.seed_start + args.seeds)
    ]
    t0 = time.perf_counter()
    results = []
    with Progress(
        TextColumn("[bold]latency[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=out,
        disable=args.quiet,
    ) as bar:
        task = bar.add_task("", total=len(configs))
        with executor(args.jobs, args.scheduler) as ex:
            if ex is None:
                for cfg in configs:
                    results.append(measure(cfg))
                    bar.update(task, advance=1)
            else:
                futures = [ex.submit(measure, cfg) for cfg in configs]
                for f in futures:
                    results.append(f.result())
                    bar.update(task, advance=1)
    rows = [r.as_dict() for r in results]
    # mean over seeds per configuration
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["cpus"], r["sites"]), []).append(r)
    summary = []
    for (p, c, n), rs in groups.items():
        row = {"protocol": p, "cpus": c, "sites": n, "seeds": len(rs)}
        for m in (*LATENCY_METRICS, "syncs"):
            row[m] = sum(float(r[m]) for r in rs) / len(rs)
        waits = [r["waited_longest_for"] for r in rs if r["waited_longest_for"] is not None]
        row["waited_for"] = f"cpu{max(set(waits), key=waits.count)}" if waits else "-"
        summary.append(row)
    cols = ["protocol", "cpus", "sites", "syncs", *LATENCY_METRICS, "waited_for"]
    table = Table(title=f"one patch operation, mean of {args.seeds} seed(s); cycles")
    for col in cols:
        table.add_column(col.replace("_cycles", "").replace("_", " "), justify="left" if col == "protocol" else "right")
    for r in summary:
        table.add_row(*[f"{r[c]:,.0f}" if isinstance(r[c], float) else str(r[c]) for c in cols])
    out.print(table)
    stop = {(r["cpus"], r["sites"]): r for r in summary if r["protocol"] == "stop-machine"}
    bp = {(r["cpus"], r["sites"]): r for r in summary if r["protocol"] == "bp-batch"}
    for key in sorted(set(stop) & set(bp)):
        ratio = stop[key]["total_lost_cycles"] / max(bp[key]["total_lost_cycles"], 1)
        out.print(
            f"  total cycles lost, stop_machine / text_poke_bp (batched), {key[0]} CPUs, {key[1]} sites: {ratio:.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_latency(rows, LATENCY_METRICS, args.out / "latency.png", "one patch operation against CPU count")
    out.print(f"plots: {plot}")
    md = markdown_table(summary, cols)
    if args.markdown:
        args.markdown.write_text(md + "\n")
        out.print(f"wrote {args.markdown}")
    if args.json:
        data = {
            "costs": asdict(costs),
            "rows": [{k: v for k, v in r.items() if k != "phases"} for r in rows],
            "summary": summary,
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        out.print(f"wrote {args.json}")
    out.print(f"{len(configs)} runs in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_explore(args: argparse.Namespace, out: Console) -> int:
    """Every interleaving of a small configuration: a protocol, or an NMI entry."""
    from .explore import explore, explore_nmi

    if args.nmi:
        result = explore_nmi(args.nmi, nmis=args.nmis, fred=args.fred)
    else:
        if not 1 <= args.cpus <= 3 or not 1 <= args.sites <= 2:
            raise ConfigError("the explorer takes 1 to 3 workload CPUs (--cpus) and 1 or 2 sites (--sites)")
        result = explore(args.protocol, args.mutation, args.cpus, args.sites, max_states=args.max_states)
    out.print(result.report(), markup=False, highlight=False)
    return 1 if args.strict and not result.safe else 0


def cmd_callgraph(args: argparse.Namespace, out: Console) -> int:
    """Which traced sites the NMI entries and the #BP handler can reach (direct calls and jumps)."""
    from .callgraph import build_callgraph, reachable_sites
    from .image import BP_ENTRIES, NMI_CHOICES, NMI_ENTRIES

    kernel = build_kernel(KernelConfig(nr_traced=args.functions))
    g = build_callgraph(kernel)
    table = Table(title=f"traced sites reachable from each entry ({len(kernel.sites)} traced functions)")
    table.add_column("entry")
    table.add_column("reachable traced sites")
    for name in NMI_CHOICES:
        sym = NMI_ENTRIES[name][0]
        sites = reachable_sites(g, sym)
        table.add_row(f"NMI {name} ({sym})", ", ".join(f"{n} {a:#x}" for n, a in sites.items()) or "none")
    for mode, sym in BP_ENTRIES.items():
        sites = reachable_sites(g, sym)
        table.add_row(f"#BP {mode} ({sym})", ", ".join(sites) or "none")
    workload_only = sorted(set(kernel.sites) - set(reachable_sites(g, "nmi_handler")))
    out.print(table)
    out.print(f"called only by the workloads (through computed calls): {len(workload_only)} sites")
    if args.dot:
        _write_dot(g, args.dot)
        out.print(f"wrote {args.dot}")
    return 0


def _write_dot(g, path: Path) -> None:
    lines = ["digraph kernel {"]
    for n, d in g.nodes(data=True):
        shape = "box" if d.get("traced") else "ellipse"
        lines.append(f'  "{n}" [shape={shape}];')
    for a, b, d in g.edges(data=True):
        style = "dashed" if d.get("kind") == "jump" else "solid"
        lines.append(f'  "{a}" -> "{b}" [style={style}];')
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="textpoke",
        description="Live kernel text patching on emulated multi-CPU x86_64.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def machine_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cpus", type=_positive, default=4, help="number of CPUs (default 4)")
        sp.add_argument("--seed", type=_nonneg, default=0, help="scheduling seed (default 0)")
        sp.add_argument("--cycles", type=_positive, default=2_000_000, help="cycles to simulate")
        sp.add_argument("--quantum", type=_positive, default=DEFAULT_QUANTUM, help="mean quantum")
        sp.add_argument("--functions", type=_positive, default=32, help="traced functions in the kernel")
        sp.add_argument("--nmi-period", type=_nonneg, default=20_000, help="cycles between NMIs per CPU (0: none)")

    run = sub.add_parser("run", help="the default scenario: every protocol and NMI entry, judged and timed")
    run.add_argument("--seed", type=_nonneg, default=0, help="scenario seed (default 0)")
    run.add_argument("--out", type=Path, default=Path("textpoke-out"), help="where to write the timeline")
    run.add_argument("--jobs", type=_positive, default=None, help="worker processes (default: all cores)")
    run.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    run.set_defaults(func=cmd_run)
    mach = sub.add_parser("machine", help="boot the machine and run its workloads, no patching")
    machine_args(mach)
    mach.set_defaults(func=cmd_machine)

    saf = sub.add_parser("safety", help="sweep seeds for a protocol and count the oracle's violations")
    scenario_args(saf)
    saf.add_argument("--seeds", type=_positive, default=100, help="how many seeds (default 100)")
    saf.add_argument("--seed-start", type=_nonneg, default=0, help="first seed (default 0)")
    saf.add_argument("--jobs", type=_positive, default=None, help="worker processes (default: all cores)")
    saf.add_argument("--scheduler", default=None, help="run on this dask.distributed scheduler")
    saf.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    saf.add_argument("--strict", action="store_true", help="exit 1 when any seed has a violation")
    saf.add_argument("--quiet", action="store_true", help="no progress bar")
    saf.set_defaults(func=cmd_safety)

    from .image import BP_ENTRIES
    from .protocols import PROTOCOLS

    pat = sub.add_parser("patch", help="patch sites of a running machine and report the verdict")
    pat.add_argument("--site", action="append", required=True, help="address or symbol (repeatable)")
    pat.add_argument("--new", action="append", type=_hex_bytes, required=True, help="new bytes, hex")
    pat.add_argument("--old", action="append", type=_hex_bytes, default=None, help="expected old bytes")
    pat.add_argument("--protocol", choices=list(PROTOCOLS), default="bp")
    pat.add_argument("--int3", choices=list(BP_ENTRIES), default="emulate")
    pat.add_argument("--cpus", type=_positive, default=4)
    pat.add_argument("--seed", type=_nonneg, default=0)
    pat.add_argument("--functions", type=_positive, default=32)
    pat.add_argument("--warmup", type=_nonneg, default=5_000)
    pat.add_argument("--strict", action="store_true", help="exit 1 when the oracle found a violation")
    pat.set_defaults(func=cmd_patch)

    lat = sub.add_parser("latency", help="stop_machine against text_poke_bp as CPUs and batches grow")
    lat.add_argument("--protocols", nargs="+", default=["bp", "bp-batch", "stop-machine"])
    lat.add_argument("--cpus", type=_positive, nargs="+", default=[2, 4, 8, 16, 32, 64])
    lat.add_argument("--sites", type=_positive, nargs="+", default=[1, 8], help="sites per operation")
    lat.add_argument("--seeds", type=_positive, default=3)
    lat.add_argument("--seed-start", type=_nonneg, default=0)
    lat.add_argument("--busy", action="store_true", help="every workload CPU runs interrupts-off sections")
    lat.add_argument("--irqoff-cpu", type=_nonneg, default=0, help="this CPU runs long interrupts-off sections")
    lat.add_argument("--irqoff-len", type=_positive, default=20_000, help="spins per interrupts-off section")
    lat.add_argument("--cost", action="append", default=[], help="override a cost: NAME=CYCLES (repeatable)")
    lat.add_argument("--config", type=Path, default=None, help="TOML file with a [costs] table")
    lat.add_argument("--jobs", type=_positive, default=None)
    lat.add_argument("--scheduler", default=None, help="run on this dask.distributed scheduler")
    lat.add_argument("--out", type=Path, default=Path("textpoke-out"), help="where to write the plots")
    lat.add_argument("--json", type=Path, default=None)
    lat.add_argument("--markdown", type=Path, default=None)
    lat.add_argument("--quiet", action="store_true")
    lat.set_defaults(func=cmd_latency)

    from .explore import NESTED_FLAGS
    from .protocols import MUTATIONS

    ex = sub.add_parser("explore", help="every interleaving of a small configuration, and shortest counterexamples")
    ex.add_argument("--protocol", choices=list(PROTOCOLS), default="bp")
    ex.add_argument("--mutation", choices=list(MUTATIONS), default=None)
    ex.add_argument("--cpus", type=_positive, default=2, help="workload CPUs (1 to 3)")
    ex.add_argument("--sites", type=_positive, default=1, help="sites (1 or 2)")
    ex.add_argument("--max-states", type=_positive, default=200_000, help="the bound")
    ex.add_argument(
        "--nmi",
        choices=["naive", *NESTED_FLAGS, "latch-cmpxchg", "latch-cmpxchg386", "latch-dec"],
        default=None,
        help="explore this NMI entry instead of a protocol",
    )
    ex.add_argument("--nmis", type=_positive, default=3, help="NMIs that may arrive (with --nmi)")
    ex.add_argument("--fred", action="store_true", help="FRED-style NMI unblocking (with --nmi)")
    ex.add_argument("--strict", action="store_true", help="exit 1 when an unsafe state is reachable")
    ex.set_defaults(func=cmd_explore)

    cg = sub.add_parser("callgraph", help="traced sites reachable from the NMI entries and the #BP handler")
    cg.add_argument("--functions", type=_positive, default=32, help="traced functions in the kernel")
    cg.add_argument("--dot", type=Path, default=None, help="write the call graph in Graphviz dot form")
    cg.set_defaults(func=cmd_callgraph)

    rep = sub.add_parser("replay", help="rerun one seed and print its annotated trace")
    rep.add_argument("seed", type=_nonneg)
    scenario_args(rep)
    rep.add_argument("--all", action="store_true", help="also list every scheduling quantum")
    rep.add_argument("--limit", type=_nonneg, default=400, help="print at most this many lines (0: all)")
    rep.add_argument("--jsonl", type=Path, default=None, help="write the full trace as JSON Lines here")
    rep.add_argument("--out", type=Path, default=None, help="write the full annotated listing here")
    rep.add_argument("--timeline", type=Path, default=None, help="draw the per-CPU timeline of each operation here")
    rep.set_defaults(func=cmd_replay)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Console()
    try:
        return args.func(args, out)
    except (ConfigError, TextpokeError) as err:
        Console(stderr=True).print(f"[red]textpoke: error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
