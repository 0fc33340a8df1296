"""The optprobe client: optimized kprobes, a jmp rel32 over whole instructions to a detour buffer.

Each traced function's optprobe range (`mov rax, rbx; shr rax, 7`: 7 bytes, the whole instructions
covering the 5 bytes of the jmp) is probed as Linux does it: a kprobe is registered on its first
instruction (int3, sync; its hits already run the detour's copy of the range), then, after a grace
period in which every CPU that could be inside the range leaves it, the probe is optimized: the jmp
is written with text_poke_bp over the armed int3. Unregistering undoes it in reverse: the jmp back to
int3 and the original tail (int3, sync, tail, sync), the original first byte (sync), a grace period,
the detour buffer freed. Probes are registered (and optimized) one after the other, and unregistered
likewise. Operations: `toggle` (register, unregister) and `enable` (register).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocols import INT3, PatchRequest
from . import Client, register
from .kprobe import _armed, check_probe_scenario

if TYPE_CHECKING:
    from ..image import KernelImage
    from ..patcher import Patcher, PatchReport
    from ..scenario import Scenario


def _sites(kernel: KernelImage) -> list[int]:
    return [a for a, _n in kernel.optprobe_ranges]


def _register(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    """register_kprobe for each probe, and the optimizer's pass after it: arm, then optimize."""
    report = None
    for s in targets:
        report = patcher.patch(patcher.kprobe_requests([s], arm=True), "kprobe", mutation=sc.mutation)
        if report.hung or report.incomplete:
            return report
        report = _optimize(patcher, [s], sc)
        if report is None or report.hung or report.incomplete:
            return report
    return report


def _unregister_all(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    """unregister_kprobe for each probe: unoptimize, then disarm and free."""
    report = None
    for s in targets:
        report = _unoptimize(patcher, [s], sc) or report
        if report is not None and (report.hung or report.incomplete):
            return report
        report = _unregister(patcher, [s], sc) or report
        if report is not None and (report.hung or report.incomplete):
            return report
    return report


def _optimize(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    sites = _armed(patcher, targets)
    if not sites:
        return None
    return patcher.patch(patcher.optprobe_requests(sites, optimize=True), sc.protocol, mutation=sc.mutation)


def _unoptimize(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    sites = [s for s in targets if patcher.m.read(s, 1) == b"\xe9" and patcher.kprobes.slot_of(s) is not None]
    if not sites:
        return None
    try:
        reqs = patcher.optprobe_requests(sites, optimize=False)
    except Exception:
        return None  # a garbled jmp (a broken run): the oracle has judged it already
    return patcher.patch(reqs, sc.protocol, mutation=sc.mutation)


def _unregister(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    sites = _armed(patcher, targets)
    if not sites:
        return None
    return patcher.patch(patcher.kprobe_requests(sites, arm=False), "kprobe", mutation=sc.mutation)


def _jmp_requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes]) -> list[PatchRequest]:
    return [PatchRequest(s, bytes([INT3]) + now[s][1:], b"\xe9\0\0\0\0") for s in targets]


def _unjmp_requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes]) -> list[PatchRequest]:
    return [PatchRequest(s, b"\xe9\0\0\0\0", bytes([INT3]) + kernel.patchable[s][1:]) for s in targets]


OPTPROBE = register(
    Client(
        name="optprobe",
        description="armed kprobe -> jmp rel32 to a detour buffer over the whole instructions it covers",
        sites=_sites,
        operations={
            "toggle": (("register", _register), ("unregister", _unregister_all)),
            "enable": (("register", _register),),
        },
        requests={"register": _jmp_requests, "unregister": _unjmp_requests},
        protocols=frozenset({"optprobe"}),
        also_runs=frozenset({"kprobe"}),
        kernel="asm",
        check=lambda sc: check_probe_scenario(sc, "optprobe"),
        extra={"probes": True},
    )
)
