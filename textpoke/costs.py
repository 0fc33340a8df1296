"""The cost model from the command line and config files.

A config file is TOML with a `[costs]` table, e.g.::

    [costs]
    ipi_latency = 2400
    text_write = 3000

and `--cost NAME=CYCLES` overrides single entries. Unknown names and bad values are errors that
name them.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import tomllib

from cpus import ConfigError, CostModel

__all__ = ["COST_NAMES", "load_costs"]

COST_NAMES = tuple(f.name for f in fields(CostModel))


def load_costs(config: Path | None = None, overrides: list[str] | None = None) -> CostModel:
    """The default cost model with the `[costs]` table of `config` and then each `--cost NAME=CYCLES`
    applied; every error names the file or the option it comes from."""
    values: dict[str, int] = {}
    origin: dict[str, str] = {}
    if config is not None:
        for k, v in _read_costs_table(Path(config)).items():
            values[k] = v
            origin[k] = f"config file {config}: costs.{k}"
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--cost {item!r}: write NAME=CYCLES, e.g. ipi_latency=2400")
        try:
            values[name.strip()] = int(value.strip().replace("_", ""), 0)
        except ValueError:
            raise ConfigError(f"--cost {item!r}: {value!r} is not a whole number of cycles") from None
        origin[name.strip()] = f"--cost {item}"
    unknown = set(values) - set(COST_NAMES)
    if unknown:
        where = "; ".join(sorted(origin[k] for k in unknown))
        raise ConfigError(f"unknown cost(s) {', '.join(sorted(unknown))} ({where}); known: {', '.join(COST_NAMES)}")
    for k, v in values.items():
        try:
            replace(CostModel(), **{k: v})
        except ConfigError as err:
            raise ConfigError(f"{origin[k]}: {err}") from None
    return replace(CostModel(), **values)


def _read_costs_table(path: Path) -> dict[str, object]:
    """The `[costs]` table of a TOML file, or a ConfigError naming the file and what is wrong."""
    if str(path) in ("", "."):
        raise ConfigError("--config needs a file name")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    unknown_tables = set(data) - {"costs"}
    if unknown_tables:
        raise ConfigError(f"config file {path}: unknown table(s) {', '.join(sorted(unknown_tables))}")
    costs = data.get("costs", {})
    if not isinstance(costs, dict):
        raise ConfigError(f"config file {path}: costs must be a table ([costs] with NAME = CYCLES lines)")
    return costs
