"""The command line holds up to abuse: bad input exits 2 with one line naming the problem and leaves no
output file; Ctrl-C stops at once and keeps what finished; a protocol is never called unsafe because
a limit ran out; tables read well in pipes."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import pytest
from conftest import run_cli

from cpus import ConfigError, CostModel, Machine, MachineConfig
from textpoke import cli
from textpoke.cli import build_parser, make_scenario
from textpoke.cli_support import check_output_path, write_output
from textpoke.costs import load_costs
from textpoke.executors import check_scheduler, stream
from textpoke.image import Percpu
from textpoke.oracle import SafetyOracle
from textpoke.patcher import Patcher
from textpoke.scenario import Scenario, replay_command, run_scenario


@pytest.fixture
def regular_file(tmp_path) -> Path:
    f = tmp_path / "plain"
    f.write_text("")
    return f


ABUSE = [
    # costs: zero, absurd, and where they come from
    (["latency", "--cost", "poll=0"], "--cost poll=0"),
    (["latency", "--cost", "text_write=1000000000000"], "between 1 and"),
    (["latency", "--cost", "instruction=0"], "--cost instruction=0"),
    # cycle counts with upper bounds
    (["machine", "--cycles", str(10**23)], "argument --cycles"),
    (["patch", "--site", "fn_003", "--new", "0f1f440000", "--warmup", str(10**14)], "argument --warmup"),
    (["safety", "--irqoff", "99999999999999999999"], "argument --irqoff"),
    (["safety", "--jobs", "99999999999999999999"], "argument --jobs"),
    (["safety", "--seeds", "0"], "argument --seeds"),
    (["safety", "--seed-start", "-5"], "argument --seed-start"),
    (["safety", "--cpus", "1"], "argument --cpus"),
    (["latency", "--sites", "257"], "argument --sites"),
    (["machine", "--functions", "1"], "argument --functions"),
    # schedulers
    (["safety", "--scheduler", "garbage"], "not a scheduler address"),
    (["safety", "--scheduler", "tcp://127.0.0.1:99999"], "invalid port"),
    (["safety", "--scheduler", "tcp://127.0.0.1:8786", "--jobs", "2"], "--jobs and --scheduler"),
    # names
    (["safety", "--protocol", "teleport"], "unknown protocol 'teleport'"),
    (["latency", "--protocols", "bp", "teleport"], "unknown protocol 'teleport'"),
    # patch sites: text in brackets is text, an address outside text says so
    (["patch", "--site", "[/bold]", "--new", "0f1f440000"], "'[/bold]'"),
    (["patch", "--site", "[bold]x", "--new", "0f1f440000"], "'[bold]x'"),
    (["patch", "--site", "0x0", "--new", "0f1f440000"], "not inside the kernel text"),
    (["patch", "--site", "-1", "--new", "0f1f440000"], "not inside the kernel text"),
    (["patch", "--site", "workload_main", "--new", "0f1f440000"], "(movabs rax, 0x"),
    # ignored or conflicting options
    (["safety", "--protocol", "stop-machine", "--mutation", "no-final-sync"], "changes nothing"),
    (["safety", "--protocol", "naive-bytes", "--mutation", "early-withdraw"], "changes nothing"),
    (["safety", "--fred"], "--fred needs an NMI entry"),
    (["safety", "--nmi", "latch-dec", "--fred"], "i386 entry"),
    (["safety", "--nmi-rate", "100"], "--nmi-rate needs an NMI entry"),
    (["safety", "--nmi-aim", "repeat"], "--nmi-aim needs an NMI entry"),
    (["explore", "--nmis", "2"], "--nmis needs --nmi"),
    (["explore", "--fred"], "--fred needs --nmi"),
    (["explore", "--nmi", "nested-safe", "--mutation", "no-final-sync"], "--mutation is for protocols"),
    (["explore", "--object", "x.o"], "--object does not apply to explore"),
    (["explore", "--client", "kprobe", "--protocol", "bp"], "client kprobe is patched with kprobe, not bp"),
    (["explore", "--client", "kprobe", "--mutation", "optprobe-no-wait"], "changes nothing"),
    (["explore", "--protocol", "optprobe"], "patches probes only"),
    (["explore", "--client", "jump-label", "--int3", "skip"], "not --int3 skip"),
    (["explore", "--client", "ftrace", "--operation", "ftrace-linux"], "no ftrace trampoline"),
    (["explore", "--client", "static-call", "--operation", "enable"], "not 'enable'"),
    (["explore", "--nmi", "naive", "--client", "kprobe"], "--client is for protocols"),
    # output paths
    (["replay", "0", "--timeline", "t.xyz"], ".png, .pdf, .svg"),
]


@pytest.mark.parametrize("argv, message", ABUSE, ids=[" ".join(a) for a, _ in ABUSE])
def test_bad_input_exits_2_with_one_line(capsys, argv, message):
    rc, _out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert len(err) == 1, err
    assert message in err[0]
    assert "Traceback" not in err[0]


def test_scheduler_address_is_checked_without_connecting():
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="invalid port"):
        check_scheduler("tcp://127.0.0.1:99999")
    assert time.perf_counter() - t0 < 0.5
    assert check_scheduler("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"


@pytest.mark.parametrize("option", ["--json", "--markdown"])
def test_unwritable_outputs_are_refused_before_any_work(capsys, regular_file, option):
    target = regular_file / "x.out"  # under a regular file
    t0 = time.perf_counter()
    rc, out, err = run_cli(capsys, "latency", option, str(target), "--cpus", "2", "--jobs", "1")
    assert rc == 2 and len(err) == 1 and f"argument {option}" in err[0] and "is not a directory" in err[0]
    assert time.perf_counter() - t0 < 5  # refused when the arguments were read, not after the sweep
    assert not out


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(
    "argv",
    [
        ["safety", "--json", "/dev/full"],
        ["run", "--json", "/dev/full"],
        ["replay", "0", "--jsonl", "/dev/full"],
        ["replay", "0", "--out", "/dev/full"],
        ["callgraph", "--dot", "/dev/full"],
    ],
)
def test_a_device_that_refuses_writes_is_refused_up_front(capsys, argv):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0]


def test_output_path_checks(tmp_path, regular_file):
    with pytest.raises(ConfigError, match="is a directory"):
        check_output_path(tmp_path, "--json")
    with pytest.raises(ConfigError, match="is not a directory"):
        check_output_path(regular_file, "--out", directory=True)
    with pytest.raises(ConfigError, match="needs a file name"):
        check_output_path(Path(""), "--json")
    # a new file in directories still to be made is fine
    assert check_output_path(tmp_path / "a" / "b.json", "--json") == tmp_path / "a" / "b.json"


def test_write_output_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    write_output(target, "complete\n")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ConfigError, match="No space left"):
        write_output(target, "the new content\n")
    assert target.read_text() == "complete\n"  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


@pytest.mark.parametrize(
    "content, message",
    [
        ("costs = 5\n", "costs must be a table"),
        ("costs = [1, 2]\n", "costs must be a table"),
        ("[costs]\npoll = 0\n", "costs.poll"),
        ("[costs]\npoll = 'x'\n", "costs.poll"),
        ("[costs\n", "not valid TOML"),
    ],
)
def test_config_file_errors_name_the_file(tmp_path, content, message):
    f = tmp_path / "costs.toml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        load_costs(f)
    assert str(f) in str(err.value)


def test_config_files_that_are_not_text(tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_costs(binary)
    with pytest.raises(ConfigError, match="is a directory"):
        load_costs(tmp_path)
    with pytest.raises(ConfigError, match="needs a file name"):
        load_costs(Path(""))


def test_costs_have_bounds():
    with pytest.raises(ConfigError, match="poll"):
        CostModel(poll=0)
    with pytest.raises(ConfigError, match="text_write"):
        CostModel(text_write=10**12)
    with pytest.raises(ConfigError, match="instruction"):
        CostModel(instruction=10**6)
    assert CostModel(text_write=1_000_000).text_write == 1_000_000


def test_every_option_has_a_help_line():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sp in subparsers.choices.items()
        for action in sp._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing


def test_mutations_apply_to_the_int3_protocols():
    """The conflict check must not refuse a mutation where it does something."""
    from textpoke.protocols import MUTATIONS

    probes = {"kprobe-slot-freed-early": "kprobe", "optprobe-no-wait": "optprobe"}  # client = protocol
    for mutation in MUTATIONS:
        if mutation in probes:
            client = ["--client", probes[mutation]]
            protocols: tuple[str, ...] = (probes[mutation],)
        else:
            client = []
            protocols = ("stop-machine-ftrace",) if mutation == "no-nmi-write" else ("bp", "bp-batch")
        for protocol in protocols:
            args = build_parser().parse_args(["safety", *client, "--protocol", protocol, "--mutation", mutation])
            assert make_scenario(args).mutation == mutation


def test_explore_strict_fails_when_the_search_is_incomplete(capsys):
    rc, out, err = run_cli(capsys, "explore", "--max-states", "5", "--strict")
    assert rc == 1 and "not complete" in out and "nothing is proven" in err[0]
    rc, out, _ = run_cli(capsys, "explore", "--nmi", "nested-safe", "--max-states", "10")
    assert rc == 0 and "10 states" in out


# -- tables for pipes ------------------------------------------------------------------------------
SWEEP = ["safety", "--protocol", "naive-atomic", "--sites", "2", "--seeds", "2", "--jobs", "1", "--quiet"]


def test_safety_rows_as_csv_and_json(capsys):
    rc, out, err = run_cli(capsys, *SWEEP, "--format", "csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    by = {r["class"]: r for r in rows}
    assert by["unsynced-modification"]["seeds"] == "2" and float(by["unsynced-modification"]["rate"]) == 1.0
    assert by["torn-fetch"]["seeds"] == "0"
    assert any(line.startswith("replay: textpoke replay 0") for line in err)  # prose on stderr
    rc, out, _ = run_cli(capsys, *SWEEP, "--format", "json")
    assert {r["class"]: r["seeds"] for r in json.loads(out)}["unsynced-modification"] == 2


def test_tables_do_not_wrap_in_a_pipe():
    r = subprocess.run(
        [sys.executable, "-m", "textpoke.cli", "callgraph", "--functions", "8"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "", "TERM": "dumb"},
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    nested = [line for line in lines if "NMI nested-safe" in line]
    assert len(nested) == 1 and "fn_003" in nested[0]  # the whole row on one line


def test_brackets_and_memory_operands_print_as_they_are(capsys, kernel):
    """Disassembly keeps its memory operands; user text is never markup."""
    from rich.console import Console

    from cpus.disasm import describe, insn_length
    from textpoke.cli_support import print_table

    console = Console(file=io.StringIO(), width=200)
    print_table(console, "table", "t", ("a", "b"), [("[bold]x", "nop dword ptr [rax + rax]")])
    shown = console.file.getvalue()
    assert "[bold]x" in shown and "nop dword ptr [rax + rax]" in shown
    # an instruction with a memory operand that is no patchable site: the error shows it whole
    from cpus.layout import TEXT_VA

    start = kernel.symbols["workload_main"]
    text_bytes = kernel.boot_image("emulate").text
    for addr in sorted(a for a in kernel.boundaries if start <= a < start + kernel.sizes["workload_main"]):
        code = bytes(text_bytes[addr - TEXT_VA : addr - TEXT_VA + 15])
        text = describe(code[: insn_length(code)], addr)
        if "ptr" in text and "[" in text:
            break
    else:
        pytest.fail("workload_main has no instruction with a memory operand")
    rc, _, err = run_cli(capsys, "patch", "--site", hex(addr), "--new", "0f1f440000")
    assert rc == 2 and len(err) == 1 and text in err[0]


def test_run_prints_the_exact_replay_command_of_each_failing_row(capsys, tmp_path, monkeypatch):
    from textpoke import demo

    small = {"cpus": 2, "sites": 2, "operation": "enable", "warmup": 1000, "settle": 1000}
    rows = (
        ("safe", Scenario(protocol="bp-batch", **small), False),
        ("unsafe", Scenario(protocol="naive-atomic", nmi="nested-safe", nmi_rate=300, **small), True),
    )
    monkeypatch.setattr(demo, "DEFAULT_ROWS", rows)
    rc, out, _ = run_cli(capsys, "run", "--jobs", "1", "--out", str(tmp_path), "--seed", "3")
    assert rc == 0
    commands = [line.strip() for line in out.splitlines() if line.strip().startswith("textpoke replay ")]
    unsafe = rows[1][1]
    assert commands == [replay_command(unsafe, 3)]
    # the command names the row's scenario (those of its fields the command line sets)
    args = build_parser().parse_args(commands[0].split()[1:])
    again = make_scenario(args)
    for f in ("protocol", "cpus", "sites", "operation", "nmi", "nmi_rate"):
        assert getattr(again, f) == getattr(unsafe, f)


# -- limits: slow is not unsafe --------------------------------------------------------------------
def patch_rig(kernel, costs: CostModel, **patcher_kw):
    oracle = SafetyOracle(kernel, 4)
    m = Machine(MachineConfig(cpus=4, seed=1, costs=costs), kernel.boot_image("emulate"), [oracle])
    m.watch(kernel.sites.values())
    p = Patcher(m, kernel, **patcher_kw)
    p.listeners.append(oracle)
    m.run(2_000)
    return m, p, oracle


def test_a_patch_slower_than_the_stall_window_is_not_a_hang(kernel):
    """The stall window bounds the wait for the next acknowledgement, not the whole operation: an
    operation many windows long that keeps progressing completes and is judged on its merits."""
    sites = [kernel.site_of(i) for i in range(4)]
    _m, p, oracle = patch_rig(kernel, CostModel(), stall=8_000)
    report = p.enable_ftrace(sites, protocol="bp-batch")
    assert report.hung is None and report.incomplete is None
    assert report.latency > 3 * 8_000
    assert not oracle.counts


def test_a_budget_that_runs_out_leaves_the_run_incomplete_not_unsafe(kernel):
    sites = [kernel.site_of(i) for i in range(4)]
    m, p, oracle = patch_rig(kernel, CostModel(), timeout=10_000)
    report = p.enable_ftrace(sites, protocol="bp-batch")
    assert report.incomplete and report.hung is None
    m.run(20_000)  # CPUs keep trapping on the int3s of the abandoned operation
    verdict = oracle.verdict(m, 1, drained=True)
    assert verdict.ok and verdict.incomplete and "incomplete" in verdict.summary()


def test_the_budget_grows_with_the_work(kernel):
    from textpoke.image import FTRACE_NOP, call_bytes
    from textpoke.protocols import PatchRequest, build

    def budget(n: int, costs: CostModel) -> int:
        _m, p, _ = patch_rig(kernel, costs)
        reqs = [
            PatchRequest(kernel.site_of(i), FTRACE_NOP, call_bytes(kernel.site_of(i), kernel.symbols["ftrace_caller"]))
            for i in range(n)
        ]
        return p.budget(build("bp", reqs))

    small, large = budget(1, CostModel()), budget(32, CostModel())
    assert large > 20 * small // 2  # 32 sites one at a time: 32 times the steps
    # every text write of 32 sites, at the largest text_write cost, fits many times over
    assert budget(32, CostModel(text_write=1_000_000)) > 20 * 3 * 32 * 1_000_000


def test_the_stall_window_covers_interrupts_off_sections(kernel):
    m, p, _ = patch_rig(kernel, CostModel())
    base = p.stall
    for c in range(1, 4):
        m.write(m.layout.percpu_va(c) + Percpu.IRQOFF_MASK, (7).to_bytes(8, "little"))
        m.write(m.layout.percpu_va(c) + Percpu.IRQOFF_LEN, (500_000).to_bytes(8, "little"))
    assert p.stall >= base + 2 * 3 * 500_000  # twice the longest section, 3 instructions a spin


def test_a_cpu_that_never_answers_is_still_a_hang():
    """The naive NMI entry kills CPUs inside the #BP handler holding a reference: the patcher waits
    for the references forever. That is a real consequence of the bug and stays a violation."""
    # a seed whose run hangs: 3 with the exact scheduler (also 2, 4, 6, 7, 9 ...; which ones moves
    # with the kernel's layout), 11 with the fine one
    out = run_scenario(Scenario(nmi="naive", nmi_rate=500, nmi_cpus="workers", interleave="exact"), 3)
    assert [r.hung for r in out.reports] == ["bp_desc refs"]
    assert out.verdict.counts["crash"] and not out.verdict.incomplete
    assert any("patch operation hung: no progress" in v.detail for v in out.verdict.violations)


def test_a_patching_cpu_that_dies_is_a_hang_not_an_incomplete_run():
    """With NMIs on the patching CPU too, the naive entry kills that CPU itself: the operation can
    never finish, whatever the budget, so it is hung (a violation), not incomplete."""
    out = run_scenario(Scenario(nmi="naive", nmi_rate=500), 3)
    assert out.verdict.by_cpu.get(0)
    assert [r.hung is not None for r in out.reports] == [True]
    assert not out.verdict.incomplete and out.verdict.counts["crash"]
    assert any("hung: the agent's cpu0 crashed" in v.detail for v in out.verdict.violations)


# -- streaming and Ctrl-C --------------------------------------------------------------------------
class CountingExecutor(Executor):
    """Runs each task at once, and counts how many were submitted but not yet collected."""

    def __init__(self) -> None:
        self.outstanding = 0
        self.most = 0

    def submit(self, fn, /, *args, **kwargs):
        f: Future = Future()
        f.set_result(fn(*args, **kwargs))
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)
        f.add_done_callback(lambda _: None)
        return f


def test_tasks_are_streamed_with_a_bound_in_flight():
    ex = CountingExecutor()
    read = []

    def items():
        for i in range(10**9):  # never materialized
            read.append(i)
            yield i

    got = []
    for item, value in stream(ex, lambda x: x * x, items(), in_flight=8):
        ex.outstanding -= 1
        got.append((item, value))
        if len(got) == 50:
            break
    assert sorted(got)[:3] == [(0, 0), (1, 1), (2, 4)]
    assert ex.most <= 8 and len(read) <= 50 + 8


def test_ctrl_c_in_process_stops_with_one_line_and_keeps_what_finished(capsys, tmp_path):
    target = tmp_path / "partial.json"
    timer = threading.Timer(4.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        rc, _, err = run_cli(capsys, *SWEEP[:-3], "--seeds", "500", "--jobs", "1", "--quiet", "--json", str(target))
    finally:
        timer.cancel()
    assert rc == 130 and len(err) == 1 and err[0].startswith("textpoke: interrupted")
    data = json.loads(target.read_text())
    assert data["complete"] is False and data["seeds_requested"] == 500
    assert data["seeds"] == len(data["seed_list"]) < 500


@pytest.mark.skipif(sys.platform != "linux", reason="process groups and SIGINT as a terminal sends it")
def _ctrl_c_with_a_pool(tmp_path) -> str | None:
    """One try of the test below: None when it behaved, else what went wrong."""
    target = tmp_path / "partial.json"
    target.unlink(missing_ok=True)
    argv = ["safety", "--seeds", "300", "--jobs", "2", "--quiet", "--json", str(target)]
    p = subprocess.Popen(
        [sys.executable, "-m", "textpoke.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(6)
    t0 = time.perf_counter()
    os.killpg(p.pid, signal.SIGINT)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return "still running 30 s after SIGINT"
    elapsed = time.perf_counter() - t0
    if p.returncode != 130:
        return f"exit status {p.returncode}: {err}"
    if err.strip().splitlines() != [err.strip()] or "interrupted" not in err:
        return f"not one line saying interrupted: {err}"
    if elapsed >= 5:
        return f"took {elapsed:.1f} s"
    if json.loads(target.read_text())["complete"] is not False:
        return "the partial result is not marked incomplete"
    return None


def test_ctrl_c_with_a_pool_stops_promptly(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: the workers ignore it, the parent
    terminates them and exits with 130 in well under a second or two, writing what finished. On a
    loaded machine one try in a few dozen has failed (a timing this test does not control yet): a
    second try is allowed, and both must not fail."""
    first = _ctrl_c_with_a_pool(tmp_path)
    if first is not None:
        second = _ctrl_c_with_a_pool(tmp_path)
        assert second is None, f"first try: {first}; second try: {second}"


