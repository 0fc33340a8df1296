"""Instruction-fetch coherence: what each CPU has decoded of the patchable text, and when it notices
that the text changed underneath it.

Theory of operation
-------------------
Text memory is one shared buffer, so a *data* read sees a write at once. Instruction fetch is
different: a CPU may keep executing what it decoded before (prefetch queue, decoded-uop cache) until
it serializes. We model this for every *watched* range (the patchable sites the kernel image
declares), and we use Unicorn's translated blocks as the decoded copy itself:

* A site is *watched* from just before the first write to it until it is settled again (the
  machine hooks it only then, so unwatched text runs at full speed). When watching starts every CPU
  is taken to hold a decoded copy of the current bytes -- the worst case, as if all had just run it
  -- and the machine makes that true by translating the site's block on every CPU at that moment.
* `decoded[cpu][site]` holds the bytes that CPU's decoded copy of the site was made from. After the
  CPU drops its copy it is filled again the next time the CPU executes the site (the machine's block
  hook on the site calls `fetch`). At that moment the translated block was made from current memory,
  because of the next rule.
* When text bytes change, every CPU that holds no decoded copy of the affected site has any block that
  covers it discarded at once (`drop(cpu, lo, hi)`): its next fetch sees memory, possibly half
  written, byte by byte (the patcher writes bytes one at a time unless told to write atomically).
  A CPU that does hold a decoded copy keeps it -- and keeps executing the old bytes -- until either
  it serializes (`iretq`, event delivery, `cpuid`) or its *snoop point* comes: a delay drawn from
  the seed after the write, modelling the moment the invalidation reaches that core's front end.
  Both discard the block, so the next execution decodes current memory.
* The writer itself serializes after its write (text_poke ends with a serializing CR3 write).

This gives the two properties DESIGN.md 1.6 asks for: a write is visible to another CPU's fetch no
later than its next serializing event, and possibly earlier at a seeded point; and a multi-byte write
can be observed part done.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["FetchCoherence", "SnoopModel"]


@dataclass(frozen=True, slots=True)
class SnoopModel:
    """When a stale decoded copy is noticed without a serializing event: uniformly in
    [min_delay, max_delay] cycles after the write; `None` bounds mean never (serialization only)."""

    min_delay: int | None = 200
    max_delay: int | None = 4000

    def draw(self, rng) -> int | None:  # rng: random.Random
        if self.min_delay is None or self.max_delay is None:
            return None
        return rng.randint(self.min_delay, self.max_delay)


class FetchCoherence:
    def __init__(
        self,
        ncpus: int,
        sites: Iterable[tuple[int, int]],
        read_text: Callable[[int, int], bytes],
        drop: Callable[[int, int, int], None],
    ) -> None:
        self.sites: dict[int, int] = dict(sorted(sites))
        self._starts = list(self.sites)
        self._read = read_text
        self._drop = drop
        self.decoded: list[dict[int, bytes]] = [{} for _ in range(ncpus)]
        self.stale: list[set[int]] = [set() for _ in range(ncpus)]
        self.watched: set[int] = set()
        self.stale_count: dict[int, int] = {}  # site -> CPUs holding a stale copy of it

    def watch(self, site: int) -> None:
        """Start watching `site`: every CPU now holds a decoded copy of its current bytes."""
        code = self._read(site, self.sites[site])
        for dec in self.decoded:
            dec[site] = code
        self.watched.add(site)
        self.stale_count[site] = 0

    def unwatch(self, site: int) -> None:
        if self.stale_count.get(site):
            raise ValueError(f"site {site:#x} is still stale on some CPU")
        for dec in self.decoded:
            dec.pop(site, None)
        self.watched.discard(site)
        self.stale_count.pop(site, None)

    def add_site(self, addr: int, length: int) -> None:
        self.sites[addr] = length
        self._starts = sorted(self.sites)

    def sites_overlapping(self, lo: int, hi: int) -> list[int]:
        i = bisect.bisect_right(self._starts, lo) - 1
        out = []
        if i >= 0:
            s = self._starts[i]
            if s + self.sites[s] > lo:
                out.append(s)
        j = bisect.bisect_left(self._starts, lo)
        if j < len(self._starts) and self._starts[j] == lo:
            j += 1
        while j < len(self._starts) and self._starts[j] < hi:
            out.append(self._starts[j])
            j += 1
        return out

    def fetch(self, cpu: int, site: int) -> bytes:
        """The bytes `cpu` executes at `site` now (its decoded copy, made now if it has none)."""
        dec = self.decoded[cpu]
        b = dec.get(site)
        if b is None:
            b = self._read(site, self.sites[site])
            dec[site] = b
        return b

    def written(self, writer: int, lo: int, hi: int) -> list[tuple[int, int]]:
        """Text [lo, hi) changed. Returns (cpu, site) pairs now holding a stale decoded copy; the
        caller schedules their snoop points. Copies in no one's hands are discarded here."""
        stale_pairs: list[tuple[int, int]] = []
        hit = self.sites_overlapping(lo, hi)
        for cpu, dec in enumerate(self.decoded):
            if cpu == writer:
                for s in hit:
                    dec.pop(s, None)
                    if s in self.stale[cpu]:
                        self.stale[cpu].discard(s)
                        self.stale_count[s] -= 1
                self._drop(cpu, lo, hi)
                continue
            if not hit:
                self._drop(cpu, lo, hi)
                continue
            for s in hit:
                if s in dec:
                    if s not in self.stale[cpu]:
                        self.stale[cpu].add(s)
                        self.stale_count[s] += 1
                        stale_pairs.append((cpu, s))
                else:
                    self._drop(cpu, s, s + self.sites[s])
        return stale_pairs

    def snoop(self, cpu: int, site: int) -> bool:
        """The invalidation for `site` reaches `cpu`; True when it discarded a stale copy."""
        if site in self.stale[cpu]:
            self.stale[cpu].discard(site)
            self.stale_count[site] -= 1
            del self.decoded[cpu][site]
            self._drop(cpu, site, site + self.sites[site])
            return True
        return False

    def serialize(self, cpu: int) -> int:
        """`cpu` serializes: every stale copy goes. Returns how many were discarded."""
        stale = self.stale[cpu]
        if not stale:
            return 0
        n = len(stale)
        dec = self.decoded[cpu]
        for s in stale:
            del dec[s]
            self.stale_count[s] -= 1
            self._drop(cpu, s, s + self.sites[s])
        stale.clear()
        return n
