"""The ftrace client: the 5-byte `call __fentry__` sites at every traced function's entry.

A site is the 5-byte nop while tracing is off and a call of the tracer (`ftrace_caller`, or
`ftrace_caller_alt` after a retarget) while it is on. Operations: `toggle` (enable, then disable),
`retarget` (enable, point every site at the other tracer, disable), `enable`, and `ftrace-linux`
(ftrace_modify_all_code's sequence: the trampoline's ftrace_call, the site batches, a sync round,
ftrace_call again).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..image import FTRACE_NOP, call_bytes
from ..protocols import PatchRequest
from . import Client, register

if TYPE_CHECKING:
    from ..image import KernelImage
    from ..patcher import Patcher, PatchReport
    from ..scenario import Scenario


def _sites(kernel: KernelImage) -> list[int]:
    return list(kernel.sites.values())  # in the kernel's order: the order they are watched in


def _kw(sc: Scenario) -> dict:
    return {"protocol": sc.protocol, "mutation": sc.mutation}


def _enabled(patcher: Patcher, targets: list[int]) -> list[int]:
    """The targets that hold a call now (a broken protocol may have left some sites garbled: those
    stay as they are, the oracle has already judged them)."""
    return [s for s in targets if patcher.m.read(s, 1) == b"\xe8"]


def _enable(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    return patcher.enable_ftrace(targets, **_kw(sc))


def _disable(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    sites = _enabled(patcher, targets)
    return patcher.disable_ftrace(sites, **_kw(sc)) if sites else None


def _retarget(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    return patcher.retarget(targets, **_kw(sc))


def _enable_linux(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    return patcher.ftrace_modify_all_code(True, targets, mutation=sc.mutation)


def _disable_linux(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    sites = _enabled(patcher, targets)
    return patcher.ftrace_modify_all_code(False, sites, mutation=sc.mutation) if sites else None


def _requests_to(tracer: str | None):
    def requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes]) -> list[PatchRequest]:
        new = FTRACE_NOP if tracer is None else None
        out = []
        for s in targets:
            after = new if new is not None else call_bytes(s, kernel.symbols[tracer])  # type: ignore[index]
            out.append(PatchRequest(s, now.get(s, FTRACE_NOP), after))
        return out

    return requests


def _check(sc: Scenario) -> None:
    from cpus import ConfigError

    if sc.operation == "ftrace-linux" and sc.protocol != "bp-batch":
        raise ConfigError("operation ftrace-linux patches with text_poke_bp as Linux does: use --protocol bp-batch")


FTRACE = register(
    Client(
        name="ftrace",
        description="5-byte nop <-> call ftrace_caller at every traced function's entry",
        sites=_sites,
        operations={
            "toggle": (("enable", _enable), ("disable", _disable)),
            "retarget": (("enable", _enable), ("retarget", _retarget), ("disable", _disable)),
            "enable": (("enable", _enable),),
            "ftrace-linux": (("enable-linux", _enable_linux), ("disable-linux", _disable_linux)),
        },
        requests={
            "enable": _requests_to("ftrace_caller"),
            "retarget": _requests_to("ftrace_caller_alt"),
            "disable": _requests_to(None),
        },
        check=_check,
    )
)