def test_memory_options_are_bounded_not_materialized():
    """--seeds accepts huge sweeps: the seeds are a range, streamed to the pool."""
    args = build_parser().parse_args(["safety", "--seeds", str(10**9)])
    assert args.seeds == 10**9
    assert cli.MAX_SEEDS >= 10**9


def test_incomplete_seeds_are_counted_apart_from_violations():
    from dataclasses import replace

    from textpoke.sweep import SweepResult, run_one

    sc = Scenario(protocol="bp-batch", sites=2, cpus=2, operation="enable", warmup=1000, settle=1000)
    done = run_one(sc, 0)
    result = SweepResult(sc, [done, replace(done, seed=1, incomplete="the budget ran out")])
    data = result.as_dict()
    assert data["seeds_incomplete"] == 1 and data["incomplete_seeds"] == {"1": "the budget ran out"}
    assert data["seeds_with_violation"] == 0 and result.failing == []


def test_replay_writes_its_files_whole(capsys, tmp_path):
    listing, jsonl = tmp_path / "listing.txt", tmp_path / "trace.jsonl"
    argv = ["replay", "0", "--cpus", "2", "--sites", "2", "--operation", "enable", "--limit", "5"]
    rc, out, _ = run_cli(capsys, *argv, "--out", str(listing), "--jsonl", str(jsonl))
    assert rc == 0 and f"wrote {listing}" in out
    assert len(listing.read_text().splitlines()) == len(jsonl.read_text().splitlines()) > 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["listing.txt", "trace.jsonl"]


