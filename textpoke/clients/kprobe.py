"""The kprobe client: an int3 on the first byte of one instruction in the body of every traced
function (the kernel's kprobe points, `textpoke.image.probe_points`), boosted out of line.

The probe point of a traced function is the first instruction of its body (`mov rbx, rdi`, after
the ftrace site, the prologue's push and the jump that starts a block), never its ftrace site. The
kernel is built with probes (CONFIG_KPROBES: the kprobe handler after the descriptors in the #BP
chain, the kprobe table, the instruction slots). Operations: `toggle` (register every probe, then
unregister them) and `enable` (register). Patched with the `kprobe` protocol only: Linux's one-byte
path (int3, sync; the original byte, sync), slots freed after a grace period.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cpus import ConfigError

from ..image import KPROBE_MAX
from ..protocols import INT3, PatchRequest
from . import Client, register

if TYPE_CHECKING:
    from ..image import KernelImage
    from ..patcher import Patcher, PatchReport
    from ..scenario import Scenario


def _sites(kernel: KernelImage) -> list[int]:
    return [a for a, _n in kernel.kprobe_points]


def _armed(patcher: Patcher, targets: list[int]) -> list[int]:
    """The targets that hold exactly an armed probe now (a broken run may have left others garbled)."""
    k = patcher.kernel.patchable
    return [s for s in targets if patcher.m.read(s, len(k[s])) == bytes([INT3]) + k[s][1:]]


def _register(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    return patcher.patch(patcher.kprobe_requests(targets, arm=True), "kprobe", mutation=sc.mutation)


def _unregister(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
    sites = _armed(patcher, targets)
    if not sites:
        return None
    return patcher.patch(patcher.kprobe_requests(sites, arm=False), "kprobe", mutation=sc.mutation)


def _arm_requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes]) -> list[PatchRequest]:
    return [PatchRequest(s, now[s], bytes([INT3]) + now[s][1:]) for s in targets]


def _disarm_requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes]) -> list[PatchRequest]:
    return [PatchRequest(s, now[s], kernel.patchable[s]) for s in targets]


def check_probe_scenario(sc: Scenario, name: str) -> None:
    """What a probe client refuses (shared with the optprobe client)."""
    if sc.objects:
        raise ConfigError(f"client {name} probes the built-in assembly kernel's traced functions; drop --object")
    if sc.int3 != "emulate":
        raise ConfigError(f"client {name} runs with the #BP entry Linux has (--int3 emulate), not {sc.int3}")
    count = len(sc.patch_sites) if sc.patch_sites is not None else sc.sites
    if count > KPROBE_MAX:
        raise ConfigError(f"client {name} holds at most {KPROBE_MAX} probes at once; use --sites {KPROBE_MAX} or fewer")


KPROBE = register(
    Client(
        name="kprobe",
        description="int3 on one instruction in every traced function's body, run out of line from a slot",
        sites=_sites,
        operations={
            "toggle": (("register", _register), ("unregister", _unregister)),
            "enable": (("register", _register),),
        },
        requests={"register": _arm_requests, "unregister": _disarm_requests},
        protocols=frozenset({"kprobe"}),
        kernel="asm",
        check=lambda sc: check_probe_scenario(sc, "kprobe"),
        extra={"probes": True},
    )
)
