"""Sweep speed: what a user waits for, fine scheduler against exact, and both against raw Unicorn.

In one run, on one core unless said otherwise:

* seeds/s of the default safety scenario (`textpoke safety`: batched text_poke_bp, 4 CPUs, 8 sites,
  enable and disable) with the fine scheduler and with the exact one, in the same process, the two
  sweeps interleaved seed by seed so that both see the same load, each after one warm-up seed;
* the simulated instructions/s of those sweeps as a ratio to raw Unicorn: one bare instance (no
  hooks, no count slicing) running the same workload code warm (its second run over the same code:
  both sides are timed with their translation caches filled);
* the same ratio for coarse execution with no patching (every CPU runs the workload), per CPU count;
* seeds/s of the exact sweep on all cores (a process pool, wall time), and resident memory.

One-core figures are per CPU-second of this process (`time.process_time`), so that other load on a
shared machine does not count; wall-clock rates are in the JSON too.

    python benchmarks/sweep.py [--seeds 20] [--fine-seeds 5] [--rounds 1] [--cpus 1 4 16] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpus import Machine, MachineConfig
from cpus import layout as L
from cpus._unicorn import Engine
from cpus.config import DEFAULT_QUANTUM
from cpus.disasm import disasm
from textpoke.image import Percpu, build_kernel
from textpoke.scenario import Scenario, run_scenario
from textpoke.sweep import sweep


def raw_unicorn_ips(loops: int, repeats: int = 3) -> tuple[float, int]:
    """(instructions/s, instructions) of one bare instance running `loops` workload iterations,
    timed warm: the instance runs the same code once before the timed runs."""
    kernel = build_kernel()
    boot = kernel.boot_image()
    m = Machine(MachineConfig(cpus=1), boot)
    regs = boot.boot_regs(0, 0)

    def reset(e: Engine) -> None:
        m.write(m.layout.percpu_va(0) + Percpu.LOOPS, struct.pack("<Q", 0))
        m.write(m.layout.percpu_va(0) + Percpu.LOOP_LIMIT, struct.pack("<Q", loops))
        e.set_rsp(m.layout.kstack_top(0))
        e.set_rflags(0x202)
        for name, value in regs.items():
            e.set_reg(name, value)

    def engine() -> Engine:
        return Engine(m._mems, L.PT_PA, L.GDT_VA, m.layout.percpu_va(0), L.KERNEL_CS, L.KERNEL_DS)

    counter = engine()  # counts every translated block's instructions, once
    total = [0]
    sizes: dict[tuple[int, int], int] = {}

    def on_block(addr: int, size: int) -> None:
        n = sizes.get((addr, size))
        if n is None:
            n = sizes[(addr, size)] = len(disasm(m.read(addr, size), addr))
        total[0] += n

    counter.hook_block_at(L.TEXT_VA, m.layout.text_size, on_block)
    reset(counter)
    counter.run(boot.worker_entry, L.UNTIL, 0)
    instructions = total[0]
    e = engine()
    reset(e)
    e.run(boot.worker_entry, L.UNTIL, 0)  # warm its translation cache
    best = 0.0
    for _ in range(repeats):
        reset(e)
        t0 = time.process_time()
        e.run(boot.worker_entry, L.UNTIL, 0)
        best = max(best, instructions / (time.process_time() - t0))
    return best, instructions


def coarse_ips(cpus: int, cycles: int, interleave: str) -> float:
    """Simulated instructions per CPU-second of a machine whose every CPU runs the workload (no
    patching), warm."""
    boot = build_kernel().boot_image()
    boot = dataclasses.replace(boot, idle_entry=boot.worker_entry)
    m = Machine(MachineConfig(cpus=cpus, seed=1, quantum=DEFAULT_QUANTUM, interleave=interleave), boot)
    m.run(cycles // 10)
    before = sum(c.stats["instructions"] for c in m.cpus)
    t0 = time.process_time()
    m.run(cycles)
    dt = time.process_time() - t0
    return (sum(c.stats["instructions"] for c in m.cpus) - before) / dt


def one_core_sweeps(sc: Scenario, fine_seeds: int, exact_seeds: int) -> tuple[dict, dict]:
    """seeds/s and simulated instructions/s of `sc` with the fine and the exact scheduler, in this
    process, after a warm-up seed each. The two sweeps are interleaved (seed k of the fine one, then
    its share of the exact one), so both see the same load on a shared machine."""
    modes = {"fine": dataclasses.replace(sc, interleave="fine"), "exact": dataclasses.replace(sc, interleave="exact")}
    acc = {m: {"seeds": 0, "seconds": 0.0, "cpu_seconds": 0.0, "instructions": 0} for m in modes}
    for msc in modes.values():
        run_scenario(msc, 10_000)

    def one(mode: str, seed: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_scenario(modes[mode], seed)
        a = acc[mode]
        a["cpu_seconds"] += time.process_time() - c0
        a["seconds"] += time.perf_counter() - t0
        a["seeds"] += 1
        a["instructions"] += sum(c["instructions"] for c in out.verdict.stats["cpu"])

    exact_next = 0
    for k in range(fine_seeds):
        one("fine", k)
        share = (k + 1) * exact_seeds // fine_seeds
        while exact_next < share:
            one("exact", exact_next)
            exact_next += 1
    while exact_next < exact_seeds:
        one("exact", exact_next)
        exact_next += 1
    out = []
    for a in acc.values():
        out.append(
            {
                "seeds": a["seeds"],
                "seconds": a["seconds"],
                "cpu_seconds": a["cpu_seconds"],
                # per core: CPU time of this process, so other load on a shared machine does not count
                "seeds_per_s": a["seeds"] / a["cpu_seconds"],
                "seeds_per_s_wall": a["seeds"] / a["seconds"],
                "sim_ips": a["instructions"] / a["cpu_seconds"],
                "instructions_per_seed": a["instructions"] / a["seeds"],
            }
        )
    return out[0], out[1]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=20, help="seeds of the exact sweep (default 20)")
    p.add_argument("--fine-seeds", type=int, default=5, help="seeds of the fine sweep (default 5)")
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--pool-seeds", type=int, default=0, help="seeds of the all-cores sweep (0: 2 x --seeds)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the interleaved one-core comparison this many times (the ratio varies by a few %%)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.rounds < 1 or args.seeds < 1 or args.fine_seeds < 1:
        p.error("--rounds, --seeds and --fine-seeds must be at least 1")

    raw, n = raw_unicorn_ips(loops=40_000)
    print(f"raw Unicorn, one instance, no hooks, no slicing, warm: {raw / 1e6:.1f} M instr/s ({n} instructions)")
    sc = Scenario()
    speedups = []
    for _ in range(args.rounds):
        fine, exact = one_core_sweeps(sc, args.fine_seeds, args.seeds)
        for name, r in (("fine", fine), ("exact", exact)):
            print(
                f"default safety sweep, {name:5}: {r['seeds_per_s']:6.2f} seeds/s on one core "
                f"({r['seeds']} seeds, {r['sim_ips'] / 1e6:.2f} M instr/s = {r['sim_ips'] / raw:.2%} of raw)"
            )
        speedups.append(exact["seeds_per_s"] / fine["seeds_per_s"])
        print(f"exact / fine: {speedups[-1]:.1f}x seeds/s per core; RSS {rss_mib():.0f} MiB")
    speedup = speedups[-1]
    if args.rounds > 1:
        print(
            f"exact / fine over {args.rounds} rounds: median {statistics.median(speedups):.1f}x "
            f"(min {min(speedups):.1f}, max {max(speedups):.1f})"
        )

    rows = []
    print(f"{'cpus':>5} {'coarse M/s':>11} {'ratio':>7}")
    for cpus in args.cpus:
        ips = coarse_ips(cpus, max(4_000_000 // cpus, 20_000), "exact")
        rows.append({"cpus": cpus, "quantum": DEFAULT_QUANTUM, "sim_ips": ips, "raw_ips": raw, "ratio": ips / raw})
        print(f"{cpus:>5} {ips / 1e6:>11.1f} {ips / raw:>7.1%}")

    jobs = os.cpu_count() or 1
    pool_seeds = args.pool_seeds or 2 * args.seeds
    t0 = time.perf_counter()
    sweep(dataclasses.replace(sc, interleave="exact"), range(pool_seeds), jobs=jobs)
    pool_rate = pool_seeds / (time.perf_counter() - t0)
    print(f"exact sweep on all {jobs} cores: {pool_rate:.2f} seeds/s ({pool_seeds} seeds, pool start-up included)")

    result = {
        "sweep_seeds_per_s": exact["seeds_per_s"],
        "sweep_seeds_per_s_fine": fine["seeds_per_s"],
        "sweep_speedup": speedup,
        "sweep_speedup_rounds": speedups,
        "sweep_ratio_to_raw": exact["sim_ips"] / raw,
        "sweep_ratio_to_raw_fine": fine["sim_ips"] / raw,
        "coarse_ratio_to_raw": rows[0]["ratio"] if rows else None,
        "sweep_seeds_per_s_all_cores": pool_rate,
        "cores": jobs,
        "raw_ips": raw,
        "fine": fine,
        "exact": exact,
        "rows": rows,
        "rss_mib": rss_mib(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