def test_ctrl_c_inside_an_emulator_callback_is_not_lost(kernel):
    """A signal usually lands while Python runs one of Unicorn's hook callbacks, where ctypes would
    print an exception and drop it. The CLI's handler defers it to the end of the quantum."""

    class RaiseSigint:
        def __init__(self) -> None:
            self.sent = 0

        def on_probe(self, cpu: int, time: int, label: str) -> None:
            if not self.sent:
                self.sent += 1
                signal.raise_signal(signal.SIGINT)

    probe = RaiseSigint()
    m = Machine(MachineConfig(cpus=2, seed=0), kernel.boot_image("emulate"), [probe])
    m.probe(kernel.symbols["workload_main"], "loop")
    previous = signal.signal(signal.SIGINT, cli._on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt) as stop:
            m.run(2_000_000)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert probe.sent == 1
    # raised by the engine once Unicorn returned, not from inside the callback
    last = stop.traceback[-1]
    assert last.name == "run" and last.path.name == "_unicorn.py"
    assert m.now() < 2_000_000  # stopped at once, not after the run


def test_replay_names_the_step_of_each_operation(capsys):
    rc, out, _ = run_cli(capsys, "replay", "0", "--cpus", "2", "--sites", "2", "--limit", "1")
    assert rc == 0
    assert "enable: 2 sites" in out and "disable: 2 sites" in out
