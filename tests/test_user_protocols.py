"""Protocols and mutations from outside the package: resolution, step checks, and the worked example.

The worked example is tests/plugins/twosync, a package as a user would write it: a text_poke_bp
that skips the sync after the int3. It is pip-installed into a temporary directory, so
importlib.metadata finds a real installed distribution and its entry points, and the command line
runs in a subprocess with that directory on PYTHONPATH. The oracle and the explorer must both reject
it and print their counterexample.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from textpoke.cli import main
from textpoke.explore import explore
from textpoke.image import FTRACE_NOP
from textpoke.patcher import NMI_UNSAFE_PROTOCOLS
from textpoke.plugins import name_of, resolve_protocol
from textpoke.protocols import INT3_PROTOCOLS, MUTATIONS, PROBE_PROTOCOLS, PROTOCOLS, PatchRequest, build
from textpoke.scenario import Scenario
from textpoke.stepcheck import ProtocolError, check_steps, nmi_unsafe, publishes
from textpoke.sweep import run_one

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
CALL = b"\xe8" + (0x100).to_bytes(4, "little")
CALL2 = b"\xe8" + (0x200).to_bytes(4, "little")


def requests(old: bytes = FTRACE_NOP, new: bytes = CALL, n: int = 2) -> list[PatchRequest]:
    return [PatchRequest(0x1000 + 64 * i, old, new) for i in range(n)]


@pytest.fixture
def plugins_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.syspath_prepend(str(PLUGINS / "twosync"))


# ------------------------------------------------------------------------------------------------
# The checker accepts every built-in protocol and mutation, and derives what the lists said
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("old,new", [(FTRACE_NOP, CALL), (CALL, FTRACE_NOP), (CALL, CALL2)])
def test_checker_accepts_every_builtin_protocol_and_mutation(old, new):
    reqs = requests(old, new)
    for name in PROTOCOLS:
        if name in PROBE_PROTOCOLS:
            continue  # they perform only probe requests (tests/test_kprobes.py)
        steps = build(name, reqs)
        assert check_steps(steps, reqs) == steps
        assert publishes(steps) == (name in INT3_PROTOCOLS), name
        assert nmi_unsafe(steps, reqs) == (name in NMI_UNSAFE_PROTOCOLS), name
    for mutation in MUTATIONS:
        check_steps(build("bp-batch", reqs, mutation), reqs)


# ------------------------------------------------------------------------------------------------
# Bad steps: each refused before anything runs, naming the step
# ------------------------------------------------------------------------------------------------
BAD = {
    "not_a_step": ("step 3 of 3", "'sync please' (str), is not a step"),
    "raises": (None, "raised ZeroDivisionError"),
    "returns_none": (None, "returned None (NoneType), not a list or tuple"),
    "returns_generator": (None, "(generator), not a list or tuple"),
    "poke_elsewhere": ("step 1 of 1", "writes outside the requested sites (0x1000, 0x1040)"),
    "wrong_length": ("step 1 of 1", "writes 5 byte(s) at offset 1 of a 5-byte instruction"),
    "release_without_rendezvous": ("step 3 of 3, Release()", "releases CPUs that no Rendezvous stopped"),
    "unknown_label": ("step 4 of 11, Sync('everything')", "unknown label; a Sync's label is one of int3, tail"),
    "forgets_first_byte": (None, "never writes the new bytes of site 0x1000 in full: it would end as cc"),
    "sync_while_stopped": ("step 4 of 5, Sync('write')", "Rendezvous of step 1 holds the other CPUs"),
    "never_released": ("step 1 of 3, Rendezvous()", "is never released"),
    "withdraw_unpublished": ("step 1 of 3, Withdraw()", "withdraws descriptors that are not published"),
    "publishes_a_stranger": ("step 1 of 4", "publishes a request for 0xff0 that was not asked for"),
}


@pytest.mark.parametrize("fn", list(BAD))
def test_bad_steps_are_refused_with_the_step_named(plugins_on_path, fn):
    where, what = BAD[fn]
    with pytest.raises(ProtocolError) as err:
        build(f"bad_protocols:{fn}", requests())
    msg = str(err.value)
    assert msg.startswith(f"protocol 'bad_protocols:{fn}'"), msg
    assert what in msg, msg
    if where:
        assert where in msg, msg
        assert err.value.index == int(where.split()[1])
    else:
        assert err.value.index is None


def test_names_that_do_not_resolve(plugins_on_path):
    for name, what in [
        ("no-such", "unknown protocol 'no-such'; choose from bp, bp-batch"),
        ("bad_protocols:missing", "module 'bad_protocols' has no attribute 'missing'"),
        ("bad_protocols:NOT_CALLABLE", "is int, not a function"),
        ("no_such_module:fn", "cannot import 'no_such_module'"),
    ]:
        with pytest.raises(ValueError, match=what):
            resolve_protocol(name)
        with pytest.raises(ValueError, match=what):
            Scenario(protocol=name)


def test_a_scenario_checks_a_users_steps_before_any_run(plugins_on_path):
    """The steps of every operation (enable, retarget, disable) for the scenario's own sites."""
    with pytest.raises(ProtocolError, match=r"step 10 of 29, Sync\('everything'\)"):
        Scenario(protocol="bad_protocols:unknown_label")
    with pytest.raises(ProtocolError, match="mutation 'bad_protocols:keeps_descriptors'"):
        Scenario(protocol="bp", mutation="bad_protocols:keeps_descriptors", operation="retarget")
    assert Scenario(protocol="twosync:two_sync", operation="retarget").protocol == "twosync:two_sync"


