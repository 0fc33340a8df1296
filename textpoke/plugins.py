"""Protocols and mutations from outside the package: one resolver for every name.

A protocol is a function from patch requests to steps (`textpoke.protocols`); a mutation is a function
from steps to steps. Wherever a command, a scenario or the pytest plugin takes a protocol or mutation
name, the name resolves here, in this order:

1. a built-in name (`PROTOCOLS`, `MUTATIONS`); built-ins cannot be overridden;
2. the name of an entry point of an installed distribution, in group ``textpoke.protocols`` or
   ``textpoke.mutations`` (found with `importlib.metadata`);
3. ``package.module:function``, imported directly. The current directory is searched after
   `sys.path`, as ``python -m`` would, so a ``my_protocol.py`` next to you works with the installed
   ``textpoke`` script too.

Only the name is stored in a `Scenario` and sent to worker processes (process pool or dask), which
resolve it again: a ``module:function`` must be importable there as well. A sweep's local process
pool inherits `sys.path`; a remote dask worker needs the module installed.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from cpus import ConfigError

from .protocols import MUTATIONS, PROTOCOLS

__all__ = [
    "MUTATION_GROUP",
    "PROTOCOL_GROUP",
    "Resolved",
    "available",
    "name_of",
    "resolve_mutation",
    "resolve_protocol",
]

PROTOCOL_GROUP = "textpoke.protocols"
MUTATION_GROUP = "textpoke.mutations"

_KINDS: dict[str, tuple[dict[str, Callable[..., Any]], str]] = {
    "protocol": (PROTOCOLS, PROTOCOL_GROUP),
    "mutation": (MUTATIONS, MUTATION_GROUP),
}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class Resolved:
    """A protocol or mutation function and where it came from."""

    kind: str  # "protocol" or "mutation"
    name: str  # as the user gave it
    function: Callable[..., Any]
    origin: str  # "built-in", "entry point NAME = VALUE (DIST)", or "module:function"

    @property
    def builtin(self) -> bool:
        return self.origin == "built-in"


def resolve_protocol(name: str) -> Resolved:
    """The protocol called `name`; `ConfigError` naming the choices when there is none."""
    return _resolve("protocol", name)


def resolve_mutation(name: str) -> Resolved:
    """The mutation called `name`; `ConfigError` naming the choices when there is none."""
    return _resolve("mutation", name)


def available(kind: str) -> tuple[list[str], list[str]]:
    """(built-in names, installed entry-point names) for "protocol" or "mutation"."""
    builtins, group = _KINDS[kind]
    return list(builtins), sorted({ep.name for ep in metadata.entry_points(group=group)} - set(builtins))


_cache: dict[tuple[str, str], Resolved] = {}


def _resolve(kind: str, name: str) -> Resolved:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a {kind} is named by a string, got {name!r}")
    hit = _cache.get((kind, name))
    if hit is not None:
        return hit
    builtins, group = _KINDS[kind]
    if name in builtins:
        found = Resolved(kind, name, builtins[name], "built-in")
    else:
        found = _from_entry_point(kind, group, name) or _from_dotted(kind, name)
    _cache[(kind, name)] = found
    return found


def _from_entry_point(kind: str, group: str, name: str) -> Resolved | None:
    eps = [ep for ep in metadata.entry_points(group=group) if ep.name == name]
    if not eps:
        return None
    values = {ep.value for ep in eps}  # one distribution seen twice on sys.path is not a conflict
    if len(values) > 1:
        owners = ", ".join(sorted(f"{_dist(ep)} ({ep.value})" for ep in eps))
        raise ConfigError(f"{kind} {name!r} is registered by more than one distribution: {owners}")
    ep = eps[0]
    try:
        fn = ep.load()
    except Exception as err:
        raise ConfigError(
            f"{kind} {name!r}: loading entry point {ep.value} ({_dist(ep)}) failed: {type(err).__name__}: {err}"
        ) from None
    _check_callable(kind, name, fn)
    return Resolved(kind, name, fn, f"entry point {name} = {ep.value} ({_dist(ep)})")


def _dist(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"


def _from_dotted(kind: str, name: str) -> Resolved:
    if not _DOTTED.match(name):
        builtins, entry = available(kind)
        raise ConfigError(
            f"unknown {kind} {name!r}; choose from {', '.join(builtins)}"
            + (f", the installed {', '.join(entry)}" if entry else "")
            + ", or give package.module:function"
        )
    module_name, _, qualname = name.partition(":")
    module = _import(kind, name, module_name)
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{kind} {name!r}: module {module_name!r} has no attribute {qualname!r}") from None
    _check_callable(kind, name, obj)
    return Resolved(kind, name, obj, name)


def _import(kind: str, name: str, module_name: str):
    for attempt in (0, 1):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            top = module_name.split(".")[0]
            missing = err.name or ""
            cwd = os.getcwd()
            if attempt == 0 and (missing == top or module_name.startswith(missing + ".")) and cwd not in sys.path:
                sys.path.append(cwd)  # as `python -m` would: the current directory, after everything else
                continue
            raise ConfigError(f"{kind} {name!r}: cannot import {module_name!r}: {err}") from None
        except Exception as err:
            raise ConfigError(
                f"{kind} {name!r}: importing {module_name!r} failed: {type(err).__name__}: {err}"
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _check_callable(kind: str, name: str, obj: Any) -> None:
    if not callable(obj):
        raise ConfigError(f"{kind} {name!r} is {type(obj).__name__}, not a function")


def name_of(kind: str, fn: Callable[..., Any]) -> str:
    """The ``module:function`` name of a protocol or mutation function, checked to resolve back to
    the same function (a lambda or a nested function has no such name)."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    name = f"{module}:{qualname}"
    if not module or "<" in qualname or not _DOTTED.match(name):
        raise ConfigError(f"{kind} {fn!r} has no importable name: define it at the top level of a module")
    if _resolve(kind, name).function is not fn:
        raise ConfigError(f"{kind} {name!r} does not import as the function given")
    return name
