"""Perfetto traces: read back and checked for the structure ui.perfetto.dev needs and shows.

Every slice must nest in the one around it on its track (Perfetto drops or misdraws slices that
overlap without nesting), each CPU has its track, handlers sit on their CPU, the patcher's steps sit
in its operation on CPU 0, and violations are instants carrying their class, site and bytes.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from textpoke.demo import perfetto_name, run_row
from textpoke.perfetto import write_trace
from textpoke.replay import replay
from textpoke.scenario import Scenario

DOCS = Path(__file__).resolve().parents[1] / "docs" / "perfetto"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def tracks(trace: dict) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"}


def nesting(trace: dict) -> Counter:
    """(track name, parent slice, child slice) -> count, asserting that every slice is contained in
    its parent (timestamps are whole nanoseconds, three decimals of a microsecond)."""
    names = tracks(trace)
    by_tid: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            assert e["tid"] in names, e
            start, dur = round(e["ts"] * 1000), round(e["dur"] * 1000)
            assert abs(start - e["ts"] * 1000) < 1e-6 and dur >= 0, e
            by_tid[e["tid"]].append((start, start + dur, e["name"]))
    pairs: Counter = Counter()
    for tid, slices in by_tid.items():
        stack: list[tuple[int, int, str]] = []
        for s in sorted(slices, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1][1] <= s[0]:
                stack.pop()
            assert not stack or s[1] <= stack[-1][1], f"{names[tid]}: {s} overlaps {stack[-1]} without nesting"
            pairs[(names[tid], stack[-1][2] if stack else None, s[2])] += 1
            stack.append(s)
    return pairs


def instants(trace: dict, prefix: str) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "i" and e["name"].startswith(prefix)]


def check_naive_crash(trace: dict, cpus: int) -> None:
    names = tracks(trace)
    assert sorted(names.values()) == ["cpu0 (patcher)", "cpu0 patcher steps", *(f"cpu{c}" for c in range(1, cpus))]
    pairs = nesting(trace)
    for c in range(1, cpus):
        assert pairs[(f"cpu{c}", None, "workload")] == 1
    assert any(p == "NMI" and k == "NMI" for _, p, k in pairs), "no nested NMI drawn inside its NMI"
    assert any(p == "NMI" and k == "int3" for _, p, k in pairs), "no int3 inside an NMI handler"
    assert sum(n for (_, p, k), n in pairs.items() if k == "crashed" and p is None) >= 1
    assert any(p.startswith("operation 1") and k == "publish" for t, p, k in pairs if t == "cpu0 patcher steps" and p)
    crashes = [e for e in instants(trace, "VIOLATION") if e["args"]["class"] == "crash"]
    assert crashes
    for v in instants(trace, "VIOLATION"):
        assert {"class", "site", "bytes", "detail"} <= set(v["args"]) and v["s"] == "t", v
    depth = [e["args"]["depth"] for e in trace["traceEvents"] if e["ph"] == "C" and "NMI depth" in e["name"]]
    assert max(depth) >= 2 and min(depth) == 0
    assert instants(trace, "write ") and instants(trace, "NMI from ")


def test_docs_trace_of_a_naive_nmi_crash():
    trace = load(DOCS / "naive-nmi-crash.json")
    assert trace["otherData"]["replay"].startswith("textpoke replay 7 --protocol bp-batch")
    assert "--nmi naive --nmi-rate 500" in trace["otherData"]["replay"]
    check_naive_crash(trace, 4)
    classes = {v["args"]["class"] for v in instants(trace, "VIOLATION")}
    assert classes == {"crash", "nmi-corruption"}


def test_docs_trace_of_batched_text_poke_bp():
    path = DOCS / "bp-batch.json"
    assert path.stat().st_size < 3_000_000
    trace = load(path)
    assert trace["otherData"]["verdict"].startswith("seed 0: ok")
    pairs = nesting(trace)
    patcher = {k for (t, p, k) in pairs if t == "cpu0 patcher steps" and p == "operation 1: bp-batch"}
    assert patcher == {"publish", "write int3", "sync int3", "write tail", "sync tail", "write first", "sync first"}
    assert len([e for e in instants(trace, "withdraw") if e["tid"] == 1]) == 2  # took no cycles: instants
    for c in (1, 2, 3):
        kids = {k for (t, p, k) in pairs if t == f"cpu{c}" and p == "workload"}
        assert {"sync IPI", "int3", "NMI"} <= kids, (c, kids)
    assert not instants(trace, "VIOLATION")
    assert instants(trace, "snoop ") and instants(trace, "serialize") and instants(trace, "IPI -> cpu3")
    writes = instants(trace, "write ")
    assert len(writes) == 2 * 3 * 32  # enable and disable, three writes per site (each tail changes)


def test_replay_writes_the_same_trace_for_the_same_seed(tmp_path):
    sc = Scenario(nmi="naive", nmi_rate=500, cpus=3, sites=4)
    first, second = tmp_path / "a" / "trace.json", tmp_path / "b.json"
    for path in (first, second):
        replay(sc, 0, Console(file=StringIO()), limit=1, perfetto=path)
    assert first.read_bytes() == second.read_bytes()
    trace = load(first)
    check_naive_crash(trace, 3)
    assert trace["otherData"]["seed"] == 0 and len(trace["otherData"]["trace_hash"]) == 32


def test_run_rows_write_one_trace_each(tmp_path):
    name = perfetto_name(3, "text_poke_bp, naive NMI entry")
    assert name == "03-text-poke-bp-naive-nmi-entry.json"
    row = run_row("x", Scenario(cpus=3, sites=4), 1, False, tmp_path / name)
    assert row.ok and row.perfetto == tmp_path / name
    pairs = nesting(load(tmp_path / name))
    assert pairs[("cpu0 patcher steps", None, "operation 2: bp-batch")] == 1


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(TypeError):
        write_trace(tmp_path / "t.json", {"traceEvents": [object()]})
    assert list(tmp_path.iterdir()) == []
