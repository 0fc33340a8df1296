"""The `textpoke` command line: thin argparse front-end over the library.

Exit status: 0 when the command did its job (a sweep that found violations did its job: it reports
them), 1 when `--strict` was given and a violation was found, 2 on bad input (one line naming the
option and the problem, no traceback; nothing was patched and no output file written), 130 when
stopped by Ctrl-C (one line; a sweep still writes its `--json` for the seeds that finished, marked
incomplete).
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from cpus import ConfigError, Machine, MachineConfig, NmiSource, TextpokeError
from cpus.config import DEFAULT_INTERLEAVE, DEFAULT_QUANTUM, INTERLEAVES, MAX_CPUS

from .cli_support import (
    FORMATS,
    OneLineParser,
    bounded,
    escape,
    output_dir,
    output_file,
    output_image,
    print_table,
    stdout_console,
    write_output,
)
from .image import KERNELS, MAX_TRACED, KernelConfig, Percpu, build_kernel

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

#: upper bounds of the numeric options: beyond them a run would not end in any useful time
MAX_RUN_CYCLES = 1_000_000_000  # machine --cycles, patch --warmup (minutes of simulation)
MAX_IRQOFF_SPINS = 1_000_000  # an interrupts-off section of 3 million cycles (1.2 ms)
MAX_QUANTUM = 1_000_000
MAX_SEED = 2**63 - 1
MAX_SEEDS = 10**12
MAX_NMI_RATE = 200_000
MAX_EXPLORE_STATES = 10_000_000
_cycles = bounded(1, MAX_RUN_CYCLES)
_warmup = bounded(0, MAX_RUN_CYCLES)
_seed = bounded(0, MAX_SEED)
_seeds = bounded(1, MAX_SEEDS)
_quantum = bounded(1, MAX_QUANTUM)
_functions = bounded(2, MAX_TRACED)  # the NMI handler calls at least two of them
_jobs = bounded(1, 512)


def _protocol_name(text: str) -> str:
    """The one place a `--protocol` name is checked: built in, an installed entry point, or
    package.module:function (resolved now, so a bad name fails before any work)."""
    from .plugins import resolve_protocol

    try:
        resolve_protocol(text)
    except (ValueError, TextpokeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _latency_protocol(text: str) -> str:
    """A `latency --protocols` name: a protocol, or ftrace-linux (ftrace_modify_all_code's sequence)."""
    return text if text == "ftrace-linux" else _protocol_name(text)


def _probability(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability between 0 and 1")
    return v


def _mutation_name(text: str) -> str:
    """A `--mutation` name: built in, an installed entry point, or package.module:function."""
    from .plugins import resolve_mutation

    try:
        resolve_mutation(text)
    except (ValueError, TextpokeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _stderr_line(text: str) -> None:
    """One line on stderr, as it is (no markup, no wrapping)."""
    Console(stderr=True).print(text, markup=False, highlight=False, soft_wrap=True)


def _console_for(args: argparse.Namespace) -> Console:
    """Where a command's prose goes: stdout, or stderr when stdout carries `--format json|csv`."""
    if getattr(args, "format", "table") != "table":
        return Console(stderr=True)
    return stdout_console()


def _object_arg(sp: argparse.ArgumentParser) -> None:
    """--object and --kernel: what code the kernel runs."""
    sp.add_argument(
        "--object",
        action="append",
        default=[],
        metavar="FILE.o",
        help="load this ELF object (compiled with the kernel's flags) as the traced code (repeatable)",
    )
    sp.add_argument(
        "--kernel",
        choices=list(KERNELS),
        default=None,
        help="the built-in workload and traced functions: assembly or C (default: asm, or the one the client's "
        "sites are in)",
    )


def kernel_choice(args: argparse.Namespace) -> str:
    """--kernel, or the kernel the chosen client's sites are in (asm when neither says)."""
    if args.kernel is not None:
        return args.kernel
    if getattr(args, "object", None):
        return "asm"
    from .clients import resolve_client

    return resolve_client(getattr(args, "client", "ftrace")).kernel or "asm"


def _kernel_config(args: argparse.Namespace, functions: int | None = None) -> KernelConfig:
    """The kernel the command asked for: the user's objects, or the built-in traced functions."""
    if args.object:
        if kernel_choice(args) != "asm":
            raise ConfigError("--object replaces the built-in workload and traced functions; drop --kernel")
        return KernelConfig(objects=tuple(args.object))
    n = functions if functions is not None else args.functions
    # the NMI handler calls up to four of the traced functions
    return KernelConfig(nr_traced=n, nmi_funcs=min(4, 1 << (n.bit_length() - 1)), kernel=kernel_choice(args))


def cmd_machine(args: argparse.Namespace, out: Console) -> int:
    """Boot the machine and run its workloads (no patching): a smoke test of the hardware model."""
    kernel = build_kernel(_kernel_config(args))
    sources = (NmiSource("perf", period=args.nmi_period),) if args.nmi_period else ()
    cfg = MachineConfig(cpus=args.cpus, seed=args.seed, quantum=args.quantum, nmi_sources=sources)
    m = Machine(cfg, kernel.boot_image())
    t0 = time.perf_counter()
    m.run(args.cycles)
    dt = time.perf_counter() - t0
    cols = ("cpu", "instructions", "loops", "traced calls", "NMIs", "latched", "dropped", "state")
    rows = []
    total = 0
    for cpu in m.cpus:
        s = cpu.stats
        total += s["instructions"]
        calls = sum(m.percpu(cpu.index, Percpu.WL_COUNT + 8 * i) for i in range(kernel.config.nr_traced))
        if kernel.user_code:
            calls = "-"  # compiled code keeps no call counts
        rows.append(
            (
                cpu.index,
                s["instructions"],
                m.percpu(cpu.index, Percpu.LOOPS),
                calls,
                s["nmi_delivered"],
                s["nmi_latched"],
                s["nmi_dropped"],
                "crashed" if cpu.crash else ("patcher" if cpu.index == cfg.patcher_cpu else "workload"),
            )
        )
    title = f"{args.cpus} CPUs, {args.cycles} cycles, seed {args.seed}"
    print_table(out, args.format, title, cols, rows, right=cols)
    for c in m.crashes:
        out.print(str(c), style="red", markup=False, highlight=False)
    out.print(f"trace hash {m.trace_hash}  ({m.trace.count} records)")
    out.print(f"{total / dt / 1e6:.1f} M simulated instructions/s ({dt:.2f} s)")
    return 1 if m.crashes else 0


def _names(builtins) -> str:
    return ", ".join(builtins) + ", an installed entry point, or package.module:function"


def _protocol_help(builtins, default: str) -> str:
    return f"patch protocol: {_names(builtins)} (default {default})"


def scenario_args(sp: argparse.ArgumentParser) -> None:
    from .clients import client_names, resolve_client
    from .image import BP_ENTRIES
    from .protocols import MUTATIONS, PROTOCOLS

    g = sp.add_argument_group("scenario")
    g.add_argument(
        "--client",
        choices=client_names(),
        default="ftrace",
        help="what is patched: " + ", ".join(client_names()) + " (default ftrace)",
    )
    g.add_argument(
        "--protocol",
        type=_protocol_name,
        default=None,
        metavar="P",
        help=_protocol_help(PROTOCOLS, "bp-batch, or the client's own: kprobe, optprobe"),
    )
    g.add_argument("--int3", choices=list(BP_ENTRIES), default="emulate", help="#BP handler mode")
    g.add_argument(
        "--cpus", type=bounded(2, MAX_CPUS), default=4, help=f"CPUs, the patcher included (2 to {MAX_CPUS}; default 4)"
    )
    g.add_argument(
        "--sites", type=bounded(2, MAX_TRACED), default=8, help="traced functions, all patched (2 to 256; default 8)"
    )
    g.add_argument(
        "--operation",
        choices=sorted({op for c in client_names() for op in resolve_client(c).operations}),
        default=None,
        help="what to do to the sites (default: toggle, or the client's own default)",
    )
    g.add_argument(
        "--mutation",
        type=_mutation_name,
        default=None,
        metavar="M",
        help="break the protocol this way: " + _names(MUTATIONS),
    )
    g.add_argument(
        "--preempt-aim",
        type=_probability,
        default=0.0,
        metavar="P",
        help="probe clients: preempt a workload CPU with probability P right after a probe's first instruction",
    )
    g.add_argument("--quantum", type=_quantum, default=DEFAULT_QUANTUM, help="mean scheduling quantum (instructions)")
    g.add_argument(
        "--stop-at-first",
        action="store_true",
        help="end each seed at its first violation: the same seeds are caught, by the same first class, "
        "and a caught seed costs only its run up to there (later violations are not counted)",
    )
    g.add_argument(
        "--irqoff",
        type=bounded(0, MAX_IRQOFF_SPINS),
        default=0,
        help=f"workloads run interrupts-off sections of this many spins (0: none; at most {MAX_IRQOFF_SPINS:,})",
    )
    g.add_argument(
        "--interleave",
        choices=list(INTERLEAVES),
        default=DEFAULT_INTERLEAVE,
        help="exact: CPUs run coarse up to their next interaction with the patcher, ordered exactly; "
        "fine: the older scheduler (1..4-instruction quanta around patch steps)",
    )
    from cpus.config import NMI_CPUS

    g.add_argument(
        "--ipi",
        choices=["shorthand", "per-target"],
        default="shorthand",
        help="sync IPIs: one all-but-self shorthand while every CPU is online (Linux), or one per target",
    )
    from .image import NMI_ENTRIES
    from .oracle import XMC_RULES
    from .scenario import AIMS

    g.add_argument("--nmi", choices=["none", *NMI_ENTRIES], default="none", help="NMI entry (none: no NMIs)")
    g.add_argument(
        "--nmi-rate",
        type=bounded(0, MAX_NMI_RATE),
        default=None,
        help="perf NMIs per million cycles per CPU (with --nmi; default 50)",
    )
    g.add_argument("--nmi-aim", choices=list(AIMS), default=None, help="also aim NMIs at this window (with --nmi)")
    g.add_argument("--fred", action="store_true", help="FRED-style NMI unblocking (with an IDT --nmi entry)")
    g.add_argument(
        "--nmi-cpus",
        choices=list(NMI_CPUS),
        default="all",
        help="CPUs the NMI sources reach: all (the patcher too, default) or workers",
    )
    g.add_argument(
        "--xmc-rule",
        choices=list(XMC_RULES),
        default="linux",
        help="cross-modifying-code rule the oracle judges by: linux (text_poke_bp's, default), sdm (stricter), "
        "or coherent (looser: fetch coherent with stores, only the bytes executed are judged)",
    )
    g.add_argument(
        "--delivery-serializes",
        action="store_true",
        help="looser than the SDM: every interrupt, exception and NMI delivery also serializes the CPU",
    )
    g.add_argument(
        "--no-sls-check",
        dest="sls_check",
        action="store_false",
        help="do not flag a `ret` a patch leaves without int3 padding (straight-line speculation exposure)",
    )
    _object_arg(g)  # type: ignore[arg-type]


def check_scenario_options(args: argparse.Namespace) -> None:
    """Refuse options that would be silently ignored or that contradict each other."""
    from .clients import resolve_client
    from .protocols import PatchRequest, build, probe_sample

    if args.protocol is None:
        args.protocol = resolve_client(args.client).default_protocol
    if args.mutation is not None:
        runs = [args.protocol, *sorted(resolve_client(args.client).also_runs)]
        sample = (PatchRequest(0x1000, b"\x0f\x1f\x44\x00\x00", b"\xe8\x00\x00\x00\x00"),)

        def changes(protocol: str) -> bool:
            req = probe_sample(protocol) or sample
            return build(protocol, req, args.mutation) != build(protocol, req)

        if not any(changes(p) for p in runs):
            raise ConfigError(f"--mutation {args.mutation} changes nothing in --protocol {' or '.join(runs)}")
    if args.nmi == "none":
        given = (
            (args.nmi_rate is not None, "--nmi-rate"),
            (args.fred, "--fred"),
            (args.nmi_aim is not None, "--nmi-aim"),
        )
        for is_given, option in given:
            if is_given:
                raise ConfigError(f"{option} needs an NMI entry (--nmi ENTRY)")
    elif args.fred and args.nmi.startswith("latch"):
        raise ConfigError(f"--fred models x86_64 FRED hardware; --nmi {args.nmi} is an i386 entry")


def make_scenario(args: argparse.Namespace):
    from .clients import resolve_client
    from .scenario import Scenario

    check_scenario_options(args)
    return Scenario(
        protocol=args.protocol,
        int3=args.int3,
        cpus=args.cpus,
        sites=args.sites,
        operation=args.operation or resolve_client(args.client).default_operation,
        client=args.client,
        mutation=args.mutation,
        quantum=args.quantum,
        irqoff_len=args.irqoff,
        interleave=args.interleave,
        nmi=args.nmi,
        nmi_rate=(50 if args.nmi_rate is None else args.nmi_rate) if args.nmi != "none" else 0,
        nmi_aim=args.nmi_aim,
        fred=args.fred,
        objects=tuple(args.object),
        kernel=kernel_choice(args),
        nmi_cpus=args.nmi_cpus,
        xmc_rule=args.xmc_rule,
        delivery_serializes=args.delivery_serializes,
        sls_check=args.sls_check,
        ipi=args.ipi,
        preempt_aim=args.preempt_aim,
        stop_at_first=args.stop_at_first,
    )


def _replay_command(args: argparse.Namespace, seed: int) -> str:
    from .scenario import replay_command

    return replay_command(make_scenario(args), seed)


def _check_pool_options(args: argparse.Namespace) -> None:
    if getattr(args, "scheduler", None):
        from .executors import check_scheduler

        if args.jobs is not None:
            raise ConfigError("--jobs and --scheduler exclude each other (the dask cluster has its own workers)")
        check_scheduler(args.scheduler)


#: what each client's accounting counts (the oracle's missed-call / extra-call / branch-miscount)
_ACCOUNTING = {
    "ftrace": "traced-call",
    "jump-label": "branch",
    "static-call": "static-call target",
    "kprobe": "probe hit",
    "optprobe": "probe hit",
}


def cmd_safety(args: argparse.Namespace, out: Console) -> int:
    """Sweep seeds for one scenario and tabulate the oracle's verdicts."""
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .executors import executor
    from .oracle import CLASSES
    from .sweep import SweepInterrupted, sweep, wilson

    sc = make_scenario(args)
    _check_pool_options(args)
    seeds = range(args.seed_start, args.seed_start + args.seeds)
    t0 = time.perf_counter()
    interrupted = False
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
        task = bar.add_task(escape(sc.label()), total=len(seeds), bad=0)
        bad = 0

        def tick(r) -> None:
            nonlocal bad
            bad += 0 if r.ok else 1
            bar.update(task, advance=1, bad=bad)

        try:
            with executor(args.jobs, args.scheduler) as ex:
                result = sweep(sc, seeds, executor=ex, jobs=1, progress=tick)
        except SweepInterrupted as stop:
            result, interrupted = stop.partial, True
    dt = time.perf_counter() - t0
    data = result.as_dict()
    if interrupted:
        data["seconds"] = dt
        if args.json:
            write_output(args.json, json.dumps(data, indent=2) + "\n")
        _stderr_line(
            f"textpoke: interrupted: {result.seeds} of {len(seeds)} seeds done"
            + (f", {len(result.failing)} with a violation; wrote {args.json} (marked incomplete)" if args.json else "")
        )
        return 130
    n = max(result.seeds, 1)
    rows: list[tuple] = []
    for k in CLASSES:
        c = data["violations"][k]
        rows.append((k, c, c / n, *wilson(c, result.seeds), data["violation_events"][k]))
    if result.incomplete:
        k = len(result.incomplete)
        rows.append(("incomplete (no verdict)", k, k / n, None, None, None))
    styles = ["red" if r[1] else "green" for r in rows]
    if result.incomplete:
        styles[-1] = "yellow"
    title = f"{sc.label()}: {result.seeds} seeds from {args.seed_start}"
    if args.format == "table":
        cols: tuple[str, ...] = ("class", "seeds", "rate", "95% CI", "events")
        rows = [
            (k, c, f"{r:.1%}", "-" if lo is None else f"{lo:.1%} - {hi:.1%}", "-" if e is None else e)
            for k, c, r, lo, hi, e in rows
        ]
    else:
        cols = ("class", "seeds", "rate", "ci95_low", "ci95_high", "events")
    print_table(out, args.format, title, cols, rows, right=cols[1:], styles=styles)
    exact = data["accounting_exact_seeds"]
    out.print(
        f"seeds with a violation: {data['seeds_with_violation']} of {result.seeds}; "
        f"{_ACCOUNTING.get(args.client, 'call')} accounting exact in {exact} of {result.seeds}; "
        f"{result.seeds / dt:.2f} seeds/s ({dt:.1f} s)",
        markup=False,
    )
    if data["violations_by_cpu"]:
        per = ", ".join(f"cpu{c} {n}" for c, n in data["violations_by_cpu"].items())
        out.print(f"violation events by CPU: {per}")
    if sc.nmi != "none":
        out.print(
            f"NMIs: {data['nmi_delivered']} delivered, {data['nmi_nested']} nested (in "
            f"{data['seeds_with_nested_nmi']} seeds), {data['nmi_repeated']} repeats, "
            f"{data['nmi_latched']} latched and {data['nmi_dropped']} dropped by hardware"
        )
    if result.incomplete:
        first = result.incomplete[0]
        out.print(
            f"incomplete seeds (a patch operation ran out of its cycle budget while still making progress, "
            f"or the emulator hit a limit): "
            f"{' '.join(map(str, result.incomplete[:40]))}; seed {first}: {data['incomplete_seeds'][str(first)]}",
            markup=False,
        )
    if result.failing:
        out.print(
            "failing seeds: " + " ".join(map(str, result.failing[:40])) + (" ..." if len(result.failing) > 40 else "")
        )
        first = result.failing[0]
        for k, line in data["first_violation"][str(first)].items():
            out.print(f"  seed {first} {k}: {line}", markup=False, highlight=False)
        out.print(f"replay: {_replay_command(args, first)}", markup=False, highlight=False)
    if args.json:
        data["seconds"] = dt
        write_output(args.json, json.dumps(data, indent=2) + "\n")
        out.print(f"wrote {args.json}", markup=False)
    return 1 if args.strict and result.failing else 0


def cmd_replay(args: argparse.Namespace, out: Console) -> int:
    """Rerun one seed and print its annotated trace."""
    from .replay import replay

    if args.perfetto is not None and args.perfetto.is_dir():
        raise ConfigError(f"--perfetto {args.perfetto} is a directory; give a file name (e.g. trace.json)")
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
        perfetto=args.perfetto,
    )


def _hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text.replace(":", " "))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not hex bytes (e.g. e8 00 00 00 00)") from None


def cmd_patch(args: argparse.Namespace, out: Console) -> int:
    """Boot a machine, patch the given sites while the workloads run, report cost and verdict."""
    from .oracle import SafetyOracle, snoop_for
    from .patcher import Patcher, PatchError
    from .protocols import PatchRequest
    from .scenario import drain

    kernel = build_kernel(_kernel_config(args))
    if len(args.site) != len(args.new):
        raise PatchError(f"give one --new per --site ({len(args.site)} sites, {len(args.new)} replacements)")
    if args.old and len(args.old) != len(args.site):
        raise PatchError(f"give one --old per --site, or none ({len(args.site)} sites, {len(args.old)} --old)")
    oracle = SafetyOracle(kernel, args.cpus, xmc_rule=args.xmc_rule)
    cfg = MachineConfig(cpus=args.cpus, seed=args.seed)
    cfg = dataclasses.replace(cfg, snoop=snoop_for(args.xmc_rule, cfg.snoop))
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
                some = ", ".join(list(kernel.sites)[:4])
                raise PatchError(f"--site: no symbol {where!r} in the kernel (traced functions: {some} ...)") from None
            site = kernel.sites.get(where, kernel.symbols[where])
        if not new:
            raise PatchError(f"--new for --site {where}: give at least one byte")
        if site < 0 or not m.is_text(site, len(new)):
            raise PatchError(f"--site {where} is not inside the kernel text ({m.text_lo:#x} to {m.text_hi:#x})")
        old = args.old[i] if args.old else m.read(site, len(new))
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
        Console(stderr=True).print(f"[yellow]textpoke: warning:[/yellow] {escape(str(w.message))}", soft_wrap=True)
    m.run(args.warmup)
    drain(m)
    verdict = oracle.verdict(m, args.seed, True)
    state = f" -- hung, waiting for {report.hung}" if report.hung else ""
    state += f" -- incomplete: {report.incomplete}" if report.incomplete else ""
    out.print(
        f"patched {len(requests)} site(s) with {args.protocol}: {report.latency} cycles, "
        f"{len(report.syncs)} syncs, {report.ipis} IPIs{state}",
        markup=False,
    )
    for r in requests:
        now = m.read(r.site, len(r.new))
        out.print(f"  {r.site:#x}: {r.old.hex(' ')} -> {now.hex(' ')}")
    out.print(verdict.summary(), markup=False)
    for v in verdict.violations[:10]:
        line = f"  {v.kind}: cpu{v.cpu} t={v.time} {v.code.hex(' ')} {v.disassembly} {v.detail}"
        out.print(line, markup=False, highlight=False)
    return 1 if args.strict and not verdict.ok else 0


def _import_in_background(ex, module: str) -> threading.Thread:
    """Import `module` (matplotlib: a second of CPU) on a thread while the pool's workers run, once
    they are all started: a process forked while another thread imports could inherit a held
    import lock. Without a pool there is nothing to overlap: the thread is started and joined."""
    import importlib

    if ex is not None:
        ex.submit(int).result()  # the pool forks its workers at the first task
    thread = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    thread.start()
    if ex is None:
        thread.join()
    return thread


def cmd_run(args: argparse.Namespace, out: Console) -> int:
    """The default scenario: each protocol and NMI entry, a verdict table and a per-CPU timeline."""
    import json

    from .clients import resolve_client, steps_of
    from .demo import TIMELINE_STEP, prepare_rows, protocol_row, rows_for, run_demo
    from .executors import executor
    from .scenario import replay_command

    client = args.client
    if client in ("static-call", "kprobe", "optprobe") and args.object:
        raise ConfigError(
            f"--client {client}: its rows run on the built-in {resolve_client(client).kernel} kernel; drop --object"
        )
    objects = tuple(args.object)
    demo_rows = prepare_rows(
        [*rows_for(client), *(protocol_row(p, client) for p in args.protocol)],
        objects=objects,
        kernel=kernel_choice(args),
        client=client,
    )
    if args.perfetto is not None and args.perfetto.exists() and not args.perfetto.is_dir():
        raise ConfigError(f"--perfetto {args.perfetto} exists and is not a directory")
    t0 = time.perf_counter()
    first = demo_rows[0][1]
    what = f"the functions of {', '.join(objects)}" if objects else f"{first.sites} traced functions"
    done_to = {
        "ftrace": "ftrace enabled then disabled on every site",
        "static-call": "8 static calls (24 sites) retargeted, set to NULL and restored",
        "kprobe": "a kprobe in every traced function registered, then unregistered",
        "optprobe": "an optprobe in every traced function registered and optimized, then unoptimized and unregistered",
    }.get(client, f"{client}: every site switched on then off")
    out.print(
        f"[bold]textpoke[/bold]: {len(demo_rows)} runs of 4 CPUs (cpu0 patches), {what}, "
        f"NMIs on every CPU; {done_to}. seed {args.seed}"
    )
    with out.status("running the scenarios...") as status:

        def tick(row) -> None:
            status.update(f"done: {escape(row.label)}")

        with executor(args.jobs) as ex:
            plotting = _import_in_background(ex, "textpoke.report")
            rows = run_demo(
                args.seed,
                ex,
                tick,
                demo_rows,
                args.perfetto,
                objects=objects,
                kernel=kernel_choice(args),
                client=client,
            )
    plotting.join()
    from .report import plot_timeline

    # a column per step of the operation: enable, disable (ftrace, jump-label); retarget, null, restore
    # (static-call); register, unregister (the probe clients)
    step_names = [name for name, _ in steps_of(resolve_client(client), first.operation)]
    cols = ("scenario", "verdict", *step_names, "syncs", "IPIs", "worst stall", "int3", "NMIs nested")
    table_rows = []
    for r in rows:
        verdict = "ok" if r.ok else ", ".join(f"{k} x{n}" for k, n in r.verdict.items())
        lat: list = [("hung" if h else x) for x, h in zip(r.latencies, r.hung, strict=True)]
        lat += ["-"] * (len(step_names) - len(lat))
        table_rows.append(
            (
                r.label,
                verdict,
                *lat[: len(step_names)],
                "+".join(map(str, r.syncs)),
                sum(r.ipis),
                r.worst_stall,
                r.int3_hits,
                f"{r.nmi['nested']}/{r.nmi['delivered']}",
            )
        )
    styles = ["green" if r.ok else "red" for r in rows]
    print_table(
        out, args.format, "verdicts and costs (cycles)", cols, table_rows, right=cols[2:], styles=styles, style_col=1
    )
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
        for r, (_, _, draw) in zip(rows, demo_rows, strict=True)
        if draw
    ]
    try:
        what = {
            "ftrace": "enabling ftrace on 32 sites",
            "static-call": "retargeting 8 static calls (24 sites)",
            "kprobe": f"unregistering {first.sites} kprobes",
            "optprobe": f"registering and optimizing {first.sites} optprobes",
        }.get(client, f"switching on 32 {client} sites")
        path = plot_timeline(panels, args.out / "timeline.png", f"{what} while the workloads run")
    except OSError as err:
        raise ConfigError(f"cannot write {args.out / 'timeline.png'}: {err.strerror or err}") from None
    out.print(f"timeline of the {TIMELINE_STEP.get(client, step_names[0])} operation: {path}", markup=False)
    out.print("hashes: " + " ".join(f"{r.trace_hash[:12]}" for r in rows) + f"  ({time.perf_counter() - t0:.1f} s)")
    failing = [r for r in rows if not r.ok]
    if failing:
        out.print("replay the rows that found a violation:")
        for r in failing:
            out.print(f"  {replay_command(r.scenario, r.seed)}", markup=False, highlight=False)
    if args.perfetto is not None:
        out.print(f"Perfetto traces, one per row: {args.perfetto}/", markup=False)
    if args.json:
        data = [
            {
                "label": r.label,
                "scenario": r.scenario.as_dict(),
                "seed": r.seed,
                "trace_hash": r.trace_hash,
                "violations": r.verdict,
                "accounting_exact": r.accounting_exact,
                "steps": r.steps,
                "latencies": r.latencies,
                "grace_wait": r.grace_wait,
                "syncs": r.syncs,
                "ipis": r.ipis,
                "worst_stall": r.worst_stall,
                "mean_stall": r.mean_stall,
                "int3_hits": r.int3_hits,
                "nmi": r.nmi,
                "replay": replay_command(r.scenario, r.seed),
            }
            for r in rows
        ]
        write_output(args.json, json.dumps(data, indent=2) + "\n")
    return 0


