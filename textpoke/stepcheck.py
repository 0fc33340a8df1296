"""Checking the steps of a protocol that comes from outside the package, before anything runs.

A user's protocol (or mutation) is only a function returning steps, so nothing stops it from
returning a string, poking an address nobody asked to patch, or releasing CPUs it never stopped.
`check_steps` walks the steps once, with the site bytes and the patcher's state tracked symbolically,
and raises `ProtocolError` naming the first bad step (its 1-based index and what it is) and why.

What is refused
---------------
* the function raising, or returning something other than a list or tuple of steps;
* an element that is not a step (`Publish`, `Poke`, `Sync`, `Withdraw`, `Rendezvous`, `Release`);
* a `Poke` of a site that was not requested, at a negative offset, of no bytes or of something other
  than `bytes`, or running past the end of the site's instruction (a write of the wrong length);
  with a phase that is not one of `POKE_PHASES`, or an "int3" phase that is not `cc` at offset 0;
* a `Sync` whose label is not one of `SYNC_LABELS`, or a `Sync` while the other CPUs are held by a
  `Rendezvous` (they take no IPI until `Release`: the sync would wait forever);
* a `Publish` of requests that were not asked for, or a second one before the `Withdraw`; a
  `Withdraw` with nothing published;
* a `Release` without a `Rendezvous`, a second `Rendezvous` before the `Release`; a `Rendezvous`
  never released, descriptors never withdrawn;
* a protocol after which some requested site does not hold exactly its new bytes.

What is not refused: anything that is merely unsafe (an int3 without descriptors, a missing sync, a
store that tears). Those are for the oracle and the explorer to find.

Known labels
------------
A `Sync` label names which kind of write it follows, with the same words as a `Poke`'s phase:
"int3" (the int3 on the first byte), "tail" (the bytes after it), "first" (the new first byte over
the int3) and "write" (a plain store of new bytes, as stop_machine or an unsafe protocol does).
The mutations (`no-sync-after-int3`, ...) and the timelines select syncs by these labels.

Derived properties
------------------
`publishes(steps)`: the protocol relies on the #BP handler, so each site's new instruction must be
one the handler can emulate. `nmi_unsafe(steps)`: some write changes a site's bytes while the site is
not guarded by an int3 whose descriptor is live, so an NMI handler running on another CPU could
execute the instruction while it is being written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cpus import ConfigError

from .protocols import INT3, ModCode, PatchRequest, Poke, Publish, Release, Rendezvous, Step, Sync, Withdraw

__all__ = ["POKE_PHASES", "SYNC_LABELS", "ProtocolError", "call_checked", "check_steps", "nmi_unsafe", "publishes"]

#: phases a Poke may carry
POKE_PHASES = ("int3", "tail", "first", "write")
#: labels a Sync may carry: the phase of the writes it follows, or ftrace's own sync round
#: (ftrace_modify_all_code's sync before it points ftrace_call at the final tracer)
SYNC_LABELS = (*POKE_PHASES, "ftrace-sync-ipi")
_STEP_TYPES = (Publish, Poke, Sync, Withdraw, Rendezvous, Release, ModCode)


class ProtocolError(ConfigError):
    """A protocol's steps cannot be performed as they are; nothing was run."""

    def __init__(self, message: str, index: int | None = None, step: object = None) -> None:
        super().__init__(message)
        self.index = index  # 1-based index of the bad step, None for the whole protocol
        self.step = step


def _show(step: object) -> str:
    if isinstance(step, Poke):
        data = step.data.hex(" ") if isinstance(step.data, bytes | bytearray) else repr(step.data)
        site = f"{step.site:#x}" if isinstance(step.site, int) else repr(step.site)
        return f"Poke({site}+{step.offset}, {data}, {step.phase!r})"
    if isinstance(step, Sync):
        return f"Sync({step.label!r})"
    if isinstance(step, Publish):
        return f"Publish({len(step.requests)} request(s))" if isinstance(step.requests, tuple) else "Publish(?)"
    if isinstance(step, _STEP_TYPES):
        return f"{type(step).__name__}()"
    text = repr(step)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(step).__name__})"


def call_checked(who: str, fn: Callable[[Any], Any], arg: Any, requests: Sequence[PatchRequest]) -> tuple[Step, ...]:
    """Call a user's protocol or mutation function and check what it returns."""
    try:
        steps = fn(arg)
    except Exception as err:
        raise ProtocolError(f"{who} raised {type(err).__name__}: {err}") from None
    return check_steps(steps, requests, who)


