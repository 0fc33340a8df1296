"""The mistakes a new user makes building an object for --object: each one is refused with one line
that says what to change, exit status 2, before the command prints anything, and nothing is loaded.

Each mistake is a tiny source and the compiler command that makes it. The built objects are committed
under tests/objects/mistakes/ (BUILD.json records the commands), so a machine without a compiler runs
the tests too; where the compiler is installed, the object is also built afresh from its source here
and must be refused the same way. `python tests/test_object_mistakes.py` rebuilds the committed set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from textpoke.cli import main
from textpoke.elfobj import ObjectError
from textpoke.image import KernelConfig, build_kernel

HERE = Path(__file__).resolve().parent
MISTAKES_DIR = HERE / "objects" / "mistakes"

#: the kernel's flags as `textpoke cc` passes them to gcc, written out here rather than imported so that a
#: change to cc.py cannot move the test with it; the mistakes are edits of them
GCC_FLAGS = [
    "-O2",
    "-pg",
    "-mfentry",
    "-mrecord-mcount",
    "-mnop-mcount",
    "-mcmodel=kernel",
    "-fno-pic",
    "-mno-red-zone",
    "-ffreestanding",
    "-fno-stack-protector",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-g0",
]
#: a plain zig command as the README's walkthrough gives it: without -mno-sse, zig's clang copies structs through %xmm
ZIG_FLAGS = [
    "-target",
    "x86_64-freestanding-none",
    "-O2",
    "-pg",
    "-mfentry",
    "-mcmodel=kernel",
    "-fno-pic",
    "-mno-red-zone",
    "-g0",
]

BASE = """unsigned long hits;
__attribute__((noinline)) unsigned long bump(unsigned long v) { hits += v; return hits; }
void textpoke_workload(void) { bump(1); }
"""


def _without(flags: tuple[str, ...] | list[str], *drop: str) -> list[str]:
    return [f for f in flags if f not in drop]


@dataclass(frozen=True)
class Mistake:
    name: str
    compiler: str  # gcc, g++ or zig
    source: str
    flags: tuple[str, ...]
    error: str  # a regular expression the one-line error matches


MISTAKES = (
    Mistake(
        "no_mfentry", "gcc", BASE, tuple(_without(GCC_FLAGS, "-mfentry")), r"bump\+0x4, not at its entry.*add -mfentry"
    ),
    Mistake(
        "mcount_call",
        "gcc",
        BASE,
        tuple(_without(GCC_FLAGS, "-mfentry", "-mrecord-mcount", "-mnop-mcount")),
        r"undefined symbol: mcount .*add -mfentry",
    ),
    Mistake(
        "pic",
        "gcc",
        BASE,
        (*tuple(_without(GCC_FLAGS, "-mcmodel=kernel", "-fno-pic", "-mrecord-mcount", "-mnop-mcount")), "-fPIC"),
        r"R_X86_64_\w*GOTPCRELX against \w+: position-independent code.*-fno-pic -mcmodel=kernel",
    ),
    Mistake(
        "constructor",
        "gcc",
        "unsigned long hits;\n__attribute__((constructor)) static void setup(void) { hits = 5; }\n"
        + BASE.split("\n", 1)[1],
        tuple(GCC_FLAGS),
        r"\.init_array lists constructors.*initialize the data statically",
    ),
    Mistake(
        "tls",
        "gcc",
        "__thread " + BASE,
        tuple(GCC_FLAGS),
        r"thread-local storage \(\.tbss: hits\).*textpoke_cpu\(\)",
    ),
    Mistake("cplusplus", "g++", BASE, ("-x", "c++", *GCC_FLAGS), r'_Z17textpoke_workloadv .*extern "C"'),
    Mistake(
        "stack_protector",
        "gcc",
        "__attribute__((noinline)) unsigned long fill(unsigned long v)\n"
        "{ char buf[64]; for (int i = 0; i < 64; i++) buf[i] = v + i; return buf[v & 63]; }\n"
        "unsigned long out;\nvoid textpoke_workload(void) { out = fill(1); }\n",
        (*tuple(_without(GCC_FLAGS, "-fno-stack-protector")), "-fstack-protector-all"),
        r"undefined symbol: __stack_chk_fail .*-fno-stack-protector",
    ),
    Mistake(
        "ubsan",
        "gcc",
        "int vals[8];\n__attribute__((noinline)) int get(int i, int s) { return vals[i] << s; }\n"
        "int out;\nvoid textpoke_workload(void) { out = get(1, 2); }\n",
        (*tuple(f if f != "-O2" else "-O0" for f in GCC_FLAGS), "-fsanitize=undefined"),
        r"undefined symbol: __ubsan_handle_\w+ .*without -fsanitize=undefined",
    ),
    Mistake(
        "sse",
        "zig",
        "struct pkt { unsigned long a, b, c, d; };\nstruct pkt table[4];\n"
        "__attribute__((noinline)) void put(const struct pkt *p, unsigned i) { table[i & 3] = *p; }\n"
        "void textpoke_workload(void) { struct pkt p = { 1, 2, 3, 4 }; put(&p, 1); }\n",
        tuple(ZIG_FLAGS),
        r"put: \w+ at 0x[0-9a-f]+ uses SSE.*-mno-sse -mno-mmx -mno-sse2 -mno-avx",
    ),
)


def _command(m: Mistake) -> list[str] | None:
    """The compiler command for `m`, or None when that compiler is not installed."""
    if m.compiler == "zig":
        try:
            import ziglang  # noqa: F401
        except ImportError:
            return None
        return [sys.executable, "-m", "ziglang", "cc", *m.flags]
    return [m.compiler, *m.flags] if shutil.which(m.compiler) else None


def _build(m: Mistake, out_dir: Path) -> Path:
    cmd = _command(m)
    assert cmd is not None
    src = out_dir / f"{m.name}.{'cc' if m.compiler == 'g++' else 'c'}"
    src.write_text(m.source)
    obj = out_dir / f"{m.name}.o"
    subprocess.run([*cmd, "-c", src.name, "-o", obj.name], cwd=out_dir, check=True, capture_output=True)
    return obj


def _refused(path: Path, error: str) -> None:
    with pytest.raises(ObjectError, match=error):
        build_kernel.__wrapped__(KernelConfig(objects=(str(path),)))


@pytest.mark.parametrize("m", MISTAKES, ids=[m.name for m in MISTAKES])
def test_the_committed_object_is_refused_with_the_fix(m):
    _refused(MISTAKES_DIR / f"{m.name}.o", m.error)


@pytest.mark.parametrize("m", MISTAKES, ids=[m.name for m in MISTAKES])
def test_the_object_built_here_is_refused_the_same_way(m, tmp_path):
    if _command(m) is None:
        pytest.skip(f"{m.compiler} is not installed")
    _refused(_build(m, tmp_path), m.error)


def test_the_committed_objects_are_what_build_json_records():
    record = json.loads((MISTAKES_DIR / "BUILD.json").read_text())
    assert set(record) == {m.name for m in MISTAKES}
    for m in MISTAKES:
        assert record[m.name]["flags"] == list(m.flags)
        data = (MISTAKES_DIR / f"{m.name}.o").read_bytes()
        assert hashlib.sha256(data).hexdigest() == record[m.name]["sha256"]


def test_a_source_file_is_not_an_object(tmp_path):
    src = tmp_path / "mine.c"
    src.write_text(BASE)
    _refused(src, r"mine\.c: not an ELF file .*source code; compile it first \(`textpoke cc")


def test_a_fixed_build_of_the_same_source_loads(tmp_path):
    """The hints are right: the plain source with the kernel's flags is accepted."""
    fixed = Mistake("fixed", "gcc", BASE, tuple(GCC_FLAGS), "")
    if _command(fixed) is None:
        pytest.skip("gcc is not installed")
    kernel = build_kernel.__wrapped__(KernelConfig(objects=(str(_build(fixed, tmp_path)),)))
    assert set(kernel.sites) == {"bump", "textpoke_workload"}


