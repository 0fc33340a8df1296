"""What the `textpoke` command needs besides the commands themselves: argument types that refuse bad
input before any work starts, output paths checked up front and written whole, and tables for
people or for pipes.

Rules the command line keeps (README "Commands"):

* bad input exits 2 with one line naming the option and the problem, and no traceback;
* every output path is checked when the arguments are read, so a run never ends by losing its
  results to an unwritable path; files are written whole (a temporary file, then a rename) or not
  at all;
* a table goes to stdout as a table when stdout is a terminal, and without wrapping otherwise;
  `--format json|csv` gives its rows in that form, and the prose around it goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cpus import ConfigError

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "OneLineParser",
    "bounded",
    "check_output_path",
    "escape",
    "open_whole",
    "output_dir",
    "output_file",
    "output_image",
    "print_table",
    "stdout_console",
    "write_output",
]

FORMATS = ("table", "json", "csv")
#: what the plots can be written as (matplotlib decides by the file name)
IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
#: width of a console that is not a terminal: wide enough that no table of this tool wraps
PIPE_WIDTH = 250


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors on one line (`textpoke safety: error: argument --jobs: ...`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number (decimal, 0x.., underscores allowed) in [low, high]."""

    def parse(text: str) -> int:
        try:
            v = int(text.strip().replace("_", ""), 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be between {low:,} and {high:,}")
        return v

    parse.__name__ = f"whole number in [{low}, {high}]"
    return parse


def check_output_path(path: Path, option: str, directory: bool = False, suffixes: Sequence[str] = ()) -> Path:
    """Refuse, with a ConfigError naming `option`, an output path that cannot be written: an empty
    name, a file under something that is not a directory, a directory without write permission, an
    existing file that is not writable (or, for a device, refuses writes: /dev/full), a file where a
    directory is wanted or the other way round, a suffix the writer does not know."""
    if str(path) in ("", "."):
        if directory and str(path) == ".":
            pass
        else:
            raise ConfigError(f"{option} needs a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path}: the file name must end in {', '.join(suffixes)}")
    if path.exists():
        if directory:
            if not path.is_dir():
                raise ConfigError(f"{option} {path} exists and is not a directory")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"{option} {path}: no permission to write in this directory")
            return path
        if path.is_dir():
            raise ConfigError(f"{option} {path} is a directory")
        _probe_existing(path, option)
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{option} {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: no permission to create files in {ancestor}")
    return path


def _probe_existing(path: Path, option: str) -> None:
    mode = path.stat().st_mode
    if stat.S_ISFIFO(mode):
        return  # opening a pipe for a probe would wait for its reader
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError as err:
        raise ConfigError(f"{option} {path}: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(mode) and not os.isatty(fd):
            os.write(fd, b"")  # /dev/full refuses even an empty write
    except OSError as err:
        raise ConfigError(f"{option} {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _path_type(option: str, **kw: Any) -> Callable[[str], Path]:
    def parse(text: str) -> Path:
        try:
            return check_output_path(Path(text), option, **kw)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{option} ")) from None

    parse.__name__ = "output path"
    return parse


def output_file(option: str) -> Callable[[str], Path]:
    """An argparse type: a file this command will write, checked when the arguments are read."""
    return _path_type(option)


def output_image(option: str) -> Callable[[str], Path]:
    """An argparse type: a picture this command will draw (.png, .pdf or .svg)."""
    return _path_type(option, suffixes=IMAGE_SUFFIXES)


def output_dir(option: str) -> Callable[[str], Path]:
    """An argparse type: a directory this command will write into (made if missing)."""
    return _path_type(option, directory=True)


@contextmanager
def open_whole(path: Path | None) -> Iterator[IO[str] | None]:
    """A text file to write `path` through, made visible only when the block ends without an
    exception (a temporary file beside it, then a rename); None when `path` is None. A device or a
    pipe is written directly."""
    if path is None:
        yield None
        return
    if path.exists() and not path.is_file():
        with open(path, "w", encoding="utf-8") as fh:
            yield fh
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_output(path: Path, text: str) -> None:
    """Write `text` to `path` whole: a regular file through a temporary file and a rename, so a
    failure leaves no partial file; a device or pipe directly. Errors become ConfigError."""
    try:
        if path.exists() and not path.is_file():
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None


def stdout_console() -> Console:
    """The console for stdout: a terminal's width, or, for a pipe or file, wide enough that tables
    keep their rows on one line each."""
    probe = Console()
    if probe.is_terminal:
        return probe
    return Console(width=PIPE_WIDTH)


def print_table(
    out: Console,
    fmt: str,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    right: Sequence[str] = (),
    styles: Sequence[str | None] | None = None,
    style_col: int = 0,
) -> None:
    """Print a table: with rich on `out` (`fmt` "table"; `styles`, one per row, colour a row's cell
    `style_col`; cells are shown as they are, never read as markup), or its rows as JSON or CSV on
    stdout."""
    if fmt == "json":
        sys.stdout.write(json.dumps([dict(zip(columns, r, strict=True)) for r in rows], indent=2) + "\n")
        return
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        w.writerows(rows)
        sys.stdout.write(buf.getvalue())
        return
    table = Table(title=title, box=box.HEAVY_HEAD if out.is_terminal else box.ASCII)
    for c in columns:
        table.add_column(c, justify="right" if c in right else "left")
    for i, r in enumerate(rows):
        cells = [Text(_cell(x)) for x in r]
        if styles and styles[i]:
            cells[style_col].stylize(styles[i])  # type: ignore[arg-type]
        table.add_row(*cells)
    out.print(table)


def _cell(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:,.0f}"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}" if abs(x) >= 10_000 else str(x)
    return str(x)
