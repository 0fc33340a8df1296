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
``Rendezvous``  stop_machine: IPI every other CPU into the stopper, wait for all acknowledgements
``Release``     stop_machine: let the stopped CPUs go (they serialize) and wait until all have left

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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "INT3",
    "INT3_PROTOCOLS",
    "MUTATIONS",
    "PROTOCOLS",
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
    "mutate",
    "naive_atomic",
    "naive_bytes",
    "stop_machine",
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

    @property
    def addr(self) -> int:
        return self.site + self.offset


@dataclass(frozen=True, slots=True)
class Sync:
    label: str


@dataclass(frozen=True, slots=True)
class Withdraw:
    pass


@dataclass(frozen=True, slots=True)
class Rendezvous:
    pass


@dataclass(frozen=True, slots=True)
class Release:
    pass


Step = Publish | Poke | Sync | Withdraw | Rendezvous | Release


def text_poke_bp_batch(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Three syncs for the whole batch, whatever its size."""
    reqs = tuple(sorted(requests, key=lambda r: r.site))
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
    return tuple(steps)


def text_poke_bp(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """One site at a time: a batch of one per request (three syncs each)."""
    out: list[Step] = []
    for r in sorted(requests, key=lambda r: r.site):
        out += text_poke_bp_batch([r])
    return tuple(out)


def stop_machine(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Stop every other CPU, write every instruction whole, let them go."""
    reqs = sorted(requests, key=lambda r: r.site)
    return (Rendezvous(), *(Poke(r.site, 0, r.new, "write") for r in reqs), Release())


def naive_bytes(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Unsafe: every changed byte stored on its own, no sync at all."""
    out: list[Step] = []
    for r in sorted(requests, key=lambda r: r.site):
        out += [Poke(r.site, i, r.new[i : i + 1], "write") for i in range(len(r.new)) if r.new[i] != r.old[i]]
    return tuple(out)


def naive_atomic(requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Unsafe: each instruction in one atomic store, no sync."""
    return tuple(Poke(r.site, 0, r.new, "write") for r in sorted(requests, key=lambda r: r.site))


PROTOCOLS: dict[str, Callable[[Sequence[PatchRequest]], tuple[Step, ...]]] = {
    "bp": text_poke_bp,
    "bp-batch": text_poke_bp_batch,
    "stop-machine": stop_machine,
    "naive-bytes": naive_bytes,
    "naive-atomic": naive_atomic,
}
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


MUTATIONS: dict[str, Callable[[tuple[Step, ...]], tuple[Step, ...]]] = {
    "no-sync-after-int3": _drop_sync("int3"),
    "no-sync-after-tail": _drop_sync("tail"),
    "no-final-sync": _drop_sync("first"),
    "tail-before-int3": _per_batch(_tail_before_int3),
    "first-before-tail": _per_batch(_first_before_tail),
    "early-withdraw": _per_batch(_early_withdraw),
}


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
            out.append(f"sync  ({s.label})")
        elif isinstance(s, Publish):
            out.append(f"publish {len(s.requests)} descriptor(s)")
        else:
            out.append(type(s).__name__.lower())
    return out