@pytest.mark.parametrize("command", ["run", "safety", "latency", "callgraph", "machine"])
def test_the_cli_refuses_before_it_prints_anything(command, capsys):
    """Exit status 2 and the error alone: no header, no progress bar before it."""
    assert main([command, "--object", str(MISTAKES_DIR / "stack_protector.o")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("textpoke: error: undefined symbol: __stack_chk_fail"), err
    assert "-fno-stack-protector" in err


def test_an_object_without_sites_is_refused_before_the_run_starts(tmp_path, capsys):
    """Built without -pg: the call graph shows it; a run says what to add, before any output."""
    plain = Mistake("plain", "gcc", BASE, tuple(_without(GCC_FLAGS, "-pg", "-mfentry")), "")
    if _command(plain) is None:
        pytest.skip("gcc is not installed")
    obj = str(_build(plain, tmp_path))
    assert main(["callgraph", "--object", obj]) == 0
    capsys.readouterr()
    assert main(["run", "--object", obj]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no ftrace sites: compile them with -pg -mfentry" in err


def _rebuild() -> None:
    """Rebuild tests/objects/mistakes/ and its BUILD.json (every compiler must be installed)."""
    MISTAKES_DIR.mkdir(parents=True, exist_ok=True)
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in MISTAKES:
            if _command(m) is None:
                raise SystemExit(f"{m.compiler} is not installed")
            obj = _build(m, Path(tmp))
            data = obj.read_bytes()
            (MISTAKES_DIR / obj.name).write_bytes(data)
            src = next(Path(tmp).glob(f"{m.name}.c*"))
            (MISTAKES_DIR / src.name).write_text(m.source)
            record[m.name] = {
                "compiler": m.compiler,
                "source": src.name,
                "flags": list(m.flags),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
    (MISTAKES_DIR / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    _rebuild()
