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
    values: dict[str, int] = {}
    if config is not None:
        try:
            data = tomllib.loads(Path(config).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {config} does not exist") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {config} is not valid TOML: {err}") from None
        unknown_tables = set(data) - {"costs"}
        if unknown_tables:
            raise ConfigError(f"config file {config}: unknown table(s) {', '.join(sorted(unknown_tables))}")
        for k, v in data.get("costs", {}).items():
            values[k] = v
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--cost {item!r}: write NAME=CYCLES, e.g. ipi_latency=2400")
        try:
            values[name.strip()] = int(value, 0)
        except ValueError:
            raise ConfigError(f"--cost {item!r}: {value!r} is not a whole number of cycles") from None
    unknown = set(values) - set(COST_NAMES)
    if unknown:
        raise ConfigError(f"unknown cost(s) {', '.join(sorted(unknown))}; known: {', '.join(COST_NAMES)}")
    return replace(CostModel(), **values)
