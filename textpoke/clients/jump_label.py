"""The jump-label client: static keys, whose sites are jmps or nops in the middle of functions.

A static branch compiles to one instruction recorded in `__jump_table` (`textpoke.elfobj.JumpEntry`):
a jmp to the branch, 2 bytes (`eb` rel8) when the branch is near and 5 (`e9` rel32) when it is not,
or a nop of the same size (`66 90`, `0f 1f 44 00 00`). The entry's site holds the jmp exactly when
its key's state differs from the entry's default (Linux: `static_key_enabled(key) ^ branch`), so
switching a key rewrites each of its entries from the nop to the jmp or back.

Sites: the jump entries of the first `--sites` keys. In the built-in C kernel key n
(`textpoke_jl_keys[n]`, n < 64) has one entry, in fn_n, so `--sites N` patches N entries of N keys;
the workload calls the same N functions. With the user's objects: every entry, ordered by key.

Operations: `toggle` (enable the keys, then disable them) and `enable`. Protocols: `bp` is
text_poke_bp one entry at a time (three syncs each: static_key_enable on a kernel without batched
jump-label updates), `bp-batch` is the batched update (arch_jump_label_transform_queue for every
entry, then arch_jump_label_transform_apply: three syncs per batch of up to 256 ascending entries).
Linux batches the entries of one key at a time; here the entries of every key switched are queued
together, which is Linux's batch for a single key that has that many entries (Bristot's
sched_schedstats, 56 entries). The unsafe protocols are there to be caught.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cpus import ConfigError

from ..elfobj import JUMP_NOPS
from ..image import JL_KEY_SIZE, JL_KEYS, JL_KEYS_SYMBOL
from ..protocols import PatchRequest
from . import Client, register

if TYPE_CHECKING:
    from ..elfobj import JumpEntry
    from ..image import KernelImage
    from ..patcher import Patcher, PatchReport
    from ..scenario import Scenario

__all__ = ["JUMP_LABEL", "jump_bytes", "key_index"]


def key_index(kernel: KernelImage, entry: JumpEntry) -> int | None:
    """The built-in C kernel's index of the entry's key (None for other kernels)."""
    base = kernel.object_symbols.get(JL_KEYS_SYMBOL) if kernel.config.kernel == "c" else None
    if base is None:
        return None
    return (entry.key - base) // JL_KEY_SIZE


def _entries(kernel: KernelImage) -> list[JumpEntry]:
    """The entries this client patches, in `--sites` order."""
    if kernel.config.kernel == "c":
        keys = min(kernel.config.nr_traced, JL_KEYS)
        mine = [(key_index(kernel, e), e.code, e) for e in kernel.jump_entries]
        return [e for i, _c, e in sorted(mine, key=lambda t: (t[0], t[1])) if i is not None and i < keys]
    return sorted(kernel.jump_entries, key=lambda e: (e.key, e.code))


def _sites(kernel: KernelImage) -> list[int]:
    return [e.code for e in _entries(kernel)]


def jump_bytes(entry: JumpEntry, jump: bool) -> bytes:
    """The entry's instruction: the jmp to its target, or the nop, in the entry's size."""
    if not jump:
        return JUMP_NOPS[entry.length]
    rel = entry.target - (entry.code + entry.length)
    if entry.length == 2:
        return b"\xeb" + struct.pack("<b", rel)
    return b"\xe9" + struct.pack("<i", rel)


def _requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes], enabled: bool) -> list[PatchRequest]:
    """What switching the targets' keys to `enabled` rewrites: each entry whose bytes change."""
    by_site = {e.code: e for e in kernel.jump_entries}
    boot = kernel.patchable
    out = []
    for s in targets:
        e = by_site[s]
        old = now.get(s, boot[s])
        new = jump_bytes(e, enabled != e.branch)
        if new != old:
            out.append(PatchRequest(s, old, new))
    return out


def _switch(enabled: bool):
    def op(patcher: Patcher, targets: list[int], sc: Scenario) -> PatchReport | None:
        kernel = patcher.kernel
        boot = kernel.patchable
        now = {s: patcher.m.read(s, len(boot[s])) for s in targets}
        reqs = _requests(kernel, targets, now, enabled)
        if not reqs:
            return None
        report = patcher.patch(reqs, protocol=sc.protocol, mutation=sc.mutation)
        if report.hung is None and report.incomplete is None:
            # static_key_enable/disable: the key's state follows its entries
            by_site = {e.code: e for e in kernel.jump_entries}
            for key in sorted({by_site[s].key for s in targets}):
                patcher.m.write(key, struct.pack("<i", int(enabled)))
        return report

    return op


def _requests_for(enabled: bool):
    def requests(kernel: KernelImage, targets: list[int], now: dict[int, bytes]) -> list[PatchRequest]:
        return _requests(kernel, targets, now, enabled)

    return requests


def _check(sc: Scenario) -> None:
    if not sc.objects and sc.sites > JL_KEYS:
        raise ConfigError(
            f"the C kernel has {JL_KEYS} static keys (one jump label each): use --sites {JL_KEYS} or fewer"
        )


JUMP_LABEL = register(
    Client(
        name="jump-label",
        description="static keys: 2- or 5-byte nop <-> jmp to the branch, in the middle of functions",
        sites=_sites,
        operations={
            "toggle": (("enable", _switch(True)), ("disable", _switch(False))),
            "enable": (("enable", _switch(True)),),
        },
        requests={"enable": _requests_for(True), "disable": _requests_for(False)},
        protocols=frozenset({"bp", "bp-batch", "stop-machine", "naive-bytes", "naive-atomic"}),
        kernel="c",
        check=_check,
    )
)
