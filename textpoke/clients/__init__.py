"""Patch clients: the kinds of text Linux rewrites live, each with its sites and its operations.

Linux patches live text for several subsystems. Each is a *client* of the patching machinery: it
knows where its sites are (ftrace's `__mcount_loc`, the `__jump_table`, the static call sites,
kprobe addresses), what an operation turns them into (a call to the tracer, a jmp to the branch,
a call to the new function, an int3) and which protocols it may be patched with. The scenario
(`textpoke.scenario`) asks its client for the sites to observe and the operations to perform; the
patcher (`textpoke.patcher`) and the oracle (`textpoke.oracle`) do not depend on the client.

A client is registered in `CLIENTS` under the name `--client` takes. Each operation of a client
is a function of the patcher and the target sites that returns the operation's `PatchReport` (or
None when there was nothing to do), and `requests` gives the requests an operation would make, so
that a protocol from outside the package can be checked before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cpus import ConfigError

if TYPE_CHECKING:
    from ..image import KernelImage
    from ..patcher import Patcher, PatchReport
    from ..protocols import PatchRequest
    from ..scenario import Scenario

__all__ = ["CLIENTS", "Client", "resolve_client"]

#: op(patcher, targets, scenario) -> its report, or None when there was nothing to do
OpFunction = Callable[["Patcher", list[int], "Scenario"], "PatchReport | None"]
#: requests(kernel, targets, now) -> (requests, bytes after): what an operation asks for, from `now`
RequestsFunction = Callable[["KernelImage", list[int], dict[int, bytes]], "list[PatchRequest]"]


@dataclass(frozen=True)
class Client:
    """One kind of patch site and what a scenario does to it.

    `sites(kernel)`: every site of this client in `kernel`, in a stable order (the `--sites`/
    `patch_sites` indices count in it); `operations`: operation name (`--operation`) -> the steps of
    the scenario, each a (name, function) pair performed in order; `requests`: step name -> the
    requests that step makes (used to check protocols from outside the package before a run);
    `protocols`: the built-in protocols that apply (None: every one); `kernel`: the built-in kernel
    this client's sites exist in when no objects are given (None: the scenario's choice)."""

    name: str
    description: str
    sites: Callable[[KernelImage], list[int]]
    operations: dict[str, tuple[tuple[str, OpFunction], ...]]
    requests: dict[str, RequestsFunction] = field(default_factory=dict)
    protocols: frozenset[str] | None = None
    kernel: str | None = None
    default_operation: str = "toggle"
    #: built-in protocols the operations run besides the scenario's own (an optprobe is registered
    #: as a kprobe first): a mutation of one of them changes the run as well
    also_runs: frozenset[str] = frozenset()
    #: extra per-scenario checks (raise ConfigError)
    check: Callable[[Scenario], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_protocol(self) -> str:
        """bp-batch where it applies, else the client's own protocol (kprobe, optprobe)."""
        if self.protocols is None or "bp-batch" in self.protocols:
            return "bp-batch"
        return min(self.protocols)

    def targets(self, sc: Scenario, kernel: KernelImage) -> list[int]:
        """The sites the scenario patches: all of this client's sites, or those `patch_sites` names."""
        sites = self.sites(kernel)
        if not sites:
            raise ConfigError(f"this kernel has no {self.name} sites")
        if sc.patch_sites is None:
            return sorted(sites)
        bad = [i for i in sc.patch_sites if not 0 <= i < len(sites)]
        if bad:
            raise ConfigError(f"patch_sites {bad} name no {self.name} site (0..{len(sites) - 1})")
        return sorted(sites[i] for i in set(sc.patch_sites))


CLIENTS: dict[str, Client] = {}


def register(client: Client) -> Client:
    if client.name in CLIENTS:
        raise ValueError(f"client {client.name!r} registered twice")
    CLIENTS[client.name] = client
    return client


def resolve_client(name: str) -> Client:
    _load_builtin()
    try:
        return CLIENTS[name]
    except KeyError:
        raise ConfigError(f"unknown client {name!r}; choose from {', '.join(CLIENTS)}") from None


def client_names() -> list[str]:
    _load_builtin()
    return list(CLIENTS)


_builtin_loaded = False


def _load_builtin() -> None:
    # a flag, not `if CLIENTS`: importing one client module first must not hide the others
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    from . import ftrace, jump_label, kprobe, optprobe, static_call  # noqa: F401  (each registers itself)


def steps_of(client: Client, operation: str) -> Sequence[tuple[str, OpFunction]]:
    if operation not in client.operations:
        raise ConfigError(
            f"client {client.name} has no operation {operation!r}; choose from {', '.join(client.operations)}"
        )
    return client.operations[operation]