def check_steps(steps: Any, requests: Sequence[PatchRequest], who: str = "protocol") -> tuple[Step, ...]:
    """`steps` as a tuple, or `ProtocolError` naming the first step that cannot be performed."""
    if isinstance(steps, str | bytes | bytearray) or not isinstance(steps, Sequence):
        raise ProtocolError(f"{who} returned {_show(steps)}, not a list or tuple of steps")
    steps = tuple(steps)
    n = len(steps)
    by_site = {r.site: r for r in requests}
    mem = {r.site: bytearray(r.old) for r in requests}
    published_at: int | None = None
    stopped_at: int | None = None

    def bad(i: int, step: object, problem: str) -> ProtocolError:
        return ProtocolError(f"{who}: step {i} of {n}, {_show(step)}, {problem}", i, step)

    for i, s in enumerate(steps, 1):
        if not isinstance(s, _STEP_TYPES):
            raise bad(i, s, "is not a step: use Publish, Poke, Sync, Withdraw, Rendezvous, Release or ModCode")
        if isinstance(s, Poke):
            if not isinstance(s.site, int) or isinstance(s.site, bool) or s.site not in by_site:
                asked = ", ".join(f"{a:#x}" for a in sorted(by_site))
                raise bad(i, s, f"writes outside the requested sites ({asked})")
            if not isinstance(s.data, bytes) or not s.data:
                raise bad(i, s, "must write one or more bytes, given as bytes")
            size = len(by_site[s.site].new)
            if not isinstance(s.offset, int) or s.offset < 0 or s.offset + len(s.data) > size:
                raise bad(i, s, f"writes {len(s.data)} byte(s) at offset {s.offset} of a {size}-byte instruction")
            if s.phase not in POKE_PHASES:
                raise bad(i, s, f"has phase {s.phase!r}; a Poke's phase is one of {', '.join(POKE_PHASES)}")
            if s.phase == "int3" and (s.offset != 0 or s.data != bytes([INT3])):
                raise bad(i, s, "is marked int3 but does not write cc on the first byte")
            mem[s.site][s.offset : s.offset + len(s.data)] = s.data
        elif isinstance(s, ModCode):
            if not isinstance(s.site, int) or isinstance(s.site, bool) or s.site not in by_site:
                asked = ", ".join(f"{a:#x}" for a in sorted(by_site))
                raise bad(i, s, f"writes outside the requested sites ({asked})")
            if not isinstance(s.data, bytes) or len(s.data) != len(by_site[s.site].new):
                raise bad(i, s, f"must write the whole {len(by_site[s.site].new)}-byte instruction, given as bytes")
            if stopped_at is None:
                raise bad(i, s, "writes with NMIs in mind but outside a Rendezvous: do_ftrace_mod_code runs stopped")
            mem[s.site][:] = s.data
        elif isinstance(s, Sync):
            if s.label not in SYNC_LABELS:
                raise bad(i, s, f"has an unknown label; a Sync's label is one of {', '.join(SYNC_LABELS)}")
            if stopped_at is not None:
                raise bad(
                    i,
                    s,
                    f"comes while the Rendezvous of step {stopped_at} holds the other CPUs: they take no "
                    "IPI until Release, so the sync would wait forever",
                )
        elif isinstance(s, Publish):
            reqs = s.requests
            if not isinstance(reqs, tuple) or not reqs or any(not isinstance(r, PatchRequest) for r in reqs):
                raise bad(i, s, "must publish a non-empty tuple of PatchRequest")
            for r in reqs:
                if by_site.get(r.site) != r:
                    raise bad(i, s, f"publishes a request for {r.site:#x} that was not asked for")
            if published_at is not None:
                raise bad(i, s, f"publishes again before the descriptors of step {published_at} are withdrawn")
            published_at = i
        elif isinstance(s, Withdraw):
            if published_at is None:
                raise bad(i, s, "withdraws descriptors that are not published")
            published_at = None
        elif isinstance(s, Rendezvous):
            if stopped_at is not None:
                raise bad(i, s, f"stops the other CPUs again: the Rendezvous of step {stopped_at} holds them")
            stopped_at = i
        elif isinstance(s, Release):
            if stopped_at is None:
                raise bad(i, s, "releases CPUs that no Rendezvous stopped")
            stopped_at = None
    if stopped_at is not None:
        raise bad(stopped_at, steps[stopped_at - 1], "is never released: the other CPUs would stay stopped")
    if published_at is not None:
        raise bad(published_at, steps[published_at - 1], "is never withdrawn")
    for site, r in sorted(by_site.items()):
        if bytes(mem[site]) != r.new:
            raise ProtocolError(
                f"{who} never writes the new bytes of site {site:#x} in full: it would end as "
                f"{bytes(mem[site]).hex(' ')}, not the requested {r.new.hex(' ')}"
            )
    return steps


def publishes(steps: Sequence[Step]) -> bool:
    """The protocol makes the #BP descriptors live: its sites' new instructions must be emulatable."""
    return any(isinstance(s, Publish) for s in steps)


def nmi_unsafe(steps: Sequence[Step], requests: Sequence[PatchRequest]) -> bool:
    """Some write changes a site's bytes while that site is not guarded by an int3 with a live
    descriptor (a lone int3 store on the first byte is the guard itself)."""
    mem = {r.site: bytearray(r.old) for r in requests}
    live: set[int] = set()
    for s in steps:
        if isinstance(s, Publish):
            live = {r.site for r in s.requests}
        elif isinstance(s, Withdraw):
            live = set()
        elif isinstance(s, Poke) and s.site in mem:
            guarded = s.site in live and mem[s.site][0] == INT3
            if not guarded and not (s.offset == 0 and s.data == bytes([INT3])):
                return True
            mem[s.site][s.offset : s.offset + len(s.data)] = s.data
    return False
