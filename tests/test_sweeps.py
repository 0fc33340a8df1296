"""Sweeps give the same results on any executor; the main commands run end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from textpoke.scenario import Scenario, replay_command
from textpoke.sweep import sweep, wilson

SC = Scenario(protocol="naive-atomic", sites=4, warmup=1000, settle=1000)


def fingerprint(result):
    return [(r.seed, r.trace_hash, tuple(sorted(r.counts.items()))) for r in result.results]


def test_results_do_not_depend_on_the_executor():
    here = sweep(SC, range(4), jobs=1)
    with ProcessPoolExecutor(max_workers=2) as ex:
        pooled = sweep(SC, range(4), executor=ex)
    assert fingerprint(here) == fingerprint(pooled)


def test_nmi_sweep_does_not_depend_on_the_pool_size():
    """NMI sources draw their arrivals from the seed, not from the process that runs it."""
    nmis = Scenario(sites=2, cpus=2, nmi="nested-safe", nmi_rate=500, warmup=1000, settle=1000)
    here = sweep(nmis, range(3), jobs=1)
    assert all(r.nmi_delivered for r in here.results)  # the runs do take NMIs
    assert len({r.trace_hash for r in here.results}) == 3
    with ProcessPoolExecutor(max_workers=2) as ex:
        pooled = sweep(nmis, range(3), executor=ex)
    assert fingerprint(here) == fingerprint(pooled)
    assert [r.nmi_delivered for r in here.results] == [r.nmi_delivered for r in pooled.results]


def test_dask_cluster_gives_the_same_results():
    distributed = pytest.importorskip("dask.distributed")
    here = sweep(SC, range(3), jobs=1)
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        remote = sweep(SC, range(3), executor=client.get_executor())
    assert fingerprint(here) == fingerprint(remote)


def test_wilson_interval():
    lo, hi = wilson(0, 500)
    assert lo == 0 and 0 < hi < 0.01
    lo, hi = wilson(250, 500)
    assert lo < 0.5 < hi and hi - lo < 0.1


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "textpoke.cli", *argv], capture_output=True, text=True)


def test_run_prints_the_table_and_writes_the_timeline(tmp_path):
    r = cli("run", "--out", str(tmp_path), "--jobs", "2", "--json", str(tmp_path / "run.json"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "run.json").read_text())
    by = {row["label"]: row for row in rows}
    assert not by["text_poke_bp, batched (nested-safe NMIs)"]["violations"]
    assert by["text_poke_bp, naive NMI entry"]["violations"]
    assert by["text_poke_bp, one site at a time"]["syncs"] == [96, 96]


def test_latency_command_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "lat.json"
    r = cli(
        "latency",
        "--cpus",
        "2",
        "4",
        "--sites",
        "2",
        "--seeds",
        "1",
        "--jobs",
        "1",
        "--quiet",
        "--out",
        str(tmp_path),
        "--json",
        str(out),
        "--markdown",
        str(tmp_path / "lat.md"),
        "--cost",
        "text_write=2000",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["costs"]["text_write"] == 2000
    for row in d["rows"]:
        for key in (
            "protocol",
            "cpus",
            "sites",
            "patch_latency_cycles",
            "mean_stall_cycles",
            "max_stall_cycles",
            "total_lost_cycles",
            "syncs",
            "ipis",
            "int3_hits",
        ):
            assert key in row
    assert {r["syncs"] for r in d["rows"] if r["protocol"] == "bp"} == {6}
    assert (tmp_path / "latency.png").exists() and "| protocol |" in (tmp_path / "lat.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["latency", "--cost", "warp=3"], "unknown cost"),
        (["latency", "--cost", "text_write"], "NAME=CYCLES"),
        (["latency", "--protocols", "teleport"], "unknown protocol"),
        (["latency", "--cpus", "1"], "between 2 and 128"),
    ],
)
def test_latency_refuses_bad_input(argv, message):
    r = cli(*argv)
    assert r.returncode == 2 and message in " ".join(r.stderr.split())


def test_the_command_line_does_not_need_pytest():
    """`pip install .` has no pytest: a sweep with failing seeds must still print its replay line."""
    code = (
        "import sys; sys.modules['pytest'] = None\n"
        "from textpoke.cli import main\n"
        "sys.exit(main(['safety', '--protocol', 'naive-atomic', '--sites', '4', '--seeds', '2', '--jobs', '1',"
        " '--quiet']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "replay: textpoke replay 0 --protocol naive-atomic" in " ".join(r.stdout.split())


def test_stop_at_first_catches_the_same_seeds_by_the_same_first_violation():
    """The stopped run is a prefix of the full one: same caught seeds, same first violation; the
    stopped one counts that violation only and its trace ends there (another hash)."""
    sc = Scenario(protocol="bp", mutation="no-final-sync")
    full = sweep(sc, range(6), jobs=1)
    stopped = sweep(dataclasses.replace(sc, stop_at_first=True), range(6), jobs=1)
    assert 0 < len(full.failing) < 6  # the comparison needs caught and missed seeds
    assert stopped.failing == full.failing
    for f, s in zip(full.results, stopped.results, strict=True):
        if f.ok:
            assert f.trace_hash == s.trace_hash  # nothing stopped it: the very same run
            continue
        first_kind = next(iter(f.first))
        assert s.first == {first_kind: f.first[first_kind]}
        assert sum(s.counts.values()) == 1
        assert s.trace_hash != f.trace_hash
    assert "--stop-at-first" in replay_command(dataclasses.replace(sc, stop_at_first=True), 3)


def test_a_stopped_safety_row_resumes_from_its_seed_log(tmp_path):
    """benchmarks/safety.py logs every finished seed of a row; started again with --resume after a
    stop (here: the log cut in the middle of its last line) it runs only the missing seeds, and the
    row comes out as from one uninterrupted run. Each seed's result survives its JSON line."""
    import importlib.util
    from pathlib import Path

    from textpoke.sweep import SeedResult

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "safety.py"
    spec = importlib.util.spec_from_file_location("safety_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sc = Scenario(protocol="naive-bytes", warmup=1000, settle=1000)
    log = bench._seed_log(tmp_path / "rows.json", "unsafe: byte by byte")
    whole = bench._sweep_row(sc, 3, None, log, resume=False)
    head, *lines = log.read_text().splitlines()
    assert json.loads(head) == {"scenario": json.loads(json.dumps(sc.as_dict()))} and len(lines) == 3
    for line in lines:
        r = SeedResult.from_json(json.loads(line))
        assert SeedResult.from_json(json.loads(json.dumps(r.to_json()))) == r
    log.write_text(head + "\n" + lines[0] + "\n" + lines[1][:30])  # the second seed's line cut short
    ran = []
    real = bench.sweep
    bench.sweep = lambda sc, seeds, **kw: (ran.extend(seeds), real(sc, seeds, **kw))[1]
    try:
        again = bench._sweep_row(sc, 3, None, log, resume=True)
    finally:
        bench.sweep = real
    assert ran == [1, 2] and again == whole
    logged = [json.loads(x) for x in log.read_text().splitlines()[1:] if x.endswith("}")]
    assert sorted(x["seed"] for x in logged) == [0, 1, 2]
    with pytest.raises(SystemExit, match="not written for this row"):
        bench._sweep_row(Scenario(protocol="naive-atomic"), 3, None, log, resume=True)