LATENCY_METRICS = (
    "patch_latency_cycles",
    "mean_stall_cycles",
    "max_stall_cycles",
    "total_lost_cycles",
    "ipis",
    "int3_hits",
)
#: the real-time columns: worst over CPUs and seeds, and lateness percentiles pooled over seeds
RT_METRICS = ("max_interruption_cycles", "rt_lateness_p50", "rt_lateness_p99", "rt_lateness_max")


def cmd_latency(args: argparse.Namespace, out: Console) -> int:
    """Protocols x CPU counts x batch sizes x seeds: what one patch operation costs."""
    import json
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .clients import resolve_client
    from .costs import load_costs
    from .executors import executor, stream
    from .latency import (
        DEFAULT_PROTOCOLS,
        LATENCY_STEPS,
        LatencyConfig,
        check,
        default_steps,
        measure,
        rt_cpus_for,
        rt_summary,
    )
    from .report import markdown_table, plot_latency, plot_rt

    costs = load_costs(args.config, args.cost)
    _check_pool_options(args)
    client = args.client
    protocols = args.protocols if args.protocols is not None else list(DEFAULT_PROTOCOLS[client])
    for p in protocols:
        if p != "ftrace-linux":  # ftrace_modify_all_code's sequence, not a protocol
            _protocol_name(p)
    measurable = LATENCY_STEPS[client][1]
    if args.steps is not None:
        if len(measurable) == 1:
            raise ConfigError(
                f"--steps is for static-call, kprobe and optprobe; {client} measures its {measurable[0]} operation"
            )
        bad = [s for s in args.steps if s not in measurable]
        if bad:
            raise ConfigError(f"client {client} has no step {bad[0]!r} to measure; choose from {', '.join(measurable)}")
    steps = list(dict.fromkeys(args.steps)) if args.steps is not None else list(default_steps(client))
    probes = bool(resolve_client(client).extra.get("probes"))
    if probes and args.rt_cpus:
        raise ConfigError(
            f"--rt-cpus: client {client} runs on the kernel built with probes, which is preemptible: its local "
            "timer is the scheduler tick, and it has no RT task"
        )
    if args.irqoff_cpu and any(args.irqoff_cpu >= c for c in args.cpus):
        raise ConfigError(f"--irqoff-cpu {args.irqoff_cpu} does not exist on a {min(args.cpus)}-CPU machine")
    if args.preempt_off_cpu and any(args.preempt_off_cpu >= c for c in args.cpus):
        raise ConfigError(f"--preempt-off-cpu {args.preempt_off_cpu} does not exist on a {min(args.cpus)}-CPU machine")
    rt_spec = [] if probes else [1, -1] if args.rt_cpus is None else args.rt_cpus
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
            rt_cpus=rt_cpus_for(rt_spec, c),
            rt_period=args.rt_period,
            objects=tuple(args.object),
            kernel=kernel_choice(args),
            ipi_shorthand=args.ipi == "shorthand",
            preempt_off_cpu=args.preempt_off_cpu,
            preempt_off_len=args.irqoff_len,
            client=client,
            step=step if len(measurable) > 1 else None,
        )
        for p in protocols
        for step in steps
        for c in args.cpus
        for n in args.sites
        for s in range(args.seed_start, args.seed_start + args.seeds)
    ]
    # what a run would refuse (too few sites in the kernel), refused before anything is printed
    checked: set[tuple] = set()
    for cfg in configs:
        key = (cfg.client, cfg.kernel, cfg.objects, cfg.sites)
        if key not in checked:
            checked.add(key)
            check(cfg)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot write the plots in {args.out}: {err.strerror or err}") from None
    with_steps = len(measurable) > 1
    t0 = time.perf_counter()
    done: list[tuple[int, object]] = []
    with Progress(
        TextColumn("[bold]latency[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=out,
        disable=args.quiet,
    ) as bar:
        task = bar.add_task("", total=len(configs))
        try:
            with executor(args.jobs, args.scheduler) as ex:
                for (i, _), row in stream(ex, measure, enumerate(configs), args=lambda item: (item[1],)):
                    done.append((i, row))
                    bar.update(task, advance=1)
        except KeyboardInterrupt:
            done.sort(key=lambda x: x[0])
            if args.json:
                partial = {
                    "complete": False,
                    "runs_requested": len(configs),
                    "costs": asdict(costs),
                    "rows": [{k: v for k, v in r.as_dict().items() if k != "phases"} for _, r in done],  # type: ignore[attr-defined]
                }
                write_output(args.json, json.dumps(partial, indent=2) + "\n")
            _stderr_line(
                f"textpoke: interrupted: {len(done)} of {len(configs)} runs done"
                + (f"; wrote {args.json} (marked incomplete)" if args.json else "")
            )
            return 130
    done.sort(key=lambda x: x[0])
    rows = [r.as_dict() for _, r in done]  # type: ignore[attr-defined]
    # mean over seeds per configuration
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["protocol"], r["step"], r["cpus"], r["sites"]), []).append(r)
    summary = []
    for (p, step, c, n), rs in groups.items():
        row = {"protocol": p, "step": step, "cpus": c, "sites": n, "seeds": len(rs)}
        for m in (*LATENCY_METRICS, "syncs", "ipi_sends", "grace_wait", "requests"):
            row[m] = sum(float(r[m]) for r in rs) / len(rs)
        waits = [w for r in rs for w in r["sync_waits"]]
        row["mean_sync_cycles"] = sum(waits) / len(waits) if waits else 0.0
        for stage in ("prepare", "disable-irq", "run", "exit"):
            vals = [r["stage_cycles"][stage] for r in rs if stage in r["stage_cycles"]]
            if vals:
                row[f"stage_{stage}"] = sum(vals) / len(vals)
        waits = [r["waited_longest_for"] for r in rs if r["waited_longest_for"] is not None]
        row["waited_for"] = f"cpu{max(set(waits), key=waits.count)}" if waits else "-"
        row.update(rt_summary(rs))
        summary.append(row)
    cols = [
        "protocol",
        *(["step"] if with_steps else []),
        "cpus",
        "sites",
        *(["requests"] if with_steps else []),
        "syncs",
        "mean_sync_cycles",
        "ipi_sends",
        *LATENCY_METRICS,
        *(["grace_wait"] if with_steps else []),
        *(RT_METRICS if not probes else RT_METRICS[:1]),
        "waited_for",
    ]
    heads = [col.replace("_cycles", "").replace("_", " ") for col in cols]
    right = heads[2:] if with_steps else heads[1:]
    title = (
        f"one patch operation, mean of {args.seeds} seed(s) (max interruption: worst; RT lateness: "
        "percentiles of all wake-ups); cycles"
    )
    table_rows = [[r[c] for c in cols] for r in summary]
    print_table(out, args.format, title, heads, table_rows, right=right)
    for r in summary:
        stages = [(k[6:], r[k]) for k in r if k.startswith("stage_")]
        if stages:
            what = f"{r['protocol']} {r['step']}" if with_steps else r["protocol"]
            out.print(
                f"  {what}, {r['cpus']} CPUs, {r['sites']} sites: multi_cpu_stop stages "
                + ", ".join(f"{name} {v:,.0f}" for name, v in stages)
                + " cycles"
            )
    stop = {(r["step"], r["cpus"], r["sites"]): r for r in summary if r["protocol"] == "stop-machine"}
    bp = {(r["step"], r["cpus"], r["sites"]): r for r in summary if r["protocol"] == "bp-batch"}
    for key in sorted(set(stop) & set(bp)):
        ratio = stop[key]["total_lost_cycles"] / max(bp[key]["total_lost_cycles"], 1)
        worst = stop[key]["max_interruption_cycles"] / max(bp[key]["max_interruption_cycles"], 1)
        what = f" {key[0]}," if with_steps else ""
        out.print(
            f"  stop_machine / text_poke_bp (batched),{what} {key[1]} CPUs, {key[2]} sites: total cycles lost "
            f"{ratio:.2f}, worst interruption {worst:.1f}"
        )
    # a line per protocol and step in the plots
    plotted = [{**r, "protocol": f"{r['protocol']} {r['step']}"} for r in rows] if len(steps) > 1 else rows
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        plot = plot_latency(plotted, LATENCY_METRICS, args.out / "latency.png", "one patch operation against CPU count")
        rt_plot = plot_rt(plotted, args.out / "rt.png")
    except OSError as err:
        raise ConfigError(f"cannot write the plots in {args.out}: {err.strerror or err}") from None
    out.print(f"plots: {plot}, {rt_plot}", markup=False)
    md = markdown_table(summary, cols)
    if args.markdown:
        write_output(args.markdown, md + "\n")
        out.print(f"wrote {args.markdown}", markup=False)
    if args.json:
        data = {
            "client": args.client,
            "costs": asdict(costs),
            "rows": [{k: v for k, v in r.items() if k != "phases"} for r in rows],
            "summary": summary,
            "complete": True,
        }
        write_output(args.json, json.dumps(data, indent=2) + "\n")
        out.print(f"wrote {args.json}", markup=False)
    out.print(f"{len(configs)} runs in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_explore(args: argparse.Namespace, out: Console) -> int:
    """Every interleaving of a small configuration: a protocol, or an NMI entry."""
    from .explore import explore, explore_nmi

    if args.object:
        raise ConfigError(
            "--object does not apply to explore: it walks an abstract model of each client's sites, not a "
            "kernel's code (run safety or run with --object)"
        )
    if args.nmi:
        for option in ("protocol", "mutation", "cpus", "sites", "client", "operation", "int3"):
            if getattr(args, option) is not None:
                raise ConfigError(f"--{option} is for protocols; --nmi explores an NMI entry on one CPU")
        result = explore_nmi(args.nmi, nmis=args.nmis or 3, fred=args.fred, max_states=args.max_states)
    else:
        if args.fred:
            raise ConfigError("--fred needs --nmi ENTRY")
        if args.nmis is not None and not args.protocol_nmis:
            raise ConfigError("--nmis needs --nmi ENTRY, or --protocol-nmis with a stop_machine protocol")
        cpus, sites = args.cpus or 2, args.sites or 1
        if not 1 <= cpus <= 3 or not 1 <= sites <= 2:
            raise ConfigError("the explorer takes 1 to 3 workload CPUs (--cpus) and 1 or 2 sites (--sites)")
        nmis = (args.nmis or 3) if args.protocol_nmis else 0
        result = explore(
            args.protocol,
            args.mutation,
            cpus,
            sites,
            max_states=args.max_states,
            xmc_rule=args.xmc_rule,
            nmis=nmis,
            count_at_delivery=args.nmi_counted_at_delivery,
            client=args.client or "ftrace",
            operation=args.operation,
            int3=args.int3 or "emulate",
        )
    out.print(result.report(), markup=False, highlight=False)
    if args.strict and result.safe and not result.complete:
        _stderr_line(
            f"textpoke: the search stopped at --max-states {args.max_states} before it was complete: nothing is proven"
        )
        return 1
    return 1 if args.strict and not result.safe else 0


def cmd_callgraph(args: argparse.Namespace, out: Console) -> int:
    """Which traced sites the NMI entries and the #BP handler can reach (direct calls and jumps)."""
    from .callgraph import build_callgraph, reachable_sites
    from .image import BP_ENTRIES, NMI_CHOICES, NMI_ENTRIES

    kernel = build_kernel(_kernel_config(args))
    g = build_callgraph(kernel)
    rows = []
    for name in NMI_CHOICES:
        sym = NMI_ENTRIES[name][0]
        sites = reachable_sites(g, sym)
        rows.append((f"NMI {name} ({sym})", ", ".join(f"{n} {a:#x}" for n, a in sites.items()) or "none"))
    for mode, sym in BP_ENTRIES.items():
        if sym not in kernel.symbols:
            continue  # a mutation only kernels with compiled code have
        sites = reachable_sites(g, sym)
        rows.append((f"#BP {mode} ({sym})", ", ".join(sites) or "none"))
    workload_only = sorted(set(kernel.sites) - set(reachable_sites(g, "nmi_handler")))
    title = f"traced sites reachable from each entry ({len(kernel.sites)} traced functions)"
    print_table(out, args.format, title, ("entry", "reachable traced sites"), rows)
    if kernel.user_code:
        _print_object_functions(out, kernel, g)
    how = "textpoke_workload and what it calls" if kernel.user_code else "computed calls"
    out.print(f"called only by the workloads ({how}): {len(workload_only)} sites")
    if args.dot:
        _write_dot(g, args.dot)
        out.print(f"wrote {args.dot}", markup=False)
    return 0


def _print_object_functions(out: Console, kernel, g) -> None:
    """The functions loaded from the user's objects: where they are, their sites, who calls them
    (always a table, on the console that carries the prose)."""
    rows = []
    for name in sorted(kernel.foreign, key=lambda n: kernel.symbols[n]):
        site = kernel.sites.get(name)
        callers = sorted(a for a, _b in g.in_edges(name)) if name in g else []
        rows.append(
            (
                name,
                f"{kernel.symbols[name]:#x}",
                kernel.sizes[name],
                f"{site:#x}" if site is not None else "none (notrace)",
                ", ".join(callers) or "-",
            )
        )
    cols = ("function", "address", "size", "ftrace site", "called by")
    print_table(out, "table", f"functions of {', '.join(kernel.config.objects)}", cols, rows, right=("address", "size"))


def cmd_cc(args: argparse.Namespace, out: Console) -> int:
    """Compile C sources with the kernel's flags into objects `--object` accepts."""
    from .cc import compile_objects, find_compiler, include_dir, kernel_compiler

    cc = find_compiler(args.compiler)
    if args.kernel:
        if args.sources:
            raise ConfigError("--kernel rebuilds the C kernel only; give no sources with it")
        args.sources, args.out = [include_dir() / "kernel.c"], include_dir()
        cc = kernel_compiler(args.compiler)
    elif not args.sources:
        raise ConfigError("give C sources to compile, or --kernel to rebuild the C kernel")
    record = compile_objects(args.sources, args.out, cc)
    out.print(f"{cc.name}, {cc.version}: {' '.join(cc.flags)}", markup=False, highlight=False)
    for name, digest in record["objects"].items():
        out.print(f"  {args.out / name}  sha256 {digest[:16]}")
    out.print(f"wrote {args.out / 'BUILD.json'}")
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
    write_output(path, "\n".join(lines) + "\n")


def _format_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table (for people; never wrapped when stdout is not a terminal), or json or csv rows on stdout "
        "with the other lines on stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="textpoke",
        description="Live kernel text patching on emulated multi-CPU x86_64.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def machine_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--cpus", type=bounded(1, MAX_CPUS), default=4, help=f"number of CPUs (1 to {MAX_CPUS}; default 4)"
        )
        sp.add_argument("--seed", type=_seed, default=0, help="scheduling seed (default 0)")
        sp.add_argument(
            "--cycles", type=_cycles, default=2_000_000, help=f"cycles to simulate (at most {MAX_RUN_CYCLES:,})"
        )
        sp.add_argument(
            "--quantum", type=_quantum, default=DEFAULT_QUANTUM, help="mean scheduling quantum (instructions)"
        )
        sp.add_argument("--functions", type=_functions, default=32, help="traced functions in the kernel (2 to 256)")
        sp.add_argument(
            "--nmi-period",
            type=bounded(0, MAX_RUN_CYCLES),
            default=20_000,
            help="cycles between NMIs per CPU (0: none)",
        )
        _format_arg(sp)

    from .clients import client_names

    run = sub.add_parser("run", help="the default scenario: every protocol and NMI entry, judged and timed")
    run.add_argument("--seed", type=_seed, default=0, help="scenario seed (default 0)")
    run.add_argument("--out", type=output_dir("--out"), default="textpoke-out", help="where to write the timeline")
    run.add_argument("--jobs", type=_jobs, default=None, help="worker processes (default: all cores)")
    run.add_argument("--json", type=output_file("--json"), default=None, help="also write the rows as JSON here")
    _format_arg(run)
    _object_arg(run)
    run.add_argument(
        "--client",
        choices=client_names(),
        default="ftrace",
        help="what every row patches: " + ", ".join(client_names()) + " (default ftrace)",
    )
    run.add_argument(
        "--protocol",
        action="append",
        default=[],
        metavar="P",
        help="also run this protocol (built in, entry point or module:function) with nested-safe NMIs (repeatable)",
    )
    run.add_argument(
        "--perfetto",
        type=output_dir("--perfetto"),
        default=None,
        help="write one Perfetto trace per row in this directory",
    )
    run.set_defaults(func=cmd_run)
    mach = sub.add_parser("machine", help="boot the machine and run its workloads, no patching")
    machine_args(mach)
    _object_arg(mach)
    mach.set_defaults(func=cmd_machine)

    saf = sub.add_parser("safety", help="sweep seeds for a protocol and count the oracle's violations")
    scenario_args(saf)
    saf.add_argument("--seeds", type=_seeds, default=100, help="how many seeds (default 100)")
    saf.add_argument("--seed-start", type=_seed, default=0, help="first seed (default 0)")
    saf.add_argument("--jobs", type=_jobs, default=None, help="worker processes (default: all cores)")
    saf.add_argument("--scheduler", default=None, help="run on this dask.distributed scheduler (tcp://HOST:PORT)")
    saf.add_argument("--json", type=output_file("--json"), default=None, help="write the results as JSON here")
    saf.add_argument("--strict", action="store_true", help="exit 1 when any seed has a violation")
    saf.add_argument("--quiet", action="store_true", help="no progress bar")
    _format_arg(saf)
    saf.set_defaults(func=cmd_safety)

    from .image import BP_ENTRIES
    from .oracle import XMC_RULES
    from .protocols import PROTOCOLS

    pat = sub.add_parser("patch", help="patch sites of a running machine and report the verdict")
    pat.add_argument("--site", action="append", required=True, help="address or symbol (repeatable)")
    pat.add_argument("--new", action="append", type=_hex_bytes, required=True, help="new bytes, hex (one per --site)")
    pat.add_argument(
        "--old", action="append", type=_hex_bytes, default=None, help="expected old bytes, hex (one per --site)"
    )
    pat.add_argument("--protocol", type=_protocol_name, default="bp", metavar="P", help=_protocol_help(PROTOCOLS, "bp"))
    pat.add_argument("--int3", choices=list(BP_ENTRIES), default="emulate", help="#BP handler mode")
    pat.add_argument("--cpus", type=bounded(2, MAX_CPUS), default=4, help="CPUs, the patcher included (default 4)")
    pat.add_argument("--seed", type=_seed, default=0, help="scheduling seed (default 0)")
    pat.add_argument("--functions", type=_functions, default=32, help="traced functions in the kernel (2 to 256)")
    pat.add_argument(
        "--warmup",
        type=_warmup,
        default=5_000,
        help="cycles the workloads run before the patch, and again after it (default 5000)",
    )
    pat.add_argument(
        "--xmc-rule",
        choices=list(XMC_RULES),
        default="linux",
        help="cross-modifying-code rule (linux, sdm, or the looser coherent)",
    )
    pat.add_argument("--strict", action="store_true", help="exit 1 when the oracle found a violation")
    _object_arg(pat)
    pat.set_defaults(func=cmd_patch)

    lat = sub.add_parser("latency", help="stop_machine against text_poke_bp as CPUs and batches grow")
    lat.add_argument(
        "--client",
        choices=client_names(),
        default="ftrace",
        help="what is patched: " + ", ".join(client_names()) + " (default ftrace); its first --sites sites are enabled "
        "(static-call: the first --sites static calls, each its trampoline and call sites; kprobe, optprobe: "
        "--sites probes)",
    )
    lat.add_argument(
        "--protocols",
        nargs="+",
        type=_latency_protocol,
        default=None,
        help="protocols to compare (default bp bp-batch stop-machine; kprobe for --client kprobe, optprobe for "
        "--client optprobe; ftrace-linux: ftrace_modify_all_code's enable)",
    )
    lat.add_argument(
        "--steps",
        nargs="+",
        default=None,
        metavar="STEP",
        help="the steps measured, a row each: static-call retarget (default), null, restore; kprobe and optprobe "
        "register, unregister (default both). The steps before one measured are performed first, unmeasured",
    )
    lat.add_argument(
        "--cpus", type=bounded(2, MAX_CPUS), nargs="+", default=[2, 4, 8, 16, 32, 64], help="CPU counts (2 to 128)"
    )
    lat.add_argument(
        "--sites", type=bounded(1, MAX_TRACED), nargs="+", default=[1, 8], help="sites per operation (1 to 256)"
    )
    lat.add_argument("--seeds", type=bounded(1, 100_000), default=3, help="seeds per configuration (default 3)")
    lat.add_argument("--seed-start", type=_seed, default=0, help="first seed (default 0)")
    lat.add_argument("--busy", action="store_true", help="every workload CPU runs interrupts-off sections")
    lat.add_argument(
        "--irqoff-cpu", type=bounded(0, MAX_CPUS - 1), default=0, help="this CPU runs long interrupts-off sections"
    )
    lat.add_argument(
        "--irqoff-len",
        type=bounded(1, MAX_IRQOFF_SPINS),
        default=20_000,
        help=f"spins per interrupts-off (or preempt-off) section (at most {MAX_IRQOFF_SPINS:,})",
    )
    lat.add_argument(
        "--rt-cpus",
        type=int,
        nargs="*",
        default=None,
        help="CPUs running the periodic RT task; negative counts from the last CPU (default: 1 -1; none: no task; "
        "the probe clients' preemptible kernel has the scheduler tick and no RT task)",
    )
    lat.add_argument("--rt-period", type=_positive, default=10_000, help="the RT task's timer period in cycles")
    lat.add_argument(
        "--preempt-off-cpu",
        type=bounded(0, MAX_CPUS - 1),
        default=0,
        help="this CPU runs long preempt-off sections (interrupts on): its stopper waits for preempt_enable",
    )
    lat.add_argument(
        "--ipi",
        choices=["shorthand", "per-target"],
        default="shorthand",
        help="sync IPIs: one all-but-self shorthand (Linux, every CPU online) or one per target",
    )
    lat.add_argument("--cost", action="append", default=[], help="override a cost: NAME=CYCLES (repeatable)")
    lat.add_argument("--config", type=Path, default=None, help="TOML file with a [costs] table")
    lat.add_argument("--jobs", type=_jobs, default=None, help="worker processes (default: all cores)")
    lat.add_argument("--scheduler", default=None, help="run on this dask.distributed scheduler (tcp://HOST:PORT)")
    lat.add_argument("--out", type=output_dir("--out"), default="textpoke-out", help="where to write the plots")
    lat.add_argument("--json", type=output_file("--json"), default=None, help="write every run and the means as JSON")
    lat.add_argument("--markdown", type=output_file("--markdown"), default=None, help="write the table as Markdown")
    lat.add_argument("--quiet", action="store_true", help="no progress bar")
    _format_arg(lat)
    _object_arg(lat)
    lat.set_defaults(func=cmd_latency)

    from .explore import EXPLORE_OPERATIONS, NESTED_FLAGS
    from .image import BP_ENTRIES
    from .protocols import MUTATIONS, PROTOCOLS

    ex = sub.add_parser("explore", help="every interleaving of a small configuration, and shortest counterexamples")
    ex.add_argument(
        "--client",
        choices=list(EXPLORE_OPERATIONS),
        default=None,
        help="what the operations patch (default ftrace; each client's abstract sites are in the README)",
    )
    ex.add_argument(
        "--operation",
        default=None,
        metavar="OP",
        help="the client's operation: "
        + "; ".join(f"{c}: {', '.join(ops)}" for c, ops in EXPLORE_OPERATIONS.items())
        + " (the first is the default)",
    )
    ex.add_argument(
        "--protocol",
        type=_protocol_name,
        default=None,
        metavar="P",
        help=_protocol_help(PROTOCOLS, "bp; kprobe and optprobe for their clients"),
    )
    ex.add_argument(
        "--int3",
        choices=list(BP_ENTRIES),
        default=None,
        help="#BP handler: emulate (default), emulate-no-jmp8, emulate-noret (skip, emulate-nogap: not modelled)",
    )
    ex.add_argument(
        "--mutation",
        type=_mutation_name,
        default=None,
        metavar="M",
        help="break the protocol this way: " + _names(MUTATIONS),
    )
    ex.add_argument("--cpus", type=bounded(1, 3), default=None, help="workload CPUs (1 to 3; default 2)")
    ex.add_argument("--sites", type=bounded(1, 2), default=None, help="sites (1 or 2; default 1)")
    ex.add_argument(
        "--max-states",
        type=bounded(1, MAX_EXPLORE_STATES),
        default=200_000,
        help="stop after this many states (default 200000)",
    )
    ex.add_argument(
        "--xmc-rule", choices=["linux", "sdm"], default="linux", help="cross-modifying-code rule (linux or sdm)"
    )
    ex.add_argument(
        "--nmi",
        choices=["naive", *NESTED_FLAGS, "latch-cmpxchg", "latch-cmpxchg386", "latch-dec"],
        default=None,
        help="explore this NMI entry instead of a protocol",
    )
    ex.add_argument(
        "--nmis",
        type=bounded(1, 6),
        default=None,
        help="NMIs that may arrive (with --nmi or --protocol-nmis; default 3)",
    )
    ex.add_argument(
        "--protocol-nmis",
        action="store_true",
        help="with a stop_machine protocol: up to --nmis NMIs on each workload CPU, whose handler executes the sites",
    )
    ex.add_argument(
        "--nmi-counted-at-delivery",
        action="store_true",
        help="what-if: an NMI counts itself into nmi_running as it is delivered (no entry window)",
    )
    ex.add_argument("--fred", action="store_true", help="FRED-style NMI unblocking (with --nmi)")
    ex.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when an unsafe state is reachable, or when the search stopped before it was complete",
    )
    # accepted only to be refused with a reason: the explorer's sites are abstract
    ex.add_argument("--object", action="append", default=None, help=argparse.SUPPRESS)
    ex.set_defaults(func=cmd_explore)

    cg = sub.add_parser("callgraph", help="traced sites reachable from the NMI entries and the #BP handler")
    cg.add_argument("--functions", type=_functions, default=32, help="traced functions in the kernel (2 to 256)")
    cg.add_argument("--dot", type=output_file("--dot"), default=None, help="write the call graph in Graphviz dot form")
    _format_arg(cg)
    _object_arg(cg)
    cg.set_defaults(func=cmd_callgraph)

    cc = sub.add_parser("cc", help="compile C sources with the kernel's flags into objects for --object")
    cc.add_argument("sources", type=Path, nargs="*", help="C source files")
    cc.add_argument("--kernel", action="store_true", help="rebuild the C kernel (textpoke/c/kernel.o)")
    cc.add_argument("-o", "--out", type=Path, default=Path("."), help="directory for the objects and BUILD.json")
    cc.add_argument("--compiler", choices=["gcc", "clang", "zig"], default=None, help="default: gcc, clang, zig")
    cc.set_defaults(func=cmd_cc)

    rep = sub.add_parser("replay", help="rerun one seed and print its annotated trace")
    rep.add_argument("seed", type=_seed, help="the seed to rerun")
    scenario_args(rep)
    rep.add_argument("--all", action="store_true", help="also list every scheduling quantum")
    rep.add_argument("--limit", type=bounded(0, 10**12), default=400, help="print at most this many lines (0: all)")
    rep.add_argument(
        "--jsonl", type=output_file("--jsonl"), default=None, help="write the full trace as JSON Lines here"
    )
    rep.add_argument("--out", type=output_file("--out"), default=None, help="write the full annotated listing here")
    rep.add_argument(
        "--timeline",
        type=output_image("--timeline"),
        default=None,
        help="draw the per-CPU timeline of each operation here (.png, .pdf or .svg)",
    )
    rep.add_argument(
        "--perfetto",
        type=output_file("--perfetto"),
        default=None,
        help="write a Perfetto trace (JSON, ui.perfetto.dev) here",
    )
    rep.set_defaults(func=cmd_replay)
    return p