def test_mutations_from_outside_are_checked_too(plugins_on_path):
    reqs = requests()
    steps = build("bp-batch", reqs, "twosync:one_sync")
    assert [type(s).__name__ for s in steps].count("Sync") == 1
    expected = r"mutation 'bad_protocols:keeps_descriptors': step 1 of 10, Publish.*is never withdrawn"
    with pytest.raises(ProtocolError, match=expected):
        build("bp-batch", reqs, "bad_protocols:keeps_descriptors")


def test_descriptors_and_nmi_safety_follow_from_the_steps(plugins_on_path):
    reqs = requests()
    two = build("twosync:two_sync", reqs)
    assert publishes(two) and not nmi_unsafe(two, reqs)  # unsafe for other reasons: the oracle's job
    atomic = build("bad_protocols:atomic_whole_store", reqs)
    assert not publishes(atomic) and nmi_unsafe(atomic, reqs)


def test_bad_protocol_on_the_command_line_exits_2_with_one_line(plugins_on_path, capsys, kernel):
    code = main(["patch", "--site", "fn_001", "--new", "e8 00 00 00 00", "--protocol", "bad_protocols:wrong_length"])
    err = capsys.readouterr().err
    assert code == 2
    assert "step 1 of 1, Poke(" in err and "writes 5 byte(s) at offset 1" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# The worked example
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """tests/plugins/twosync pip-installed into a fresh directory (copied first, so the build leaves
    nothing in the source tree)."""
    tmp = tmp_path_factory.mktemp("twosync")
    src = shutil.copytree(PLUGINS / "twosync", tmp / "src")
    target = tmp / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    assert (target / "textpoke_twosync-0.1.0.dist-info" / "entry_points.txt").exists()
    return target


def textpoke(*args: str, path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(path)]), "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "textpoke.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_installed_entry_point_is_rejected_by_the_oracle_and_the_explorer(installed):
    # the explorer: shortest counterexample, printed step by step
    r = textpoke("explore", "--protocol", "two-sync", "--cpus", "1", "--strict", path=installed)
    assert r.returncode == 1, r.stderr
    assert "two-sync: 1 workload CPU(s), 1 site(s)" in r.stdout
    assert "shortest path to torn-fetch (6 steps):" in r.stdout
    assert "cpu0: writes cc at site0+0 (int3)" in r.stdout
    assert "cpu1: executes site0: 0f fb" in r.stdout  # old first byte, new tail
    # the oracle: failing seeds, the first violation of the first one, and its replay command
    r = textpoke(
        "safety", "--protocol", "two-sync", "--cpus", "3", "--sites", "2", "--seeds", "3", "--jobs", "1", "--quiet",
        path=installed,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "failing seeds: 1 2" in r.stdout
    assert "seed 1 unsynced-modification: cpu" in r.stdout
    assert "replay: textpoke replay 1 --protocol two-sync" in r.stdout
    # its mutation entry point resolves too
    r = textpoke("explore", "--protocol", "bp-batch", "--mutation", "one-sync", "--cpus", "1", path=installed)
    assert r.returncode == 0 and "bp-batch + one-sync" in r.stdout and "shortest path" in r.stdout, r.stderr


def test_module_function_is_rejected_by_the_oracle_and_the_explorer(plugins_on_path):
    result = explore("twosync:two_sync", cpus=1, sites=1)
    assert {"torn-fetch", "unsynced-modification"} <= set(result.violations)
    assert "shortest path to torn-fetch" in result.report()
    sc = Scenario(protocol="twosync:two_sync", cpus=3, sites=2)
    assert any(not run_one(sc, seed).ok for seed in (1, 2))


def test_module_function_on_the_command_line_and_in_worker_processes():
    """The name travels to the process pool's workers, which import the module themselves."""
    r = textpoke(
        "safety", "--protocol", "twosync:two_sync", "--cpus", "3", "--sites", "2", "--seeds", "2", "--seed-start", "1",
        "--jobs", "2", "--quiet", path=PLUGINS / "twosync",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "failing seeds: 1 2" in r.stdout
    assert "replay: textpoke replay 1 --protocol twosync:two_sync" in r.stdout


def test_pytest_plugin_takes_the_function(plugins_on_path, textpoke_scenario):
    two_sync = importlib.import_module("twosync").two_sync
    assert name_of("protocol", two_sync) == "twosync:two_sync"
    outcome = textpoke_scenario(protocol=two_sync, cpus=3, sites=2, seed=1)
    assert outcome.scenario.protocol == "twosync:two_sync"
    assert not outcome.verdict.ok
    with pytest.raises(ValueError, match="no importable name"):
        textpoke_scenario(protocol=lambda reqs: ())
