"""Simulator throughput: simulated instructions per second against raw Unicorn on the same code.

For each CPU count, a machine whose every CPU runs the workload (with NMIs off, no patching) runs
for a fixed number of cycles per CPU; its speed is total retired instructions over wall time. The
baseline, measured in the same run, is one bare Unicorn instance (no hooks, no count slicing)
executing the same workload code from the same state until the workload's own `hlt` after a fixed
number of iterations, timed warm like the machine (after one run over the same code); its
instruction count comes from an identical calibration run that counts every translated block's
instructions.

    python benchmarks/throughput.py [--cpus 1 4 16 64] [--quantum Q] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import raw_unicorn_ips  # one bare instance, timed warm

from cpus import Machine, MachineConfig
from cpus.config import DEFAULT_QUANTUM
from textpoke.image import build_kernel


def sim_ips(cpus: int, quantum: int, cycles: int) -> float:
    boot = build_kernel().boot_image()
    boot = dataclasses.replace(boot, idle_entry=boot.worker_entry)  # every CPU runs the workload
    m = Machine(MachineConfig(cpus=cpus, seed=1, quantum=quantum), boot)
    m.run(cycles // 20)  # warm the translation caches
    before = sum(c.stats["instructions"] for c in m.cpus)
    t0 = time.process_time()  # CPU time, like the raw baseline: other load does not count
    m.run(cycles)
    dt = time.process_time() - t0
    return (sum(c.stats["instructions"] for c in m.cpus) - before) / dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--quantum", type=int, default=DEFAULT_QUANTUM)
    p.add_argument("--instructions", type=int, default=8_000_000, help="simulated per CPU count")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    raw, n = raw_unicorn_ips(loops=40_000)
    print(f"raw Unicorn, one instance, no hooks, no slicing: {raw / 1e6:.1f} M instr/s ({n} instructions)")
    results = []
    print(f"{'cpus':>5} {'quantum':>8} {'sim M/s':>9} {'raw M/s':>9} {'ratio':>7}")
    for cpus in args.cpus:
        ips = sim_ips(cpus, args.quantum, max(args.instructions // cpus, 20_000))
        row = {"cpus": cpus, "quantum": args.quantum, "sim_ips": ips, "raw_ips": raw, "ratio": ips / raw}
        results.append(row)
        print(f"{cpus:>5} {args.quantum:>8} {ips / 1e6:>9.1f} {raw / 1e6:>9.1f} {ips / raw:>7.1%}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {rss:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "peak_rss_mib": rss}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
