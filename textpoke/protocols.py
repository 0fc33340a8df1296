"""Patch protocols as plain step sequences.

This module imports nothing from the machine: a protocol is a function from patch requests to a
tuple of steps, so it can be printed, compared, mutated and explored without an emulator. The
patcher (`textpoke.patcher`) performs the steps on a machine; the explorer walks them abstractly.

Steps
-----
``Publish``     make the #BP handler's descriptor table live (the int3 protocols only)
``Poke``        one store of bytes into text at ``site + offset``
``Sync``        IPI every other CPU and wait until each has taken it (and so serialized)
``Withdraw``    drop the patcher's reference on the descriptors and wait for in-flight handlers
``Rendezvous``  stop_machine: wake every other CPU's stopper, then pass multi_cpu_stop's PREPARE
                and DISABLE_IRQ barriers with them (the caller takes part) and enter RUN
``Release``     stop_machine: acknowledge RUN, pass the EXIT barrier, wait until every stopper is done
``ModCode``     stop_machine ftrace (2.6.28-3.4): one site written with NMIs in mind -- wait until no
                NMI runs while publishing the write to NMIs, write, withdraw it, wait for NMIs again
``KprobeRegister`` / ``KprobeUnregister`` / ``FreeSlot``  a probe's out-of-line copy and kprobe table
                entry made, the entry unlinked, the slot poisoned for reuse (the kprobe protocols)
``GracePeriod`` synchronize_rcu(_tasks): wait until every other CPU passed a quiescent point

text_poke_bp, as Linux does it (arch/x86/kernel/alternative.c), for one site or a batch:

    Publish
    step 1: Poke int3 on the first byte of every site        Sync("int3")
    step 2: Poke the tail of every site whose tail changes   Sync("tail")   (only if any)
    step 3: Poke the new first byte of every site            Sync("first")
    Withdraw

Protocols from outside the package are functions of the same shape, registered by entry point or
named as ``module:function`` (`textpoke.plugins`); their steps are checked before anything runs
(`textpoke.stepcheck`, which also lists the known Poke phases and Sync labels).

Linux rewrites and syncs the tail whenever the instruction is longer than one byte, even when the
tail does not change; this project skips the tail step for such sites, as its design asks (a
call -> call retarget keeps its opcode but not its tail, so it still has all three steps).

Batches are Linux's queue (text_poke_queue): requests are taken in the order given, and the batch is
flushed (performed) when it holds TEXT_POKE_ARRAY_MAX entries or when the next address is below the
last one queued, so every batch is ascending and the #BP handler can binary-search it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "BP_MUTATIONS",
    "INT3",
    "INT3_PROTOCOLS",
    "MUTATIONS",
    "PROBE_MUTATIONS",
    "PROBE_PROTOCOLS",
    "PROTOCOLS",
    "STOP_MACHINE_MUTATIONS",
    "TEXT_POKE_ARRAY_MAX",
    "FreeSlot",
    "GracePeriod",
    "KprobeRegister",
    "KprobeUnregister",
    "ModCode",
    "PatchRequest",
    "Poke",
    "Publish",
    "Release",
    "Rendezvous",
    "Step",
    "Sync",
    "Withdraw",
    "build",
    "describe_steps",
    "ftrace_modify_all_code",
    "mutate",
    "naive_atomic",
    "naive_bytes",
    "queue_batches",
    "stop_machine",
    "stop_machine_ftrace",
    "text_poke_bp",
    "text_poke_bp_batch",
]

INT3 = 0xCC


@dataclass(frozen=True, slots=True)
class PatchRequest:
    """Replace the instruction `old` at `site` with `new` (same length)."""

    site: int
    old: bytes
    new: bytes

    def __post_init__(self) -> None:
        if len(self.old) != len(self.new) or not self.old:
            raise ValueError(f"site {self.site:#x}: old and new must be non-empty and of the same length")


@dataclass(frozen=True, slots=True)
class Publish:
    requests: tuple[PatchRequest, ...]


@dataclass(frozen=True, slots=True)
class Poke:
    site: int
    offset: int
    data: bytes
    phase: str  # "int3", "tail", "first", "write" (stop_machine / naive)
    #: the rest of the previous Poke's copy (one text_poke whose memcpy stores in pieces): it costs
    #: the agent a store, not another text_poke
    part: bool = False

    @property
    def addr(self) -> int:
        return self.site + self.offset


@dataclass(frozen=True, slots=True)
class Sync:
    label: str
    #: the function also runs on the sending CPU (on_each_cpu); False: others only (smp_call_function)
    local: bool = True


@dataclass(frozen=True, slots=True)
class Withdraw:
    pass


@dataclass(frozen=True, slots=True)
class Rendezvous:
    pass


@dataclass(frozen=True, slots=True)
class Release:
    pass


@dataclass(frozen=True, slots=True)
class ModCode:
    """do_ftrace_mod_code: write `data` at `site` under stop_machine, with NMIs in mind. With
    `nmi_write` the write is published to NMIs (nmi_running's flag), so an NMI that starts meanwhile
    performs it itself before its handler runs; without it (the `no-nmi-write` mutation) NMIs are
    only waited for."""

    site: int
    data: bytes
    nmi_write: bool = True


@dataclass(frozen=True, slots=True)
class KprobeRegister:
    """Prepare the probe at `site`: copy its instruction(s) out of line (a boosted slot, or an
    optprobe's detour buffer; a text write) and enter it in the kprobe table the #BP handler reads."""

    site: int


@dataclass(frozen=True, slots=True)
class KprobeUnregister:
    """Take the probe at `site` out of the kprobe table (its int3 must already be gone)."""

    site: int


@dataclass(frozen=True, slots=True)
class GracePeriod:
    """synchronize_rcu(_tasks): wait until every other CPU has passed a quiescent point, so none can
    still be inside (or interrupted inside) code the next steps free or overwrite."""

    label: str  # "slots" (before freeing out-of-line slots), "optimize" (before writing the jmp)


@dataclass(frozen=True, slots=True)
class FreeSlot:
    """Free the out-of-line slot of the probe at `site`: poison it with int3 for reuse."""

    site: int


Step = (
    Publish | Poke | Sync | Withdraw | Rendezvous | Release | ModCode | KprobeRegister | KprobeUnregister | GracePeriod
) | FreeSlot

#: entries per batch (Linux: TP_VEC_MAX / TEXT_POKE_ARRAY_MAX, a page of 16-byte entries)
TEXT_POKE_ARRAY_MAX = 256


def queue_batches(requests: Sequence[PatchRequest]) -> list[tuple[PatchRequest, ...]]:
    """Split requests, in the order given, into the batches Linux's queue would flush: a batch ends
    when it is full or when the next address is lower than the last one queued."""
    batches: list[tuple[PatchRequest, ...]] = []
    cur: list[PatchRequest] = []
    for r in requests:
        if cur and (len(cur) == TEXT_POKE_ARRAY_MAX or r.site < cur[-1].site):
            batches.append(tuple(cur))
            cur = []
        cur.append(r)
    if cur:
        batches.append(tuple(cur))
    return batches


def text_poke_bp_batch(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Three syncs per batch, whatever its size; batches as Linux's queue flushes them."""
    out: list[Step] = []
    for batch in queue_batches(requests):
        out += _one_batch(batch)
    return tuple(out)


def _one_batch(reqs: tuple[PatchRequest, ...]) -> list[Step]:
    steps: list[Step] = [Publish(reqs)]
    steps += [Poke(r.site, 0, bytes([INT3]), "int3") for r in reqs]
    steps.append(Sync("int3"))
    tails = [Poke(r.site, 1, r.new[1:], "tail") for r in reqs if len(r.new) > 1 and r.new[1:] != r.old[1:]]
    if tails:
        steps += tails
        steps.append(Sync("tail"))
    firsts = [Poke(r.site, 0, r.new[:1], "first") for r in reqs if r.new[0] != INT3]
    if firsts:
        steps += firsts
        steps.append(Sync("first"))
    steps.append(Withdraw())
    return steps


def text_poke_bp(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """One site at a time: a batch of one per request (three syncs each)."""
    out: list[Step] = []
    for r in sorted(requests, key=lambda r: r.site):
        out += _one_batch((r,))
    return tuple(out)


def stop_machine(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Stop every other CPU, write every instruction with one text_poke each, let them go.
    text_poke copies with memcpy, which is not one atomic store: a 5-byte instruction is stored as
    4 bytes, then 1 (as do_ftrace_mod_code's copy in `stop_machine_ftrace`)."""
    out: list[Step] = [Rendezvous()]
    for r in sorted(requests, key=lambda r: r.site):
        out += _copy(r.site, r.new)
    out.append(Release())
    return tuple(out)


def _copy(site: int, new: bytes) -> list[Step]:
    if len(new) <= 4:
        return [Poke(site, 0, new, "write")]
    return [Poke(site, 0, new[:4], "write"), Poke(site, 4, new[4:], "write", part=True)]


def stop_machine_ftrace(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """x86 ftrace from 2.6.28 to 3.4: stop_machine, and each site written by do_ftrace_mod_code,
    which NMIs on any CPU help with (ftrace_nmi_enter performs a pending write itself)."""
    reqs = sorted(requests, key=lambda r: r.site)
    return (Rendezvous(), *(ModCode(r.site, r.new) for r in reqs), Release())


def ftrace_modify_all_code(
    trampoline_first: PatchRequest,
    sites: Sequence[PatchRequest],
    trampoline_last: PatchRequest | None,
) -> tuple[Step, ...]:
    """ftrace_modify_all_code as Linux sequences it on x86: point the trampoline's ftrace_call at
    the ops list function (one text_poke_bp, three syncs), patch the sites in queued batches, then,
    when the final tracer function is not the list function, a sync round on the other CPUs
    (smp_call_function(ftrace_sync_ipi)) and one more text_poke_bp of ftrace_call."""
    steps: list[Step] = [*text_poke_bp([trampoline_first]), *text_poke_bp_batch(sites)]
    if trampoline_last is not None:
        steps.append(Sync("ftrace-sync-ipi", local=False))
        steps += text_poke_bp([trampoline_last])
    return tuple(steps)


def naive_bytes(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Unsafe: every changed byte stored on its own, no sync at all."""
    out: list[Step] = []
    for r in sorted(requests, key=lambda r: r.site):
        out += [Poke(r.site, i, r.new[i : i + 1], "write") for i in range(len(r.new)) if r.new[i] != r.old[i]]
    return tuple(out)


def naive_atomic(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Unsafe: each instruction in one atomic store, no sync."""
    return tuple(Poke(r.site, 0, r.new, "write") for r in sorted(requests, key=lambda r: r.site))


def _arms(r: PatchRequest) -> bool:
    return r.new[0] == INT3 and r.old[0] != INT3 and r.new[1:] == r.old[1:]


def _disarms(r: PatchRequest) -> bool:
    return r.old[0] == INT3 and r.new[0] != INT3 and r.new[1:] == r.old[1:]


def kprobe(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Linux's kprobe arming and disarming: one byte, written alone, then a sync (text_poke and
    text_poke_sync), with no descriptors (the kprobe table owns the int3). Arm: prepare the probe,
    write int3, sync. Disarm, one probe at a time (unregister_kprobe): write the original first byte
    back, sync, unlink the probe, wait for a grace period, free its slot."""
    bad = [r for r in requests if not (_arms(r) or _disarms(r))]
    if bad:
        raise ValueError(
            f"site {bad[0].site:#x}: the kprobe protocol only inserts an int3 over the first byte of an "
            f"instruction or removes one ({bad[0].old.hex(' ')} -> {bad[0].new.hex(' ')} is neither)"
        )
    steps: list[Step] = []
    for r in sorted(filter(_arms, requests), key=lambda r: r.site):
        steps += [KprobeRegister(r.site), Poke(r.site, 0, bytes([INT3]), "int3"), Sync("int3")]
    for r in sorted(filter(_disarms, requests), key=lambda r: r.site):
        steps += [Poke(r.site, 0, r.new[:1], "first"), Sync("first"), KprobeUnregister(r.site)]
        steps += [GracePeriod("slots"), FreeSlot(r.site)]
    return tuple(steps)


def optprobe(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Optimizing armed kprobes, and undoing it (kprobe_optimizer). Optimize (the site holds the
    probe's int3, the new bytes are a jmp rel32 to its detour): wait for a grace period
    (synchronize_rcu_tasks: no CPU may still be interrupted inside a range), then text_poke_bp each
    jmp (arch_optimize_kprobes). Unoptimize (jmp -> int3 and the original tail; the kprobe owns the int3):
    int3, sync, the tail, sync, per probe (arch_unoptimize_kprobe)."""
    opt = sorted((r for r in requests if r.old[0] == INT3 and r.new[0] == 0xE9), key=lambda r: r.site)
    unopt = sorted((r for r in requests if r.old[0] == 0xE9 and r.new[0] == INT3), key=lambda r: r.site)
    if len(opt) + len(unopt) != len(requests):
        bad = next(r for r in requests if r not in opt and r not in unopt)
        raise ValueError(
            f"site {bad.site:#x}: the optprobe protocol turns an armed kprobe (cc ...) into a jmp rel32 "
            f"or back ({bad.old.hex(' ')} -> {bad.new.hex(' ')} is neither)"
        )
    steps: list[Step] = []
    if opt:
        steps.append(GracePeriod("optimize"))
        steps += text_poke_bp(opt)
    for r in unopt:
        steps += [Poke(r.site, 0, bytes([INT3]), "int3"), Sync("int3"), Poke(r.site, 1, r.new[1:], "tail")]
        steps.append(Sync("tail"))
    return tuple(steps)


def probe_sample(protocol: str) -> tuple[PatchRequest, ...] | None:
    """A request the probe protocol `protocol` performs (to tell whether a mutation changes it), or
    None for the other protocols."""
    if protocol == "kprobe":
        return (PatchRequest(0x1000, b"\xcc\x89\xfb", b"\x48\x89\xfb"),)
    if protocol == "optprobe":
        return (PatchRequest(0x1000, b"\xcc\x89\xd8\x48\xc1", b"\xe9\x00\x00\x00\x00"),)
    return None


PROTOCOLS: dict[str, Callable[[Sequence[PatchRequest]], tuple[Step, ...]]] = {
    "bp": text_poke_bp,
    "bp-batch": text_poke_bp_batch,
    "stop-machine": stop_machine,
    "stop-machine-ftrace": stop_machine_ftrace,
    "naive-bytes": naive_bytes,
    "naive-atomic": naive_atomic,
    "kprobe": kprobe,
    "optprobe": optprobe,
}
#: protocols that patch probes only: the clients that use them name them (`textpoke.clients`)
PROBE_PROTOCOLS = frozenset({"kprobe", "optprobe"})
#: the built-in protocols that rely on the #BP handler (they publish descriptors); the patcher decides
#: from any protocol's steps (`textpoke.stepcheck.publishes`), so a user's protocol needs no list
INT3_PROTOCOLS = frozenset({"bp", "bp-batch"})


# ------------------------------------------------------------------------------------------------
# Mutations: deliberately broken variants the oracle must catch
# ------------------------------------------------------------------------------------------------
def _drop_sync(label: str) -> Callable[[tuple[Step, ...]], tuple[Step, ...]]:
    def m(steps: tuple[Step, ...]) -> tuple[Step, ...]:
        return tuple(s for s in steps if not (isinstance(s, Sync) and s.label == label))

    return m


def _per_batch(fn: Callable[[list[Step]], list[Step]]) -> Callable[[tuple[Step, ...]], tuple[Step, ...]]:
    """Apply `fn` to each Publish..Withdraw batch of a text_poke_bp step list."""

    def m(steps: tuple[Step, ...]) -> tuple[Step, ...]:
        out: list[Step] = []
        batch: list[Step] = []
        for s in steps:
            batch.append(s)
            if isinstance(s, Withdraw):
                out += fn(batch)
                batch = []
        return tuple(out + batch)

    return m


def _tail_before_int3(batch: list[Step]) -> list[Step]:
    tails = [s for s in batch if isinstance(s, Poke) and s.phase == "tail"]
    rest = [s for s in batch if s not in tails]
    i = next(i for i, s in enumerate(rest) if isinstance(s, Poke))
    return rest[:i] + tails + rest[i:]


def _first_before_tail(batch: list[Step]) -> list[Step]:
    firsts = [s for s in batch if isinstance(s, Poke) and s.phase == "first"]
    rest = [s for s in batch if s not in firsts]
    i = next((i for i, s in enumerate(rest) if isinstance(s, Poke) and s.phase == "tail"), None)
    if i is None:
        return batch
    return rest[:i] + firsts + rest[i:]


def _early_withdraw(batch: list[Step]) -> list[Step]:
    syncs = [i for i, s in enumerate(batch) if isinstance(s, Sync)]
    if not syncs:
        return batch
    rest = [s for s in batch if not isinstance(s, Withdraw)]
    last = max(i for i, s in enumerate(rest) if isinstance(s, Sync))
    return [*rest[:last], Withdraw(), *rest[last:]]


def _no_nmi_write(steps: tuple[Step, ...]) -> tuple[Step, ...]:
    return tuple(ModCode(s.site, s.data, nmi_write=False) if isinstance(s, ModCode) else s for s in steps)


#: mutations of text_poke_bp
BP_MUTATIONS: dict[str, Callable[[tuple[Step, ...]], tuple[Step, ...]]] = {
    "no-sync-after-int3": _drop_sync("int3"),
    "no-sync-after-tail": _drop_sync("tail"),
    "no-final-sync": _drop_sync("first"),
    "tail-before-int3": _per_batch(_tail_before_int3),
    "first-before-tail": _per_batch(_first_before_tail),
    "early-withdraw": _per_batch(_early_withdraw),
}
#: mutations of stop-machine-ftrace
STOP_MACHINE_MUTATIONS: dict[str, Callable[[tuple[Step, ...]], tuple[Step, ...]]] = {
    "no-nmi-write": _no_nmi_write,
}


def _drop_grace(label: str) -> Callable[[tuple[Step, ...]], tuple[Step, ...]]:
    def m(steps: tuple[Step, ...]) -> tuple[Step, ...]:
        return tuple(s for s in steps if not (isinstance(s, GracePeriod) and s.label == label))

    return m


#: mutations of the kprobe and optprobe protocols
PROBE_MUTATIONS: dict[str, Callable[[tuple[Step, ...]], tuple[Step, ...]]] = {
    "kprobe-slot-freed-early": _drop_grace("slots"),
    "optprobe-no-wait": _drop_grace("optimize"),
}
MUTATIONS = BP_MUTATIONS | STOP_MACHINE_MUTATIONS | PROBE_MUTATIONS


def build(protocol: str, requests: Sequence[PatchRequest], mutation: str | None = None) -> tuple[Step, ...]:
    """The steps of `protocol` (a built-in name, an installed entry point or ``module:function``, see
    `textpoke.plugins`) for `requests`, optionally mutated. Steps that come from a function outside
    the package are checked first (`textpoke.stepcheck`): a bad one raises `ProtocolError`."""
    from .plugins import resolve_protocol

    p = resolve_protocol(protocol)
    reqs = tuple(requests)
    if p.builtin:
        steps = p.function(reqs)
    else:
        from .stepcheck import call_checked

        steps = call_checked(f"protocol {protocol!r}", p.function, reqs, reqs)
    return mutate(steps, mutation, reqs) if mutation else steps


def mutate(steps: tuple[Step, ...], mutation: str, requests: Sequence[PatchRequest] | None = None) -> tuple[Step, ...]:
    """`steps` broken by `mutation` (a built-in name, an entry point or ``module:function``). A
    mutation from outside the package has its result checked against `requests` (by default the
    requests the steps publish or poke cannot be known, so give them)."""
    from .plugins import resolve_mutation

    m = resolve_mutation(mutation)
    if m.builtin:
        return m.function(steps)
    if requests is None:
        raise ValueError(f"mutation {mutation!r} comes from outside the package: give the requests to check it")
    from .stepcheck import call_checked

    return call_checked(f"mutation {mutation!r}", m.function, tuple(steps), requests)


def describe_steps(steps: Sequence[Step], names: Callable[[int], str] = hex) -> list[str]:
    """One line per step, for people."""
    out = []
    for s in steps:
        if isinstance(s, Poke):
            out.append(f"poke  {names(s.site)}+{s.offset}  {s.data.hex(' ')}  ({s.phase})")
        elif isinstance(s, Sync):
            out.append(f"sync  ({s.label})" if s.local else f"sync  ({s.label}, other CPUs only)")
        elif isinstance(s, ModCode):
            how = "NMIs write it too" if s.nmi_write else "NMIs only waited for"
            out.append(f"modcode {names(s.site)}  {s.data.hex(' ')}  ({how})")
        elif isinstance(s, Publish):
            out.append(f"publish {len(s.requests)} descriptor(s)")
        elif isinstance(s, (KprobeRegister, KprobeUnregister, FreeSlot)):
            out.append(f"{type(s).__name__.lower()} {names(s.site)}")
        elif isinstance(s, GracePeriod):
            out.append(f"grace period ({s.label})")
        else:
            out.append(type(s).__name__.lower())
    return out
