"""Compile C sources into objects the loader accepts, with the kernel's flags, reproducibly.

The compiler is gcc when there is one (it supports the whole ftrace flag set: nops and a
`__mcount_loc` table), else clang, else zig's clang from the `ziglang` package (`pip install
textpoke[cc]`), both of which leave `call __fentry__` for the loader to record and nop out.

The flags are Linux's for x86-64 kernel code, minus what a simulator does not need: no SSE/MMX
registers, no red zone, the kernel code model, no PIC, no stack protector, no unwind tables; plus
`-g0` and a path map so the same source and compiler give the same bytes. `compile_objects` writes
`BUILD.json` next to the objects: the compiler's name and version, the flags and each object's
SHA-256, so a committed object says how it was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path

from cpus.errors import TextpokeError

__all__ = [
    "CLANG_FLAGS",
    "COMMON_FLAGS",
    "CcError",
    "Compiler",
    "compile_objects",
    "find_compiler",
    "include_dir",
    "kernel_compiler",
]

#: flags every compiler gets
COMMON_FLAGS = (
    "-O2",
    "-pg",
    "-mfentry",
    "-mcmodel=kernel",
    "-fno-pic",
    "-mno-red-zone",
    "-ffreestanding",
    "-fno-stack-protector",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-g0",
)
#: gcc also records its sites and leaves nops (what Linux uses when the compiler can)
GCC_FLAGS = ("-mrecord-mcount", "-mnop-mcount")
#: clang (and zig cc) accept -mgeneral-regs-only on x86 but still copy structs through %xmm registers:
#: they get the flags Linux's arch/x86/Makefile gives every compiler (-mno-3dnow aside: clang has no 3DNow!)
CLANG_FLAGS = ("-mno-sse", "-mno-mmx", "-mno-sse2", "-mno-avx")
#: the C kernel only: its traced functions must stay in source (index) order, which gcc otherwise
#: changes for the functions whose jump label branches call a cold function (clang keeps the order)
KERNEL_FLAGS = {"gcc": ("-fno-toplevel-reorder",)}


class CcError(TextpokeError):
    """No compiler, or the compiler refused a source."""


@dataclass(frozen=True)
class Compiler:
    name: str  # gcc, clang or zig
    command: tuple[str, ...]
    flags: tuple[str, ...]
    version: str


def include_dir() -> Path:
    """Where textpoke.h lives."""
    return Path(str(resources.files("textpoke.c")))


def _version(command: tuple[str, ...]) -> str:
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).splitlines()[0].strip() if (out.stdout or out.stderr) else ""


def _zig_available() -> bool:
    try:
        import ziglang  # noqa: F401
    except ImportError:
        return False
    return True


def find_compiler(prefer: str | None = None) -> Compiler:
    """gcc, else clang, else `python -m ziglang cc`; `prefer` names one of them."""
    order = [prefer] if prefer else ["gcc", "clang", "zig"]
    for name in order:
        if name == "gcc" and shutil.which("gcc"):
            cmd: tuple[str, ...] = ("gcc",)
            return Compiler("gcc", cmd, COMMON_FLAGS + GCC_FLAGS, _version(cmd))
        if name == "clang" and shutil.which("clang"):
            cmd = ("clang",)
            return Compiler(
                "clang", cmd, ("--target=x86_64-unknown-none-elf", *COMMON_FLAGS, *CLANG_FLAGS), _version(cmd)
            )
        if name == "zig" and _zig_available():
            cmd = (sys.executable, "-m", "ziglang", "cc")
            flags = ("-target", "x86_64-freestanding-none", *COMMON_FLAGS, *CLANG_FLAGS)
            return Compiler("zig", cmd, flags, _version((sys.executable, "-m", "ziglang", "version")))
        if name not in ("gcc", "clang", "zig"):
            raise CcError(f"unknown compiler {name!r}; choose gcc, clang or zig")
    wanted = prefer or "gcc, clang or zig (pip install 'textpoke[cc]')"
    raise CcError(f"no C compiler found: install {wanted}")


def kernel_compiler(prefer: str | None = None) -> Compiler:
    """The compiler `find_compiler` picks, with the C kernel's own flags (KERNEL_FLAGS) added."""
    cc = find_compiler(prefer)
    return replace(cc, flags=cc.flags + KERNEL_FLAGS.get(cc.name, ()))


def compile_objects(sources: list[Path], out_dir: Path, compiler: Compiler | None = None) -> dict:
    """Compile each source into out_dir/NAME.o and write out_dir/BUILD.json; returns the record.

    Each source is compiled from its own directory by its file name, into a temporary file that is
    moved into place only when every source compiled (no half-built set of objects)."""
    cc = compiler or find_compiler()
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, bytes] = {}
    inc = include_dir()
    with tempfile.TemporaryDirectory(prefix="textpoke-cc-") as tmp:
        for src in sources:
            if not src.is_file():
                raise CcError(f"{src}: no such source file")
            obj = Path(tmp) / (src.stem + ".o")
            cmd = [*cc.command, *cc.flags, f"-I{inc}", f"-ffile-prefix-map={inc}=textpoke/c"]
            cmd += ["-c", src.name, "-o", str(obj)]
            env = dict(os.environ, SOURCE_DATE_EPOCH="0")
            done = subprocess.run(cmd, cwd=src.parent, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise CcError(f"{cc.name} failed on {src}:\n{done.stderr.strip()}")
            built[src.stem + ".o"] = obj.read_bytes()
    for name, data in built.items():
        (out_dir / name).write_bytes(data)
    record = {
        "compiler": asdict(cc) | {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cc.command))},
        "objects": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(built.items())},
        "sources": [s.name for s in sources],
    }
    (out_dir / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
