"""The static-call client: Linux's inline static calls (HAVE_STATIC_CALL_INLINE) on x86.

A static call `name` has a key (`__SCK__name`, the current function), a trampoline (`__SCT__name`,
a 5-byte `jmp func`) and call sites: every `call __SCT__name` and tail `jmp __SCT__name` the
compiler emitted, recorded in `.static_call_sites` (see `textpoke.elfobj`). With inline static calls
the sites themselves are rewritten: a call site becomes `call func` (a 5-byte nop when func is
NULL), a tail call site and the trampoline become `jmp func` (`ret` padded with int3 when NULL).
static_call_update writes the key, then patches the trampoline, then every site, each with its own
text_poke_bp (__static_call_transform); a site that already holds the new instruction is left
alone.

The sites of this client are those of the first `--sites` static calls (of the kernel's, in the
order their trampolines are laid out: sc0, sc1, ... in the C kernel, which has 8), each static
call's trampoline first, then its sites by address. Operations:

* `retarget` (the default): every static call from its boot function A to another target B, then to
  NULL, then back to A: call -> call, call -> nop / jmp -> ret, and back;
* `toggle`: to NULL and back (works with the user's objects too, whose targets are not known);
* `retarget-unpadded`: `retarget`, but a tail site or trampoline set to NULL gets a lone `ret` over
  its first byte, the old tail left behind, as Linux 5.10 to 5.16 wrote it: no int3 padding.

Protocols: `bp` does what Linux does (one text_poke_bp per site, the trampoline first); `bp-batch`
patches every site of the step in one batch (Linux does not batch static calls; it shows what a
batched update would cost); `naive-bytes`, `naive-atomic` and `stop-machine` for comparison.

A site may sit anywhere in its function, also where code reaches it by falling through from the
instruction before it: the machine makes every watched site start a translated block of its own
(`cpus.machine.Machine.watch`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cpus import ConfigError
from cpus.layout import TEXT_VA

from ..image import FTRACE_NOP
from ..protocols import PatchRequest
from . import Client, register

if TYPE_CHECKING:
    from ..image import KernelImage
    from ..patcher import Patcher, PatchReport
    from ..scenario import Scenario

__all__ = ["StaticCall", "static_calls", "transform"]

#: what a NULL tail call site or trampoline becomes: ret, padded with int3 (Linux's retinsn)
RET_PADDED = bytes([0xC3, 0xCC, 0xCC, 0xCC, 0xCC])
PROTOCOLS = frozenset({"bp", "bp-batch", "naive-bytes", "naive-atomic", "stop-machine"})


@dataclass(frozen=True)
class StaticCall:
    """One static call: its trampoline and sites ((address, tail) each), and its key."""

    name: str
    key: int
    trampoline: int
    sites: tuple[tuple[int, bool], ...]

    @property
    def patched(self) -> tuple[tuple[int, bool], ...]:
        """Every place static_call_update rewrites, in its order: the trampoline (a tail jump), then
        the sites."""
        return ((self.trampoline, True), *self.sites)


def static_calls(kernel: KernelImage) -> list[StaticCall]:
    """The kernel's static calls that have a trampoline and a key, in trampoline order."""
    by_name: dict[str, list[tuple[int, bool]]] = {}
    keys: dict[str, int] = {}
    for c in kernel.static_calls:
        by_name.setdefault(c.name, []).append((c.addr, c.tail))
        keys[c.name] = c.key
    tramps = kernel.static_call_trampolines
    out = []
    for name, tramp in sorted(tramps.items(), key=lambda kv: kv[1]):
        key = keys.get(name, kernel.object_symbols.get(f"__SCK__{name}"))
        if key is None:
            continue
        out.append(StaticCall(name, key, tramp, tuple(sorted(by_name.get(name, [])))))
    return out


def chosen(kernel: KernelImage) -> list[StaticCall]:
    """The static calls this client patches: the first `--sites` (the kernel's nr_traced)."""
    return static_calls(kernel)[: kernel.config.nr_traced]


def transform(site: int, func: int | None, tail: bool, now: bytes | None = None) -> bytes:
    """The 5 bytes a static call site (or trampoline, `tail`) holds for `func` (None: NULL). Given
    `now`, a NULL tail site keeps its tail: a lone `ret` over the first byte, as Linux 5.10 to 5.16
    wrote it before it padded the `ret` with int3."""
    if func is None:
        if tail and now is not None:
            return b"\xc3" + now[1:]
        return RET_PADDED if tail else FTRACE_NOP
    rel = func - (site + 5)
    if not -(2**31) <= rel < 2**31:
        raise ConfigError(f"static call site {site:#x} cannot reach {func:#x}")
    return bytes([0xE9 if tail else 0xE8]) + struct.pack("<i", rel)