def _on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C: a KeyboardInterrupt, raised once the emulator is out of its callbacks."""
    from cpus._unicorn import defer_interrupt

    if not defer_interrupt():
        raise KeyboardInterrupt


#: clients whose `run` and `latency` rows need the built-in kernel's sites (they refuse --object)
_CLIENTS_WITHOUT_OBJECTS = ("static-call", "kprobe", "optprobe")


def _load_objects_first(args: argparse.Namespace) -> None:
    """Link the --object files before the command prints anything: a bad object is refused with its
    one-line error, not after a header or a progress bar (the image is cached for the command)."""
    if args.command == "explore":
        return  # it refuses --object itself: an abstract model, no text to link
    if args.command in ("run", "latency") and getattr(args, "client", "ftrace") in _CLIENTS_WITHOUT_OBJECTS:
        return  # the command refuses --object for these clients, with the reason
    if getattr(args, "object", None) and getattr(args, "kernel", None) in (None, "asm"):
        kernel = build_kernel(KernelConfig(objects=tuple(args.object)))
        if not kernel.sites and args.command != "callgraph":  # the call graph shows what there is
            raise ConfigError("the objects have no ftrace sites: compile them with -pg -mfentry")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    err_console = Console(stderr=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        _load_objects_first(args)
        return args.func(args, _console_for(args))
    except (ConfigError, TextpokeError) as err:
        err_console.print(f"[red]textpoke: error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    except OSError as err:  # an output that became unwritable after the checks (disk full, ...)
        where = f" {err.filename}" if err.filename else ""
        err_console.print(f"textpoke: error:{where}: {err.strerror or err}", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("textpoke: interrupted", markup=False, highlight=False, soft_wrap=True)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
