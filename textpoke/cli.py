"""The `textpoke` command line: thin argparse front-end over the library.

Every command exits 0 on success, 1 when a run found a safety violation or a crash, and 2 on bad
input (with a message naming the problem).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from cpus import ConfigError, Machine, MachineConfig, NmiSource, TextpokeError
from cpus.config import DEFAULT_QUANTUM

from .image import KernelConfig, Percpu, build_kernel

__all__ = ["main"]


def _positive(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} must be >= 0")
    return v


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
        sp.add_argument(
            "--nmi-period", type=_nonneg, default=20_000, help="cycles between NMIs per CPU (0: none)"
        )

    run = sub.add_parser("run", help="run the default scenario")
    machine_args(run)
    run.set_defaults(func=cmd_machine)
    mach = sub.add_parser("machine", help="boot the machine and run its workloads, no patching")
    machine_args(mach)
    mach.set_defaults(func=cmd_machine)
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