# ------------------------------------------------------------------------------------------------
# Sites
# ------------------------------------------------------------------------------------------------
def _sites(kernel: KernelImage) -> list[int]:
    return [addr for call in chosen(kernel) for addr, _tail in call.patched]


# ------------------------------------------------------------------------------------------------
# Operations
# ------------------------------------------------------------------------------------------------
#: chooses, for a static call, the function a step sets it to (None: NULL)
Choice = Callable[["KernelImage", StaticCall], "int | None"]


def _boot_func(kernel: KernelImage, call: StaticCall) -> int:
    """The function the trampoline jumps to at boot (the key's initial value)."""
    t = call.trampoline - TEXT_VA
    return (call.trampoline + 5 + struct.unpack("<i", kernel.text[t + 1 : t + 5])[0]) & (2**64 - 1)


def _other_target(kernel: KernelImage, call: StaticCall) -> int:
    """The C kernel's second target of this static call (sct_K_1 for scK)."""
    k = call.name[2:]
    name = f"sct_{k}_1"
    if not call.name.startswith("sc") or name not in kernel.symbols:
        raise ConfigError(f"static call {call.name} has no known second target: use --operation toggle")
    return kernel.symbols[name]


def _updates(kernel: KernelImage, targets: list[int], now: dict[int, bytes], choose: Choice, padded: bool = True):
    """Per static call touched by `targets`: (key, func, requests in static_call_update's order)."""
    want = set(targets)
    out = []
    for call in chosen(kernel):
        mine = [(a, tail) for a, tail in call.patched if a in want]
        if not mine:
            continue
        func = choose(kernel, call)
        reqs = []
        for addr, tail in mine:
            new = transform(addr, func, tail, None if padded else now[addr])
            if now[addr] != new:  # __static_call_transform leaves a site that already says it alone
                reqs.append(PatchRequest(addr, now[addr], new))
        out.append((call.key, func, reqs))
    return out


def _requests(choose: Choice, padded: bool = True):
    def requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes]) -> list[PatchRequest]:
        return [r for _key, _func, reqs in _updates(kernel, targets, now, choose, padded) for r in reqs]

    return requests


def _op(choose: Choice, padded: bool = True):
    def op(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
        m = patcher.m
        now = {s: m.read(s, 5) for s in targets}
        updates = _updates(patcher.kernel, targets, now, choose, padded)
        reqs = [r for _k, _f, rs in updates for r in rs]
        if not reqs:
            return None
        # the keys first (static_call_update sets key->func before it patches any text); nothing in
        # the model reads them, they are written for fidelity and for whoever inspects the data
        for key, func, _rs in updates:
            m.write(key, struct.pack("<Q", func or 0))
        # bp-batch: one batch (the queue needs ascending sites); else, as Linux, a text_poke_bp per
        # site, the trampoline first
        batch = sc.protocol == "bp-batch"
        parts = [sorted(reqs, key=lambda r: r.site)] if batch else [[r] for r in reqs]
        return patcher.patch_in_turn(parts, sc.protocol, sc.mutation)

    return op


def _to_other(kernel: KernelImage, call: StaticCall) -> int | None:
    return _other_target(kernel, call)


def _to_null(kernel: KernelImage, call: StaticCall) -> int | None:
    return None


def _to_boot(kernel: KernelImage, call: StaticCall) -> int | None:
    return _boot_func(kernel, call)


def _check(sc: Scenario) -> None:
    if sc.operation.startswith("retarget") and sc.objects:
        raise ConfigError("retarget needs the C kernel's known targets; with --object use --operation toggle")


STATIC_CALL = register(
    Client(
        name="static-call",
        description="inline static calls: call/jmp func <-> another func <-> nop/ret (sites and trampolines)",
        sites=_sites,
        operations={
            "retarget": (("retarget", _op(_to_other)), ("null", _op(_to_null)), ("restore", _op(_to_boot))),
            "toggle": (("null", _op(_to_null)), ("restore", _op(_to_boot))),
            "retarget-unpadded": (
                ("retarget", _op(_to_other)),
                ("null-unpadded", _op(_to_null, padded=False)),
                ("restore", _op(_to_boot)),
            ),
        },
        requests={
            "retarget": _requests(_to_other),
            "null": _requests(_to_null),
            "null-unpadded": _requests(_to_null, padded=False),
            "restore": _requests(_to_boot),
        },
        protocols=PROTOCOLS,
        kernel="c",
        default_operation="retarget",
        check=_check,
    )
)
