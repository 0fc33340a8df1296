"""A "two-sync" text_poke_bp: the int3 goes in, and the tail is written straight after it.

The reasoning that makes it look safe: once the int3 is on the first byte, any CPU that reaches the
site traps, so the bytes behind it can be rewritten at once, and one sync IPI fewer per batch is a
third less disruption. What it forgets: another CPU may still hold a decoded copy of the old
instruction (nothing has made it serialize), and a snoop can bring it the new tail before the int3,
so it executes old first byte + new tail. Linux syncs after the int3 for exactly this reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from textpoke.protocols import INT3, PatchRequest, Poke, Publish, Step, Sync, Withdraw


def two_sync(requests: Sequence[PatchRequest]) -> list[Step]:
    """int3 on every site, every changed tail, sync; every new first byte, sync."""
    reqs = tuple(sorted(requests, key=lambda r: r.site))
    steps: list[Step] = [Publish(reqs)]
    steps += [Poke(r.site, 0, bytes([INT3]), "int3") for r in reqs]
    steps += [Poke(r.site, 1, r.new[1:], "tail") for r in reqs if r.new[1:] != r.old[1:]]
    steps.append(Sync("tail"))
    steps += [Poke(r.site, 0, r.new[:1], "first") for r in reqs]
    steps.append(Sync("first"))
    steps.append(Withdraw())
    return steps


def one_sync(steps: Sequence[Step]) -> list[Step]:
    """A mutation: keep only the last sync of the protocol."""
    syncs = [i for i, s in enumerate(steps) if isinstance(s, Sync)]
    return [s for i, s in enumerate(steps) if not isinstance(s, Sync) or i == syncs[-1]]
